"""sparsecore attention inside diffusers 0.42's context parallelism: Ulysses, ring, and both (unified).

Under ``transformer.enable_parallelism(config=ContextParallelConfig(ring_degree=R, ulysses_degree=U))``
the model's context-parallel plan splits the video tokens into ``R U`` equal chunks (rank ``r U + u``
of the ``("ring", "ulysses")`` mesh holds chunk ``r U + u``), so each processor sees ``V / (R U)``
video tokens of all ``H`` heads (and HunyuanVideo 1.5's text, replicated: :data:`HUNYUAN_VIDEO_15_CP_PLAN`).

- Ulysses only, Wan (``R = 1``): diffusers' own template (``_templated_context_parallel_attention``)
  all-to-alls q, k, v so that Ulysses rank ``u`` holds the whole sequence for heads
  ``[u H/U, (u+1) H/U)``; :func:`attention` plugs sparsecore in as its ``forward_op``.
- Ring or unified, and HunyuanVideo 1.5 under any degrees: sparsecore's own exchange. The Ulysses
  all-to-all (diffusers' ``_all_to_all_dim_exchange``) gives each rank ``V / R`` video tokens of
  its ``H / U`` heads (:class:`Exchange`; the replicated text just takes its heads); the ring part is
  :mod:`.ring` (sub-mask per ring step, LSE merge, transfers skipped where the mask needs none).
  diffusers' ring template is not used: it all-gathers every key shard up front (no transfer can
  be skipped, ``R`` shards of memory), and its LSE merge turns rows with no keys into NaN.

Every rank plans the mask of its heads over the whole sequence (:mod:`.sharded`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from diffusers.models.attention_dispatch import _all_to_all_dim_exchange, _templated_context_parallel_attention
from diffusers.models.transformers.transformer_wan import WanTransformer3DModel

from sparsecore.methods import HeadShard

from .cp_plans import HUNYUAN_VIDEO_15_CP_PLAN, LTX_VIDEO_CP_PLAN, MOCHI_CP_PLAN, WAN_VACE_CP_PLAN, flat_ltx_timestep
from .op import INFERENCE_ONLY
from .processors import SparseProcessor, active_backend
from .ring import RingGroup

LocalAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

__all__ = ["HUNYUAN_VIDEO_15_CP_PLAN", "LTX_VIDEO_CP_PLAN", "MOCHI_CP_PLAN", "WAN_VACE_CP_PLAN", "NO_LSE_BACKENDS",
           "Exchange", "Layout", "UlyssesGroup", "after_remove", "attention", "dense_remedy", "enable_parallelism",
           "layout"]

@dataclass(frozen=True)
class UlyssesGroup:
    """The Ulysses group of this rank: its size, this rank's index in it, the process group, the config."""

    world: int
    rank: int
    group: Any
    config: Any

    def shard(self, num_heads: int, device: torch.device, num_kv_heads: int | None = None) -> HeadShard:
        """This rank's heads after the all-to-all (of ``num_kv_heads`` key heads in all), with an all-gather over the
        group for per-head values."""
        size = num_heads // self.world
        return HeadShard(self.rank * size, (self.rank + 1) * size, num_heads,
                         partial(_all_gather, world=self.world, group=self.group, device=device), num_kv_heads)


@dataclass(frozen=True)
class Layout:
    """This rank's place under context parallelism: its ring group and its Ulysses group (either may be of size 1)."""

    ring: RingGroup
    ulysses: UlyssesGroup

    @property
    def world(self) -> int:
        return self.ring.world * self.ulysses.world


