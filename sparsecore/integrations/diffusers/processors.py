"""The attention processors that replace diffusers' own on the self-attention modules.

A processor computes q, k, v exactly as the diffusers processor it replaces (:mod:`.models`), hands them to
sparsecore's attention op (:mod:`.op`: the handle's planner and kernel, or the model's dense attention on dense
steps, all opaque to ``torch.compile``) with its layer's index, and applies the output projections. Calls outside a
hooked forward of a live handle (and Wan's cross-attention) go to the original processor unchanged.

``_attention_backend`` and ``_parallel_config`` read and write the original processor's, so diffusers'
``set_attention_backend`` and ``enable_parallelism`` reach the model as before (before or after ``apply``) and
survive ``remove()``.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from diffusers.models import attention_dispatch
from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn
from diffusers.models.transformers.transformer_ltx2 import LTX2PerturbedAttnProcessor

from sparsecore.registry import DenseOp
from sparsecore.search import faster_dense

from . import kandinsky, ltx, models
from .op import diffusers_attention, head_major

if TYPE_CHECKING:
    from .handle import SparseAttentionHandle


def active_backend() -> str | None:
    """diffusers' active attention backend's name (the ``attention_backend`` context's, else the default), None where
    diffusers does not keep it as 0.42 does (``attention_dispatch._AttentionBackendRegistry``, a private class)."""
    active = getattr(getattr(attention_dispatch, "_AttentionBackendRegistry", None), "get_active_backend", None)
    if active is None:
        return None
    name = active()[0]
    return str(getattr(name, "value", name))


# A copy would keep the original handle's hooks and op slot (it ran dense and drove the original's steps); a pickle
# would hold none of the handle's state. Processors and hooks refuse both (:class:`RefusesCopies`).
NO_DEEPCOPY = ("copy.deepcopy of a model with sparsecore applied: call handle.remove() first, copy the model, then "
               "sparsecore's apply() on each copy (each gets its own handle, steps and plans)")
NO_PICKLE = ("pickling a model with sparsecore applied: call handle.remove() first (save the weights, e.g. "
             "model.state_dict(), and apply() again after loading)")


class RefusesCopies:
    """Deep copies and pickles raise, naming the remedy (:data:`NO_DEEPCOPY`, :data:`NO_PICKLE`): the processors
    and the handle's forward hooks (:mod:`.attach`)."""

    def __deepcopy__(self, memo: dict) -> Any:
        raise TypeError(NO_DEEPCOPY)

    def __reduce__(self) -> Any:
        raise TypeError(NO_PICKLE)


class SparseProcessor(RefusesCopies):
    """Shared part: the handle, the layer, the original processor (for dense fallbacks and remove())."""

    def __init__(self, handle: "SparseAttentionHandle", layer: int, original: Any) -> None:
        self._handle = handle
        self.layer = layer
        self._layer_id = torch.tensor(layer, dtype=torch.int64, device="cpu")    # the op's argument, a graph input
        self.original = original

    def sparse_attention(self, *qkv: torch.Tensor, text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """This layer's attention of q, k, v ``[B, S, H, D]`` through the op (:mod:`.op`), ``[B, S, H, D]``."""
        return diffusers_attention(*qkv, text_mask, self._handle.id, self._layer_id)

    active_backend_only = False     # the original dispatches with no backend of its own: the active one (Cosmos's)

    # diffusers' set_attention_backend and enable_parallelism set these on processors that have them. An original
    # without them (CogVideoX's runs torch SDPA itself) reads None here and ignores the setting, as it would.
    @property
    def _attention_backend(self) -> Any:
        return getattr(self.original, "_attention_backend", None)

    @_attention_backend.setter
    def _attention_backend(self, value: Any) -> None:
        if hasattr(self.original, "_attention_backend"):
            self.original._attention_backend = value

    @property
    def _parallel_config(self) -> Any:
        return getattr(self.original, "_parallel_config", None)

    @_parallel_config.setter
    def _parallel_config(self, value: Any) -> None:
        if hasattr(self.original, "_parallel_config"):
            self.original._parallel_config = value

    def dispatch(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attn_mask: torch.Tensor | None, parallel: bool = True) -> torch.Tensor:
        """The model's own attention: diffusers' dispatch, as the original processor calls it, or a dense kernel
        measured faster than the one that dispatch picks (:meth:`faster_dense`).

        ``parallel=False``: on this rank's tensors only (inside the context-parallel all-to-alls).
        """
        if attn_mask is None and (not parallel or self._parallel_config is None):
            faster = self.faster_dense(query, key, value)
            if faster is not None:
                self._handle._stats.dense_kernel = faster[0]
                out, _ = faster[1].run(*(t.transpose(1, 2) for t in (query, key, value)), query.shape[-1] ** -0.5,
                                       False)
                return out.transpose(1, 2)
        self._handle._stats.dense_kernel = "model"
        return dispatch_attention_fn(query, key, value, attn_mask=attn_mask, dropout_p=0.0, is_causal=False,
                                     backend=self.model_backend()[1],
                                     parallel_config=self._parallel_config if parallel else None)

    def model_backend(self) -> tuple[bool, Any]:
        """``(chosen, backend)``: whether a backend was chosen for the model's attention (``set_attention_backend``, the
        ``attention_backend`` context: any but the default ``native``), and what its dense attention passes diffusers'
        dispatch: the original processor's setting (None: the active backend), None for one that keeps no setting and
        dispatches at the active backend (:attr:`active_backend_only`), ``native`` (torch SDPA) for one that calls
        torch SDPA itself (CogVideoX's, Mochi's: no backend is ever chosen for them)."""
        if self.active_backend_only:
            return active_backend() != "native", None
        if not hasattr(self.original, "_attention_backend"):
            return False, AttentionBackendName.NATIVE
        return self._attention_backend is not None or active_backend() != "native", self._attention_backend

    def faster_dense(self, query: torch.Tensor, key: torch.Tensor,
                     value: torch.Tensor) -> tuple[str, DenseOp] | None:
        """``(backend name, op)`` of the dense kernel the model's dense attention runs instead of diffusers' dispatch,
        or None.

        With ``apply(..., dense_attention="auto")`` (the default) and the model on diffusers' default
        attention backend (``"native"``: torch SDPA, cuDNN on an H200) by default, i.e. neither
        ``set_attention_backend`` (any backend, ``"native"`` too: a choice made) nor the ``attention_backend``
        context chose another, a registered dense op that takes the inputs and was measured faster than that
        (:func:`sparsecore.search.faster_dense`: FlashAttention-4's dense forward on Hopper, 1.09-1.30x
        cuDNN's). ``dense_attention="model"``: always None; so also where diffusers' backend registry is not
        where 0.42 keeps it (the default backend cannot be read). A processor that runs torch SDPA itself
        (CogVideoX's: it keeps no ``_attention_backend``) follows no backend: its dense steps take the faster op
        under ``"auto"``, else torch SDPA (diffusers' ``"native"``), as the original does. One that keeps no setting
        (Cosmos's, :attr:`active_backend_only`) reads only the active backend, so ``set_attention_backend("native")``
        looks like the default there.
        """
        if self._handle.dense_attention != "auto" or self.model_backend()[0]:
            return None
        return faster_dense(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))

    def dense(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, tokens: int,
              parallel: bool = True) -> torch.Tensor:
        """The model's dense self-attention of this layer (:meth:`dispatch`) on ``[B, S, H, D]`` tensors whose first
        ``tokens`` are valid.

        What the model's padding mask (HunyuanVideo 1.5: ``valid_i & valid_j``, a ``[B, 1, S, S]`` boolean)
        leaves, without the mask: its dispatch on the valid prefix, and 0 on the padding rows (they attend
        to nothing, where SDPA gives 0). The mask would be ``S^2`` bytes per sample and keeps SDPA off its
        fastest kernels; the attention it defines is the same.
        """
        seq_len = query.shape[1]
        if not 0 < tokens <= seq_len:
            raise ValueError(f"tokens: expected the valid prefix's length, 1 to the {seq_len} tokens of layer "
                             f"{self.layer}'s call, got {tokens}; the geometry does not match the input "
                             f"({self._handle.dense_remedy()})")
        if tokens == seq_len:
            return self.dispatch(query, key, value, None, parallel)
        out = self.dispatch(query[:, :tokens], key[:, :tokens], value[:, :tokens], None, parallel)
        return torch.nn.functional.pad(out, (0, 0, 0, 0, 0, seq_len - tokens))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layer={self.layer}, original={type(self.original).__name__})"


