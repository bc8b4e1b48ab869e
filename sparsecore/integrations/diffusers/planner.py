"""From one layer's q, k, v to its attention output: the method's decision, the mask, the kernel.

For every (layer, valid-token geometry) the first call of a step asks the method's session what the step does
(:meth:`Session.action`), plans the mask if it must (with q, k only when the method needs them), compiles it, and
keeps all of that for the other calls of the step (classifier-free guidance run as separate calls reuses it). A mask
the method makes from each call's q, k alone (``StepAction.per_call``: PASA's) is planned at every call and kept by
nothing after it, unless :attr:`Planner.keep_masks` is set: holding every layer's lists while the others run would put
them all on top of the model's peak memory (1.7 GiB at Wan 6x). Dense steps run the model's dense attention (the
processors' dispatch: FlashAttention-4's dense forward where measured faster, see
:meth:`.SparseProcessor.faster_dense`); a step whose action ``wants_lse`` runs dense attention that also returns its
LSE (:func:`sparsecore.search.dense_attention`, with its faster dense op unless ``apply(...,
dense_attention="model")``) (AdaSpa's step before its first search by default; with ``first_search="fused"`` the first
search step itself, which also takes the block masses where a backend gives them from the same pass,
:func:`sparsecore.search.dense_attention_with_mass`, and prepares the kernel of the searched mask there, so the step
after it only launches). One session per geometry, so batches whose text lengths differ (HunyuanVideo 1.5) keep
separate per-layer state.

Masks the session builds on the device stay there: nothing here hashes or copies them. A session may keep its masks in
host memory between steps (AdaSpa's ``store="host"``): such a mask is copied to the device at each call, compiled, and
dropped after the call. Masks whose valid tokens are a prefix of a padded sequence run extended by padding blocks that
no row lists (:meth:`BlockMask.with_padding`): output 0 on the padding, as the model's masked attention gives. Masks
that approximate their unlisted blocks (PASA) cannot be extended so (the padding would enter every row's
approximation): they run on the valid prefix alone and the padding rows' output is written as 0.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

import sparsecore
from sparsecore.geometry import VideoGeometry
from sparsecore.ir import BlockMask
from sparsecore.ir.host_facts import share_host_facts
from sparsecore.methods import SESSIONS, HeadShard, Session, StepAction
from sparsecore.methods.selection import dense_mask
from sparsecore.ordering import TokenOrder
from sparsecore.search import dense_attention, dense_attention_with_mass, dense_impl, faster_dense_allowed

from .audit import Audit, fidelity
from .callable_session import CallableSession, MethodProvider
from .head_groups import HeadGroupKernel
from .stats import Record, Stats
from .window_search import WindowSearch

FULL_MASKS = 64                       # full masks of dense steps kept, one per (geometry, heads, length)
VISIBLE_BLOCKS = "sparsecore visible blocks (frame-causal)"


def gathered(order: TokenOrder | None, tokens: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The first ``tokens`` of ``[B, S, H, D]`` tensors as ``[B, H, L, D]`` copies, in ``order`` where given (the
    order's gather is the copy)."""
    if order is None:
        return tuple(t.transpose(1, 2)[:, :, :tokens].contiguous() for t in tensors)
    return tuple(order.gather(t.transpose(1, 2)[:, :, :tokens], 2) for t in tensors)


def runs_dense(mask: BlockMask, geometry: VideoGeometry) -> bool:
    """``mask`` (on the host) keeps every token pair dense attention computes on ``geometry``: all of them, or under
    causal frames every visible pair (its dense mask, as the methods plan at dense steps), on any blocks. Such a
    mask runs the dense path, and nothing is compiled for it."""
    return mask.on_host and int(mask.kept_pairs().sum()) >= mask.num_heads * geometry.visible_pairs


@dataclass
class LayerPlan:
    """What one (layer, geometry) runs at one step: ``kernel`` None means dense attention.

    ``dense_out``: the output of the dense pass that also gave the search its LSE, handed to
    the call that planned (later calls of the step run dense attention again). ``prepared``: the
    runner of a mask planned at a dense step, prepared for the steps after it and held until then
    (a mask holds its kernels weakly). ``held``: ``mask`` is kept in host memory by its session
    (AdaSpa's ``store="host"``); each call copies it to its device and compiles that copy
    (:meth:`Planner.kernel_of`). ``per_call``: the method plans at every call (PASA), so a later call of the step
    plans again even where the plan is kept (``keep_masks``). ``order``: the mask is over the tokens in this order
    (``StepAction.token_order``): a call gathers q, k, v into it and its output back.
    """

    step: int
    mask: BlockMask | None
    kernel: Any
    record: Record
    dense_out: torch.Tensor | None = None
    prepared: Any = None
    held: bool = False
    per_call: bool = False
    order: TokenOrder | None = None
    seq_len: int = 0                # the sequence length (text padding included) its kernel was made for