def layout(parallel_config: Any) -> Layout | None:
    """The :class:`Layout` of a processor's ``_parallel_config``; None without context parallelism.

    Raises ``ValueError`` for ``ulysses_anything`` / ``ring_anything`` (uneven shards).
    """
    cp = getattr(parallel_config, "context_parallel_config", None)
    if cp is None or cp.ring_degree * cp.ulysses_degree == 1:
        return None
    remedy = "use ContextParallelConfig(ring_degree=R, ulysses_degree=U) with the video tokens divisible by R U " \
             "and the heads by U"
    for name in ("ulysses_anything", "ring_anything"):
        if getattr(cp, name, False):
            raise ValueError(f"parallel_config.context_parallel_config.{name}: expected False (sparsecore's shards "
                             f"are equal: V / (R U) video tokens and H / U heads per rank), got True; {remedy}")
    ulysses = UlyssesGroup(cp.ulysses_degree, cp._ulysses_local_rank, cp._ulysses_mesh.get_group(), parallel_config)
    return Layout(RingGroup(cp.ring_degree, cp._ring_local_rank, cp._ring_mesh.get_group()), ulysses)


# diffusers 0.42's context-parallel forward ops that refuse ``return_lse=True`` (which its ring template asks for)
NO_LSE_BACKENDS = ("native", "_native_npu")


def refuse_unplanned(transformer: Any, processors: Sequence[Any], spec: Any) -> None:
    """A model for which sparsecore has no context-parallel path (``spec.context_parallel`` False: diffusers has no
    plan for it) is refused, at ``apply`` and at a forward's start before any step counts, where diffusers'
    ``enable_parallelism`` ran on it (a plan of the user's own): its config on the transformer or on the processors
    (Cosmos's processor keeps none, so the transformer's is the one that tells)."""
    configs = (getattr(transformer, "_parallel_config", None),
               *(getattr(p, "_parallel_config", None) for p in processors[:1]))
    if spec.context_parallel or all(config is None for config in configs):
        return
    raise ValueError(f"transformer: {spec.model_class.__name__} under context parallelism is not supported by "
                     f"sparsecore (diffusers has no plan for it); run it on one GPU (without enable_parallelism)")


def refuse_uneven_tokens(processors: Sequence[Any], geometry: Any, timestep: Any = None) -> None:
    """A forward whose video tokens, or whose timestep ``[B, N]`` (per token: Wan 2.2 TI2V, LTX image to video; per
    latent frame: SkyReels-V2's diffusion forcing), the context-parallel plan would cut into unequal shards is refused
    before the plan splits them (diffusers' split asserts, naming no field)."""
    found = layout(processors[0]._parallel_config) if processors else None
    if found is None:
        return
    degrees = f"under context parallelism (ring degree {found.ring.world} x Ulysses degree {found.ulysses.world})"
    if geometry.video_tokens % found.world:
        raise ValueError(f"hidden_states: {degrees} expected video tokens divisible by {found.world}, got "
                         f"{geometry.video_tokens} ({geometry.frames} x {geometry.height} x {geometry.width}); pick "
                         f"degrees whose product divides them, or another size of video")
    # [B, 1] is LTX's per-sample timestep, which its plan's pre-hook flattens and leaves whole
    if isinstance(timestep, torch.Tensor) and timestep.ndim == 2 and timestep.shape[1] > 1 and \
            timestep.shape[1] % found.world:
        raise ValueError(f"timestep: {degrees} the plan splits a timestep [B, N] along N, expected N divisible by "
                         f"{found.world}, got {list(timestep.shape)} (a diffusion-forcing timestep has one entry a "
                         f"latent frame: {geometry.frames} frames); pick degrees that divide its frames, or another "
                         f"number of frames")


