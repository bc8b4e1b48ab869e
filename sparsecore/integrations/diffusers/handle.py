"""The handle ``apply()`` (:mod:`.attach`) returns: hooks, step control, stats, ``remove()``.

The forward pre-hook reads the video geometry from ``hidden_states`` (``[B, C, F, H, W]``; CogVideoX's
``[B, F, C, H, W]``) and the config's patch sizes, and advances the step (:mod:`.steps`); the hooks always run
eagerly (``torch.compiler.disable``: under ``torch.compile`` of the whole transformer that is one graph break, before
the forward; regional compilation does not compile them at all). Each processor call reaches
:meth:`SparseAttentionHandle.attend` through the custom op (:mod:`.op`) with its layer's index (a forward may skip
layers: diffusers' block caches), then context-parallel routing (:mod:`.parallel`), grouping of samples by valid text
length (:mod:`.text_groups`), and the planner (:mod:`.planner`).
"""

from __future__ import annotations

import dataclasses
import warnings
import weakref
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any

import torch

from sparsecore.geometry import VideoGeometry
from sparsecore.ir import BlockMask
from sparsecore.ir.uploads import refuse_capture
from sparsecore.ir.validation import check_bool, check_index
from sparsecore.methods import HeadShard, sta
from sparsecore.registry import generation, takes_tensors_on

from . import op, parallel
from .audit import NO_SEQUENCE_SPLIT, make_audit
from .callable_session import MethodProvider
from .kandinsky import check_token_order
from .ltx import CheckedCoords, packed_grid
from .models import ModelSpec
from .planner import Planner
from .processors import SparseProcessor, replaced_processors, set_processor
from .sharded import ShardedAttention
from .stats import Stats
from .steps import StepTracker
from .text import valid_text
from .text_groups import attend_in_groups, text_groups
from .window_search import WindowSearch


