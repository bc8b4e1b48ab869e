"""AdaSpa: exact block-mass search, row-wise top-k, head-adaptive budgets, reused across steps.

Paper: "Training-free and Adaptive Sparse Attention for Efficient Long Video Generation", Xia et al., arXiv 2502.21079
(v1; ICCV 2025): Sec. 4.2 (Fused LSE-Cached Search, Alg. 1-2; head-adaptive hierarchical budgets), Sec. 4.3 (block 64,
sparsity 0.8, text sink, row-wise selection), Sec. 5 / Fig. 7 (50 steps, 10 dense, Ts = {10, 30}). Official code: none
public (the paper's kernel builds on mit-han-lab/Block-Sparse-Attention).

Pattern: the sequence is cut into ``block_size``-token blocks (video and text in
separate blocks). A search step computes the softmax mass of every (query block, key
block) pair with :func:`sparsecore.search.block_mass`; every video query-block row
keeps its ``k_h`` heaviest video key blocks ("row wise"), every row keeps all text
blocks and text rows keep everything ("text sink"). ``k_h = round((1 - s_h) NB_video)``
with the per-head sparsity ``s_h``: at base sparsity ``s`` each head's recall (mass
kept / total mass) is measured, ``n`` = heads with recall > 0.8, the ``n`` best get
``(1+s)/2`` and the ``n`` worst ``(3s-1)/2``; the rest keep ``s``.

Schedule (:class:`AdaSpaSession`, 0-based steps): steps before the first search are
dense; later search steps reuse the first search's LSE (only pass 2: LSE-Cached Search)
and apply their new mask at once; steps in between reuse the last mask of their layer.
The first search: by default (``first_search="auto"``: ``"cached"``, ours, after a dense step) the
step before it keeps its dense pass's LSE and the first search is a cached one too, whose mask
serves that step at once; with ``first_search="fused"`` (the paper's Fused Online Search) that step's
output is dense and the search runs with that output's LSE when the caller has it (the
integration does), else computes one. Why ours is the default: the paper's first search
costs a dense pass plus a mass pass (1.76x a dense step on an H200 at Wan 2.1 1.3B 6x),
ours 0.97x, on an LSE one step old where the paper's own cached searches use one twenty
steps old (its Observation 2: the LSE barely moves between steps).

Everything after the block masses runs on their device, for all heads at once: one
ranked top-k per (head, video row) up to the largest budget any head can get, each
head's recall from the top ``k`` of its base budget plus the text sink's mass, the
head-adaptive ranking (an all-gather of the recalls under a head shard), and the CSR
built by scatter. The mask's size depends on the ranking, so a search reads one small
vector back (its size, head sparsities and recalls for ``meta``); reuse steps read nothing.

Where the paper is silent, we chose:

- ``n > H/2`` (the best and worst groups would overlap): ``n`` is capped at
  ``floor(H/2)``, so the groups are disjoint and the mean sparsity stays ``s``.
- ``s < 1/3`` (``(3s-1)/2 < 0``): the offset ``delta = min((1-s)/2, s)``; heads get
  ``s + delta`` / ``s - delta`` (the paper's values for ``s >= 1/3``), keeping the mean.
- Ranking ties between heads: stable order (lower head index counts as better).
- Budgets are counted in video key blocks (text blocks are always extra) and rounded to the nearest count, at
  least 1; ``budgets`` in the IR hold the continuous ``1 - s_h`` the method asked for.
- Block masses are summed over the batch (e.g. the two CFG branches): the IR has one
  mask per head for the whole batch.
- Step indexing is 0-based: steps 0-9 dense, search at 10 and 30 (the paper's "first 10 steps dense", Ts = {10, 30}).
- Dense steps' IR: frame-sized blocks (cheaper at long lengths; same attention).
- The stateless :func:`plan` searches at every non-warmup step; reuse lives in the session.
- A layer that missed a search step (a block cache did not run its block there, or a ``set_step`` went past it)
  searches at the next step it runs (``"cached-search"``, on its kept LSE, else the step's own): the search late.
- Frame-causal geometries: budgets are fractions of the blocks a row may see (:mod:`.causal`), whose masses
  alone are computed (a later block's mass is 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sparsecore.geometry import VideoGeometry
from sparsecore.ir import BlockMask
from sparsecore.ir.uploads import moved
from sparsecore.ir.validation import check_bool, check_int
from sparsecore.search import block_mass

from . import causal
from .contract import (MAX_STEPS, HeadShard, StepAction, check_fraction, check_geometry, check_int_tuple,
                       check_layer, check_lse, check_num_steps, check_qk, check_scale, check_search_steps, check_shard,
                       check_step, fixed_block_offsets, geometry_meta, params_from, shown)
from .approximation import check_approximation, check_causal, unselected_of, with_unselected
from .selection import SinkLayout, dense_mask, keep_count, rows_from_top, selection_nnz, sink_mask, top_video

METHOD = "adaspa"
PAPER = "arXiv:2502.21079"


FIRST_SEARCHES = ("auto", "cached", "fused")


@dataclass(frozen=True)
class AdaSpaParams:
    """AdaSpa's parameters (paper defaults), checked once.

    ``sparsity``: base fraction of video key blocks dropped per row (0.8). ``block_size``: tokens per
    block (64). ``head_adaptive``: three budget levels by recall (True). ``recall_threshold``: what
    counts as a good recall (0.8). ``warmup_steps``: leading dense steps (10). ``search_steps``:
    0-based steps that search (10, 30). ``scale``: softmax scale (None: 1/sqrt(D)). ``impl``:
    block-mass implementation (``"auto"``, ``"torch"`` or a backend's name). ``approximation``: what
    rows get from the blocks they do not keep (``"drop"``, AdaSpa's own; PASA's ``"grouped-first-order"``
    (groups of 32 key blocks, or ``"grouped-first-order:<blocks>"``), ``"global-first-order"``, ``"zeroth"``;
    :mod:`.approximation`). ``first_search``: ``"cached"`` (the step before the first search keeps its
    dense pass's LSE, and the first search is an LSE-cached search whose mask serves that step at once; ours,
    see :class:`AdaSpaSession`), ``"fused"`` (the paper's Fused Online Search: the first search step's output
    is dense and its masses use that pass's own LSE), or ``"auto"`` (default): ``"cached"`` when a step
    precedes the first search, else ``"fused"`` (:attr:`first_search_kind`).
    """

    sparsity: float = 0.8
    block_size: int = 64
    head_adaptive: bool = True
    recall_threshold: float = 0.8
    warmup_steps: int = 10
    search_steps: tuple[int, ...] = (10, 30)
    scale: float | None = None
    impl: str = "auto"
    approximation: str = "drop"
    first_search: str = "auto"

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "sparsity", check_fraction(self.sparsity, "sparsity"))
        set_(self, "recall_threshold", check_fraction(self.recall_threshold, "recall_threshold"))
        set_(self, "block_size", check_int(self.block_size, "block_size", 1))
        set_(self, "warmup_steps", check_int(self.warmup_steps, "warmup_steps", 0))
        set_(self, "head_adaptive", check_bool(self.head_adaptive, "head_adaptive"))
        set_(self, "search_steps", check_int_tuple(self.search_steps, "search_steps", MAX_STEPS, "steps"))
        set_(self, "scale", check_scale(self.scale))
        set_(self, "approximation", check_approximation(self.approximation))
        if not isinstance(self.impl, str):
            raise TypeError(f"impl: expected a block-mass implementation name such as 'auto', got {self.impl!r}")
        if not isinstance(self.first_search, str):
            raise TypeError(f"first_search: expected one of {list(FIRST_SEARCHES)}, got "
                            f"{type(self.first_search).__name__}")
        if self.first_search not in FIRST_SEARCHES:
            raise ValueError(f"first_search: expected one of {list(FIRST_SEARCHES)}, got {self.first_search!r}")
        if self.first_search == "cached" and (not self.search_steps or self.search_steps[0] < 1):
            raise ValueError(f"first_search='cached' takes the LSE of the step before the first search, got "
                             f"search_steps={shown(self.search_steps)}; search from step 1 on, or use 'fused'")

    @property
    def first_search_kind(self) -> str:
        """The first search as it runs: ``first_search``, with ``"auto"`` resolved."""
        if self.first_search != "auto":
            return self.first_search
        return "cached" if self.search_steps and self.search_steps[0] >= 1 else "fused"

    def meta(self) -> dict[str, Any]:
        return {**vars(self), "search_steps": list(self.search_steps), "first_search": self.first_search_kind}


def head_sparsities(recalls: torch.Tensor, sparsity: float, threshold: float = 0.8) -> torch.Tensor:
    """Per-head sparsity from per-head recall at the base sparsity (three levels, mean = ``sparsity``).

    ``recalls``: float tensor ``[H]`` (any device). ``n`` = heads with recall above ``threshold``,
    capped at ``H // 2``; the ``n`` best get ``s + delta``, the ``n`` worst ``s - delta``.
    """
    recalls = torch.as_tensor(recalls, dtype=torch.float64)
    heads = recalls.shape[0]
    n = torch.clamp((recalls > threshold).sum(), max=heads // 2)
    delta = min((1.0 - sparsity) / 2.0, sparsity)
    order = torch.argsort(-recalls, stable=True)                           # best recall first
    rank = torch.empty_like(order)
    rank[order] = torch.arange(heads, device=recalls.device)
    return sparsity + delta * (rank < n).double() - delta * (rank >= heads - n).double()


@dataclass(frozen=True)
class Search:
    """One search's outcome: the mask and the LSE the search used (cached by the session for later searches)."""

    mask: BlockMask
    lse: torch.Tensor | None


def search(mass: torch.Tensor, geometry: VideoGeometry, offsets: Any, p: AdaSpaParams, shard: HeadShard,
           meta: dict[str, Any], *, finite_check: bool = False) -> BlockMask:
    """The mask from block masses ``[H, MB, NB]`` of ``shard``'s heads (row-wise top-k, text sink, budgets).

    The head-adaptive ranking runs over every head's recall (``shard.all_heads``). ``meta`` gains
    ``head_sparsity`` and ``base_recall`` of all heads.
    """
    layout = SinkLayout.of(geometry, offsets)
    video_blocks, s = layout.video_blocks, p.sparsity
    base_keep = keep_count(1.0 - s, video_blocks)
    delta = min((1.0 - s) / 2.0, s)
    max_keep = keep_count(1.0 - (s - delta), video_blocks) if p.head_adaptive else base_keep
    rows = causal.Visibility.of(geometry, offsets, mass.device)   # under causal frames: hidden blocks rank last
    mass = rows.hide(mass)
    top = top_video(mass, layout, max(max_keep, base_keep), ranked=True)
    f64, sums = torch.float64, dict(dim=(1, 2), dtype=torch.float64)    # float64 sums, no float64 copy of masses
    forced = mass[:, :, layout.text].sum(**sums) + mass[:, layout.text, layout.video].sum(**sums)
    kept, total = rows.prefix_sums(top.values, base_keep, 1.0 - s), mass.sum(**sums) + rows.hidden_pairs
    recall = ((kept + forced) / total.clamp(min=torch.finfo(f64).tiny)).clamp(max=1.0)   # ties: head order below
    usable = torch.isfinite(total) & (total > 0)           # not: NaN inputs, or masses vanished under a cached LSE
    recalls = shard.all_heads(torch.where(usable, torch.round(recall * 1e12) / 1e12, -1.0))   # every rank sees it
    sparsities = head_sparsities(recalls, s, p.recall_threshold) if p.head_adaptive else torch.full_like(recalls, s)
    keep = rows.keep_counts(1.0 - sparsities[shard.start:shard.stop], video_blocks)
    entries = keep.sum() if rows.causal else selection_nnz(layout, shard.size, (keep + layout.text_blocks).sum())
    finite = (recalls >= 0).all().double()
    summary = torch.cat([entries.double().reshape(1), finite.reshape(1), sparsities, recalls]).tolist()  # one read
    if finite_check and not summary[1]:
        raise ValueError(f"lse: the cached LSE is far from the scores of layer {meta['layer']} at step "
                         f"{meta['step']} (block masses overflow float32 or all vanish), or q, k hold NaN or inf; a "
                         f"cached search needs inputs close to those of the search step that made the LSE, as "
                         f"consecutive denoising steps are; pass lse=None (or make this step the first of "
                         f"search_steps) for a fresh search")
    if not summary[1]:
        raise ValueError(f"q, k: the block masses of layer {meta['layer']} at step {meta['step']} are not finite or "
                         f"all 0: q or k holds NaN or inf, or a given mass is; check the model's activations here")
    meta.update(head_sparsity=summary[-2 * shard.total:-shard.total], base_recall=summary[-shard.total:])
    mask = sink_mask(rows_from_top(top, layout, keep), layout, offsets, int(summary[0]),
                     1.0 - sparsities[shard.start:shard.stop], meta)
    return with_unselected(mask, unselected_of(p.approximation, 32), geometry)


def plan(geometry: VideoGeometry, num_heads: int, *, step: int, layer: int | None = None, q: Any = None,
         k: Any = None, lse: torch.Tensor | None = None, mass: Any = None, heads: HeadShard | None = None,
         **params: Any) -> BlockMask:
    """The AdaSpa mask from one search at ``step`` (dense before ``warmup_steps``).

    Args:
        geometry, num_heads: the layout and heads of the mask.
        step: denoising step (0-based); recorded in ``meta``.
        layer: recorded in ``meta``.
        q, k: ``[B, H, L, D]`` / ``[B, H_kv, L, D]`` (or without B) for the search.
        lse: float32 ``[B, H, L]`` natural-log LSE of a dense pass (``kernel(..., return_lse=True)``; ``[H, L]``
            with q, k without B), possibly from an earlier step (cached search); None computes a fresh one.
        mass: precomputed block masses ``[H, MB, NB]`` on ``block_size`` blocks instead of q, k.
        heads: a :class:`~.contract.HeadShard`: q, k, lse and mass hold only its heads, and so does the mask.
        **params: :class:`AdaSpaParams` fields.
    """
    shard = check_shard(heads, check_geometry(geometry, num_heads))
    p = params_from(AdaSpaParams, METHOD, params)
    step, layer = check_step(step), check_layer(layer)
    if step < p.warmup_steps:
        return dense_mask(geometry, shard.size, _meta(geometry, p, layer, step, "dense"))
    return _search(geometry, shard, p, layer, step, q, k, lse, mass, "search").mask


STORES = ("host", "device")


class AdaSpaSession:
    """Per-run AdaSpa state: per layer, the last searched mask and the first search's LSE (see :class:`Session`).

    ``store``: where that state waits between steps. ``"host"`` (default): in pinned host memory (the
    search copies it there, and :meth:`plan` returns the host copy; the caller moves it to its device
    for each call: :meth:`BlockMask.copy_to`), so the device holds no layer's lists while the others
    run. ``"device"``: where it was made, so a reuse step only launches. Measured on an H200 at Wan 2.1
    1.3B 6x (30 layers of 64-token-block lists and LSEs, 2.6 GiB): ``"host"`` keeps the peak at dense
    attention's (7.57 GiB compiled, against 10.19 with ``"device"``) for reuse steps 0.7-1.2% slower
    (each call copies its layer's lists, about 60 MB) and a first search 1.7-2 s slower (pinned memory
    is allocated once per process). On a CPU both are the same memory.

    ``first_search="cached"`` (the default when a step precedes the first search): the step before the first
    search step (``"dense-lse"``) runs dense attention that returns its LSE, which the session keeps; the first
    search step is then an LSE-cached search on it (pass 2 only, no dense pass) whose mask serves that step
    and the next ones, and later searches reuse the same LSE. It trades the paper's dense output and fresh LSE
    at one step (the LSE is one step older: the paper's Observation 2 is that it barely changes across steps)
    for a first search step that costs about a cached one instead of a dense pass plus the mass pass.
    """

    method = METHOD

    def __init__(self, num_steps: int, store: str = "host", **params: Any) -> None:
        self.num_steps = check_num_steps(num_steps)
        if not isinstance(store, str):
            raise TypeError(f"store: expected one of {list(STORES)}, got {type(store).__name__}")
        if store not in STORES:
            raise ValueError(f"store: expected one of {list(STORES)} (where searched masks wait between steps), "
                             f"got {store!r}")
        self.store = store
        self.params = params_from(AdaSpaParams, METHOD, params)
        check_search_steps(METHOD, self.params.warmup_steps, self.params.search_steps, self.num_steps, params)
        self._masks: dict[int, BlockMask] = {}
        self._searched: dict[int, int] = {}         # per layer: the step of its last search
        self._lse: dict[int, torch.Tensor] = {}
        self._inputs: dict[int, tuple] = {}         # per layer: the geometry and heads its search and LSE are of

    def action(self, geometry: VideoGeometry | None, step: int, layer: int | None = None) -> StepAction:
        step = check_step(step, self.num_steps)
        check_causal(unselected_of(self.params.approximation, 32), geometry)       # at any step: dense ones too
        searches, held, reuse = self.params.search_steps, self.store == "host", self.params.scale is None
        cached_first = self.params.first_search_kind == "cached"    # reuse: a dense pass's LSE is at 1/sqrt(D)
        if step < searches[0]:
            if cached_first and step == searches[0] - 1:      # an LSE for the first (cached) search
                return StepAction("dense-lse", dense=True, plans=True, needs_qk=True, wants_lse=reuse, held=held)
            return StepAction("dense", dense=True, plans=False)
        if step == searches[0] and not cached_first:     # masses from the dense pass (not causal): default impl too
            fused = reuse and self.params.impl == "auto" and not (geometry is not None and geometry.causal_frames)
            return StepAction("search", dense=True, plans=True, needs_qk=True, wants_lse=reuse,
                              mass_block_size=self.params.block_size if fused else None, held=held)
        due = max(s for s in searches if s <= step)          # a layer that skipped it (a block cache) searches now
        if step in searches or (layer is not None and self._searched.get(layer, -1) < due):
            return StepAction("cached-search", dense=False, plans=True, needs_qk=True, held=held)
        return StepAction("reuse", dense=False, plans=True, held=held)

    def plan(self, geometry: VideoGeometry, num_heads: int, *, step: int, layer: int | None = None,
             q: Any = None, k: Any = None, lse: torch.Tensor | None = None, mass: Any = None,
             heads: HeadShard | None = None) -> BlockMask:
        """The mask for ``(layer, step)``: dense (warm-up), searched (search steps) or the layer's last search.

        With ``first_search="fused"``, at the first search step the returned mask is the one searched
        for the next steps (the step's own output is dense: :meth:`action`); ``lse`` there is the LSE
        of that dense output (it skips pass 1), and ``mass`` (with that ``lse``) the block masses
        ``[H, MB, NB]`` of this step's q, k from the same pass
        (:func:`sparsecore.search.dense_attention_with_mass`; no pass 2 then). With ``"cached"``,
        ``lse`` at the step before the first search is that step's dense pass's LSE, which the
        session keeps (computed from q, k when not given). ``heads``: plan only this shard (the same
        shard at every step of the run).
        """
        layer = check_layer(layer)
        shard = check_shard(heads, check_geometry(geometry, num_heads))
        action = self.action(geometry, step, layer)
        p = self.params
        if action.dense and not action.plans:
            return dense_mask(geometry, shard.size, _meta(geometry, p, layer, step, "dense"))
        if layer is None:
            raise ValueError("layer: expected the layer's index (an int >= 0), got None: a session keeps one search "
                             "per layer, so every layer needs its own index (adaspa.plan() makes one-off masks)")
        inputs = (geometry, shard.start, shard.stop, shard.total)
        if action.label == "dense-lse":
            self._keep_lse(layer, geometry, shard, q, k, lse)
            return dense_mask(geometry, shard.size, _meta(geometry, p, layer, step, action.label))
        if action.label == "search":
            if mass is not None and lse is None:
                later = shown(p.search_steps[1:]) if p.search_steps[1:] else "later"
                raise ValueError(f"lse: the first search step's masses need the LSE of the same dense pass (to "
                                 f"cache for step {later} searches), got mass without lse")
            found = _search(geometry, shard, p, layer, step, q, k, lse, mass, action.label)
            self._masks[layer], self._lse[layer] = self._stored(found.mask), self._stored(found.lse)
            self._inputs[layer], self._searched[layer] = inputs, step
            return self._masks[layer]
        if self._inputs.get(layer, inputs) != inputs:
            raise ValueError("geometry, heads: layer {} at step {} ({}) asks for {} and heads [{}, {}) of {}, but its "
                             "search was for {} and heads [{}, {}) of {}; AdaSpa reuses a layer's search for the same "
                             "video and heads: start a new session (run) when they change".format(
                                 layer, step, action.label, *inputs, *self._inputs[layer]))
        if action.label == "cached-search":
            if layer not in self._lse:   # none kept (Wan 2.2's 2nd expert ran the step before, a cache skipped it)
                self._keep_lse(layer, geometry, shard, q, k, lse)                # this step's own LSE
            lse = self._lse[layer]
            if isinstance(q, torch.Tensor):        # a batch of another size (CFG stopped): this search's own LSE
                lse = moved(lse, q.device) if lse.shape[0] == (q.shape[0] if q.dim() == 4 else 1) else None
            self._masks[layer] = self._stored(_search(geometry, shard, p, layer, step, q, k, lse, None,
                                                      action.label).mask)
            self._searched[layer] = step
        return self._masks[layer]

    def _keep_lse(self, layer: int, geometry: VideoGeometry, shard: HeadShard, q: Any, k: Any,
                  lse: torch.Tensor | None) -> None:
        """Keep ``lse`` for the layer's cached searches; when it was not handed over (a caller whose dense pass gave
        none), the LSE of one more dense pass over q, k."""
        if (lse := check_lse(lse, q, geometry, shard.size)) is None:
            q, k = check_qk(q, k, geometry, shard)
            lse = causal.visible_lse(q, k, geometry, self.params.scale)
        self._lse[layer], self._inputs[layer] = self._stored(lse), (geometry, shard.start, shard.stop, shard.total)

    def _stored(self, found: Any) -> Any:
        """A search's mask or LSE as this session keeps it (``store``)."""
        if self.store == "device" or found is None:
            return found
        if isinstance(found, BlockMask):
            return found if found.on_host else found.copy_to("cpu")
        return moved(found, torch.device("cpu"))

    def cached_mask(self, layer: int) -> BlockMask:
        """The last searched mask of ``layer``."""
        if layer not in self._masks:
            raise KeyError(f"layer={layer!r}: nothing searched yet")
        return self._masks[layer]


def session(num_steps: int = 50, store: str = "host", **params: Any) -> AdaSpaSession:
    """An :class:`AdaSpaSession` for a run of ``num_steps`` denoising steps (paper: 50); ``store``: where its masks
    wait between steps (``"host"`` or ``"device"``)."""
    return AdaSpaSession(num_steps, store, **params)


def _search(geometry: VideoGeometry, shard: HeadShard, p: AdaSpaParams, layer: Any, step: int, q: Any, k: Any,
            lse: torch.Tensor | None, mass: Any, action: str) -> Search:
    offsets, lse = fixed_block_offsets(geometry, shard.size, p.block_size), check_lse(lse, q, geometry, shard.size)
    blocks, lse_used, given_mass, fresh = len(offsets) - 1, lse, mass is not None, lse is None
    source = "given" if not fresh else "none" if given_mass else "fresh"       # meta["lse"]: masses given, no LSE
    if mass is None:
        q, k = check_qk(q, k, geometry, shard)
        if fresh:                                   # over the keys each row may see (all without causal frames)
            lse = causal.visible_lse(q, k, geometry, p.scale)
        visible = causal.visible_counts(geometry, offsets)
        result = block_mass(q, k, offsets, offsets, lse=lse, scale=p.scale, visible=visible, impl=p.impl)
        mass, lse_used = result.mass.sum(0), result.lse
    else:
        mass = torch.as_tensor(mass)
        if tuple(mass.shape) != (shard.size, blocks, blocks) or not mass.is_floating_point():
            raise ValueError(f"mass: expected float block masses [{shard.size}, {blocks}, {blocks}] on "
                             f"{p.block_size}-token blocks, got {mass.dtype} {list(mass.shape)}")
        causal.check_masses(mass, geometry)
    meta = {**_meta(geometry, p, layer, step, action), "lse": source}
    mask = search(mass, geometry, offsets, p, shard, meta, finite_check=not fresh and not given_mass)
    return Search(mask, lse_used)


def _meta(geometry: VideoGeometry, p: AdaSpaParams, layer: Any, step: int, action: str) -> dict[str, Any]:
    return {"method": METHOD, "paper": PAPER, "layer": layer, "step": step, "action": action, "params": p.meta(),
            "geometry": geometry_meta(geometry)}
