"""The diffusers models sparsecore plugs into: where their self-attention lives and how it makes q, k, v.

One :class:`ModelSpec` per model family (diffusers 0.42.1):

- ``WanTransformer3DModel`` (Wan 2.1 and 2.2, T2V/I2V/TI2V): the self-attention ``blocks[i].attn1``;
  q, k, v as diffusers' ``WanAttnProcessor`` makes them (``transformer_wan._get_qkv_projections``,
  ``norm_q`` / ``norm_k``, Wan's interleaved RoPE, which is a closure inside that processor and
  so is re-stated in :func:`wan_rope` with the same arithmetic). The cross-attention ``attn2``
  (text, and the image context of I2V) is not touched.
- ``HunyuanVideo15Transformer3DModel``: the joint video+text attention
  ``transformer_blocks[i].attn``, video then text on the sequence axis, as diffusers'
  ``HunyuanVideo15AttnProcessor2_0`` builds it (``apply_rotary_emb`` on the video part, the
  ``add_*_proj`` text projections and their norms). The text refiner's attention stays dense.
- ``HunyuanVideoTransformer3DModel`` (HunyuanVideo 1.0, T2V and I2V): the same joint attention in its
  double-stream ``transformer_blocks[i].attn`` (text through ``add_*_proj``), then in its single-stream
  ``single_transformer_blocks[i].attn`` (one projection of the joint sequence), layers numbered in that
  order (``HunyuanVideoAttnProcessor2_0``). The text refiner's attention stays dense.
- ``CogVideoXTransformer3DModel`` (CogVideoX 1.0 and 1.5): the joint text+video attention
  ``transformer_blocks[i].attn1`` of ``CogVideoXAttnProcessor2_0``, whose sequence is text then video.
  Attention is the same under any order of its tokens (the same order for queries, keys and values), so
  the processor builds the sequence video first (:func:`joint_qkv`), the order every mask has, and
  splits the output back into video and text.
- ``WanVACETransformer3DModel`` (Wan 2.1 VACE): Wan's self-attention in its ``vace_blocks`` (over the control
  tokens, which the forward pads to the video's length and which share its RoPE) then in its ``blocks``, layers
  numbered in that order, as the forward runs them; the first block of each path (layers 0 and
  ``len(vace_layers)``) is where PASA's dense first layer goes (:attr:`ModelSpec.first_layers`).
- ``WanAnimateTransformer3DModel`` (Wan 2.2 Animate): Wan's self-attention ``blocks[i].attn1`` (its module's own copy of
  ``WanAttnProcessor``) over the reference frame and the video; the face adapter's cross-attention is not touched.
- ``SkyReelsV2Transformer3DModel`` (SkyReels-V2, T2V/I2V and diffusion forcing): Wan's layout
  (``SkyReelsV2AttnProcessor`` makes q, k, v as Wan's does). With ``num_frame_per_block`` > 1 (diffusion forcing's
  causal blocks) its forward masks attention frame-causally: the geometry then has ``causal_frames`` (what a
  token may see is a property of its block) and every mask and dense step keeps to it
  (:attr:`ModelSpec.causal_setting`).
- ``LTXVideoTransformer3DModel`` (LTX-Video): the self-attention ``transformer_blocks[i].attn1`` of
  ``LTXVideoAttnProcessor`` (RMS norms across heads on the projections, then its RoPE on the flat channels). Its
  forward takes packed tokens ``[B, S, C]`` and the token grid as ``num_frames``, ``height``, ``width``
  (:attr:`ModelSpec.token_grid`); the cross-attention ``attn2`` (text) is not touched.
- ``LTX2VideoTransformer3DModel`` (LTX-2): the video self-attention ``transformer_blocks[i].attn1`` of
  ``LTX2AudioVideoAttnProcessor``, or of ``LTX2PerturbedAttnProcessor`` where the config has ``perturbed_attn``
  (spatio-temporal guidance): norms across heads, its interleaved or split RoPE, and its per-head output gates where
  the config has ``gated_attn``. Packed tokens as LTX-Video's; its pipelines pass ``video_coords``, which must be the
  grid's (:func:`.ltx.ltx2_grid`). The audio self-attention, the text and the audio-video cross-attentions are not
  touched.
- ``MochiTransformer3DModel`` (Mochi 1): the joint video+text attention ``transformer_blocks[i].attn1`` of
  ``MochiAttnProcessor2_0``, video then each sample's valid text (its ``encoder_attention_mask`` ``[B, text]``; padded
  text rows give 0), RoPE on the video (its own interleaved pairs: :func:`mochi_rope`). The last block
  (``context_pre_only``) has no ``to_add_out``: its text output is returned unprojected, and the block drops it.
- ``Kandinsky5Transformer3DModel`` (Kandinsky 5 video, T2V and I2V): the self-attention
  ``visual_transformer_blocks[i].self_attention`` of ``Kandinsky5AttnProcessor`` (per-head RMS norms, its RoPE; see
  :mod:`.kandinsky`). Latents ``[B, F, H, W, C]``. The text encoder's blocks and the cross-attention are not touched.
- ``CosmosTransformer3DModel`` (Cosmos 1.0, Predict2 and Predict2.5, Transfer2.5's base): the self-attention
  ``transformer_blocks[i].attn1`` of ``CosmosAttnProcessor2_0`` (per-head RMS norms, its RoPE: :func:`cosmos_qkv`);
  the cross-attention ``attn2`` (text, and Predict2.5's image context) is not touched. Video-to-world's conditioning
  frames are latent frames of the grid (a channel marks them) with their own timesteps ``[B, 1, T, 1, 1]``.

All flatten the patch grid frame-major (Wan's and HunyuanVideo's ``Conv3d`` output ``.flatten(2)``,
CogVideoX's and Mochi's per-frame patches frame after frame; Kandinsky 5 in raster or 8 x 8 tiles within a frame),
the token order of :class:`sparsecore.VideoGeometry`;
``patch`` reads the patch sizes from the config and ``grid_axes`` says where the latents keep their frames, height and
width.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import torch
from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0, MochiAttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXTransformer3DModel
from diffusers.models.transformers.transformer_cosmos import CosmosAttnProcessor2_0, CosmosTransformer3DModel
from diffusers.models.transformers.transformer_hunyuan_video import (HunyuanVideoAttnProcessor2_0,
                                                                     HunyuanVideoTransformer3DModel)
from diffusers.models.transformers.transformer_hunyuan_video15 import (HunyuanVideo15AttnProcessor2_0,
                                                                       HunyuanVideo15Transformer3DModel)
from diffusers.models.transformers.transformer_kandinsky import Kandinsky5AttnProcessor, Kandinsky5Transformer3DModel
from diffusers.models.transformers.transformer_ltx import LTXVideoAttnProcessor, LTXVideoTransformer3DModel
from diffusers.models.transformers.transformer_ltx2 import (LTX2AudioVideoAttnProcessor, LTX2PerturbedAttnProcessor,
                                                            LTX2VideoTransformer3DModel)
from diffusers.models.transformers.transformer_mochi import MochiTransformer3DModel
from diffusers.models.transformers.transformer_skyreels_v2 import (SkyReelsV2AttnProcessor,
                                                                   SkyReelsV2Transformer3DModel)
from diffusers.models.transformers.transformer_wan import (WanAttnProcessor, WanTransformer3DModel,
                                                           _get_qkv_projections)
from diffusers.models.transformers.transformer_wan_animate import WanAnimateTransformer3DModel
from diffusers.models.transformers.transformer_wan_animate import WanAttnProcessor as WanAnimateAttnProcessor
from diffusers.models.transformers.transformer_wan_vace import WanVACETransformer3DModel

from sparsecore.methods import lvsa

from . import kandinsky
from .ltx import PackedGrid, ltx2_grid, ltx_grid

QKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class ModelSpec:
    """Where one diffusers model keeps its self-attention, and how it patchifies."""

    name: str
    model_class: type
    processor_class: type          # diffusers' processor we replace (exact type)
    blocks: tuple[str, ...]        # attributes holding the transformer blocks, in the forward's order
    attention: str                 # the self-attention module of a block
    horizon: Callable[[Any], int]  # LVSA's C for a model of this config (lvsa.REFERENCE_FRAMES)
    patch: Callable[[Any], tuple[int, int, int]]
    joint_text: bool               # text tokens share the attention sequence (after the video in every mask)
    grid_axes: tuple[int, int, int] = (2, 3, 4)   # the latents' frame, height and width axes: [B, C, F, H, W]
    timestep_arg: int = 1          # the forward's timestep among its positional arguments
    causal_setting: str | None = None  # the config field of latent frames per causal block (1: none), if any
    first_layers: Callable[[Any], tuple[int, ...]] = lambda config: (0,)   # the layer of each path's first block
    token_grid: Callable[[Any, tuple, dict], "PackedGrid"] | None = None   # packed tokens: (module, args, kwargs)
    also_replaces: tuple[type, ...] = ()   # other diffusers processors of the same attention (exact types)
    context_parallel: bool = True  # whether sparsecore runs it under diffusers' context parallelism
    # what of a forward's timestep and latents the step tracker (.steps) reads
    step_view: Callable[[Any, torch.Tensor], tuple[Any, torch.Tensor]] = lambda timestep, latents: (timestep, latents)
    # NABLA's parameters from a config whose forward orders tokens in 8 x 8 tiles (raises for one that does not), and
    # whether a forward's (args, kwargs) put them in that order
    nabla: Callable[[Any], dict[str, Any]] | None = None
    tiled_forward: Callable[[tuple, dict], bool] | None = None

    @property
    def joint_model(self) -> str | None:
        """The model class's name where text shares the attention sequence (for messages), else None."""
        return self.model_class.__name__ if self.joint_text else None

    @property
    def processor_classes(self) -> tuple[type, ...]:
        return (self.processor_class, *self.also_replaces)

    @property
    def latents(self) -> str:
        """The layout of the forward's ``hidden_states``, for messages."""
        if self.token_grid is not None:
            return "[B, S, C] (packed tokens, S = num_frames x height x width)"
        names = ["B", "C", "C", "C", "C"]
        for axis, name in zip(self.grid_axes, "FHW"):
            names[axis] = name
        return f"[{', '.join(names)}]"

    def causal_frames(self, config: Any) -> int:
        """Latent frames per causal block of a forward of this config, 0 for none. SkyReels-V2's forward masks
        attention by blocks of ``num_frame_per_block`` latent frames (temporal patch 1) where that is above 1
        (diffusers 0.42, ``SkyReelsV2Transformer3DModel.forward``)."""
        frames = 1 if self.causal_setting is None else int(getattr(config, self.causal_setting))
        return frames if frames > 1 else 0

    def grid(self, latents: torch.Size, config: Any) -> tuple[int, int, int]:
        """Frames, height and width of the token grid after patchify, from the latents' shape."""
        p_t, p_h, p_w = self.patch(config)
        frames, height, width = self.grid_axes
        return latents[frames] // p_t, latents[height] // p_h, latents[width] // p_w


