"""Sliding Tile Attention's window search: candidate windows of one cost, and the window each head keeps.

STA (arXiv 2502.04507) gives each head its own window, found offline: FastVideo (up to 37cab18,
``fastvideo/attention/backends/STA_configuration.py`` and ``sliding_tile_attn.py``) runs the model with full attention
on a few prompts, computes at every step and layer each candidate window's output on the same q, k, v, records each
head's mean squared error against the full output (``L2_loss``), averages it over the prompts (and both guidance
branches), and keeps for each (step, layer, head) the candidate of least error; the first ``dense_steps`` steps get
the full window (the whole tile grid), which runs dense attention. Its candidates are six hand-picked windows of
about the same cost for one grid (3 x 6 x 10 tiles, Wan 2.1 at 768 x 1280); :func:`candidate_windows` finds such sets
for any grid. The measuring runs in the diffusers integration (``handle.search_windows``); this module holds the
arithmetic and the file.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from sparsecore.ir.serialization import write_replacing
from sparsecore.ir.validation import check_index, check_int

from .sta import span
from .sta_strategy import MaskStrategy, read_strategy, triple

CANDIDATE_LIMIT = 64        # candidates measured per call: each is one more sparse kernel at every searched call


def window_density(grid: Sequence[int], window: Sequence[int]) -> float:
    """Fraction of the video's tile pairs a window keeps on ``grid`` (tiles along frames, rows, columns): every query
    tile sees the same number of key tiles, since the window shifts inward at the edges."""
    return math.prod(span(n, w) / n for n, w in zip(grid, window))


def candidate_windows(grid: Any, density: float, *, spread: float = 0.15,
                      limit: int = 8) -> tuple[tuple[int, int, int], ...]:
    """Windows of about one cost for a search on ``grid``: those whose :func:`window_density` lies within ``spread``
    (relative) of ``density``, nearest first, at most ``limit``; odd sides below an axis and the whole axis only
    (an even side below the axis runs as the next odd one). The whole grid (dense) is never a candidate."""
    grid = triple(grid, "grid")
    for name, value in (("density", density), ("spread", spread)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name}: expected a float, got {type(value).__name__} {value!r}")
    if not 0 < density < 1:
        raise ValueError(f"density: expected a fraction in (0, 1) of the tile pairs, got {density!r}")
    if not 0 <= spread < 1:
        raise ValueError(f"spread: expected a relative tolerance in [0, 1), got {spread!r}")
    limit = check_int(limit, "limit", 1)
    counts = [(n + 1) // 2 + (n % 2 == 0) for n in grid]          # odd sides below each axis, and the axis
    if math.prod(counts) > 10 ** 6:                                # counted before anything is built
        raise ValueError(f"grid: {grid} tiles give more than a million windows to rank; pass candidates yourself")
    sides = [sorted(set(range(1, n, 2)) | {n}) for n in grid]
    found = []
    # exact shares and the decimal values written (0.05 is 1/20): float products dropped windows on the bounds and
    # ordered ties by rounding noise
    target, tolerance, pairs = Fraction(repr(float(density))), Fraction(repr(float(spread))), math.prod(grid)
    for wt in sides[0]:
        for wh in sides[1]:
            for ww in sides[2]:
                window = (wt, wh, ww)
                kept = Fraction(math.prod(span(n, w) for n, w in zip(grid, window)), pairs)
                if window != grid and abs(kept - target) <= tolerance * target:
                    found.append((abs(kept - target), window))
    if not found:
        raise ValueError(f"density: no window on a {grid} tile grid keeps {float(density):.3f} of the tile pairs "
                         f"within {float(spread):.0%}; widen spread or pick another density")
    return tuple(window for _, window in sorted(found)[:limit])


def check_candidates(candidates: Any) -> tuple[tuple[int, int, int], ...]:
    """Candidate windows as a tuple of distinct (wt, wh, ww), at most :data:`CANDIDATE_LIMIT`."""
    if isinstance(candidates, (str, bytes)) or not isinstance(candidates, Sequence) or not candidates:
        raise TypeError(f"candidates: expected a non-empty sequence of windows (wt, wh, ww), got {candidates!r}")
    if len(candidates) > CANDIDATE_LIMIT:
        raise ValueError(f"candidates: expected at most {CANDIDATE_LIMIT} windows (each runs at every searched call), "
                         f"got {len(candidates)}")
    windows = tuple(triple(w, f"candidates[{i}]") for i, w in enumerate(candidates))
    if len(set(windows)) != len(windows):
        raise ValueError(f"candidates: expected distinct windows, got {windows}")
    return windows


def choose_windows(errors: np.ndarray, candidates: Sequence[tuple[int, int, int]], grid: Sequence[int],
                   dense_steps: int) -> MaskStrategy:
    """FastVideo's choice: for each (step, layer, head) from ``dense_steps`` on, the candidate of least mean
    squared error, the first listed on ties; the whole ``grid`` (dense) before. ``errors``: ``[steps, layers,
    candidates, heads]``, NaN where a (step, layer) was not measured (refused from ``dense_steps`` on). The strategy
    records ``grid``: its sessions refuse another (its dense steps' windows are this grid, sparse on a larger one)."""
    errors = np.asarray(errors, dtype=np.float64)
    if errors.ndim != 4 or errors.shape[2] != len(candidates) or 0 in errors.shape:
        raise ValueError(f"errors: expected [steps, layers, {len(candidates)} candidates, heads], got "
                         f"{list(errors.shape)}")
    steps, layers, _, heads = errors.shape
    dense_steps = check_index(dense_steps, "dense_steps", steps + 1)
    searched = errors[dense_steps:]
    missing = np.argwhere(np.isnan(searched).any(axis=(2, 3)))
    if len(missing):
        step, layer = missing[0]
        raise ValueError(f"errors: step {dense_steps + step} layer {layer} was not measured; search every layer at "
                         f"steps {dense_steps} .. {steps - 1}, or raise dense_steps past the steps left out")
    wrong = np.argwhere(((searched < 0) | np.isinf(searched)).any(axis=(2, 3)))
    if len(wrong):
        step, layer = wrong[0]
        raise ValueError(f"errors: expected mean squared errors (finite, >= 0) at step {dense_steps + step} layer "
                         f"{layer}, got {searched[step, layer].min()} .. {searched[step, layer].max()}; measure "
                         f"them again (in float16 an overflow gives inf: search in bfloat16)")
    table = {}
    full = tuple(int(n) for n in grid)
    best = searched.argmin(axis=2)                                         # [steps - dense_steps, layers, heads]
    for step in range(steps):
        for layer in range(layers):
            table[(step, layer)] = (full,) * heads if step < dense_steps else \
                tuple(tuple(candidates[c]) for c in best[step - dense_steps, layer].tolist())
    return MaskStrategy(table, grid=full)


def save_strategy(strategy: MaskStrategy, path: Any) -> None:
    """Write ``strategy`` as FastVideo's json (``"step_layer_head": [wt, wh, ww]``), which ``STAParams(mask_strategy=
    path)`` and FastVideo read. The format has no place for the searched grid: read back, the strategy refuses no
    grid, and warns where its dense steps (written as that grid) would run sparse."""
    strategy = read_strategy(strategy)
    data = {f"{step}_{layer}_{head}": list(window) for (step, layer), windows in sorted(strategy.items())
            for head, window in enumerate(windows)}
    write_replacing(Path(os.fspath(path)), [json.dumps(data, indent=1).encode()])       # whole or not at all
