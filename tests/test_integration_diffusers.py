"""diffusers integration on tiny random Wan 2.1 (VACE, 2.2 Animate), HunyuanVideo 1.5 and 1.0, CogVideoX, SkyReels-V2,
Mochi 1, LTX-Video, LTX-2, Kandinsky 5 and Cosmos models (diffusers 0.42, CPU).

Checks: a dense mask gives the original processors' output; a sparse per-head mask gives
the output of a float64 oracle (the same model with diffusers' own processors, whose
attention call is replaced by masked softmax written here, under the mask expanded by
tests/oracle.py); remove() restores the model exactly; steps follow the timesteps; dense
steps take the model's own path; LVSA, AdaSpa and PASA sessions run end to end.
"""

from __future__ import annotations

import copy
import math
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import (CogVideoXTransformer3DModel, ContextParallelConfig, CosmosTransformer3DModel,
                       HunyuanVideo15Transformer3DModel,
                       HunyuanVideoTransformer3DModel, Kandinsky5Transformer3DModel, LTX2VideoTransformer3DModel,
                       LTXVideoTransformer3DModel, MochiTransformer3DModel, ParallelConfig,
                       SkyReelsV2Transformer3DModel, WanAnimateTransformer3DModel, WanTransformer3DModel,
                       WanVACETransformer3DModel)
from diffusers.models import attention_processor
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from diffusers.models.transformers import (transformer_cosmos, transformer_hunyuan_video, transformer_hunyuan_video15,
                                           transformer_kandinsky, transformer_ltx, transformer_ltx2,
                                           transformer_skyreels_v2, transformer_wan, transformer_wan_animate)
from oracle import expand_to_tokens

from sparsecore import BlockMask, VideoGeometry
from sparsecore.integrations import diffusers as sparse

FRAMES, HEIGHT, WIDTH = 8, 8, 8                # latent grid after patchify: 512 video tokens


# ------------------------------------------------------------------ tiny models and inputs
@dataclass
class Case:
    name: str
    build: Callable[[], Any]
    inputs: Callable[..., dict]
    install: Callable[[Any, "MaskedSoftmaxOracle"], None]   # (monkeypatch, oracle): the oracle replaces the
    attention: Callable[[Any], list]            # model's attention call; the self-attention modules, by layer
    float64_model: bool = True                  # the oracle's model in float64 (else the model's dtype: Kandinsky 5)
    atol: float = 0.0                           # at least this absolute tolerance where another attention kernel runs


def tiny_wan() -> WanTransformer3DModel:
    torch.manual_seed(0)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                 out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2,
                                 rope_max_seq_len=32).eval()


def wan_inputs(batch: int = 2, text: str = "ragged", seed: int = 1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(batch, 4, FRAMES, 2 * HEIGHT, 2 * WIDTH, generator=gen),
            "encoder_hidden_states": torch.randn(batch, 7, 16, generator=gen)}


def tiny_wan_vace() -> WanVACETransformer3DModel:
    """Wan VACE: one VACE block (layer 0, over the control tokens), then two Wan blocks."""
    torch.manual_seed(0)
    return WanVACETransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                     out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2,
                                     rope_max_seq_len=32, vace_layers=[0], vace_in_channels=6).eval()


def wan_vace_inputs(batch: int = 2, text: str = "ragged", seed: int = 1) -> dict:
    """Wan's inputs and the control latents (6 channels, the video's grid)."""
    gen = torch.Generator().manual_seed(seed + 100)
    return {**wan_inputs(batch, text, seed),
            "control_hidden_states": torch.randn(batch, 6, FRAMES, 2 * HEIGHT, 2 * WIDTH, generator=gen)}


def tiny_wan_animate() -> WanAnimateTransformer3DModel:
    """Wan 2.2 Animate: two blocks, a face adapter after the first, a motion encoder for 8 x 8 face crops."""
    torch.manual_seed(0)
    return WanAnimateTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                                        in_channels=None, latent_channels=4, out_channels=4, text_dim=16, freq_dim=16,
                                        ffn_dim=32, num_layers=2, image_dim=8, rope_max_seq_len=32,
                                        motion_encoder_channel_sizes={"8": 4, "4": 4}, motion_encoder_size=8,
                                        motion_style_dim=8, motion_dim=4, motion_encoder_dim=8,
                                        face_encoder_hidden_dim=8, face_encoder_num_heads=2,
                                        inject_face_latents_blocks=2).eval()


def wan_animate_inputs(batch: int = 2, text: str = "ragged", seed: int = 1) -> dict:
    """Latents with the reference frame first ``[B, 2 * 4 + 4, F, H, W]``, the pose of the other frames, 25 face crops
    (the face encoder's two stride-2 steps make 7 motion frames, one per latent frame after the reference), CLIP
    image tokens."""
    gen = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(batch, 12, FRAMES, 2 * HEIGHT, 2 * WIDTH, generator=gen),
            "encoder_hidden_states": torch.randn(batch, 7, 16, generator=gen),
            "encoder_hidden_states_image": torch.randn(batch, 5, 8, generator=gen),
            "pose_hidden_states": torch.randn(batch, 4, FRAMES - 1, 2 * HEIGHT, 2 * WIDTH, generator=gen),
            "face_pixel_values": torch.randn(batch, 3, 25, 8, 8, generator=gen)}


def tiny_skyreels_v2(frames_per_block: int = 1) -> SkyReelsV2Transformer3DModel:
    torch.manual_seed(0)
    return SkyReelsV2Transformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                                        in_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32,
                                        num_layers=2, rope_max_seq_len=32,
                                        num_frame_per_block=frames_per_block).eval()


def tiny_hunyuan() -> HunyuanVideo15Transformer3DModel:
    torch.manual_seed(0)
    return HunyuanVideo15Transformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                            num_layers=2, num_refiner_layers=1, mlp_ratio=2.0, patch_size=1,
                                            patch_size_t=1, text_embed_dim=16, text_embed_2_dim=8, image_embed_dim=8,
                                            rope_axes_dim=(4, 6, 6)).eval()


HUNYUAN_TEXT = {   # (MLLM mask, ByT5 mask) per sample; image tokens are padding (t2v: zero image embeds)
    "ragged": [([1, 1, 1, 1, 0, 0], [1, 1, 0, 0]), ([1, 1, 1, 1, 1, 0], [1, 1, 1, 0])],   # 6 and 8 valid of 13
    "same": [([1, 1, 1, 0, 0, 0], [1, 0, 0, 0]), ([1, 1, 1, 0, 0, 0], [1, 0, 0, 0])],     # 4 and 4 valid
    "full": [([1] * 6, [1] * 4)],                                                        # no padding but images
}


def hunyuan_inputs(batch: int = 2, text: str = "ragged", seed: int = 1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    masks = (HUNYUAN_TEXT[text] * batch)[:batch]
    images = torch.zeros(batch, 3, 8) if text != "full" else torch.randn(batch, 3, 8, generator=gen)
    return {"hidden_states": torch.randn(batch, 4, FRAMES, HEIGHT, WIDTH, generator=gen),
            "encoder_hidden_states": torch.randn(batch, 6, 16, generator=gen),
            "encoder_attention_mask": torch.tensor([m for m, _ in masks]),
            "encoder_hidden_states_2": torch.randn(batch, 4, 8, generator=gen),
            "encoder_attention_mask_2": torch.tensor([m for _, m in masks]),
            "image_embeds": images}


def tiny_hunyuan_10() -> HunyuanVideoTransformer3DModel:
    """HunyuanVideo 1.0: one double-stream and one single-stream block."""
    torch.manual_seed(0)
    return HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                          num_layers=1, num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0,
                                          patch_size=1, patch_size_t=1, guidance_embeds=False, text_embed_dim=16,
                                          pooled_projection_dim=8, rope_axes_dim=(4, 6, 6)).eval()


HUNYUAN_10_TEXT = {"ragged": [[1] * 5 + [0] * 3, [1] * 7 + [0]], "same": [[1] * 4 + [0] * 4] * 2, "full": [[1] * 8]}


def hunyuan_10_inputs(batch: int = 2, text: str = "ragged", seed: int = 1) -> dict:
    """8 text tokens a sample, its valid ones first (5 and 7, 4 and 4, or all 8)."""
    gen = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(batch, 4, FRAMES, HEIGHT, WIDTH, generator=gen),
            "encoder_hidden_states": torch.randn(batch, 8, 16, generator=gen),
            "encoder_attention_mask": torch.tensor((HUNYUAN_10_TEXT[text] * batch)[:batch]),
            "pooled_projections": torch.randn(batch, 8, generator=gen)}


def tiny_cogvideox(patch_t: int | None = None) -> CogVideoXTransformer3DModel:
    """CogVideoX 1.0 (5B's layout: RoPE, no positional embedding), or 1.5 with ``patch_t=2``."""
    torch.manual_seed(0)
    return CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                      time_embed_dim=8, text_embed_dim=16, num_layers=2, sample_width=2 * WIDTH,
                                      sample_height=2 * HEIGHT, patch_size=2, patch_size_t=patch_t,
                                      max_text_seq_length=7, use_rotary_positional_embeddings=True).eval()


def cogvideox_inputs(batch: int = 2, text: str = "ragged", seed: int = 1, patch_t: int = 1) -> dict:
    """Latents ``[B, F, C, H, W]``, 7 text tokens (CogVideoX pads its prompts: no text mask), and RoPE as the
    pipeline makes it for the grid."""
    gen = torch.Generator().manual_seed(seed)
    rope = get_3d_rotary_pos_embed(16, ((0, 0), (HEIGHT, WIDTH)), (HEIGHT, WIDTH), FRAMES)
    return {"hidden_states": torch.randn(batch, FRAMES * patch_t, 4, 2 * HEIGHT, 2 * WIDTH, generator=gen),
            "encoder_hidden_states": torch.randn(batch, 7, 16, generator=gen), "image_rotary_emb": rope}


def tiny_mochi() -> MochiTransformer3DModel:
    """Mochi 1: two blocks, the last ``context_pre_only`` (no ``to_add_out``); its RoPE frequencies drawn (the model
    starts them at 0, which would leave RoPE the identity)."""
    torch.manual_seed(0)
    model = MochiTransformer3DModel(patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=2,
                                    pooled_projection_dim=16, in_channels=4, text_embed_dim=16, time_embed_dim=16,
                                    max_sequence_length=8).eval()
    with torch.no_grad():
        model.pos_frequencies.normal_()
    return model


MOCHI_TEXT = {"ragged": [[1] * 3 + [0] * 5, [1] * 6 + [0] * 2], "same": [[1] * 4 + [0] * 4] * 2, "full": [[1] * 8],
              "cfg": [[0] * 8, [1] * 5 + [0] * 3]}      # CFG's batch: an empty negative prompt zeroed (no valid text)


def mochi_inputs(batch: int = 2, text: str = "ragged", seed: int = 1) -> dict:
    """Latents ``[B, C, F, H, W]`` (patch 2: the grid's 2x), 8 text tokens a sample, its valid ones first (3 and 6, 4
    and 4, or all 8), as the T5 tokenizer of its pipeline pads them."""
    gen = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(batch, 4, FRAMES, 2 * HEIGHT, 2 * WIDTH, generator=gen),
            "encoder_hidden_states": torch.randn(batch, 8, 16, generator=gen),
            "encoder_attention_mask": torch.tensor((MOCHI_TEXT[text] * batch)[:batch])}


def tiny_ltx() -> LTXVideoTransformer3DModel:
    """LTX-Video: two blocks, patch 1 (its latents are packed into tokens by the pipeline)."""
    torch.manual_seed(0)
    return LTXVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                      cross_attention_dim=32, num_layers=2, caption_channels=16).eval()