def refuse_ring_cuts(processors: Sequence[Any], approximation: str | None, order: str | None) -> None:
    """Under ring attention, masks that the ring's shards would cut are refused at a forward's start (the first sparse
    step would raise after every rank had run the dense steps): a method's ``approximation`` of unkept blocks (its
    statistics cover whole key blocks and groups of them), or masks over another token ``order`` (STA's tiles, whose
    blocks cross the shards, contiguous runs of the model's order). Callables are checked per mask (:mod:`.sharded`)."""
    cp = getattr(processors[0]._parallel_config, "context_parallel_config", None) if processors else None
    if cp is None or cp.ring_degree == 1:
        return
    if approximation not in (None, "drop"):
        raise ValueError(f"approximation: under ring attention (ring degree {cp.ring_degree}) expected 'drop', got "
                         f"{approximation!r} (the method approximates the blocks a row does not keep, as PASA does by "
                         f"default, from statistics of whole key blocks that the ring's key shards cut); pass "
                         f"approximation='drop' to apply(), or run under Ulysses only (ring_degree=1)")
    if order is not None:
        raise ValueError(f"method: under ring attention (ring degree {cp.ring_degree}) expected masks over the model's "
                         f"token order, got a method that plans over {order} (its blocks cross the ring's shards); "
                         f"run it under Ulysses only (ring_degree=1: each rank holds whole sequences), or use another "
                         f"method")


# Why diffusers' processor of a joint video + text model cannot run under a context-parallel plan (None: others')
NO_DIFFUSERS_PROCESSOR = {
    None: "diffusers' processor builds its padding mask from this rank's tokens",
    "MochiTransformer3DModel": "diffusers' processor runs torch SDPA on this rank's tokens only, not the other ranks' "
                               "video",
}


def after_remove(processors: Sequence[Any], joint_model: str | None) -> str | None:
    """What a model needs to run after ``handle.remove()`` under the context parallelism of its ``processors``
    (sparsecore's, which share one parallel config); None: nothing.

    A joint video + text model (``joint_model``: its class name; HunyuanVideo 1.5 under
    :data:`HUNYUAN_VIDEO_15_CP_PLAN`, Mochi 1 under :data:`MOCHI_CP_PLAN`, HunyuanVideo 1.0 under a plan of the
    user's) runs only with sparsecore's processors (:data:`NO_DIFFUSERS_PROCESSOR`), and diffusers' ring template
    calls its backend with ``return_lse=True``, which :data:`NO_LSE_BACKENDS` refuse.
    """
    cp = getattr(processors[0]._parallel_config, "context_parallel_config", None) if processors else None
    if cp is None or cp.ring_degree * cp.ulysses_degree == 1:
        return None
    if joint_model:
        why = NO_DIFFUSERS_PROCESSOR.get(joint_model, NO_DIFFUSERS_PROCESSOR[None])
        return (f"{joint_model} under context parallelism runs only with sparsecore applied ({why}): run it densely "
                "on a transformer without enable_parallelism")
    backend = processors[0]._attention_backend
    name = str(getattr(backend, "value", backend)) if backend is not None else active_backend()
    if cp.ring_degree > 1 and name in NO_LSE_BACKENDS:
        return (f"diffusers' ring attention needs an attention backend that returns the LSE, which {name!r} does not: "
                "transformer.set_attention_backend('_native_cudnn') or 'flash' on CUDA (diffusers 0.42 has none on "
                "NPU: run without ring_degree there)")
    return None


def dense_remedy(processors: Sequence[Any], joint_model: str | None) -> str:
    """How to run an input densely: ``handle.remove()``, and what context parallelism needs after it."""
    need = after_remove(processors, joint_model)
    if need is None:
        return "call handle.remove() to run this input densely"
    return need if joint_model else f"to run this input densely, handle.remove(); then {need}"


