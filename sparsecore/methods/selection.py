"""Row-wise block selection on the compute device, and the masks the planners build from it.

AdaSpa and PASA both score every (query block, key block) pair of every head, keep each
video row's best key blocks, and force a *text sink*: text key blocks are kept in every
row and text rows keep everything (AdaSpa, arXiv 2502.21079 Sec. 4.3; PASA says nothing
of text, so it follows). Here that is one batched ``topk`` over ``[H, rows, blocks]``, one
sort, and the CSR lists written with ``scatter`` into arrays whose sizes are known before
any value is read (:func:`sparsecore.ir.csr.scatter_rows`): no Python loop over heads or
rows, and no host round trip unless the caller's row counts are data-dependent. Where every
row keeps the same number of blocks (PASA), :func:`sorted_top` takes a backend's row-wise
top-k (:class:`sparsecore.registry.RowTopOp`; Triton on CUDA), noise included, where one
takes the scores.

Text blocks are contiguous (:meth:`VideoGeometry.block_offsets` keeps them at the end or
the start), so the video part of a score map is a plain slice. LVSA's static patterns are
built on the host (:func:`shared_mask`) and uploaded once per pattern by the compile cache.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from sparsecore.geometry import VideoGeometry
from sparsecore.ir import BlockMask, csr
from sparsecore.ir.head_meta import select_meta_heads
from sparsecore.ir.host_facts import note_row_lengths
from sparsecore.ir.uploads import queued
from sparsecore.ir.validation import INDEX_LIMIT, check_budgets, check_int, frozen
from sparsecore.launch_device import on_device_of
from sparsecore.noise import GumbelNoise
from sparsecore.registry import RowTopOp, registered_backends

from .causal import visible_map

def block_means(x: torch.Tensor, offsets: np.ndarray) -> torch.Tensor:
    """Mean of each block's tokens, float32 ``[B, heads, blocks, D]`` from ``x [B, heads, L, D]``.

    The leading run of equal-size blocks (the video) is a reshape and a mean; the rest (a short
    last block, text blocks) an ``index_add`` over its few tokens.
    """
    sizes = np.diff(offsets)
    run = int(np.argmax(sizes != sizes[0])) if (sizes != sizes[0]).any() else len(sizes)
    size, split = int(sizes[0]), int(offsets[run])
    head = x[:, :, :split].unflatten(2, (run, size)).mean(dim=3, dtype=torch.float32)
    if run == len(sizes):
        return head
    rest = sizes[run:]
    block_of = queued(np.repeat(np.arange(len(rest)), rest), x.device)
    sums = torch.zeros(*x.shape[:2], len(rest), x.shape[3], dtype=torch.float32, device=x.device).index_add_(
        2, block_of, x[:, :, split:].float())
    return torch.cat([head, sums / queued(rest.astype(np.float32), x.device)[None, None, :, None]], dim=2)


@dataclass(frozen=True)
class SinkLayout:
    """Where video and text blocks sit on a square block grid (the same offsets for queries and keys)."""

    num_blocks: int
    video: slice
    text: slice

    @classmethod
    def of(cls, geometry: VideoGeometry, offsets: np.ndarray) -> "SinkLayout":
        text = np.flatnonzero(geometry.text_blocks(offsets))
        num_blocks = len(offsets) - 1
        if not len(text):
            return cls(num_blocks, slice(0, num_blocks), slice(num_blocks, num_blocks))
        text_slice = slice(int(text[0]), int(text[-1]) + 1)
        video = slice(text_slice.stop, num_blocks) if text_slice.start == 0 else slice(0, text_slice.start)
        return cls(num_blocks, video, text_slice)

    @property
    def video_blocks(self) -> int:
        return self.video.stop - self.video.start

    @property
    def text_blocks(self) -> int:
        return self.text.stop - self.text.start


def keep_count(density: float, video_blocks: int) -> int:
    """Blocks kept per row for a density: ``round(density * video_blocks)``, at least 1."""
    return int(min(video_blocks, max(1, round(density * video_blocks))))


@dataclass(frozen=True)
class Selection:
    """Each head's video rows as padded sorted lists: ``rows[h, r, :counts]`` (block ids, int32); ``counts`` an int
    (every row), an int64 tensor ``[H]`` (per head) or ``[H, R]`` (per head and row)."""

    rows: torch.Tensor
    counts: torch.Tensor | int


def top_video(scores: torch.Tensor, layout: SinkLayout, max_keep: int, *, ranked: bool = False):
    """``torch.topk`` of every video row over the video key blocks of ``scores [H, MB, NB]``.

    ``ranked``: values (and indices) in descending order, needed when heads keep
    different prefixes of the top ``max_keep`` (:func:`rows_from_top` with a tensor ``keep``).
    """
    return torch.topk(scores[:, layout.video, layout.video], max_keep, dim=-1, sorted=ranked)


def sorted_top(scores: torch.Tensor, k: int, noise: GumbelNoise | None = None) -> torch.Tensor:
    """Column ids int32 ``[H, R, k]``, ascending, of each row's ``k`` largest ``scores + noise`` (scores: float32
    ``[H, R, C]``).

    A registered backend's :class:`~sparsecore.registry.RowTopOp` where one takes the scores (it keeps the
    lowest ids among entries tied at the ``k``-th value), else torch: the noise map, ``topk``, a sort
    (ties: whichever ``topk`` returns).
    """
    op = _row_top(scores, k)
    if op is not None:
        with on_device_of(scores):
            return op.run(scores, k, noise)
    if noise is not None:
        scores = scores + noise.sample(scores.shape[1], scores.shape[2])
    return torch.sort(torch.topk(scores, k, dim=-1, sorted=False).indices, dim=-1).values.to(torch.int32)


def _row_top(scores: torch.Tensor, k: int) -> RowTopOp | None:
    ops = (b.row_top for b in registered_backends().values() if b.row_top is not None)
    return next((op for op in ops if op.supports(scores, k) is None), None)


def sink_rows(video_ids: torch.Tensor, layout: SinkLayout) -> Selection:
    """The :class:`Selection` of video rows that keep the sorted video blocks ``video_ids`` (int32 ``[H, R, k]``,
    counted from the first video block) and every text block: text and video ids are two runs, so no sort."""
    heads, rows, keep = video_ids.shape
    video_ids = video_ids + layout.video.start
    if not layout.text_blocks:
        return Selection(video_ids, keep)
    text = torch.arange(layout.text.start, layout.text.stop, dtype=torch.int32, device=video_ids.device)
    parts = [video_ids, text.expand(heads, rows, -1)]
    return Selection(torch.cat(parts if layout.text.start > layout.video.start else parts[::-1], dim=-1),
                     keep + layout.text_blocks)


def rows_from_top(top: Any, layout: SinkLayout, keep: torch.Tensor | int) -> Selection:
    """Each video row's kept blocks: its top ``keep`` video blocks (all of ``top`` when ``keep`` is an int, a
    ranked prefix per head when it is an int64 tensor ``[H]``, per head and row when ``[H, R]``) plus every text
    block, sorted."""
    chosen = top.indices + layout.video.start
    if isinstance(keep, torch.Tensor):
        slot = torch.arange(chosen.shape[-1], device=chosen.device)
        bound = keep[:, None, None] if keep.dim() == 1 else keep[:, :, None]
        chosen = torch.where(slot < bound, chosen, layout.num_blocks)   # sorts after every block id
    text = torch.arange(layout.text.start, layout.text.stop, device=chosen.device)
    rows = torch.cat([chosen, text.expand(*chosen.shape[:2], -1)], dim=-1)
    return Selection(torch.sort(rows, dim=-1).values.to(torch.int32), keep + layout.text_blocks)


def sink_mask(selection: Selection, layout: SinkLayout, offsets: np.ndarray, nnz: int, budgets: torch.Tensor,
              meta: Mapping[str, Any]) -> BlockMask:
    """The mask of a :class:`Selection`: video rows as selected, text rows keep every block.

    ``nnz`` is the number of kept blocks (a host int the caller knows or read once). The rows' length bounds
    known here are noted on the mask (:func:`sparsecore.ir.host_facts.note_row_lengths`).
    """
    rows = selection.rows
    heads, device = rows.shape[0], rows.device
    counts = torch.full((heads, layout.num_blocks), layout.num_blocks, dtype=torch.int64, device=device)
    given = selection.counts                                       # an int fills: no host-to-device copy
    counts[:, layout.video] = given.reshape(heads, -1) if isinstance(given, torch.Tensor) else given
    indptr = csr.indptr_from_counts(counts)
    if isinstance(selection.counts, torch.Tensor):
        indices = _scattered(rows, layout, indptr, counts, nnz)
    else:
        indices = _concatenated(rows, layout)
    # Valid by construction: rows are sorted top-k ids (distinct, in range) plus the text ids
    # (distinct from video ids), counts match the entries written, and nnz sums the counts.
    mask = BlockMask.unchecked(heads, offsets, offsets, indptr.to(torch.int32), indices[:nnz],
                               budgets.to(torch.float64), meta)
    full = [layout.num_blocks] if layout.text_blocks else []                # text rows keep every block
    video = [int(given)] * 2 if isinstance(given, numbers.Integral) else [0, rows.shape[2]]   # per head: the padding
    return note_row_lengths(mask, min(video[:1] + full), max(video[1:] + full))


def _scattered(rows: torch.Tensor, layout: SinkLayout, indptr: torch.Tensor, counts: torch.Tensor,
               nnz: int) -> torch.Tensor:
    """The CSR indices of padded video rows with per-head counts (written by scatter) and full text rows."""
    heads, device = rows.shape[0], rows.device
    indices = torch.empty(nnz + 1, dtype=torch.int32, device=device)     # + 1: the slot padding writes go to
    video_rows = torch.arange(layout.video.start, layout.video.stop, device=device)
    csr.scatter_rows(indices, indptr, video_rows, rows, counts[:, layout.video])
    if layout.text_blocks:
        text_rows = torch.arange(layout.text.start, layout.text.stop, device=device)
        every = torch.arange(layout.num_blocks, device=device).expand(heads, layout.text_blocks, -1)
        csr.scatter_rows(indices, indptr, text_rows, every, counts[:, layout.text])
    return indices


def _concatenated(rows: torch.Tensor, layout: SinkLayout) -> torch.Tensor:
    """The CSR indices when every video row keeps ``rows.shape[2]`` blocks: each head's video rows and its full
    text rows are two runs in row order, so the lists are a concatenation (no scatter, no int64 positions)."""
    heads = rows.shape[0]
    video = rows.reshape(heads, -1)
    if not layout.text_blocks:
        return video.reshape(-1)
    every = torch.arange(layout.num_blocks, dtype=torch.int32, device=rows.device)
    text = every.repeat(layout.text_blocks).expand(heads, -1)
    runs = [video, text] if layout.text.start > layout.video.start else [text, video]
    return torch.cat(runs, dim=1).reshape(-1)


def selection_nnz(layout: SinkLayout, heads: int, video_row_counts: int) -> int:
    """Kept blocks of a sink mask whose video rows keep ``video_row_counts`` blocks summed over heads."""
    return layout.video_blocks * video_row_counts + heads * layout.text_blocks * layout.num_blocks


# ------------------------------------------------------------------ host masks (static patterns)
def shared_mask(block_map: np.ndarray, num_heads: int, q_offsets: np.ndarray, kv_offsets: np.ndarray, *,
                budgets: Any = None, meta: Mapping[str, Any] | None = None) -> BlockMask:
    """A host BlockMask whose every head has the bool ``[MB, NB]`` map: one head's lists are built and checked, the
    others are copies of them (:func:`repeated_heads`). ``meta`` is the ``num_heads``-head mask's."""
    num_heads = check_int(num_heads, "num_heads", minimum=1)
    one = BlockMask(1, q_offsets, kv_offsets, *csr.from_block_map(block_map[None]), None)
    return repeated_heads(one, num_heads, budgets, {} if meta is None else meta)


