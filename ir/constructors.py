"""Named constructors of the IR: from a dense block map, from per-row lists, the full mask.

They turn convenient forms into the canonical CSR (:mod:`.csr`) and hand it to
:class:`~.block_mask.BlockMask`, which validates it.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from . import csr
from . import validation as v
from .block_mask import BlockMask


def from_dense(mask: Any, q_len: int, kv_len: int, q_block: int, kv_block: int | None = None, *,
               budgets: Any = None, meta: Mapping[str, Any] | None = None) -> BlockMask:
    """Build from a boolean block map ``mask[H, MB, NB]`` over uniform blocks.

    ``kv_block`` defaults to ``q_block``; ``MB = ceil(q_len / q_block)`` and
    ``NB = ceil(kv_len / kv_block)`` must match the map's shape. A torch map gives a
    mask on its device (one host round trip to size the lists).
    """
    dense = mask if csr.is_tensor(mask) else v.as_numpy(mask, "mask")
    if str(dense.dtype) not in ("bool", "torch.bool"):
        raise TypeError(f"mask: expected a bool array [H, MB, NB], got dtype {dense.dtype} "
                        f"(use mask.astype(bool) if 1 means keep)")
    if dense.ndim != 3:
        raise ValueError(f"mask: expected 3 dimensions [H, MB, NB], got shape {list(dense.shape)}")
    q_offsets = BlockMask.uniform_offsets(q_len, q_block)
    kv_offsets = BlockMask.uniform_offsets(kv_len, q_block if kv_block is None else kv_block)
    expected = (len(q_offsets) - 1, len(kv_offsets) - 1)
    if tuple(dense.shape[1:]) != expected:
        raise ValueError(f"mask: expected shape [H, {expected[0]}, {expected[1]}] for q_len={q_len}, "
                         f"kv_len={kv_len} and these block sizes, got {list(dense.shape)}")
    indptr, indices = csr.from_block_map(dense)
    return BlockMask(dense.shape[0], q_offsets, kv_offsets, indptr, indices, budgets, meta)


def from_lists(lists: Sequence[Sequence[Iterable[int]]], q_offsets: Any, kv_offsets: Any, *,
               budgets: Any = None, meta: Mapping[str, Any] | None = None) -> BlockMask:
    """Build from ``lists[h][i]``: an iterable of key-block ids for head h, query block i.

    Rows are sorted here (their order carries no meaning); a repeated id raises.
    """
    q_offsets = v.as_numpy(q_offsets, "q_offsets")
    num_q_blocks = len(q_offsets) - 1
    rows: list[np.ndarray] = []
    for h, head in enumerate(lists):
        head = list(head)
        if len(head) != num_q_blocks:
            raise ValueError(f"lists[{h}]: expected one list per query block ({num_q_blocks}), got {len(head)}")
        for i, row in enumerate(head):
            ids = np.sort(v.as_numpy(list(row), f"lists[{h}][{i}]").astype(np.int64).ravel())
            if ids.size > 1 and (np.diff(ids) == 0).any():
                raise ValueError(f"lists[{h}][{i}]: key block {ids[np.argmax(np.diff(ids) == 0)]} "
                                 f"is listed twice; each block may appear once per row")
            rows.append(ids)
    num_heads = len(rows) // num_q_blocks if num_q_blocks else 0
    counts = np.array([len(r) for r in rows], dtype=np.int64).reshape(num_heads, num_q_blocks)
    indices = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    return BlockMask(num_heads, q_offsets, kv_offsets, csr.indptr_from_counts(counts), indices, budgets, meta)


def full(num_heads: int, q_len: int, kv_len: int, q_block: int, kv_block: int | None = None, *,
         meta: Mapping[str, Any] | None = None) -> BlockMask:
    """The dense mask: every query block keeps every key block."""
    q_offsets = BlockMask.uniform_offsets(q_len, q_block)
    kv_offsets = BlockMask.uniform_offsets(kv_len, q_block if kv_block is None else kv_block)
    mb, nb = len(q_offsets) - 1, len(kv_offsets) - 1
    dense = np.ones((v.check_int(num_heads, "num_heads", minimum=1), mb, nb), dtype=bool)
    return from_dense(dense, q_len, kv_len, q_block, kv_block, meta=meta)
