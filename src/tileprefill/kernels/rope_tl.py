"""Placeholder: filled in by its owner."""

from __future__ import annotations

from tileprefill.kernels.base import Kernel

KERNELS: tuple[type[Kernel], ...] = ()
