"""AdaSpa: exact block-mass search, row-wise top-k, head-adaptive budgets, reused across steps.

Paper: "Training-free and Adaptive Sparse Attention for Efficient Long Video
Generation", Xia et al., arXiv 2502.21079 (v1; ICCV 2025): Sec. 4.2 (Fused LSE-Cached
Search, Alg. 1-2; head-adaptive hierarchical budgets), Sec. 4.3 (block 64, sparsity
0.8, text sink, row-wise selection), Sec. 5 / Fig. 7 (50 steps, 10 dense, Ts = {10, 30}).
Official code: none public (the paper's kernel builds on mit-han-lab/Block-Sparse-Attention).

Pattern: the sequence is cut into ``block_size``-token blocks (video and text in
separate blocks). A search step computes the softmax mass of every (query block, key
block) pair with :func:`sparsecore.search.block_mass`; every video query-block row
keeps its ``k_h`` heaviest video key blocks ("row wise"), every row keeps all text
blocks and text rows keep everything ("text sink"). ``k_h = round((1 - s_h) NB_video)``
with the per-head sparsity ``s_h``: at base sparsity ``s`` each head's recall (mass
kept / total mass) is measured, ``n`` = heads with recall > 0.8, the ``n`` best get
``(1+s)/2`` and the ``n`` worst ``(3s-1)/2``; the rest keep ``s``.

Schedule (:class:`AdaSpaSession`, 0-based steps): steps ``< warmup_steps`` are dense;
at the first search step the output is dense and the search runs with a fresh LSE
(Fused Online Search, both passes); later search steps reuse that step's LSE (only
pass 2: LSE-Cached Search) and apply their new mask at once; steps in between reuse
the last mask of their layer.

Where the paper is silent, we chose:

- ``n > H/2`` (the best and worst groups would overlap): ``n`` is capped at
  ``floor(H/2)``, so the groups are disjoint and the mean sparsity stays ``s``.
- ``s < 1/3`` (``(3s-1)/2 < 0``): the offset ``delta = min((1-s)/2, s)``; heads get
  ``s + delta`` / ``s - delta`` (the paper's values for ``s >= 1/3``), keeping the mean.
- Ranking ties between heads: stable order (lower head index counts as better).
- Budgets are counted in video key blocks (text blocks are always extra) and rounded
  to the nearest count, at least 1; ``budgets`` in the IR hold the continuous
  ``1 - s_h`` the method asked for.
- Block masses are summed over the batch (e.g. the two CFG branches): the IR has one
  mask per head for the whole batch.
- Step indexing is 0-based: steps 0-9 dense, search at 10 and 30 (the paper's "first
  10 steps dense" with Ts = {10, 30}).
- The dense IR of dense steps uses frame-sized blocks (cheaper to plan and lower at
  long lengths; same attention).
- The stateless :func:`plan` searches at every non-warmup step (fresh LSE unless one is
  passed); the cross-step reuse lives in the session.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from sparsecore.geometry import VideoGeometry
from sparsecore.ir import BlockMask
from sparsecore.search import block_mass

from .common import (HeadRows, HeadShard, check_fraction, check_geometry, check_int, check_params, check_qk,
                     check_shard, check_step, dense_mask, geometry_meta, keep_count, mask_from_rows, text_sink,
                     topk_rows)

METHOD = "adaspa"
PAPER = "arXiv:2502.21079"
DEFAULTS: dict[str, Any] = {
    "sparsity": 0.8,
    "block_size": 64,
    "head_adaptive": True,
    "recall_threshold": 0.8,
    "warmup_steps": 10,
    "search_steps": (10, 30),
    "scale": None,
    "impl": "auto",
}


def head_sparsities(recalls: np.ndarray, sparsity: float, threshold: float = 0.8) -> np.ndarray:
    """Per-head sparsity from per-head recall at the base sparsity (three levels, mean = ``sparsity``)."""
    recalls = np.asarray(recalls, dtype=np.float64)
    heads = len(recalls)
    n = min(int((recalls > threshold).sum()), heads // 2)
    delta = min((1.0 - sparsity) / 2.0, sparsity)
    out = np.full(heads, sparsity)
    order = np.argsort(-recalls, kind="stable")          # best recall first
    if n:
        out[order[:n]] = sparsity + delta
        out[order[heads - n:]] = sparsity - delta
    return out


def select(mass: torch.Tensor, geometry: VideoGeometry, offsets: np.ndarray, *, sparsity: float,
           head_adaptive: bool = True, recall_threshold: float = 0.8,
           shard: HeadShard | None = None) -> tuple[list[HeadRows], np.ndarray, np.ndarray]:
    """From block masses ``[H, MB, NB]``: (rows per head, head sparsities, recall at the base sparsity).

    With a ``shard``, ``mass`` holds that shard's heads; the head-adaptive ranking runs over every
    head's recall (``shard.all_heads``), and sparsities and recalls are returned for all heads.
    """
    heads = mass.shape[0]
    shard = HeadShard(0, heads, heads) if shard is None else shard
    text, video = text_sink(geometry, offsets)
    video_blocks = int(video.sum())
    base_keep = keep_count(1.0 - sparsity, video_blocks)
    text_index = torch.from_numpy(np.nonzero(text)[0]).to(mass.device)
    video_index = torch.from_numpy(np.nonzero(video)[0]).to(mass.device)
    rows, recalls = [], np.empty(heads)
    for h in range(heads):
        head_rows, kept = topk_rows(mass[h], base_keep, text)
        m = mass[h].double()
        forced = m[:, text_index].sum() + m[text_index][:, video_index].sum()   # the text sink's mass
        recalls[h] = (kept + float(forced)) / max(float(m.sum()), np.finfo(np.float64).tiny)
        rows.append(head_rows)
    recalls = shard.all_heads(recalls)
    if not head_adaptive:
        return rows, np.full(shard.total, sparsity), recalls
    sparsities = head_sparsities(recalls, sparsity, recall_threshold)
    for h in range(heads):
        keep = keep_count(1.0 - sparsities[shard.start + h], video_blocks)
        if keep != base_keep:
            rows[h] = topk_rows(mass[h], keep, text)[0]
    return rows, sparsities, recalls


def plan(geometry: VideoGeometry, num_heads: int, *, step: int, layer: int | None = None, q: Any = None,
         k: Any = None, lse: torch.Tensor | None = None, mass: Any = None, heads: HeadShard | None = None,
         **params: Any) -> BlockMask:
    """The AdaSpa mask from one search at ``step`` (dense before ``warmup_steps``).

    Args:
        geometry, num_heads: the layout and heads of the mask.
        step: denoising step (0-based); recorded in ``meta``.
        layer: recorded in ``meta``.
        q, k: ``[B, H, L, D]`` / ``[B, H_kv, L, D]`` (or without B) for the search.
        lse: float32 ``[B, H, L]`` natural-log LSE of a dense pass (``kernel(..., return_lse=True)``),
            possibly from an earlier step (cached search); None computes a fresh one.
        mass: precomputed block masses ``[H, MB, NB]`` on ``block_size`` blocks instead of q, k.
        heads: a :class:`~.common.HeadShard`: q, k, lse and mass hold only its heads, and so does the mask.
        **params: ``sparsity`` (0.8), ``block_size`` (64), ``head_adaptive`` (True),
            ``recall_threshold`` (0.8), ``warmup_steps`` (10), ``scale`` (None: 1/sqrt(D)),
            ``impl`` (block-mass implementation, ``"auto"``). ``search_steps`` is used by sessions.
    """
    shard = check_shard(heads, check_geometry(geometry, num_heads))
    p = _params(params)
    step = check_step(step)
    if step < p["warmup_steps"]:
        return dense_mask(geometry, shard.size, _meta(geometry, p, layer, step, "dense"))
    return _search(geometry, shard, p, layer, step, q, k, lse, mass, "search")[0]


class AdaSpaSession:
    """Per-run AdaSpa state: per layer, the last searched mask and the first search's LSE.

    ``action(step)`` is ``"dense"`` (warmup), ``"search"`` (first search: output dense,
    mask searched with a fresh LSE), ``"cached-search"`` (later search with the cached
    LSE; the new mask applies now) or ``"reuse"``. ``plan`` returns the mask to run at
    ``step`` for ``layer`` and needs q, k only at search steps.
    """

    def __init__(self, num_steps: int, **params: Any) -> None:
        self.num_steps = check_int(num_steps, "num_steps", 1)
        self.params = _params(params)
        searches = self.params["search_steps"]
        if not searches or any(s < self.params["warmup_steps"] or s >= self.num_steps for s in searches):
            raise ValueError(f"search_steps: expected steps in [warmup_steps={self.params['warmup_steps']}, "
                             f"num_steps={self.num_steps}), got {list(searches)}")
        self._masks: dict[Any, BlockMask] = {}
        self._lse: dict[Any, torch.Tensor] = {}

    def action(self, step: int) -> str:
        step = check_step(step, self.num_steps)
        searches = self.params["search_steps"]
        if step < searches[0]:
            return "dense"
        if step == searches[0]:
            return "search"
        return "cached-search" if step in searches else "reuse"

    def plan(self, geometry: VideoGeometry, num_heads: int, *, step: int, layer: int | None = None,
             q: Any = None, k: Any = None, lse: torch.Tensor | None = None,
             heads: HeadShard | None = None) -> BlockMask:
        """The mask for ``(layer, step)``; ``lse`` at the first search skips pass 1 (a dense pass's LSE).

        ``heads``: plan only this :class:`~.common.HeadShard` (q, k, lse of its heads; the same
        shard at every step of the run).
        """
        action = self.action(step)
        p = self.params
        shard = check_shard(heads, check_geometry(geometry, num_heads))
        if action == "dense":
            return dense_mask(geometry, shard.size, _meta(geometry, p, layer, step, "dense"))
        if action == "search":
            mask, fresh = _search(geometry, shard, p, layer, step, q, k, lse, None, action)
            self._masks[layer], self._lse[layer] = mask, fresh
            return dense_mask(geometry, shard.size, _meta(geometry, p, layer, step, "search"))
        if layer not in self._lse:
            raise ValueError(f"layer={layer!r}: no search result cached for this layer at step {step} ({action}); "
                             f"call plan at the first search step {p['search_steps'][0]} for every layer first")
        if action == "cached-search":
            self._masks[layer] = _search(geometry, shard, p, layer, step, q, k, self._lse[layer], None,
                                         action)[0]
        return self._masks[layer]

    def cached_mask(self, layer: int | None = None) -> BlockMask:
        """The last searched mask of ``layer`` (e.g. to inspect it at the first search step)."""
        if layer not in self._masks:
            raise KeyError(f"layer={layer!r}: nothing searched yet")
        return self._masks[layer]


def session(num_steps: int = 50, **params: Any) -> AdaSpaSession:
    """An :class:`AdaSpaSession` for a run of ``num_steps`` denoising steps (paper: 50)."""
    return AdaSpaSession(num_steps, **params)


def _search(geometry: VideoGeometry, shard: HeadShard, p: dict, layer: Any, step: int, q: Any, k: Any,
            lse: torch.Tensor | None, mass: Any, action: str) -> tuple[BlockMask, torch.Tensor | None]:
    offsets = geometry.block_offsets(p["block_size"])
    blocks = len(offsets) - 1
    num_heads = shard.size
    lse_used = None
    if mass is None:
        q, k = check_qk(q, k, geometry, num_heads)
        result = block_mass(q, k, offsets, offsets, lse=lse, scale=p["scale"], impl=p["impl"])
        mass, lse_used = result.mass.sum(0), result.lse
        if lse is not None and not bool(torch.isfinite(mass).all()):
            raise ValueError(f"lse: the cached LSE is far below the scores of layer {layer} at step {step} (block "
                             f"masses overflow float32); a cached search needs inputs close to those of the search "
                             f"step that made the LSE, as consecutive denoising steps are; pass lse=None (or make "
                             f"this step the first of search_steps) for a fresh search")
    else:
        mass = torch.as_tensor(mass)
        if tuple(mass.shape) != (num_heads, blocks, blocks) or not mass.is_floating_point():
            raise ValueError(f"mass: expected float block masses [{num_heads}, {blocks}, {blocks}] on "
                             f"{p['block_size']}-token blocks, got {mass.dtype} {list(mass.shape)}")
    rows, sparsities, recalls = select(mass, geometry, offsets, sparsity=p["sparsity"],
                                       head_adaptive=p["head_adaptive"], recall_threshold=p["recall_threshold"],
                                       shard=shard)
    meta = _meta(geometry, p, layer, step, action)
    meta.update(head_sparsity=sparsities.tolist(), base_recall=recalls.tolist(),
                lse="fresh" if lse is None else "given")
    budgets = 1.0 - sparsities[shard.start:shard.stop]
    return mask_from_rows(rows, offsets, offsets, budgets=budgets, meta=meta), lse_used


def _meta(geometry: VideoGeometry, p: dict, layer: Any, step: int, action: str) -> dict[str, Any]:
    params = {**p, "search_steps": list(p["search_steps"])}
    return {"method": METHOD, "paper": PAPER, "layer": layer, "step": step, "action": action, "params": params,
            "geometry": geometry_meta(geometry)}


def _params(params: dict[str, Any]) -> dict[str, Any]:
    p = check_params(params, DEFAULTS, METHOD)
    p["sparsity"] = check_fraction(p["sparsity"], "sparsity")
    p["recall_threshold"] = check_fraction(p["recall_threshold"], "recall_threshold")
    p["block_size"] = check_int(p["block_size"], "block_size", 1)
    p["warmup_steps"] = check_int(p["warmup_steps"], "warmup_steps", 0)
    if not isinstance(p["head_adaptive"], bool):
        raise TypeError(f"head_adaptive: expected a bool, got {p['head_adaptive']!r}")
    try:
        searches = tuple(sorted(check_int(s, "search_steps[i]", 0) for s in p["search_steps"]))
    except TypeError:
        raise TypeError(f"search_steps: expected a sequence of step ints, got {p['search_steps']!r}") from None
    if len(set(searches)) != len(searches):
        raise ValueError(f"search_steps: expected distinct steps, got {list(p['search_steps'])}")
    p["search_steps"] = searches
    return p
