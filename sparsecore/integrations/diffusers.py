"""Sparse self-attention for diffusers 0.42 video DiTs: Wan 2.1/2.2 and HunyuanVideo 1.5, in one call.

    import sparsecore.integrations.diffusers as sparse
    handle = sparse.apply(pipe.transformer, method="lvsa", device="cuda", num_steps=50)
    video = pipe(prompt, num_frames=481, num_inference_steps=50).frames   # the same call as before
    handle.stats()                        # per (layer, step): density, kernel, calls, time if asked
    handle.remove()                       # the original processors, exactly

Models (diffusers 0.42.1): ``WanTransformer3DModel`` (Wan 2.1 and 2.2, T2V/I2V/TI2V): the
self-attention ``blocks[i].attn1`` goes through sparsecore, the cross-attention ``attn2`` (text,
and the image context of I2V) stays dense and untouched. ``HunyuanVideo15Transformer3DModel``:
the joint video+text attention ``transformer_blocks[i].attn``; the text refiner's attention
stays dense. Layer ``i`` is the block index.

Plug-in point. The processors here replace diffusers' ``WanAttnProcessor`` /
``HunyuanVideo15AttnProcessor2_0`` on those modules (``attn.set_processor``). They compute q, k,
v as diffusers' processors do (``transformer_wan._get_qkv_projections``, the modules' norms,
``embeddings.apply_rotary_emb``; Wan's RoPE is a closure inside its processor, so it is
re-stated in :func:`_wan_rope`, same arithmetic), then either call diffusers'
``dispatch_attention_fn`` (dense steps: the model's own path, with the processor's
``_attention_backend`` and ``_parallel_config``) or a sparsecore kernel. We did not register a
backend in diffusers' attention registry: in 0.42 the registry is keyed by the closed enum
``AttentionBackendName`` (a new backend means patching enum internals, and
``set_attention_backend`` / ``enable_parallelism`` validate against the enum), the dispatch call
carries no (layer, step), and HunyuanVideo 1.5's processor builds the dense ``[B, 1, S, S]``
padding mask before dispatching (about 2.9 GB at 53K tokens) even where the IR needs none.
Context parallelism (Ulysses). ``_attention_backend`` and ``_parallel_config`` of our
processors read and write the original processor's, so ``set_attention_backend`` and
``enable_parallelism`` reach the model as before (before or after ``apply``). Under
``ContextParallelConfig(ulysses_degree=N)`` each rank's processor gets ``S / N`` tokens of all
heads; :mod:`sparsecore.integrations.ulysses` hands diffusers' own Ulysses template
(``_templated_context_parallel_attention``, the hook every context-parallel backend of
diffusers uses) a ``forward_op`` that runs on the whole sequence for the rank's ``H / N``
heads: the mask is planned for those heads (sessions' ``heads=HeadShard``; AdaSpa all-gathers
its per-head recalls to rank every head as one process would; callables are planned for all
heads and sliced), dense steps run diffusers' dispatch on the rank's heads. The geometry comes
from the pre-hook, which sees the whole video before diffusers splits it. Outputs equal the
one-process outputs (tests/test_integration_context_parallel.py). Ring attention
(``ring_degree > 1``) and ``ulysses_anything`` raise ``ValueError``; HunyuanVideo 1.5 has no
context-parallel plan in diffusers 0.42 and raises too.

Geometry. A forward pre-hook on the transformer reads ``hidden_states`` ``[B, C, F, H, W]``
and the config's patch sizes (Wan ``patch_size`` = (p_t, p_h, p_w); HunyuanVideo 1.5
``patch_size_t``, ``patch_size``): ``VideoGeometry(F // p_t, H // p_h, W // p_w)``. Both
models flatten the patch grid frame-major (``Conv3d`` output ``.flatten(2)``), which is the
geometry's token order. A self-attention call whose video length differs raises.

Steps. Automatic, from the ``timestep`` the transformer's forward receives (its maximum, so
Wan 2.2 TI2V's per-token timesteps count once): the first forward is step 0, a smaller
timestep than the last one is the next step, the same timestep stays on the step (classifier-
free guidance run as separate calls, as diffusers' Wan and HunyuanVideo 1.5 pipelines do), and
a larger one starts a new run (step 0, fresh method sessions). This fits schedulers that
evaluate the model once per step (flow-matching Euler, UniPC, DPM++ multistep: the pipelines'
defaults). ``handle.set_step(i)`` switches to explicit steps (for Heun-type schedulers, or
several experts as in Wan 2.2 A14B, e.g. from ``callback_on_step_end``); a step below the
current one starts a new run; ``set_step(None)`` returns to automatic tracking, starting a new
run at the next forward. Passing more distinct timesteps than ``num_steps`` raises.

Masks. Per (layer, step) the processor asks the method's session for the mask once
(``session.plan(geometry, heads, step=, layer=, q=, k=)``; q, k ``[B, H, L, D]`` views for the
data-dependent methods), compiles it (``sparsecore.compile`` caches by fingerprint; the
processor keeps its layer's kernel while the fingerprint stays the same) and reuses it for the
other calls of the step: with CFG as separate calls the conditional branch (the first call)
plans, the unconditional one reuses. One session per geometry, so branches whose text lengths
differ (HunyuanVideo 1.5) keep separate per-layer caches (AdaSpa). ``method`` may also be a
callable ``(geometry, num_heads, step, layer) -> BlockMask`` for fixed or custom masks.

Dense steps. A mask of density 1.0 (every token pair kept) runs on the model's own attention
(``dispatch_attention_fn``), never through a sparsecore kernel: AdaSpa's warm-up and first
search step, PASA's leading steps and ``dense_layers``, LVSA at ``T <= reference_frames``
(every frame an anchor), and any full mask from a callable. Stats show ``backend="dense"``.

Text (HunyuanVideo 1.5). The processor concatenates video then text on the sequence axis:
``VideoGeometry(..., text_tokens=n, text_position="end")``. The model reorders each sample's
text as [valid image, valid ByT5, valid MLLM tokens, then the padding of each] and passes that
mask; the processor pads it with True for the video and attends with ``valid_i & valid_j``.
Here: a row's valid tokens must come first (else ``ValueError``); the method plans on the
valid prefix (``text_tokens`` = valid count; LVSA keeps text dense both ways, AdaSpa and PASA
use a text sink), and the kernel runs the mask extended by one padding block that no row
attends to and whose own rows are empty, giving output 0 there as diffusers' SDPA does for a
fully masked row: exactly the model's masking. Samples of a batch with different valid counts
run as separate groups, each with its own geometry. LVSA's ``reference_frames`` defaults to 33
(the HunyuanVideo 1.5 horizon, ``lvsa.REFERENCE_FRAMES``) for this model unless given.

Layouts: diffusers' processors hold ``[B, S, H, D]``; the kernel gets contiguous
``[B, H, S, D]`` and the default scale ``1/sqrt(D)`` (the processors pass none to the dispatch).

Limits: inference only (sparse kernels have no backward); Python-side planning (not for
``torch.compile(fullgraph=True)``); context parallelism: Ulysses on Wan only; processors
replaced after ``apply`` are overwritten by ``remove()``.
"""