def repeated_heads(one: BlockMask, num_heads: int, budgets: Any = None,
                   meta: Mapping[str, Any] | None = None) -> BlockMask:
    """The host mask ``one`` (one head) for ``num_heads`` heads, its budget unless ``budgets`` are given: the other
    heads' lists are copies (valid by construction, so not checked again; every head's took 1.4 s a step for LVSA's
    64-token blocks at Wan 2.1 6x, 12 heads, on a 2-core CPU). Its meta is ``one``'s with each per-head entry
    (``meta["per_head_keys"]``) repeated, unless ``meta`` (of ``num_heads`` heads) is given."""
    num_heads = check_int(num_heads, "num_heads", minimum=1)
    meta = select_meta_heads(one.meta, [0] * num_heads, 1) if meta is None else \
        select_meta_heads(meta, range(num_heads), num_heads)              # per-head entries: checked for num_heads
    nnz = len(one.indices)
    if num_heads * nnz > INDEX_LIMIT:
        raise ValueError(f"num_heads: {num_heads} heads of {nnz:,} blocks each are more than the int32 index limit "
                         f"{INDEX_LIMIT:,}; plan fewer heads at a time (heads=HeadShard(...)) or use larger blocks")
    indptr = one.indptr.astype(np.int64) + nnz * np.arange(num_heads, dtype=np.int64)[:, None]
    budgets = np.repeat(one.budgets, num_heads) if budgets is None else check_budgets(budgets, num_heads)
    return BlockMask.unchecked(num_heads, one.q_offsets, one.kv_offsets, frozen(indptr.astype(np.int32)),
                               frozen(np.tile(one.indices, num_heads)), frozen(budgets), meta)


def dense_mask(geometry: VideoGeometry, num_heads: int, meta: Mapping[str, Any]) -> BlockMask:
    """Full attention on frame-sized blocks (the cheapest IR of a dense step at any length); under frame-causal
    attention, every block each row may see (:mod:`.causal`)."""
    offsets = geometry.block_offsets(None)
    return shared_mask(visible_map(geometry, offsets), num_heads, offsets, offsets, budgets=np.ones(num_heads),
                       meta=meta)
