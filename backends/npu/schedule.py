"""The op schedule: which (query, key) block pairs of a BlockMask each torch_npu op computes. Host-side numpy only.

``npu_block_sparse_attention`` skips whole blocks of a fixed grid, ``[bx, by]`` with
``by`` a multiple of 128 on Atlas A2/A3, and has no mask inside a block. The scheduler
maps the IR onto that grid exactly and hands everything the grid cannot express to
``npu_fusion_attention`` with a token mask; the two results are merged through their
LSEs (:mod:`.merge`). Nothing is approximated.

Query axis: the IR's query blocks are cut into *runs* of equal size (a shorter block
may end a run). Each run is one block-sparse call on its slice of queries with
``bx`` = that size, so the op's query blocks are the IR's query blocks.

Key axis: the op's key blocks are ``[128 j, 128 j + 128)`` over the whole key range (the
last may be short). The key axis is cut into *pieces* at every IR boundary and every grid
point, so each piece lies in one IR key block and one op key block. For a query block,
an op key block is

- *full* when the IR keeps all of its tokens: the block-sparse op computes it (mask 1);
- *empty* when the IR keeps none of them: nobody computes it;
- *mixed* otherwise: the op gets 0 and the kept pieces go to the fallback.

So 128-multiple IR blocks and 64-token blocks that come in agreeing aligned pairs go
entirely to the block-sparse op; frame-sized blocks (1560 = 12 x 128 + 24 tokens) go to it
except the op blocks that straddle a boundary where the selection changes; a text
segment of odd size goes where its op blocks fall. The ``"fallback"`` schedule sends every
kept piece to ``npu_fusion_attention`` (used for float32, GQA groups the op rejects, or
``path="fallback"``).

Fallback chunks: query blocks with fallback work are grouped in order into chunks; a
chunk gathers its query rows and the union of the key pieces any of its rows keeps, and
its ``[H, rows, keys]`` mask (expanded on the device at run time from the compact
``allowed`` table) holds at most ``chunk_elements`` entries, and its rows and keys at most
``npu_fusion_attention``'s sequence limit each (S of 1 to 1M tokens: 10**6 here, the smaller reading);
a query block too large for one chunk is split by rows, and by keys past that limit (the slices merge
through their LSEs like the two ops' parts), and a mask whose single row exceeds ``chunk_elements`` is refused (naming the
``chunk_elements`` that would do).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sparsecore.ir import BlockMask

BLOCK_Y = 128  # op key block: "blockShapeY must be a multiple of 128" on Atlas A2/A3
FUSION_MAX_SEQ = 10**6  # npu_fusion_attention: "S: sequence length, 1~1M" (q and keys); the smaller reading of 1M


@dataclass(frozen=True)
class BlockSparseCall:
    """One ``npu_block_sparse_attention`` call on query tokens ``q_start:q_end`` against all keys."""

    q_start: int
    q_end: int
    block_x: int
    block_mask: np.ndarray   # int8 [H, ceil((q_end - q_start) / block_x), ceil(kv_len / BLOCK_Y)], 1 = compute
    row_empty: np.ndarray    # bool [H, q_end - q_start]: rows with no block (op output undefined, set to 0 / -inf)
    merges: bool             # some of these rows also have fallback work, so the op's LSE is needed


@dataclass(frozen=True)
class FallbackChunk:
    """One ``npu_fusion_attention`` call per batch element on gathered query rows and key tokens."""

    q_tokens: np.ndarray      # int64 [R]: query positions
    kv_tokens: np.ndarray     # int64 [L]: key positions
    row_group: np.ndarray     # int64 [R]: row -> axis 1 of ``allowed``
    key_piece: np.ndarray     # int64 [L]: key -> axis 2 of ``allowed``
    allowed: np.ndarray       # bool [H, G, P]: True = attend (the IR's polarity)
    row_has_keys: np.ndarray  # bool [H, R]: False rows are fully masked (op output undefined, set to 0 / -inf)


@dataclass(frozen=True)
class OpSchedule:
    kind: str                                  # "hybrid" or "fallback"
    block_sparse_calls: tuple[BlockSparseCall, ...]
    fallback_chunks: tuple[FallbackChunk, ...]

    def summary(self) -> dict[str, int]:
        """Counts for tests and docs: calls, blocks each op computes, and fallback keys."""
        return {
            "block_sparse_calls": len(self.block_sparse_calls),
            "block_sparse_blocks": int(sum(c.block_mask.sum() for c in self.block_sparse_calls)),
            "fallback_chunks": len(self.fallback_chunks),
            "fallback_pairs": int(sum(_chunk_pairs(c) for c in self.fallback_chunks)),
        }


@dataclass(frozen=True)
class Pieces:
    """The key axis cut at the given boundaries: piece ``p`` is tokens ``bounds[p]:bounds[p + 1]``."""

    bounds: np.ndarray    # int64 [P + 1]
    ir_block: np.ndarray  # int64 [P]: the IR key block holding the piece
    op_block: np.ndarray  # int64 [P]: the op key block holding the piece

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.bounds)


def key_pieces(mask: BlockMask, block_y: int | None) -> Pieces:
    """Pieces at every IR key boundary, plus every multiple of ``block_y`` when given."""
    bounds = mask.kv_offsets
    if block_y is not None:
        bounds = np.union1d(bounds, np.arange(0, mask.kv_len, block_y, dtype=np.int64))
    starts = bounds[:-1]
    ir_block = np.searchsorted(mask.kv_offsets, starts, side="right") - 1
    op_block = starts // block_y if block_y is not None else ir_block
    return Pieces(bounds.astype(np.int64), ir_block.astype(np.int64), op_block.astype(np.int64))


def full_op_blocks(dense: np.ndarray, pieces: Pieces) -> np.ndarray:
    """bool [H, MB, NBy]: the IR keeps every token of op key block j for query block i of head h."""
    lengths = pieces.lengths
    first_piece = np.flatnonzero(np.diff(pieces.op_block, prepend=-1))     # pieces are in key order
    sizes = np.add.reduceat(lengths, first_piece)
    full = np.empty((dense.shape[0], dense.shape[1], len(first_piece)), dtype=bool)
    for h in range(dense.shape[0]):                                        # per head: bounded temporaries
        kept_tokens = np.add.reduceat(dense[h][:, pieces.ir_block] * lengths, first_piece, axis=1)
        full[h] = kept_tokens == sizes
    return full


def query_runs(mask: BlockMask) -> list[tuple[int, int]]:
    """``[first, end)`` ranges of query blocks of one size; a shorter block may end a range."""
    sizes = mask.q_block_sizes
    runs = []
    first = 0
    while first < len(sizes):
        end = first + 1
        while end < len(sizes) and sizes[end] == sizes[first]:
            end += 1
        if end < len(sizes) and sizes[end] < sizes[first]:
            end += 1
        runs.append((first, end))
        first = end
    return runs


def schedule_hybrid(mask: BlockMask, chunk_elements: int) -> OpSchedule:
    """Block-sparse op for every full op block, fallback for the kept tokens of mixed ones."""
    dense = mask.to_dense()
    pieces = key_pieces(mask, BLOCK_Y)
    full = full_op_blocks(dense, pieces)
    residual = dense[:, :, pieces.ir_block] & ~full[:, :, pieces.op_block]   # [H, MB, P]
    calls = []
    for first, end in query_runs(mask):
        block_mask = full[:, first:end]
        if not block_mask.any():
            continue
        q_start, q_end = int(mask.q_offsets[first]), int(mask.q_offsets[end])
        row_empty = np.repeat(~block_mask.any(axis=2), mask.q_block_sizes[first:end], axis=1)
        calls.append(BlockSparseCall(q_start, q_end, int(mask.q_block_sizes[first]),
                                     np.ascontiguousarray(block_mask, dtype=np.int8), row_empty,
                                     bool(residual[:, first:end].any())))
    return OpSchedule("hybrid", tuple(calls), chunk_fallback(mask, residual, pieces, chunk_elements))


def schedule_fallback(mask: BlockMask, chunk_elements: int) -> OpSchedule:
    """Every kept token through npu_fusion_attention; pieces are the IR's own key blocks."""
    pieces = key_pieces(mask, None)
    return OpSchedule("fallback", (), chunk_fallback(mask, mask.to_dense(), pieces, chunk_elements))