def ltx_inputs(batch: int = 2, text: str = "ragged", seed: int = 1) -> dict:
    """Packed tokens ``[B, S, C]`` of the grid, with the grid as ``num_frames``, ``height``, ``width`` (as LTX's
    pipeline passes them), 7 text tokens for the cross-attention, all valid."""
    gen = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(batch, FRAMES * HEIGHT * WIDTH, 4, generator=gen),
            "encoder_hidden_states": torch.randn(batch, 7, 16, generator=gen),
            "encoder_attention_mask": torch.ones(batch, 7), "num_frames": FRAMES, "height": HEIGHT, "width": WIDTH}


def tiny_ltx2(**config: Any) -> LTX2VideoTransformer3DModel:
    """LTX-2: two blocks of video (2 heads x 16) and audio (2 heads x 8) streams, patch 1; ``config`` adds to it (the
    gates, split RoPE, the perturbed processor of spatio-temporal guidance)."""
    torch.manual_seed(0)
    tiny = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32,
                audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2, audio_attention_head_dim=8,
                audio_cross_attention_dim=16, num_layers=2, caption_channels=16)
    return LTX2VideoTransformer3DModel(**{**tiny, **config}).eval()


def ltx2_inputs(batch: int = 2, text: str = "ragged", seed: int = 1, model: Any = None) -> dict:
    """Packed video tokens and 10 audio tokens, 7 text tokens for each stream, the grid as ``num_frames``, ``height``,
    ``width``, and the video coordinates its pipeline passes (``rope.prepare_video_coords`` at 24 fps; the
    coordinates depend on the config's patches and VAE factors only, so a default tiny model's serve)."""
    gen = torch.Generator().manual_seed(seed)
    coords = (model or tiny_ltx2()).rope.prepare_video_coords(batch, FRAMES, HEIGHT, WIDTH, torch.device("cpu"))
    return {"hidden_states": torch.randn(batch, FRAMES * HEIGHT * WIDTH, 4, generator=gen),
            "audio_hidden_states": torch.randn(batch, 10, 4, generator=gen),
            "encoder_hidden_states": torch.randn(batch, 7, 16, generator=gen),
            "audio_encoder_hidden_states": torch.randn(batch, 7, 16, generator=gen),
            "num_frames": FRAMES, "height": HEIGHT, "width": WIDTH, "audio_num_frames": 10, "video_coords": coords}


def tiny_kandinsky() -> Kandinsky5Transformer3DModel:
    """Kandinsky 5: one text block, two visual blocks of 2 heads x 16 (RoPE axes 4 / 6 / 6), patch (1, 2, 2)."""
    torch.manual_seed(0)
    model = Kandinsky5Transformer3DModel(in_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16, out_visual_dim=4,
                                         model_dim=32, ff_dim=64, num_text_blocks=1, num_visual_blocks=2,
                                         axes_dims=(4, 6, 6))
    for module in model.modules():      # its modulations start at zero (every block the identity), its q, k norms at
        if isinstance(module, transformer_kandinsky.Kandinsky5Modulation):     # one (the same): random here
            torch.nn.init.normal_(module.out_layer.weight, std=0.2)
        elif isinstance(module, torch.nn.RMSNorm):
            torch.nn.init.normal_(module.weight, mean=1.0, std=0.3)
    return model.eval()


def kandinsky_inputs(batch: int = 2, text: str = "ragged", seed: int = 1, fractal: bool = False) -> dict:
    """Latents ``[B, F, H, W, C]``, 7 text tokens, the RoPE positions as its pipeline makes them; ``fractal``: the
    ``sparse_params`` of its NABLA configurations (tokens in 8 x 8 tiles of each frame), no STA mask needed here."""
    gen = torch.Generator().manual_seed(seed)
    inputs = {"hidden_states": torch.randn(batch, FRAMES, 2 * HEIGHT, 2 * WIDTH, 4, generator=gen),
              "encoder_hidden_states": torch.randn(batch, 7, 16, generator=gen),
              "pooled_projections": torch.randn(batch, 8, generator=gen),
              "visual_rope_pos": [torch.arange(n) for n in (FRAMES, HEIGHT, WIDTH)], "text_rope_pos": torch.arange(7),
              "scale_factor": (1.0, 2.0, 2.0)}
    return {**inputs, "sparse_params": {"to_fractal": True}} if fractal else inputs


def tiny_cosmos() -> CosmosTransformer3DModel:
    """Cosmos: two blocks of 2 heads x 16, patch (1, 2, 2); no learnable positions (as Predict2's configurations; its
    norm of them takes float32 only) nor padding-mask channel (resizing the mask needs torchvision)."""
    torch.manual_seed(0)
    return CosmosTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                    num_layers=2, mlp_ratio=2.0, text_embed_dim=16, adaln_lora_dim=8,
                                    max_size=(16, 32, 32), concat_padding_mask=False,
                                    extra_pos_embed_type=None).eval()


def cosmos_inputs(batch: int = 2, text: str = "ragged", seed: int = 1) -> dict:
    """Latents ``[B, C, F, H, W]``, 7 text tokens for the cross-attention, 24 fps (its video RoPE)."""
    gen = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(batch, 4, FRAMES, 2 * HEIGHT, 2 * WIDTH, generator=gen),
            "encoder_hidden_states": torch.randn(batch, 7, 16, generator=gen), "fps": 24}


def install_dispatch(module: Any) -> Callable[[Any, "MaskedSoftmaxOracle"], None]:
    """The oracle as ``module``'s ``dispatch_attention_fn`` (``[B, S, H, D]``), which Wan's and HunyuanVideo's
    processors call."""
    return lambda patch, oracle: patch.setattr(module, "dispatch_attention_fn", oracle.dispatch)


def install_text_first_sdpa(patch: Any, oracle: "MaskedSoftmaxOracle") -> None:
    """The oracle as torch's SDPA, which CogVideoX's processor calls on ``[B, H, S, D]`` with the text first: the
    oracle sees the video first, the order of the masks."""
    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, **_):
        assert attn_mask is None and not is_causal
        text = query.shape[2] - FRAMES * HEIGHT * WIDTH
        q, k, v = (t.transpose(1, 2).roll(-text, dims=1) for t in (query, key, value))
        return oracle.dispatch(q, k, v).roll(text, dims=1).transpose(1, 2)
    patch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)


def install_per_sample_sdpa(patch: Any, oracle: "MaskedSoftmaxOracle") -> None:
    """The oracle as torch's SDPA in diffusers' ``attention_processor`` (its ``F``), which Mochi's processor calls once
    per sample on ``[1, H, S, D]``: the video and the text its mask keeps, no token mask (its text pooling's call, with
    a key mask, reaches the oracle too). A layer's valid text counts are gathered over its per-sample calls."""
    seen: dict[int, list[int]] = {}

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, **_):
        assert dropout_p == 0.0 and not is_causal
        out = oracle.dispatch(*(t.transpose(1, 2) for t in (query, key, value)), attn_mask=attn_mask)
        if oracle.layer is not None:
            seen.setdefault(oracle.layer, []).extend(oracle.valid_text)
            oracle.valid_text = seen[oracle.layer]
        return out.transpose(1, 2)
    patch.setattr(attention_processor.F, "scaled_dot_product_attention", sdpa)


CASES = {
    "wan": Case("wan", tiny_wan, wan_inputs, install_dispatch(transformer_wan), lambda m: [b.attn1 for b in m.blocks]),
    "wan-vace": Case("wan-vace", tiny_wan_vace, wan_vace_inputs, install_dispatch(transformer_wan),
                     lambda m: [b.attn1 for b in (*m.vace_blocks, *m.blocks)]),
    "wan-animate": Case("wan-animate", tiny_wan_animate, wan_animate_inputs, install_dispatch(transformer_wan_animate),
                        lambda m: [b.attn1 for b in m.blocks]),
    "skyreels-v2": Case("skyreels-v2", tiny_skyreels_v2, wan_inputs, install_dispatch(transformer_skyreels_v2),
                        lambda m: [b.attn1 for b in m.blocks]),
    "hunyuan": Case("hunyuan", tiny_hunyuan, hunyuan_inputs, install_dispatch(transformer_hunyuan_video15),
                    lambda m: [b.attn for b in m.transformer_blocks]),
    "hunyuan-1.0": Case("hunyuan-1.0", tiny_hunyuan_10, hunyuan_10_inputs, install_dispatch(transformer_hunyuan_video),
                        lambda m: [b.attn for b in (*m.transformer_blocks, *m.single_transformer_blocks)]),
    "cogvideox": Case("cogvideox", tiny_cogvideox, cogvideox_inputs, install_text_first_sdpa,
                      lambda m: [b.attn1 for b in m.transformer_blocks]),
    "cogvideox-1.5": Case("cogvideox-1.5", partial(tiny_cogvideox, patch_t=2), partial(cogvideox_inputs, patch_t=2),
                          install_text_first_sdpa, lambda m: [b.attn1 for b in m.transformer_blocks]),
    "mochi": Case("mochi", tiny_mochi, mochi_inputs, install_per_sample_sdpa,
                  lambda m: [b.attn1 for b in m.transformer_blocks]),
    "ltx": Case("ltx", tiny_ltx, ltx_inputs, install_dispatch(transformer_ltx),
                lambda m: [b.attn1 for b in m.transformer_blocks]),
    "ltx2": Case("ltx2", tiny_ltx2, ltx2_inputs, install_dispatch(transformer_ltx2),
                 lambda m: [b.attn1 for b in m.transformer_blocks]),
    # Kandinsky 5's processor rounds q and k to bfloat16 after its RoPE whatever the dtype: a float64 copy would round
    # other values than the float32 model's, so its oracle keeps the model float32 around the float64 attention. The
    # rounding also turns a kernel's float32 noise in one layer's output into a bfloat16 step (2^-8 of an element of
    # q or k) in the next layer's: about 1e-5 in the output where the attention's kernel differs (seen: up to 2e-5)
    "kandinsky-5": Case("kandinsky-5", tiny_kandinsky, kandinsky_inputs, install_dispatch(transformer_kandinsky),
                        lambda m: [b.self_attention for b in m.visual_transformer_blocks], float64_model=False,
                        atol=1e-4),
    "cosmos": Case("cosmos", tiny_cosmos, cosmos_inputs, install_dispatch(transformer_cosmos),
                   lambda m: [b.attn1 for b in m.transformer_blocks]),
}
# The models with a text padding mask: the valid text of each sample of each ``inputs(text=...)`` kind, and the text
# tokens of a sample (a batch's samples of different valid counts plan and run apart)
TEXT_MASKED = {"hunyuan": ({"ragged": [6, 8], "same": [4, 4], "full": [13]}, 13),
               "hunyuan-1.0": ({"ragged": [5, 7], "same": [4, 4], "full": [8]}, 8),
               "mochi": ({"ragged": [3, 6], "same": [4, 4], "full": [8], "cfg": [0, 5]}, 8)}
# The models whose processor calls torch SDPA itself: no diffusers backend or parallel config reaches it
OWN_SDPA = ("cogvideox", "cogvideox-1.5", "mochi")
# The models whose processor keeps no backend or parallel config of its own but dispatches at diffusers' active backend
ACTIVE_BACKEND = ("cosmos",)


@pytest.fixture(params=sorted(CASES))
def case(request) -> Case:
    return CASES[request.param]


def forward(model: Any, inputs: dict, timestep: float) -> torch.Tensor:
    batch = inputs["hidden_states"].shape[0]
    dtype = inputs["hidden_states"].dtype
    timesteps = torch.full((batch,), timestep, dtype=dtype, device=inputs["hidden_states"].device)
    with torch.no_grad():
        out = model(**inputs, timestep=timesteps, return_dict=False)
    return out[0] if isinstance(out, tuple) else out                # Kandinsky 5 returns the sample itself


