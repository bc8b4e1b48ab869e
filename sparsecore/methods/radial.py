"""Radial Attention: a static mask whose temporal reach halves as frames grow apart (O(n log n) energy decay).

Paper: "Radial Attention: O(n log n) Sparse Attention with Energy Decay for Long Video Generation", Li et al.,
arXiv 2506.19852. Released code: https://github.com/mit-han-lab/radial-attention (72788d4),
``radial_attn/attn_mask.py`` (``gen_log_mask_shrinked``, ``get_window_width``, ``get_diagonal_split_mask``,
``shrinkMaskStrict``) and the Wan / HunyuanVideo processors that run it (``dense_timestep``, ``dense_block``).

The pattern is the same for every head, layer and step. For query frame ``i`` and key frame ``j`` of ``T`` tokens
each, at distance ``d = |i - j|`` with ``g = d.bit_length()`` and ``e = 2 ** T.bit_length() / 2 ** g``:

- the split rule: while ``e < 128``, only frame pairs whose distance is a multiple of ``128 / e`` are kept (128 is
  fixed in the released code); it applies at every distance but 0, 1 included, so frames of fewer than 128 tokens
  see only themselves (and the sink);
- kept frame pairs at distance 0 or 1 see each other fully; with ``sink`` (the released Wan processor's rule) every
  frame also sees frame 0 fully;
- on the other kept pairs a query token sees the key tokens within ``max(e * decay_factor, block_size)`` positions of
  its own position in the frame (a diagonal band);
- each frame pair's token pattern is cut into ``block_size`` blocks on a grid that starts at the block holding the
  query frame's first token (and the key frame's), and a block is kept where more than 60% of its nonempty key
  columns have more than a third of the block's rows set; the frame pairs' blocks are joined.

The blocks are kept by the same rule and arithmetic as ``gen_log_mask_shrinked`` (counts of the band per column, not
the token mask: a frame pair costs its blocks, not ``T ** 2``), and the masks are equal
(``bench/radial_released_check.py`` compares them with the released function itself). Its FlashInfer path needs the
video's tokens to be a multiple of ``block_size``; where they are not, the last video block is short here and, as the
released function treats the block that crosses the end of the video (called on a padded length), it sees and is seen
by every block. Text tokens (joint attention) attend to everything and are attended by everything, as in the released
HunyuanVideo processor. Rows the rule leaves empty (frames much smaller than a block) are refused, naming a block size
that fits; frame-causal geometries are refused (the pattern is bidirectional).

Dense steps and layers: the released processors run dense attention at steps ``< dense_timestep`` and layers
``< dense_block``; here ``dense_steps`` and ``dense_layers`` (the integration's layer order: the model's blocks in
order). The released scripts use ``decay_factor=0.2, dense_layers=1, dense_steps=12`` for Wan 2.1 at 1x length
(``sink=True``) and ``decay_factor=0.95, dense_layers=0, dense_steps=12`` for HunyuanVideo; the defaults here are
those of the released functions (``decay_factor=1``, no dense steps or layers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from sparsecore.geometry import VideoGeometry
from sparsecore.ir import BlockMask
from sparsecore.ir.memo import LruMemo
from sparsecore.ir.validation import check_bool, check_int, frozen

from .contract import (HeadShard, StepAction, check_bidirectional, check_fraction, check_geometry,
                       check_layer, check_num_steps, check_one_off_step, check_shard, check_sparse_steps, check_step,
                       fixed_block_offsets, geometry_meta, params_from)
from .selection import dense_mask, shared_mask

METHOD = "radial"
PAPER = "arXiv:2506.19852"
PATTERN = "Radial Attention's pattern is bidirectional"      # why frame-causal geometries are refused
SPLIT_THRESHOLD = 128             # the split rule's constant, fixed in the released code whatever the block size
FULL = -1                         # a frame pair's band covers the whole frame
MASKS_KEPT = 8                    # masks a session keeps, one per (geometry, heads): a pipeline's few geometries
                                  # (guidance at two resolutions, a planner shared by pipelines) each built once


@dataclass(frozen=True)
class RadialParams:
    """Radial Attention's parameters, checked once; see the module docstring.

    ``decay_factor`` scales the band width of distant frames; ``sink``: every frame sees frame 0 (the released Wan
    processor); ``dense_steps`` / ``dense_layers``: the first steps / layers run dense attention; ``block_size``: the
    mask's blocks (128 in the released code).
    """

    decay_factor: float = 1.0
    sink: bool = False
    dense_steps: int = 0
    dense_layers: int = 0
    block_size: int = 128

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "decay_factor", check_fraction(self.decay_factor, "decay_factor", 0.0, math.inf, open_low=True))
        check_bool(self.sink, "sink")
        set_(self, "dense_steps", check_int(self.dense_steps, "dense_steps", 0))
        set_(self, "dense_layers", check_int(self.dense_layers, "dense_layers", 0))
        set_(self, "block_size", check_int(self.block_size, "block_size", 1))

    @property
    def approximation(self) -> str:
        """What rows get from the blocks they do not keep: nothing (Radial Attention drops them)."""
        return "drop"


def band_widths(frames: int, frame_tokens: int, decay_factor: float, block_size: int) -> np.ndarray:
    """Per frame distance ``d`` (int64 ``[frames]``): the band's half-width in tokens, :data:`FULL` for the whole
    frame, or 0 where the split rule drops the pair (every pair keeps at least the block size, so 0 means none)."""
    widths = np.empty(frames, dtype=np.int64)
    for d in range(frames):                       # one value per distance: O(frames), once per geometry
        decay = 2 ** frame_tokens.bit_length() / 2 ** d.bit_length()
        if decay < SPLIT_THRESHOLD and d % int(SPLIT_THRESHOLD / decay):
            widths[d] = 0                         # the split rule drops the pair (at any distance, 0 and 1 too)
        elif d <= 1:
            widths[d] = FULL
        else:
            width = max(decay * decay_factor, block_size)         # may be huge (or inf): compared before floor
            widths[d] = FULL if width >= frame_tokens - 1 else math.floor(width)
    return widths


@lru_cache(maxsize=4096)
def pair_blocks(frame_tokens: int, block_size: int, width: int, row_shift: int, col_shift: int) -> np.ndarray:
    """The kept blocks of one frame pair, bool ``[nb, nb]`` (``nb = ceil(T / block_size)``), read-only.

    The pair's band (``|c - r| <= width``, or every pair for :data:`FULL`) sits at ``(row_shift, col_shift)`` in a
    grid of ``nb`` blocks each way (the frames' first tokens' places in their blocks). Per block and key column the
    band's row count is an interval length; a block is kept where more than 60% of its nonempty columns hold more than
    a third of its rows (``shrinkMaskStrict``'s rule, in integers)."""
    nb = -(-frame_tokens // block_size)
    width = frame_tokens if width == FULL else width
    c = np.arange(nb * block_size) - col_shift                       # each grid column's key token in its frame
    block_rows = np.arange(nb)[:, None] * block_size - row_shift     # each grid block's first row, in the frame
    lo = np.maximum(np.maximum(c - width, 0), block_rows)
    hi = np.minimum(np.minimum(c + width, frame_tokens - 1), block_rows + block_size - 1)
    counts = np.where((c >= 0) & (c < frame_tokens), np.maximum(hi - lo + 1, 0), 0).reshape(nb, nb, block_size)
    high = (3 * counts > block_size).sum(-1)
    nonempty = (counts > 0).sum(-1)
    return frozen(5 * high > 3 * nonempty)


def video_block_map(geometry: VideoGeometry, p: RadialParams) -> np.ndarray:
    """bool ``[NB, NB]`` over the video's ``block_size`` blocks: the frame pairs' blocks, joined; a short last block
    (video tokens not a multiple of the block size) sees and is seen by every block, as the released function makes
    the block that crosses the end of the video."""
    frames, tokens, size = geometry.frames, geometry.frame_tokens, p.block_size
    num_blocks = -(-geometry.video_tokens // size)
    widths = band_widths(frames, tokens, p.decay_factor, size)
    block_map = np.zeros((num_blocks, num_blocks), dtype=bool)
    for d in range(frames):                       # once per geometry; memory in frames, not frames^2
        first = np.arange(frames - d)
        for rows, cols in ((first, first + d), (first + d, first))[:1 if d == 0 else 2]:
            width = np.full(len(rows), widths[d])
            if p.sink:
                width[cols == 0] = FULL
            live = width != 0
            rows, cols, width = rows[live], cols[live], width[live]
            keys = np.stack([width, rows * tokens % size, cols * tokens % size], axis=1)
            unique, which = np.unique(keys, axis=0, return_inverse=True)
            which = which.ravel()
            for index, (w, row_shift, col_shift) in enumerate(unique.tolist()):   # each distinct pair pattern
                local_rows, local_cols = np.nonzero(pair_blocks(tokens, size, w, row_shift, col_shift))
                pairs = which == index
                block_map[(rows[pairs] * tokens // size)[:, None] + local_rows,
                          (cols[pairs] * tokens // size)[:, None] + local_cols] = True
    short = geometry.video_tokens % size != 0
    empty = np.flatnonzero(~block_map[:num_blocks - short].any(axis=1))     # before the short block's row and column
    if len(empty):      # refused by choice: the released function would leave them the short block (or text) only
        raise ValueError(f"geometry: Radial Attention's rule keeps no frame block in {len(empty)} of the {num_blocks} "
                         f"video block rows of {geometry} (first: block {empty[0]}): its {size}-token blocks hold too "
                         f"few rows of any one frame ({tokens} tokens a frame); pass a smaller block_size, at most "
                         f"{tokens}, or use another method")
    if short:
        block_map[-1, :] = block_map[:, -1] = True
    return block_map


@lru_cache(maxsize=64)
def _block_map(geometry: VideoGeometry, p: RadialParams) -> tuple[np.ndarray, np.ndarray, bool]:
    """``(offsets, block_map, dense)`` over the whole sequence: video blocks by :func:`video_block_map`, text blocks
    full both ways; ``dense``: every block kept (arrays read-only: shared by every session of the process)."""
    check_bidirectional(geometry, PATTERN)
    if p.block_size > geometry.video_tokens:
        raise ValueError(f"block_size: expected at most the {geometry.video_tokens} video tokens of {geometry}, got "
                         f"{p.block_size}; pass a block size that cuts the video into blocks (128, as released)")
    offsets = fixed_block_offsets(geometry, 1, p.block_size)
    video = ~geometry.text_blocks(offsets)
    block_map = np.ones((len(offsets) - 1,) * 2, dtype=bool)
    block_map[np.ix_(video, video)] = video_block_map(geometry, p)
    return frozen(offsets), frozen(block_map), bool(block_map.all())


def plan(geometry: VideoGeometry, num_heads: int, *, step: int = 0, layer: int | None = None, q: Any = None,
         k: Any = None, heads: HeadShard | None = None, **params: Any) -> BlockMask:
    """The Radial Attention mask (the same at every step, layer and head; ``q``, ``k`` unused), or at the dense steps
    and layers dense attention's (frame-sized blocks), as the session's action says; ``**params``:
    :class:`RadialParams` fields."""
    step, layer = check_one_off_step(step), check_layer(layer)
    session = RadialSession(step + 1, **params)
    if session.action(geometry, step, layer).dense and session.dense_at(step, layer):    # the action's checks first
        shard = check_shard(heads, check_geometry(geometry, num_heads))
        return dense_mask(geometry, shard.size, {"method": METHOD, "paper": PAPER, "layer": layer, "step": step,
                                                 "action": "dense", "params": vars(session.params),
                                                 "geometry": geometry_meta(geometry)})
    return session.plan(geometry, num_heads, step=step, layer=layer, heads=heads)


class RadialSession:
    """One run: dense at the first ``dense_steps`` steps and ``dense_layers`` layers, else the one mask per geometry
    (the :data:`MASKS_KEPT` last used are kept)."""

    method = METHOD

    def __init__(self, num_steps: int, **params: Any) -> None:
        self.num_steps = check_num_steps(num_steps)
        self.params = params_from(RadialParams, METHOD, params)
        self._masks = LruMemo(MASKS_KEPT)                        # (geometry, heads) -> mask

    def action(self, geometry: VideoGeometry, step: int, layer: int | None = None) -> StepAction:
        """Dense at the dense steps and layers and where the pattern keeps every block, else the shared mask."""
        check_step(step, self.num_steps)
        layer = check_layer(layer)
        check_geometry(geometry, 1)
        full = _block_map(geometry, self.params)[2]   # refuses a geometry at the first step, dense or not
        if full or self.dense_at(step, layer):
            return StepAction("dense", dense=True, plans=False)
        return StepAction("plan", dense=False, plans=True, shared=True)

    def dense_at(self, step: int, layer: int | None) -> bool:
        """The step is one of the dense steps or the layer one of the dense layers."""
        return step < self.params.dense_steps or (layer is not None and layer < self.params.dense_layers)

    def plan(self, geometry: VideoGeometry, num_heads: int, *, step: int, layer: int | None = None,
             q: Any = None, k: Any = None, lse: Any = None, mass: Any = None,
             heads: HeadShard | None = None) -> BlockMask:
        """The mask (``heads``: this :class:`~.contract.HeadShard`'s heads): one object for every step and layer, so
        its ``meta`` names neither."""
        check_step(step, self.num_steps)
        check_layer(layer)
        shard = check_shard(heads, check_geometry(geometry, num_heads))
        return self._masks.get((geometry, shard.size), lambda: self._build(geometry, shard.size))

    def _build(self, geometry: VideoGeometry, num_heads: int) -> BlockMask:
        """The mask of ``num_heads`` heads on ``geometry``, every head the pattern's block map."""
        fixed_block_offsets(geometry, num_heads, self.params.block_size)           # the heads' lists fit int32
        offsets, block_map, _ = _block_map(geometry, self.params)
        meta = {"method": METHOD, "paper": PAPER, "layer": None, "step": None, "params": vars(self.params),
                "geometry": geometry_meta(geometry)}
        return shared_mask(block_map, num_heads, offsets, offsets, meta=meta)


def session(num_steps: int = 50, **params: Any) -> RadialSession:
    """A :class:`RadialSession` for a run of ``num_steps`` denoising steps, refused where ``dense_steps`` leaves no
    sparse step (:func:`.contract.check_sparse_steps`)."""
    run = RadialSession(num_steps, **params)
    dense = run.params.dense_steps
    check_sparse_steps("dense_steps", dense, params, min(dense, run.num_steps), run.num_steps, run.num_steps - 1)
    return run
