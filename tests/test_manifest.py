"""attention.yaml against the code, both ways: it can never drift from the Ops it describes."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import pytest
import yaml

import tileprefill as tp
from tileprefill.manifest import Manifest, ManifestError, OpEntry, load_manifest, parse_manifest
from tileprefill.ops import CACHE_OPS, PUBLIC_OPS, OpClass, PagedCacheSlotAppend, PrefillOp
from tileprefill.validation import TensorSpec

#: A public Op class: an attention Op, or a cache write (no q, no output).
AnyOpClass = OpClass | type[PagedCacheSlotAppend]
#: Every public Op, in manifest order: the attention Ops, then the cache writes.
ALL_OPS: tuple[AnyOpClass, ...] = (*PUBLIC_OPS, *CACHE_OPS)


@pytest.fixture(scope="module")
def manifest() -> Manifest:
    return load_manifest()


def _entry(manifest: Manifest, op: AnyOpClass) -> OpEntry:
    return manifest.op(op.__name__)


def _outputs(op: AnyOpClass) -> tuple[TensorSpec, ...]:
    return (op.output_spec,) if issubclass(op, PrefillOp) else ()  # type: ignore[union-attr]


def _outputs_with_lse(op: AnyOpClass) -> tuple[TensorSpec, ...]:
    """What an attention Op built with return_lse=True returns: the output, then the LSE."""
    return (op.output_spec, op.lse_spec) if issubclass(op, PrefillOp) else ()  # type: ignore[union-attr]


def test_every_exported_op_is_in_the_manifest_and_back(manifest: Manifest) -> None:
    exported = {name for name in tp.__all__ if name.startswith("GQA")}
    assert exported == {op.__name__ for op in PUBLIC_OPS}
    assert all(op.__name__ in tp.__all__ for op in CACHE_OPS)
    assert [e.name for e in manifest.ops] == [op.__name__ for op in ALL_OPS]
    for entry in manifest.ops:
        assert getattr(tp, entry.name) in ALL_OPS, f"{entry.name} in the manifest is not an exported Op"


@pytest.mark.parametrize("op", ALL_OPS, ids=lambda op: op.__name__)
def test_inputs_match_call_signature_and_specs(manifest: Manifest, op: AnyOpClass) -> None:
    entry = _entry(manifest, op)
    assert entry.kv_layout is op.kv_layout
    call = [p for name, p in inspect.signature(op.__call__).parameters.items() if name != "self"]
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and p.default is p.empty for p in call), (
        "Op inputs are fixed and ordered: no defaults, no *args"
    )
    assert [i.name for i in entry.inputs] == [p.name for p in call]
    assert [(i.name, i.dtype, i.shape, i.strides) for i in entry.inputs] == [
        (s.name, s.dtype.value, s.shape, s.strides.value) for s in op.input_specs
    ]
    # An output's strides are what `run_into` takes as the caller's buffer.
    assert [(o.name, o.dtype, o.shape, o.strides) for o in entry.outputs] == [
        (s.name, s.dtype.value, s.shape, s.strides.value) for s in _outputs(op)
    ]
    assert [(o.name, o.dtype, o.shape, o.strides) for o in entry.outputs_with_lse] == [
        (s.name, s.dtype.value, s.shape, s.strides.value) for s in _outputs_with_lse(op)
    ]
    # What a cache write writes in place (its only effect); the attention Ops return their output.
    assert list(entry.mutates) == list(getattr(op, "mutates", ()))
    assert set(entry.mutates) <= {i.name for i in entry.inputs}


@pytest.mark.parametrize("op", ALL_OPS, ids=lambda op: op.__name__)
def test_plan_and_run_split_the_call_inputs(manifest: Manifest, op: AnyOpClass) -> None:
    """`plan` takes the metadata tensors, then the keyword-only shape; its plan's `run` the data
    tensors; together they are the call's inputs, each in call order."""
    entry = _entry(manifest, op)
    plan_method: Callable[..., object] = op.plan  # type: ignore[union-attr]  # public Ops have one
    plan = inspect.signature(plan_method)
    tensors = [p for name, p in plan.parameters.items() if name != "self" and p.kind is not p.KEYWORD_ONLY]
    keywords = [p for p in plan.parameters.values() if p.kind is p.KEYWORD_ONLY]
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and p.default is p.empty for p in tensors)
    assert [p.name for p in tensors] == list(entry.plan.inputs) == list(op.plan_inputs)
    hints = typing.get_type_hints(plan_method)
    assert [p.name for p in keywords] == ["shape"] and hints["shape"].__name__ == entry.plan.shape
    plan_class = hints["return"]
    run = [p for name, p in inspect.signature(plan_class.run).parameters.items() if name != "self"]
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and p.default is p.empty for p in run)
    assert [p.name for p in run] == list(entry.run.inputs) == [s.name for s in op.run_specs]
    if entry.run_into is None:  # no output to write into
        assert not _outputs(op) and not hasattr(plan_class, "run_into")
    else:
        run_into = [
            p for name, p in inspect.signature(plan_class.run_into).parameters.items() if name != "self"
        ]
        assert all(
            p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and p.default is p.empty for p in run_into
        )
        outputs = [s.name for s in _outputs(op)]
        assert [p.name for p in run_into] == list(entry.run_into.inputs) == [*outputs, *entry.run.inputs]
    call = [i.name for i in entry.inputs]
    assert sorted([*entry.plan.inputs, *entry.run.inputs]) == sorted(call)
    for part in (entry.plan.inputs, entry.run.inputs):
        assert list(part) == [n for n in call if n in part], f"{part} is not in call order"


