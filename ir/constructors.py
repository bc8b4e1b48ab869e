"""Named constructors of the IR: from a dense block map, from per-row lists, the full mask.

They turn convenient forms into the canonical CSR (:mod:`.csr`) and hand it to
:class:`~.block_mask.BlockMask`, which validates it. Each checks its arguments' types,
shapes and claimed sizes before building anything in proportion to them, and takes
key-block ids as they are: an id must be an int (``0.7``, ``True``, ``"1"`` and a dict's
keys are refused, not converted).
"""

from __future__ import annotations

import itertools
import numbers
from typing import Any, Iterable, Iterator, Mapping, Sequence, Sized

import numpy as np

from . import csr
from . import validation as v
from .block_mask import BlockMask


def _uniform_shape(num_heads: int, q_len: Any, kv_len: Any, q_block: Any, kv_block: Any) -> tuple[int, int, int, int]:
    """Checked ``(q_len, kv_len, q_block, kv_block)`` whose token pairs fit the IR (nothing allocated)."""
    q_len, kv_len = v.check_int(q_len, "q_len", minimum=1), v.check_int(kv_len, "kv_len", minimum=1)
    q_block = v.check_int(q_block, "q_block", minimum=1)
    kv_block = q_block if kv_block is None else v.check_int(kv_block, "kv_block", minimum=1)
    v.check_pairs(num_heads, q_len, kv_len, "q_len, kv_len",
                  "no attention input has that many; pass the lengths of the sequences the mask is for")
    return q_len, kv_len, q_block, kv_block


