"""Sub-masks of the IR: the rows of some query tokens against some key tokens, block boundaries kept exact.

A slice takes query token ranges ``[(a, b), ...]`` and key token ranges, each ascending and
non-overlapping, and returns the mask of the concatenated query tokens against the concatenated
key tokens. Where a range edge cuts a block, the block is cut there: its part inside the range
becomes a shorter block, with the same list (rows) or listed wherever the whole block was
(columns). So the token mask of a slice is exactly the matching sub-matrix of the token mask:
``slice(m, q, kv).token_mask() == m.token_mask()[:, q_tokens][:, :, kv_tokens]``.

Context parallelism uses it (``sparsecore.integrations.diffusers.ring``): under ring attention a
rank holds one query shard and, at each ring step, one key shard; the step's kernel runs the
slice of the whole mask for that (query range, key range), and an empty slice skips the step.

Works on host masks (NumPy) and device masks (torch lists stay on their device; block boundaries
are host NumPy as always). :func:`slices` cuts one query selection against several key selections
with one host read in all (the sizes of the new lists); no Python loop over heads, rows or blocks.
Masks whose unlisted blocks are approximated (``unselected`` other than ``"drop"``) can be sliced
by rows only: the approximation of a cut or dropped key block is not the sum of its parts.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from . import csr
from . import validation as v
from .block_mask import BlockMask

Ranges = Sequence[tuple[int, int]]


def slice_mask(mask: BlockMask, q_ranges: Any, kv_ranges: Any) -> BlockMask:
    """The sub-mask of query tokens ``q_ranges`` against key tokens ``kv_ranges`` (see the module docstring).

    Each of ``q_ranges`` / ``kv_ranges`` is one ``(start, stop)`` pair or a sequence of them, ascending
    and non-overlapping, within ``[0, q_len]`` / ``[0, kv_len]``.
    """
    return slices(mask, q_ranges, [kv_ranges])[0]


def slices(mask: BlockMask, q_ranges: Any, kv_range_sets: Sequence[Any]) -> list[BlockMask]:
    """``[slice_mask(mask, q_ranges, kv) for kv in kv_range_sets]`` with one host read in all."""
    if not isinstance(mask, BlockMask):
        raise TypeError(f"mask: expected a sparsecore BlockMask, got {type(mask).__name__}")
    q_ranges = _ranges(q_ranges, mask.q_len, "q_ranges")
    kv_sets = [_ranges(kv, mask.kv_len, f"kv_range_sets[{i}]") for i, kv in enumerate(kv_range_sets)]
    if not kv_sets:
        return []
    if mask.unselected.kind != "drop" and any(kv != [(0, mask.kv_len)] for kv in kv_sets):
        raise ValueError(f"kv_ranges: a mask with unselected={str(mask.unselected)!r} approximates every unlisted "
                         f"key block, which does not split over key ranges; expected the whole key range "
                         f"[(0, {mask.kv_len})], got {[kv for kv in kv_sets if kv != [(0, mask.kv_len)]][0]}; "
                         f"slice such masks by query rows only")
    q_offsets, q_parent, _, _ = _refine(mask.q_offsets, q_ranges)
    columns = [_refine(mask.kv_offsets, kv) for kv in kv_sets]
    device = mask.device
    xp = _Ops(device)
    indptr = xp.long(mask.indptr)
    indices = xp.long(mask.indices)
    rows = xp.upload(q_parent)                                     # parent query block of every new row
    starts, stops = indptr[:, :-1][:, rows], indptr[:, 1:][:, rows]  # [H, MB'] entry ranges of the parents
    prefixes, counts = [], []
    for _, _, selected, first in columns:
        weight = xp.upload(selected)[indices]                     # new blocks per listed parent block
        prefix = xp.cat_zero(xp.cumsum(weight))                    # [nnz + 1]
        prefixes.append(prefix)
        counts.append(prefix[stops] - prefix[starts])
    totals = xp.host_ints(xp.stack_sums(counts))                   # the one host read
    if max(totals) > v.INDEX_LIMIT:                                # cut blocks list more entries than they were
        raise ValueError(f"kv_range_sets: the slices would list {max(totals):,} key blocks, more than the int32 index "
                         f"limit {v.INDEX_LIMIT:,}; cut fewer blocks (ranges on the mask's block boundaries) or fewer "
                         f"heads")
    out = []
    for (kv_offsets, _, selected, first), prefix, count, total in zip(columns, prefixes, counts, totals):
        new_indptr = csr.indptr_from_counts(count)
        new_indices = _expand(xp, indices, prefix, starts, new_indptr, count, xp.upload(first), total)
        meta = {**mask.meta, "slice": {"q": [list(r) for r in q_ranges],
                                       "kv": [list(r) for r in kv_sets[len(out)]]}}
        out.append(_build(mask, q_offsets, kv_offsets, new_indptr, new_indices, meta))
    return out


def _expand(xp: "_Ops", indices: Any, prefix: Any, starts: Any, new_indptr: Any, count: Any, first: Any,
            total: int) -> Any:
    """The new lists: every listed parent key block of a parent row becomes its selected (cut) blocks."""
    rows = count.shape[0] * count.shape[1]
    row_of = xp.repeat(xp.arange(rows), count.reshape(-1), total)   # new row (flat h * MB' + i) of every entry
    row_start = new_indptr[:, :-1].reshape(-1)[row_of]
    base = prefix[starts.reshape(-1)[row_of]]                         # prefix at the parent row's first entry
    target = base + xp.arange(total) - row_start
    entry = xp.searchsorted(prefix, target) - 1                       # the parent entry that yields this one
    return first[indices[entry]] + (target - prefix[entry])


def _build(mask: BlockMask, q_offsets: np.ndarray, kv_offsets: np.ndarray, indptr: Any, indices: Any,
           meta: dict) -> BlockMask:
    if mask.on_host:
        return BlockMask.unchecked(mask.num_heads, q_offsets, kv_offsets, v.frozen(indptr.astype(np.int32)),
                                   v.frozen(indices.astype(np.int32)), mask.budgets, meta, mask.unselected)
    import torch
    return BlockMask.unchecked(mask.num_heads, q_offsets, kv_offsets, indptr.to(torch.int32),
                               indices.to(torch.int32), mask.budgets, meta, mask.unselected)


def _ranges(ranges: Any, length: int, field: str) -> list[tuple[int, int]]:
    """``ranges`` as a checked list of ``(start, stop)``: one pair or a sequence of pairs (lists, tuples, NumPy
    arrays or tensors; a 0-d integer array or tensor counts as an int)."""
    if not _sized(ranges):
        raise TypeError(f"{field}: expected (start, stop) or a sequence of (start, stop) pairs, got "
                        f"{type(ranges).__name__} {ranges!r}")
    if len(ranges) == 2 and not any(_sized(r) for r in ranges):
        ranges = [tuple(ranges)]
    out: list[tuple[int, int]] = []
    for i, pair in enumerate(ranges):
        if not _sized(pair) or len(pair) != 2:
            raise TypeError(f"{field}[{i}]: expected a (start, stop) pair of ints, got {pair!r}")
        start, stop = (v.check_int(_scalar(end), f"{field}[{i}][{j}]", 0) for j, end in enumerate(pair))
        low = out[-1][1] if out else 0
        if not low <= start < stop <= length:
            raise ValueError(f"{field}[{i}]: expected {low} <= start < stop <= {length} (ascending, non-overlapping "
                             f"token ranges), got ({start}, {stop})")
        if out and out[-1][1] == start:                            # adjacent ranges are one range
            out[-1] = (out[-1][0], stop)
        else:
            out.append((start, stop))
    if not out:
        raise ValueError(f"{field}: expected at least one (start, stop) range, got none")
    return out


def _sized(value: Any) -> bool:
    """Whether ``value`` is a sequence (a 0-d array or tensor has ``__len__`` but no length; a string is text)."""
    return not isinstance(value, (str, bytes)) and hasattr(value, "__len__") and getattr(value, "ndim", 1) != 0


def _scalar(value: Any) -> Any:
    """A 0-d NumPy array or tensor as the Python scalar it holds (then checked as an int); anything else as it is."""
    return value.item() if hasattr(value, "item") and getattr(value, "ndim", None) == 0 else value


def _refine(offsets: np.ndarray, ranges: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                         np.ndarray]:
    """One side cut at the range edges.

    Returns the new offsets, the parent block of every new block, and per parent block the number
    of its (cut) blocks inside the ranges and the new id of the first of them (consecutive ids).
    """
    edges = np.array(ranges, dtype=np.int64)
    cuts = np.union1d(offsets, edges.reshape(-1))
    starts = cuts[:-1]
    first_cut, last_cut = np.searchsorted(starts, edges[:, 0]), np.searchsorted(starts, edges[:, 1])
    marks = np.zeros(len(starts) + 1, dtype=np.int64)
    np.add.at(marks, first_cut, 1)
    np.add.at(marks, last_cut, -1)
    inside = np.cumsum(marks[:-1]) > 0
    sizes = np.diff(cuts)[inside]
    new_offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    parent = np.searchsorted(offsets, starts, side="right") - 1
    kept_parent = parent[inside]
    selected = np.bincount(kept_parent, minlength=len(offsets) - 1).astype(np.int64)
    first = np.searchsorted(kept_parent, np.arange(len(offsets) - 1))   # the lowest new id of each parent (ascending)
    return new_offsets, kept_parent, selected, first


class _Ops:
    """The few array operations the slice needs, on NumPy or on one torch device."""

    def __init__(self, device: Any) -> None:
        self.device = device
        if device is not None:
            import torch
            self.torch = torch

    def long(self, a: Any) -> Any:
        return a.astype(np.int64) if self.device is None else a.to(self.torch.int64)

    def upload(self, a: np.ndarray) -> Any:
        if self.device is None:
            return a
        from .uploads import queued
        return queued(np.ascontiguousarray(a, dtype=np.int64), self.device)

    def cumsum(self, a: Any) -> Any:
        return np.cumsum(a) if self.device is None else self.torch.cumsum(a, 0)

    def cat_zero(self, a: Any) -> Any:
        if self.device is None:
            return np.concatenate([np.zeros(1, dtype=np.int64), a])
        return self.torch.cat([a.new_zeros(1), a])

    def stack_sums(self, counts: list[Any]) -> Any:
        if self.device is None:
            return np.array([int(c.sum()) for c in counts], dtype=np.int64)
        return self.torch.stack([c.sum() for c in counts])

    def host_ints(self, a: Any) -> list[int]:
        return [int(x) for x in (a.tolist())]

    def arange(self, n: int) -> Any:
        return np.arange(n, dtype=np.int64) if self.device is None else self.torch.arange(n, device=self.device)

    def repeat(self, values: Any, counts: Any, total: int) -> Any:
        if self.device is None:
            return np.repeat(values, counts)
        return self.torch.repeat_interleave(values, counts, output_size=total)

    def searchsorted(self, sorted_values: Any, targets: Any) -> Any:
        if self.device is None:
            return np.searchsorted(sorted_values, targets, side="right")
        return self.torch.searchsorted(sorted_values, targets, right=True)