class SparseAttentionHandle:
    """What :func:`apply` returns: step control, stats, timing, and ``remove()``.

    Attributes:
        model: the transformer. spec: its :class:`~.models.ModelSpec`. method: the method name (or the
        callable). params: the method's parameters. device, backend, backend_options: what
        ``sparsecore.compile`` gets. dense_attention: see :func:`apply`.
        num_steps: steps per run. geometry: the video geometry of the last forward (no text).
    """

    def __init__(self, model: Any, spec: ModelSpec, method: str | MethodProvider, params: dict, device: str,
                 backend: str | None, num_steps: int, backend_options: dict[str, Any] | None = None,
                 dense_attention: str = "auto") -> None:
        self._model = weakref.ref(model)     # weak: the model holds the handle (its hooks), and a cycle through
                                             # the model would keep its weights until a garbage collection
        self.spec = spec
        self.method = method
        self.params = params
        self.device = device
        self.backend = backend
        self.backend_options = dict(backend_options or {})
        self.dense_attention = dense_attention
        self.num_steps = num_steps
        self.geometry: VideoGeometry | None = None
        self.active = False
        self._causal_setting = 0                  # the model's causal-block setting, suspended during a forward
        self._stats = Stats()
        self._planner = Planner(method, params, device, backend, num_steps, self._stats, self.backend_options,
                                faster_dense=dense_attention == "auto")
        self._sharded = ShardedAttention(self._planner)         # ring / unified context parallelism
        self._steps = StepTracker(num_steps, self._planner.new_run)
        self._text_cache: tuple[Any, Any] | None = None
        self._checked_coords = CheckedCoords()                   # LTX-2's video_coords, read once per tensor
        self._removed = False
        self._originals: list[tuple[weakref.ref, Any]] = []      # (attention module, weakly; its processor)
        self._processors: list[SparseProcessor] = []             # sparsecore's, one per layer
        self._ran: set[int] = set()                              # the layers that ran in this forward
        self._hooks: list[Any] = []
        self._device_seen: tuple[str, int] | None = None          # (tensor device type, registry state) checked
        self.id = op.register(self, model)

    # ---------------------------------------------------------------- public API
    @property
    def model(self) -> Any:
        """The transformer (None once it was freed)."""
        return self._model()

    @property
    def step(self) -> int | None:
        """The current denoising step (None before the first forward)."""
        return self._steps.step

    @property
    def run(self) -> int:
        """The index of the current run (sampling loop), from 0; stats rows carry it."""
        return self._steps.run

    def set_step(self, step: int | None) -> None:
        """Use ``step`` for the following forwards (explicit steps); None returns to automatic tracking, a new run
        starting at the next forward (call it before a ``pipe()`` call on a cancelled request's latents: a fixed seed).

        A step below the current one starts a new run (fresh method sessions); the current step again stays in the
        run, so a run that ended at step 0 (a one-step schedule) is followed by ``set_step(None)`` then
        ``set_step(0)`` to start the next. A run that ends here short of ``num_steps`` in automatic mode warns
        (:meth:`StepTracker.short_run`).
        """
        self._steps.set_step(step)

    def mask(self, layer: int) -> BlockMask | None:
        """The mask ``layer`` planned last (its valid tokens, before text padding), None before its first plan.

        A method that plans at every call (PASA, NABLA, STA's strategies) keeps no mask after the call: None for its
        layers unless :meth:`keep_masks` is on.

        Under Ulysses context parallelism: this rank's heads (stats' ``heads`` gives the range).
        A batch of several text lengths (HunyuanVideo 1.5) plans one mask per length; this is the last.
        STA's masks are over the tokens in tile order (``meta["token_order"]``; ``sta.token_order`` gives it).
        """
        return self._planner.last_mask(check_index(layer, "layer", len(self._processors)))

    def keep_masks(self, enabled: bool = True) -> None:
        """Keep each layer's last mask (and kernel) for :meth:`mask` also where the method plans at every call
        (PASA, NABLA), at the memory cost of every layer's lists held at once; other methods keep theirs anyway."""
        self._planner.keep_masks = check_bool(enabled, "enabled")

    def timing(self, enabled: bool = True) -> None:
        """Record the time of every attention call (device events) into ``stats()`` as ``ms``, and each plan's
        host time as ``plan_ms``. To time a plan alone the device is synchronized before it, so a step runs
        slower with timing on: time whole steps with it off."""
        self._stats.timing = check_bool(enabled, "enabled")

    def audit(self, enabled: bool = True, *, layers: Iterable[int] | None = None,
              steps: Iterable[int] | None = None) -> None:
        """Measure the masks of the following sparse calls against dense attention on the model's own q, k, v
        (:mod:`.audit`): their ``stats()`` rows get ``recall`` (softmax mass kept), ``min_recall`` (the worst
        query's), ``rel_l2`` and ``cosine`` (masked output against dense), means over heads and the step's calls.

        ``layers``, ``steps``: the layer and step indices to measure (None: all). Each audited call also runs dense
        attention and the mask's kernel once more and reads the numbers on the host; ``audit(False)`` stops. Not
        under sparsecore's sequence split (ring, unified): raises.
        """
        check_bool(enabled, "enabled")
        layout = parallel.layout(self._processors[0]._parallel_config) if self._processors else None
        if enabled and layout is not None and (layout.ring.world > 1 or self.spec.joint_text):
            raise ValueError(NO_SEQUENCE_SPLIT)
        self._planner.audit = make_audit(layers, steps, len(self._processors), self.num_steps) if enabled else None

    def search_windows(self, candidates: Sequence[Any] | None, *, layers: Iterable[int] | None = None,
                       steps: Iterable[int] | None = None) -> WindowSearch | None:
        """Search STA's windows per step, layer and head as FastVideo's offline search does (:mod:`.window_search`):
        every call runs the model's dense attention, and at the chosen ``layers`` and ``steps`` (None: all; a strategy
        needs every layer from its ``dense_steps`` on) each candidate window is measured against it. Run a few prompts,
        then ``search.save(path, dense_steps)``; apply STA with ``mask_strategy=path``. ``None``, a new search or
        ``remove()`` end it. ``method="sta"`` only (its ``tile``), on one process holding every head and the whole
        sequence; ``audit``, ``keep_masks`` and ``stats`` see none of its calls."""
        if candidates is None:
            running, self._planner.window_search = self._planner.window_search, None
            if running is not None:
                running.close()                               # its kernels go; its sums stay readable
            return None
        if self._removed:
            raise ValueError("handle.search_windows: this handle was removed; apply(..., method='sta') again")
        if self.method != "sta":
            raise ValueError(f"handle.search_windows: searches Sliding Tile Attention's windows, got a handle of "
                             f"method {self.method!r}; apply(..., method='sta', tile=...) first")
        if any(parallel.layout(p._parallel_config) is not None for p in self._processors):
            raise ValueError("handle.search_windows: the model runs under context parallelism, where no process holds "
                             "every head and the whole sequence; search on one GPU")
        tile = sta.STAParams(**({"tile": self.params["tile"]} if "tile" in self.params else {})).tile
        search = WindowSearch(candidates, tile, len(self._processors), self.num_steps, self._planner.compiled,
                              layers, steps)                       # checked: now the one running ends
        self.search_windows(None)
        self._planner.window_search = search
        return search

    def stats(self) -> list[dict]:
        """One dict per (run, layer, step, geometry) of the current run and the one before it, in call order.

        Keys: ``run``, ``layer``, ``step``, ``density`` (fraction of the token pairs dense attention computes over
        the valid tokens that the method kept: of all pairs, or under causal frames of the visible ones; 1.0 on dense
        steps), ``backend`` (the kernel's backend, or ``"dense"``), ``action``
        (the method's word for the step), ``calls``, ``tokens`` (valid sequence length), ``text_tokens`` (valid
        text), ``padding`` (text padding tokens), ``heads`` (``[start, stop)`` of the heads this process ran:
        all of them, or its Ulysses rank's), on dense rows ``dense_kernel`` (what the step's dense calls ran,
        joined by ``+`` where its calls differ: ``"model"`` for diffusers' dispatch, ``"fa4"`` for
        FlashAttention-4's dense forward, ``"cudnn"``, ``"full mask"`` or ``"triton fused"`` for a pass that gives
        a search its LSE, ``"sparsecore full mask (ring)"`` under sparsecore's sequence split; see :func:`apply`'s
        ``dense_attention``), with timing on ``ms`` (mean per timed call) and ``ms_total``, and on audited sparse
        rows ``recall``, ``min_recall``, ``rel_l2`` and ``cosine`` (:meth:`audit`).
        """
        return self._stats.rows()

    def remove(self) -> None:
        """Put the original processors back (the same objects) and drop the hooks and the plans (masks, kernels; a
        callable's kernels stay in sparsecore's bounded cache, shared by equal masks: ``sparsecore.clear_cache()``
        frees them); warns, after that, if the run in progress stopped short of ``num_steps`` in automatic mode, and
        where the model's context parallelism needs more to run without sparsecore (:func:`.parallel.after_remove`).
        """
        if self._removed:
            return
        for module, original in self._originals:
            if module() is not None:
                set_processor(module(), original)
        for hook in self._hooks:
            hook.remove()
        self._removed, self.active = True, False
        self._restore_causal_setting(self._model())
        self.search_windows(None)
        need = parallel.after_remove(self._processors, self.spec.joint_model)
        messages = [self._steps.short_run(), need and f"sparsecore: after remove(), {need}"]
        self._planner.release()
        self._text_cache = None
        for message in filter(None, messages):      # after the cleanup: warnings may be errors
            warnings.warn(message, stacklevel=2)

    def dense_remedy(self) -> str:                       # how to run an input densely
        return parallel.dense_remedy(self._processors, self.spec.joint_model)

    def __repr__(self) -> str:
        method = self.method if isinstance(self.method, str) else getattr(self.method, "__name__", "callable")
        return (f"SparseAttentionHandle(model={self.spec.name}, method={method!r}, device={self.device!r}, "
                f"layers={len(self._originals)}, step={self.step}, removed={self._removed})")

    # ---------------------------------------------------------------- hooks
    def _pre_forward(self, module: Any, args: tuple, kwargs: dict) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if not isinstance(hidden, torch.Tensor) or hidden.ndim != (3 if self.spec.token_grid else 5):
            got = list(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
            raise ValueError(f"hidden_states: expected a latent video {self.spec.latents} for "
                             f"{type(module).__name__}, got {got}")
        refuse_capture(hidden.device, "a transformer forward with sparsecore applied")   # before the timestep's read
        self._restore_causal_setting(module)      # an interrupted forward (KeyboardInterrupt skips _post_forward)
        if self.spec.tiled_forward is not None:
            check_token_order(self.method, self.spec.tiled_forward(args, kwargs))
        causal = self.spec.causal_frames(module.config)
        grid = self.spec.grid(hidden.shape, module.config) if self.spec.token_grid is None else \
            packed_grid(self.spec, hidden, self.spec.token_grid(module, args, kwargs), self.dense_remedy(),
                        self._checked_coords)
        if causal and grid[0] % causal:          # the model's own forward refuses these (its mask's view fails)
            raise ValueError(f"hidden_states: {grid[0]} latent frames are not a multiple of the causal blocks' "
                             f"{self.spec.causal_setting}={causal}; pass latents whose frames are (the diffusion-"
                             f"forcing pipelines cut them so)")
        geometry = VideoGeometry(*grid, causal_frames=causal)
        parallel.refuse_unplanned(module, self._processors, self.spec)                                 # no step yet
        timestep = kwargs.get("timestep", args[self.spec.timestep_arg] if len(args) > self.spec.timestep_arg else None)
        parallel.refuse_uneven_tokens(self._processors, geometry, timestep)
        parallel.refuse_ring_cuts(self._processors, self._planner.approximation(geometry),
                                  self._planner.token_order(geometry))
        self.geometry = geometry
        self._steps.observe(*self.spec.step_view(timestep, hidden))
        self._text_cache = None
        self._ran = set()
        self.active = True
        if causal:                # the geometry keeps to the causal blocks: the forward need not build an L x L mask
            module.register_to_config(**{self.spec.causal_setting: 1})
            self._causal_setting = causal

    def _post_forward(self, module: Any, args: tuple, output: Any) -> None:
        calls, self._ran = len(self._ran), set()
        self.active = False
        self._restore_causal_setting(module)
        self._text_cache = None
        if output is None:                           # the forward raised (this hook runs always): its error stands
            return
        # Fewer calls than layers: skipped blocks (a block cache; each layer names itself) or replaced processors
        replaced = replaced_processors(self._originals, self._processors) if calls != len(self._processors) else None
        if replaced and calls:        # some layers ran sparsecore, the others the new processors
            raise ValueError(replaced)
        if replaced:                  # none ran sparsecore: the forward ran the new processors (dense, as a rule)
            warnings.warn(replaced, RuntimeWarning, stacklevel=2)
        self._steps.completed()

    def _restore_causal_setting(self, module: Any) -> None:
        """Put back the model's causal-block setting suspended during a forward (torch runs the post-forward hook on
        an ``Exception`` only: after a ``KeyboardInterrupt``, the next forward or :meth:`remove` does), unless the
        setting is no longer the 1 the handle wrote: the pipeline has set its own since (SkyReels-V2's
        ``_set_ar_attention`` at the next generation's ``causal_block_size``), which stands."""
        setting = self.spec.causal_setting
        if self._causal_setting and module is not None and getattr(module.config, setting, None) == 1:
            module.register_to_config(**{setting: self._causal_setting})
        self._causal_setting = 0

    # ---------------------------------------------------------------- called by the processors
    def text_valid(self, processor: SparseProcessor, mask: torch.Tensor | None, batch: int, text: int) -> list[int]:
        """Valid text tokens per sample (:func:`.text.valid_text`), cached per forward."""
        if mask is None:
            return [text] * batch
        if self._text_cache is None or self._text_cache[0] is not mask:
            self._text_cache = (mask, valid_text(mask, batch, text, processor.layer, self.spec.model_class.__name__,
                                                 self.dense_remedy))
        return self._text_cache[1]

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               text_mask: torch.Tensor | None) -> torch.Tensor:
        """Attention of ``layer``'s call, ``[B, S, H, D]`` in and out: sparse kernel or the dense path.

        ``text_mask``: HunyuanVideo 1.5's text padding mask ``[B, text]`` (None: all text valid, or no
        text). Under context parallelism ``S`` is this rank's part of the video (and all the text):
        Ulysses on Wan runs inside diffusers' all-to-alls (:func:`.parallel.attention`); ring, unified
        and HunyuanVideo 1.5 run sparsecore's exchange and ring (:mod:`.sharded`, :mod:`.ring`).
        """
        if not self.active or layer in self._ran or not 0 <= layer < len(self._processors):
            where = "outside a forward of the transformer" if not self.active else \
                "twice in one forward" if layer in self._ran else f"beyond its {len(self._processors)} layers"
            raise RuntimeError(f"sparsecore: self-attention layer {layer} called {where}; each layer runs once a "
                               f"forward; {self.dense_remedy()}")
        if (seen := (query.device.type, generation())) != self._device_seen:    # where apply() compiles, once a type
            if not takes_tensors_on(self.device, self.backend, seen[0]):
                raise ValueError(f"device: the model runs on {seen[0]!r} tensors (layer {layer}), apply() was given "
                                 f"device={self.device!r}; move it with transformer.to({self.device!r}), or remove() "
                                 f"this handle and apply(transformer, device={str(query.device)!r}, ...)")
            self._device_seen = seen
        processor = self._processors[layer]
        self._ran.add(layer)
        layout = parallel.layout(processor._parallel_config)
        if layout is not None and (layout.ring.world > 1 or self.spec.joint_text):
            return self._attend_sharded(processor, layout, query, key, value, text_mask)
        text_valid = self.text_valid(processor, text_mask, query.shape[0], query.shape[1] - self.geometry.tokens) \
            if self.spec.joint_text else None
        if layout is None:
            return self._attend_groups(processor.layer, query, key, value, text_valid, processor.dense, None)
        group, layer, geometry, heads = layout.ulysses, processor.layer, self.geometry, query.shape[2]
        if heads % group.world or query.shape[1] * group.world != geometry.video_tokens:
            raise ValueError(f"hidden_states: under Ulysses degree {group.world} layer {layer} expected "
                             f"{geometry.video_tokens} / {group.world} tokens and heads divisible by {group.world}, "
                             f"got {query.shape[1]} tokens and {heads} heads; pick a ulysses_degree dividing both")
        shard = group.shard(heads, query.device, key.shape[2])

        def local(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return self._attend_groups(layer, q, k, v, None, partial(processor.dense, parallel=False), shard)

        return parallel.attention(query, key, value, group, local)

    def _attend_sharded(self, processor: SparseProcessor, layout: parallel.Layout, query: torch.Tensor,
                        key: torch.Tensor, value: torch.Tensor, text_mask: torch.Tensor | None) -> torch.Tensor:
        """Ring / unified context parallelism (any model), and HunyuanVideo 1.5 under Ulysses: sparsecore's exchange."""
        if self._planner.audit is not None and self._planner.audit.wants(processor.layer, self._steps.step):
            raise ValueError(NO_SEQUENCE_SPLIT)
        layer, geometry, heads = processor.layer, self.geometry, query.shape[2]
        ring, ulysses = layout.ring, layout.ulysses
        sp_world = self.params.get("sp_world", 1) if self.method == "lvsa" else 1
        if ring.world > 1 and sp_world not in (1, ring.world):
            raise ValueError(f"sp_world: LVSA's boundary guards sit at the ring's shard boundaries, so expected 1 (no "
                             f"guards: sparsecore's ring fetches every key shard a row lists) or the ring degree "
                             f"{ring.world} (the released code's guards), got {sp_world}; pass sp_world=1 or "
                             f"sp_world={ring.world} to apply()")
        local_video = geometry.video_tokens // layout.world
        text = query.shape[1] - local_video
        if geometry.video_tokens % layout.world or heads % ulysses.world or text < 0 or \
                (text and not self.spec.joint_text):
            raise ValueError(f"hidden_states: under ring degree {ring.world} x Ulysses degree {ulysses.world} layer "
                             f"{layer} expected {geometry.video_tokens} / {layout.world} video tokens"
                             f"{' (+ the text)' if self.spec.joint_text else ''} and heads divisible by "
                             f"{ulysses.world}, got {query.shape[1]} tokens and {heads} heads; pick degrees whose "
                             f"product divides the video tokens and a ulysses_degree dividing the heads")
        text_valid = self.text_valid(processor, text_mask, query.shape[0], text) if self.spec.joint_text else None
        exchange = parallel.Exchange(ulysses, local_video)
        q, k, v = (exchange.heads_in(t) for t in (query, key, value))
        shard = ulysses.shard(heads, query.device, key.shape[2]) if ulysses.world > 1 else None
        video = local_video * ulysses.world
        attend = partial(self._sharded.attend, ring=ring, video=video)
        out = self._attend_groups(layer, q, k, v, text_valid, None, shard, attend, video)
        return exchange.heads_out(out)

    def _attend_groups(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       text_valid: list[int] | None, dense: Callable[..., torch.Tensor] | None,
                       shard: HeadShard | None, attend: Callable[..., torch.Tensor] | None = None,
                       video_rows: int | None = None) -> torch.Tensor:
        """``[B, S, h, D]`` in and out, samples grouped by their valid text length (each apart where the method's
        masks are per sample).

        ``attend``: the planner's (``S`` = the whole sequence; default) or the sharded path's (``S`` = this
        rank's ``video_rows`` video tokens, then the text). ``dense(q, k, v, tokens)``: the model's dense
        attention of a group whose first ``tokens`` are valid (:meth:`.SparseProcessor.dense`).
        """
        geometry, step, run = self.geometry, self._steps.step, self._steps.run
        attend = self._planner.attend if attend is None else attend
        batch, seq_len = query.shape[0], query.shape[1]
        text = seq_len - (geometry.video_tokens if video_rows is None else video_rows)
        if text < 0 or (text_valid is None and text != 0):
            raise ValueError(f"hidden_states: layer {layer} got {seq_len} tokens, expected {geometry.video_tokens} "
                             f"video tokens ({geometry.frames}x{geometry.height}x{geometry.width} after patchify, "
                             f"from the transformer's input) plus text; {self.dense_remedy()}")
        counts = text_valid if text_valid is not None else [0] * batch
        per_sample = batch > 1 and self._planner.per_sample(self._with_text(geometry, int(counts[0])), step, layer)
        def group(count: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            valid = self._with_text(geometry, count)
            model = None if dense is None else (lambda: dense(q, k, v, valid.tokens))  # noqa: E731
            return attend(layer, valid, step, run, q, k, v, shard, model)

        return attend_in_groups(query, key, value, text_groups(counts, per_sample), group)

    @staticmethod
    def _with_text(geometry: VideoGeometry, count: int) -> VideoGeometry:
        return dataclasses.replace(geometry, text_tokens=count, text_position="end")