def enable_parallelism(transformer: Any, config: Any) -> None:
    """``transformer.enable_parallelism(config=config)`` for sparsecore's context parallelism (any degrees).

    HunyuanVideo 1.5 gets :data:`HUNYUAN_VIDEO_15_CP_PLAN`, Mochi 1 :data:`MOCHI_CP_PLAN` (its processors, which
    diffusers' leaves without the config, get it here; a forward whose blocks run diffusers' processor is refused:
    :func:`refuse_diffusers_mochi`); Wan keeps diffusers' plan, SkyReels-V2 takes it, Wan VACE
    takes :data:`WAN_VACE_CP_PLAN`, LTX-Video :data:`LTX_VIDEO_CP_PLAN`; in these four the cross-attention over the
    (replicated) text runs on each rank's tokens locally: exact, no communication, and any attention backend
    (diffusers' ring template needs one that returns an LSE). LTX-2 is refused: its video-to-audio attention needs
    every rank's video.
    """
    from diffusers import ContextParallelConfig, ParallelConfig
    from diffusers.models.transformers.transformer_hunyuan_video15 import HunyuanVideo15Transformer3DModel
    from diffusers.models.transformers.transformer_ltx import LTXVideoTransformer3DModel
    from diffusers.models.transformers.transformer_mochi import MochiTransformer3DModel
    from diffusers.models.transformers.transformer_skyreels_v2 import SkyReelsV2Transformer3DModel
    from diffusers.models.transformers.transformer_wan_vace import WanVACETransformer3DModel

    if not isinstance(config, (ContextParallelConfig, ParallelConfig)):
        raise TypeError(f"config: expected a diffusers ContextParallelConfig or ParallelConfig, got "
                        f"{type(config).__name__}")
    if isinstance(transformer, HunyuanVideo15Transformer3DModel):
        plan = HUNYUAN_VIDEO_15_CP_PLAN
    elif isinstance(transformer, MochiTransformer3DModel):
        plan = MOCHI_CP_PLAN
    elif isinstance(transformer, WanVACETransformer3DModel):
        plan = WAN_VACE_CP_PLAN
    elif isinstance(transformer, (WanTransformer3DModel, SkyReelsV2Transformer3DModel)):
        plan = WanTransformer3DModel._cp_plan
    elif isinstance(transformer, LTXVideoTransformer3DModel):
        plan = LTX_VIDEO_CP_PLAN
    else:
        why = " (its video-to-audio attention reads every video token)" if \
            type(transformer).__name__ == "LTX2VideoTransformer3DModel" else ""
        names = ", ".join(c.__name__ for c in (WanTransformer3DModel, WanVACETransformer3DModel,
                                               SkyReelsV2Transformer3DModel, HunyuanVideo15Transformer3DModel,
                                               MochiTransformer3DModel, LTXVideoTransformer3DModel))
        raise TypeError(f"transformer: expected a diffusers {names}, got {type(transformer).__name__} (sparsecore "
                        f"has no context-parallel plan for it{why}: run it on one GPU)")
    transformer.enable_parallelism(config=config, cp_plan=plan)
    blocks = (*getattr(transformer, "blocks", ()), *getattr(transformer, "vace_blocks", ()))
    if plan is LTX_VIDEO_CP_PLAN:
        blocks = tuple(transformer.transformer_blocks)
        if flat_ltx_timestep not in transformer._forward_pre_hooks.values():
            transformer.register_forward_pre_hook(flat_ltx_timestep, with_kwargs=True)
    for block in blocks:                                    # Wan's and LTX's text cross-attention: local, exact
        block.attn2.processor._parallel_config = None
    if plan is MOCHI_CP_PLAN:
        # diffusers sets the config only on processors with the attribute, which MochiAttnProcessor2_0 has not: it
        # goes on the original (which ignores it) where sparsecore's processor reads it, before or after apply()
        for block in transformer.transformer_blocks:
            block.attn1.processor._parallel_config = transformer._parallel_config
        transformer.register_forward_pre_hook(refuse_diffusers_mochi)