from __future__ import annotations

import numbers
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache, partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import sparsecore
from sparsecore.geometry import VideoGeometry
from sparsecore.ir import BlockMask
from sparsecore.ir.validation import check_int
from sparsecore.methods import SESSIONS, HeadShard, lvsa
from sparsecore.registry import device_type, registered_backends

try:
    import diffusers
    from diffusers.models.attention_dispatch import dispatch_attention_fn
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_hunyuan_video15 import (HunyuanVideo15AttnProcessor2_0,
                                                                           HunyuanVideo15Transformer3DModel)
    from diffusers.models.transformers.transformer_wan import (WanAttnProcessor, WanTransformer3DModel,
                                                               _get_qkv_projections)
except ImportError as err:  # pragma: no cover - exercised only without diffusers
    raise ImportError(f"sparsecore.integrations.diffusers needs diffusers 0.42 ({err}); install it with "
                      f"pip install 'sparsecore[diffusers]' (tested with diffusers==0.42.1)") from err

from . import ulysses

TESTED_DIFFUSERS = "0.42"
PREPARED_MASKS = 512    # (density, padded mask) memo entries per handle: a few per layer and text length
MethodProvider = Callable[[VideoGeometry, int, int, int], BlockMask]

__all__ = ["SUPPORTED_MODELS", "HunyuanVideo15SparseAttnProcessor", "SparseAttentionHandle",
           "WanSparseAttnProcessor", "apply"]


# ------------------------------------------------------------------ the two models
@dataclass(frozen=True)
class ModelSpec:
    """Where one diffusers model keeps its self-attention, and how it patchifies."""

    name: str
    model_class: type
    processor_class: type          # diffusers' processor we replace (exact type)
    blocks: str                    # attribute holding the transformer blocks
    attention: str                 # the self-attention module of a block
    reference_frames: int          # LVSA's C for this model
    patch: Callable[[Any], tuple[int, int, int]]


def _wan_patch(config: Any) -> tuple[int, int, int]:
    p_t, p_h, p_w = (int(p) for p in config.patch_size)
    return p_t, p_h, p_w


def _hunyuan_patch(config: Any) -> tuple[int, int, int]:
    return int(config.patch_size_t), int(config.patch_size), int(config.patch_size)