def forward_applied(model: Any, inputs: dict, timestep: float, method: Any = None, **params: Any) -> torch.Tensor:
    """:func:`forward` of ``model`` with sparsecore applied (``method``, default a full mask, and ``params``) on the
    CPU, removed after."""
    handle = sparse.apply(model, method=full_mask if method is None else method, device="cpu", **params)
    try:
        return forward(model, inputs, timestep)
    finally:
        handle.remove()


def full_mask(geometry: VideoGeometry, num_heads: int, step: int, layer: int) -> BlockMask:
    return BlockMask.full(num_heads, geometry.tokens, geometry.tokens, 48)


def random_mask(geometry: VideoGeometry, num_heads: int, step: int, layer: int) -> BlockMask:
    """A different random pattern per head, layer, step and text length on 32-token blocks (+ text blocks)."""
    offsets = geometry.block_offsets(32)
    blocks = len(offsets) - 1
    rng = np.random.default_rng([7, layer, step, geometry.text_tokens])
    keep = rng.random((num_heads, blocks, blocks)) < 0.35
    keep[:, np.arange(blocks), np.arange(blocks)] = True                   # no empty row
    lists = [[np.nonzero(keep[h, i])[0] for i in range(blocks)] for h in range(num_heads)]
    return BlockMask.from_lists(lists, offsets, offsets)


# ------------------------------------------------------------------ the float64 oracle
class MaskedSoftmaxOracle:
    """Stands in for diffusers' dispatch_attention_fn: plain masked softmax over float64 tensors.

    Self-attention of a tagged layer is restricted to ``provider``'s mask on the sample's
    valid tokens (read from diffusers' own padding mask); padding rows attend to nothing
    (output 0, as SDPA gives); other calls (Wan's cross-attention) are dense.
    """

    def __init__(self, provider: Callable, step: int, grid: tuple[int, int, int] = (FRAMES, HEIGHT, WIDTH)) -> None:
        self.provider, self.step, self.layer, self.grid = provider, step, None, grid
        self.valid_text: list[int] = []

    def dispatch(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
        q, k, v = (t.permute(0, 2, 1, 3).double() for t in (query, key, value))     # [B, H, S, D]
        batch, heads, seq, dim = q.shape
        scores = q @ k.transpose(-1, -2) / math.sqrt(dim)
        allowed = torch.ones(batch, heads, seq, k.shape[2], dtype=torch.bool)
        if attn_mask is not None and attn_mask.dtype != torch.bool:      # an additive bias (LTX's text mask)
            scores = scores + attn_mask.double()
        elif attn_mask is not None:
            allowed &= attn_mask
        if self.layer is not None:
            video = math.prod(self.grid)
            self.valid_text = []
            for b in range(batch):
                valid = int(allowed[b, 0].sum(-1).max())            # a padding or causal mask's valid prefix
                geometry = VideoGeometry(*self.grid, text_tokens=valid - video)
                self.valid_text.append(valid - video)
                tokens = torch.from_numpy(expand_to_tokens(self.provider(geometry, heads, self.step, self.layer)))
                own = torch.zeros(heads, seq, seq, dtype=torch.bool)
                own[:, :valid, :valid] = tokens
                allowed[b] &= own
        probs = torch.softmax(scores.masked_fill(~allowed, -math.inf), dim=-1).nan_to_num(0.0)
        return (probs @ v).permute(0, 2, 1, 3).to(query.dtype)


class Tagged:
    """Wraps a diffusers processor so the oracle knows which layer's self-attention runs."""

    def __init__(self, oracle: MaskedSoftmaxOracle, layer: int, inner: Any) -> None:
        self.oracle, self.layer, self.inner = oracle, layer, inner

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None,
                 image_rotary_emb=None, perturbation_mask=None, all_perturbed=None, sparse_params=None):
        self.oracle.layer = self.layer
        stg = {} if perturbation_mask is None and all_perturbed is None else \
            {"perturbation_mask": perturbation_mask, "all_perturbed": all_perturbed}    # LTX-2's perturbed processor
        try:
            if isinstance(self.inner, transformer_kandinsky.Kandinsky5AttnProcessor):   # no token mask; the oracle:
                return self.inner(attn, hidden_states, encoder_hidden_states, rotary_emb, None)  # NABLA gives way
            rope = rotary_emb if image_rotary_emb is None else image_rotary_emb        # every other processor's fifth
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, rope, **stg)
        finally:
            self.oracle.layer = None


def oracle_output(case: Case, model: Any, inputs: dict, provider: Callable, step: int, timestep: float,
                  monkeypatch, call: Callable[[Any, dict, float], torch.Tensor] | None = None,
                  grid: tuple[int, int, int] = (FRAMES, HEIGHT, WIDTH)) -> tuple[torch.Tensor, list[int]]:
    """The float64 oracle's output of ``call(model, inputs, timestep)`` (default :func:`forward`) on the token
    ``grid``, and the valid text counts it saw."""
    reference = copy.deepcopy(model).double() if case.float64_model else copy.deepcopy(model)
    oracle = MaskedSoftmaxOracle(provider, step, grid)
    for layer, module in enumerate(case.attention(reference)):
        module.processor = Tagged(oracle, layer, module.processor)   # Mochi's module has no set_processor
    # LTX-2's video coordinates stay float32, as its pipeline and its forward make them: the float64 model given float64
    # coordinates ends 6e-5 from the float32 one with diffusers' own attention (5e-7 with float32 coordinates)
    inputs64 = {name: value if name == "video_coords" or not case.float64_model else as_float64(value)
                for name, value in inputs.items()}
    with monkeypatch.context() as patch:
        case.install(patch, oracle)
        return (call or forward)(reference, inputs64, timestep).double(), oracle.valid_text


def as_float64(value: Any) -> Any:
    if isinstance(value, tuple):
        return tuple(as_float64(v) for v in value)
    return value.double() if isinstance(value, torch.Tensor) and value.is_floating_point() else value   # LTX's grid


# ------------------------------------------------------------------ tests
def test_dense_mask_gives_the_original_processors_output(case):
    model, inputs = case.build(), case.inputs()
    expected = forward(model, inputs, 999.0)
    handle = sparse.apply(model, method=full_mask, device="cpu")
    try:
        got = forward(model, inputs, 999.0)
    finally:
        handle.remove()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    rows = {(s["layer"], s["step"], s["backend"], s["density"]) for s in handle.stats()}
    assert rows == {(layer, 0, "dense", 1.0) for layer in range(len(case.attention(model)))}


@pytest.mark.parametrize("tokens", [37, 40])
def test_the_dense_path_takes_the_valid_prefix_and_gives_padding_rows_zero(tokens):
    """The model's padding mask ``valid_i & valid_j`` in float64 softmax, against the processor's dense path
    (which runs the model's dispatch on the valid prefix instead of building the ``[B, 1, S, S]`` mask)."""
    check_dense_path_on_a_prefix(tokens)


def check_dense_path_on_a_prefix(tokens: int) -> None:
    """A tiny HunyuanVideo 1.5 processor's dense path on 40 tokens whose first ``tokens`` are valid, against the
    model's padding mask in float64 softmax."""
    model = tiny_hunyuan()
    handle = sparse.apply(model, method="lvsa", device="cpu")
    try:
        processor = CASES["hunyuan"].attention(model)[0].processor
        gen = torch.Generator().manual_seed(3)
        q, k, v = (torch.randn(2, 40, 2, 16, generator=gen) for _ in range(3))
        got = processor.dense(q, k, v, tokens)
    finally:
        handle.remove()
    valid = torch.arange(40) < tokens
    scores = torch.einsum("bshd,bthd->bhst", q.double(), k.double()) / 4.0
    scores = scores.masked_fill(~(valid[:, None] & valid[None, :]), -math.inf)
    expected = torch.einsum("bhst,bthd->bshd", torch.softmax(scores, -1).nan_to_num(0.0), v.double())
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, text", [("wan", "ragged"), ("hunyuan", "ragged"), ("hunyuan", "same"),
                                        ("hunyuan", "full"), ("cogvideox", "ragged"), ("cogvideox-1.5", "ragged"),
                                        ("hunyuan-1.0", "ragged"), ("hunyuan-1.0", "same"), ("hunyuan-1.0", "full"),
                                        ("wan-vace", "ragged"), ("wan-animate", "ragged"), ("skyreels-v2", "ragged"),
                                        ("mochi", "ragged"), ("mochi", "same"), ("mochi", "full"),
                                        ("mochi", "cfg"), ("ltx", "ragged"), ("ltx2", "ragged"),
                                        ("kandinsky-5", "ragged"),
                                        ("cosmos", "ragged")])
def test_sparse_mask_matches_float64_masked_attention(name, text, monkeypatch):
    case = CASES[name]                     # Wan has no text in its self-attention, CogVideoX no text mask: one case
    model, inputs = case.build(), case.inputs(batch=1 if text == "full" else 2, text=text)
    dense = forward(model, inputs, 500.0)
    expected, valid_text = oracle_output(case, model, inputs, random_mask, 0, 500.0, monkeypatch)
    handle = sparse.apply(model, method=random_mask, device="cpu")
    try:
        got = forward(model, inputs, 500.0)
    finally:
        handle.remove()
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=max(5e-6, case.atol))   # fp32 vs fp64: ~6e-7
    assert (got - dense).abs().max() > 5e-3                  # the mask matters (~2e-2 from dense attention)
    stats = handle.stats()
    assert {s["backend"] for s in stats} == {"portable"} and all(0 < s["density"] < 1 for s in stats)
    if case.name in TEXT_MASKED:
        expected_text, tokens = TEXT_MASKED[case.name]
        assert valid_text == expected_text[text]
        assert sorted({s["text_tokens"] for s in stats}) == sorted(set(expected_text[text]))
        assert {s["padding"] for s in stats} == {tokens - n for n in expected_text[text]}


def row_mask(geometry: VideoGeometry, num_heads: int, step: int, layer: int) -> BlockMask:
    """A random pattern over blocks of one row of patches (``geometry.width`` tokens) and the text: what it keeps
    depends on the geometry's height and width, not only on its token count (as :func:`random_mask`'s does); no block
    of a later causal block is kept."""
    rows = geometry.video_start + np.arange(0, geometry.video_tokens + 1, geometry.width)
    offsets = np.unique(np.concatenate([[0, geometry.tokens], rows])).astype(np.int64)      # the text: one block
    blocks = len(offsets) - 1
    rng = np.random.default_rng([11, layer, step, geometry.text_tokens, geometry.frames, geometry.height,
                                 geometry.width])
    keep = rng.random((num_heads, blocks, blocks)) < 0.35
    keep[:, np.arange(blocks), np.arange(blocks)] = True
    if geometry.causal_frames:
        causal_block = (offsets[:-1] - geometry.video_start) // (geometry.frame_tokens * geometry.causal_frames)
        keep &= ~(causal_block[None, :] > causal_block[:, None])[None]                # (no text beside causal video)
    return BlockMask.from_lists([[np.flatnonzero(row) for row in head] for head in keep], offsets, offsets)


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_non_square_grid_keeps_frames_height_and_width_apart(name, monkeypatch):
    """On a 3 x 4 x 6 grid with masks of row blocks the model's geometry must be sparsecore's: a spec that swapped
    height and width (or frames and height) would plan its rows over other tokens than the oracle's, which reads the
    grid it built the inputs on (0.06-0.6 off for such swaps in Kandinsky 5, Cosmos, Mochi and HunyuanVideo 1.5).
    The other tests' 8 x 8 x 8 grid and 32-token blocks cannot tell a swap (a review helper's mutation)."""
    module = sys.modules[__name__]
    for field, value in (("FRAMES", 3), ("HEIGHT", 4), ("WIDTH", 6)):
        monkeypatch.setattr(module, field, value)
    case = CASES[name]
    model, inputs = case.build(), case.inputs(batch=2, text="ragged")
    expected, _ = oracle_output(case, model, inputs, row_mask, 0, 500.0, monkeypatch, grid=(3, 4, 6))
    got = forward_applied(model, inputs, 500.0, row_mask)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=max(5e-6, case.atol))