@pytest.mark.parametrize("op", ALL_OPS, ids=lambda op: op.__name__)
def test_params_match_constructor(manifest: Manifest, op: AnyOpClass) -> None:
    entry = _entry(manifest, op)
    params = [p for name, p in inspect.signature(op.__init__).parameters.items() if name != "self"]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params), (
        "constructor params are keyword-only"
    )
    assert [(p.name, p.type, p.required, p.default) for p in entry.params] == [
        (p.name, p.annotation, p.default is p.empty, None if p.default is p.empty else p.default)
        for p in params
    ]


@pytest.mark.parametrize("op", ALL_OPS, ids=lambda op: op.__name__)
def test_kernel_map_matches_default_kernel_map(manifest: Manifest, op: AnyOpClass) -> None:
    entry = _entry(manifest, op)
    in_manifest = {k.key.value: k.kernel for k in entry.kernel_map}
    in_code = {key.value: cls.__name__ for key, cls in op.default_kernel_map.items()}
    expected_yaml = "\n".join(f"        {k}: {v}" for k, v in in_code.items())
    assert in_manifest == in_code, f"{op.__name__}: source.kernel_map should read\n{expected_yaml}"


def test_symbols_cover_every_shape(manifest: Manifest) -> None:
    used = {dim.symbol for op in ALL_OPS for spec in (*op.input_specs, *_outputs(op)) for dim in spec.dims}
    assert used == set(manifest.symbols)


def test_loader_rejects_malformed_files(tmp_path: Path, manifest: Manifest) -> None:
    good = yaml.safe_load(load_manifest_text())
    assert parse_manifest(good) == manifest
    bad_layout = yaml.safe_load(load_manifest_text())
    bad_layout["ops"][0]["kv_layout"] = "ring"
    with pytest.raises(ManifestError, match=r"ops\[0\] \(GQAPrefill\)\.kv_layout: expected one of"):
        parse_manifest(bad_layout)
    bad_key = yaml.safe_load(load_manifest_text())
    bad_key["ops"][1]["source"]["kernel_map"]["attn_warp_speed"] = "Nope"
    with pytest.raises(ManifestError, match="attn_warp_speed"):
        parse_manifest(bad_key)
    bad_param = yaml.safe_load(load_manifest_text())
    bad_param["ops"][2]["signature"]["params"][0].pop("required")
    with pytest.raises(ManifestError, match="required"):
        parse_manifest(bad_param)
    path = tmp_path / "m.yaml"
    path.write_text("ops: {}\nsymbols: {}\n")
    with pytest.raises(ManifestError, match="ops: expected a list"):
        load_manifest(path)


def load_manifest_text() -> str:
    return resources.files("tileprefill.manifest").joinpath("attention.yaml").read_text(encoding="utf-8")
