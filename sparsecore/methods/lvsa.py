"""LVSA: frame windows plus rotating global anchor frames, for long-video extrapolation.

Paper: "LVSA: Training-Free Sparse Attention for Long Video Diffusion", Glorian et al.,
arXiv 2605.31057 (Sec. 2, Def. 2, Alg. 1, Eq. 3).
Official code: https://github.com/JiusiServe/LongVideoSparseAttention (v1.2.0, c72a36b):
``lvsa/sparse_attention.py`` (``adaptive_window_bounds``, ``expanded_window_bounds``,
``compute_auto_kfi``, ``compute_global_indices``, ``compute_boundary_guard_frames``),
``lvsa/lvsa_processor.py::set_step``, ``lvsa-vllm-omni/lvsa_vllm_omni/config.py``.

Pattern: query frame ``t`` attends to ``A(t) = G ∪ W(t)``: the global anchors ``G``
(the ``first_frames`` leading frames, periodic anchors every ``T_per`` frames, and
sequence-parallel boundary guards) and its local window ``W(t)``. The adaptive window
is shifted at the edges to keep ``2W+1`` frames; the expanded window (default) grows,
alternating left then right, until it holds ``min(2W+1, T-|G|)`` non-anchor frames,
so every frame attends to exactly ``|G| + min(2W+1, T-|G|)`` frames. At step ``s``
the periodic anchors are ``{(s mod T_per + i T_per) mod T : i < ceil(T / T_per)}``
(Eq. 3); leading frames and guards do not rotate. When the budget ``C`` covers the
video (``T <= C``) every frame is an anchor: the pattern is dense.

Defaults (released code, paper runs): ``window=3`` latent frames (12 video frames),
``first_frames=1`` (4 video frames), ``reference_frames=21`` (Wan 2.x; 33 for
HunyuanVideo 1.5, 13 for CogVideoX (11 for 1.5, ours), 25 for SkyReels-V2 (ours), 28 for Mochi 1 (ours), 21 for
LTX-Video, 16 for LTX-2, 31 for Kandinsky 5 and 24 for Cosmos (ours):
:data:`REFERENCE_FRAMES`),
``anchor_rule="auto"`` (the ``--auto-keyframes`` rule of the paper's benchmark scripts), ``rotate=True``,
``expand_window=True``, ``sparsity_scale=1.0``.

Where the paper is silent or paper and code differ, we chose:

- Anchor interval: ``anchor_rule="auto"`` is the code's ``compute_auto_kfi`` (strict
  rule vs closed-form fallback, the larger wins); ``"paper"`` is
  ``T_per = floor(T / (C - (2W+1)))`` (needs ``C > 2W+1``), dense at ``T <= C``.
  ``anchor_interval=n`` fixes it. ``sparsity_scale`` scales C the code's way in both
  rules: ``C' = max(first_frames + 1, int(C * scale))``.
- Expanded window: the paper says "widen the side with most room"; we follow the
  code (one frame left, then one right, repeat; a side at the edge is skipped).
- Rotation: step ``s`` uses offset ``s mod T_per`` (Eq. 3). The released example
  calls ``set_step(s)`` at the end of step ``s``, so its step ``s`` uses ``s - 1``;
  pass ``step - 1`` to reproduce it.
- Text tokens (joint attention, HunyuanVideo 1.5): video queries attend to all text
  tokens and text queries attend to everything, as in code v1.2 (which computes the
  video-to-text part as a separate dense call merged by LSE; here it is one mask).
- Blocks: one block per latent frame (``P`` tokens, the code's FlashInfer ``R = C = P``),
  text cut into blocks of at most ``P``. ``block_size=n`` retiles to fixed ``n``-token
  blocks: a block pair is kept when any token pair of the frame pattern is, so the
  retiled mask is the smallest mask on that grid that covers the frame pattern (a
  block straddling two frames sees the union of both frames' sets).
- Sequence parallelism: ``sp_world > 1`` adds the code's boundary guards (frames
  within ``W`` of each rank's first frame, ranks splitting the video tokens evenly). The
  code needs them because its ranks see only their own window keys plus the broadcast
  anchors; sparsecore's ring (``ring_degree = sp_world``) fetches every key a row lists,
  so the guards are opt-in there (``sp_world=ring_degree`` reproduces the code's masks;
  default 1 keeps the one-GPU mask), and meaningless under Ulysses (no sequence split).
- The pattern is the same for every head and layer; ``q`` / ``k`` are ignored.
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

from . import causal
from .contract import (COUNT_LIMIT, HeadShard, StepAction, check_fraction, check_video_count,
                       check_geometry, check_layer, check_num_steps, check_shard, check_step, fixed_block_offsets,
                       geometry_meta, params_from)
from .approximation import check_approximation, check_causal, unselected_of, with_unselected
from .selection import repeated_heads

METHOD = "lvsa"
PAPER = "arXiv:2605.31057"
REFERENCE_FRAMES = {"wan": 21, "hunyuanvideo-1.5": 33, "hunyuanvideo": 33, "cogvideox": 13,
                    "cogvideox-1.5": 11,   # ours: 81 frames, 21 latent frames, in token frames of its temporal patch 2
                    "skyreels-v2": 25,     # ours: its pipelines' 97 frames (540P)
                    "mochi": 28,           # ours: Mochi 1 preview's 163 frames, 28 latent frames (6x temporal)
                    "ltx-video": 21,       # ours: LTXPipeline's default 161 frames, 21 latent frames (8x temporal)
                    "ltx-2": 16,           # ours: LTX2Pipeline's default 121 frames, 16 latent frames
                    "kandinsky-5": 31,     # ours: Kandinsky5T2VPipeline's default 121 frames, 31 latent frames
                    "cosmos": 24}          # ours: Cosmos-Predict2/2.5's 93 frames, 24 latent frames (4x temporal)
ANCHOR_RULES = ("auto", "paper")
GEOMETRIES_KEPT = 4               # geometries whose current mask a session keeps: those a pipeline alternates
                                  # (guidance at two resolutions), each built once a rotation


@dataclass(frozen=True)
class LVSAParams:
    """LVSA's parameters (the released code's defaults), checked once; see the module docstring."""

    window: int = 3
    first_frames: int = 1
    reference_frames: int = REFERENCE_FRAMES["wan"]
    anchor_rule: str = "auto"
    anchor_interval: int | None = None
    rotate: bool = True
    expand_window: bool = True
    sparsity_scale: float = 1.0
    block_size: int | None = None
    sp_world: int = 1
    approximation: str = "drop"

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "window", check_video_count(self.window, "window", 0))
        set_(self, "first_frames", check_int(self.first_frames, "first_frames", 0))
        set_(self, "reference_frames", check_video_count(self.reference_frames, "reference_frames", 1))
        set_(self, "sp_world", check_int(self.sp_world, "sp_world", 1))
        if self.anchor_rule not in ANCHOR_RULES:
            raise ValueError(f"anchor_rule: expected one of {ANCHOR_RULES}, got {self.anchor_rule!r}")
        if self.anchor_interval is not None:
            set_(self, "anchor_interval", check_video_count(self.anchor_interval, "anchor_interval", 1))
        if self.block_size is not None:
            set_(self, "block_size", check_int(self.block_size, "block_size", 1))
        set_(self, "sparsity_scale", check_fraction(self.sparsity_scale, "sparsity_scale", 0.0, math.inf,
                                                    open_low=True))
        set_(self, "approximation", check_approximation(self.approximation))
        if self.anchor_rule == "paper" and self.anchor_interval is None:    # at a long video's first step otherwise
            scaled = int(min(self.reference_frames * self.sparsity_scale, COUNT_LIMIT + 1))   # C * scale may be inf
            _check_paper_rule(self.window, max(self.first_frames + 1, scaled))
        check_bool(self.rotate, "rotate")
        check_bool(self.expand_window, "expand_window")


@dataclass(frozen=True)
class FramePattern:
    """The frame-level pattern of one step.

    ``anchors``: sorted global frames (int64); ``windows``: int64 ``[T, 2]`` inclusive
    ``[lo, hi]`` per query frame (``hi < lo`` for an empty window, ``window=0``);
    ``anchor_interval``: ``T_per`` (1 means every frame is an anchor: dense).
    """

    frames: int
    anchor_interval: int
    anchors: np.ndarray
    windows: np.ndarray

    @property
    def dense(self) -> bool:
        return len(self.anchors) == self.frames

    def attended(self) -> np.ndarray:
        """bool ``[T, T]``: query frame (row) attends to key frame (column)."""
        cols = np.arange(self.frames)
        attended = (cols[None, :] >= self.windows[:, :1]) & (cols[None, :] <= self.windows[:, 1:])
        attended[:, self.anchors] = True
        return attended


def _check_paper_rule(window: int, scaled: int) -> None:
    """The paper's rule needs ``C' > 2W + 1`` (``scaled``: C' after sparsity_scale)."""
    if scaled <= 2 * window + 1:
        raise ValueError(f"reference_frames: the paper rule needs C > 2W+1 = {2 * window + 1}, got C={scaled} "
                         f"(after sparsity_scale); lower window or use anchor_rule='auto'")


def anchor_interval(frames: int, *, window: int, first_frames: int, reference_frames: int, rule: str = "auto",
                    sparsity_scale: float = 1.0) -> int:
    """``T_per``: frames between periodic anchors (1 = every frame an anchor = dense)."""
    scaled = max(first_frames + 1, int(min(reference_frames * sparsity_scale, frames + 1)))
    if frames <= scaled:
        return 1
    span = min(2 * window + 1, frames)
    if rule == "paper":
        _check_paper_rule(window, scaled)
        return max(1, frames // (scaled - (2 * window + 1)))          # T_per = T // (C' - (2W + 1))
    target_globals = max(first_frames, min(scaled, frames) - span)
    strict = 1
    for interval in range(frames, 0, -1):         # largest interval whose anchor set is big enough
        count = len(set(range(min(first_frames, frames))) | set(range(0, frames, interval)))
        if count >= target_globals:
            strict = interval
            break
    mandatory = 2 * window + first_frames
    fallback = math.ceil(max(frames - mandatory, scaled - mandatory) / max(scaled - mandatory, 1))
    return max(strict, fallback)


def anchors_at(frames: int, interval: int, step: int, *, first_frames: int, rotate: bool = True,
               guards: np.ndarray | None = None) -> np.ndarray:
    """Sorted anchor frames at ``step``: leading frames, rotated periodic anchors (Eq. 3), guards."""
    offset = step % interval if rotate else 0
    periodic = (offset + interval * np.arange(-(-frames // interval))) % frames
    anchors = np.zeros(frames, dtype=bool)
    anchors[:min(first_frames, frames)] = True
    anchors[periodic] = True
    if guards is not None:
        anchors[guards] = True
    return np.nonzero(anchors)[0]


def window_bounds(frames: int, window: int, anchors: np.ndarray, expand: bool = True) -> np.ndarray:
    """int64 ``[T, 2]`` inclusive window per query frame (adaptive, optionally expanded)."""
    bounds = np.empty((frames, 2), dtype=np.int64)
    if window == 0:
        bounds[:, 0] = np.arange(frames)
        bounds[:, 1] = np.arange(frames) - 1
        return bounds
    is_anchor = np.zeros(frames, dtype=bool)
    is_anchor[anchors] = True
    free = np.concatenate([[0], np.cumsum(~is_anchor)])        # free[j] = non-anchors in [0, j)
    target = min(2 * window + 1, frames - len(anchors))
    for t in range(frames):
        lo = max(0, min(t - window, frames - 1 - 2 * window))
        hi = min(frames - 1, max(t + window, 2 * window))
        if expand:
            while free[hi + 1] - free[lo] < target:
                if lo > 0:
                    lo -= 1
                    if free[hi + 1] - free[lo] >= target:
                        break
                if hi < frames - 1:
                    hi += 1
        bounds[t] = lo, hi
    return bounds


def boundary_guards(geometry: VideoGeometry, sp_world: int, window: int) -> np.ndarray:
    """Frames within ``window`` of each sequence-parallel rank boundary (code: compute_boundary_guard_frames)."""
    if sp_world == 1:
        return np.zeros(0, dtype=np.int64)
    if geometry.video_tokens % sp_world:
        raise ValueError(f"sp_world: the {geometry.video_tokens} video tokens must split evenly over the ranks, "
                         f"got sp_world={sp_world}; pad the sequence or pick a divisor")
    local = geometry.video_tokens // sp_world
    guards = set()
    for rank in range(1, sp_world):
        frame = rank * local // geometry.frame_tokens
        guards.update(range(max(0, frame - window), min(geometry.frames, frame + window + 1)))
    return np.array(sorted(guards), dtype=np.int64)


def frame_pattern(geometry: VideoGeometry, step: int, **params: Any) -> FramePattern:
    """The frame-level pattern at ``step`` (parameters: :class:`LVSAParams` fields; its arrays are read-only: the
    pattern is memoized for every session of the process)."""
    check_geometry(geometry, 1)
    return _pattern(geometry, check_step(step), params_from(LVSAParams, METHOD, params))   # 1.0 == 1: checked first


@lru_cache(maxsize=256)
def _pattern(geometry: VideoGeometry, step: int, p: LVSAParams) -> FramePattern:
    frames = geometry.frames
    interval = p.anchor_interval
    if interval is None:
        interval = anchor_interval(frames, window=p.window, first_frames=p.first_frames,
                                   reference_frames=p.reference_frames, rule=p.anchor_rule,
                                   sparsity_scale=p.sparsity_scale)
    guards = boundary_guards(geometry, p.sp_world, p.window)
    anchors = anchors_at(frames, interval, check_step(step), first_frames=p.first_frames, rotate=p.rotate,
                         guards=guards)
    windows = window_bounds(frames, p.window, anchors, p.expand_window)
    return FramePattern(frames, int(interval), frozen(anchors), frozen(windows))  # cached: shared by every caller


def plan(geometry: VideoGeometry, num_heads: int, *, step: int, layer: int | None = None, q: Any = None,
         k: Any = None, **params: Any) -> BlockMask:
    """The LVSA mask at ``step`` (same for every head and layer; ``q``, ``k`` unused).

    Args:
        geometry: token layout; blocks are latent frames unless ``block_size`` is given.
        num_heads: heads of the mask.
        step: denoising step (0-based); rotates the periodic anchors.
        layer: recorded in ``meta`` only.
        **params: :class:`LVSAParams` fields: ``window``, ``first_frames``, ``reference_frames``,
            ``anchor_rule`` (``"auto"`` | ``"paper"``), ``anchor_interval`` (int to fix ``T_per``),
            ``rotate``, ``expand_window``, ``sparsity_scale``, ``block_size`` (None: frame blocks),
            ``sp_world`` (sequence-parallel ranks, adds boundary guards), ``approximation`` (``"drop"``;
            or PASA's approximation of the blocks a row does not keep, :mod:`.approximation`).
    """
    return _plan(geometry, check_geometry(geometry, num_heads), check_step(step), check_layer(layer),
                 params_from(LVSAParams, METHOD, params))


def _plan(geometry: VideoGeometry, num_heads: int, step: int, layer: Any, p: LVSAParams,
          shared: bool = False) -> BlockMask:
    """The mask at ``step``; ``shared``: one a session returns at every layer and step with the same anchors, whose
    ``meta`` then records no layer or step, only the step that built it (``planned_at_step``)."""
    pattern = _pattern(geometry, step, p)
    frame_map = pattern.attended()
    offsets = geometry.block_offsets(None)
    blocks = len(offsets) - 1
    block_map = np.ones((blocks, blocks), dtype=bool)          # text rows and text columns: dense
    video = geometry.block_frames(offsets) >= 0
    block_map[np.ix_(video, video)] = frame_map
    block_map &= causal.visible_map(geometry, offsets)         # frame-causal geometries: no later causal block
    fine = offsets if p.block_size is None else fixed_block_offsets(geometry, num_heads, p.block_size)
    indptr, indices = _covering_lists(block_map, offsets, fine)
    when = {"layer": None, "step": None, "planned_at_step": step} if shared else {"layer": layer, "step": step}
    meta = {"method": METHOD, "paper": PAPER, **when, "params": vars(p),
            "geometry": geometry_meta(geometry), "anchor_interval": pattern.anchor_interval,
            "anchors": pattern.anchors.tolist(), "dense": pattern.dense}
    one = BlockMask.unchecked(1, fine, fine, indptr[None], indices, np.array([len(indices) / (len(fine) - 1) ** 2]),
                              meta)                                # valid by construction (_covering_lists)
    mask = repeated_heads(one, num_heads)
    return mask if pattern.dense else with_unselected(mask, unselected_of(p.approximation, 32), geometry)


class LVSASession:
    """Per-run LVSA state: the mask of the current anchors, shared by every layer.

    LVSA needs no per-layer cache (the pattern depends on the step only); the session keeps the current mask of each
    of the :data:`GEOMETRIES_KEPT` geometries (and head shards) last used, so each step builds at most one mask a
    geometry, steps with the same anchors share it, and the compile cache uploads it to the device once. A new rotation
    replaces a geometry's mask: an earlier rotation's is not kept, as each can keep its device lists.
    """

    method = METHOD

    def __init__(self, num_steps: int, **params: Any) -> None:
        self.num_steps = check_num_steps(num_steps)
        self.params = params_from(LVSAParams, METHOD, params)
        self._masks = LruMemo(GEOMETRIES_KEPT)            # (geometry, heads, shard) -> (anchors, mask)

    def action(self, geometry: VideoGeometry, step: int, layer: int | None = None) -> StepAction:
        """Dense when the video fits the training horizon (every frame an anchor), else the frame pattern."""
        check_step(step, self.num_steps)
        check_geometry(geometry, 1)
        check_causal(unselected_of(self.params.approximation, 32), geometry)   # at any step, as plan() does
        if _pattern(geometry, step, self.params).dense:
            return StepAction("dense", dense=True, plans=False)
        return StepAction("plan", dense=False, plans=True, shared=True)

    def plan(self, geometry: VideoGeometry, num_heads: int, *, step: int, layer: int | None = None,
             q: Any = None, k: Any = None, lse: Any = None, mass: Any = None,
             heads: HeadShard | None = None) -> BlockMask:
        """The mask at ``step`` (``heads``: only this shard's heads, see :class:`~.contract.HeadShard`): one object for
        every layer and every step with the same anchors, so its ``meta`` names neither (``planned_at_step``: the step
        that built it)."""
        check_step(step, self.num_steps)
        shard = check_shard(heads, check_geometry(geometry, num_heads))
        anchors = tuple(_pattern(geometry, step, self.params).anchors.tolist())
        where = (geometry, num_heads, shard.start, shard.stop)
        built, mask = self._masks.get(where, lambda: self._build(geometry, shard, step, anchors))
        if built != anchors:                                        # a new rotation replaces this geometry's mask
            built, mask = self._build(geometry, shard, step, anchors)
            self._masks.put(where, (built, mask))
        return mask

    def _build(self, geometry: VideoGeometry, shard: HeadShard, step: int,
               anchors: tuple[int, ...]) -> tuple[tuple[int, ...], BlockMask]:
        return anchors, _plan(geometry, shard.size, step, None, self.params, shared=True)    # every head alike


def session(num_steps: int = 50, **params: Any) -> LVSASession:
    """An :class:`LVSASession` for a run of ``num_steps`` denoising steps."""
    return LVSASession(num_steps, **params)


def _covering_lists(block_map: np.ndarray, coarse: np.ndarray, fine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One head's CSR lists (int32 ``indptr [MB + 1]``, ``indices``) of the smallest mask on the blocks ``fine``
    (offsets) that covers the square bool map ``block_map`` on the blocks ``coarse`` (offsets of the same tokens):
    fine pair (i, j) is kept when any coarse pair it overlaps is.

    Never a dense fine map (2,950^2 entries at Wan 6x in 64-token blocks): consecutive fine blocks that overlap the
    same coarse blocks (a *run*; about 230 there) have the same row and column, so the map is built on runs (the
    OR of the coarse rows, then columns, that a run overlaps: differences of prefix sums) and each kept run pair
    written as the run's range of fine block ids. Rows are sorted, unique and in range by construction."""
    first = np.searchsorted(coarse, fine[:-1], side="right") - 1
    last = np.searchsorted(coarse, fine[1:], side="left") - 1
    starts_run = np.ones(len(first), dtype=bool)
    starts_run[1:] = (first[1:] != first[:-1]) | (last[1:] != last[:-1])
    run_begin = np.flatnonzero(starts_run)                               # each run's first fine block
    run_width = np.diff(np.append(run_begin, len(first)))
    run_of_block = np.cumsum(starts_run) - 1
    run_first, run_last = first[run_begin], last[run_begin]                # the coarse blocks each run overlaps
    row_sums = np.zeros((block_map.shape[0] + 1, block_map.shape[1]), dtype=np.int32)
    np.cumsum(block_map, axis=0, out=row_sums[1:])
    run_rows = row_sums[run_last + 1] > row_sums[run_first]                # [runs, coarse blocks]
    col_sums = np.zeros((len(run_begin), block_map.shape[1] + 1), dtype=np.int32)
    np.cumsum(run_rows, axis=1, out=col_sums[:, 1:])
    run_map = col_sums[:, run_last + 1] > col_sums[:, run_first]           # [runs, runs]
    _, kept_column_runs = np.nonzero(run_map)                             # row by row, ascending
    runs_kept = run_map.sum(axis=1)
    first_kept = np.cumsum(runs_kept) - runs_kept
    segment_runs = kept_column_runs[_ranges(first_kept[run_of_block], runs_kept[run_of_block])]  # fine row by row
    counts = (run_map @ run_width)[run_of_block]                           # fine blocks each fine row keeps
    indptr = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    return indptr.astype(np.int32), _ranges(run_begin[segment_runs], run_width[segment_runs])


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """int32 ``concatenate([arange(s, s + n) for s, n in zip(starts, lengths)])`` (``n >= 0``) without a Python
    loop: a running sum of ones that jumps where each nonempty range begins."""
    ends = np.cumsum(lengths)
    out = np.ones(int(ends[-1]) if len(ends) else 0, dtype=np.int32)
    nonempty = lengths > 0
    starts, lengths = starts[nonempty], lengths[nonempty]
    if len(starts):                                     # a range's first value less the last value of the one before
        out[ends[nonempty] - lengths] = starts - np.concatenate([[0], starts[:-1] + lengths[:-1] - 1])
    return np.cumsum(out, dtype=np.int32, out=out)
