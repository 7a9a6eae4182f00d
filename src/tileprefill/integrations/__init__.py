"""Adapters that let engines run their attention on tileprefill's public Ops.

Each adapter is a module of its own with an optional extra (`pip install tileprefill[transformers]`);
importing this package imports none of them, nor any engine.
"""