def refuse_diffusers_mochi(transformer: Any, args: tuple) -> None:
    """A forward pre-hook of a ``MochiTransformer3DModel`` under :data:`MOCHI_CP_PLAN`: raises where a block's
    processor is not sparsecore's (never applied, or after ``handle.remove()``), whose output would be wrong, not an
    error (:data:`NO_DIFFUSERS_PROCESSOR`)."""
    for index, block in enumerate(transformer.transformer_blocks):
        processor = block.attn1.processor
        if not isinstance(processor, SparseProcessor):
            message = (f"transformer_blocks[{index}].attn1.processor: under MOCHI_CP_PLAN expected sparsecore's "
                       f"MochiSparseAttnProcessor, got {type(processor).__name__} "
                       f"({NO_DIFFUSERS_PROCESSOR['MochiTransformer3DModel']}); apply sparsecore to this "
                       f"transformer, or run it densely on a transformer without enable_parallelism")
            raise ValueError(message)  # noqa: TRY004  (a state error, not a wrong type)


@dataclass(frozen=True)
class Exchange:
    """The Ulysses all-to-all of the ring path: ``[B, V/(RU) + T, H, D]`` <-> ``[B, V/R + T, H/U, D]``.

    Video tokens go through diffusers' ``_all_to_all_dim_exchange`` on the Ulysses group; the text
    (replicated) keeps this rank's heads on the way in and all-gathers the heads on the way out.
    """

    ulysses: UlyssesGroup
    video: int                    # video tokens per rank before the exchange: V / (R U)

    def heads_in(self, x: torch.Tensor) -> torch.Tensor:
        if self.ulysses.world == 1:
            return x
        group, size = self.ulysses.group, x.shape[2] // self.ulysses.world
        video = _all_to_all_dim_exchange(x[:, :self.video].contiguous(), 2, 1, group)
        text = x[:, self.video:, self.ulysses.rank * size:(self.ulysses.rank + 1) * size]
        return torch.cat([video, text], dim=1) if text.shape[1] else video

    def heads_out(self, out: torch.Tensor) -> torch.Tensor:
        if self.ulysses.world == 1:
            return out
        video = self.video * self.ulysses.world                       # V / R rows of video after the exchange
        result = _all_to_all_dim_exchange(out[:, :video].contiguous(), 1, 2, self.ulysses.group)
        if out.shape[1] == video:
            return result
        text = out[:, video:].contiguous()
        parts = [torch.empty_like(text) for _ in range(self.ulysses.world)]
        dist.all_gather(parts, text, group=self.ulysses.group)
        return torch.cat([result, torch.cat(parts, dim=2)], dim=1)


def gather_sequence(x: torch.Tensor, ring: RingGroup, video: int) -> torch.Tensor:
    """``[B, V/R + T, h, D]`` of every ring rank as the whole sequence ``[B, V + T, h, D]`` (video in rank order)."""
    if ring.world == 1:
        return x
    local = x[:, :video].contiguous()
    parts = [torch.empty_like(local) for _ in range(ring.world)]
    dist.all_gather(parts, local, group=ring.group)
    return torch.cat(parts + [x[:, video:]], dim=1)


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, ulysses: UlyssesGroup,
              local: LocalAttention) -> torch.Tensor:
    """``[B, S/N, H, D]`` in and out: diffusers' Ulysses all-to-alls around ``local`` (``[B, S, H/N, D]``)."""

    def forward_op(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Any, dropout_p: float,
                   is_causal: bool, scale: Any, enable_gqa: bool, return_lse: bool, _save_ctx: bool = True,
                   _parallel_config: Any = None) -> torch.Tensor:
        return local(q, k, v)

    return _templated_context_parallel_attention(query, key, value, None, 0.0, False, None, False, False,
                                                 forward_op=forward_op, backward_op=_no_backward,
                                                 _parallel_config=ulysses.config)


def _no_backward(ctx: Any, grad_out: torch.Tensor, *args: Any) -> Any:
    raise NotImplementedError(INFERENCE_ONLY)


def _all_gather(values: torch.Tensor, *, world: int, group: Any, device: torch.device) -> torch.Tensor:
    """Per-head float64 values of every rank of ``group``, in rank (= head) order, on ``device``."""
    local = values.to(device=device, dtype=torch.float64).contiguous()
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local, group=group)
    return torch.cat(parts)
