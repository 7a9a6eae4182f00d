"""Value checks of the index tensors (lengths, cu_seqlens, block tables, slot mappings): an Op runs
them only when built with `validate=True`, since they copy the values to the host (one
device-to-host copy for all of a plan's metadata, which synchronises with the device).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def host_values(tensors: Sequence[torch.Tensor]) -> list[list[int]]:
    """The values of small int32 index tensors, each flattened, on the host: one device-to-host copy
    for all of them (it synchronises with the device)."""
    if not tensors:
        return []
    flat = torch.cat([t if t.dim() == 1 else t.reshape(-1) for t in tensors]).tolist()
    values: list[list[int]] = []
    start = 0
    for t in tensors:
        values.append(flat[start : start + t.numel()])
        start += t.numel()
    return values


def rows(values: Sequence[int], count: int, width: int) -> list[list[int]]:
    """A flattened (count, width) table as its rows."""
    return [list(values[i * width : (i + 1) * width]) for i in range(count)]


def check_cu_seqlens(name: str, cu: Sequence[int], total: int, total_source: str) -> list[int]:
    """cu_seqlens start at 0, never decrease and end at the packed token count; returns lengths."""
    if cu[0] != 0:
        raise ValueError(f"{name}: expected {name}[0] = 0, got {cu[0]}")
    for b in range(len(cu) - 1):
        if cu[b + 1] < cu[b]:
            raise ValueError(
                f"{name}: expected nondecreasing values, got {name}[{b + 1}] = {cu[b + 1]} < "
                f"{name}[{b}] = {cu[b]}"
            )
    if cu[-1] != total:
        raise ValueError(
            f"{name}: expected {name}[-1] = {total} (the tokens of {total_source}), got {cu[-1]}"
        )
    return [cu[b + 1] - cu[b] for b in range(len(cu) - 1)]


def check_lengths(name: str, lengths: Sequence[int], capacity: int, capacity_is: str) -> None:
    """Per-sequence lengths within [0, capacity]."""
    for b, n in enumerate(lengths):
        if not 0 <= n <= capacity:
            raise ValueError(f"{name}: expected {name}[{b}] in [0, {capacity}] ({capacity_is}), got {n}")


def check_append_capacity(
    name: str, cache_lens: Sequence[int], q_lens: Sequence[int], capacity: int, capacity_is: str
) -> None:
    """The keys already cached plus the new ones fit the cache of each sequence."""
    for b, (cached, new) in enumerate(zip(cache_lens, q_lens, strict=True)):
        if cached < 0:
            raise ValueError(f"{name}: expected {name}[{b}] >= 0, got {cached}")
        if cached + new > capacity:
            raise ValueError(
                f"{name}: expected {name}[{b}] + q_len {new} <= {capacity} ({capacity_is}), "
                f"got {cached} + {new} = {cached + new}"
            )


def check_block_table(
    block_table: Sequence[Sequence[int]], kv_lens: Sequence[int], page_size: int, num_pages: int
) -> None:
    """Entries of the pages each sequence uses (positions < its kv length) name real pages."""
    for b, (row, n) in enumerate(zip(block_table, kv_lens, strict=True)):
        used = math.ceil(n / page_size)
        for i in range(used):
            if not 0 <= row[i] < num_pages:
                raise ValueError(
                    f"block_table: expected entries in [0, {num_pages}) (num_pages) for the {used} pages "
                    f"sequence {b} uses (positions < {n}), got block_table[{b}, {i}] = {row[i]}"
                )


def check_slot_mapping(values: Sequence[int]) -> None:
    """Slots are -1 (skip the token) or a row, and no two tokens name one row (the rows a write
    would then leave depend on the order of the writes). The upper bound depends on num_pages:
    `check_slots_fit`."""
    first: dict[int, int] = {}
    for t, slot in enumerate(values):
        if slot < -1:
            raise ValueError(
                f"slot_mapping: expected values >= -1 (-1 skips a token), got slot_mapping[{t}] = {slot}"
            )
        if slot == -1:
            continue
        seen = first.setdefault(slot, t)
        if seen != t:
            raise ValueError(
                f"slot_mapping: expected distinct slots (two tokens writing one row leave an "
                f"order-dependent result), got slot_mapping[{seen}] = slot_mapping[{t}] = {slot}"
            )


def check_slots_fit(values: Sequence[int], num_pages: int, page_size: int) -> None:
    """Every slot names a row of the cache: slot < num_pages * page_size."""
    rows_ = num_pages * page_size
    for t, slot in enumerate(values):
        if slot >= rows_:
            raise ValueError(
                f"slot_mapping: expected values in [-1, {rows_}) (num_pages {num_pages} * page_size "
                f"{page_size}), got slot_mapping[{t}] = {slot}"
            )


def check_rope_positions(name: str, last_positions: Sequence[int], table_rows: int, why: str) -> None:
    """Every rotated token's position has a row in cos/sin; `last_positions[b]` is -1 for no token."""
    for b, last in enumerate(last_positions):
        if last >= table_rows:
            raise ValueError(
                f"{name}: expected more than {last} rows (sequence {b} rotates position {last}, {why}), "
                f"got {table_rows}"
            )
