"""Input checks of the public Ops, run before any kernel (and so before any cache write).

Three kinds, kept apart because they cost differently:

- metadata checks (`specs`: `check_metadata` and the checks of the bound shape symbols)
  read only ranks, shapes, dtypes, devices and strides. They always run: they are free,
  they never synchronise with the device, and they trace under `torch.compile`.
- memory checks (`memory`): whether a view (a cache, an activation, an output) can be read and
  written in place, and whether tensors a call writes share memory with others. Metadata only, like the above.
- value checks (`values`: `check_cu_seqlens`, `check_lengths`, ...) read the index tensors'
  values, copying them to the host. Ops run them only when constructed with `validate=True`.

Every error names the argument, what was expected and what was found.
"""

from tileprefill.validation.memory import (
    VECTOR_BYTES,
    check_apart,
    check_kv_order,
    check_same_strides,
    check_view,
    distinct_elements,
    kv_order_of,
    overlaps,
    row_vector_bytes,
    view_problem,
    widest_vector,
)
from tileprefill.validation.specs import (
    Binding,
    Dim,
    Dims,
    DtypeRule,
    StrideRule,
    TensorSpec,
    check_heads,
    check_metadata,
    check_positive,
    check_rope_table_length,
    follows,
    rotary_dim_of,
    spec,
)
from tileprefill.validation.values import (
    check_append_capacity,
    check_block_table,
    check_cu_seqlens,
    check_lengths,
    check_rope_positions,
    check_slot_mapping,
    check_slots_fit,
    host_values,
    rows,
)

__all__ = [
    "VECTOR_BYTES",
    "Binding",
    "Dim",
    "Dims",
    "DtypeRule",
    "StrideRule",
    "TensorSpec",
    "check_apart",
    "check_append_capacity",
    "check_block_table",
    "check_cu_seqlens",
    "check_heads",
    "check_kv_order",
    "check_lengths",
    "check_metadata",
    "check_positive",
    "check_rope_positions",
    "check_rope_table_length",
    "check_same_strides",
    "check_slot_mapping",
    "check_slots_fit",
    "check_view",
    "distinct_elements",
    "follows",
    "host_values",
    "kv_order_of",
    "overlaps",
    "rotary_dim_of",
    "row_vector_bytes",
    "rows",
    "spec",
    "view_problem",
    "widest_vector",
]
