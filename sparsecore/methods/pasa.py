"""PASA: pooled block scores, stochastic top-k, curvature-aware density per step.

Paper: "Ride the Wave: Precision-Allocated Sparse Attention for Smooth Video
Generation", Zhang et al., arXiv 2604.12219 (Sec. 4.1 Eq. 9-11 curvature budgets;
grouped statistics; stochastic selection bias). It extends PISA, arXiv 2602.01077.
Official code: none public for PASA; the base method's code is
https://github.com/xie-lab-ml/piecewise-sparse-attention
(``piecewise_attn/kernels/piecewise_sparse_attn_hyd.py``: mean-pooled q/k blocks of
64, ``score = q_mean . k_mean * scale``, ``top_k = max(1, int(density * NT))`` per query block).

Pattern: q and k are mean-pooled per 64-token block; block score = ``q̄_i . k̄_j * scale``
(PISA's routing score for video). A Gumbel bias is added to the scores, drawn afresh
per (seed, layer, step, head), and every video query-block row keeps its ``k_t`` best video
key blocks. Density per step: the first 20% of steps are dense; for the others
``rho_t = rho * l_t / mean(l)``, with ``l_t`` the L1 change of the model's velocity
prediction between adjacent steps measured on a calibration run
(:class:`CurvatureRecorder`, :class:`CurvatureProfile`), clipped to
``[min_density, 1]`` with the clipped mass redistributed so the mean over sparse
steps stays ``rho`` (:func:`density_schedule`). Without a profile ``rho_t = rho``.

Unselected blocks: sparse masks carry ``unselected = grouped-first-order:32`` (``approximation``,
``group_size``): every key block a row does not keep enters its softmax through PASA's
first-order Taylor approximation around the block's mean key, with one first-order
statistic per group of 32 consecutive key blocks (:mod:`sparsecore.ir.unselected`; the
kernels compute it). ``approximation="global-first-order"`` is PISA's single statistic,
``"zeroth"`` drops the first-order term and ``"drop"`` keeps or drops blocks only. The
routing uses no group statistic (PISA's covariance routing term is for images only).
Dense masks (dense steps and layers) have nothing to approximate and stay ``"drop"``.

Planning runs on the scores' device for all heads at once: block means by ``index_add``,
one batched score product, the noise from counters (:mod:`sparsecore.noise`) and one top-k (both in one
kernel where a backend offers it: :func:`.selection.sorted_top`), and the
CSR by scatter. Every size is known from the schedule and the geometry, so a sparse
step reads nothing back to the host.

Where the paper is silent, we chose:

- Selection noise: Gumbel(0, ``noise_scale``) added to the block scores (logits,
  natural-log units) before top-k. At ``noise_scale = 1`` this is Gumbel-top-k, i.e.
  sampling ``k`` blocks without replacement from ``softmax(scores)``; small scales only
  reorder near-tied blocks (swaps are bounded by ``noise_scale * range(noise)``).
  Default 0.2: on the synthetic workload about 18% of the selected blocks change from
  one step to the next at a recall cost of about 1 point (docs/fidelity.md shows 0 to
  1). Drawn from counters (:func:`sparsecore.noise.gumbel`) keyed by ``(seed, layer, step, head)``:
  the same seed gives the same mask for any head shard, and on any device up to the last bit of
  float32 ``log`` (libraries round it differently; at Wan 6x 2 rows in 35,400 differed) and up to
  scores tied exactly at a row's ``k``-th value (the row top-k kernel keeps the lowest ids; torch's
  ``topk``, where no kernel takes the scores, whichever it meets: a stable sort that agrees cost 4.5x
  the time and twice the memory at 6x on a CPU).
- Dense steps: ``ceil(dense_fraction * num_steps)`` (10 of 50; refused where that is every step); ``dense_layers``
  (default ``(0,)``: PISA's first dense layer) are dense at every step.
- ``l_t`` for step ``t >= 1`` is ``mean |v_t - v_(t-1)|``; step 0 (no predecessor) takes
  ``l_1`` if it is ever sparse. The mean in ``l_t / mean(l)`` is over the sparse steps.
- Clipping: ``rho_t = clip(c * l_t, min_density, 1)`` with ``c`` solved exactly so the
  mean is exactly ``rho`` (water-filling); ``min_density`` default ``rho / 2``.
  Per-row counts are ``round(rho_t * NB_video)``, at least 1.
- Text tokens (joint attention): text key blocks are kept in every row and text rows
  keep everything (AdaSpa's text sink; PASA does not say).
- Scores are averaged over the batch (one mask per head for the whole batch).
- Grouped approximation: groups are ``group_size`` consecutive key blocks counted from block 0
  (text blocks included, the last group may be shorter), the group statistic covers selected
  blocks too, and a block's share is ``|B_j| H_g / T_g`` (PISA's code scales its global
  statistic the same way); statistics per batch element and key head (docs/methods.md).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from sparsecore.geometry import VideoGeometry
from sparsecore.ir import BlockMask
from sparsecore.ir.serialization import write_replacing
from sparsecore.ir.uploads import queued
from sparsecore.ir.validation import check_index, check_int, parse_json
from sparsecore.noise import SEED_LIMIT, GumbelNoise, head_keys

from . import causal
from .approximation import check_approximation, check_causal, unselected_of, with_unselected
from .contract import (MAX_LAYERS, HeadShard, StepAction, check_fraction, check_geometry, check_int_tuple,
                       check_layer, check_num_steps, check_qk, check_scale, check_shard, check_sparse_steps, check_step,
                       fixed_block_offsets, geometry_meta, params_from)
from .selection import (Selection, SinkLayout, block_means, dense_mask, keep_count, rows_from_top, selection_nnz,
                        sink_mask, sink_rows, sorted_top)

METHOD = "pasa"
PAPER = "arXiv:2604.12219"


@dataclass(frozen=True)
class PASAParams:
    """PASA's parameters, checked once.

    ``density``: mean fraction of video key blocks kept over the sparse steps (0.15, the
    paper's 85% sparsity). ``block_size``: tokens per block (64). ``dense_fraction``: leading
    dense steps (0.2). ``min_density``: floor of the per-step density (None: density / 2).
    ``noise_scale``: Gumbel selection noise (0.2). ``seed``. ``dense_layers``: layers dense at
    every step ((0,)). ``group_size``: key blocks per shared first-order statistic (32).
    ``approximation``: what rows get from the blocks they do not keep (``"grouped-first-order"``,
    ``"global-first-order"``, ``"zeroth"`` or ``"drop"``; :mod:`.approximation`).
    ``scale``: softmax scale (None: 1/sqrt(D)).
    """

    density: float = 0.15
    block_size: int = 64
    dense_fraction: float = 0.2
    min_density: float | None = None
    noise_scale: float = 0.2
    seed: int = 0
    dense_layers: tuple[int, ...] = (0,)
    group_size: int = 32
    approximation: str = "grouped-first-order"
    scale: float | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "density", check_fraction(self.density, "density", open_low=True))
        set_(self, "dense_fraction", check_fraction(self.dense_fraction, "dense_fraction"))
        if self.min_density is not None:
            set_(self, "min_density", check_fraction(self.min_density, "min_density"))
        set_(self, "noise_scale", check_fraction(self.noise_scale, "noise_scale", 0.0, math.inf))
        set_(self, "seed", check_index(self.seed, "seed", SEED_LIMIT))    # the noise key takes 64 bits of it
        set_(self, "block_size", check_int(self.block_size, "block_size", 1))
        set_(self, "group_size", check_int(self.group_size, "group_size", 1))
        set_(self, "approximation", check_approximation(self.approximation))
        set_(self, "dense_layers", check_int_tuple(self.dense_layers, "dense_layers", MAX_LAYERS, "layers"))
        set_(self, "scale", check_scale(self.scale))

    def meta(self) -> dict[str, Any]:
        return {**vars(self), "dense_layers": list(self.dense_layers)}


# ------------------------------------------------------------------ curvature profile
@dataclass(frozen=True)
class CurvatureProfile:
    """``l[t]``: mean L1 change of the velocity prediction from step ``t-1`` to ``t`` (``l[0]`` is NaN)."""

    values: np.ndarray

    def __post_init__(self) -> None:
        values = np.asarray(self.values, dtype=np.float64)
        if values.ndim != 1 or len(values) < 1:
            raise ValueError(f"values: expected a 1-D array of per-step changes, got shape {list(values.shape)}")
        if (~np.isnan(values[1:]) & ((values[1:] < 0) | ~np.isfinite(values[1:]))).any():
            raise ValueError("values: expected finite non-negative changes (NaN only for unrecorded steps)")
        object.__setattr__(self, "values", values)

    @property
    def num_steps(self) -> int:
        return len(self.values)

    def save(self, path: str | Path) -> Path:
        """Write the profile as JSON (``{"method": "pasa", "l1_change": [...]}``, NaN as null)."""
        path = Path(path)
        data = [None if np.isnan(x) else float(x) for x in self.values]
        text = json.dumps({"method": METHOD, "quantity": "mean |v_t - v_(t-1)|", "l1_change": data})
        write_replacing(path, [text.encode()])                                           # whole or not at all
        return path

    @classmethod
    def load(cls, path: str | Path) -> "CurvatureProfile":
        """Read a profile written by :meth:`save`; anything else raises ``ValueError`` naming the file."""
        try:
            data = parse_json(Path(path).read_bytes(), "the file")["l1_change"]
            if not isinstance(data, list) or not all(x is None or type(x) in (int, float) for x in data):   # no bool
                raise ValueError(f"l1_change: expected a list of numbers or null, got {str(data)[:80]}")
            return cls(np.array([np.nan if x is None else x for x in data], dtype=np.float64))
        except (OSError, ValueError, KeyError, TypeError, OverflowError) as err:
            raise ValueError(f"{path}: not a PASA curvature profile ({err}); write one with CurvatureProfile.save")

    @classmethod
    def average(cls, profiles: Sequence["CurvatureProfile"]) -> "CurvatureProfile":
        """The mean of several calibration runs (the paper averages 10 prompts)."""
        lengths = {p.num_steps for p in profiles}
        if len(lengths) != 1:
            raise ValueError(f"profiles: expected runs of one step count, got {sorted(lengths)}")
        return cls(np.mean([p.values for p in profiles], axis=0))


class CurvatureRecorder:
    """Records ``l_t`` during a calibration run: call ``record(step, velocity)`` after each step."""

    def __init__(self, num_steps: int) -> None:
        self.num_steps = check_num_steps(num_steps, 2)
        self._values = np.full(self.num_steps, np.nan)
        self._previous: tuple[int, torch.Tensor] | None = None

    def record(self, step: int, velocity: torch.Tensor) -> None:
        step = check_step(step, self.num_steps)
        if not isinstance(velocity, torch.Tensor):
            raise TypeError(f"velocity: expected the model's velocity prediction as a tensor, got "
                            f"{type(velocity).__name__}")
        if velocity.numel() == 0:          # a NaN mean change, which profile() blamed on the order of the steps
            raise ValueError(f"velocity: expected a non-empty tensor at step {step}, got shape {list(velocity.shape)}")
        velocity = velocity.detach().float()
        if not bool(torch.isfinite(velocity).all()):
            raise ValueError(f"velocity: expected finite values at step {step}, got NaN or inf (or values past "
                             f"float32's range); calibrate on a run whose velocity predictions are finite (check the "
                             f"model and its dtype at this step)")
        if self._previous is not None and self._previous[0] == step - 1:
            if self._previous[1].shape != velocity.shape:
                raise ValueError(f"velocity: expected shape {list(self._previous[1].shape)} as at step {step - 1}, "
                                 f"got {list(velocity.shape)}")
            self._values[step] = float((velocity - self._previous[1]).abs().mean())
        self._previous = (step, velocity.clone())

    def profile(self) -> CurvatureProfile:
        if np.isnan(self._values[1:]).any():
            missing = (np.nonzero(np.isnan(self._values[1:]))[0] + 1).tolist()
            raise ValueError(f"profile: steps {missing[:8]} have no recorded change; record every step in order")
        return CurvatureProfile(self._values.copy())


def dense_steps(num_steps: int, dense_fraction: float) -> int:
    """Leading dense steps: ``ceil(dense_fraction * num_steps)``."""
    return min(num_steps, math.ceil(dense_fraction * num_steps - 1e-9))


def density_schedule(num_steps: int, density: float, *, dense_fraction: float = 0.2,
                     profile: CurvatureProfile | None = None, min_density: float | None = None) -> np.ndarray:
    """Density per step, float64 ``[num_steps]``: 1 on dense steps, mean ``density`` over the others."""
    if profile is not None and not isinstance(profile, CurvatureProfile):
        raise TypeError(f"profile: expected a pasa.CurvatureProfile or None, got {type(profile).__name__}")
    num_steps = check_num_steps(num_steps)
    density = check_fraction(density, "density", open_low=True)
    dense_fraction = check_fraction(dense_fraction, "dense_fraction")
    min_density = density / 2 if min_density is None else check_fraction(min_density, "min_density")
    if min_density > density:
        raise ValueError(f"min_density: expected <= density={density}, got {min_density}")
    first = dense_steps(num_steps, dense_fraction)
    out = np.ones(num_steps)
    if first == num_steps:
        return out
    if profile is None:
        out[first:] = density
        return out
    if profile.num_steps != num_steps:
        raise ValueError(f"profile: recorded for {profile.num_steps} steps, the run has {num_steps}; "
                         f"calibrate with the same step count")
    change = profile.values.copy()
    if len(change) > 1:
        change[0] = change[1]
    weights = change[first:]
    if not np.isfinite(weights).all() or weights.sum() <= 0:
        raise ValueError("profile: the sparse steps' changes must be finite with a positive sum")
    out[first:] = _water_fill(weights / weights.mean(), density, min_density)
    return out


def _water_fill(gamma: np.ndarray, density: float, low: float) -> np.ndarray:
    """``clip(c * gamma, low, 1)`` with ``c`` chosen so the mean is ``density``.

    The mean is piecewise linear and nondecreasing in ``c``, with knots where a step leaves the floor
    (``c = low / gamma_t``) or reaches 1 (``c = 1 / gamma_t``): ``c`` is interpolated between the two knots around
    ``density``, exactly, whatever the spread of ``gamma`` (steps with ``gamma_t = 0`` stay at ``low``).
    """
    if density >= 1.0:
        return np.ones_like(gamma)
    positive = gamma > 0
    reachable = np.where(positive, 1.0, low).mean()
    if reachable < density:
        raise ValueError(f"profile: too many sparse steps with zero change to reach density={density} "
                         f"(at most {reachable:.4f}); record the profile again or lower density")

    def filled(c: float) -> np.ndarray:
        with np.errstate(over="ignore"):
            return np.where(positive, np.clip(c * gamma, low, 1.0), low)

    knots = np.unique(np.concatenate([[0.0], low / gamma[positive], 1.0 / gamma[positive]]))
    right = _first_reaching(lambda i: filled(knots[i]).mean() >= density, len(knots))   # its mean reaches density
    left = max(right - 1, 0)
    mean_left, mean_right = filled(knots[left]).mean(), filled(knots[right]).mean()
    if mean_right == mean_left:
        c = knots[right]
    else:
        c = knots[left] + (density - mean_left) * (knots[right] - knots[left]) / (mean_right - mean_left)
    rho = filled(c)
    free = (rho > low) & (rho < 1.0)                 # exact mean: rescale the unclipped steps (rounding only)
    if free.any():
        rho[free] *= (density * len(rho) - rho[~free].sum()) / rho[free].sum()
    return rho


def _first_reaching(reaches, count: int) -> int:
    """The first index in ``0..count - 1`` where the nondecreasing predicate ``reaches`` holds (the last if none):
    a bisection, so the water fill takes O(steps log steps), not a [knots x steps] table."""
    low, high = 0, count - 1
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if reaches(middle) else (middle + 1, high)
    return low


# ------------------------------------------------------------------ scores
def pooled_scores(q: torch.Tensor, k: torch.Tensor, offsets: np.ndarray, scale: float) -> torch.Tensor:
    """Every head's block scores ``q̄_i . k̄_j * scale``, float32 ``[H, MB, NB]`` (mean over the batch).

    q ``[B, H, L, D]``, k ``[B, H_kv, L, D]``; query head h reads key head ``h // (H // H_kv)``.
    """
    q_means, k_means = block_means(q, offsets), block_means(k, offsets)
    k_means = k_means.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return (q_means @ k_means.transpose(-1, -2)).mean(dim=0).mul_(scale)


# ------------------------------------------------------------------ planning
def plan(geometry: VideoGeometry, num_heads: int, *, step: int, layer: int | None = None, q: Any = None,
         k: Any = None, num_steps: int = 50, profile: CurvatureProfile | None = None, heads: HeadShard | None = None,
         **params: Any) -> BlockMask:
    """The PASA mask at ``step`` of a ``num_steps`` run.

    Args:
        geometry, num_heads: the layout and heads of the mask.
        step: denoising step (0-based); selects the density and reseeds the noise.
        layer: reseeds the noise; layers in ``dense_layers`` are dense.
        q, k: ``[B, H, L, D]`` / ``[B, H_kv, L, D]`` (or without B); needed at sparse steps.
        num_steps: steps of the run (for the dense 20% and the schedule).
        profile: a calibration :class:`CurvatureProfile` (None: constant density).
        heads: a :class:`~.contract.HeadShard`: q, k hold only its heads, and so does the mask.
        **params: :class:`PASAParams` fields.
    """
    return PASASession(num_steps, profile, **params).plan(geometry, num_heads, step=step, layer=layer, q=q, k=k,
                                                          heads=heads)


class PASASession:
    """Per-run PASA state: the density schedule (from a profile) and the parameters; no per-layer cache."""

    method = METHOD

    def __init__(self, num_steps: int, profile: CurvatureProfile | None = None, **params: Any) -> None:
        self.num_steps = check_num_steps(num_steps)
        self.params = params_from(PASAParams, METHOD, params)
        n, p = self.num_steps, self.params
        check_sparse_steps("dense_fraction", p.dense_fraction, params, dense_steps(n, p.dense_fraction), n, (n - 1) / n)
        self.profile = profile                                        # checked by density_schedule
        self.schedule = density_schedule(n, p.density, dense_fraction=p.dense_fraction, profile=profile,
                                         min_density=p.min_density)

    def action(self, geometry: VideoGeometry | None, step: int, layer: int | None = None) -> StepAction:
        step = check_step(step, self.num_steps)
        check_causal(unselected_of(self.params.approximation, self.params.group_size), geometry)   # at any step
        if self.schedule[step] >= 1.0 or (layer is not None and layer in self.params.dense_layers):
            return StepAction("dense", dense=True, plans=False)
        return StepAction("select", dense=False, plans=True, needs_qk=True, per_call=True)

    def plan(self, geometry: VideoGeometry, num_heads: int, *, step: int, layer: int | None = None,
             q: Any = None, k: Any = None, lse: Any = None, mass: Any = None, heads: HeadShard | None = None) -> BlockMask:
        """The mask at ``(layer, step)`` (``heads``: only this :class:`~.contract.HeadShard`; ``lse``, ``mass`` unused)."""
        shard = check_shard(heads, check_geometry(geometry, num_heads))
        action = self.action(geometry, step, check_layer(layer))
        p = self.params
        rho = float(self.schedule[step])
        meta = {"method": METHOD, "paper": PAPER, "layer": layer, "step": step, "density": rho,
                "params": p.meta(), "geometry": geometry_meta(geometry), "action": action.label}
        if action.dense:
            return dense_mask(geometry, shard.size, meta)
        unselected = unselected_of(p.approximation, p.group_size)           # refused by action where causal
        offsets = fixed_block_offsets(geometry, shard.size, p.block_size)
        q, k = check_qk(q, k, geometry, shard)
        layout = SinkLayout.of(geometry, offsets)
        scores = pooled_scores(q, k, offsets, q.shape[-1] ** -0.5 if p.scale is None else p.scale)
        noise = GumbelNoise(head_keys(shard.heads, p.seed, layer, step, scores.device), p.noise_scale) \
            if p.noise_scale > 0 else None
        budgets = torch.full((shard.size,), rho, dtype=torch.float64, device=scores.device)
        if geometry.causal_frames:
            selection, nnz, keep = _causal_selection(scores, geometry, offsets, layout, rho, noise)
        else:
            keep = keep_count(rho, layout.video_blocks)
            nnz = selection_nnz(layout, shard.size, shard.size * (keep + layout.text_blocks))
            selection = sink_rows(sorted_top(scores[:, layout.video, layout.video], keep, noise), layout)
        del scores                                          # 4 bytes a block pair: freed before the lists are built
        mask = sink_mask(selection, layout, offsets, nnz, budgets,
                         {**meta, "keep_blocks": keep, "unselected": str(unselected)})
        return with_unselected(mask, unselected, geometry)


def _causal_selection(scores: torch.Tensor, geometry: VideoGeometry, offsets: np.ndarray, layout: SinkLayout,
                      rho: float, noise: GumbelNoise | None) -> tuple[Selection, int, int]:
    """Each row's best ``round(rho * visible)`` blocks of those it may see (:mod:`.causal`), the kept count, and
    the most a row keeps. The counts follow from the geometry, so nothing is read from the device: hidden blocks
    rank below every visible one, so each row's top-k prefix holds visible blocks only."""
    visible = causal.visible_counts(geometry, offsets)
    keep = causal.keep_per_row(rho, visible)
    if noise is not None:                               # before the ranking, which must see the noisy scores
        scores.add_(noise.sample(*scores.shape[1:]))
    ranked = causal.rank_visible_first(scores, causal.future(geometry, offsets, scores.device))
    top = torch.topk(ranked, int(keep.max()), dim=-1, sorted=True)
    counts = queued(keep, scores.device).expand(scores.shape[0], -1)
    return rows_from_top(top, layout, counts), scores.shape[0] * int(keep.sum()), int(keep.max())


def session(num_steps: int = 50, profile: CurvatureProfile | None = None, **params: Any) -> PASASession:
    """A :class:`PASASession` for a run of ``num_steps`` denoising steps."""
    return PASASession(num_steps, profile, **params)