class WanSparseAttnProcessor(SparseProcessor):
    """Self-attention of a ``WanTransformer3DModel`` block (``attn1``), of a ``WanVACETransformer3DModel``'s
    ``vace_blocks`` and ``blocks``, and of a ``WanAnimateTransformer3DModel``'s ``blocks``, through sparsecore."""

    qkv = staticmethod(models.wan_qkv)          # how the original processor makes q, k, v

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if encoder_hidden_states is not None or not self._handle.active:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        if attention_mask is not None:
            raise ValueError(f"attention_mask: {self._handle.spec.model_class.__name__} self-attention (layer "
                             f"{self.layer}) expected None, got a {list(attention_mask.shape)} mask; the block-mask "
                             f"IR cannot add a token mask; {self._handle.dense_remedy()}")
        query, key, value = compiled_layout(*self.qkv(attn, hidden_states, rotary_emb))
        out = self.sparse_attention(query, key, value)
        return models.wan_output(attn, out, query)


class LTXVideoSparseAttnProcessor(WanSparseAttnProcessor):
    """Self-attention of an ``LTXVideoTransformer3DModel`` block (``attn1``) through sparsecore: Wan's call with LTX's
    q, k, v (:func:`.ltx.ltx_qkv`), under context parallelism too (:data:`.parallel.LTX_VIDEO_CP_PLAN`)."""

    qkv = staticmethod(ltx.ltx_qkv)


