"""diffusers 0.42 context-parallel plans for the models it has none for, or whose own does not fit sparsecore's
attention (:mod:`.parallel` runs them: :func:`.parallel.enable_parallelism` picks one per model)."""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput
from diffusers.models.transformers.transformer_wan import WanTransformer3DModel

__all__ = ["HUNYUAN_VIDEO_15_CP_PLAN", "LTX_VIDEO_CP_PLAN", "MOCHI_CP_PLAN", "WAN_VACE_CP_PLAN", "flat_ltx_timestep"]

HUNYUAN_VIDEO_15_CP_PLAN = {
    # RoPE of the video tokens: split like them. The text (encoder_hidden_states, its padding mask) is not
    # split: every rank holds all of it and sparsecore's attention keeps it identical on every rank.
    "rope": {0: ContextParallelInput(split_dim=0, expected_dims=2, split_output=True),
             1: ContextParallelInput(split_dim=0, expected_dims=2, split_output=True)},
    "transformer_blocks.0": {"hidden_states": ContextParallelInput(split_dim=1, expected_dims=3, split_output=False)},
    "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
}
"""A context-parallel plan for ``HunyuanVideo15Transformer3DModel`` (diffusers 0.42 has none), for sparsecore only.

diffusers' own processor cannot run under any plan of this model: it builds a ``[B, 1, S, S]`` padding mask
from the rank's local sequence, which matches neither the Ulysses layout (whole sequence, mask all-gathered
on the key axis only) nor ring steps (the padding sits in one shard). sparsecore's processors take the text
mask ``[B, text]`` instead, so this plan is valid while sparsecore is applied (not after ``handle.remove()``).
"""

MOCHI_CP_PLAN = {
    # Mochi's RoPE: (cos, sin), each [video tokens, heads, head_dim / 2], split like the video tokens. The text (its
    # time/caption embedding, encoder_hidden_states, encoder_attention_mask) is not split, as in HunyuanVideo 1.5's.
    "rope": {0: ContextParallelInput(split_dim=0, expected_dims=3, split_output=True),
             1: ContextParallelInput(split_dim=0, expected_dims=3, split_output=True)},
    "transformer_blocks.0": {"hidden_states": ContextParallelInput(split_dim=1, expected_dims=3, split_output=False)},
    "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),      # before the reshape back to latents
}
"""A context-parallel plan for ``MochiTransformer3DModel`` (diffusers 0.42 has none), for sparsecore only: the video
tokens of ``patch_embed`` (``[B, S, C]``) split from block 0 to ``proj_out`` (``norm_out`` and the blocks' norms and
feed-forwards act per token), the text replicated.

diffusers' ``MochiAttnProcessor2_0`` calls torch SDPA itself on the tokens it is given, so under this plan it would
attend over this rank's video only (no all-to-all): :func:`enable_parallelism` puts a check on the transformer that
refuses a forward whose blocks run it (e.g. after ``handle.remove()``).
"""

_SPLIT_TOKENS = ContextParallelInput(split_dim=1, expected_dims=3, split_output=False)
WAN_VACE_CP_PLAN = {
    **WanTransformer3DModel._cp_plan,
    # The VACE blocks run first, on the video (block 0 adds it to the control) and the control tokens, both split
    # like the video; the hints they return are this rank's tokens, added to its part of the video in the blocks.
    "vace_blocks.0": {"hidden_states": _SPLIT_TOKENS, "control_hidden_states": _SPLIT_TOKENS},
}
"""Wan's context-parallel plan with the control tokens of ``WanVACETransformer3DModel`` split too (diffusers 0.42 has
no plan for it); SkyReels-V2 runs under Wan's own (its module names and RoPE layout are Wan's; a diffusion-forcing
timestep ``[B, F]`` is split by frames, as its tokens are)."""

LTX_VIDEO_CP_PLAN = {
    # The packed video tokens [B, S, C] from the forward's input to proj_out, and LTX's RoPE (cos, sin, each [B, S, D])
    # split alike; a per-token timestep [B, S] (LTXImageToVideoPipeline's) too, a per-sample one [B] not (diffusers
    # logs once that it leaves it whole). The text is not split.
    "": {"hidden_states": _SPLIT_TOKENS, "timestep": ContextParallelInput(split_dim=1, expected_dims=2,
                                                                          split_output=False)},
    "rope": {0: ContextParallelInput(split_dim=1, expected_dims=3, split_output=True),
             1: ContextParallelInput(split_dim=1, expected_dims=3, split_output=True)},
    "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
}
"""sparsecore's context-parallel plan for ``LTXVideoTransformer3DModel``. diffusers 0.42's own (``_cp_plan``) splits
the text as well, for its cross-attention's all-to-alls (with the pipelines' text padding mask that fails in diffusers
0.42), and not a per-token timestep (its image-to-video pipeline's, whose per-token embeddings would then not match
the rank's tokens); here each rank's cross-attention runs on its tokens and all the text, locally. Timesteps of
``[B, 1]`` (``LTXConditionPipeline``'s) and ``[B, S, 1]`` (its long multi-prompt pipeline's) reach the plan as ``[B]``
and ``[B, S]`` (:func:`flat_ltx_timestep`)."""


def flat_ltx_timestep(transformer: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """A forward pre-hook of an ``LTXVideoTransformer3DModel`` under :data:`LTX_VIDEO_CP_PLAN`, before the plan
    splits the inputs: a timestep ``[B, 1]`` as ``[B]``, ``[B, S, 1]`` as ``[B, S]`` (the forward embeds
    ``timestep.flatten()``, so the embeddings are the same), which the plan leaves whole or splits with the tokens;
    other shapes raise."""
    positional = "timestep" not in kwargs and len(args) > 2
    timestep = args[2] if positional else kwargs.get("timestep")
    if not isinstance(timestep, torch.Tensor) or timestep.ndim <= 1:
        return None
    if timestep.ndim > 3 or (timestep.ndim == 3 and timestep.shape[2] != 1):
        raise ValueError(f"timestep: expected [B], [B, 1], [B, S] or [B, S, 1] for LTXVideoTransformer3DModel under "
                         f"LTX_VIDEO_CP_PLAN, got {list(timestep.shape)}; pass the pipeline's timestep")
    flat = timestep.reshape(timestep.shape[0]) if timestep.shape[1] == 1 and timestep.ndim == 2 else \
        timestep.reshape(timestep.shape[:2])
    if positional:
        return (*args[:2], flat, *args[3:]), kwargs
    return args, {**kwargs, "timestep": flat}