# ------------------------------------------------------------------ processors
class _SparseProcessor:
    """Shared part: the handle, the layer, the original processor (for dense fallbacks and remove())."""

    def __init__(self, handle: SparseAttentionHandle, layer: int, original: Any) -> None:
        self._handle = handle
        self.layer = layer
        self.original = original

    # diffusers' set_attention_backend / enable_parallelism write these on every processor:
    # they go to the original, so they survive remove() and the dense path honours them.
    @property
    def _attention_backend(self) -> Any:
        return self.original._attention_backend

    @_attention_backend.setter
    def _attention_backend(self, value: Any) -> None:
        self.original._attention_backend = value

    @property
    def _parallel_config(self) -> Any:
        return self.original._parallel_config

    @_parallel_config.setter
    def _parallel_config(self, value: Any) -> None:
        self.original._parallel_config = value

    def _dispatch(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attn_mask: torch.Tensor | None, parallel: bool = True) -> torch.Tensor:
        """The model's own attention: diffusers' dispatch, as the original processor calls it.

        ``parallel=False``: on this rank's tensors only (inside the Ulysses all-to-alls).
        """
        return dispatch_attention_fn(query, key, value, attn_mask=attn_mask, dropout_p=0.0, is_causal=False,
                                     backend=self._attention_backend,
                                     parallel_config=self._parallel_config if parallel else None)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layer={self.layer}, original={type(self.original).__name__})"


