"""The manifest of the public Ops (`attention.yaml`) and its typed loader."""

from tileprefill.manifest.loader import (
    KernelEntry,
    Manifest,
    ManifestError,
    OpEntry,
    ParamEntry,
    PlanEntry,
    RunEntry,
    TensorEntry,
    load_manifest,
    parse_manifest,
)

__all__ = [
    "KernelEntry",
    "Manifest",
    "ManifestError",
    "OpEntry",
    "ParamEntry",
    "PlanEntry",
    "RunEntry",
    "TensorEntry",
    "load_manifest",
    "parse_manifest",
]