class CosmosSparseAttnProcessor(WanSparseAttnProcessor):
    """Self-attention of a ``CosmosTransformer3DModel`` block (``attn1``) through sparsecore: Wan's call with Cosmos's
    q, k, v (:func:`.models.cosmos_qkv`); diffusers' ``Attention`` passes RoPE as ``image_rotary_emb``."""

    qkv = staticmethod(models.cosmos_qkv)
    active_backend_only = True          # CosmosAttnProcessor2_0 passes dispatch_attention_fn no backend

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)


class LTX2SparseAttnProcessor(SparseProcessor):
    """Video self-attention of an ``LTX2VideoTransformer3DModel`` block (``attn1``) through sparsecore, in place of
    ``LTX2AudioVideoAttnProcessor`` or, with spatio-temporal guidance (STG), ``LTX2PerturbedAttnProcessor``: q, k, v
    and the output as those make them (:func:`.ltx.ltx2_qkv`, :func:`.ltx.ltx2_output`: RoPE, per-head gates, STG's
    blend with the values, where the replaced processor is the perturbed one: ``LTX2Attention`` gives a processor only
    the arguments its call takes, so the plain one never sees guidance). A layer STG perturbs in every sample runs no
    attention, as in diffusers: its output is the values (the original's); the layer does not count as run (no
    stats row at that step), which the forward's end accepts. Not under context parallelism (raises)."""

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 query_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
                 key_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
                 perturbation_mask: torch.Tensor | None = None, all_perturbed: Any = None) -> torch.Tensor:
        if not isinstance(self.original, LTX2PerturbedAttnProcessor):   # diffusers' module drops what it cannot take
            perturbation_mask = all_perturbed = None
        stg = {} if perturbation_mask is None and all_perturbed is None else \
            {"perturbation_mask": perturbation_mask, "all_perturbed": all_perturbed}
        original = partial(self.original, attn, hidden_states, encoder_hidden_states, attention_mask, query_rotary_emb,
                           key_rotary_emb, **stg)
        if encoder_hidden_states is not None or not self._handle.active:
            return original()
        if self._parallel_config is not None:
            raise ValueError(f"transformer: LTX2VideoTransformer3DModel under context parallelism is not supported by "
                             f"sparsecore yet (layer {self.layer}); run it on one GPU, or "
                             f"{self._handle.dense_remedy()}")
        if attention_mask is not None:
            raise ValueError(f"attention_mask: LTX2VideoTransformer3DModel video self-attention (layer {self.layer}) "
                             f"expected None, got a {list(attention_mask.shape)} mask (video_self_attention_mask); the "
                             f"block-mask IR cannot add a token mask; {self._handle.dense_remedy()}")
        if all_perturbed is None and perturbation_mask is not None:
            all_perturbed = bool((perturbation_mask == 0).all())            # the original's test, one host read
        if all_perturbed:
            return original()
        query, key, value = ltx.ltx2_qkv(attn, hidden_states, query_rotary_emb, key_rotary_emb)
        out = self.sparse_attention(*compiled_layout(query, key, value))
        return ltx.ltx2_output(attn, out, hidden_states, query, value, perturbation_mask)