def _wan_rope(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved RoPE: channel pair (2i, 2i+1) turns by the angle whose cosine is
    ``freqs_cos[..., 2i]`` and sine ``freqs_sin[..., 2i+1]`` (same arithmetic as diffusers 0.42's
    ``WanAttnProcessor``, where it is a closure and cannot be imported)."""
    even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2).type_as(x)


class WanSparseAttnProcessor(_SparseProcessor):
    """Self-attention of a ``WanTransformer3DModel`` block (``attn1``) through sparsecore."""

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if encoder_hidden_states is not None or not self._handle._tracking(self):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        if attention_mask is not None:
            raise ValueError(f"attention_mask: Wan self-attention (layer {self.layer}) expected None, got a "
                             f"{list(attention_mask.shape)} mask; the block-mask IR cannot add a token mask; "
                             f"call handle.remove() to run this model densely")
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        if rotary_emb is not None:
            query, key = _wan_rope(query, *rotary_emb), _wan_rope(key, *rotary_emb)
        out = self._handle._attend(self, query, key, value, None,
                                   lambda: self._dispatch(query, key, value, None))
        out = out.flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


class HunyuanVideo15SparseAttnProcessor(_SparseProcessor):
    """Joint video+text attention of a ``HunyuanVideo15Transformer3DModel`` block through sparsecore."""

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> Any:
        if encoder_hidden_states is None or not self._handle._tracking(self):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        text_q = attn.add_q_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
        text_k = attn.add_k_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
        text_v = attn.add_v_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
        if attn.norm_added_q is not None:
            text_q = attn.norm_added_q(text_q)
        if attn.norm_added_k is not None:
            text_k = attn.norm_added_k(text_k)
        query, key, value = (torch.cat(pair, dim=1) for pair in ((query, text_q), (key, text_k), (value, text_v)))
        text = encoder_hidden_states.shape[1]
        valid = self._handle._text_valid(self, attention_mask, query.shape[0], text)
        out = self._handle._attend(self, query, key, value, valid,
                                   lambda: self._dispatch(query, key, value,
                                                          _joint_padding_mask(attention_mask, query.shape[1])))
        out = out.flatten(2, 3).to(query.dtype)
        video_out, text_out = out[:, :-text], out[:, -text:]
        if getattr(attn, "to_out", None) is not None:
            video_out = attn.to_out[1](attn.to_out[0](video_out))
        if getattr(attn, "to_add_out", None) is not None:
            text_out = attn.to_add_out(text_out)
        return video_out, text_out


def _joint_padding_mask(text_mask: torch.Tensor | None, seq_len: int) -> torch.Tensor | None:
    """HunyuanVideo 1.5's dense-path mask: ``valid_i & valid_j`` ``[B, 1, S, S]``, video always valid."""
    if text_mask is None:
        return None
    valid = F.pad(text_mask, (seq_len - text_mask.shape[1], 0), value=True).bool()
    return valid[:, None, None, :] & valid[:, None, :, None]


SUPPORTED_MODELS = (
    ModelSpec("wan", WanTransformer3DModel, WanAttnProcessor, "blocks", "attn1",
              lvsa.REFERENCE_FRAMES["wan"], _wan_patch),
    ModelSpec("hunyuanvideo-1.5", HunyuanVideo15Transformer3DModel, HunyuanVideo15AttnProcessor2_0,
              "transformer_blocks", "attn", lvsa.REFERENCE_FRAMES["hunyuanvideo-1.5"], _hunyuan_patch),
)
_SPARSE_CLASSES = {"wan": WanSparseAttnProcessor, "hunyuanvideo-1.5": HunyuanVideo15SparseAttnProcessor}


# ------------------------------------------------------------------ the handle
@dataclass
class _Plan:
    """The mask of one (layer, geometry) at one step and what runs it (``kernel`` None: dense path)."""

    step: int
    mask: BlockMask
    density: float
    kernel: Any
    fingerprint: str | None
    record: _Record


@dataclass
class _Record:
    """Stats of one (run, layer, step, geometry)."""

    fields: dict
    seconds: float = 0.0
    timed: int = 0
    events: list = field(default_factory=list)


class SparseAttentionHandle:
    """What :func:`apply` returns: step control, stats, timing, and ``remove()``.

    Attributes:
        model: the transformer. spec: its :class:`ModelSpec`. method: the method name (or the callable).
        params: the session parameters. device, backend: what ``sparsecore.compile`` gets.
        num_steps: steps per run. geometry: the video geometry of the last forward (no text).
    """

    def __init__(self, model: Any, spec: ModelSpec, method: str | MethodProvider, params: dict, device: str,
                 backend: str | None, num_steps: int) -> None:
        self.model = model
        self.spec = spec
        self.method = method
        self.params = params
        self.device = device
        self.backend = backend
        self.num_steps = num_steps
        self.geometry: VideoGeometry | None = None
        self._provider = method if callable(method) else None
        self._sessions: dict[VideoGeometry, Any] = {}
        self._plans: dict[tuple[int, VideoGeometry], _Plan] = {}
        self._prepared_masks: dict[tuple[str, int], tuple[float, BlockMask | None]] = {}
        self._records: dict[tuple, _Record] = {}
        self._timing = False
        self._step: int | None = None
        self._manual = False
        self._last_timestep: float | None = None
        self._run = 0
        self._active = False
        self._text_cache: tuple[Any, Any] | None = None
        self._removed = False
        self._originals: list[tuple[Any, Any]] = []
        self._hooks: list[Any] = []

    # ---------------------------------------------------------------- public API
    @property
    def step(self) -> int | None:
        """The current denoising step (None before the first forward)."""
        return self._step

    @property
    def run(self) -> int:
        """The index of the current run (sampling loop), from 0; stats rows carry it."""
        return self._run

    def set_step(self, step: int | None) -> None:
        """Use ``step`` for the following forwards (explicit steps); None returns to automatic tracking.

        A step below the current one starts a new run (fresh method sessions).
        """
        if step is None:
            self._manual, self._last_timestep = False, None
            self._new_run()
            return
        step = check_int(step, "step", 0)
        if step >= self.num_steps:
            raise ValueError(f"step: expected 0 <= step < num_steps={self.num_steps}, got {step}; "
                             f"pass num_steps= to apply() to run more steps")
        if self._step is not None and step < self._step:
            self._new_run()
        self._manual, self._step = True, step

    def mask(self, layer: int) -> BlockMask | None:
        """The mask ``layer`` planned last (its valid tokens, before text padding), None before its first call.

        Under Ulysses context parallelism: this rank's heads (stats' ``heads`` gives the range).
        A batch of several text lengths (HunyuanVideo 1.5) plans one mask per length; this is the last.
        """
        layer = check_int(layer, "layer", 0)
        plans = [plan for (planned, _), plan in self._plans.items() if planned == layer]
        return plans[-1].mask if plans else None

    def timing(self, enabled: bool = True) -> None:
        """Record the time of every attention call (CUDA events on GPU) into ``stats()`` as ``ms``."""
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled: expected a bool, got {type(enabled).__name__} {enabled!r}")
        self._timing = enabled

    def stats(self) -> list[dict]:
        """One dict per (run, layer, step, geometry) in call order.

        Keys: ``run``, ``layer``, ``step``, ``density`` (fraction of token pairs the method kept over
        the valid tokens; 1.0 on dense steps), ``backend`` (the kernel's backend, or ``"dense"`` for the
        model's own attention), ``action`` (the method's word for the step, when it gives one),
        ``calls``, ``tokens`` (valid sequence length), ``text_tokens`` (valid text), ``padding`` (text
        padding tokens), ``heads`` (``[start, stop)`` of the heads this process ran: all of them, or
        its Ulysses rank's), and with timing on ``ms`` (mean per timed call) and ``ms_total``.
        """
        if any(r.events for r in self._records.values()):
            torch.cuda.synchronize()
        out = []
        for record in self._records.values():
            row = dict(record.fields)
            if record.timed:
                total = record.seconds * 1e3 + sum(start.elapsed_time(end) for start, end in record.events)
                row.update(ms=total / record.timed, ms_total=total)
            out.append(row)
        return out

    def remove(self) -> None:
        """Put the original processors back (the same objects) and drop the hooks, masks and kernels."""
        if self._removed:
            return
        for module, original in self._originals:
            module.set_processor(original)
        for hook in self._hooks:
            hook.remove()
        self._removed, self._active = True, False
        self._plans.clear()
        self._sessions.clear()
        self._prepared_masks.clear()
        self._text_cache = None

    def __repr__(self) -> str:
        method = self.method if isinstance(self.method, str) else getattr(self.method, "__name__", "callable")
        return (f"SparseAttentionHandle(model={self.spec.name}, method={method!r}, device={self.device!r}, "
                f"layers={len(self._originals)}, step={self._step}, removed={self._removed})")

    # ---------------------------------------------------------------- hooks
    def _pre_forward(self, module: Any, args: tuple, kwargs: dict) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if not isinstance(hidden, torch.Tensor) or hidden.ndim != 5:
            got = list(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
            raise ValueError(f"hidden_states: expected a latent video [B, C, F, H, W] for {type(module).__name__}, "
                             f"got {got}")
        p_t, p_h, p_w = self.spec.patch(module.config)
        frames, height, width = hidden.shape[2] // p_t, hidden.shape[3] // p_h, hidden.shape[4] // p_w
        self.geometry = VideoGeometry(frames, height, width)
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        self._observe(timestep)
        self._text_cache = None
        self._active = True

    def _post_forward(self, module: Any, args: tuple, output: Any) -> None:
        self._active = False
        self._text_cache = None

    def _observe(self, timestep: Any) -> None:
        """Advance the step from the forward's timestep (automatic mode)."""
        if self._manual:
            return
        value = _timestep_value(timestep)
        if value is None:                                # no timestep: stay on the step
            self._step = 0 if self._step is None else self._step
            return
        last = self._last_timestep
        if last is None or value > last:
            if last is not None:
                self._new_run()
            self._step = 0
        elif value < last:
            if self._step + 1 >= self.num_steps:
                raise ValueError(f"num_steps: the transformer got more than num_steps={self.num_steps} distinct "
                                 f"timesteps in one run (timestep {value} after {last}); pass num_steps= equal to "
                                 f"the pipeline's num_inference_steps to apply(), or drive steps with set_step")
            self._step += 1
        self._last_timestep = value

    def _new_run(self) -> None:
        self._sessions.clear()
        self._plans.clear()
        if self._step is not None:
            self._run += 1
        self._step = None if not self._manual else self._step

    # ---------------------------------------------------------------- called by the processors
    def _tracking(self, processor: _SparseProcessor) -> bool:
        """Whether this call runs inside a hooked forward of a live handle (else: original processor)."""
        return self._active and not self._removed

    def _text_valid(self, processor: _SparseProcessor, mask: torch.Tensor | None, batch: int,
                    text: int) -> list[int]:
        """Valid text tokens per sample; checks they come first (the model's order). Cached per forward."""
        if mask is None:
            return [text] * batch
        if self._text_cache is not None and self._text_cache[0] is mask:
            return self._text_cache[1]
        if mask.ndim != 2 or tuple(mask.shape) != (batch, text):
            raise ValueError(f"attention_mask: expected the text mask [{batch}, {text}] (batch, text tokens), got "
                             f"{list(mask.shape)} at layer {processor.layer}")
        valid = mask.bool()
        counts = valid.sum(dim=1)
        prefix = torch.arange(text, device=valid.device)[None, :] < counts[:, None]
        if not bool((prefix == valid).all()):
            raise ValueError("attention_mask: expected each sample's valid text tokens first, then its padding "
                             "(the order HunyuanVideo15Transformer3DModel.forward builds), got padding before a valid "
                             "token; the block-mask IR has one pattern for the whole batch and cannot skip tokens "
                             "inside the sequence; call handle.remove() to run this input densely")
        result = counts.tolist()
        self._text_cache = (mask, result)
        return result

    def _attend(self, processor: _SparseProcessor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                text_valid: list[int] | None, dense: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Attention of one layer call, ``[B, S, H, D]`` in and out: sparse kernel or the dense path.

        Under Ulysses context parallelism ``S`` is this rank's part of the sequence; diffusers'
        all-to-alls run around :meth:`_attend_heads` on the whole sequence for this rank's heads.
        """
        group = ulysses.ulysses_group(processor._parallel_config)
        if group is None:
            return self._attend_heads(processor, query, key, value, text_valid, dense, None)
        layer, geometry, heads = processor.layer, self.geometry, query.shape[2]
        if text_valid is not None:
            raise ValueError(f"parallel_config: sparsecore runs under context parallelism for "
                             f"WanTransformer3DModel only (diffusers 0.42 has no context-parallel plan for "
                             f"{self.spec.model_class.__name__}), got one at layer {layer}; call handle.remove() to "
                             f"run the model densely")
        if heads % group.world or query.shape[1] * group.world != geometry.video_tokens:
            raise ValueError(f"hidden_states: under Ulysses degree {group.world} layer {layer} expected "
                             f"{geometry.video_tokens} / {group.world} tokens and heads divisible by {group.world}, "
                             f"got {query.shape[1]} tokens and {heads} heads; pick a ulysses_degree dividing both")
        shard = group.shard(heads, query.device)

        def local(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            dense_heads = lambda: processor._dispatch(q, k, v, None, parallel=False)  # noqa: E731
            return self._attend_heads(processor, q, k, v, None, dense_heads, shard)

        return ulysses.attention(query, key, value, group, local)

    def _attend_heads(self, processor: _SparseProcessor, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, text_valid: list[int] | None, dense: Callable[[], torch.Tensor],
                      shard: HeadShard | None) -> torch.Tensor:
        """``[B, S, h, D]`` in and out, the whole sequence: all heads, or the ``shard``'s (Ulysses)."""
        layer, geometry = processor.layer, self.geometry
        batch, seq_len, heads = query.shape[0], query.shape[1], query.shape[2]
        text = seq_len - geometry.video_tokens
        if text < 0 or (text_valid is None and text != 0):
            raise ValueError(f"hidden_states: layer {layer} got {seq_len} tokens, expected {geometry.video_tokens} "
                             f"video tokens ({geometry.frames}x{geometry.height}x{geometry.width} after patchify, "
                             f"from the transformer's input) plus text; call handle.remove() to run this input "
                             f"densely")
        counts = text_valid if text_valid is not None else [0] * batch
        groups: dict[int, list[int]] = {}
        for row, count in enumerate(counts):
            groups.setdefault(int(count), []).append(row)
        plans = []
        for count, rows in groups.items():
            g = VideoGeometry(geometry.frames, geometry.height, geometry.width, text_tokens=count,
                              text_position="end")
            index = None if len(rows) == batch else torch.tensor(rows, device=query.device)
            pick = (lambda t: t) if index is None else (lambda t, i=index: t.index_select(0, i))
            plan = self._plan(layer, g, heads, seq_len, pick(query), pick(key), shard)
            plans.append((index, pick, plan))
        if all(plan.kernel is None for _, _, plan in plans):
            return self._time(plans[0][2].record, query, dense)
        out = None
        if any(plan.kernel is None for _, _, plan in plans):     # mixed batch: dense rows from the model's path
            out = self._time(next(p.record for _, _, p in plans if p.kernel is None), query, dense)
        for index, pick, plan in plans:
            if plan.kernel is None:
                continue
            q, k, v = (pick(t).transpose(1, 2).contiguous() for t in (query, key, value))
            run = partial(plan.kernel, q, k, v)
            result = self._time(plan.record, query, run).transpose(1, 2)
            if index is None:
                return result
            if out is None:
                out = query.new_zeros(query.shape[:3] + (value.shape[3],))
            out.index_copy_(0, index, result.to(out.dtype))
        return out

    def _plan(self, layer: int, geometry: VideoGeometry, heads: int, seq_len: int, query: torch.Tensor,
              key: torch.Tensor, shard: HeadShard | None) -> _Plan:
        """The (layer, geometry) plan at the current step: planned at its first call, reused by the others."""
        step = self._step
        plan = self._plans.get((layer, geometry))
        if plan is not None and plan.step == step:
            plan.record.fields["calls"] += 1
            return plan
        q_view = query.transpose(1, 2)[:, :, :geometry.tokens]         # [B, H, L, D] over the valid tokens
        k_view = key.transpose(1, 2)[:, :, :geometry.tokens]
        mask = self._mask(layer, geometry, heads, step, q_view, k_view, shard)
        density, run_mask = self._prepared(mask, seq_len)
        kernel = fingerprint = None
        if run_mask is not None:
            fingerprint = run_mask.fingerprint()
            if plan is not None and plan.fingerprint == fingerprint:
                kernel = plan.kernel
            else:
                kernel = sparsecore.compile(run_mask, device=self.device, backend=self.backend)
        fields = {"run": self._run, "layer": layer, "step": step, "density": density,
                  "backend": "dense" if kernel is None else kernel.backend.name,
                  "action": self._action(geometry, step, mask),
                  "calls": 1, "tokens": geometry.tokens, "text_tokens": geometry.text_tokens,
                  "padding": seq_len - geometry.tokens,
                  "heads": [0, heads] if shard is None else [shard.start, shard.stop]}
        record = self._records.setdefault((self._run, layer, step, geometry), _Record(fields))
        if record.fields is not fields:                                  # planned again after set_step
            record.fields["calls"] += 1
        plan = _Plan(step, mask, density, kernel, fingerprint, record)
        self._plans[(layer, geometry)] = plan
        return plan

    def _mask(self, layer: int, geometry: VideoGeometry, heads: int, step: int, q: torch.Tensor,
              k: torch.Tensor, shard: HeadShard | None) -> BlockMask:
        """The method's mask of ``heads`` heads (all of them, or the ``shard``'s; q, k hold those heads)."""
        total = heads if shard is None else shard.total
        if self._provider is not None:
            mask = self._provider(geometry, total, step, layer)
            source = f"method callable {getattr(self._provider, '__name__', self._provider)!r}"
        else:
            session = self._session(geometry)
            mask = session.plan(geometry, total, step=step, layer=layer, q=q, k=k, heads=shard)
            source = f"method {self.method!r}"
        if not isinstance(mask, BlockMask):
            raise TypeError(f"mask: {source} must return a sparsecore BlockMask, got {type(mask).__name__}")
        expected = total if self._provider is not None else heads
        if mask.num_heads != expected or mask.q_len != geometry.tokens or mask.kv_len != geometry.tokens:
            raise ValueError(f"mask: {source} returned {mask!r} for layer {layer} step {step}; expected {expected} "
                             f"heads and q_len = kv_len = {geometry.tokens} (geometry {geometry})")
        if self._provider is not None and shard is not None:
            mask = _heads_of(mask, shard.start, shard.stop)
        return mask

    def _prepared(self, mask: BlockMask, seq_len: int) -> tuple[float, BlockMask | None]:
        """(density, the mask the kernel runs: padded to ``seq_len``; None when dense), memoized by fingerprint.

        Sessions hand back the same mask object on reuse steps (AdaSpa) and across layers (LVSA), whose
        fingerprint is cached on it: the density and padding of a large mask are computed once.
        """
        key = (mask.fingerprint(), seq_len)
        found = self._prepared_masks.get(key)
        if found is None:
            density = float(mask.density())
            run_mask = None if density >= 1.0 else mask if seq_len == mask.q_len else pad_mask(mask, seq_len)
            found = self._prepared_masks[key] = (density, run_mask)
            if len(self._prepared_masks) > PREPARED_MASKS:
                self._prepared_masks.pop(next(iter(self._prepared_masks)))
        return found

    def _session(self, geometry: VideoGeometry) -> Any:
        session = self._sessions.get(geometry)
        if session is None:
            session = self._sessions[geometry] = SESSIONS[self.method](num_steps=self.num_steps, **self.params)
        return session

    def _action(self, geometry: VideoGeometry, step: int, mask: BlockMask) -> Any:
        """The method's word for this step: the session's ``action(step)`` (e.g. AdaSpa "reuse"), else the mask's."""
        if self._provider is None and hasattr(self._session(geometry), "action"):
            return self._session(geometry).action(step)
        return mask.meta.get("action")

    def _time(self, record: _Record, like: torch.Tensor, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        if not self._timing:
            return fn()
        if like.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            record.events.append((start, end))
        else:
            sync = _synchronizer(like.device)
            sync()
            began = time.perf_counter()
            out = fn()
            sync()
            record.seconds += time.perf_counter() - began
        record.timed += 1
        return out


@lru_cache(maxsize=64)
def _heads_of(mask: BlockMask, start: int, stop: int) -> BlockMask:
    """``mask.select_heads(range(start, stop))``, memoized (callables often return one mask for every layer)."""
    return mask.select_heads(range(start, stop))


def _synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cpu":
        return lambda: None
    module = getattr(torch, device.type, None)
    return getattr(module, "synchronize", lambda: None)


def _timestep_value(timestep: Any) -> float | None:
    """One number per forward: the timestep's maximum (Wan 2.2 TI2V passes one per token)."""
    if timestep is None:
        return None
    if isinstance(timestep, torch.Tensor):
        return float(timestep.detach().max()) if timestep.numel() else None
    if isinstance(timestep, numbers.Real) and not isinstance(timestep, bool):
        return float(timestep)
    raise TypeError(f"timestep: expected a tensor or a number, got {type(timestep).__name__}")


def pad_mask(mask: BlockMask, length: int) -> BlockMask:
    """``mask`` extended to ``length`` tokens by one trailing block (text padding).

    No row lists the new key block, and its query rows are empty (output 0, LSE -inf): the
    IR form of a padding mask ``valid_i & valid_j`` whose valid tokens are a prefix.
    """
    length = check_int(length, "length", mask.q_len + 1)
    indptr = np.concatenate([mask.indptr, mask.indptr[:, -1:]], axis=1)
    meta = {**mask.meta, "padding": length - mask.q_len}
    return BlockMask(mask.num_heads, np.append(mask.q_offsets, length), np.append(mask.kv_offsets, length), indptr,
                     mask.indices, mask.budgets, meta)


# ------------------------------------------------------------------ apply
def apply(transformer: Any, method: str | MethodProvider = "lvsa", device: str = "cuda", backend: str | None = None,
          num_steps: int = 50, **params: Any) -> SparseAttentionHandle:
    """Route the self-attention of every block of ``transformer`` through sparsecore.

    Args:
        transformer: a diffusers 0.42 ``WanTransformer3DModel`` or ``HunyuanVideo15Transformer3DModel``
            (e.g. ``pipe.transformer``) with diffusers' own attention processors.
        method: ``"lvsa"``, ``"adaspa"`` or ``"pasa"`` (``params`` go to ``method.session(num_steps=num_steps,
            **params)``), or a callable ``(geometry, num_heads, step, layer) -> BlockMask``.
        device: the device the kernels are compiled for (``"cuda"``, ``"cpu"``, ``"npu"``...); the model's
            tensors must be there when it runs.
        backend: a sparsecore backend name, or None for the preferred one per mask.
        num_steps: denoising steps per run (the pipeline's ``num_inference_steps``).
        **params: the method's parameters (see docs/methods.md).

    Returns:
        A :class:`SparseAttentionHandle` (``set_step``, ``step``, ``stats``, ``timing``, ``remove``).

    Raises:
        TypeError: unsupported model class or processor, unknown method parameter, bad argument type.
        ValueError: unknown method, device or backend, bad values, or sparsecore already applied.
    """
    spec = _spec_of(transformer)
    num_steps = check_int(num_steps, "num_steps", 1)
    if isinstance(method, str):
        if method not in SESSIONS:
            raise ValueError(f"method: expected one of {sorted(SESSIONS)} or a callable (geometry, num_heads, step, "
                             f"layer) -> BlockMask, got {method!r}")
        if method == "lvsa":
            params.setdefault("reference_frames", spec.reference_frames)
        SESSIONS[method](num_steps=num_steps, **params)              # checks the parameters now
    elif callable(method):
        if params:
            raise TypeError(f"params: a callable method takes no parameters, got {sorted(params)}; bind them in the "
                            f"callable (functools.partial)")
    else:
        raise TypeError(f"method: expected a method name {sorted(SESSIONS)} or a callable, got "
                        f"{type(method).__name__}")
    device_type(device)
    if backend is not None and backend not in registered_backends():
        raise ValueError(f"backend: expected None or a registered sparsecore backend "
                         f"({', '.join(sorted(registered_backends()))}), got {backend!r}")
    if not diffusers.__version__.startswith(TESTED_DIFFUSERS + "."):
        warnings.warn(f"sparsecore.integrations.diffusers mirrors the attention processors of diffusers "
                      f"{TESTED_DIFFUSERS}.x; diffusers {diffusers.__version__} is installed: check outputs against "
                      f"handle.remove() (dense)", stacklevel=2)
    modules = _attention_modules(transformer, spec)
    handle = SparseAttentionHandle(transformer, spec, method, dict(params), device, backend, num_steps)
    sparse_class = _SPARSE_CLASSES[spec.name]
    for layer, module in enumerate(modules):
        original = module.processor
        handle._originals.append((module, original))
        module.set_processor(sparse_class(handle, layer, original))
    handle._hooks = [transformer.register_forward_pre_hook(handle._pre_forward, with_kwargs=True),
                     transformer.register_forward_hook(handle._post_forward, always_call=True)]
    return handle


def _spec_of(transformer: Any) -> ModelSpec:
    for spec in SUPPORTED_MODELS:
        if isinstance(transformer, spec.model_class):
            return spec
    names = ", ".join(spec.model_class.__name__ for spec in SUPPORTED_MODELS)
    hint = " (a torch.compile wrapper: apply before compiling)" if hasattr(transformer, "_orig_mod") else ""
    raise TypeError(f"transformer: expected a diffusers {names}, got {type(transformer).__name__}{hint}; other "
                    f"models need their own processor (sparsecore.compile a mask and call it from one)")


def _attention_modules(transformer: Any, spec: ModelSpec) -> list[Any]:
    blocks = getattr(transformer, spec.blocks, None)
    if blocks is None or len(blocks) == 0:
        raise TypeError(f"transformer.{spec.blocks}: expected the transformer blocks of a {spec.model_class.__name__}, "
                        f"got {type(blocks).__name__}")
    modules = []
    for layer, block in enumerate(blocks):
        module = getattr(block, spec.attention, None)
        processor = getattr(module, "processor", None)
        if isinstance(processor, _SparseProcessor):
            message = (f"transformer: sparsecore is already applied to this model ({spec.blocks}[{layer}]."
                       f"{spec.attention}); call remove() on the earlier handle first")
            raise ValueError(message)  # noqa: TRY004  (a state error, not a wrong type)
        if type(processor) is not spec.processor_class:
            raise TypeError(f"{spec.blocks}[{layer}].{spec.attention}.processor: expected diffusers' "
                            f"{spec.processor_class.__name__}, got {type(processor).__name__}; sparsecore replaces "
                            f"only diffusers' own processor (restore it, e.g. with "
                            f"transformer.set_attn_processor({spec.processor_class.__name__}()), or remove the other "
                            f"integration first)")
        if spec.name == "wan" and (module.is_cross_attention or module.add_k_proj is not None):
            raise TypeError(f"{spec.blocks}[{layer}].{spec.attention}: expected Wan self-attention, got a cross-"
                            f"attention module")
        modules.append(module)
    return modules