def wan_rope(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved RoPE: channel pair (2i, 2i+1) turns by the angle whose cosine is
    ``freqs_cos[..., 2i]`` and sine ``freqs_sin[..., 2i+1]`` (diffusers 0.42's ``WanAttnProcessor``)."""
    even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2).type_as(x)


def wan_qkv(attn: Any, hidden_states: torch.Tensor, rotary_emb: tuple[torch.Tensor, torch.Tensor] | None) -> QKV:
    """Wan self-attention's q, k, v ``[B, S, H, D]`` (also Wan Animate's and SkyReels-V2's, whose attention modules have
    the same fields and processors the same arithmetic)."""
    query, key, value = _get_qkv_projections(attn, hidden_states, None)
    query = attn.norm_q(query)              # one statement each: q's input is freed before k's temporaries
    key = attn.norm_k(key)                  # (eagerly: the same peak as the original processor)
    query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
    if rotary_emb is not None:
        query = wan_rope(query, *rotary_emb)
        key = wan_rope(key, *rotary_emb)
    return query, key, value


def wan_output(attn: Any, out: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    out = attn.to_out[0](out.flatten(2, 3).type_as(query))
    return attn.to_out[1](out)


def hunyuan_qkv(attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None) -> QKV:
    """HunyuanVideo's joint q, k, v ``[B, S_video + S_text, H, D]`` (video first): 1.5's blocks and 1.0's
    double-stream ones project the text with their ``add_*_proj``; 1.0's single-stream blocks have none and
    project the joint sequence (:func:`joint_qkv`)."""
    if attn.add_q_proj is None:
        return joint_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
    rope = None if image_rotary_emb is None else partial(apply_rotary_emb, freqs_cis=image_rotary_emb, sequence_dim=1)
    return two_stream_qkv(attn, hidden_states, encoder_hidden_states, rope)


def cosmos_qkv(attn: Any, hidden_states: torch.Tensor,
               image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None) -> QKV:
    """Cosmos self-attention's q, k, v ``[B, S, H, D]`` as ``CosmosAttnProcessor2_0`` makes them: the projections, the
    per-head RMS norms, then its RoPE (``apply_rotary_emb`` with ``use_real_unbind_dim=-2``, here on the sequence axis
    1: the same elementwise arithmetic). Its key and value heads equal its query heads (the processor repeats them
    by ``D / D``)."""
    query, key, value = (proj(hidden_states).unflatten(2, (attn.heads, -1))
                         for proj in (attn.to_q, attn.to_k, attn.to_v))
    query = attn.norm_q(query)
    key = attn.norm_k(key)
    if image_rotary_emb is not None:
        query = apply_rotary_emb(query, image_rotary_emb, use_real=True, use_real_unbind_dim=-2, sequence_dim=1)
        key = apply_rotary_emb(key, image_rotary_emb, use_real=True, use_real_unbind_dim=-2, sequence_dim=1)
    return query, key, value


def mochi_qkv(attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
              image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None) -> QKV:
    """Mochi's joint q, k, v ``[B, S_video + S_text, H, D]`` (video first, all ``S_text`` text tokens: the handle reads
    the valid ones from the text mask), as ``MochiAttnProcessor2_0`` makes them before it selects each sample's."""
    rope = None if image_rotary_emb is None else partial(mochi_rope, freqs=image_rotary_emb)
    return two_stream_qkv(attn, hidden_states, encoder_hidden_states, rope)


def mochi_rope(x: torch.Tensor, freqs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mochi's RoPE (a closure inside ``MochiAttnProcessor2_0``, re-stated with the same arithmetic): channel pair
    (2i, 2i+1) turns in float32 by the angle whose cosine is ``freqs[0][..., i]`` and sine ``freqs[1][..., i]``."""
    freqs_cos, freqs_sin = freqs
    even, odd = x[..., 0::2].float(), x[..., 1::2].float()
    turned = ((even * freqs_cos - odd * freqs_sin).to(x.dtype), (even * freqs_sin + odd * freqs_cos).to(x.dtype))
    return torch.stack(turned, dim=-1).flatten(-2)


def two_stream_qkv(attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                   rope: Callable[[torch.Tensor], torch.Tensor] | None) -> QKV:
    """q, k, v ``[B, S_video + S_text, H, D]`` of a block that projects video (``to_*``) and text (``add_*_proj``)
    apart, each with its per-head norms, ``rope`` on the video q, k (HunyuanVideo's double-stream blocks, Mochi's)."""
    query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    if rope is not None:                    # one statement each, as in wan_qkv
        query = rope(query)
        key = rope(key)
    text_q, text_k, text_v = (proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
                              for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
    if attn.norm_added_q is not None:
        text_q = attn.norm_added_q(text_q)
    if attn.norm_added_k is not None:
        text_k = attn.norm_added_k(text_k)
    return tuple(torch.cat(pair, dim=1) for pair in ((query, text_q), (key, text_k), (value, text_v)))


def hunyuan_output(attn: Any, out: torch.Tensor, query: torch.Tensor, text: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The video and text outputs of the joint output (HunyuanVideo's, Mochi's), each through its output projection
    where the module has one, as their processors do: HunyuanVideo 1.0's single-stream attention has neither (its
    block projects the joint output), Mochi's last block (``context_pre_only``) no ``to_add_out`` (its text output
    goes back unprojected, and the block drops it)."""
    out = out.flatten(2, 3).to(query.dtype)
    video_out, text_out = out.split([out.shape[1] - text, text], dim=1)
    if getattr(attn, "to_out", None) is not None:
        video_out = attn.to_out[1](attn.to_out[0](video_out))
    if getattr(attn, "to_add_out", None) is not None:
        text_out = attn.to_add_out(text_out)
    return video_out, text_out


def joint_qkv(attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
              image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None) -> QKV:
    """q, k, v ``[B, S_video + S_text, H, D]`` of one projection of the joint sequence, video first, RoPE on the
    video tokens: HunyuanVideo 1.0's single-stream blocks, and CogVideoX's (whose processor puts the text first;
    projections, the per-head norms and RoPE act token by token, so only the order differs)."""
    joint = torch.cat([hidden_states, encoder_hidden_states], dim=1)
    query, key, value = (proj(joint).unflatten(2, (attn.heads, -1)) for proj in (attn.to_q, attn.to_k, attn.to_v))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    if image_rotary_emb is not None:
        video = hidden_states.shape[1]
        query = torch.cat([apply_rotary_emb(query[:, :video], image_rotary_emb, sequence_dim=1), query[:, video:]], 1)
        key = torch.cat([apply_rotary_emb(key[:, :video], image_rotary_emb, sequence_dim=1), key[:, video:]], 1)
    return query, key, value


def cogvideox_output(attn: Any, out: torch.Tensor, query: torch.Tensor, text: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The video and text outputs (in that order, as CogVideoX's processor returns them) of the joint output."""
    out = attn.to_out[1](attn.to_out[0](out.flatten(2, 3).type_as(query)))
    video_out, text_out = out.split([out.shape[1] - text, text], dim=1)
    return video_out, text_out


def _wan_patch(config: Any) -> tuple[int, int, int]:
    p_t, p_h, p_w = (int(p) for p in config.patch_size)
    return p_t, p_h, p_w


def _hunyuan_patch(config: Any) -> tuple[int, int, int]:
    return int(config.patch_size_t), int(config.patch_size), int(config.patch_size)


def _cogvideox_patch(config: Any) -> tuple[int, int, int]:
    return int(config.patch_size_t or 1), int(config.patch_size), int(config.patch_size)


def _mochi_patch(config: Any) -> tuple[int, int, int]:
    """Mochi patchifies each latent frame (a ``Conv2d`` of ``patch_size``): no temporal patch."""
    return 1, int(config.patch_size), int(config.patch_size)


def _horizon(name: str) -> Callable[[Any], int]:
    return lambda config: lvsa.REFERENCE_FRAMES[name]


def _cogvideox_horizon(config: Any) -> int:
    """13 token frames for CogVideoX 1.0 (the released LVSA code's); 1.5 (temporal patch 2) trains on 81 frames, 21
    latent frames: 11 token frames."""
    return lvsa.REFERENCE_FRAMES["cogvideox" if (config.patch_size_t or 1) == 1 else "cogvideox-1.5"]


WAN = ModelSpec("wan", WanTransformer3DModel, WanAttnProcessor, ("blocks",), "attn1", _horizon("wan"),
                _wan_patch, joint_text=False)
HUNYUAN_VIDEO_15 = ModelSpec("hunyuanvideo-1.5", HunyuanVideo15Transformer3DModel, HunyuanVideo15AttnProcessor2_0,
                             ("transformer_blocks",), "attn", _horizon("hunyuanvideo-1.5"), _hunyuan_patch,
                             joint_text=True)
HUNYUAN_VIDEO = ModelSpec("hunyuanvideo", HunyuanVideoTransformer3DModel, HunyuanVideoAttnProcessor2_0,
                          ("transformer_blocks", "single_transformer_blocks"), "attn", _horizon("hunyuanvideo"),
                          _hunyuan_patch, joint_text=True, context_parallel=False)   # diffusers has no plan for it
COGVIDEOX = ModelSpec("cogvideox", CogVideoXTransformer3DModel, CogVideoXAttnProcessor2_0, ("transformer_blocks",),
                      "attn1", _cogvideox_horizon, _cogvideox_patch, joint_text=True, grid_axes=(1, 3, 4),
                      timestep_arg=2, context_parallel=False)
WAN_VACE = ModelSpec("wan-vace", WanVACETransformer3DModel, WanAttnProcessor, ("vace_blocks", "blocks"), "attn1",
                    _horizon("wan"), _wan_patch, joint_text=False,
                    first_layers=lambda config: (0, len(config.vace_layers)))
WAN_ANIMATE = ModelSpec("wan-animate", WanAnimateTransformer3DModel, WanAnimateAttnProcessor, ("blocks",), "attn1",
                       _horizon("wan"), _wan_patch, joint_text=False, context_parallel=False)
SKYREELS_V2 = ModelSpec("skyreels-v2", SkyReelsV2Transformer3DModel, SkyReelsV2AttnProcessor, ("blocks",), "attn1",
                        _horizon("skyreels-v2"), _wan_patch, joint_text=False,
                        causal_setting="num_frame_per_block")
MOCHI = ModelSpec("mochi", MochiTransformer3DModel, MochiAttnProcessor2_0, ("transformer_blocks",), "attn1",
                  _horizon("mochi"), _mochi_patch, joint_text=True, timestep_arg=2)
LTX_VIDEO = ModelSpec("ltx-video", LTXVideoTransformer3DModel, LTXVideoAttnProcessor, ("transformer_blocks",),
                      "attn1", _horizon("ltx-video"), _hunyuan_patch, joint_text=False, timestep_arg=2,
                      token_grid=ltx_grid)
LTX_2 = ModelSpec("ltx-2", LTX2VideoTransformer3DModel, LTX2AudioVideoAttnProcessor, ("transformer_blocks",), "attn1",
                  _horizon("ltx-2"), _hunyuan_patch, joint_text=False, timestep_arg=4, token_grid=ltx2_grid,
                  also_replaces=(LTX2PerturbedAttnProcessor,))
KANDINSKY_5 = ModelSpec("kandinsky-5", Kandinsky5Transformer3DModel, Kandinsky5AttnProcessor,
                        ("visual_transformer_blocks",), "self_attention", _horizon("kandinsky-5"), _wan_patch,
                        joint_text=False, grid_axes=(1, 2, 3), timestep_arg=2, context_parallel=False,
                        nabla=kandinsky.nabla_params, tiled_forward=kandinsky.tiled_forward)
def _cosmos_step_view(timestep: Any, latents: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """What the step tracker reads of a Cosmos forward: the last latent frame's timestep, as bfloat16, and the last
    latent frame. Its pipelines condition on leading latent frames, each with a timestep of its own (Transfer2.5's
    0.1 by default, which would keep the largest timestep at 0.1 while the others fall below it) and, in Cosmos 1.0's
    video-to-world, noise drawn apart for the guidance forwards (so two forwards of one step differ there); the last
    frame is generated in every pipeline, the same in both forwards. Transfer2.5 rounds its sigmas to bfloat16 in a
    float32 tensor, so two steps' may be equal: read as 16-bit, such a repeat counts as the next step where the latents
    moved (:mod:`.steps`)."""
    if isinstance(timestep, torch.Tensor) and timestep.ndim == 5:            # [B, 1, T, 1, 1]
        timestep = timestep[:, :, -1]
    if isinstance(timestep, torch.Tensor) and timestep.is_floating_point():
        timestep = timestep.to(torch.bfloat16)
    return timestep, latents[:, :, -1:]


COSMOS = ModelSpec("cosmos", CosmosTransformer3DModel, CosmosAttnProcessor2_0, ("transformer_blocks",), "attn1",
                   _horizon("cosmos"), _wan_patch, joint_text=False, context_parallel=False,
                   step_view=_cosmos_step_view)
SUPPORTED_MODELS = (WAN, HUNYUAN_VIDEO_15, HUNYUAN_VIDEO, COGVIDEOX, WAN_VACE, WAN_ANIMATE, SKYREELS_V2, MOCHI,
                    LTX_VIDEO, LTX_2, KANDINSKY_5, COSMOS)


def spec_of(transformer: Any) -> ModelSpec:
    for spec in SUPPORTED_MODELS:
        if isinstance(transformer, spec.model_class):
            return spec
    names = ", ".join(spec.model_class.__name__ for spec in SUPPORTED_MODELS)
    hint = " (a torch.compile wrapper: apply before compiling)" if hasattr(transformer, "_orig_mod") else ""
    inner = [name for name in ("transformer", "transformer_2")
             if any(isinstance(getattr(transformer, name, None), spec.model_class) for spec in SUPPORTED_MODELS)]
    if inner:
        raise TypeError(f"transformer: expected a diffusers {names}, got the pipeline {type(transformer).__name__}; "
                        f"pass pipe.{inner[0]}" + (" (and apply again to pipe.transformer_2, Wan 2.2's second expert)"
                                                   if len(inner) > 1 else ""))
    raise TypeError(f"transformer: expected a diffusers {names}, got {type(transformer).__name__}{hint}; other "
                    f"models need their own processor (sparsecore.compile a mask and call it from one)")