def uniform_offsets(length: int, block: int) -> np.ndarray:
    """Boundaries ``[0, block, 2*block, ..., length]``; the last block may be short. Refuses, before building them,
    more blocks than int32 block ids and row pointers index, and a length no attention input has."""
    length = v.check_int(length, "length", minimum=1)
    block = v.check_int(block, "block", minimum=1)
    if length >= v.PAIR_LIMIT:
        raise ValueError(f"length: expected fewer than 2**62 tokens (token-pair counts are int64), got {length:,}; "
                         f"pass the length of the sequence the mask is for")
    count = -(-length // block)
    if count > v.INDEX_LIMIT:
        raise ValueError(f"length, block: {length:,} tokens in blocks of {block:,} make {count:,} blocks, more than "
                         f"the int32 index limit {v.INDEX_LIMIT:,} (block ids and row pointers are int32); use larger "
                         f"blocks")
    return np.append(np.arange(0, length, block, dtype=np.int64), np.int64(length))


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
    if dense.shape[0] < 1:
        raise ValueError(f"mask: expected at least one head, got shape {list(dense.shape)}")
    q_len, kv_len, q_block, kv_block = _uniform_shape(dense.shape[0], q_len, kv_len, q_block, kv_block)
    expected = (-(-q_len // q_block), -(-kv_len // kv_block))
    if tuple(dense.shape[1:]) != expected:           # checked before the offsets are built: they are this large
        raise ValueError(f"mask: expected shape [H, {expected[0]}, {expected[1]}] for q_len={q_len}, "
                         f"kv_len={kv_len} and these block sizes, got {list(dense.shape)}")
    q_offsets = uniform_offsets(q_len, q_block)
    kv_offsets = uniform_offsets(kv_len, kv_block)
    indptr, indices = csr.from_block_map(dense)
    return BlockMask(dense.shape[0], q_offsets, kv_offsets, indptr, indices, budgets, meta)


def from_lists(lists: Sequence[Sequence[Iterable[int]]], q_offsets: Any, kv_offsets: Any, *,
               budgets: Any = None, meta: Mapping[str, Any] | None = None) -> BlockMask:
    """Build from ``lists[h][i]``: an iterable of key-block ids (ints) for head h, query block i.

    Rows are sorted here (their order carries no meaning); a repeated id raises.
    """
    q_offsets = v.integer_array(q_offsets, "q_offsets", ndim=1, dtype=np.int64)
    kv_offsets = v.integer_array(kv_offsets, "kv_offsets", ndim=1, dtype=np.int64)
    v.check_offsets(q_offsets, "q_offsets")
    v.check_offsets(kv_offsets, "kv_offsets")
    num_q_blocks, num_kv_blocks = len(q_offsets) - 1, len(kv_offsets) - 1
    most_heads = max(1, v.INDEX_LIMIT // (num_q_blocks + 1))          # each head's row pointers are int32 entries
    heads = _items(lists, "lists", "one list of rows per head")
    rows: list[np.ndarray] = []
    num_heads = listed = 0
    for h, head in enumerate(heads):               # read as they are checked; a sequence's length is checked first
        claimed = max(h + 1, len(lists) if isinstance(lists, Sized) else 0)
        if claimed > most_heads:
            raise ValueError(f"lists: expected at most {most_heads:,} heads of {num_q_blocks:,} query blocks (their "
                             f"row pointers are int32), got {claimed if claimed > h + 1 else 'more'}; pass fewer heads "
                             f"or larger query blocks")
        v.check_pairs(claimed, int(q_offsets[-1]), int(kv_offsets[-1]), "lists, q_offsets, kv_offsets",
                      "the heads and block boundaries claim more than any attention input has")
        given = head
        head = list(itertools.islice(_items(head, f"lists[{h}]", f"one id list per query block ({num_q_blocks})"),
                                     num_q_blocks + 1))                 # more rows than query blocks cannot be valid
        if len(head) != num_q_blocks:
            got = len(given) if isinstance(given, Sized) else len(head) if len(head) <= num_q_blocks else "more"
            raise ValueError(f"lists[{h}]: expected one list per query block ({num_q_blocks}), got {got}")
        num_heads += 1
        for i, row in enumerate(head):
            rows.append(_row_ids(row, f"lists[{h}][{i}]", num_kv_blocks, int(kv_offsets[-1])))
            listed += len(rows[-1])
            if listed > v.INDEX_LIMIT:                     # refused as read: the rows past it are not built
                raise ValueError(f"lists: {listed:,} key-block ids up to lists[{h}][{i}], more than the int32 index "
                                 f"limit {v.INDEX_LIMIT:,}; use larger blocks")
    if not num_heads:
        raise ValueError("lists: expected at least one head (a list of one id list per query block), got none")
    counts = np.array([len(r) for r in rows], dtype=np.int64).reshape(num_heads, num_q_blocks)
    indices = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    return BlockMask(num_heads, q_offsets, kv_offsets, csr.indptr_from_counts(counts), indices, budgets, meta)


def _items(value: Any, field: str, what: str) -> Iterator:
    """An iterator over ``value``, refusing what would be read as something else (a str, a dict, a scalar)."""
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable) or \
            (isinstance(value, np.ndarray) and value.ndim == 0):
        raise TypeError(f"{field}: expected a sequence ({what}), got {type(value).__name__} {_short(value)}")
    return iter(value)


def _row_ids(row: Any, field: str, num_kv_blocks: int, kv_len: int) -> np.ndarray:
    """One row's key-block ids as sorted int64, each an int in ``0..num_kv_blocks - 1``, each once."""
    if csr.is_tensor(row) or isinstance(row, np.ndarray):
        ids = v.as_numpy(row, field)
        if ids.ndim != 1 or ids.dtype == np.bool_ or not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"{field}: expected a 1-D array of int key-block ids, got dtype {ids.dtype} of shape "
                            f"{list(ids.shape)}")
        bad = (ids < 0) | (ids >= num_kv_blocks)
        if bad.any():
            raise ValueError(f"{field}: key block {ids[np.argmax(bad)]} is out of range: key blocks are "
                             f"0..{num_kv_blocks - 1} (kv_len={kv_len}, {num_kv_blocks} blocks)")
        ids = np.sort(ids.astype(np.int64))
    else:
        if isinstance(row, (str, bytes, Mapping)) or not isinstance(row, Iterable):
            raise TypeError(f"{field}: expected an iterable of int key-block ids, got {type(row).__name__} "
                            f"{_short(row)}")
        items = list(itertools.islice(row, num_kv_blocks + 1))    # more ids than blocks cannot be valid
        for position, item in enumerate(items):
            if isinstance(item, (bool, np.bool_)) or not isinstance(item, numbers.Integral):
                raise TypeError(f"{field}[{position}]: expected an int key-block id, got {type(item).__name__} "
                                f"{_short(item)}")
            if not 0 <= item < num_kv_blocks:
                raise ValueError(f"{field}: key block {item} is out of range: key blocks are 0..{num_kv_blocks - 1} "
                                 f"(kv_len={kv_len}, {num_kv_blocks} blocks)")
        ids = np.sort(np.array(items, dtype=np.int64))
    if ids.size > 1 and (np.diff(ids) == 0).any():
        raise ValueError(f"{field}: key block {ids[np.argmax(np.diff(ids) == 0)]} "
                         f"is listed twice; each block may appear once per row")
    return ids


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def full(num_heads: int, q_len: int, kv_len: int, q_block: int, kv_block: int | None = None, *,
         meta: Mapping[str, Any] | None = None) -> BlockMask:
    """The dense mask: every query block keeps every key block."""
    num_heads = v.check_int(num_heads, "num_heads", minimum=1)
    q_len, kv_len, q_block, kv_block = _uniform_shape(num_heads, q_len, kv_len, q_block, kv_block)
    mb, nb = -(-q_len // q_block), -(-kv_len // kv_block)
    if num_heads * mb * nb > v.INDEX_LIMIT:                   # checked before the block map is built
        raise ValueError(f"q_block, kv_block: the full mask of {num_heads} heads x {mb:,} x {nb:,} blocks keeps "
                         f"{num_heads * mb * nb:,} blocks, more than the int32 index limit {v.INDEX_LIMIT:,}; use "
                         f"larger blocks")
    dense = np.ones((num_heads, mb, nb), dtype=bool)
    return from_dense(dense, q_len, kv_len, q_block, kv_block, meta=meta)