def chunk_fallback(mask: BlockMask, residual: np.ndarray, pieces: Pieces,
                         chunk_elements: int) -> tuple[FallbackChunk, ...]:
    """Group the query blocks that have fallback work into chunks of at most ``chunk_elements`` mask entries."""
    heads = mask.num_heads
    lengths = pieces.lengths
    q_sizes = mask.q_block_sizes
    chunks: list[FallbackChunk] = []
    parts: list[tuple[int, int, int]] = []        # (query block, first row, end row) of the open chunk
    union = np.zeros(len(lengths), dtype=bool)
    rows = 0
    for block in np.flatnonzero(residual.any(axis=(0, 2))):
        needed = residual[:, block].any(axis=0)
        size = int(q_sizes[block])
        grown = union | needed
        keys = int(lengths[grown].sum())
        if parts and (heads * (rows + size) * keys > chunk_elements or max(rows + size, keys) > FUSION_MAX_SEQ):
            chunks.append(_make_chunk(mask, residual, pieces, parts))
            parts, union, rows = [], np.zeros_like(union), 0
            grown = needed
            keys = int(lengths[grown].sum())
        if not parts and (heads * size * keys > chunk_elements or max(size, keys) > FUSION_MAX_SEQ):
            # one block alone is too large: split its rows, and its keys past the op's sequence limit
            span = min(keys, FUSION_MAX_SEQ)
            if heads * span > chunk_elements:                       # not even one row fits
                raise ValueError(f"chunk_elements: one query row of query block {block} needs a fallback mask of "
                                 f"{heads} heads x {span:,} keys = {heads * span:,} entries, more than "
                                 f"chunk_elements={chunk_elements:,}; pass chunk_elements >= {heads * span:,}")
            step = min(chunk_elements // (heads * span), FUSION_MAX_SEQ)
            chunks.extend(_make_chunk(mask, residual, pieces, [(int(block), r, min(r + step, size))], (k, k + span))
                          for r in range(0, size, step) for k in range(0, keys, span))
            continue
        parts.append((int(block), 0, size))
        union, rows = grown, rows + size
    if parts:
        chunks.append(_make_chunk(mask, residual, pieces, parts))
    return tuple(chunks)


def _make_chunk(mask: BlockMask, residual: np.ndarray, pieces: Pieces, parts: list[tuple[int, int, int]],
                keys: tuple[int, int] | None = None) -> FallbackChunk:
    """The chunk of ``parts`` (query block, first row, end row) over the key tokens they keep, or over the slice
    ``keys`` of them (a chunk past the fused op's sequence limit: its rows' other keys go to other chunks)."""
    blocks = np.array([block for block, _, _ in parts], dtype=np.int64)
    counts = np.array([end - first for _, first, end in parts], dtype=np.int64)
    firsts = np.array([mask.q_offsets[block] + first for block, first, _ in parts], dtype=np.int64)
    q_tokens = _concatenated_ranges(firsts, counts)
    row_group = np.repeat(np.arange(len(parts)), counts)
    used = np.flatnonzero(residual[:, blocks].any(axis=(0, 1)))
    kv_tokens = _concatenated_ranges(pieces.bounds[used], pieces.lengths[used])
    key_piece = np.repeat(np.arange(len(used)), pieces.lengths[used])
    if keys is not None:
        kv_tokens, key_piece = kv_tokens[keys[0]:keys[1]].copy(), key_piece[keys[0]:keys[1]].copy()
        used = used[key_piece[0]:key_piece[-1] + 1]
        key_piece -= key_piece[0]
    allowed = np.ascontiguousarray(residual[:, blocks][:, :, used])
    row_has_keys = allowed.any(axis=2)[:, row_group]
    return FallbackChunk(q_tokens, kv_tokens, row_group, key_piece, allowed, row_has_keys)


def _concatenated_ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``concat(arange(s, s + c) for s, c in zip(starts, counts))``, vectorized."""
    ends = np.cumsum(counts)
    return np.repeat(starts - (ends - counts), counts) + np.arange(int(ends[-1]) if len(ends) else 0)


def _chunk_pairs(chunk: FallbackChunk) -> int:
    """(head, query token, key token) triples the chunk attends."""
    return int(chunk.allowed[:, chunk.row_group][:, :, chunk.key_piece].sum())
