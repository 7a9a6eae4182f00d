"""Typed records of `attention.yaml`, the manifest of the public Ops.

The loader checks the file's structure (and that every kernel key exists) and
nothing else: tests/test_manifest.py compares the records with the code both
ways, so the manifest cannot drift from the Ops it describes.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib import resources
from pathlib import Path

import attrs
import yaml

from tileprefill.context import KVLayout
from tileprefill.keys import KernelKey, key_from_value

#: A parameter default as YAML writes it.
Default = bool | int | float | str | None

MANIFEST_FILE = "attention.yaml"


class ManifestError(ValueError):
    """The manifest file does not have the structure this loader reads."""


@attrs.frozen
class TensorEntry:
    """One tensor input or output: dtype rule (e.g. "q.dtype"), symbolic shape (e.g. "(B, Sq, Hq, D)")
    and stride rule ("contiguous" unless the YAML says otherwise: q, k, v, a KV cache and the output
    a `run_into` writes are any view of the caller's storage, "D contiguous, strides a multiple of
    a row's widest vector")."""

    name: str
    dtype: str
    shape: str
    strides: str = "contiguous"


@attrs.frozen
class ParamEntry:
    """One keyword parameter of the Op's constructor; `required` params have no default."""

    name: str
    type: str
    required: bool
    default: Default


@attrs.frozen
class KernelEntry:
    key: KernelKey
    kernel: str  # the class name


@attrs.frozen
class PlanEntry:
    """`op.plan(<inputs>, shape=<shape>)`: the per-batch metadata tensors, in order, and the shape class."""

    inputs: tuple[str, ...]
    shape: str


@attrs.frozen
class RunEntry:
    """`plan.run(<inputs>)` (the per-layer data tensors) or `plan.run_into(<inputs>)` (the caller's
    output, then the same), in order."""

    inputs: tuple[str, ...]


@attrs.frozen
class OpEntry:
    name: str
    kv_layout: KVLayout
    inputs: tuple[TensorEntry, ...]
    outputs: tuple[TensorEntry, ...]
    params: tuple[ParamEntry, ...]
    plan: PlanEntry
    run: RunEntry
    #: None for an Op with no output (a cache write).
    run_into: RunEntry | None
    kernel_map: tuple[KernelEntry, ...]
    #: The inputs the Op writes in place (a cache write's caches; empty for the attention Ops).
    mutates: tuple[str, ...] = ()
    #: What the calls of an attention Op built with `return_lse=True` return, in order (the output,
    #: then the LSE), and its `run_into` takes as `out`; empty for a cache write.
    outputs_with_lse: tuple[TensorEntry, ...] = ()


@attrs.frozen
class Manifest:
    symbols: Mapping[str, str]
    ops: tuple[OpEntry, ...]

    def op(self, name: str) -> OpEntry:
        for entry in self.ops:
            if entry.name == name:
                return entry
        raise KeyError(f"op: expected one of {[e.name for e in self.ops]}, got {name!r}")


def load_manifest(path: Path | None = None) -> Manifest:
    """The manifest shipped with the package, or the YAML file at `path`."""
    if path is None:
        text = resources.files("tileprefill.manifest").joinpath(MANIFEST_FILE).read_text(encoding="utf-8")
        where = f"tileprefill/manifest/{MANIFEST_FILE}"
    else:
        text = path.read_text(encoding="utf-8")
        where = str(path)
    return parse_manifest(yaml.safe_load(text), where)


def parse_manifest(document: object, where: str = "manifest") -> Manifest:
    root = _mapping(document, where)
    symbols = _mapping(root.get("symbols"), f"{where}: symbols")
    ops = tuple(
        _op(item, f"{where}: ops[{i}]") for i, item in enumerate(_list(root.get("ops"), f"{where}: ops"))
    )
    names = [op.name for op in ops]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ManifestError(f"{where}: ops: expected unique names, got duplicates {duplicates}")
    return Manifest(
        {_str(k, f"{where}: symbols"): _str(v, f"{where}: symbols.{k}") for k, v in symbols.items()}, ops
    )


def _op(item: object, where: str) -> OpEntry:
    entry = _mapping(item, where)
    name = _str(entry.get("name"), f"{where}.name")
    where = f"{where} ({name})"
    layout = _str(entry.get("kv_layout"), f"{where}.kv_layout")
    try:
        kv_layout = KVLayout(layout)
    except ValueError:
        raise ManifestError(
            f"{where}.kv_layout: expected one of {[m.value for m in KVLayout]}, got {layout!r}"
        ) from None
    signature = _mapping(entry.get("signature"), f"{where}.signature")
    source = _mapping(entry.get("source"), f"{where}.source")
    kernel_map = _mapping(source.get("kernel_map"), f"{where}.source.kernel_map")
    kernels: list[KernelEntry] = []
    for value, cls in kernel_map.items():
        try:
            key = key_from_value(_str(value, f"{where}.source.kernel_map"))
        except ValueError as error:
            raise ManifestError(f"{where}.source.kernel_map: {error}") from None
        kernels.append(KernelEntry(key, _str(cls, f"{where}.source.kernel_map.{value}")))
    return OpEntry(
        name=name,
        kv_layout=kv_layout,
        inputs=_tensors(signature.get("inputs"), f"{where}.signature.inputs"),
        outputs=_tensors(signature.get("outputs"), f"{where}.signature.outputs"),
        params=tuple(
            _param(p, f"{where}.signature.params[{i}]")
            for i, p in enumerate(_list(signature.get("params"), f"{where}.signature.params"))
        ),
        plan=_plan(signature.get("plan"), f"{where}.signature.plan"),
        run=_run(signature.get("run"), f"{where}.signature.run"),
        run_into=(
            None
            if "run_into" not in signature
            else _run(signature.get("run_into"), f"{where}.signature.run_into")
        ),
        kernel_map=tuple(kernels),
        mutates=_names(signature.get("mutates", []), f"{where}.signature.mutates"),
        outputs_with_lse=_tensors(
            signature.get("outputs_with_lse", []), f"{where}.signature.outputs_with_lse"
        ),
    )


def _run(value: object, where: str) -> RunEntry:
    return RunEntry(_names(_mapping(value, where).get("inputs"), f"{where}.inputs"))


def _plan(value: object, where: str) -> PlanEntry:
    entry = _mapping(value, where)
    return PlanEntry(
        _names(entry.get("inputs"), f"{where}.inputs"), _str(entry.get("shape"), f"{where}.shape")
    )


def _names(value: object, where: str) -> tuple[str, ...]:
    return tuple(_str(item, f"{where}[{i}]") for i, item in enumerate(_list(value, where)))


def _tensors(value: object, where: str) -> tuple[TensorEntry, ...]:
    entries: list[TensorEntry] = []
    for i, item in enumerate(_list(value, where)):
        t = _mapping(item, f"{where}[{i}]")
        entries.append(
            TensorEntry(
                name=_str(t.get("name"), f"{where}[{i}].name"),
                dtype=_str(t.get("dtype"), f"{where}[{i}].dtype"),
                shape=_str(t.get("shape"), f"{where}[{i}].shape"),
                strides=_str(t.get("strides", "contiguous"), f"{where}[{i}].strides"),
            )
        )
    return tuple(entries)


def _param(item: object, where: str) -> ParamEntry:
    p = _mapping(item, where)
    required = p.get("required", False)
    if not isinstance(required, bool):
        raise ManifestError(f"{where}.required: expected true or false, got {required!r}")
    if required == ("default" in p):
        raise ManifestError(f"{where}: expected either `required: true` or a `default`, got keys {sorted(p)}")
    default = p.get("default")
    if not isinstance(default, bool | int | float | str | None):
        raise ManifestError(f"{where}.default: expected a scalar, got {default!r}")
    return ParamEntry(
        name=_str(p.get("name"), f"{where}.name"),
        type=_str(p.get("type"), f"{where}.type"),
        required=required,
        default=default,
    )


def _mapping(value: object, where: str) -> Mapping[str, object]:
    if not isinstance(value, dict):
        raise ManifestError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def _list(value: object, where: str) -> list[object]:
    if not isinstance(value, list):
        raise ManifestError(f"{where}: expected a list, got {type(value).__name__}")
    return value


def _str(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise ManifestError(f"{where}: expected a string, got {value!r}")
    return value
