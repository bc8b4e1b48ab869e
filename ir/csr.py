"""Building and transforming the IR's per-head CSR lists, on the host (NumPy) or on a torch device.

This is the one place that turns selections into ``indptr`` / ``indices`` and back, so
constructors, methods and lowerings agree on the layout (see :mod:`.block_mask`: heads
stored one after another, ``indptr[h + 1, 0] == indptr[h, -1]``). Every function takes
and returns arrays of one kind: NumPy arrays stay NumPy, torch tensors stay on their
device, and the torch paths make no host round trip unless the docstring says so.
Nothing loops in Python over heads, rows or blocks.
"""

from __future__ import annotations

from typing import Any

import numpy as np

INDEX_LIMIT = np.iinfo(np.int32).max  # indptr/indices are int32 by contract


def is_tensor(value: Any) -> bool:
    """True for a torch tensor (checked without importing torch)."""
    return type(value).__module__.split(".")[0] == "torch" and hasattr(value, "device")


def indptr_from_counts(counts: Any) -> Any:
    """``[H, MB + 1]`` row pointers (int64) from per-row counts ``[H, MB]``, heads one after another."""
    num_heads, num_rows = counts.shape
    if is_tensor(counts):
        import torch
        flat = torch.zeros(num_heads * num_rows + 1, dtype=torch.int64, device=counts.device)
        torch.cumsum(counts.reshape(-1).to(torch.int64), 0, out=flat[1:])
        rows = torch.arange(num_heads, device=counts.device)[:, None] * num_rows
        return flat[rows + torch.arange(num_rows + 1, device=counts.device)[None, :]]
    flat = np.concatenate([[0], np.cumsum(np.asarray(counts, dtype=np.int64).ravel())])
    return flat[np.arange(num_heads)[:, None] * num_rows + np.arange(num_rows + 1)[None, :]]


def from_block_map(dense: Any) -> tuple[Any, Any]:
    """``(indptr [H, MB + 1], indices [nnz])`` of a bool block map ``[H, MB, NB]``.

    On a torch device this costs one host round trip (the number of kept blocks sizes
    ``indices``), and int64 positions of the kept blocks while it runs (8 bytes a kept block, then 4 for the int32
    indices).
    """
    num_blocks = dense.shape[2]
    if is_tensor(dense):
        import torch
        flat = torch.nonzero(dense.reshape(-1)).squeeze(1)               # row-major: sorted within a row
        return indptr_from_counts(dense.sum(dim=2)), flat.remainder_(num_blocks).to(torch.int32)
    return indptr_from_counts(dense.sum(axis=2)), np.nonzero(dense.reshape(-1, num_blocks))[1]


def scatter_rows(indices: Any, indptr: Any, rows: Any, padded: Any, counts: Any) -> None:
    """Write padded row lists into ``indices`` (torch, in place): row ``rows[r]`` of every head gets
    ``padded[h, r, :counts[h, r]]``.

    ``indices`` is 1-D with one spare slot at the end (``len = nnz + 1``) that absorbs the
    padding writes, so the scatter needs no data-dependent size. ``rows`` are query-block
    indices ``[R]``; ``padded`` ``[H, R, K]``; ``counts`` ``[H, R]``.
    """
    import torch
    spare = indices.shape[0] - 1
    slot = torch.arange(padded.shape[2], device=padded.device)
    target = indptr[:, rows][:, :, None] + slot
    target = torch.where(slot < counts[:, :, None], target, spare)
    indices.scatter_(0, target.reshape(-1), padded.reshape(-1).to(indices.dtype))


def row_of_entry(indptr: Any, nnz: int) -> Any:
    """The flat row ``h * MB + i`` of every entry of ``indices`` (int64 ``[nnz]``)."""
    lengths = (indptr[:, 1:] - indptr[:, :-1]).reshape(-1)
    if is_tensor(indptr):
        import torch
        return torch.repeat_interleave(torch.arange(lengths.shape[0], device=indptr.device), lengths.to(torch.int64),
                                       output_size=nnz)
    return np.repeat(np.arange(len(lengths)), lengths.astype(np.int64))


def to_block_map(indptr: Any, indices: Any, num_kv_blocks: int) -> Any:
    """Bool block map ``[H, MB, NB]`` of the lists."""
    num_heads, num_rows = indptr.shape[0], indptr.shape[1] - 1
    rows = row_of_entry(indptr, indices.shape[0])
    if is_tensor(indptr):
        import torch
        dense = torch.zeros(num_heads * num_rows, num_kv_blocks, dtype=torch.bool, device=indptr.device)
        kept = torch.ones((), dtype=torch.bool, device=indptr.device).expand(rows.shape[0])   # no scalar upload
        dense.index_put_((rows, indices.to(torch.int64)), kept)
    else:
        dense = np.zeros((num_heads * num_rows, num_kv_blocks), dtype=bool)
        dense[rows, indices] = True
    return dense.reshape(num_heads, num_rows, num_kv_blocks)


