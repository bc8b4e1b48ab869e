"""Sliding Tile Attention's window search on a running model (``handle.search_windows``).

While a search is on, every self-attention call runs the model's own dense attention (as FastVideo's search runs full
attention, so the generation follows the dense trajectory); at the chosen (layer, step) calls each candidate window's
STA kernel also runs on the same q, k, v in tile order, and each head's squared error against the dense output is
added up on the device. :meth:`WindowSearch.errors` reads the means once (FastVideo's ``L2_loss``: mean over tokens
and head dim, then over the samples: prompts, runs and guidance branches, a batch of B counting B),
:meth:`WindowSearch.strategy` keeps each head's best candidate (:func:`sparsecore.methods.sta_search.choose_windows`)
and :meth:`WindowSearch.save` writes FastVideo's json for ``apply(..., method="sta", mask_strategy=path)``.

A searched call costs the model's dense attention, one gather of q, k, v and the output into tile order and one
sparse kernel per candidate (its one-head mask, every head folded into the batch: compiled once per geometry). It
runs on one process holding every head and the whole sequence (not under context parallelism), on bidirectional
models (STA's refusal of frame-causal geometries).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch

from sparsecore.geometry import VideoGeometry
from sparsecore.ir.validation import check_index
from sparsecore.methods import sta
from sparsecore.methods.contract import check_bidirectional
from sparsecore.methods.sta_search import check_candidates, choose_windows, save_strategy
from sparsecore.methods.sta_strategy import MaskStrategy

from .audit import make_audit

KERNELS_KEPT = 16       # geometries whose candidates' one-head kernels are kept (text lengths of HunyuanVideo 1.5)


class WindowSearch:
    """One search's candidates, the calls it measures and its sums (module docstring). Made by
    ``handle.search_windows``; ``compiled(mask)`` compiles a mask for the handle's device and backend."""

    def __init__(self, candidates: Sequence[Any], tile: tuple[int, int, int], num_layers: int, num_steps: int,
                 compiled: Callable[[Any], Any], layers: Iterable[int] | None = None,
                 steps: Iterable[int] | None = None) -> None:
        self.candidates = check_candidates(candidates)
        self.tile = tile
        self.wanted = make_audit(layers, steps, num_layers, num_steps)
        self.num_layers, self.num_steps = num_layers, num_steps
        self.grid: tuple[int, int, int] | None = None         # the tile grid searched (one per search)
        self._compiled: Callable[[Any], Any] | None = compiled
        self._kernels: OrderedDict[VideoGeometry, list[Any]] = OrderedDict()
        self._sums: torch.Tensor | None = None                # [steps, layers, candidates, heads] float64
        self._samples = np.zeros((num_steps, num_layers), dtype=np.int64)

    @property
    def calls(self) -> int:
        """Samples measured so far (a call of a batch of B counts B)."""
        return int(self._samples.sum())

    def close(self) -> None:
        """Drop the candidates' kernels (device memory); the sums stay readable. ``handle.remove()``, a new search
        and ``search_windows(None)`` call it."""
        self._kernels.clear()
        self._compiled = None

    def attend(self, layer: int, geometry: VideoGeometry, step: int, query: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor, heads_shard: Any, dense: Callable[[], torch.Tensor] | None) -> torch.Tensor:
        """The model's dense attention ``[B, S, H, D]`` of one call, the candidates measured where wanted."""
        check_bidirectional(geometry, sta.PATTERN)
        if dense is None or (heads_shard is not None and heads_shard.size != heads_shard.total):
            raise ValueError("handle.search_windows: this call runs under context parallelism, where no process "
                             "holds every head and the whole sequence; search on one GPU")
        if self._compiled is None:
            raise ValueError("handle.search_windows: this search was closed (the handle removed, or another search "
                             "begun); read its results, or start a new one with handle.search_windows(candidates)")
        self._check_grid(sta.tile_grid(geometry, self.tile))
        heads = query.shape[2]
        if self._sums is not None and self._sums.shape[3] != heads:
            raise ValueError(f"handle.search_windows: layer {layer} has {heads} heads, the search began with "
                             f"{self._sums.shape[3]}; search one model")
        if not self.wanted.wants(layer, step):
            return dense()
        out = dense()
        tokens, batch = geometry.tokens, query.shape[0]
        order = sta.token_order(geometry, self.tile)
        q, k, v, ref = (order.gather(t.transpose(1, 2)[:, :, :tokens], 2) for t in (query, key, value, out))
        if k.shape[1] != heads:                      # GQA: each query head searches with its own key head's keys
            k, v = (t.repeat_interleave(heads // t.shape[1], dim=1) for t in (k, v))
        folded = [t.view(batch * heads, 1, tokens, t.shape[3]) for t in (q, k, v)]     # each head a batch row
        squared = partial(torch.linalg.vector_norm, dim=(0, 2, 3),           # per head, no float32 copy; float64
                          dtype=torch.promote_types(ref.dtype, torch.float32))   # models in float64 (cannot narrow)
        errors = torch.zeros(len(self.candidates), heads, dtype=torch.float64, device=query.device)
        for index, kernel in enumerate(self._kernels_for(geometry)):        # a few candidates, not heads
            found = kernel(*folded).view(batch, heads, tokens, ref.shape[3])
            errors[index] = squared(found - ref).double() ** 2 / (tokens * ref.shape[3])     # summed over samples
        if self._sums is None:
            self._sums = torch.zeros(self.num_steps, self.num_layers, len(self.candidates), heads,
                                     dtype=torch.float64, device=query.device)
        self._sums[step, layer] += errors.to(self._sums.device)         # layers on several devices: the first's
        self._samples[step, layer] += batch
        return out

    def _check_grid(self, grid: tuple[int, int, int]) -> None:
        """One grid per search, and candidates that are distinct, sparse windows on it (checked at every call)."""
        if self.grid == grid:
            return
        if self.grid is not None:
            raise ValueError(f"handle.search_windows: this search measures a {self.grid} tile grid and this call's "
                             f"video makes {grid}; a strategy is for one grid: search each resolution apart")
        spans = [tuple(sta.span(n, w) for n, w in zip(grid, window)) for window in self.candidates]
        dense_ones = [w for w, span in zip(self.candidates, spans) if span == grid]
        if dense_ones:
            raise ValueError(f"candidates: {dense_ones} see the whole {grid} tile grid (dense attention, which no "
                             f"window can beat); leave them out (dense_steps gives dense steps), or use "
                             f"sparsecore.methods.sta_search.candidate_windows")
        count = len(spans)
        same = next(((self.candidates[i], self.candidates[j]) for i in range(count) for j in range(i + 1, count)
                     if spans[i] == spans[j]), None)
        if same is not None:
            raise ValueError(f"candidates: {same[0]} and {same[1]} span the same tiles on a {grid} grid (an even side "
                             f"below an axis spans the next odd one, a side past the axis the axis); keep one")
        self.grid = grid

    def _kernels_for(self, geometry: VideoGeometry) -> list[Any]:
        """Each candidate's one-head mask's kernel on ``geometry`` (run on every head folded into the batch), kept
        for :data:`KERNELS_KEPT` geometries."""
        if geometry not in self._kernels:
            self._kernels[geometry] = [self._compiled(sta.plan(geometry, 1, window=window, tile=self.tile))
                                       for window in self.candidates]
            if len(self._kernels) > KERNELS_KEPT:
                self._kernels.popitem(last=False)
        self._kernels.move_to_end(geometry)
        return self._kernels[geometry]

    def errors(self) -> np.ndarray:
        """Mean squared error ``[steps, layers, candidates, heads]`` (float64) of each candidate's output against the
        dense output, over the samples measured; NaN where a (step, layer) was not measured. One host read."""
        if self._sums is None:
            raise ValueError("handle.search_windows: no call was measured yet; run the pipeline (a few prompts) "
                             "with the search on first")
        samples = self._samples[:, :, None, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(samples > 0, self._sums.cpu().numpy() / samples, np.nan)

    def strategy(self, dense_steps: int = 0) -> MaskStrategy:
        """Each head's candidate of least error from ``dense_steps`` on, the whole grid before (FastVideo's rule)."""
        errors = self.errors()
        dense_steps = check_index(dense_steps, "dense_steps", len(errors) + 1)      # steps before it keep the grid
        broken = np.argwhere((self._samples[dense_steps:] > 0) & ~np.isfinite(errors[dense_steps:]).all(axis=(2, 3)))
        if len(broken):
            step, layer = broken[0] + (dense_steps, 0)
            raise ValueError(f"handle.search_windows: step {step} layer {layer} measured a non-finite error: the "
                             f"model's q, k, v or its dense output held inf or NaN there (in float16, an overflow); "
                             f"search in bfloat16, or leave that step out (steps=, or a higher dense_steps)")
        return choose_windows(errors, self.candidates, self.grid, dense_steps)

    def save(self, path: Any, dense_steps: int = 0) -> MaskStrategy:
        """:meth:`strategy` written to ``path`` as FastVideo's json; returns it."""
        strategy = self.strategy(dense_steps)
        save_strategy(strategy, path)
        return strategy

    def __repr__(self) -> str:
        return (f"WindowSearch(candidates={list(self.candidates)}, tile={self.tile}, grid={self.grid}, "
                f"calls={self.calls})")
