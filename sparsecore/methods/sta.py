"""Sliding Tile Attention (STA): a 3D window of whole tiles, on the tokens put tile by tile.

Paper: "Fast Video Generation with Sliding Tile Attention", Zhang et al., arXiv 2502.04507. Code: FastVideo
(hao-ai-lab/FastVideo) up to 37cab18, the last commit before STA left it: ``fastvideo/attention/backends/
sliding_tile_attn.py`` (tile order, mask strategy), ``fastvideo-kernel``'s ThunderKittens and Triton kernels and its
FlexAttention mask (the window), ``STA_configuration.py`` (the offline search).

- **Tiles.** The latent video (``frames x height x width`` tokens, frame-major) is cut into tiles of ``tile`` tokens
  along (frames, rows, columns), (6, 8, 8) = 384 tokens as released. The tokens are put in tile order
  (:func:`token_order`: tiles frame-major, then row, then column; each tile's tokens in raster order, as FastVideo's
  ``tile``), and each tile is one block of the mask, which is over that order: the diffusers integration gathers
  q, k, v into it and the output back (:class:`sparsecore.ordering.TokenOrder`).
- **Window.** A query tile sees the key tiles of a ``window`` of tiles along each axis, centred on it and shifted
  inward at the grid's edges so it keeps its size: on an axis of ``n`` tiles with ``r = w // 2``, query tile ``q``
  sees key tile ``j`` where ``|clamp(q, r, n - 1 - r) - j| <= r``; a window of ``n`` tiles or more sees the whole
  axis. As in FastVideo's kernels, an even window below ``n`` spans ``w + 1`` tiles.
- **Text** (joint attention): video rows see every text token, text rows see everything, as FastVideo's mask.
- **Windows per step, layer and head**: ``mask_strategy``, FastVideo's format (a mapping or a json file of
  ``"step_layer_head": [wt, wh, ww]``; its offline search's output, e.g. ``assets/mask_strategy_hunyuan.json``), or
  one ``window`` for every head, layer and step. Steps below ``dense_steps``, and steps and layers whose windows all
  cover the grid (FastVideo's files write dense steps so), run dense attention.

Where FastVideo refuses or is silent: it takes only grids that are a multiple of the tile (and three fixed
sequence lengths); here the tiles on the grid's far edges may be short (blocks of fewer tokens, which every
lowering runs exactly). Frame-causal geometries are refused (tiles span frames). The offline search is reproduced
for any grid (:mod:`.sta_search`, ``handle.search_windows`` in the diffusers integration). A strategy's session also
gives each (step, layer) as one-head masks of its distinct windows (:meth:`STASession.head_groups`), so a window's
kernel is compiled once rather than every call's mask.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from sparsecore.geometry import VideoGeometry
from sparsecore.ir import BlockMask, csr
from sparsecore.ir.head_meta import PER_HEAD_KEYS
from sparsecore.ir.memo import LruMemo
from sparsecore.ir.validation import INDEX_LIMIT, check_int, frozen
from sparsecore.ordering import TokenOrder

from .contract import (HeadShard, StepAction, check_bidirectional, check_geometry, check_layer, check_num_steps,
                       check_one_off_step, check_shard, check_sparse_steps, check_step, geometry_meta, params_from)
from .selection import dense_mask
from .sta_strategy import read_strategy, triple

METHOD = "sta"
PAPER = "arXiv:2502.04507"
PATTERN = "Sliding Tile Attention's tiles span frames both ways"     # why frame-causal geometries are refused
MASKS_KEPT = 4        # masks a session keeps (each holds its device copy): one window's, or a strategy's latest
WINDOW_MASKS_KEPT = 16     # at least: a strategy's one-head masks, one per window and geometry (a few KiB each)


@dataclass(frozen=True)
class STAParams:
    """Sliding Tile Attention's parameters, checked once; see the module docstring.

    ``window``: key tiles along (frames, rows, columns) every head sees (FastVideo's search candidates for Wan 2.1
    include (3, 3, 3)); ``tile``: tokens of a tile along those axes ((6, 8, 8) as released); ``mask_strategy``:
    windows per step, layer and head (FastVideo's mapping or json file), which replace ``window``; ``dense_steps``:
    the first steps run dense attention.
    """

    window: tuple[int, int, int] = (3, 3, 3)
    tile: tuple[int, int, int] = (6, 8, 8)
    mask_strategy: Any = None
    dense_steps: int = 0

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "window", triple(self.window, "window"))
        set_(self, "tile", triple(self.tile, "tile"))
        if self.mask_strategy is not None:
            set_(self, "mask_strategy", read_strategy(self.mask_strategy))
        set_(self, "dense_steps", check_int(self.dense_steps, "dense_steps", 0))

    @property
    def approximation(self) -> str:
        """What rows get from the blocks they do not keep: nothing (STA drops them)."""
        return "drop"

    @property
    def token_order(self) -> str:
        """The token order the masks are over (the integrations read it to refuse ring attention up front)."""
        return f"tiles of {self.tile[0]}x{self.tile[1]}x{self.tile[2]} tokens"

    def summary(self) -> dict[str, Any]:
        """The parameters for a mask's ``meta`` (a strategy by its size, not its entries)."""
        strategy = self.mask_strategy
        return {"window": self.window, "tile": self.tile, "dense_steps": self.dense_steps,
                "mask_strategy": None if strategy is None else f"{len(strategy)} (step, layer) entries"}


def tile_grid(geometry: VideoGeometry, tile: tuple[int, int, int]) -> tuple[int, int, int]:
    """Tiles along (frames, rows, columns): ``ceil(size / tile)`` each (the last tile of an axis may be short)."""
    return tuple(-(-size // t) for size, t in zip((geometry.frames, geometry.height, geometry.width), tile))


def token_order(geometry: VideoGeometry, tile: Any = (6, 8, 8)) -> TokenOrder:
    """The tile order of ``geometry``'s tokens (text stays where it is); one object per (geometry, tile) while it
    is among the 16 last asked for. It keeps its last used device copies of the index (8 bytes a token; at most
    ``ordering.DEVICE_COPIES_KEPT``, by direction, device and sequence length) as long as it lives."""
    if not isinstance(geometry, VideoGeometry):
        raise TypeError(f"geometry: expected a sparsecore.VideoGeometry, got {type(geometry).__name__}")
    return _token_order(geometry, triple(tile, "tile"))


@lru_cache(maxsize=16)
def _token_order(geometry: VideoGeometry, tile: tuple[int, int, int]) -> TokenOrder:
    t, y, x = geometry.video_positions().T
    video = np.lexsort((x, y, t, x // tile[2], y // tile[1], t // tile[0]))       # last key sorts first
    index = np.arange(geometry.tokens)
    index[geometry.video_slice] = geometry.video_start + video
    return TokenOrder(index, f"STA tiles {tile[0]}x{tile[1]}x{tile[2]} of {geometry}")


@lru_cache(maxsize=16)
def tile_offsets(geometry: VideoGeometry, tile: tuple[int, int, int]) -> np.ndarray:
    """Block boundaries over the tile-ordered sequence (int64, read-only): one block a tile, then text blocks of a
    tile's token count (before the video where the text comes first)."""
    sizes = [np.diff(np.minimum(np.arange(0, -(-n // t) * t + 1, t), n)) for n, t in
             zip((geometry.frames, geometry.height, geometry.width), tile)]          # tokens of each tile on an axis
    video = np.einsum("i,j,k->ijk", *sizes).ravel()
    text = np.diff(np.append(np.arange(0, geometry.text_tokens, math.prod(tile)), geometry.text_tokens))
    text = text[text > 0]
    blocks = np.concatenate([text, video] if geometry.text_position == "start" else [video, text])
    return frozen(np.concatenate([[0], np.cumsum(blocks)]).astype(np.int64))


def span(tiles: int, window: int) -> int:
    """Key tiles a query tile sees along an axis of ``tiles`` tiles: the window's, the next odd one for an even window
    below the axis, the axis past it (windows of one span make one mask)."""
    return tiles if window >= tiles else 2 * (window // 2) + 1


def head_spans(windows: Any, grid: tuple[int, int, int]) -> np.ndarray:
    """int64 ``[heads, 3]``: :func:`span` of every head's window (``[heads, 3]``) along each axis of ``grid``, at once
    (an even window's next odd one is at most the axis: ``min(n, 2 (w // 2) + 1)``)."""
    return np.minimum(np.asarray(grid), np.asarray(windows, dtype=np.int64).reshape(-1, 3) // 2 * 2 + 1)


def axis_window(tiles: int, window: int) -> np.ndarray:
    """bool ``[tiles, tiles]``: query tile ``q`` sees key tile ``j`` along one axis (module docstring)."""
    if window >= tiles:
        return np.ones((tiles, tiles), dtype=bool)
    r = window // 2
    centre = np.clip(np.arange(tiles), r, tiles - 1 - r)
    return np.abs(centre[:, None] - np.arange(tiles)[None, :]) <= r


@lru_cache(maxsize=64)
def video_block_map(grid: tuple[int, int, int], window: tuple[int, int, int]) -> np.ndarray:
    """bool ``[NT, NT]`` over the tiles in tile order (``NT = prod(grid)``), read-only."""
    t, h, w = (axis_window(n, k) for n, k in zip(grid, window))
    return frozen(np.kron(t, np.kron(h, w)))


def check_blocks(geometry: VideoGeometry, tile: tuple[int, int, int], num_heads: int) -> None:
    """A mask of ``num_heads`` heads on these tiles fits the IR's int32 lists (checked before anything in proportion
    is built: a plan builds ``blocks^2`` maps per distinct window)."""
    text = -(-geometry.text_tokens // math.prod(tile))
    blocks = math.prod(tile_grid(geometry, tile)) + text
    if num_heads * blocks ** 2 > INDEX_LIMIT:
        raise ValueError(f"tile: {tile} cuts {geometry} into {blocks:,} blocks, and {num_heads} heads x {blocks:,}^2 "
                         f"block pairs exceed the int32 index limit {INDEX_LIMIT:,}; use larger tiles ((6, 8, 8) as "
                         f"released) or plan fewer heads at a time (heads=HeadShard(...))")


def covers_grid(windows: Any, grid: tuple[int, int, int]) -> bool:
    """Every head's window spans every tile of every axis (an even window of ``n - 1`` tiles spans ``n``)."""
    return bool((head_spans(windows, grid) == np.asarray(grid)).all())


def plan(geometry: VideoGeometry, num_heads: int, *, step: int = 0, layer: int | None = None, q: Any = None,
         k: Any = None, heads: HeadShard | None = None, **params: Any) -> BlockMask:
    """The STA mask over :func:`token_order`'s order (``q``, ``k`` unused), or at a step below ``dense_steps``, as
    the session's action says, a dense mask (frame-sized blocks: the same attention in any token order);
    ``**params``: :class:`STAParams` fields. Run it on q, k, v gathered into that order and scatter the output back."""
    step, layer = check_one_off_step(step), check_layer(layer)
    p = params_from(STAParams, METHOD, params)                    # a strategy's file read once
    if step < p.dense_steps:
        STASession(step + 1, **vars(p)).action(geometry, step, layer)      # its checks (the strategy's layer, tiles)
        shard = check_shard(heads, check_geometry(geometry, num_heads))
        return dense_mask(geometry, shard.size, {"method": METHOD, "paper": PAPER, "layer": layer, "step": step,
                                                 "action": "dense", "params": p.summary(),
                                                 "geometry": geometry_meta(geometry)})
    one_step = STASession(step + 1, **{**vars(p), "dense_steps": step})   # a strategy needs windows for this step only
    one_step.params = p                                                  # its masks' meta: the dense_steps asked for
    return one_step.plan(geometry, num_heads, step=step, layer=layer, heads=heads)


class STASession:
    """One run: dense at the first ``dense_steps`` steps and where every head's window covers the grid, else the
    mask of the (step, layer)'s windows over the tile order."""

    method = METHOD

    def __init__(self, num_steps: int, **params: Any) -> None:
        self.num_steps = check_num_steps(num_steps)
        self.params = params_from(STAParams, METHOD, params)
        self._masks = LruMemo(MASKS_KEPT)                                  # (geometry, head windows) -> mask
        self._warned_grids: set[tuple[int, int, int]] = set()             # grids a gridless strategy warned of
        strategy, first = self.params.mask_strategy, self.params.dense_steps
        self._window_masks = LruMemo(WINDOW_MASKS_KEPT if strategy is None else      # one-head masks (head_groups):
                                     max(WINDOW_MASKS_KEPT, len(strategy.windows)))  # every window of one geometry
        if strategy is not None and first < self.num_steps:           # work in the strategy's steps, not num_steps
            listed = sorted(step for step in strategy.steps if first <= step < self.num_steps)
            if len(listed) != self.num_steps - first:
                gap = next((first + i for i, step in enumerate(listed) if step != first + i), first + len(listed))
                raise ValueError(f"mask_strategy: expected windows for every step from dense_steps={first} to "
                                 f"num_steps={self.num_steps}, got none for step {gap}; pass a strategy written for "
                                 f"{self.num_steps} steps or raise dense_steps")

    def windows(self, step: int, layer: int | None) -> tuple[tuple[int, int, int], ...]:
        """The (step, layer)'s windows: one per head from the mask strategy, else ``(window,)`` for every head."""
        strategy = self.params.mask_strategy
        if strategy is None:
            return (self.params.window,)
        self._check_strategy_layer(layer)
        found = strategy.get((step, layer))
        if found is None:
            raise ValueError(f"mask_strategy: no windows for step {step} (keys 'step_layer_head'); pass a strategy "
                             f"written for this number of steps")
        return found

    def _check_strategy_layer(self, layer: int | None) -> None:
        strategy = self.params.mask_strategy
        if strategy is None:
            return
        if layer is None:
            raise ValueError("layer: a mask strategy gives windows per layer, got layer=None; pass the layer's index")
        if layer not in strategy.layers:
            raise ValueError(f"mask_strategy: no windows for layer {layer}, the strategy has {len(strategy.layers)} "
                             f"layers (keys 'step_layer_head'); pass a strategy written for this model")

    def _strategy_grid(self, geometry: VideoGeometry) -> tuple[int, int, int]:
        """``geometry``'s tile grid, refused where the strategy was searched on another: its dense steps are written
        as the whole searched grid (FastVideo's rule), a sparse window on a larger grid, and its windows were chosen
        by their error on that grid. A strategy that does not record its grid (FastVideo's json) warns, once a grid,
        where its widest window, which its first steps give every head as such files write their dense steps, does
        not cover the grid and some of those steps are not dense by ``dense_steps``: they run sparse here."""
        grid = tile_grid(geometry, self.params.tile)
        strategy = self.params.mask_strategy
        if strategy is None:
            return grid
        if strategy.grid is not None and strategy.grid != grid:
            raise ValueError(f"mask_strategy: expected the {strategy.grid} tile grid the strategy was searched on (its "
                             f"dense steps are that whole grid), got {geometry}, a {grid} grid of {self.params.tile} "
                             f"tiles; search the windows at this resolution (handle.search_windows) and pass that "
                             f"strategy, or run this video at the searched resolution")
        steps = [step for step in strategy.whole_grid_steps if self.params.dense_steps <= step < self.num_steps]
        if strategy.grid is None and steps and not covers_grid([strategy.widest], grid) \
                and grid not in self._warned_grids:
            self._warned_grids.add(grid)
            warnings.warn(f"mask_strategy: steps {steps[0]}..{steps[-1]} give every head the strategy's widest window "
                          f"{strategy.widest}, as FastVideo writes the dense steps of a {strategy.widest} tile grid, "
                          f"but {geometry} is a {grid} grid of {self.params.tile} tiles, which that window does not "
                          f"cover: those steps run sparse here; search the windows at this resolution "
                          f"(handle.search_windows), run the resolution the strategy was written for, or pass "
                          f"dense_steps={steps[-1] + 1} to run them dense", RuntimeWarning, stacklevel=3)
        return grid

    def action(self, geometry: VideoGeometry, step: int, layer: int | None = None) -> StepAction:
        """Dense at the dense steps and where every window covers the grid, else the mask over the tile order."""
        check_step(step, self.num_steps)
        layer = check_layer(layer)
        check_geometry(geometry, 1)
        check_bidirectional(geometry, PATTERN)
        check_blocks(geometry, self.params.tile, 1)
        self._check_strategy_layer(layer)                  # a layer the strategy lacks: refused at step 0
        grid = self._strategy_grid(geometry)
        if step < self.params.dense_steps or covers_grid(self.windows(step, layer), grid):
            return StepAction("dense", dense=True, plans=False)
        uniform = self.params.mask_strategy is None       # one mask for every layer, else one per (step, layer),
        return StepAction("plan", dense=False, plans=True, shared=uniform, per_call=not uniform,   # run per window
                          head_groups=not uniform, token_order=token_order(geometry, self.params.tile))

    def plan(self, geometry: VideoGeometry, num_heads: int, *, step: int, layer: int | None = None,
             q: Any = None, k: Any = None, lse: Any = None, mass: Any = None,
             heads: HeadShard | None = None) -> BlockMask:
        """The mask of this (step, layer) for ``heads`` (a :class:`~.contract.HeadShard`; all by default), over the
        tile order; masks of the same windows are one object."""
        check_step(step, self.num_steps)
        layer = check_layer(layer)
        shard = check_shard(heads, check_geometry(geometry, num_heads))
        check_bidirectional(geometry, PATTERN)
        windows = self.windows(step, layer)
        if self.params.mask_strategy is None:
            windows = windows * num_heads
        elif len(windows) != num_heads:
            raise ValueError(f"mask_strategy: step {step} layer {layer} gives {len(windows)} heads' windows, the "
                             f"model has {num_heads} heads; pass a strategy written for this model")
        grid = self._strategy_grid(geometry)
        windows = tuple(map(tuple, head_spans(windows[shard.start:shard.stop], grid).tolist()))
        check_blocks(geometry, self.params.tile, len(windows))
        return self._masks.get((geometry, windows), lambda: self._heads_mask(geometry, windows))

    def head_groups(self, geometry: VideoGeometry, mask: BlockMask) -> list[tuple[BlockMask, np.ndarray]]:
        """``mask``'s (a mask :meth:`plan` returned on ``geometry``) distinct windows as one-head masks, each with the
        heads (an int array, counted from the mask's first) that have it: ``StepAction.head_groups``. The session
        keeps as many one-head masks as its strategy has windows (at least :data:`WINDOW_MASKS_KEPT`), so a window's
        mask (and the kernel compiled for it) serves every layer and step of the run."""
        distinct, which = np.unique(np.array(mask.meta["head_windows"]), axis=0, return_inverse=True)
        which = which.ravel()
        members = np.split(np.argsort(which, kind="stable"), np.cumsum(np.bincount(which))[:-1])
        return [(self._window_mask(geometry, tuple(window)), heads_of)
                for window, heads_of in zip(distinct.tolist(), members)]             # a few windows, not heads

    def _window_mask(self, geometry: VideoGeometry, window: tuple[int, int, int]) -> BlockMask:
        """The one-head mask of ``window`` (in tiles each axis spans) on ``geometry``, kept by the session."""
        return self._window_masks.get((geometry, window), lambda: self._build(geometry, window))

    def _heads_mask(self, geometry: VideoGeometry, windows: tuple[tuple[int, int, int], ...]) -> BlockMask:
        """The mask of these per-head windows: each head's lists copied from its window's one-head mask (valid by
        construction, so not checked again), work in proportion to the lists rather than to ``blocks^2`` per window:
        a strategy's (step, layer) masks are rebuilt whenever the session's last :data:`MASKS_KEPT` turn over."""
        distinct, which = np.unique(np.array(windows), axis=0, return_inverse=True)
        parts = [self._window_mask(geometry, tuple(window)) for window in distinct.tolist()]    # a few, not heads
        ends = np.cumsum([0] + [len(part.indices) for part in parts[:-1]])
        indptr, indices = csr.select_heads(np.concatenate([part.indptr + end for part, end in zip(parts, ends)]),
                                           np.concatenate([part.indices for part in parts]), which.ravel())
        budgets = np.concatenate([part.budgets for part in parts])[which.ravel()]
        offsets = parts[0].q_offsets
        return BlockMask.unchecked(len(windows), offsets, offsets, frozen(indptr.astype(np.int32)), frozen(indices),
                                   frozen(budgets), self._meta(geometry, windows))

    def _build(self, geometry: VideoGeometry, window: tuple[int, int, int]) -> BlockMask:
        """The one-head mask of ``window``: every video tile sees its window's tiles, text rows and columns all."""
        tile = self.params.tile
        grid, offsets = tile_grid(geometry, tile), tile_offsets(geometry, tile)
        tiles, blocks = math.prod(grid), len(offsets) - 1
        video = slice(blocks - tiles, blocks) if geometry.text_position == "start" else slice(0, tiles)
        keep = np.ones((blocks, blocks), dtype=bool)
        keep[video, video] = video_block_map(grid, window)
        return BlockMask(1, offsets, offsets, csr.indptr_from_counts(keep.sum(axis=1)[None]), np.nonzero(keep)[1],
                         None, self._meta(geometry, (window,)))

    def _meta(self, geometry: VideoGeometry, windows: tuple[tuple[int, int, int], ...]) -> dict:
        """The mask's record; ``head_windows`` (one per head) follows ``select_heads`` (``per_head_keys``)."""
        return {"method": METHOD, "paper": PAPER, "params": self.params.summary(), "geometry": geometry_meta(geometry),
                "token_order": token_order(geometry, self.params.tile).name, "head_windows": windows,
                PER_HEAD_KEYS: ["head_windows"]}


def session(num_steps: int = 50, **params: Any) -> STASession:
    """An :class:`STASession` for a run of ``num_steps`` denoising steps, refused where ``dense_steps`` leaves no
    sparse step (:func:`.contract.check_sparse_steps`)."""
    run = STASession(num_steps, **params)
    first = run.params.dense_steps
    check_sparse_steps("dense_steps", first, params, min(first, run.num_steps), run.num_steps, run.num_steps - 1)
    return run