class Kandinsky5SparseAttnProcessor(SparseProcessor):
    """Visual self-attention of a ``Kandinsky5Transformer3DModel`` block (``self_attention``) through sparsecore, q, k,
    v and the output as ``Kandinsky5AttnProcessor`` makes them (:mod:`.kandinsky`). The model's own sparse attention
    (NABLA, where its pipeline passes ``sparse_params``) is the method's masks instead (``method="nabla"``: NABLA's
    own, on the tile order those ``sparse_params`` give; the handle refuses a forward without it), and dense steps are
    dense. Not under context parallelism (the handle refuses it: :func:`.parallel.refuse_unplanned`)."""

    def model_backend(self) -> tuple[bool, Any]:
        """As :meth:`SparseProcessor.model_backend`, but FlexAttention (which diffusers needs for NABLA's block mask,
        replaced here by the method's masks) is not taken for dense steps: with no mask it would run its unfused
        fallback (scores of every pair) or fail under ``torch.compile``; they run as on the default backend."""
        chosen, backend = super().model_backend()
        flex = str(getattr(backend, "value", backend)) == "flex" or (backend is None and active_backend() == "flex")
        return (False, AttentionBackendName.NATIVE) if flex else (chosen, backend)

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 rotary_emb: torch.Tensor | None = None, sparse_params: dict | None = None) -> torch.Tensor:
        if encoder_hidden_states is not None or not self._handle.active:
            return self.original(attn, hidden_states, encoder_hidden_states, rotary_emb, sparse_params)
        query, key, value = compiled_layout(*kandinsky.kandinsky_qkv(attn, hidden_states, rotary_emb))
        out = self.sparse_attention(query, key, value)
        return kandinsky.kandinsky_output(attn, out, query)


class HunyuanVideo15SparseAttnProcessor(SparseProcessor):
    """Joint video+text attention of a ``HunyuanVideo15Transformer3DModel`` block through sparsecore."""

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> Any:
        if encoder_hidden_states is None or not self._handle.active:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        query, key, value = compiled_layout(*models.hunyuan_qkv(attn, hidden_states, encoder_hidden_states,
                                                                image_rotary_emb))
        out = self.sparse_attention(query, key, value, text_mask=attention_mask)
        return models.hunyuan_output(attn, out, query, encoder_hidden_states.shape[1])


class CogVideoXSparseAttnProcessor(SparseProcessor):
    """Joint text+video attention of a ``CogVideoXTransformer3DModel`` block (``attn1``) through sparsecore, on the
    sequence video first (:func:`.models.joint_qkv`)."""

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> Any:
        if not self._handle.active:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if attention_mask is not None:
            raise ValueError(f"attention_mask: CogVideoX attention (layer {self.layer}) expected None (its forward "
                             f"passes none), got a {list(attention_mask.shape)} mask; the block-mask IR cannot add a "
                             f"token mask; {self._handle.dense_remedy()}")
        query, key, value = compiled_layout(*models.joint_qkv(attn, hidden_states, encoder_hidden_states,
                                                              image_rotary_emb))
        out = self.sparse_attention(query, key, value)
        return models.cogvideox_output(attn, out, query, encoder_hidden_states.shape[1])


class HunyuanVideoSparseAttnProcessor(HunyuanVideo15SparseAttnProcessor):
    """Joint video+text attention of a ``HunyuanVideoTransformer3DModel`` (1.0) block, double- or single-stream,
    through sparsecore. Its ``attention_mask`` masks keys (``[B, 1, 1, S]``, the valid tokens first), which the
    handle reads as the valid text count (:meth:`.handle.SparseAttentionHandle.text_valid`)."""