def to_block_bits(indptr: Any, indices: Any, num_kv_blocks: int) -> Any:
    """The block map packed in bits, int32 ``[H, MB, ceil(NB / 32)]``: bit ``j % 32`` of word ``j // 32`` is set
    when block ``j`` is listed (an eighth of the bool map's bytes; a kernel reads 32 blocks of a row in one load)."""
    num_heads, num_rows = indptr.shape[0], indptr.shape[1] - 1
    words = -(-num_kv_blocks // 32)
    rows = row_of_entry(indptr, indices.shape[0])
    if is_tensor(indptr):
        import torch
        where = rows * words + indices.to(torch.int64) // 32
        one = torch.ones((), dtype=torch.int32, device=indptr.device).expand(indices.shape[0])   # no scalar upload
        bits = torch.bitwise_left_shift(one, (indices % 32).to(torch.int32))                 # bit 31: INT32_MIN
        packed = torch.zeros(num_heads * num_rows * words, dtype=torch.int32, device=indptr.device)
        packed.scatter_add_(0, where, bits)       # a row lists a block once: the sum of its distinct bits is their OR
    else:
        packed = np.zeros(num_heads * num_rows * words, dtype=np.uint32)
        np.bitwise_or.at(packed, rows * words + indices // 32,
                         np.left_shift(np.uint32(1), (indices % 32).astype(np.uint32)))
        packed = packed.view(np.int32)
    return packed.reshape(num_heads, num_rows, words)


def select_heads(indptr: Any, indices: Any, heads: Any) -> tuple[Any, Any]:
    """The lists of query heads ``heads`` (int ``[n]``, same kind as the arrays), in that order.

    Raises ``ValueError`` before building them where they would hold more entries than int32 indexes (heads
    repeated)."""
    lengths = indptr[heads, -1] - indptr[heads, 0]                         # entries per selected head
    if is_tensor(indptr):
        import torch
        lengths = lengths.to(torch.int64)
        total = int(lengths.sum())                                          # one host round trip
        _check_entries(total)
        starts = indptr[heads, 0].to(torch.int64)
        new_start = torch.cumsum(lengths, 0) - lengths
        head_of = torch.repeat_interleave(torch.arange(len(heads), device=indptr.device), lengths, output_size=total)
        position = torch.arange(total, device=indptr.device) - new_start[head_of] + starts[head_of]
        new_indptr = indptr[heads].to(torch.int64) - starts[:, None] + new_start[:, None]
        return new_indptr, indices[position]
    lengths = lengths.astype(np.int64)
    _check_entries(int(lengths.sum()))
    starts = indptr[heads, 0].astype(np.int64)
    new_start = np.cumsum(lengths) - lengths
    head_of = np.repeat(np.arange(len(heads)), lengths)
    position = np.arange(int(lengths.sum())) - new_start[head_of] + starts[head_of]
    return indptr[heads].astype(np.int64) - starts[:, None] + new_start[:, None], indices[position]


def _check_entries(total: int) -> None:
    if total > INDEX_LIMIT:
        raise ValueError(f"heads: the selection lists {total:,} key blocks, more than the int32 index limit "
                         f"{INDEX_LIMIT:,}; select fewer heads (or repeat fewer)")


def kept_key_tokens(indptr: Any, indices: Any, kv_offsets: np.ndarray) -> Any:
    """Key tokens each row keeps, int64 ``[H, MB]`` (same kind as the arrays).

    Uniform key blocks (a short last one allowed) need only ``indptr`` and each row's last
    entry: ``count * block - shortfall`` when the row keeps the short last block, so the
    work is O(rows). Other layouts sum the kept blocks' sizes: O(kept blocks).
    """
    sizes = np.diff(kv_offsets)
    counts = indptr[:, 1:] - indptr[:, :-1]
    block = int(sizes[0])
    uniform = bool((sizes[:-1] == block).all()) and int(sizes[-1]) <= block
    if is_tensor(indptr):
        import torch
        counts = counts.to(torch.int64)
        if uniform:
            shortfall = block - int(sizes[-1])
            if shortfall == 0 or indices.shape[0] == 0:
                return counts * block
            last = indices[(indptr[:, 1:].to(torch.int64) - 1).clamp(min=0)]
            keeps_last = (counts > 0) & (last == len(sizes) - 1)
            return counts * block - shortfall * keeps_last.to(torch.int64)
        from .uploads import queued                # 8 bytes an entry: sizes gathered into the prefix, summed in place
        prefix = torch.zeros(indices.shape[0] + 1, dtype=torch.int64, device=indptr.device)
        torch.index_select(queued(sizes, indptr.device), 0, indices, out=prefix[1:])    # int32 or int64 ids
        prefix[1:].cumsum_(0)
        return prefix[indptr[:, 1:].to(torch.int64)] - prefix[indptr[:, :-1].to(torch.int64)]
    counts = counts.astype(np.int64)
    if uniform:
        shortfall = block - int(sizes[-1])
        if shortfall == 0 or indices.shape[0] == 0:
            return counts * block
        last = indices[np.maximum(indptr[:, 1:].astype(np.int64) - 1, 0)]
        return counts * block - shortfall * ((counts > 0) & (last == len(sizes) - 1))
    prefix = np.concatenate([[0], np.cumsum(sizes[indices])])
    return prefix[indptr[:, 1:]] - prefix[indptr[:, :-1]]
