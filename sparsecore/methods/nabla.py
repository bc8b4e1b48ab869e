"""NABLA: adaptive block selection from a pooled attention map, joined with a sliding window of tiles.

Paper: "NABLA: Neighborhood Adaptive Block-Level Attention", Mikhailov et al., arXiv 2507.13546. Kandinsky 5's
NABLA configurations (``attention_type="nabla"``: the 10 s and Pro checkpoints) were trained with it; this module
reproduces them as diffusers 0.42.1 runs them (``transformer_kandinsky.nablaT_v2`` for the adaptive part, the
pipelines' ``fast_sta_nabla`` for the window, both joined by ``logical_or``).

Blocks are 8 x 8 tiles of a frame's token grid, 64 tokens each, and the tokens must come tile by tile: frame by
frame, each frame's tiles row by row, each tile's 64 tokens row by row. That is the order Kandinsky 5 gives its
tokens under NABLA (``fractal_flatten``); in raster order 64 consecutive tokens are a strip of a row, not a tile,
and the window would name the wrong blocks, so the integration refuses models without that order.

Per call, for every head on the call's device (no Python loop over heads or rows):

1. q and k are averaged over each block's 64 tokens, in their own dtype;
2. ``map = softmax(q̄ k̄ᵀ / sqrt(D))`` over a row's key blocks, in that dtype;
3. a row keeps the key blocks whose ascending cumulative share reaches ``1 - threshold``: the smallest blocks
   whose shares sum below ``1 - threshold`` are dropped (the rest carry at least ``threshold`` of the map's mass);
4. the window adds every block within ``window // 2`` frames, tile rows and tile columns of the query's block.

The same torch operations as diffusers', in the same dtype, give the same masks (the CPU tests compare them).
Where diffusers is silent or differs:

- diffusers makes one mask a sample; so does the diffusers integration, which plans and runs each sample of a batch
  apart (``StepAction.per_sample``). :func:`plan` called directly on a batch returns one mask per head, the union of
  the samples' masks.
- Under ``torch.compile`` q and k come from inductor's kernels and may differ from eager ones in their last bits, so a
  block whose cumulative share sits at the threshold may flip between eager and compiled runs (as it may between
  diffusers' own eager and compiled NABLA).
- Grouped-query attention: each query head reads its key head's means (diffusers' function takes equal counts).
- Text tokens and frame-causal attention are refused (NABLA's blocks are video tiles).

The number of kept blocks sizes the mask's lists, so planning reads one count back to the host per call
(:func:`sparsecore.ir.csr.from_block_map`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from sparsecore.geometry import VideoGeometry
from sparsecore.ir import BlockMask, csr
from sparsecore.ir.memo import LruMemo

from .contract import (HeadShard, StepAction, check_fraction, check_geometry, check_layer, check_num_steps,
                       check_one_off_step, check_qk, check_shard, check_step, check_video_count, fixed_block_offsets,
                       geometry_meta, params_from)

METHOD = "nabla"
PAPER = "arXiv:2507.13546"
TILE = 8                           # a block is TILE x TILE tokens of one frame
BLOCK_TOKENS = TILE * TILE
WINDOWS_KEPT = 8                   # window maps a session keeps (bool [NB, NB] on a device each): a pipeline's few
                                   # geometries, not every resolution a long-running server has seen


@dataclass(frozen=True)
class NablaParams:
    """NABLA's parameters, checked once.

    ``threshold``: the share of each row's pooled attention map its adaptive blocks carry at least (``P``; 0.9,
    ``nablaT_v2``'s default). ``window``: the sliding window in blocks along frames, tile rows and tile columns
    (``(wT, wH, wW)``; (3, 3, 3), ``fast_sta_nabla``'s default): a block sees those within ``w // 2`` of it on every
    axis. On a Kandinsky 5 NABLA configuration ``apply`` takes both from the model's config (``attention_P``,
    ``attention_wT``, ``attention_wH``, ``attention_wW``) unless given.
    """

    threshold: float = 0.9
    window: tuple[int, int, int] = (3, 3, 3)

    def __post_init__(self) -> None:
        object.__setattr__(self, "threshold", check_fraction(self.threshold, "threshold"))
        window = self.window
        if isinstance(window, (str, bytes)) or not hasattr(window, "__len__") or len(window) != 3:
            raise TypeError(f"window: expected three ints (frames, tile rows, tile columns), got {window!r}")
        object.__setattr__(self, "window", tuple(check_video_count(w, f"window[{i}]", 1, unit="blocks")  # int64 maps
                                                 for i, w in enumerate(window)))

    @property
    def approximation(self) -> str:
        """What rows get from the blocks they do not keep: nothing (NABLA drops them)."""
        return "drop"

    def meta(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "window": list(self.window)}


def check_tiles(geometry: VideoGeometry) -> None:
    """NABLA's blocks are 8 x 8 tiles of video frames: refuse geometries without whole tiles, text or causal frames."""
    if geometry.height % TILE or geometry.width % TILE:
        raise ValueError(f"geometry: NABLA's blocks are {TILE} x {TILE} tiles of a frame, got a {geometry.height} x "
                         f"{geometry.width} token grid; use a height and width (after patchify) divisible by {TILE}")
    if geometry.text_tokens or geometry.causal_frames:
        raise ValueError(f"geometry: NABLA plans video tiles only, got {geometry.text_tokens} text tokens and "
                         f"causal_frames={geometry.causal_frames}; use another method for joint or frame-causal "
                         f"attention")