class MochiSparseAttnProcessor(SparseProcessor):
    """Joint video+text attention of a ``MochiTransformer3DModel`` block (``attn1``) through sparsecore.

    diffusers' processor runs SDPA once per sample on its video and the text its ``encoder_attention_mask`` ``[B,
    text]`` keeps (``nonzero``), padded text rows 0. Here the whole batch goes to the op with that mask, which the
    handle reads as each sample's valid text count, checked to come first (:meth:`.handle.SparseAttentionHandle.
    text_valid`: samples of one count run together, padding rows attend to nothing and give 0). Its original calls
    torch SDPA itself, as CogVideoX's does: no diffusers backend reaches it, and it has no ``_parallel_config``.
    A config set here all the same goes on the original (which ignores it; None, the attribute's absence, leaves it
    untouched): sparsecore's context parallelism under :data:`.parallel.MOCHI_CP_PLAN` reads it there, so diffusers'
    ``enable_parallelism`` after ``apply`` reaches the model, and the config outlives ``remove()`` for a later apply.
    """

    @property
    def _parallel_config(self) -> Any:
        return getattr(self.original, "_parallel_config", None)

    @_parallel_config.setter
    def _parallel_config(self, value: Any) -> None:
        if value is not None or hasattr(self.original, "_parallel_config"):
            self.original._parallel_config = value

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor,
                 image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> Any:
        if not self._handle.active:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        query, key, value = compiled_layout(*models.mochi_qkv(attn, hidden_states, encoder_hidden_states,
                                                              image_rotary_emb))
        out = self.sparse_attention(query, key, value, text_mask=attention_mask)
        return models.hunyuan_output(attn, out, query, encoder_hidden_states.shape[1])


def compiled_layout(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q, k, v as the op gets them: in head-major memory while ``torch.compile`` traces (inductor then writes
    the projections' and RoPE's output there, with no separate copy; :mod:`.op`), as they are in eager mode
    (where the dense steps would pay for a copy they do not need)."""
    if torch.compiler.is_compiling():
        return head_major(query), head_major(key), head_major(value)
    return query, key, value


class SkyReelsV2SparseAttnProcessor(WanSparseAttnProcessor):
    """Self-attention of a ``SkyReelsV2Transformer3DModel`` block (``attn1``) through sparsecore: Wan's.

    With diffusion forcing's causal blocks the geometry's ``causal_frames`` comes from the config's
    ``num_frame_per_block`` (:meth:`.models.ModelSpec.causal_frames`) and every mask and dense step keeps to it; the
    handle sets the config to 1 for the forward's duration, so the forward builds no ``[1, 1, L, L]`` token mask
    (10 GB of booleans at 102,000 tokens) and passes none here.
    """


SPARSE_PROCESSORS = {models.WAN.name: WanSparseAttnProcessor, models.WAN_VACE.name: WanSparseAttnProcessor,
                     models.WAN_ANIMATE.name: WanSparseAttnProcessor,
                     models.SKYREELS_V2.name: SkyReelsV2SparseAttnProcessor,
                     models.HUNYUAN_VIDEO_15.name: HunyuanVideo15SparseAttnProcessor,
                     models.HUNYUAN_VIDEO.name: HunyuanVideoSparseAttnProcessor,
                     models.COGVIDEOX.name: CogVideoXSparseAttnProcessor,
                     models.MOCHI.name: MochiSparseAttnProcessor,
                     models.LTX_VIDEO.name: LTXVideoSparseAttnProcessor, models.LTX_2.name: LTX2SparseAttnProcessor,
                     models.KANDINSKY_5.name: Kandinsky5SparseAttnProcessor,
                     models.COSMOS.name: CosmosSparseAttnProcessor}


def set_processor(module: Any, processor: Any) -> None:
    """Put ``processor`` on an attention module: diffusers' ``set_processor`` where the module has it, else its
    ``processor`` attribute (Mochi's ``MochiAttention`` is a plain ``nn.Module`` with no setter)."""
    setter = getattr(module, "set_processor", None)
    if setter is None:
        module.processor = processor
    else:
        setter(processor)


def replaced_processors(originals: list[tuple[Any, Any]], processors: list[Any]) -> str | None:
    """What to say where attention modules hold processors other than sparsecore's (set after ``apply()``, e.g. by
    ``set_attn_processor``): their calls bypass the handle. None where all are sparsecore's. ``originals``: (weak
    module, original processor) per layer, as ``processors``."""
    replaced = [processor.layer for (module, _), processor in zip(originals, processors)
                if module() is not None and getattr(module(), "processor", None) is not processor]
    if not replaced:
        return None
    return (f"transformer: the attention processors of {len(replaced)} of its {len(processors)} self-attention "
            f"layers (from layer {replaced[0]}) were replaced after apply(), so they bypassed sparsecore in this "
            f"forward; call remove() on the handle before setting other processors (and apply() again after, for "
            f"sparse attention)")
