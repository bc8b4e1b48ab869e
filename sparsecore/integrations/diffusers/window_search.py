"""Sliding Tile Attention's window search on a running model (``handle.search_windows``).

While a search is on, every self-attention call runs the model's own dense attention (as FastVideo's search runs full
attention, so the generation follows the dense trajectory); at the chosen (layer, step) calls each candidate window's
STA kernel also runs on the same q, k, v in tile order, and each head's squared error against the dense output is
added up on the device. :meth:`WindowSearch.errors` reads the means once (FastVideo's ``L2_loss``: mean over batch,
tokens and head dim, then over the calls: prompts, runs and guidance branches), :meth:`WindowSearch.strategy` keeps
each head's best candidate (:func:`sparsecore.methods.sta_search.choose_windows`) and :meth:`WindowSearch.save`
writes FastVideo's json for ``apply(..., method="sta", mask_strategy=path)``.

A searched call costs the model's dense attention, one gather of q, k, v and the output into tile order and one
sparse kernel per candidate. It runs on one process holding every head and the whole sequence (not under context
parallelism), on bidirectional models (STA's refusal of frame-causal geometries).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch

from sparsecore.geometry import VideoGeometry
from sparsecore.methods import sta
from sparsecore.methods.contract import check_bidirectional
from sparsecore.methods.sta_search import check_candidates, choose_windows, save_strategy

from .audit import make_audit

KERNELS_KEPT = 4            # geometries whose candidate kernels are kept (text lengths of HunyuanVideo 1.5 batches)


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
        self._compiled = compiled
        self._kernels: OrderedDict[tuple[VideoGeometry, int], list[Any]] = OrderedDict()
        self._sums: torch.Tensor | None = None                # [steps, layers, candidates, heads] float64
        self._calls = np.zeros((num_steps, num_layers), dtype=np.int64)

    @property
    def calls(self) -> int:
        """Calls measured so far."""
        return int(self._calls.sum())

    def attend(self, layer: int, geometry: VideoGeometry, step: int, query: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor, heads_shard: Any, dense: Callable[[], torch.Tensor] | None) -> torch.Tensor:
        """The model's dense attention ``[B, S, H, D]`` of one call, the candidates measured where wanted."""
        check_bidirectional(geometry, sta.PATTERN)
        if dense is None or (heads_shard is not None and heads_shard.size != heads_shard.total):
            raise ValueError("handle.search_windows: this call runs under context parallelism, where no process "
                             "holds every head and the whole sequence; search on one GPU")
        if not self.wanted.wants(layer, step):
            return dense()
        grid = sta.tile_grid(geometry, self.tile)
        if self.grid is not None and grid != self.grid:
            raise ValueError(f"handle.search_windows: this search measures a {self.grid} tile grid and this call's "
                             f"video makes {grid}; a strategy is for one grid: search each resolution apart")
        dense_candidates = [window for window in self.candidates if sta.covers_grid(window, grid)]
        if dense_candidates:
            raise ValueError(f"candidates: {dense_candidates} cover the whole {grid} tile grid (dense attention, "
                             f"which no window can beat); leave them out (dense_steps gives dense steps), or use "
                             f"sparsecore.methods.sta_search.candidate_windows")
        self.grid = grid
        out = dense()
        tokens, heads = geometry.tokens, query.shape[2]
        order = sta.token_order(geometry, self.tile)
        q, k, v, ref = (order.gather(t.transpose(1, 2)[:, :, :tokens], 2) for t in (query, key, value, out))
        squared = partial(torch.linalg.vector_norm, dim=(0, 2, 3), dtype=torch.float32)    # per head, no float32 copy
        errors = torch.zeros(len(self.candidates), heads, dtype=torch.float64, device=query.device)
        for index, kernel in enumerate(self._kernels_for(geometry, heads)):        # a few candidates, not heads
            errors[index] = squared(kernel(q, k, v) - ref).double() ** 2 / (q.shape[0] * tokens * ref.shape[3])
        if self._sums is None:
            self._sums = torch.zeros(self.num_steps, self.num_layers, len(self.candidates), heads,
                                     dtype=torch.float64, device=query.device)
        elif self._sums.shape[3] != heads or self._sums.device != query.device:
            raise ValueError(f"handle.search_windows: layer {layer} has {heads} heads on {query.device}, the search "
                             f"began with {self._sums.shape[3]} on {self._sums.device}; search one model on one device")
        self._sums[step, layer] += errors
        self._calls[step, layer] += 1
        return out

    def _kernels_for(self, geometry: VideoGeometry, heads: int) -> list[Any]:
        """Each candidate's compiled kernel on ``geometry``, kept for a few geometries (each kernel holds its
        mask)."""
        key = (geometry, heads)
        if key not in self._kernels:
            self._kernels[key] = [self._compiled(sta.plan(geometry, heads, window=window, tile=self.tile))
                                  for window in self.candidates]
            if len(self._kernels) > KERNELS_KEPT:
                self._kernels.popitem(last=False)
        self._kernels.move_to_end(key)
        return self._kernels[key]

    def errors(self) -> np.ndarray:
        """Mean squared error ``[steps, layers, candidates, heads]`` (float64) of each candidate's output against the
        dense output, over the calls measured; NaN where a (step, layer) was not measured. One host read."""
        found = np.full((self.num_steps, self.num_layers, len(self.candidates), 1), np.nan)
        if self._sums is None:
            return found
        sums = self._sums.cpu().numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self._calls[:, :, None, None] > 0, sums / self._calls[:, :, None, None], np.nan)

    def strategy(self, dense_steps: int = 0) -> sta.MaskStrategy:
        """Each head's candidate of least error from ``dense_steps`` on, the whole grid before (FastVideo's rule)."""
        if self.grid is None:
            raise ValueError("handle.search_windows: no call was measured yet; run the pipeline (a few prompts) "
                             "with the search on first")
        return choose_windows(self.errors(), self.candidates, self.grid, dense_steps)

    def save(self, path: Any, dense_steps: int = 0) -> sta.MaskStrategy:
        """:meth:`strategy` written to ``path`` as FastVideo's json; returns it."""
        strategy = self.strategy(dense_steps)
        save_strategy(strategy, path)
        return strategy

    def __repr__(self) -> str:
        return (f"WindowSearch(candidates={list(self.candidates)}, tile={self.tile}, grid={self.grid}, "
                f"calls={self.calls})")
