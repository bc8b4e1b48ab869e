"""The end-to-end benchmark's models (``bench/e2e_benchmark.py``, whose docstring says what each case is and why):
random-weight diffusers transformers of the real configurations, the cases (lengths, layers run), each forward's
inputs, and the token grid a forward runs on."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

TEXT_TOKENS = 512
WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
WAN_14B = dict(WAN_1_3B, num_attention_heads=40, ffn_dim=13824, num_layers=40)
WAN_VACE_1_3B = dict(WAN_1_3B, vace_layers=list(range(0, 30, 2)), vace_in_channels=96)
SKYREELS_DF_1_3B = dict(WAN_1_3B, num_frame_per_block=5)
HV15 = dict(num_layers=54)
HV15_T2V_SLOTS = (1000, 256, 729)   # its pipeline's text slots: Qwen2.5-VL prompt, ByT5 glyphs, image (SigLIP)
HV15_PROMPT = 150                   # Qwen2.5-VL tokens of a t2v prompt: the other 1,835 slots are padding
COGVIDEOX_15 = dict(num_attention_heads=48, attention_head_dim=64, in_channels=16, out_channels=16, time_embed_dim=512,
                    text_embed_dim=4096, num_layers=42, patch_size=2, patch_size_t=2, max_text_seq_length=226,
                    sample_height=300, sample_width=300, sample_frames=81, use_rotary_positional_embeddings=True,
                    use_learned_positional_embeddings=False)
COGVIDEOX_TEXT = 226
HV = dict(num_attention_heads=24, attention_head_dim=128, num_layers=20, num_single_layers=40, guidance_embeds=True)
HV_TEXT = 256
MOCHI = dict(patch_size=2, num_attention_heads=24, attention_head_dim=128, num_layers=48, pooled_projection_dim=1536,
             in_channels=12, text_embed_dim=4096, time_embed_dim=256, max_sequence_length=256)
MOCHI_TEXT = 256
LTX = dict(in_channels=128, out_channels=128, patch_size=1, patch_size_t=1, num_attention_heads=32,
           attention_head_dim=128, cross_attention_dim=4096, num_layers=48, caption_channels=4096)   # LTX-Video 13B
LTX_TEXT = 128                  # LTX-Video's max_sequence_length
LTX_FPS = 25                    # LTX-Video's pipeline's frame_rate, in RoPE's interpolation scale
LTX_VAE_TEMPORAL, LTX_VAE_SPATIAL = 8, 32     # both LTX models' VAEs
LTX2 = dict(num_layers=48, rope_type="split")   # LTX-2 19B: diffusers' default configuration with the released
#                                               checkpoint's split RoPE (diffusers' conversion script for 2.0)
LTX2_TEXT = 1024                # LTX-2's max_sequence_length: its connectors fill padding with registers, all valid
LTX2_FPS = 24.0                 # LTX-2's pipeline's frame_rate
KANDINSKY5_LITE = dict(in_visual_dim=16, out_visual_dim=16, in_text_dim=3584, in_text_dim2=768, time_dim=512,
                       patch_size=(1, 2, 2), model_dim=1792, ff_dim=7168, num_text_blocks=2, num_visual_blocks=32,
                       axes_dims=(16, 24, 24), visual_cond=True)      # Kandinsky 5.0 Video Lite (2B): 28 heads x 64
KANDINSKY5_TEXT = 256           # Qwen2.5-VL tokens of a prompt (its pipeline's max_sequence_length is 512)
COSMOS_2B = dict(in_channels=17, out_channels=16, num_attention_heads=16, attention_head_dim=128, num_layers=28,
                 mlp_ratio=4.0, text_embed_dim=1024, adaln_lora_dim=256, max_size=(128, 240, 240), patch_size=(1, 2, 2),
                 rope_scale=(1.0, 3.0, 3.0), concat_padding_mask=False, extra_pos_embed_type=None)   # Predict2.5 2B-
#                                                    shaped: 16 heads x 128, 28 blocks (RoPE's scale: timing-neutral)
COSMOS_TEXT = 512               # its text tokens (1024 channels after the pipeline's projection)
MODELS = ("wan-1.3b", "wan-14b", "hv15", "hv15-t2v", "hv", "cogvideox-1.5", "wan-vace", "skyreels-df", "mochi", "ltx",
          "ltx2",
          "kandinsky5", "cosmos")


@dataclass(frozen=True)
class Case:
    model: str
    label: str           # "1x", "2x", ...
    frames: int          # latent frames
    height: int          # latent height (before patchify)
    width: int
    layers_run: int
    layers_full: int


FULL_CASES = {   # model -> its cases: Case(model, label, latent frames, height, width, layers run, layers in the model)
    "wan-1.3b": [Case("wan-1.3b", f"{m}x", f, 60, 104, 30, 30) for m, f in ((1, 21), (2, 41), (4, 81), (6, 121))],
    "hv15": [Case("hv15", f"{m}x", f, 30, 53, 6, 54) for m, f in ((1, 33), (2, 65))],
    "hv15-t2v": [Case("hv15-t2v", f"{m}x", f, 30, 53, 6, 54) for m, f in ((1, 33), (2, 65))],
    "wan-14b": [Case("wan-14b", "6x", 121, 60, 104, 2, 40)],
    "cogvideox-1.5": [Case("cogvideox-1.5", f"{m}x", f, 96, 170, 6, 42) for m, f in ((1, 22), (2, 42))],
    "hv": [Case("hv", "1x", 33, 90, 160, 3, 60),
           Case("hv", "768p", 30, 96, 160, 3, 60)],        # 117 frames at 768 x 1280: FastVideo's STA grid
    "wan-vace": [Case("wan-vace", "2x", 41, 60, 104, 30, 30)],
    "skyreels-df": [Case("skyreels-df", f"{m}x", f, 68, 120, 30, 30) for m, f in ((2, 50), (5, 125))],
    "mochi": [Case("mochi", "1x", 28, 60, 106, 6, 48)],
    "ltx": [Case("ltx", f"{m}x", f, 22, 38, 6, 48) for m, f in ((1, 21), (2, 41))],
    "ltx2": [Case("ltx2", f"{m}x", f, 22, 38, 6, 48) for m, f in ((1, 16), (2, 33))],
    "kandinsky5": [Case("kandinsky5", f"{m}x", f, 64, 96, 8, 32) for m, f in ((1, 31), (2, 61))],
    "cosmos": [Case("cosmos", f"{m}x", f, 88, 160, 4, 28) for m, f in ((1, 24), (2, 47))],
}


def cases(models: list[str], tiny: bool) -> list[Case]:
    if tiny:
        tiny_cases = [Case("wan-1.3b", "1x", 3, 8, 8, 2, 2), Case("wan-1.3b", "6x", 13, 8, 8, 2, 2)]
        tiny_cases += [Case(model, "2x", 9, 6, 6, 2, 2) for model in ("hv15", "hv15-t2v") if model in models]
        tiny_cases += [Case("hv", "1x", 9, 8, 8, 3, 3)] if "hv" in models else []
        tiny_cases += [Case("wan-vace", "2x", 13, 8, 8, 2, 2)] if "wan-vace" in models else []
        tiny_cases += [Case("skyreels-df", "2x", 10, 8, 8, 2, 2)] if "skyreels-df" in models else []
        tiny_cases += [Case("mochi", "1x", 9, 8, 8, 2, 2)] if "mochi" in models else []
        tiny_cases += [Case(model, "2x", 33, 4, 6, 2, 2) for model in ("ltx", "ltx2") if model in models]
        tiny_cases += [Case(model, "2x", 13, 8, 8, 2, 2) for model in ("kandinsky5", "cosmos") if model in models]
        return tiny_cases + ([Case("cogvideox-1.5", "2x", 18, 8, 8, 2, 2)] if "cogvideox-1.5" in models else [])
    return [case for model, full in FULL_CASES.items() if model in models for case in full]


def build_model(case: Case, tiny: bool, device: str, dtype: torch.dtype) -> torch.nn.Module:
    from diffusers import (CogVideoXTransformer3DModel, CosmosTransformer3DModel, HunyuanVideo15Transformer3DModel,
                           HunyuanVideoTransformer3DModel, Kandinsky5Transformer3DModel, LTX2VideoTransformer3DModel,
                           LTXVideoTransformer3DModel,
                           MochiTransformer3DModel, SkyReelsV2Transformer3DModel, WanTransformer3DModel,
                           WanVACETransformer3DModel)
    torch.manual_seed(0)
    with torch.device(device):
        if case.model == "hv":                          # a third double-stream, two thirds single-stream, as 20 : 40
            config = dict(HV, num_layers=case.layers_run // 3, num_single_layers=case.layers_run - case.layers_run // 3)
            if tiny:
                config.update(num_attention_heads=2, attention_head_dim=32, text_embed_dim=64, pooled_projection_dim=16,
                              num_refiner_layers=1, rope_axes_dim=(8, 12, 12))
            model = HunyuanVideoTransformer3DModel(**config)
        elif case.model.startswith("cogvideox"):
            config = dict(COGVIDEOX_15, num_layers=case.layers_run)
            if tiny:
                config.update(num_attention_heads=2, attention_head_dim=32, text_embed_dim=64, time_embed_dim=32)
            model = CogVideoXTransformer3DModel(**config)
        elif case.model == "skyreels-df":
            config = dict(SKYREELS_DF_1_3B, num_layers=case.layers_run)
            if tiny:
                config.update(num_attention_heads=2, attention_head_dim=32, ffn_dim=128, text_dim=64, freq_dim=32)
            model = SkyReelsV2Transformer3DModel(**config)
        elif case.model == "mochi":                     # the last block of the layers run is context_pre_only
            config = dict(MOCHI, num_layers=case.layers_run)
            if tiny:
                config.update(num_attention_heads=2, attention_head_dim=32, pooled_projection_dim=32, text_embed_dim=64,
                              time_embed_dim=32)
            model = MochiTransformer3DModel(**config)
        elif case.model == "ltx":
            config = dict(LTX, num_layers=case.layers_run)
            if tiny:
                config.update(num_attention_heads=2, attention_head_dim=32, cross_attention_dim=64, caption_channels=64)
            model = LTXVideoTransformer3DModel(**config)
        elif case.model == "ltx2":                      # its audio branch runs too: its blocks are audio-video blocks
            config = dict(LTX2, num_layers=case.layers_run)
            if tiny:
                config.update(num_attention_heads=2, attention_head_dim=32, cross_attention_dim=64,
                              audio_num_attention_heads=2, audio_attention_head_dim=16, audio_cross_attention_dim=32,
                              caption_channels=64)
            model = LTX2VideoTransformer3DModel(**config)
        elif case.model == "kandinsky5":
            config = dict(KANDINSKY5_LITE, num_visual_blocks=case.layers_run)
            if tiny:
                config.update(model_dim=64, ff_dim=128, in_text_dim=64, in_text_dim2=32, time_dim=32,
                              axes_dims=(8, 12, 12))
            return keep_in_float32(Kandinsky5Transformer3DModel(**config).to(dtype).eval())
        elif case.model == "cosmos":
            config = dict(COSMOS_2B, num_layers=case.layers_run)
            if tiny:
                config.update(num_attention_heads=2, attention_head_dim=32, text_embed_dim=64, adaln_lora_dim=16)
            model = CosmosTransformer3DModel(**config)
        elif case.model.startswith("wan"):
            base = {"wan-1.3b": WAN_1_3B, "wan-14b": WAN_14B, "wan-vace": WAN_VACE_1_3B}[case.model]
            config = dict(base, num_layers=case.layers_run)
            if tiny:
                config.update(num_attention_heads=2, attention_head_dim=32, ffn_dim=128, text_dim=64, freq_dim=32)
            if case.model == "wan-vace":
                if tiny:
                    config.update(vace_layers=[0], vace_in_channels=8)
                model = WanVACETransformer3DModel(**config)
            else:
                model = WanTransformer3DModel(**config)
        else:
            config = dict(HV15, num_layers=case.layers_run)
            if tiny:
                config.update(num_attention_heads=2, attention_head_dim=32, text_embed_dim=64, text_embed_2_dim=32,
                              image_embed_dim=32, num_refiner_layers=1, rope_axes_dim=(8, 12, 12))
            model = HunyuanVideo15Transformer3DModel(**config)
    return model.to(dtype).eval()


def keep_in_float32(model: torch.nn.Module) -> torch.nn.Module:
    """The modules the model class keeps in float32 (``_keep_in_fp32_modules``, as ``from_pretrained`` loads them; its
    forward feeds them float32): Kandinsky 5's time embeddings and modulations."""
    for name, module in model.named_modules():
        if any(part in model._keep_in_fp32_modules for part in name.split(".")):
            module.float()
    return model