def test_remove_restores_processors_hooks_and_output(case):
    model, inputs = case.build(), case.inputs()
    modules = case.attention(model)
    originals = [m.processor for m in modules]
    hooks = (dict(model._forward_pre_hooks), dict(model._forward_hooks))
    before = forward(model, inputs, 999.0)
    handle = sparse.apply(model, method=random_mask, device="cpu")
    assert all(type(m.processor).__name__.endswith("SparseAttnProcessor") for m in modules)
    assert not torch.equal(forward(model, inputs, 999.0), before)
    handle.remove()
    handle.remove()                                           # idempotent
    assert all(m.processor is p for m, p in zip(modules, originals))
    assert (dict(model._forward_pre_hooks), dict(model._forward_hooks)) == hooks
    assert torch.equal(forward(model, inputs, 999.0), before)
    again = sparse.apply(model, method=full_mask, device="cpu")    # can be applied again after remove()
    again.remove()


def test_steps_follow_timesteps_with_guidance_calls_sharing_a_step(case):
    calls = []

    def recording(geometry, num_heads, step, layer):
        calls.append((step, layer))
        return random_mask(geometry, num_heads, step, layer)

    model, inputs = case.build(), case.inputs(batch=1, text="same")
    layers = len(case.attention(model))
    handle = sparse.apply(model, method=recording, device="cpu", num_steps=3)
    try:
        assert handle.step is None
        seen = []
        for timestep in (999.0, 999.0, 700.0, 700.0, 400.0, 400.0):        # cond + uncond per step
            forward(model, inputs, timestep)
            seen.append(handle.step)
        assert seen == [0, 0, 1, 1, 2, 2]
        assert calls == [(s, layer) for s in range(3) for layer in range(layers)]   # once per (layer, step)
        assert [s["calls"] for s in handle.stats()] == [2] * 3 * layers
        with pytest.raises(ValueError, match="num_steps"):
            forward(model, inputs, 100.0)                                   # a 4th step in a 3-step run
        forward(model, inputs, 999.0)                                       # a larger timestep: new run
        assert handle.step == 0 and handle.run == 1
        handle.set_step(2)                                                  # explicit steps override timesteps
        forward(model, inputs, 10.0)
        forward(model, inputs, 5.0)
        assert handle.step == 2 and calls[-layers:] == [(2, layer) for layer in range(layers)]
        handle.set_step(1)                                                  # going back: another run
        assert handle.run == 2
        handle.set_step(None)
        forward(model, inputs, 50.0)
        assert handle.step == 0 and handle.run == 3
        with pytest.raises(ValueError, match="num_steps"):
            handle.set_step(3)
    finally:
        handle.remove()
    assert [s["run"] for s in handle.stats()][-2:] == [3, 3]


@pytest.mark.parametrize("first_search, steps", [
    ("fused", [("dense", "dense"), ("dense", "dense"), ("dense", "search"), ("portable", "reuse")]),
    ("cached", [("dense", "dense"), ("dense", "dense-lse"), ("portable", "cached-search"), ("portable", "reuse")]),
])
def test_dense_warmup_steps_take_the_model_path(case, first_search, steps):
    """Warm-up steps (and the step whose dense pass gives the search its LSE) give the model's own output; the
    first search step is dense with the paper's fused search, sparse with first_search="cached"."""
    model, inputs = case.build(), case.inputs(batch=1, text="same")
    reference = [forward(model, inputs, t) for t in (999.0, 800.0)]
    handle = sparse.apply(model, method="adaspa", device="cpu", num_steps=4, warmup_steps=2, search_steps=(2,),
                          sparsity=0.5, first_search=first_search)
    try:
        outputs = [forward(model, inputs, t) for t in (999.0, 800.0, 600.0, 400.0)]
    finally:
        handle.remove()
    for got, expected in zip(outputs[:2], reference):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=max(1e-6, case.atol))
    table = {(s["layer"], s["step"]): (s["backend"], s["action"]) for s in handle.stats()}
    for layer in (0, 1):
        assert [table[layer, step] for step in range(4)] == steps


@pytest.mark.parametrize("first_search", ["cached", "fused"])
@pytest.mark.parametrize("name, text", [(name, text) for name in sorted(TEXT_MASKED) for text in ("same", "ragged")]
                         + [("mochi", "cfg")])   # one valid text length; two samples of two; CFG's, one with none
def test_text_padding_keeps_the_lse_of_the_dense_pass_before_a_search(name, first_search, text, monkeypatch):
    """With text padding (HunyuanVideo 1.5 and 1.0, Mochi) the dense pass that gives AdaSpa's first search its LSE
    (the step before it; with the paper's fused search, that step itself) runs on the valid tokens: the session gets
    its LSE, float64 logsumexp of those tokens' scores, and runs no second dense pass for it (that pass cost 7 s a
    generation on HunyuanVideo 1.5 at 2x on the H200); the step's output is the model's, its padding rows 0."""
    from sparsecore.integrations.diffusers.planner import Planner
    from sparsecore.methods import adaspa, causal
    case = CASES[name]
    monkeypatch.setattr(causal, "visible_lse", lambda *args, **kwargs: pytest.fail("a second dense pass for the LSE"))
    padding_rows, handed = [], []                  # each call's output on its padding rows; the LSEs handed over
    attend, plan = Planner.attend, adaspa.AdaSpaSession.plan
    def recorded(self, layer, geometry, *args):
        out = attend(self, layer, geometry, *args)
        padding_rows.append(out[:, geometry.tokens:])
        return out
    def planned(self, geometry, num_heads, **kwargs):
        if kwargs.get("lse") is not None:
            handed.append((kwargs["q"], kwargs["k"], kwargs["lse"]))
        return plan(self, geometry, num_heads, **kwargs)
    monkeypatch.setattr(Planner, "attend", recorded)
    monkeypatch.setattr(adaspa.AdaSpaSession, "plan", planned)
    batch = 1 if text == "same" else 2
    model, inputs = case.build(), case.inputs(batch=batch, text=text)
    reference = forward(model, inputs, 800.0)
    handle = sparse.apply(model, method="adaspa", device="cpu", num_steps=4, warmup_steps=1, sparsity=0.5,
                          search_steps=(2,) if first_search == "cached" else (1, 2), first_search=first_search)
    try:
        outputs = [forward(model, inputs, t) for t in (999.0, 800.0, 600.0)]
    finally:
        handle.remove()
    assert {s["padding"] for s in handle.stats()} != {0}
    torch.testing.assert_close(outputs[1], reference, rtol=1e-6, atol=max(1e-6, case.atol))
    assert torch.isfinite(outputs[2]).all()
    assert padding_rows and all(rows.numel() and not rows.any() for rows in padding_rows)
    groups = len(set(TEXT_MASKED[name][0][text][:batch]))          # samples of one valid length plan together
    assert len(handed) == len(case.attention(model)) * groups
    for q, k, lse in handed:                       # q, k of the valid tokens [B, H, L, D]
        scores = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
        torch.testing.assert_close(lse.double(), torch.logsumexp(scores, -1), rtol=1e-5, atol=1e-5)


