"""Helpers the method planners share: parameter checks, q/k shapes, text sinks, top-k, IR building.

Pure functions over numpy / torch; nothing here imports a device library.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from sparsecore.geometry import VideoGeometry
from sparsecore.ir import BlockMask
from sparsecore.ir.validation import check_int  # noqa: F401  (the planners' integer checks)


# ------------------------------------------------------------------ parameter checks
def check_fraction(value: Any, field: str, low: float = 0.0, high: float = 1.0, *, open_low: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise TypeError(f"{field}: expected a float, got {type(value).__name__} {value!r}")
    if value > high or value < low or (open_low and value == low):
        bracket = "(" if open_low else "["
        raise ValueError(f"{field}: expected a value in {bracket}{low}, {high}], got {value}")
    return float(value)


def check_geometry(geometry: Any, num_heads: Any) -> int:
    if not isinstance(geometry, VideoGeometry):
        raise TypeError(f"geometry: expected a sparsecore.VideoGeometry, got {type(geometry).__name__}")
    return check_int(num_heads, "num_heads", 1)


def check_step(step: Any, num_steps: int | None = None) -> int:
    step = check_int(step, "step", 0)
    if num_steps is not None and step >= num_steps:
        raise ValueError(f"step: expected 0 <= step < num_steps={num_steps}, got {step}")
    return step


def check_params(params: Mapping[str, Any], defaults: Mapping[str, Any], method: str) -> dict[str, Any]:
    """``defaults`` updated with ``params``; an unknown name raises TypeError listing the accepted ones."""
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise TypeError(f"{method}: unknown parameter(s) {unknown}; accepted: {', '.join(sorted(defaults))}")
    return {**defaults, **params}


def as_qk(t: Any, name: str, geometry: VideoGeometry, num_heads: int | None = None) -> torch.Tensor:
    """``t`` as a float tensor ``[B, heads, L, D]`` (a ``[heads, L, D]`` input gets B = 1)."""
    if t is None:
        raise ValueError(f"{name}: this method needs {name} (a [B, heads, L, D] tensor) at this step, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch tensor [B, heads, L, D], got {type(t).__name__}")
    if t.ndim == 3:
        t = t[None]
    if t.ndim != 4 or not t.is_floating_point() or t.shape[2] != geometry.tokens:
        raise ValueError(f"{name}: expected a float tensor [B, heads, {geometry.tokens}, D] for geometry {geometry}, "
                         f"got {t.dtype} {list(t.shape)}")
    if num_heads is not None and t.shape[1] != num_heads:
        raise ValueError(f"{name}: expected {num_heads} heads, got {t.shape[1]} in shape {list(t.shape)}")
    return t


def check_qk(q: Any, k: Any, geometry: VideoGeometry, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    q, k = as_qk(q, "q", geometry, num_heads), as_qk(k, "k", geometry)
    if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3] or num_heads % k.shape[1] or k.device != q.device:
        raise ValueError(f"k: expected [{q.shape[0]}, H_kv, {geometry.tokens}, {q.shape[3]}] on {q.device} with "
                         f"H_kv dividing {num_heads}, got {list(k.shape)} on {k.device}")
    return q, k


# ------------------------------------------------------------------ head shards
@dataclass(frozen=True)
class HeadShard:
    """Heads ``[start, stop)`` of ``total``: what one rank holds under head-parallel attention.

    Under Ulysses sequence parallelism (diffusers' ``ContextParallelConfig(ulysses_degree=N)``)
    the all-to-all leaves each rank the whole sequence for ``total / N`` consecutive heads. A
    session's ``plan(..., heads=shard)`` then gets ``q`` / ``k`` of those heads only and returns
    their mask: equal to ``plan(...)`` over all heads with the full ``q`` / ``k``, followed by
    ``select_heads(range(start, stop))``. ``gather`` maps a float64 array of per-head values of this
    shard (``[stop - start]``) to the values of all ``total`` heads in head order: an all-gather over
    the ranks holding the other shards, which methods whose choices couple heads call (AdaSpa ranks
    every head's recall). None means this shard is all there is (one process).
    """

    start: int
    stop: int
    total: int
    gather: Callable[[np.ndarray], np.ndarray] | None = None

    @property
    def size(self) -> int:
        return self.stop - self.start

    @property
    def heads(self) -> range:
        return range(self.start, self.stop)

    def all_heads(self, values: np.ndarray) -> np.ndarray:
        """Per-head ``values`` of this shard extended to every head (``gather``; checked)."""
        values = np.asarray(values, dtype=np.float64)
        if self.size == self.total:
            return values
        if self.gather is None:
            raise ValueError(f"heads.gather: a shard of heads [{self.start}, {self.stop}) of {self.total} needs a "
                             f"gather over the other shards for this method, got None")
        gathered = np.asarray(self.gather(values), dtype=np.float64)
        if gathered.shape != (self.total,) or not np.array_equal(gathered[self.start:self.stop], values):
            raise ValueError(f"heads.gather: expected the {self.total} heads' values with this shard's at "
                             f"[{self.start}, {self.stop}), got shape {gathered.shape}")
        return gathered


def check_shard(heads: Any, num_heads: int) -> HeadShard:
    """``heads`` (a :class:`HeadShard` or None for all heads) checked against ``num_heads``."""
    if heads is None:
        return HeadShard(0, num_heads, num_heads)
    if not isinstance(heads, HeadShard):
        raise TypeError(f"heads: expected a sparsecore.methods.HeadShard or None, got {type(heads).__name__}")
    start, stop = check_int(heads.start, "heads.start", 0), check_int(heads.stop, "heads.stop", 1)
    if heads.total != num_heads or not start < stop <= num_heads:
        raise ValueError(f"heads: expected 0 <= start < stop <= total == num_heads={num_heads}, got {heads}")
    return heads


# ------------------------------------------------------------------ building masks
def shared_mask(block_map: np.ndarray, num_heads: int, q_offsets: np.ndarray, kv_offsets: np.ndarray, *,
                budgets: Any = None, meta: Mapping[str, Any] | None = None) -> BlockMask:
    """A BlockMask whose every head has the bool ``[MB, NB]`` map (no per-head copy of the map)."""
    row_ptr = np.concatenate([[0], np.cumsum(block_map.sum(axis=1, dtype=np.int64))])
    indptr = row_ptr[None, :] + row_ptr[-1] * np.arange(num_heads)[:, None]
    indices = np.tile(np.nonzero(block_map)[1], num_heads)
    return BlockMask(num_heads, q_offsets, kv_offsets, indptr, indices, budgets, meta)


def dense_mask(geometry: VideoGeometry, num_heads: int, meta: Mapping[str, Any]) -> BlockMask:
    """Full attention on frame-sized blocks (the cheapest IR of a dense step at any length)."""
    offsets = geometry.block_offsets(None)
    return shared_mask(np.ones((len(offsets) - 1,) * 2, dtype=bool), num_heads, offsets, offsets,
                       budgets=np.ones(num_heads), meta=meta)


def text_sink(geometry: VideoGeometry, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(text_rows, video_cols) bool ``[num_blocks]`` for a text sink on ``offsets`` (both sides alike).

    Text blocks are kept in every row and text rows keep every block; the top-k runs
    over the video blocks only.
    """
    text = geometry.text_blocks(offsets)
    return text, ~text


@dataclass(frozen=True)
class HeadRows:
    """One head's lists in CSR form: ``counts[MB]`` key blocks per query block, ``indices`` sorted per row."""

    counts: np.ndarray
    indices: np.ndarray


def topk_rows(scores: torch.Tensor, keep: int, text_blocks: np.ndarray) -> tuple[HeadRows, float]:
    """One head's row-wise top-k over video key blocks plus the text sink.

    Every video query-block row keeps its ``keep`` highest-scoring video key blocks and
    every text key block; text query-block rows keep every block. Returns the rows and
    the sum of the kept top-k video scores (over video rows).
    """
    rows = cols = scores.shape[0]
    text_rows = np.nonzero(text_blocks)[0]
    video = np.nonzero(~text_blocks)[0]                                             # same blocks on both sides
    if len(text_rows):
        index = torch.from_numpy(video).to(scores.device)
        scores = scores[index][:, index]
    top = torch.topk(scores, int(keep), dim=1, sorted=False)
    kept_sum = float(top.values.double().sum())
    chosen = np.sort(video[top.indices.cpu().numpy()], axis=1)                      # [video rows, keep]
    text_first = bool(len(text_rows)) and text_rows[0] == 0                          # text before the video
    text_cols = np.broadcast_to(text_rows, (len(video), len(text_rows)))
    video_lists = np.hstack([text_cols, chosen] if text_first else [chosen, text_cols])
    counts = np.full(rows, video_lists.shape[1], dtype=np.int64)
    counts[text_rows] = cols
    parts = [video_lists.ravel(), np.tile(np.arange(cols), len(text_rows))]
    if text_first:
        parts.reverse()
    return HeadRows(counts, np.concatenate(parts)), kept_sum


def mask_from_rows(heads: list[HeadRows], q_offsets: np.ndarray, kv_offsets: np.ndarray, *, budgets: Any = None,
                   meta: Mapping[str, Any] | None = None) -> BlockMask:
    """A BlockMask from per-head CSR rows."""
    counts = np.concatenate([h.counts for h in heads])
    flat = np.concatenate([[0], np.cumsum(counts)])
    rows = len(heads[0].counts)
    indptr = flat[np.arange(len(heads))[:, None] * rows + np.arange(rows + 1)[None, :]]
    return BlockMask(len(heads), q_offsets, kv_offsets, indptr, np.concatenate([h.indices for h in heads]),
                     budgets, meta)


def keep_count(density: float, video_blocks: int) -> int:
    """Blocks kept per row for a density: ``round(density * video_blocks)``, at least 1."""
    return int(min(video_blocks, max(1, round(density * video_blocks))))


def geometry_meta(geometry: VideoGeometry) -> dict[str, Any]:
    return {"frames": geometry.frames, "height": geometry.height, "width": geometry.width,
            "text_tokens": geometry.text_tokens, "text_position": geometry.text_position}