def model_inputs(model: torch.nn.Module, case: Case, device: str, dtype: torch.dtype,
                 prompt_tokens: int | None = None, negative_tokens: int | None = None) -> dict:
    """Random latents and conditions, batch 1; every text/image token valid (no padding mask to honour), but with
    ``prompt_tokens`` HunyuanVideo 1.0's and Mochi's 256 text slots hold a prompt of that many tokens, the rest padding
    (as their pipelines pad a prompt; ``hv15-t2v`` is HunyuanVideo 1.5's). ``negative_tokens``: Mochi's batch of two
    as its pipeline runs classifier-free guidance (``MochiPipeline``: the negative prompt's sample first, the same
    latents twice), the negative prompt holding that many valid tokens (0: an empty one that the pipeline's
    ``force_zeros_for_empty_prompt`` zeroes)."""
    config = model.config
    gen = torch.Generator(device=device).manual_seed(1)
    rand = lambda *shape: torch.randn(*shape, generator=gen, device=device, dtype=dtype)  # noqa: E731
    ones = lambda n: torch.ones(1, n, device=device, dtype=torch.long)  # noqa: E731
    valid_first = lambda n, count: (torch.arange(n, device=device)[None] < count).long()  # noqa: E731  [1, n]
    prompt_mask = lambda n: valid_first(n, prompt_tokens or n)  # noqa: E731
    if case.model.startswith("ltx"):               # packed tokens [B, S, C] (patch 1), the grid beside them
        latents = rand(1, case.frames * case.height * case.width, config.in_channels)
        grid = dict(num_frames=case.frames, height=case.height, width=case.width)
        if case.model == "ltx":
            return dict(hidden_states=latents, encoder_hidden_states=rand(1, LTX_TEXT, config.caption_channels),
                        encoder_attention_mask=ones(LTX_TEXT).bool(), **grid,
                        rope_interpolation_scale=(LTX_VAE_TEMPORAL / LTX_FPS, LTX_VAE_SPATIAL, LTX_VAE_SPATIAL),
                        return_dict=False)
        audio = ltx2_audio_frames(config, case.frames)          # LTX-2's audio latents: packed, [B, frames, C]
        return dict(hidden_states=latents, audio_hidden_states=rand(1, audio, config.audio_in_channels),
                    encoder_hidden_states=rand(1, LTX2_TEXT, config.caption_channels),
                    audio_encoder_hidden_states=rand(1, LTX2_TEXT, config.caption_channels),
                    encoder_attention_mask=ones(LTX2_TEXT), audio_encoder_attention_mask=ones(LTX2_TEXT), **grid,
                    fps=LTX2_FPS, audio_num_frames=audio,
                    video_coords=model.rope.prepare_video_coords(1, case.frames, case.height, case.width, device,
                                                                 fps=LTX2_FPS),
                    audio_coords=model.audio_rope.prepare_audio_coords(1, audio, device), use_cross_timestep=True,
                    return_dict=False)
    if case.model == "kandinsky5":                # latents [B, F, H, W, C] with the image condition's channels
        channels = 2 * config.in_visual_dim + 1 if config.visual_cond else config.in_visual_dim
        p_t, p_h, p_w = config.patch_size
        return dict(hidden_states=rand(1, case.frames, case.height, case.width, channels),
                    encoder_hidden_states=rand(1, KANDINSKY5_TEXT, config.in_text_dim),
                    pooled_projections=rand(1, config.in_text_dim2),
                    visual_rope_pos=[torch.arange(n, device=device) for n in
                                     (case.frames // p_t, case.height // p_h, case.width // p_w)],
                    text_rope_pos=torch.arange(KANDINSKY5_TEXT, device=device), scale_factor=(1.0, 2.0, 2.0),
                    return_dict=False)
    if case.model == "cosmos":                    # latents [B, C, F, H, W]; text-to-world: a condition mask of zeros
        frames = (1, 1, case.frames, case.height, case.width)
        return dict(hidden_states=rand(1, config.out_channels, *frames[2:]),
                    condition_mask=torch.zeros(frames, device=device, dtype=dtype),
                    encoder_hidden_states=rand(1, COSMOS_TEXT, config.text_embed_dim), return_dict=False)
    if case.model.startswith("cogvideox"):        # latents [B, F, C, H, W]; RoPE's values do not change timing
        latents = rand(1, case.frames, config.in_channels, case.height, case.width)
        video = video_tokens(model, {"hidden_states": latents})
        rope = tuple(torch.randn(video, config.attention_head_dim, generator=gen, device=device) for _ in range(2))
        return dict(hidden_states=latents, encoder_hidden_states=rand(1, COGVIDEOX_TEXT, config.text_embed_dim),
                    image_rotary_emb=rope, return_dict=False)
    latents = rand(1, config.in_channels, case.frames, case.height, case.width)
    if case.model == "hv":
        return dict(hidden_states=latents, encoder_hidden_states=rand(1, HV_TEXT, config.text_embed_dim),
                    encoder_attention_mask=prompt_mask(HV_TEXT),
                    pooled_projections=rand(1, config.pooled_projection_dim),
                    guidance=torch.full((1,), 6000.0, device=device, dtype=dtype), return_dict=False)
    if case.model == "mochi" and negative_tokens is not None:
        return dict(hidden_states=torch.cat([latents] * 2), encoder_hidden_states=rand(2, MOCHI_TEXT,
                                                                                       config.text_embed_dim),
                    encoder_attention_mask=torch.cat([valid_first(MOCHI_TEXT, negative_tokens),
                                                      prompt_mask(MOCHI_TEXT)]), return_dict=False)
    if case.model == "mochi":
        return dict(hidden_states=latents, encoder_hidden_states=rand(1, MOCHI_TEXT, config.text_embed_dim),
                    encoder_attention_mask=prompt_mask(MOCHI_TEXT),
                    return_dict=False)
    if case.model == "wan-vace":
        return dict(hidden_states=latents, encoder_hidden_states=rand(1, TEXT_TOKENS, config.text_dim),
                    control_hidden_states=rand(1, config.vace_in_channels, case.frames, case.height, case.width),
                    return_dict=False)
    if case.model.startswith("wan") or case.model == "skyreels-df":
        return dict(hidden_states=latents, encoder_hidden_states=rand(1, TEXT_TOKENS, config.text_dim),
                    return_dict=False)
    if case.model == "hv15-t2v":                  # as its pipeline passes a short t2v prompt: most slots padding
        prompt, glyphs, image = HV15_T2V_SLOTS
        return dict(hidden_states=latents, encoder_hidden_states=rand(1, prompt, config.text_embed_dim),
                    encoder_attention_mask=valid_first(prompt, HV15_PROMPT),
                    encoder_hidden_states_2=rand(1, glyphs, config.text_embed_2_dim),
                    encoder_attention_mask_2=torch.zeros(1, glyphs, device=device, dtype=torch.long),
                    image_embeds=torch.zeros(1, image, config.image_embed_dim, device=device, dtype=dtype),
                    return_dict=False)
    return dict(hidden_states=latents, encoder_hidden_states=rand(1, TEXT_TOKENS, config.text_embed_dim),
                encoder_attention_mask=ones(TEXT_TOKENS), encoder_hidden_states_2=rand(1, 64, config.text_embed_2_dim),
                encoder_attention_mask_2=ones(64), image_embeds=rand(1, 729, config.image_embed_dim),
                return_dict=False)


def prompt_options_error(prompt_tokens: int | None, negative_tokens: int | None, models: list[str]) -> str | None:
    """What is wrong with ``--prompt-tokens`` / ``--negative-tokens`` for ``models`` (None: nothing): a prompt
    fills 1 to 255 of HunyuanVideo 1.0's and Mochi's 256 text slots, a negative prompt 0 to 255 of Mochi's, and only
    Mochi runs a guidance batch."""
    if prompt_tokens is not None and not 1 <= prompt_tokens < min(HV_TEXT, MOCHI_TEXT):
        return (f"--prompt-tokens: expected 1..{min(HV_TEXT, MOCHI_TEXT) - 1} (fewer than the text slots), got "
                f"{prompt_tokens}")
    if prompt_tokens is not None and not {"hv", "mochi"} & set(models):
        return "--prompt-tokens: only the hv and mochi cases take it (hv15-t2v pads its own prompt); add one of them"
    if negative_tokens is not None and not 0 <= negative_tokens < MOCHI_TEXT:
        return f"--negative-tokens: expected 0..{MOCHI_TEXT - 1} (fewer than Mochi's text slots), got {negative_tokens}"
    if negative_tokens is not None and set(models) != {"mochi"}:
        return "--negative-tokens: only the mochi case runs a guidance batch; run mochi alone"
    return None


def ltx2_audio_frames(config, latent_frames: int) -> int:
    """LTX-2's audio latent frames for a video of ``latent_frames``, as ``LTX2Pipeline`` counts them: the same duration,
    its ``(latent_frames - 1) * 8 + 1`` video frames at its 24 fps, at the audio latents' rate (sampling rate / hop
    length / temporal compression: 16000 / 160 / 4, 25 a second; the pipeline reads its audio VAE's, the config states
    the same), rounded."""
    seconds = ((latent_frames - 1) * LTX_VAE_TEMPORAL + 1) / LTX2_FPS
    return round(seconds * config.audio_sampling_rate / config.audio_hop_length / config.audio_scale_factor)


def timestep_inputs(model, timestep: float, device: str, inputs: dict) -> dict:
    """The forward's timestep arguments at ``timestep``, one per sample of ``inputs`` (batch 1 but Mochi's
    classifier-free guidance), as the model's pipeline passes them: HunyuanVideo 1.5
    embeds the timestep in the timestep's own dtype (give it the model's); LTX-2's pipeline passes it as ``sigma`` too,
    which its forward reads with ``use_cross_timestep=True`` (the pipeline's default); Cosmos-Predict2.5's pipeline
    passes one per latent frame of ``inputs``' latents, ``[B, 1, F, 1, 1]`` (its forward then modulates every token)."""
    name = type(model).__name__
    dtype = model.dtype if name.startswith("HunyuanVideo15") else torch.float32
    t = torch.full((inputs["hidden_states"].shape[0],), timestep, device=device, dtype=dtype)
    if name == "CosmosTransformer3DModel":
        return dict(timestep=t.reshape(1, 1, 1, 1, 1).expand(1, 1, inputs["hidden_states"].shape[2], 1, 1))
    return dict(timestep=t, sigma=t) if name == "LTX2VideoTransformer3DModel" else dict(timestep=t)


def token_grid(model, inputs: dict) -> tuple[int, int, int]:
    """Frames, height and width of the token grid of a forward on ``inputs``, as the integration reads it: from the
    latents' shape and the model's patch, or, on packed tokens ``[B, S, C]`` (LTX-Video, LTX-2), from the forward's
    ``num_frames``, ``height``, ``width`` and the patches the integration cuts them by."""
    from sparsecore.integrations.diffusers.ltx import packed_grid
    from sparsecore.integrations.diffusers.models import spec_of
    spec = spec_of(model)
    if spec.token_grid is None:
        return spec.grid(inputs["hidden_states"].shape, model.config)
    return packed_grid(spec, inputs["hidden_states"], spec.token_grid(model, (), inputs), "fix the case's inputs")


def attention_shape(model) -> tuple[int, int]:
    """Heads and head dim of the model's self-attention (Kandinsky 5's config gives its width and RoPE axes)."""
    config = model.config
    if "axes_dims" in config:
        return config.model_dim // sum(config.axes_dims), sum(config.axes_dims)
    return config.num_attention_heads, config.attention_head_dim


def video_tokens(model, inputs: dict) -> int:
    """Tokens of the latent video after patchify (the model's patch as the integration reads it)."""
    return math.prod(token_grid(model, inputs))
