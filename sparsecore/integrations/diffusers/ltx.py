"""LTX-Video and LTX-2 (diffusers 0.42.1): their forwards take packed tokens ``[B, S, C]`` beside the token grid, and
their self-attention makes q, k, v on flat channels (norms across heads, then RoPE) before splitting heads.

:class:`PackedGrid` is what a forward says of its grid (the handle checks it: :func:`packed_grid`); the ``*_qkv``
and :func:`ltx2_output` functions restate diffusers' processors (``LTXVideoAttnProcessor``,
``LTX2AudioVideoAttnProcessor``, ``LTX2PerturbedAttnProcessor``) around the attention call, which sparsecore's
processors (:mod:`.processors`) replace.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, NamedTuple

import torch
from diffusers.models.transformers.transformer_ltx import apply_rotary_emb as ltx_rope
from diffusers.models.transformers.transformer_ltx2 import apply_interleaved_rotary_emb, apply_split_rotary_emb

QKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def ltx_qkv(attn: Any, hidden_states: torch.Tensor, image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None) -> QKV:
    """LTX-Video self-attention's q, k, v ``[B, S, H, D]`` as ``LTXVideoAttnProcessor`` makes them: the projections,
    ``norm_q`` / ``norm_k`` across heads, then diffusers' ``transformer_ltx.apply_rotary_emb`` on q and k."""
    query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    query, key = attn.norm_q(query), attn.norm_k(key)
    if image_rotary_emb is not None:
        query, key = ltx_rope(query, image_rotary_emb), ltx_rope(key, image_rotary_emb)
    return tuple(t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))


class PackedGrid(NamedTuple):
    """The grid of a forward on packed tokens ``[B, S, C]`` as it was called (checked by the handle's
    ``packed_grid``): ``sizes``, its ``num_frames``, ``height``, ``width``; ``coords``, its ``video_coords``;
    ``patch``, the patch sizes that cut ``sizes`` into the token grid; ``expected_coords``, the coordinates the
    model makes for those sizes (``sizes -> tensor``), None where the model must get none."""

    sizes: tuple[Any, Any, Any]
    coords: Any
    patch: tuple[int, int, int] = (1, 1, 1)
    expected_coords: Callable[[tuple[int, int, int]], torch.Tensor] | None = None


def _forward_arg(args: tuple, kwargs: dict, name: str, index: int, default: Any = None) -> Any:
    return kwargs.get(name, args[index] if len(args) > index else default)


def ltx_grid(module: Any, args: tuple, kwargs: dict) -> PackedGrid:
    """The token grid of an ``LTXVideoTransformer3DModel.forward`` call: its ``num_frames``, ``height``, ``width``
    (positional 4-6, the token grid itself) and ``video_coords`` (positional 8), which must be None."""
    sizes = tuple(_forward_arg(args, kwargs, name, 4 + i) for i, name in enumerate(("num_frames", "height", "width")))
    return PackedGrid(sizes, _forward_arg(args, kwargs, "video_coords", 8))


def ltx2_grid(module: Any, args: tuple, kwargs: dict) -> PackedGrid:
    """The token grid of an ``LTX2VideoTransformer3DModel.forward`` call: its latent ``num_frames``, ``height``,
    ``width`` (positional 10-12) cut by the config's patches, and ``video_coords`` (positional 15), which its
    pipelines pass: they must be what ``module.rope.prepare_video_coords`` makes for those sizes at the forward's
    ``fps`` (positional 13, default 24), the grid in frame-major order."""
    sizes = tuple(_forward_arg(args, kwargs, name, 10 + i) for i, name in enumerate(("num_frames", "height", "width")))
    hidden = _forward_arg(args, kwargs, "hidden_states", 0)
    fps = _forward_arg(args, kwargs, "fps", 13, 24.0)

    def expected(grid: tuple[int, int, int]) -> torch.Tensor:
        return module.rope.prepare_video_coords(hidden.shape[0], *grid, hidden.device, fps=fps)
    return PackedGrid(sizes, _forward_arg(args, kwargs, "video_coords", 15), _patches(module.config), expected)


