"""AdaSpa's first search step on CUDA in one dense pass: output, LSE and exact block masses.

The host side of :mod:`.search_attention_kernel` (read its docstring for the method).
:func:`sparsecore.search.dense_attention_with_mass` runs it through
``TritonBackend.block_mass.with_output`` where it takes the inputs; elsewhere the search
step is the dense pass (``sparsecore.search.dense_attention``: FA4's where faster, else cuDNN's) then the
block-mass pass (:mod:`.block_mass`) on its LSE.

Memory: the scratch holds the partial sums, one float32 per (row, key piece) of a head and
batch element: ``L_q * L_kv / 64`` floats, 2.2 GB per head at Wan 2.1's 6x length (188,760
tokens). They run in chunks of heads x rows that fit ``scratch_bytes`` (1 GiB by default; one
launch pair per chunk, :func:`scratch_chunks`): whole heads while one fits, else one head at a
time in even row chunks of whole ``block_m`` tiles. At 6x (batch 1, 128-row tiles) a head runs in
3 chunks of 62,976 rows: 0.69 GiB of scratch. Any length runs, with at least one tile of rows a chunk.
Under ``TRITON_INTERPRET=1`` it runs on CPU tensors inside the Triton backend's emulator
(how CI tests it against a float64 oracle).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

import numpy as np
import torch

from sparsecore.ir.uploads import queued

from . import block_mass
from .block_mass import cut_blocks
from .triton_config import dot_precision

PIECE = 64                     # keys per piece (the kernel's tiles are 1 or 2 pieces wide)
SCRATCH_BYTES = 1 << 30       # a target for the partial sums (at least one tile of rows runs)
REDUCE_ROWS, REDUCE_PIECES = 64, 64


@dataclass(frozen=True)
class SearchConfig:
    """Tile shape of the fused pass: ``block_m`` query rows by ``pieces`` (1 or 2) x 64 keys."""

    block_m: int
    pieces: int
    num_warps: int
    num_stages: int
    use_tma: bool

    def __post_init__(self) -> None:
        if self.pieces not in (1, 2):
            raise ValueError(f"pieces: expected 1 or 2 key pieces of 64 per tile, got {self.pieces}")


def default_config(q: torch.Tensor) -> SearchConfig:
    if q.device.type != "cuda":                       # the interpreter: small tiles run fast
        return SearchConfig(32, 2, 4, 1, use_tma=False)
    if q.element_size() == 4:   # one stage: two need 114,944 bytes of shared memory, over a 4090's 101,376
        return SearchConfig(64, 1, 4, 1, use_tma=False)
    # H200, Wan 6x (bench/results/search-step-2026-11-30.md): 2 stages 625 ms, 3 stages 639 ms; 64-key tiles 1020 ms
    return SearchConfig(128, 2, 8, 2, use_tma=torch.cuda.get_device_capability(q.device)[0] >= 9)


@dataclass(frozen=True)
class PieceLayout:
    """Key pieces (at most 64 keys inside one block) and the tiles that walk them, int32 host arrays.

    Full tiles: ``full_start[t]`` and pieces ``full_piece[t] + 0 .. pieces-1``; solo tiles: keys
    ``solo_start[t]:solo_end[t]``, piece ``solo_piece[t]``. ``piece_block[p]``: the key block of piece ``p``.
    """

    full_start: np.ndarray
    full_piece: np.ndarray
    solo_start: np.ndarray
    solo_end: np.ndarray
    solo_piece: np.ndarray
    piece_block: np.ndarray

    @property
    def num_pieces(self) -> int:
        return len(self.piece_block)


def piece_layout(kv_offsets: np.ndarray, pieces: int) -> PieceLayout:
    """Cut the key blocks into pieces and group each run of full pieces into tiles of ``pieces`` from its start."""
    start, block_end, block = cut_blocks(np.asarray(kv_offsets, dtype=np.int64), PIECE)
    end = np.minimum(start + PIECE, block_end)
    index = np.arange(len(start))
    full = end - start == PIECE
    begins = full & ~np.r_[False, full[:-1]]
    ends = full & ~np.r_[full[1:], False]
    first = np.maximum.accumulate(np.where(begins, index, 0))                  # its run's first piece
    last = np.minimum.accumulate(np.where(ends, index, len(index))[::-1])[::-1]  # its run's last piece
    position = index - first
    covered = full & (position < (last - first + 1) // pieces * pieces)
    leads = covered & (position % pieces == 0)
    as32 = lambda a: np.ascontiguousarray(a, dtype=np.int32)  # noqa: E731
    return PieceLayout(as32(start[leads]), as32(index[leads]), as32(start[~covered]), as32(end[~covered]),
                       as32(index[~covered]), as32(block))


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offsets: np.ndarray,
             kv_offsets: np.ndarray) -> str | None:
    """None if the fused pass takes these inputs and is the faster path, else why not (the search step then runs
    two passes: the dense attention, then the block-mass pass on its LSE)."""
    reason = block_mass.supports(q, k, q_offsets, kv_offsets)
    if reason is None and block_mass.uniform_blocks(q_offsets) and block_mass.uniform_blocks(kv_offsets):
        reason = ("blocks of 64 tokens: the segmented mass kernel (one segment) after the dense pass is faster "
                  "(632 against 658 ms at Wan 6x on an H200, 2026-11-30) and needs no scratch")
    if reason is None and (v.dtype != q.dtype or v.shape != k.shape):
        reason = f"v: expected {q.dtype} {list(k.shape)} like k, got {v.dtype} {list(v.shape)}"
    return reason


def scratch_chunks(batch: int, heads: int, num_pieces: int, q_len: int, block_m: int,
                   scratch_bytes: int) -> tuple[int, int]:
    """(heads, rows) per launch pair, so the partial sums ``batch * heads * num_pieces * rows * 4`` bytes fit
    ``scratch_bytes``: whole heads while one fits, else one head in as few even row chunks of whole ``block_m``
    tiles as fit. At least one tile of rows (the limit is then a target: ``batch * num_pieces * block_m * 4``)."""
    per_row = batch * num_pieces * 4
    if per_row * q_len <= scratch_bytes:
        return max(1, min(heads, scratch_bytes // max(1, per_row * q_len))), max(1, q_len)
    tiles = max(1, scratch_bytes // (per_row * block_m))           # tiles of rows that fit
    chunks = -(-q_len // (tiles * block_m))
    return 1, min(q_len, -(-q_len // (chunks * block_m)) * block_m)


def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offsets: np.ndarray, kv_offsets: np.ndarray,
        scale: float, *, config: SearchConfig | None = None,
        scratch_bytes: int = SCRATCH_BYTES) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense attention ``out [B, H, L_q, D]``, its natural-log LSE float32 ``[B, H, L_q]`` and the block masses
    float32 ``[B, H, MB, NB]`` of ``q_offsets`` x ``kv_offsets`` blocks, from one pass over the scores.

    ``scratch_bytes``: a target for the partial sums, run in chunks of heads x rows (:func:`scratch_chunks`);
    a chunk holds at least one ``config.block_m`` tile of rows of one head.
    """
    from .search_attention_kernel import piece_mass_fwd, search_attention_fwd
    from .triton_kernel import LOG2E
    from .triton_launch import describe
    batch, heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    q, k, v = (t.contiguous() for t in (q, k, v))
    config = config or default_config(q)
    layout = piece_layout(kv_offsets, config.pieces)
    head_chunk, row_chunk = scratch_chunks(batch, heads, layout.num_pieces, q_len, config.block_m, scratch_bytes)
    out = torch.empty_like(q)
    lse = torch.empty(batch, heads, q_len, dtype=torch.float32, device=q.device)
    mass = torch.zeros(batch, heads, len(q_offsets) - 1, len(kv_offsets) - 1, dtype=torch.float32, device=q.device)
    partial = torch.empty(batch, head_chunk, layout.num_pieces, row_chunk, dtype=torch.float32, device=q.device)
    padded = lambda a: queued(np.r_[a, 0].astype(np.int32), q.device)  # noqa: E731  (never empty)
    tiles = [padded(a) for a in (layout.full_start, layout.full_piece, layout.solo_start, layout.solo_end,
                                 layout.solo_piece)]
    piece_block = padded(layout.piece_block)
    q_start, q_end, q_block = cut_blocks(np.asarray(q_offsets, dtype=np.int64), REDUCE_ROWS)
    programs = queued(np.stack([q_start, q_end, q_block], axis=1).astype(np.int32), q.device)
    row_starts = np.arange(0, q_len, row_chunk)
    row_ends = np.minimum(row_starts + row_chunk, q_len)
    row_chunks = list(zip(row_starts.tolist(), row_ends.tolist(),      # and the reduce programs that overlap each
                          np.searchsorted(q_end, row_starts, side="right").tolist(),   # (sorted by rows: a range)
                          np.searchsorted(q_start, row_ends).tolist()))
    descs = (describe(k, config.pieces * PIECE), describe(v, config.pieces * PIECE)) if config.use_tma else (k, v)
    precision = dot_precision(q.dtype)
    for first, (row_start, row_end, first_program, end_program) in product(range(0, heads, head_chunk), row_chunks):
        count = min(head_chunk, heads - first)          # chunks of heads x rows, so the partial sums fit scratch_bytes
        search_attention_fwd[(-(-(row_end - row_start) // config.block_m), count, batch)](
            q, k, v, out, lse, partial, *descs, *tiles,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            lse.stride(0), lse.stride(1), partial.stride(0), partial.stride(1), partial.stride(2),
            kv_heads, row_start, row_end, kv_len, len(layout.full_start), len(layout.solo_start), first, scale * LOG2E,
            GROUP=heads // kv_heads, HEAD_DIM=head_dim, BLOCK_M=config.block_m, PIECES=config.pieces,
            USE_TMA=config.use_tma, SCALE_POSITIVE=scale > 0, DOT_PRECISION=precision, num_warps=config.num_warps,
            num_stages=config.num_stages)
        piece_mass_fwd[(end_program - first_program, count, batch)](
            partial, lse, mass, programs, piece_block,
            partial.stride(0), partial.stride(1), partial.stride(2), lse.stride(0), lse.stride(1),
            mass.stride(0), mass.stride(1), mass.stride(2), layout.num_pieces, first, first_program, row_start,
            row_end,
            BLOCK_R=REDUCE_ROWS, BLOCK_P=REDUCE_PIECES, num_warps=4)
    return out, lse, mass