METHODS = {
    "lvsa": {"reference_frames": 4, "window": 1},          # 8 latent frames > 4: sparse at every step
    "adaspa": {"warmup_steps": 1, "search_steps": (1, 2), "sparsity": 0.6, "block_size": 32},
    "pasa": {"dense_fraction": 0.25, "density": 0.3, "block_size": 32},
    "radial": {"dense_steps": 1, "dense_layers": 1, "block_size": 16},
    "sta": {"dense_steps": 1, "tile": (2, 4, 4), "window": (1, 1, 3)},
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_sessions_run_end_to_end(case, method):
    model, inputs = case.build(), case.inputs(batch=1, text="ragged")
    uncond = {**case.inputs(batch=1, text="same", seed=2), "hidden_states": inputs["hidden_states"]}  # other text
    handle = sparse.apply(model, method=method, device="cpu", num_steps=4, **METHODS[method])
    handle.timing(True)
    try:
        for timestep in (999.0, 750.0, 500.0, 250.0):
            assert torch.isfinite(forward(model, inputs, timestep)).all()
            assert torch.isfinite(forward(model, uncond, timestep)).all()
    finally:
        handle.remove()
    stats = handle.stats()
    geometries = 2 if case.name in TEXT_MASKED else 1      # HunyuanVideo, Mochi: two valid text lengths
    expected_calls = 1 if case.name in TEXT_MASKED else 2
    assert len(stats) == 4 * len(case.attention(model)) * geometries
    for s in stats:
        assert s["calls"] == expected_calls and s["ms"] >= 0 and s["ms_total"] >= s["ms"]
        assert 0 < s["density"] <= 1 and (s["backend"] == "dense") == (s["density"] == 1.0)
    sparse_steps = {s["step"] for s in stats if s["backend"] != "dense"}
    assert sparse_steps == {"lvsa": {0, 1, 2, 3}, "adaspa": {1, 2, 3}, "pasa": {1, 2, 3},
                            "radial": {1, 2, 3}, "sta": {1, 2, 3}}[method]   # AdaSpa: step 0
    # keeps its dense pass's LSE and step 1 searches on it (first_search="cached")
    if method in ("pasa", "radial"):                                    # their dense first layer
        assert {s["backend"] for s in stats if s["layer"] == 0} == {"dense"}
    if method == "lvsa" and case.name == "hunyuan":
        assert handle.params["reference_frames"] == 4


def test_lvsa_takes_the_hunyuanvideo_horizon_by_default():
    handle = sparse.apply(tiny_hunyuan(), method="lvsa", device="cpu")
    handle.remove()
    assert handle.params["reference_frames"] == 33
    model, inputs = tiny_hunyuan(), hunyuan_inputs(batch=1, text="same")
    handle = sparse.apply(model, method="lvsa", device="cpu")           # 8 frames <= 33: dense at every step
    try:
        forward(model, inputs, 999.0)
    finally:
        handle.remove()
    assert {s["backend"] for s in handle.stats()} == {"dense"}


def test_cogvideox_15_patches_frames_in_pairs():
    """CogVideoX 1.5 (``patch_size_t=2``): the latents' frames ``[B, F, C, H, W]`` pair up into token frames."""
    case = CASES["cogvideox-1.5"]
    model, inputs = case.build(), case.inputs(batch=2)
    assert inputs["hidden_states"].shape[1] == 2 * FRAMES
    handle = sparse.apply(model, method=random_mask, device="cpu")
    try:
        forward(model, inputs, 500.0)
    finally:
        handle.remove()
    assert handle.geometry == VideoGeometry(FRAMES, HEIGHT, WIDTH)
    assert {(s["tokens"], s["text_tokens"], s["padding"]) for s in handle.stats()} == {(FRAMES * HEIGHT * WIDTH + 7,
                                                                                        7, 0)}


def test_mochi_takes_its_horizon_patches_each_frame_and_refuses_padding_before_valid_text():
    """Mochi 1: LVSA's horizon is 28 latent frames (its 163 frames) unless given; each latent frame is patched alone
    (patch ``(1, 2, 2)``). Its processor keeps whatever text its mask marks (``nonzero``), but the block-mask IR needs
    each sample's valid text first: a mask with padding before valid text raises, naming that."""
    model, inputs = tiny_mochi(), mochi_inputs(batch=2)
    handle = sparse.apply(model, method="lvsa", device="cpu")
    handle.remove()
    assert handle.params["reference_frames"] == 28
    handle = sparse.apply(model, method=random_mask, device="cpu")
    try:
        forward(model, inputs, 500.0)
        assert handle.geometry == VideoGeometry(FRAMES, HEIGHT, WIDTH)
        scrambled = {**inputs, "encoder_attention_mask": inputs["encoder_attention_mask"].flip(-1)}
        with pytest.raises(ValueError, match="valid text tokens first"):
            forward(model, scrambled, 400.0)
    finally:
        handle.remove()


def test_skyreels_v2_diffusion_forcing_takes_per_frame_timesteps(monkeypatch):
    """Diffusion forcing's forward (a timestep per latent frame, ``[B, F]``) runs the sparse mask exactly (the float64
    oracle), and its steps follow the noisiest frame's timestep: as in the asynchronous mode, the frames not started
    yet stay at 999 while the first ones fall (one step), then the last frames' schedule counts the steps."""
    case = CASES["skyreels-v2"]
    model, inputs = case.build(), case.inputs(batch=1)

    def run(transformer: Any, data: dict, last: float, first: float) -> torch.Tensor:
        frames = torch.tensor([[first] * (FRAMES // 2) + [last] * (FRAMES // 2)])
        with torch.no_grad():
            return transformer(**data, timestep=frames.to(data["hidden_states"].dtype), enable_diffusion_forcing=True,
                               return_dict=False)[0]

    expected, _ = oracle_output(case, model, inputs, random_mask, 0, 999.0, monkeypatch,
                                call=lambda m, data, t: run(m, data, t, 600.0))
    handle = sparse.apply(model, method=random_mask, device="cpu", num_steps=3)
    outputs, steps = [], []
    try:
        for last, first in ((999.0, 600.0), (999.0, 300.0), (999.0, 0.0), (700.0, 0.0), (400.0, 0.0)):
            outputs.append(run(model, inputs, last, first))
            steps.append(handle.step)
    finally:
        handle.remove()
    torch.testing.assert_close(outputs[0].double(), expected, rtol=1e-5, atol=5e-6)
    assert (outputs[0] - run(model, inputs, 999.0, 600.0)).abs().max() > 5e-3     # the mask matters
    assert steps == [0, 0, 0, 1, 2]


def test_pasa_keeps_the_first_block_of_each_wan_vace_path_dense():
    """PISA's dense first layer on Wan VACE: the control path's first block (layer 0) and the video path's (layer
    ``len(vace_layers)``), unless ``dense_layers`` is given."""
    for params, dense in (({}, {0, 1}), ({"dense_layers": (2,)}, {2})):
        model, inputs = tiny_wan_vace(), wan_vace_inputs(batch=1)
        handle = sparse.apply(model, method="pasa", device="cpu", num_steps=2, dense_fraction=0.5, density=0.3,
                              block_size=32, **params)
        try:
            forward(model, inputs, 999.0)
            forward(model, inputs, 500.0)                       # PASA's sparse step
        finally:
            handle.remove()
        assert {row["layer"] for row in handle.stats() if row["step"] == 1 and row["backend"] == "dense"} == dense


def test_wan_family_refuses_a_cross_attention_module_in_a_self_attention_slot():
    for build in (tiny_wan, tiny_wan_vace, tiny_wan_animate, tiny_skyreels_v2):
        model = build()
        model.blocks[1].attn1 = model.blocks[1].attn2                        # a cross-attention, Wan's processor
        with pytest.raises(TypeError, match=rf"blocks\[1\]\.attn1: expected the self-attention of a "
                                            rf"{type(model).__name__} block, got a cross-attention module"):
            sparse.apply(model, method=random_mask, device="cpu")


def test_cogvideox_errors_name_its_layout_and_refuse_a_token_mask():
    model = tiny_cogvideox()
    handle = sparse.apply(model, method="lvsa", device="cpu")
    try:
        assert handle.params["reference_frames"] == 13                     # LVSA's CogVideoX horizon
        later = sparse.apply(tiny_cogvideox(patch_t=2), method="lvsa", device="cpu")
        later.remove()
        assert later.params["reference_frames"] == 11                      # 1.5: 81 frames, 11 token frames
        with pytest.raises(ValueError, match=r"hidden_states: expected a latent video \[B, F, C, H, W\]"):
            model(hidden_states=torch.zeros(1, 4, 16, 16), encoder_hidden_states=torch.zeros(1, 7, 16),
                  timestep=torch.tensor([999]))
        attn = CASES["cogvideox"].attention(model)[0]
        handle._pre_forward(model, (), cogvideox_inputs(batch=1))          # inside a forward, as the op needs
        try:
            with pytest.raises(ValueError, match="attention_mask: CogVideoX attention .* expected None"):
                attn.processor(attn, torch.zeros(1, FRAMES * HEIGHT * WIDTH, 32), torch.zeros(1, 7, 32),
                               attention_mask=torch.ones(1, 1, 519, 519, dtype=torch.bool))
        finally:
            handle.active = False
    finally:
        handle.remove()


@pytest.mark.parametrize("build", [tiny_cogvideox, tiny_hunyuan_10, tiny_wan_animate, tiny_ltx2])
def test_context_parallelism_refuses_models_without_a_plan_naming_the_models_it_runs(build):
    from sparsecore.integrations.diffusers import parallel
    model = build()
    with pytest.raises(TypeError, match="transformer: expected a diffusers WanTransformer3DModel, "
                                        "WanVACETransformer3DModel, SkyReelsV2Transformer3DModel, "
                                        "HunyuanVideo15Transformer3DModel, MochiTransformer3DModel, "
                                        f"LTXVideoTransformer3DModel, got {type(model).__name__} "
                                        r"\(sparsecore has no context-parallel plan for it"):
        parallel.enable_parallelism(model, ContextParallelConfig(ulysses_degree=2))


@pytest.mark.parametrize("name", sorted(CASES))
def test_steps_follow_a_timestep_passed_by_position(name):
    """Each model's forward takes its timestep at its own place (CogVideoX's third, the others' second): a call that
    passes every argument up to it by position advances the steps as a keyword call does."""
    import inspect
    case = CASES[name]
    model, inputs = case.build(), case.inputs(batch=1, text="same")
    names = list(inspect.signature(type(model).forward).parameters)[1:]
    before = names[:names.index("timestep")]
    handle = sparse.apply(model, method=random_mask, device="cpu", num_steps=3)
    seen = []
    try:
        for t in (999.0, 600.0, 300.0):
            rest = {k: v for k, v in inputs.items() if k not in before}
            with torch.no_grad():
                model(*(inputs[k] for k in before), torch.full((1,), t), **rest, return_dict=False)
            seen.append(handle.step)
    finally:
        handle.remove()
    assert seen == [0, 1, 2]


def test_cogvideox_dense_steps_run_torch_sdpa_whatever_diffusers_backend_is_active(monkeypatch):
    """CogVideoX's processor calls torch SDPA itself, so no diffusers backend reaches it; with sparsecore applied its
    dense steps do the same (a review found the active backend, here ``_native_math``, running them)."""
    from diffusers.models import attention_dispatch
    registry = attention_dispatch._AttentionBackendRegistry
    name = attention_dispatch.AttentionBackendName("_native_math")
    calls, real = [], registry._backends[name]
    monkeypatch.setitem(registry._backends, name, lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    model, inputs = tiny_cogvideox(), cogvideox_inputs(batch=1)
    with attention_dispatch.attention_backend("_native_math"):
        expected = forward(model, inputs, 999.0)
        for dense_attention in ("model", "auto"):
            handle = sparse.apply(model, method=full_mask, device="cpu", dense_attention=dense_attention)
            try:
                got = forward(model, inputs, 999.0)
            finally:
                handle.remove()
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert calls == []
    wan = tiny_wan()                                  # a model whose processor dispatches keeps following it
    with attention_dispatch.attention_backend("_native_math"):
        handle = sparse.apply(wan, method=full_mask, device="cpu", dense_attention="model")
        try:
            forward(wan, wan_inputs(batch=1), 999.0)
        finally:
            handle.remove()
    assert calls


def test_a_key_mask_that_masks_video_raises_and_a_model_without_blocks_is_refused():
    """HunyuanVideo 1.0's forward marks every video token valid; a mask that does not cannot be run exactly. A model
    whose block lists are all empty has no attention to run; one empty list of two is fine."""
    handle = sparse.apply(tiny_hunyuan_10(), method=full_mask, device="cpu")
    try:
        keys = torch.ones(1, 1, 1, 15, dtype=torch.bool)
        keys[..., 3] = False
        with pytest.raises(ValueError, match=r"expected every video token valid in the key mask"):
            handle.text_valid(handle._processors[0], keys, 1, 5)
    finally:
        handle.remove()
    model = tiny_hunyuan_10()
    model.single_transformer_blocks = torch.nn.ModuleList()
    sparse.apply(model, method=full_mask, device="cpu").remove()
    model.transformer_blocks = torch.nn.ModuleList()
    with pytest.raises(ValueError, match="transformer: a HunyuanVideoTransformer3DModel with no blocks in "
                                         "transformer_blocks or single_transformer_blocks"):
        sparse.apply(model, method=full_mask, device="cpu")


def test_the_text_count_comes_from_a_key_mask_and_a_mask_of_another_shape_raises():
    """HunyuanVideo 1.0 masks keys ``[B, 1, 1, S]``: its last ``text`` columns count each sample's valid text; a
    mask of any other shape is refused, naming both shapes it takes."""
    handle = sparse.apply(tiny_hunyuan_10(), method=full_mask, device="cpu")
    try:
        processor = handle._processors[0]
        keys = torch.tensor([[True] * 10 + [True] * 3 + [False] * 2, [True] * 10 + [True] * 5])[:, None, None, :]
        assert handle.text_valid(processor, keys, 2, 5) == [3, 5]
        with pytest.raises(ValueError, match=r"expected the text mask \[2, 5\] .* or a key mask \[2, 1, 1, S\]"):
            handle.text_valid(processor, keys[:, :, :, :4], 2, 5)
    finally:
        handle.remove()


def test_hunyuanvideo_10_layers_run_double_then_single_stream_blocks_with_its_horizon():
    """Layer i is the i-th self-attention module, in the order the forward runs them: the double-stream blocks',
    then the single-stream ones' (one projection of the joint sequence); a mask per layer reaches each; LVSA's
    horizon is 33 frames."""
    model, inputs = tiny_hunyuan_10(), hunyuan_10_inputs(batch=1, text="same")
    seen = []

    def recording(geometry, num_heads, step, layer):
        seen.append((layer, geometry.text_tokens))
        return random_mask(geometry, num_heads, step, layer)

    handle = sparse.apply(model, method=recording, device="cpu")
    try:
        assert [p.original for p in handle._processors] == [model.transformer_blocks[0].attn.processor.original,
                                                            model.single_transformer_blocks[0].attn.processor.original]
        assert model.single_transformer_blocks[0].attn.add_q_proj is None
        forward(model, inputs, 999.0)
    finally:
        handle.remove()
    assert seen == [(0, 4), (1, 4)]
    lvsa = sparse.apply(model, method="lvsa", device="cpu")
    lvsa.remove()
    assert lvsa.params["reference_frames"] == 33


def test_backend_options_reach_every_kernel(case, monkeypatch):
    """``backend_options`` go to each compile of the named backend, and change nothing else (portable's chunking)."""
    import sparsecore
    seen, compile_ = [], sparsecore.compile

    def recording(mask, *args, **kwargs):
        seen.append(kwargs)
        return compile_(mask, *args, **kwargs)

    model, inputs = case.build(), case.inputs(batch=1, text="same")
    outputs = []
    for options in (None, {"chunk_elements": 4096}):
        handle = sparse.apply(model, method=random_mask, device="cpu", backend="portable", backend_options=options)
        monkeypatch.setattr(sparsecore, "compile", recording)
        try:
            outputs.append(forward(model, inputs, 999.0))
        finally:
            handle.remove()
            monkeypatch.setattr(sparsecore, "compile", compile_)
        assert handle.backend_options == (options or {})
    assert seen and all(k["backend"] == "portable" for k in seen)
    assert [k.get("chunk_elements") for k in seen] == [None] * (len(seen) // 2) + [4096] * (len(seen) // 2)
    torch.testing.assert_close(outputs[0], outputs[1])


@pytest.mark.parametrize("kwargs, error, match", [
    ({"backend_options": {"chunk_elements": 4096}}, ValueError, "backend_options: options belong to one backend"),
    ({"backend": "portable", "backend_options": {"tile_m": 64}}, TypeError, "backend_options: .*unknown.*tile_m"),
    ({"backend": "portable", "backend_options": {"chunk_elements": 0}}, ValueError,
     "backend_options: chunk_elements"),
    ({"backend": "portable", "backend_options": [("chunk_elements", 8)]}, TypeError, "backend_options: expected"),
    ({"backend": "portable", "backend_options": ()}, TypeError, "backend_options: expected"),
])
def test_bad_backend_options_are_refused_at_apply(kwargs, error, match):
    model = tiny_wan()
    with pytest.raises(error, match=match):
        sparse.apply(model, method="lvsa", device="cpu", **kwargs)
    assert all(type(m.processor).__name__ != "WanSparseAttnProcessor" for m in model.modules() if hasattr(m, "processor"))


def test_empty_backend_options_are_none():
    handle = sparse.apply(tiny_wan(), method="lvsa", device="cpu", backend_options={})
    handle.remove()
    assert handle.backend is None and handle.backend_options == {}


def test_ring_pieces_get_the_backend_options(monkeypatch):
    """The ring's per-step pieces are compiled with the handle's options (one rank: no collective)."""
    import sparsecore
    from sparsecore.integrations.diffusers import ring
    seen, compile_ = [], sparsecore.compile
    monkeypatch.setattr(sparsecore, "compile", lambda mask, **kwargs: seen.append(kwargs) or compile_(mask, **kwargs))
    mask = BlockMask.from_lists([[[0, 1], [1]]] * 2, [0, 8, 16], [0, 8, 16])
    group = SimpleNamespace(world=1, rank=0, group=None)
    work = ring.plan_work(mask, group, 16, "cpu", "portable", torch.zeros(1), {"chunk_elements": 64})
    assert work.steps[0] is not None and seen
    assert all(k == {"device": "cpu", "backend": "portable", "cache": True, "chunk_elements": 64} for k in seen)


@pytest.mark.parametrize("method", ["lvsa", "callable"])
def test_a_ring_cut_caches_its_kernels_as_the_handles_kernels(method):
    """A rank's cut of a built-in method's mask hangs off the mask (its kernels go when the mask goes, as the
    handle's own kernels do); a callable's pieces go through the module's cache, found by content."""
    import gc
    from sparsecore import kernel_cache
    from sparsecore.integrations.diffusers.planner import Planner
    from sparsecore.integrations.diffusers.ring import RingGroup
    from sparsecore.integrations.diffusers.sharded import ShardedAttention
    from sparsecore.integrations.diffusers.stats import Stats
    from sparsecore.methods import lvsa
    geometry = VideoGeometry(12, 4, 4)
    planner = Planner("lvsa" if method == "lvsa" else full_mask, {}, "cpu", None, 4, Stats())
    kernel_cache.clear_cache()
    mask = lvsa.plan(geometry, 4, step=0, window=1, reference_frames=6, first_frames=1)
    work = ShardedAttention(planner)._work(mask, RingGroup(1, 0, None), geometry.video_tokens, torch.zeros(1))
    assert work.steps[0] is not None
    del work, mask
    gc.collect()
    assert len(kernel_cache._CACHE) == (0 if method == "lvsa" else 1)


def test_backend_and_parallel_settings_reach_the_original_processor(case):
    """What diffusers' set_attention_backend / enable_parallelism set reaches the original processor; an original
    that keeps no such setting (CogVideoX's and Mochi's call torch SDPA themselves) gets none, as without sparsecore."""
    model = case.build()
    module = case.attention(model)[0]
    original = module.processor
    keeps = hasattr(original, "_attention_backend")
    assert keeps == (case.name not in OWN_SDPA + ACTIVE_BACKEND)
    handle = sparse.apply(model, method=full_mask, device="cpu")
    try:
        module.processor._attention_backend = "native"
        module.processor._parallel_config = None
        assert getattr(original, "_attention_backend", None) == ("native" if keeps else None)
        assert module.processor._attention_backend == ("native" if keeps else None)
        assert module.processor._parallel_config is None
    finally:
        handle.remove()
    assert module.processor is original and hasattr(original, "_attention_backend") == keeps
    assert hasattr(original, "_parallel_config") == keeps


def context_parallel(**degrees) -> ParallelConfig:
    """A ParallelConfig as enable_parallelism leaves it on a processor, for checks that run before any collective."""
    config = ParallelConfig(context_parallel_config=ContextParallelConfig(**degrees))
    config.context_parallel_config._ulysses_mesh = SimpleNamespace(get_group=lambda: None)
    config.context_parallel_config._ulysses_local_rank = 0
    return config


@pytest.mark.parametrize("degrees, message", [      # ring and unified run: tests/test_integration_context_parallel.py
    ({"ulysses_degree": 2, "ulysses_anything": True}, "ulysses_anything: expected False"),
])
def test_context_parallel_configs_the_sparse_path_does_not_run_raise(degrees, message):
    model, inputs = tiny_wan(), wan_inputs(batch=1)
    handle = sparse.apply(model, method=random_mask, device="cpu")
    try:
        for module in CASES["wan"].attention(model):
            module.processor._parallel_config = context_parallel(**degrees)     # what enable_parallelism() sets
        with pytest.raises(ValueError, match=message):
            forward(model, inputs, 999.0)
    finally:
        handle.remove()


def test_text_padding_that_is_not_trailing_raises():
    model, inputs = tiny_hunyuan(), hunyuan_inputs(batch=1, text="same")

    def scramble(block, args):                                           # padding before valid text
        hidden, text, temb, mask, *rest = args
        return (hidden, text, temb, mask.flip(-1), *rest)

    model.transformer_blocks[0].register_forward_pre_hook(scramble)
    handle = sparse.apply(model, method=random_mask, device="cpu")
    try:
        with pytest.raises(ValueError, match="valid text tokens first"):
            forward(model, inputs, 999.0)
    finally:
        handle.remove()


def test_bad_arguments_raise_with_the_field_name():
    model = tiny_wan()
    with pytest.raises(TypeError, match="transformer: expected a diffusers WanTransformer3DModel"):
        sparse.apply(torch.nn.Linear(2, 2), method="lvsa", device="cpu")
    with pytest.raises(ValueError, match="method: expected one of"):
        sparse.apply(model, method="dense", device="cpu")
    with pytest.raises(TypeError, match="unknown parameter"):
        sparse.apply(model, method="lvsa", device="cpu", windw=2)
    with pytest.raises(TypeError, match="params: a callable method takes no parameters"):
        sparse.apply(model, method=full_mask, device="cpu", window=2)
    with pytest.raises(ValueError, match="device="):
        sparse.apply(model, method="lvsa", device="tpu")
    with pytest.raises(ValueError, match="backend: expected None or a registered"):
        sparse.apply(model, method="lvsa", device="cpu", backend="fast")
    with pytest.raises(ValueError, match="num_steps"):
        sparse.apply(model, method="lvsa", device="cpu", num_steps=0)
    with pytest.raises(ValueError, match="store: expected one of"):
        sparse.apply(model, method="adaspa", device="cpu", store="disk")
    with pytest.raises(TypeError, match="store: expected one of"):
        sparse.apply(model, method="adaspa", device="cpu", store=1)
    handle = sparse.apply(model, method="lvsa", device="cpu")
    try:
        with pytest.raises(ValueError, match=r"already applied to this model \(blocks\[0\]\.attn1\)"):
            sparse.apply(model, method="lvsa", device="cpu")
        model.set_attn_processor(transformer_wan.WanAttnProcessor())   # processors replaced, hooks still on
        with pytest.raises(ValueError, match="already applied.*hooks are on it.*call remove"):
            sparse.apply(model, method="lvsa", device="cpu")
    finally:
        handle.remove()
    assert all(type(b.attn1.processor).__name__ == "WanAttnProcessor" for b in model.blocks)
    sparse.apply(model, method="lvsa", device="cpu").remove()


def test_a_callable_returning_a_wrong_mask_raises():
    model, inputs = tiny_wan(), wan_inputs(batch=1)
    handle = sparse.apply(model, method=lambda g, h, s, layer: BlockMask.full(h + 1, g.tokens, g.tokens, 64),
                          device="cpu")
    try:
        with pytest.raises(ValueError, match="expected 2 heads"):
            forward(model, inputs, 999.0)
    finally:
        handle.remove()


def test_a_run_holds_only_the_current_steps_masks():
    """Stats and plans must not keep every step's masks and kernels alive (a generation would grow without bound),
    and nothing may wait for the garbage collector to free them: a reference cycle through a mask kept the
    masks and tile schedules of several steps alive on a GPU (tens of GB at long lengths)."""
    import gc
    import weakref
    model, inputs = tiny_wan(), wan_inputs(batch=1)
    handle = sparse.apply(model, method="pasa", device="cpu", num_steps=6, dense_fraction=0.2, density=0.3,
                          block_size=32, dense_layers=())
    handle.timing(True)
    handle.keep_masks(True)                      # PASA's masks are the calls' own: kept only when asked
    seen = []
    gc.collect()
    gc.disable()
    try:
        for t in (999.0, 800.0, 600.0, 400.0, 200.0):
            forward(model, inputs, t)
            seen += [weakref.ref(handle.mask(layer)) for layer in range(2) if handle.mask(layer) is not None]
        alive = [ref for ref in seen if ref() is not None]                  # a kernel would keep its mask alive
        assert len(seen) == 6 and len(alive) == 2, (len(seen), len(alive))   # 3 sparse steps x 2 layers; 2 left
        assert all(0 < row["density"] < 1 for row in handle.stats() if row["backend"] != "dense")
    finally:
        gc.enable()
        handle.remove()


def test_masks_made_per_call_are_freed_after_their_call():
    """PASA plans every call from its own q, k: no layer's lists may stay alive while the next layers run (at Wan
    6x they put 1.7 GiB on top of the model's peak); with keep_masks on, each layer's last mask is kept."""
    import gc
    from sparsecore import BlockMask
    model, inputs = tiny_wan(), wan_inputs(batch=1)
    handle = sparse.apply(model, method="pasa", device="cpu", num_steps=6, dense_fraction=0.2, density=0.3,
                          block_size=32, dense_layers=())

    def alive() -> list:                      # PASA masks made here (other modules may hold theirs, e.g. named cases)
        return [o for o in gc.get_objects() if isinstance(o, BlockMask) and o.meta.get("method") == "pasa"
                and id(o) not in before]
    gc.collect()
    before = {id(o) for o in gc.get_objects() if isinstance(o, BlockMask)}
    gc.disable()
    try:
        for t in (999.0, 800.0, 600.0):
            forward(model, inputs, t)
        assert [row["action"] for row in handle.stats()][-2:] == ["select", "select"]
        assert alive() == [] and handle.mask(0) is None
        handle.keep_masks(True)
        forward(model, inputs, 400.0)
        assert len(alive()) == 2 and handle.mask(1) is not None
        with pytest.raises(TypeError, match="enabled"):
            handle.keep_masks("yes")
    finally:
        gc.enable()
        handle.remove()


@pytest.mark.parametrize("first_search, store, kernels", [("fused", "device", 2), ("fused", "host", 4),
                                                           ("cached", "device", 2), ("cached", "host", 6)])
def test_reuse_steps_launch_the_kernel_prepared_at_the_search(monkeypatch, first_search, store, kernels):
    """AdaSpa's mask is compiled once per layer where it is searched (prepared there when the search step is dense,
    first_search="fused"); its reuse steps find that kernel (the mask holds it weakly, the plans hold it) instead
    of compiling it again. A mask kept in host memory (store="host") is compiled at each call instead (the sparse
    search step's calls too, with "cached")."""
    import sparsecore.kernel as kernel_module
    made = []

    class Counted(kernel_module.CompiledKernel):
        def __init__(self, mask, *args, **kwargs):
            super().__init__(mask, *args, **kwargs)
            made.append(mask.meta.get("method"))          # not the kernel: holding it here would keep it alive

    monkeypatch.setattr(kernel_module, "CompiledKernel", Counted)
    model, inputs = tiny_wan(), wan_inputs(batch=1)
    handle = sparse.apply(model, method="adaspa", device="cpu", num_steps=5, warmup_steps=2, search_steps=(2,),
                          sparsity=0.5, store=store, first_search=first_search)
    try:
        for t in (999.0, 800.0, 600.0, 400.0, 200.0):
            forward(model, inputs, t)
    finally:
        handle.remove()
    actions = [(s["step"], s["action"], s["backend"]) for s in handle.stats() if s["layer"] == 0]
    search = (2, "search", "dense") if first_search == "fused" else (2, "cached-search", "portable")
    assert actions[2:] == [search, (3, "reuse", "portable"), (4, "reuse", "portable")]
    assert made.count("adaspa") == kernels      # per layer: one made at the search, or one per sparse call


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available: store='host' keeps AdaSpa's masks "
                    "in host memory between steps of a GPU run")
def test_adaspa_masks_kept_in_host_memory_leave_no_lists_on_the_device():
    """With store="host", AdaSpa's searched masks wait in pinned host memory and each call runs its own device
    copy: between calls no adaspa mask lists are on the GPU (with store="device" all layers' are), and every step
    (search, reuse, cached search) gives the same output as store="device"."""
    import gc
    model = tiny_wan().cuda()
    inputs = {name: t.cuda() for name, t in wan_inputs(batch=1).items()}
    steps = (999.0, 800.0, 600.0, 400.0, 200.0, 100.0)     # dense, search, reuse, reuse, cached search, reuse

    def on_gpu() -> list:
        return [o for o in gc.get_objects() if isinstance(o, BlockMask) and o.meta.get("method") == "adaspa"
                and o.device is not None and o.device.type == "cuda"]
    outputs, counts = {}, {}
    gc.collect()
    gc.disable()
    try:
        for store in ("device", "host"):
            handle = sparse.apply(model, method="adaspa", device="cuda", num_steps=6, warmup_steps=1,
                                  search_steps=(1, 4), sparsity=0.5, block_size=32, store=store)
            try:
                outputs[store], counts[store] = [], []
                for t in steps:
                    outputs[store].append(forward(model, inputs, t))
                    counts[store].append(len(on_gpu()))
                held = handle.mask(0)
                assert held.device.type == ("cpu" if store == "host" else "cuda")
                assert store == "device" or held.indices.is_pinned()
            finally:
                handle.remove()
            del handle, held
            gc.collect()
    finally:
        gc.enable()
    assert counts["host"] == [0] * len(steps)
    assert counts["device"][1:] == [2] * (len(steps) - 1)          # one mask per layer, held from the search on
    for step, (kept_on_device, kept_on_host) in enumerate(zip(outputs["device"], outputs["host"])):
        assert torch.equal(kept_on_device, kept_on_host), step


def test_a_steps_host_mask_is_compiled_once_and_kept_by_its_plans_only_until_replaced(monkeypatch):
    """LVSA hands every layer of a step one host mask: its kernel is compiled once per step and held by the step's
    plans, not by the module's cache (where each rotating pattern kept a kernel: 14 MiB above dense's peak at Wan
    6x). When the anchors rotate, the first layer to plan the new step drops the older plans of the mask it
    replaced: at every call one LVSA kernel is alive, not the old step's too until the last layer. A callable's
    new-but-equal masks still find one kernel through that cache."""
    import gc
    import weakref
    import sparsecore.kernel as kernel_module
    from sparsecore import kernel_cache
    made, kernels, alive_at_calls, on_host_at_calls = [], [], [], []

    class Counted(kernel_module.CompiledKernel):
        def __init__(self, mask, *args, **kwargs):
            super().__init__(mask, *args, **kwargs)
            made.append(mask.meta.get("method"))
            kernels.append(weakref.ref(self))

        def __call__(self, *args, **kwargs):
            gc.collect()
            alive_at_calls.append(sum(ref() is not None for ref in kernels))
            on_host_at_calls.append(self.plans_on_host)
            return super().__call__(*args, **kwargs)

    monkeypatch.setattr(kernel_module, "CompiledKernel", Counted)
    kernel_cache.clear_cache()
    model, inputs = tiny_wan(), wan_inputs(batch=1)
    handle = sparse.apply(model, method="lvsa", device="cpu", num_steps=4, reference_frames=4, window=1)
    try:
        for t in (999.0, 800.0, 600.0):
            forward(model, inputs, t)
    finally:
        handle.remove()
    assert made == ["lvsa"] * 3                                  # one kernel per step, shared by both layers
    assert alive_at_calls == [1] * 6                             # a new pattern every step, 2 layers a step
    assert on_host_at_calls == [True] * 6                        # shared by the layers: plans kept on the host
    assert not any(k.mask.meta.get("method") == "lvsa" for k in kernel_cache._CACHE.values())
    made.clear()

    def diagonal(geometry: VideoGeometry, num_heads: int, step: int, layer: int) -> BlockMask:   # new every call
        offsets = geometry.block_offsets(32)
        return BlockMask.from_lists([[[i] for i in range(len(offsets) - 1)]] * num_heads, offsets, offsets)

    handle = sparse.apply(model, method=diagonal, device="cpu", num_steps=4)
    try:
        for t in (999.0, 800.0):
            forward(model, inputs, t)
    finally:
        handle.remove()
    assert len(made) == 1 and len(kernel_cache._CACHE) == 1     # equal masks, one kernel, from the cache
    assert on_host_at_calls[6:] and not any(on_host_at_calls[6:])  # a callable's kernels keep theirs on the device


def test_padded_masks_live_only_as_long_as_their_mask():
    """A callable's new mask of every step, run on padded text (HunyuanVideo 1.5): the padded versions the
    integration derives must not keep old steps' masks alive (no cache of them, no cycle waiting for the
    garbage collector)."""
    import gc
    import weakref
    seen = []

    def fresh(geometry: VideoGeometry, num_heads: int, step: int, layer: int) -> BlockMask:
        keep = np.random.default_rng(step * 7 + layer).random((num_heads, 8, 8)) < 0.5
        offsets = np.linspace(0, geometry.tokens, 9).astype(np.int64)
        mask = BlockMask.from_lists([[np.flatnonzero(r).tolist() or [0] for r in h] for h in keep], offsets,
                                    offsets).to("cpu")
        seen.append(weakref.ref(mask))
        return mask

    model = tiny_hunyuan()
    handle = sparse.apply(model, method=fresh, device="cpu", num_steps=4)
    gc.collect()
    gc.disable()
    try:
        for t in (999.0, 800.0, 600.0, 400.0):
            forward(model, hunyuan_inputs(batch=2, text="ragged"), t)
        alive = [ref for ref in seen if ref() is not None]
        assert len(seen) >= 8 * 2 and len(alive) <= len(seen) // 4, (len(seen), len(alive))   # the last step's
    finally:
        gc.enable()
        handle.remove()


def test_a_backward_through_the_sparse_attention_raises_naming_the_remedy():
    """The kernels have no backward: a forward with gradients on runs, and a backward through it raises with the
    remedy (no_grad, or remove() to train with diffusers' attention), rather than PyTorch's generic message."""
    model, data = tiny_wan(), wan_inputs(batch=1)
    handle = sparse.apply(model, method="lvsa", device="cpu", num_steps=2, reference_frames=4, window=1)
    try:
        out = model(**data, timestep=torch.full((1,), 999.0), return_dict=False)[0]
        assert out.requires_grad
        with pytest.raises(NotImplementedError, match=r"inference-only .*handle.remove\(\)"):
            out.sum().backward()
    finally:
        handle.remove()


def test_steps_whose_bf16_timesteps_collide_are_told_apart_by_their_latents():
    """HunyuanVideo 1.5's pipeline casts the timestep to the latents' dtype; in bf16 the values near 1000 are 4
    apart, so at 50 flow-matching steps and shift 7 two steps get the same timestep. Their latents differ (the
    scheduler moved them), the two guidance calls of one step share theirs: every step is counted once."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    scheduler = FlowMatchEulerDiscreteScheduler(shift=7.0)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, 51)[:-1], device="cpu")
    timesteps = [t.to(torch.bfloat16) for t in scheduler.timesteps]  # as pipeline_hunyuan_video1_5.py casts them
    assert len(set(float(t) for t in timesteps)) < 50                  # the collision this test is about
    model, inputs = tiny_wan(), wan_inputs(batch=1)
    handle = sparse.apply(model, method=random_mask, device="cpu", num_steps=50)
    seen = []
    try:
        with torch.no_grad():
            for t in timesteps:
                for _ in range(2):                                     # cond and uncond: the same latents
                    model(**inputs, timestep=t.expand(1), return_dict=False)
                    seen.append(handle.step)
                inputs = {**inputs, "hidden_states": inputs["hidden_states"] * 0.98}     # the scheduler's update
    finally:
        handle.remove()
    assert seen == [step for step in range(50) for _ in range(2)]


def test_a_run_that_stops_short_of_num_steps_warns():
    """The methods lay out their schedules (dense steps, searches, budgets) for ``num_steps``: a run that ends
    earlier (a new run starts, or the handle is removed) warns, naming the steps run; a full run does not."""
    model, inputs = tiny_wan(), wan_inputs(batch=1)
    handle = sparse.apply(model, method=random_mask, device="cpu", num_steps=3)
    for t in (999.0, 500.0):
        forward(model, inputs, t)
    with pytest.warns(UserWarning, match="a run ended before num_steps=3 steps") as first:
        forward(model, inputs, 999.0)                                          # a new run
    forward(model, inputs, 500.0)
    with pytest.warns(UserWarning) as second:
        forward(model, inputs, 999.0)                                          # another short run: the same text, so
    assert str(second[0].message) == str(first[0].message)                   # Python's filter shows it once
    for t in (500.0, 100.0):
        forward(model, inputs, t)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        handle.remove()                                                        # run 1 reached its 3 steps


def test_the_latents_tell_steps_and_runs_apart_at_an_equal_timestep():
    """At the same 16-bit timestep: a retry after a failed forward stays on its step, latents moved a little after
    a completed one are the next step, fresh latents (a new pipe() call after a 1-step warm-up) or another shape
    start a new run. At the same float32 timestep latents moved a little stay on the step (a Heun-type repeat) and
    fresh ones start a new run too (before, a request starting at the last forward's timestep continued the run)."""
    model, inputs = tiny_wan(), wan_inputs(batch=1)
    handle = sparse.apply(model, method=random_mask, device="cpu", num_steps=3)
    t = torch.tensor([999.0], dtype=torch.bfloat16)
    call = lambda latents: model(**{**inputs, "hidden_states": latents}, timestep=t, return_dict=False)  # noqa: E731
    latents = inputs["hidden_states"]
    try:
        with torch.no_grad():
            with pytest.raises(RuntimeError):
                model(**{**inputs, "encoder_hidden_states": torch.zeros(1, 7, 5)}, timestep=t, return_dict=False)
            call(latents * 0.999)                                       # a retry (moved a little): the same step
            assert (handle.step, handle.run) == (0, 0)
            call(latents * 0.998)                                       # moved a little after a completed forward
            assert (handle.step, handle.run) == (1, 0)
            call(wan_inputs(batch=1, seed=5)["hidden_states"])          # fresh noise: a new pipe() call
            assert (handle.step, handle.run) == (0, 1)
            call(latents[:, :, :, :-2, :-2])                            # another video
            assert (handle.step, handle.run) == (0, 2)
        handle.set_step(None)
        run = handle.run
        forward(model, inputs, 500.0)
        forward(model, {**inputs, "hidden_states": inputs["hidden_states"] * 0.998}, 500.0)   # float32: a small move
        assert (handle.step, handle.run) == (0, run)
        forward(model, wan_inputs(batch=1, seed=5), 500.0)              # float32, fresh noise: a new request
        assert (handle.step, handle.run) == (0, run + 1)
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            handle.remove()


def test_latents_of_another_shape_start_a_new_run_at_a_smaller_timestep():
    """A cancelled request, then one at another resolution that starts mid-schedule (strength < 1): its first forward
    has a smaller timestep than the last one, but it is another video, so it is step 0 of a new run (before, it
    counted as the cancelled run's next step)."""
    model, inputs = tiny_wan(), wan_inputs(batch=1)
    handle = sparse.apply(model, method=random_mask, device="cpu", num_steps=3)
    smaller = {**inputs, "hidden_states": inputs["hidden_states"][:, :, :, :-2, :-2]}
    try:
        with torch.no_grad():
            forward(model, inputs, 999.0)
            forward(model, inputs, 800.0)
            assert (handle.step, handle.run) == (1, 0)
            forward(model, smaller, 500.0)                                  # another video, mid-schedule
            assert (handle.step, handle.run) == (0, 1)
            forward(model, smaller, 300.0)
            assert (handle.step, handle.run) == (1, 1)
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            handle.remove()


def test_short_run_warnings_come_after_the_cleanup_and_not_for_explicit_steps():
    """With warnings as errors, remove() still restores the model; set_step(None) after explicit steps does not
    judge that run by num_steps."""
    model, inputs = tiny_wan(), wan_inputs(batch=1)
    processors = [m.processor for m in model.modules() if hasattr(m, "set_processor")]
    handle = sparse.apply(model, method=random_mask, device="cpu", num_steps=3)
    handle.set_step(0)
    forward(model, inputs, 999.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        handle.set_step(None)                                          # the explicit run is not judged
        forward(model, inputs, 999.0)
        with pytest.raises(UserWarning, match="a run ended before num_steps=3"):
            handle.remove()
    assert [m.processor for m in model.modules() if hasattr(m, "set_processor")] == processors


def test_an_adaspa_scale_of_its_own_searches_with_an_lse_at_that_scale():
    """The model's dense pass is at 1/sqrt(D); a session with its own ``scale`` must not take that pass's LSE for
    its masses (they came out unnormalized: rows summed to 0.15-0.28 instead of 16), but plan as AdaSpa alone."""
    from sparsecore.geometry import VideoGeometry
    from sparsecore.integrations.diffusers.planner import Planner
    from sparsecore.integrations.diffusers.stats import Stats
    from sparsecore.methods import adaspa

    g, heads, dim = VideoGeometry(4, 4, 8), 2, 16
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, g.tokens, heads, dim, generator=gen) * 2 for _ in range(2))
    v = torch.randn(1, g.tokens, heads, dim, generator=gen)
    params = dict(scale=0.05, warmup_steps=1, search_steps=(1,), block_size=16, sparsity=0.5)
    planner = Planner("adaspa", params, "cpu", None, 3, Stats())
    dense = lambda: torch.nn.functional.scaled_dot_product_attention(      # noqa: E731
        *(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    for step in (0, 1):
        planner.attend(0, g, step, 0, q, k, v, None, dense)
    alone = adaspa.plan(g, heads, step=1, layer=0, q=q.transpose(1, 2), k=k.transpose(1, 2), **params)
    assert (planner.last_mask(0).to_host().to_dense() == alone.to_host().to_dense()).all()


def test_a_mask_padded_to_two_lengths_gets_each_length():
    """The planner's padded masks are kept per mask: the same plan padded for calls of two sequence lengths (text
    padded differently in two calls) gives each call a mask of its own length."""
    from sparsecore.integrations.diffusers.planner import Planner

    mask = BlockMask.from_lists([[[0], [0, 1]]], [0, 8, 16], [0, 8, 16])
    first, second = Planner.padded_mask(None, mask, 20), Planner.padded_mask(None, mask, 24)
    assert (first.q_len, first.kv_len, second.q_len, second.kv_len) == (20, 20, 24, 24)
    assert Planner.padded_mask(None, mask, 20) is first


def test_a_callable_methods_mask_cut_for_two_shards_of_one_start_gets_each():
    """A callable's mask cut for head shards is kept per shard: shards 0:2 and 0:1 of 4 heads get their own heads."""
    from sparsecore.integrations.diffusers.callable_session import CallableSession
    from sparsecore.methods.contract import HeadShard

    g = VideoGeometry(2, 2, 2)
    offsets = g.block_offsets(None)
    mask = BlockMask.from_lists([[[0], [1]], [[1], [0]], [[0, 1], [0]], [[0], [0, 1]]], offsets, offsets)
    session = CallableSession(lambda geometry, heads, step, layer: mask, num_steps=4)
    for stop in (2, 1):
        got = session.plan(g, 4, step=0, layer=0, heads=HeadShard(0, stop, 4))
        assert got.num_heads == stop and (got.to_dense() == mask.to_dense()[:stop]).all()


def test_stats_read_while_a_generation_adds_records_reads_a_copy():
    """``handle.stats()`` may be read from another thread (a monitor) while the generation adds records: the rows
    are made from a copy of the records (iterating the live dict raised 'dictionary changed size during
    iteration'). Here a record's count adds a record as it is read, deterministically."""
    from sparsecore.geometry import VideoGeometry
    from sparsecore.integrations.diffusers.stats import Stats

    stats, g = Stats(), VideoGeometry(2, 4, 4)

    def plan(layer: int) -> Any:                                             # a layer's call planned, as the planner does
        return stats.planned(lambda: SimpleNamespace(record=stats.record(0, layer, 0, g, g.tokens, 2, None, "plan")),
                             torch.device("cpu")).record

    class CountThatAddsARecord:
        def __float__(self) -> float:
            plan(1)                                                          # the generation thread, meanwhile
            return 8.0
    record = plan(0)
    record.kept, record.pairs = [CountThatAddsARecord()], 16
    assert [row["density"] for row in stats.rows()] == [0.5]
    assert [row["layer"] for row in stats.rows()] == [0, 1]


def padded_text_calls(*lengths: int) -> list[dict]:
    """Tiny HunyuanVideo 1.5 inputs of one step's calls: the same latents, 4 valid text tokens padded to each length."""
    latents = torch.randn(1, 4, 8, 4, 4, generator=torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(0)
    return [{"hidden_states": latents, "encoder_hidden_states": torch.randn(1, text, 16, generator=gen),
             "encoder_attention_mask": torch.tensor([[1] * 4 + [0] * (text - 4)]),
             "encoder_hidden_states_2": torch.randn(1, 4, 8, generator=gen),
             "encoder_attention_mask_2": torch.tensor([[1, 1, 0, 0]]), "image_embeds": torch.zeros(1, 3, 8)}
            for text in lengths]


@pytest.mark.parametrize("first, second", [(6, 10), (10, 6)])
def test_calls_of_a_step_whose_text_is_padded_to_other_lengths_each_get_their_length(first, second):
    """Guidance as separate calls on embeddings padded to other lengths (the same valid text): the step's plan is
    reused, its mask padded to each call's length (a kernel for a longer sequence refused a shorter one, naming the
    user's inputs; a ring cut refuses a longer one: test_integration_context_parallel's hunyuan-pad); each call equals
    the model alone."""
    calls, timestep = padded_text_calls(first, second), torch.full((1,), 999.0)
    params = dict(method="lvsa", device="cpu", num_steps=1, window=1, reference_frames=4, first_frames=1)
    alone = []
    for inputs in calls:
        model = tiny_hunyuan()
        handle = sparse.apply(model, **params)
        with torch.no_grad():
            alone.append(model(**inputs, timestep=timestep, return_dict=False)[0])
        handle.remove()
    model = tiny_hunyuan()
    handle = sparse.apply(model, **params)
    with torch.no_grad():
        together = [model(**inputs, timestep=timestep, return_dict=False)[0] for inputs in calls]
    handle.remove()
    for got, want in zip(together, alone):
        torch.testing.assert_close(got, want)
    assert handle.step == 0 and [row["calls"] for row in handle.stats()] == [2, 2]


def test_a_call_padded_shorter_runs_the_steps_mask_without_planning_it_again(monkeypatch):
    """AdaSpa's masks kept on the device, guidance as two calls padded to 10 then 6 text tokens: the second call
    runs the step's mask padded to its length; the search runs once a step, as with the calls in the other order
    (it ran twice, the second replacing the layer's kept mask)."""
    from sparsecore.methods import adaspa
    searches, search = [], adaspa._search
    monkeypatch.setattr(adaspa, "_search", lambda *args, **kwargs: searches.append(args[4]) or search(*args, **kwargs))
    model = tiny_hunyuan()
    for order in ((10, 6), (6, 10)):
        searches.clear()
        calls = padded_text_calls(*order)
        handle = sparse.apply(model, method="adaspa", device="cpu", num_steps=3, warmup_steps=1, search_steps=(1, 2),
                              block_size=16, sparsity=0.5, store="device")
        with torch.no_grad():
            for step, t in enumerate((999.0, 600.0, 300.0)):
                handle.set_step(step)
                outs = [model(**inputs, timestep=torch.full((1,), t), return_dict=False)[0] for inputs in calls]
        handle.remove()
        layers = model.config.num_layers
        assert searches == [1] * layers + [2] * layers and all(o.isfinite().all() for o in outs)


def test_a_forward_retried_after_a_failed_plan_plans_again():
    """A plan that raised (a callable failing once at layer 1: out of memory, a bug) left a plan with no mask in the
    planner, which the retried forward of that step reused: layer 1 ran dense. The retry now plans the layer again
    and gives the mask's output."""
    model, inputs = tiny_wan(), wan_inputs(batch=1)
    handle = sparse.apply(model, method=random_mask, device="cpu", num_steps=1)
    expected = forward(model, inputs, 999.0)
    handle.remove()
    failures = [1]

    def fails_once_at_layer_1(geometry, num_heads, step, layer):
        if layer == 1 and failures:
            raise RuntimeError(f"transient failure {failures.pop()}")
        return random_mask(geometry, num_heads, step, layer)
    handle = sparse.apply(model, method=fails_once_at_layer_1, device="cpu", num_steps=1)
    try:
        with pytest.raises(RuntimeError, match="transient failure 1"):
            forward(model, inputs, 999.0)
        torch.testing.assert_close(forward(model, inputs, 999.0), expected, rtol=0, atol=0)   # the same step again
        assert [row["calls"] for row in handle.stats()] == [2, 1]     # the failed attempt counted no call of layer 1
    finally:
        handle.remove()