def packed_grid(spec: Any, hidden: torch.Tensor, grid: PackedGrid, remedy: str) -> tuple[int, int, int]:
    """The token grid of a forward on packed tokens ``[B, S, C]`` (for the handle, before a step counts), checked:
    positive integers whose grid after the patches has S tokens, and ``video_coords`` none (LTX-Video) or the grid's
    own (LTX-2's pipelines pass them; compared on the device, one host read a forward). Tokens placed anywhere else,
    as the condition pipelines place their conditioning frames, have no frame-major grid for the masks to follow."""
    name = spec.model_class.__name__
    if grid.coords is not None and grid.expected_coords is None:
        raise ValueError(f"video_coords: expected None for {name} with sparsecore applied (the masks follow the "
                         f"num_frames x height x width grid in frame-major order), got coordinates; {remedy}")
    if not all(isinstance(n, numbers.Integral) and not isinstance(n, bool) and n > 0 for n in grid.sizes):
        raise ValueError(f"num_frames, height, width: expected the forward's token grid as positive integers for "
                         f"{name}, got {tuple(grid.sizes)}; pass them as its pipeline does")
    sizes = tuple(int(n) for n in grid.sizes)
    frames, height, width = tokens = tuple(-(-n // p) for n, p in zip(sizes, grid.patch))
    if frames * height * width != hidden.shape[1]:
        count = f"num_frames x height x width = {frames * height * width}" if grid.patch == (1, 1, 1) else \
            f"{frames} x {height} x {width} = {frames * height * width} (num_frames, height, width {sizes} in " \
            f"patches of {grid.patch})"
        raise ValueError(f"hidden_states: expected {count} tokens for {name}, got {hidden.shape[1]} "
                         f"({list(hidden.shape)}); {remedy}")
    if grid.coords is not None:
        expected, coords = grid.expected_coords(sizes), grid.coords
        if not (isinstance(coords, torch.Tensor) and coords.shape == expected.shape
                and torch.equal(coords, expected.to(coords.device, coords.dtype))):
            got = list(coords.shape) if isinstance(coords, torch.Tensor) else type(coords).__name__
            raise ValueError(f"video_coords: expected the coordinates of the num_frames x height x width grid for "
                             f"{name} (its rope.prepare_video_coords at the forward's fps, as its pipeline makes "
                             f"them), got other coordinates ({got}): tokens off the grid, as a condition pipeline "
                             f"places them, or another fps; the masks follow the grid in frame-major order; {remedy}")
    return tokens


LTX2_ROPE = {"interleaved": apply_interleaved_rotary_emb, "split": apply_split_rotary_emb}


def ltx2_qkv(attn: Any, hidden_states: torch.Tensor, query_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None,
             key_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None) -> QKV:
    """LTX-2 video self-attention's q, k, v ``[B, S, H, D]`` as ``LTX2AudioVideoAttnProcessor`` (and the perturbed
    one) make them: the projections, ``norm_q`` / ``norm_k`` across heads, then the RoPE of the module's
    ``rope_type`` on the flat channels (k turns by q's frequencies where it has none of its own)."""
    query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    query, key = attn.norm_q(query), attn.norm_k(key)
    if query_rotary_emb is not None:
        rope = LTX2_ROPE.get(attn.rope_type)
        if rope is None:
            raise ValueError(f"rope_type: expected one of {sorted(LTX2_ROPE)} (LTX-2's RoPE kinds), got "
                             f"{attn.rope_type!r}; build the model with one of them")
        query, key = rope(query, query_rotary_emb), rope(key, query_rotary_emb if key_rotary_emb is None
                                                         else key_rotary_emb)
    return tuple(t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))


def ltx2_output(attn: Any, out: torch.Tensor, hidden_states: torch.Tensor, query: torch.Tensor, value: torch.Tensor,
                perturbation_mask: torch.Tensor | None) -> torch.Tensor:
    """LTX-2's attention output from ``out [B, S, H, D]`` as its processors make it: blended with the values by
    spatio-temporal guidance's ``perturbation_mask`` (per sample: 0 takes the values, 1 the attention) where given,
    scaled by the per-head gates ``2 sigmoid(to_gate_logits(hidden_states))`` where the module has them, then the
    output projection."""
    out = out.flatten(2, 3).to(query.dtype)
    if perturbation_mask is not None:
        out = torch.lerp(value.flatten(2, 3), out, perturbation_mask)
    if attn.to_gate_logits is not None:
        gates = 2.0 * torch.sigmoid(attn.to_gate_logits(hidden_states))
        out = (out.unflatten(2, (attn.heads, -1)) * gates.unsqueeze(-1)).flatten(2, 3)
    return attn.to_out[1](attn.to_out[0](out))


def _patches(config: Any) -> tuple[int, int, int]:
    return int(config.patch_size_t), int(config.patch_size), int(config.patch_size)