@dataclass(frozen=True)
class PlanInputs:
    """What a plan needs from the call that makes it, for one process or one rank of a sequence split.

    ``sequence(with_values)``: q, k (and v) of the whole sequence, ``[B, H, L, D]`` over the valid
    tokens, text padding cut off (asked for only when the method needs them); ``rows``: this call's rows
    ``[B, S, h, D]`` of a whole-sequence dense output; ``runner``: what runs a (padded) mask (a compiled kernel, or
    a ring rank's cut of it); ``prepare``: do before the next step what that runner's first call would;
    ``whole``: the call holds the whole sequence, so a mask of head groups may run one kernel per group.
    """

    sequence: Callable[[bool], tuple]
    rows: Callable[[torch.Tensor], torch.Tensor]
    runner: Callable[[BlockMask], Any]
    prepare: Callable[[Any], None]
    whole: bool = False


class Planner:
    """Sessions, plans and kernels of one handle (see the module docstring)."""

    def __init__(self, method: str | MethodProvider, params: dict[str, Any], device: str, backend: str | None,
                 num_steps: int, stats: Stats, backend_options: dict[str, Any] | None = None,
                 faster_dense: bool = True) -> None:
        self.method = method
        self.params = params
        self.device = device
        self.backend = backend
        self.backend_options = dict(backend_options or {})
        self.faster_dense = faster_dense         # the dense passes that give a search its LSE may take a DenseOp
        self.num_steps = num_steps
        self.stats = stats
        self._sessions: dict[VideoGeometry, Session] = {}
        self._plans: dict[tuple[int, VideoGeometry], LayerPlan] = {}
        self.keep_masks = False                  # keep per-call plans too (for ``last_mask``), as other plans are
        self.audit: Audit | None = None          # which sparse calls are measured against dense attention
        self.window_search: WindowSearch | None = None      # STA's window search: every call dense, some measured
        self._full: OrderedDict[tuple, BlockMask] = OrderedDict()

    def new_run(self) -> None:
        """Forget the run's sessions and plans; the full masks of dense steps (and their kernels) stay for the
        next run of the same geometries."""
        self._sessions.clear()
        self._plans.clear()

    def release(self) -> None:
        """Forget everything held for runs: :meth:`new_run`, and the full masks with their kernels."""
        self.new_run()
        self._full.clear()

    def session(self, geometry: VideoGeometry) -> Session:
        found = self._sessions.get(geometry)
        if found is None:
            if callable(self.method):
                found = CallableSession(self.method, self.num_steps)
            else:
                params = self.params
                if geometry.frames > geometry.causal_frames > 0 and self.method == "pasa" and \
                        "approximation" not in params:  # PASA's default is not exact where causal frames hide blocks
                    params = {**params, "approximation": "drop"}
                found = SESSIONS[self.method](num_steps=self.num_steps, **params)
            self._sessions[geometry] = found
        return found

    def per_sample(self, geometry: VideoGeometry, step: int, layer: int) -> bool:
        """Whether the method's masks at ``(layer, step)`` are one sample's (:attr:`StepAction.per_sample`)."""
        return self.session(geometry).action(geometry, step, layer).per_sample

    def approximation(self, geometry: VideoGeometry) -> str | None:
        """What the method does with unkept blocks on ``geometry`` (None: a callable's, known from its masks only)."""
        params = self.session(geometry).params
        return None if params is None else params.approximation

    def token_order(self, geometry: VideoGeometry) -> str | None:
        """The name of the token order the method's masks are over where it is not the model's (STA's tiles)."""
        params = self.session(geometry).params
        return getattr(params, "token_order", None)

    def last_mask(self, layer: int) -> BlockMask | None:
        masks = [plan.mask for (planned, _), plan in self._plans.items() if planned == layer and plan.mask is not None]
        return masks[-1] if masks else None

    def attend(self, layer: int, geometry: VideoGeometry, step: int, run: int, query: torch.Tensor,
               key: torch.Tensor, value: torch.Tensor, shard: HeadShard | None,
               dense: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Attention ``[B, S, h, D]`` of one group of samples whose valid tokens are ``geometry``'s (a prefix of S)."""
        def sequence(with_values: bool) -> tuple[torch.Tensor, ...]:
            views = [t.transpose(1, 2)[:, :, :geometry.tokens] for t in (query, key, value)]   # [B, H, L, D], valid
            return tuple(views) if with_values else tuple(views[:2])

        def prepare(kernel: Any) -> None:
            kernel.prepare(*(t.transpose(1, 2)[:, :, :kernel.mask.q_len] for t in (query, key, value)))

        if self.window_search is not None:
            return self.window_search.attend(layer, geometry, step, query, key, value, shard, dense)
        io = PlanInputs(sequence, rows=lambda out: out, runner=self.compiled, prepare=prepare, whole=True)
        seq_len = query.shape[1]
        plan, fresh = self.plan_for(layer, geometry, step, run, seq_len, query.shape[2], shard, query, io)
        kernel = self.kernel_of(plan, io, query.device, seq_len)
        if kernel is None:
            if plan.dense_out is not None:
                out, plan.dense_out = plan.dense_out, None
                return out
            if geometry.causal_frames:                 # the model's dense path would need its L x L token mask
                dense = partial(self._visible_attention, geometry, seq_len, query, key, value)
            self.stats.dense_kernel = None
            out = self.stats.time(plan.record, query, dense)
            plan.record.dense_kernels.add(self.stats.dense_kernel or "sparsecore full mask")
            return out
        tokens = kernel.mask.q_len                                               # tokens < seq_len: the prefix
        grouped = isinstance(kernel, HeadGroupKernel)             # its gather also sorts the heads by pattern
        if grouped:
            out = self.stats.time(plan.record, query, lambda: kernel.attend(query, key, value, plan.order))
        else:
            q, k, v = gathered(plan.order, tokens, query, key, value)
            out = self.stats.time(plan.record, query, lambda: kernel(q, k, v))
        if self.audit is not None and self.audit.wants(layer, step):          # the valid tokens, the unpadded mask
            mask = plan.mask.copy_to(query.device) if plan.held else plan.mask  # a held mask: this call's copy
            q, k, v = gathered(plan.order, tokens, query, key, value) if grouped else (q, k, v)
            plan.record.audit.append(fidelity(*(t[:, :, :geometry.tokens] for t in (q, k, v)), mask, self.compiled,
                                              self.dense_with_lse(geometry)))
        if not grouped:
            if plan.order is not None:
                out = plan.order.scatter(out, 2)
            if tokens < seq_len:
                out = torch.nn.functional.pad(out, (0, 0, 0, seq_len - tokens))
            out = out.transpose(1, 2)
        if fresh:               # a held mask is counted on this call's copy, on the kernel's device without a wait
            plan.record.ran(kernel.mask if plan.held else plan.mask, kernel, self.stats.counts)
        return out

    def full_mask(self, geometry: VideoGeometry, heads: int, seq_len: int) -> BlockMask:
        """Every block the valid tokens may see (all of them, or under causal frames their own and earlier causal
        blocks), on frame blocks, extended by padding blocks to ``seq_len``; the last few kept, so a dense step's
        mask and its kernels are made once per (geometry, heads, length)."""
        key = (geometry, heads, seq_len)
        found = self._full.get(key)
        if found is None:
            found = dense_mask(geometry, heads, {"method": "dense"})
            if seq_len != found.q_len:
                found = found.with_padding(seq_len)
            self._full[key] = found
            if len(self._full) > FULL_MASKS:
                self._full.popitem(last=False)
        return found

    def dense_with_lse(self, geometry: VideoGeometry) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
        """Dense attention with its LSE over the keys each query may see, on ``[B, H, L, D]`` valid tokens:
        :func:`sparsecore.search.dense_attention`, or under causal frames the kernel of :meth:`full_mask`."""
        if not geometry.causal_frames:
            return dense_attention
        return lambda q, k, v: self.full_kernel(geometry, q.shape[1], q.shape[2])(q, k, v, return_lse=True)

    def full_kernel(self, geometry: VideoGeometry, heads: int, seq_len: int) -> Any:
        """The compiled kernel of :meth:`full_mask`, kept with the mask (a mask holds its kernels weakly)."""
        mask = self.full_mask(geometry, heads, seq_len)
        if "full kernel" not in mask.derived:
            mask.derived["full kernel"] = self.compiled(mask)
        return mask.derived["full kernel"]

    def _visible_attention(self, geometry: VideoGeometry, seq_len: int, query: torch.Tensor, key: torch.Tensor,
                           value: torch.Tensor) -> torch.Tensor:
        """A dense step of a frame-causal geometry, ``[B, S, H, D]``: the kernel of :meth:`full_mask`."""
        self.stats.dense_kernel = VISIBLE_BLOCKS
        kernel = self.full_kernel(geometry, query.shape[2], seq_len)
        return kernel(*(t.transpose(1, 2) for t in (query, key, value))).transpose(1, 2)

    def kernel_of(self, plan: LayerPlan, io: "PlanInputs", device: torch.device, seq_len: int) -> Any:
        """What a call of ``plan`` runs (None: dense attention). A mask its session keeps in host memory is copied
        to ``device`` and compiled for this call alone: nothing of it stays on the device after the call."""
        if not plan.held:
            return plan.kernel
        return io.runner(self.padded_mask(plan.mask.copy_to(device), seq_len))

    def compiled(self, mask: BlockMask) -> Any:
        """The compiled kernel of a (padded) mask for this handle's device and backend.

        A built-in method's session hands every layer of a step the same mask object, so the mask's own weak
        table finds its kernel while the step's plans hold it, and nothing outlives the step (nor the first
        layer's replanning: :meth:`_release_stale`): in the module's cache LVSA's rotating patterns would each
        keep a kernel (14 MiB above dense's peak at Wan 2.1 6x, compiled). A callable's masks may be new
        objects at every layer: their kernels go through the module's cache, which finds equal masks by content.
        """
        return sparsecore.compile(mask, device=self.device, backend=self.backend, cache=self.cache_kernels,
                                  **self.backend_options)

    @property
    def cache_kernels(self) -> bool:
        """Whether this handle's kernels (and ring pieces' kernels) go through the module's cache: a callable's
        (see :meth:`compiled`)."""
        return callable(self.method)

    def plan_for(self, layer: int, geometry: VideoGeometry, step: int, run: int, seq_len: int, heads: int,
                 shard: HeadShard | None, like: torch.Tensor, io: "PlanInputs") -> tuple[LayerPlan, bool]:
        """The (layer, geometry)'s plan at ``step`` (made at its first call, counted at the others) and whether
        it was just made. ``seq_len``: the whole sequence's length (valid tokens plus padding)."""
        previous = self._plans.get((layer, geometry))
        if previous is not None and previous.step == step and not previous.per_call:
            previous.record.fields["calls"] += 1
            if previous.kernel is not None and seq_len != previous.seq_len:
                # text padded to another length (guidance as separate calls on embeddings of other lengths): the
                # mask padded to it, not planned again (a search would run twice); a ring cut is per length
                action = self.session(geometry).action(geometry, step, layer)
                previous.kernel = self._kernel(previous.mask, action, geometry, seq_len, io)
                previous.seq_len = seq_len
            return previous, False
        del previous                                     # :meth:`_plan` decides how long the old plan lives
        try:
            with faster_dense_allowed(self.faster_dense):              # the plan's dense passes (a search's LSE)
                plan = self.stats.planned(lambda: self._plan(layer, geometry, step, run, seq_len, heads, shard,
                                                             like, io), like.device)
        except BaseException:   # a half-made plan (no mask, no kernel; a dense output) is not reused by a retry
            self._plans.pop((layer, geometry), None)
            raise
        return plan, True

    def _release_stale(self, mask: BlockMask, step: int) -> None:
        """Drop the plans of earlier steps that run ``mask``, which a layer has just replaced by another.

        LVSA hands every layer of a step one mask: when its anchors rotate, the layers not yet replanned would
        keep the old mask's kernel (its tile schedule) and device lists alive next to the new ones until the
        step's last layer. Their plans are stale (a later call of theirs plans again), so they go now."""
        for key in [key for key, plan in self._plans.items() if plan.step < step and plan.mask is mask]:
            del self._plans[key]

    def _plan(self, layer: int, geometry: VideoGeometry, step: int, run: int, seq_len: int, heads: int,
              shard: HeadShard | None, like: torch.Tensor, io: "PlanInputs") -> LayerPlan:
        session = self.session(geometry)
        action = session.action(geometry, step, layer)
        record = self.stats.record(run, layer, step, geometry, seq_len, heads, shard, action.label)
        plan = LayerPlan(step, None, None, record, per_call=action.per_call, order=action.token_order, seq_len=seq_len)
        # The old plan stays referenced until the new mask is known: a mask the method reuses (AdaSpa's reuse
        # steps) holds its kernels weakly, so its kernel is found, not compiled again, only while still held.
        previous = self._plans.pop((layer, geometry), None)   # re-inserted last: last_mask finds the newest plan
        if not action.per_call or self.keep_masks:        # else the caller holds the plan for its call only
            self._plans[(layer, geometry)] = plan
        if not action.plans:
            return plan
        q = k = lse = mass = None
        if action.needs_qk:
            q, k, *v = io.sequence(action.wants_lse)
            if action.wants_lse:                         # the dense output, its LSE and (if wanted) the block masses
                if action.mass_block_size and not geometry.causal_frames:     # its masses would see every key
                    offsets = geometry.block_offsets(action.mass_block_size)
                    out, found = self.stats.time(record, like, lambda: dense_attention_with_mass(q, k, v[0], offsets,
                                                                                                offsets))
                    lse, mass = found.lse, found.mass.sum(0)
                    fused = found.impl.endswith("fused")
                else:
                    out, lse = self.stats.time(record, like, lambda: self.dense_with_lse(geometry)(q, k, v[0]))
                    fused = False
                record.dense_kernels.add(found.impl if fused else VISIBLE_BLOCKS if geometry.causal_frames
                                         else dense_impl(q, k, v[0]))
                if geometry.tokens < seq_len:                    # text padding: its rows attend to nothing
                    out = torch.nn.functional.pad(out, (0, 0, 0, seq_len - geometry.tokens))
                plan.dense_out = io.rows(out.transpose(1, 2))
        plan.mask = session.plan(geometry, heads if shard is None else shard.total, step=step, layer=layer, q=q, k=k,
                                 lse=lse, mass=mass, heads=shard)
        if previous is not None and previous.mask is not None and previous.mask is not plan.mask:
            self._release_stale(previous.mask, step)
            previous = None                      # a replaced mask: nothing of it is looked up below
        if action.held:                      # kept in host memory by the session: copied and compiled per call
            plan.held = not action.dense
            return plan
        if runs_dense(plan.mask, geometry):              # a full mask runs the dense path: nothing to compile
            return plan
        if action.dense:                       # a mask planned at a dense step serves the steps after it
            plan.prepared = io.runner(self.padded_mask(plan.mask, seq_len))
            io.prepare(plan.prepared)
        else:
            plan.kernel = self._kernel(plan.mask, action, geometry, seq_len, io)
        return plan

    def _kernel(self, mask: BlockMask, action: StepAction, geometry: VideoGeometry, seq_len: int,
                io: "PlanInputs") -> Any:
        """What a plan of ``mask`` runs on sequences of ``seq_len`` tokens: one kernel per head pattern, or one."""
        run_mask = self.padded_mask(mask, seq_len)
        if action.head_groups and io.whole:
            return HeadGroupKernel(run_mask, [(self._group_kernel(pattern, seq_len), members) for pattern, members
                                              in self.session(geometry).head_groups(geometry, mask)])
        kernel = io.runner(run_mask)
        if action.shared and hasattr(kernel, "keep_plans_on_host"):
            kernel.keep_plans_on_host()
        return kernel

    def _group_kernel(self, mask: BlockMask, seq_len: int) -> Any:
        """The kernel of a one-head pattern mask (``StepAction.head_groups``), padded to ``seq_len``: compiled once
        and kept by the mask, which its session keeps."""
        padded = self.padded_mask(mask, seq_len)
        if "group kernel" not in padded.derived:
            padded.derived["group kernel"] = self.compiled(padded)
        return padded.derived["group kernel"]

    def padded_mask(self, mask: BlockMask, seq_len: int) -> BlockMask:
        """``mask`` extended to ``seq_len`` tokens by unlisted padding blocks (text padding), memoized per mask;
        an approximating mask as it is (it runs on the valid prefix, see the module docstring). The padded masks of
        a held mask's copies (one a call) have the same lists: they share what is known of them
        (:func:`sparsecore.ir.host_facts.host_reads`), kept with the held mask per length."""
        if seq_len == mask.q_len or mask.unselected.kind != "drop":
            return mask
        key = ("padded", seq_len)                                     # kept with the mask, freed with it
        if key not in mask.derived:
            padded = mask.with_padding(seq_len, {**mask.meta, "padding": seq_len - mask.q_len})
            mask.derived[key] = share_host_facts(padded, mask, derivation=key)
        return mask.derived[key]