def window_map(geometry: VideoGeometry, window: tuple[int, int, int], device: Any) -> torch.Tensor:
    """The sliding window as a bool ``[NB, NB]`` block map: query block ``i`` sees key block ``j`` where their frames,
    tile rows and tile columns are each within ``w // 2`` (``fast_sta_nabla``'s mask)."""
    rows, cols = geometry.height // TILE, geometry.width // TILE
    block = torch.arange(geometry.frames * rows * cols, device=device)
    near = None
    for coordinate, w in zip((block // (rows * cols), block // cols % rows, block % cols), window):
        axis = (coordinate[:, None] - coordinate[None, :]).abs() <= w // 2
        near = axis if near is None else near & axis
    return near


def adaptive_map(q: torch.Tensor, k: torch.Tensor, threshold: float) -> torch.Tensor:
    """Each row's adaptive blocks, bool ``[B, H, NB, NB]`` from ``q [B, H, L, D]``, ``k [B, H_kv, L, D]``
    (``L`` a multiple of 64): ``nablaT_v2``'s map and cut in its dtype and order of operations."""
    batch, heads, length, dim = q.shape
    blocks = length // BLOCK_TOKENS
    q_means = q.contiguous().reshape(batch, heads, blocks, BLOCK_TOKENS, dim).mean(-2)
    k_means = k.contiguous().reshape(batch, k.shape[1], blocks, BLOCK_TOKENS, dim).mean(-2)
    k_means = k_means.repeat_interleave(heads // k.shape[1], dim=1)
    shares = torch.softmax((q_means @ k_means.transpose(-2, -1)) / math.sqrt(dim), dim=-1)
    del q_means, k_means
    ascending, order = shares.sort(-1)
    del shares
    kept = ascending.cumsum_(-1) >= 1 - threshold
    return torch.zeros_like(kept).scatter_(-1, order, kept)


def plan(geometry: VideoGeometry, num_heads: int, *, step: int = 0, layer: int | None = None, q: Any = None,
         k: Any = None, heads: HeadShard | None = None, **params: Any) -> BlockMask:
    """The NABLA mask of one call: ``q [B, H, L, D]``, ``k [B, H_kv, L, D]`` in the tile order (module docstring);
    ``heads``: only this :class:`~.contract.HeadShard`'s heads. ``**params``: :class:`NablaParams` fields."""
    step = check_one_off_step(step)
    return NablaSession(step + 1, **params).plan(geometry, num_heads, step=step, layer=layer, q=q, k=k, heads=heads)


class NablaSession:
    """One run: NABLA plans every layer at every step from that call's q and k; the window map is kept per geometry
    and device, for the :data:`WINDOWS_KEPT` last used."""

    method = METHOD

    def __init__(self, num_steps: int, **params: Any) -> None:
        self.num_steps = check_num_steps(num_steps)
        self.params = params_from(NablaParams, METHOD, params)
        self._windows = LruMemo(WINDOWS_KEPT)                    # (geometry, device) -> window map

    def action(self, geometry: VideoGeometry | None, step: int, layer: int | None = None) -> StepAction:
        check_step(step, self.num_steps)
        return StepAction("select", dense=False, plans=True, needs_qk=True, per_call=True, per_sample=True)

    def plan(self, geometry: VideoGeometry, num_heads: int, *, step: int, layer: int | None = None,
             q: Any = None, k: Any = None, lse: Any = None, mass: Any = None,
             heads: HeadShard | None = None) -> BlockMask:
        """The mask at ``(layer, step)`` from this call's q and k (``lse``, ``mass`` unused)."""
        shard = check_shard(heads, check_geometry(geometry, num_heads))
        check_step(step, self.num_steps)
        check_tiles(geometry)
        offsets = fixed_block_offsets(geometry, shard.size, BLOCK_TOKENS)
        q, k = check_qk(q, k, geometry, shard)
        p = self.params
        kept = adaptive_map(q, k, p.threshold).any(dim=0)                          # [H, NB, NB]: union of samples
        kept |= self._window(geometry, q.device)
        num_blocks = len(offsets) - 1
        budgets = kept.sum(dim=(1, 2), dtype=torch.float64) / num_blocks ** 2
        indptr, indices = csr.from_block_map(kept)                                  # one host read: the count
        meta = {"method": METHOD, "paper": PAPER, "layer": check_layer(layer), "step": step, "params": p.meta(),
                "geometry": geometry_meta(geometry), "action": "select"}
        # Valid by construction: nonzero lists each row's kept blocks in order, and the counts are the rows' sums.
        return BlockMask.unchecked(shard.size, offsets, offsets, indptr.to(torch.int32), indices, budgets, meta)

    def _window(self, geometry: VideoGeometry, device: torch.device) -> torch.Tensor:
        return self._windows.get((geometry, str(device)), lambda: window_map(geometry, self.params.window, device))


def session(num_steps: int = 50, **params: Any) -> NablaSession:
    """A :class:`NablaSession` for a run of ``num_steps`` denoising steps."""
    return NablaSession(num_steps, **params)

