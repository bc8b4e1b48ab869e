"""LTX-Video and LTX-2 (diffusers 0.42.1): their forwards take packed tokens ``[B, S, C]`` beside the token grid, and
their self-attention makes q, k, v on flat channels (norms across heads, then RoPE) before splitting heads.

:class:`PackedGrid` is what a forward says of its grid (the handle checks it: :func:`packed_grid`); the ``*_qkv``
and :func:`ltx2_output` functions restate diffusers' processors (``LTXVideoAttnProcessor``,
``LTX2AudioVideoAttnProcessor``, ``LTX2PerturbedAttnProcessor``) around the attention call, which sparsecore's
processors (:mod:`.processors`) replace.
"""

from __future__ import annotations

import functools
import inspect
import numbers
import weakref
from typing import Any, Callable, NamedTuple

import torch
from diffusers.models.transformers.transformer_ltx import apply_rotary_emb as ltx_rope
from diffusers.models.transformers.transformer_ltx2 import apply_interleaved_rotary_emb, apply_split_rotary_emb

QKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def ltx_qkv(attn: Any, hidden_states: torch.Tensor, image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None) -> QKV:
    """LTX-Video self-attention's q, k, v ``[B, S, H, D]`` as ``LTXVideoAttnProcessor`` makes them: the projections,
    ``norm_q`` / ``norm_k`` across heads, then diffusers' ``transformer_ltx.apply_rotary_emb`` on q and k."""
    query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    query = attn.norm_q(query)              # one statement each: q's input is freed before k's temporaries
    key = attn.norm_k(key)                  # (eagerly: the same peak as the original processor)
    if image_rotary_emb is not None:
        query = ltx_rope(query, image_rotary_emb)
        key = ltx_rope(key, image_rotary_emb)
    return tuple(t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))


class PackedGrid(NamedTuple):
    """The grid of a forward on packed tokens ``[B, S, C]`` as it was called (checked by :func:`packed_grid`):
    ``sizes``, its ``num_frames``, ``height``, ``width``; ``coords``, its ``video_coords``; ``patch``, the patch sizes
    that cut ``sizes`` into the token grid; ``grid_coords``, the coordinates the model makes for those sizes at 1 fps
    (``(sizes, batch, device) -> [batch, 3, S, 2]``), None where the model must get none; ``refusal``, what of the
    call the masks cannot honour (``"field: expected ..., got ..."``), if anything."""

    sizes: tuple[Any, Any, Any]
    coords: Any
    patch: tuple[int, int, int] = (1, 1, 1)
    grid_coords: Callable[[tuple[int, int, int], int, torch.device], torch.Tensor] | None = None
    refusal: str | None = None


@functools.lru_cache(maxsize=None)
def _parameters(forward: Callable) -> tuple[str, ...]:
    return tuple(inspect.signature(forward).parameters)[1:]              # after self


def _forward_arg(module: Any, args: tuple, kwargs: dict, name: str, default: Any = None) -> Any:
    """The forward's argument ``name``, by keyword or by its place in the forward's signature."""
    index = _parameters(type(module).forward).index(name)
    return kwargs.get(name, args[index] if len(args) > index else default)


def _sizes(module: Any, args: tuple, kwargs: dict) -> tuple[Any, Any, Any]:
    return tuple(_forward_arg(module, args, kwargs, name) for name in ("num_frames", "height", "width"))


def ltx_grid(module: Any, args: tuple, kwargs: dict) -> PackedGrid:
    """The token grid of an ``LTXVideoTransformer3DModel.forward`` call: its ``num_frames``, ``height``, ``width``
    (the token grid itself) and its ``video_coords``, which must be None."""
    return PackedGrid(_sizes(module, args, kwargs), _forward_arg(module, args, kwargs, "video_coords"))


def ltx2_grid(module: Any, args: tuple, kwargs: dict) -> PackedGrid:
    """The token grid of an ``LTX2VideoTransformer3DModel.forward`` call: its latent ``num_frames``, ``height``,
    ``width`` cut by the config's patches, and its ``video_coords``, which its pipelines pass: they must be what
    ``module.rope.prepare_video_coords`` makes for those sizes, at any fps (the forward reads no ``fps`` where it gets
    coordinates). Refused: a ``video_self_attention_mask`` (IC-LoRA's token mask), and context parallelism (the
    model's video-to-audio attention reads every video token, which sparsecore's shards do not give it)."""
    mask = _forward_arg(module, args, kwargs, "video_self_attention_mask")
    refusal = None
    if mask is not None:
        got = list(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        refusal = (f"video_self_attention_mask: expected None for LTX2VideoTransformer3DModel with sparsecore applied "
                   f"(the block-mask IR cannot add a token mask), got {got}")
    elif getattr(module, "_parallel_config", None) is not None:
        refusal = ("transformer: LTX2VideoTransformer3DModel under context parallelism is not supported by sparsecore "
                   "(its video-to-audio attention reads every video token); run it on one GPU")

    def grid_coords(sizes: tuple[int, int, int], batch: int, device: torch.device) -> torch.Tensor:
        return module.rope.prepare_video_coords(batch, *sizes, device, fps=1.0)
    config = module.config
    patch = (int(config.patch_size_t), int(config.patch_size), int(config.patch_size))
    return PackedGrid(_sizes(module, args, kwargs), _forward_arg(module, args, kwargs, "video_coords"), patch,
                      grid_coords, refusal)


class CheckedCoords:
    """The last ``video_coords`` found on their grid: a weak reference, their version and ``(sizes, batch)``. LTX-2's
    pipelines pass one tensor to every forward of a generation, so :func:`off_grid` reads it once. Tensors made under
    ``torch.inference_mode()`` have no version to tell an in-place change by: they are read at every forward."""

    def __init__(self) -> None:
        self._last: tuple | None = None

    def holds(self, coords: torch.Tensor, key: tuple) -> bool:
        return self._last is not None and self._last[0]() is coords and not coords.is_inference() \
            and self._last[1:] == (coords._version, key)

    def keep(self, coords: torch.Tensor, key: tuple) -> None:
        self._last = None if coords.is_inference() else (weakref.ref(coords), coords._version, key)


def packed_grid(spec: Any, hidden: torch.Tensor, grid: PackedGrid, remedy: str,
                checked: CheckedCoords | None = None) -> tuple[int, int, int]:
    """The token grid of a forward on packed tokens ``[B, S, C]`` (for the handle, before a step counts), checked:
    positive integers whose grid after the patches has S tokens, and ``video_coords`` none (LTX-Video) or the grid's
    own (LTX-2's pipelines pass them: :func:`off_grid`; ``checked`` remembers the last found on the grid). Tokens placed
    anywhere else, as the condition pipelines place their conditioning frames, have no frame-major grid for the masks
    to follow."""
    name = spec.model_class.__name__
    if grid.refusal is not None:
        raise ValueError(f"{grid.refusal}; {remedy}")
    if grid.coords is not None and grid.grid_coords is None:
        raise ValueError(f"video_coords: expected None for {name} with sparsecore applied (the masks follow the "
                         f"num_frames x height x width grid in frame-major order), got coordinates; {remedy}")
    if not all(isinstance(n, numbers.Integral) and not isinstance(n, bool) and n > 0 for n in grid.sizes):
        raise ValueError(f"num_frames, height, width: expected the forward's token grid as positive integers for "
                         f"{name} (the masks follow it), got {tuple(grid.sizes)}; pass them (its text-to-video "
                         f"pipeline does), or {remedy}")
    sizes = tuple(int(n) for n in grid.sizes)
    frames, height, width = tokens = tuple(-(-n // p) for n, p in zip(sizes, grid.patch))
    if frames * height * width != hidden.shape[1]:
        count = f"num_frames x height x width = {frames * height * width}" if grid.patch == (1, 1, 1) else \
            f"{frames} x {height} x {width} = {frames * height * width} (num_frames, height, width {sizes} in " \
            f"patches of {grid.patch})"
        raise ValueError(f"hidden_states: expected {count} tokens for {name}, got {hidden.shape[1]} "
                         f"({list(hidden.shape)}); {remedy}")
    key = (sizes, hidden.shape[0])
    if grid.coords is not None and not (checked is not None and checked.holds(grid.coords, key)):
        problem = off_grid(grid.coords, grid.grid_coords, sizes, hidden.shape[0])
        if problem is None and checked is not None:
            checked.keep(grid.coords, key)
        if problem is not None:
            raise ValueError(f"video_coords: expected the coordinates of the num_frames x height x width grid {sizes} "
                             f"for {name} (what its rope.prepare_video_coords makes for it, at any fps), got "
                             f"{problem}; the masks follow the grid in frame-major order (tokens placed off it, as "
                             f"a condition pipeline places its conditioning frames, are not on it); {remedy}")
    return tokens


def off_grid(coords: Any, grid_coords: Callable[[tuple[int, int, int], int, torch.device], torch.Tensor],
             sizes: tuple[int, int, int], batch: int) -> str | None:
    """Why ``coords`` are not the grid's, None where they are: ``[1 or batch, 3, S, 2]`` whose space axes equal the
    grid's and whose time axis is the grid's (in frames, at 1 fps) over one positive scale, the fps (to 1e-5:
    coordinates made on another device, or by another division, may differ in the last bit; neighbouring frames differ
    by far more). Compared on the coordinates' device, one host read."""
    if not isinstance(coords, torch.Tensor):
        return f"a {type(coords).__name__}"
    if coords.ndim != 4 or coords.shape[0] not in (1, batch):
        return f"a tensor of shape {list(coords.shape)} (expected [1 or {batch}, 3, tokens, 2])"
    expected = grid_coords(sizes, coords.shape[0], coords.device)
    if coords.shape != expected.shape:
        return f"a tensor of shape {list(coords.shape)} (the grid's: {list(expected.shape)})"
    coords = coords.to(expected.dtype)
    time, frames = coords[:, 0], expected[:, 0]
    fps = frames.amax() / time.amax()
    space = (coords[:, 1:] == expected[:, 1:]).all()
    timed = torch.isfinite(fps) & (fps > 0) & torch.isclose(time * fps, frames, rtol=1e-5, atol=0.0).all()
    on_space, on_time = torch.stack([space, timed]).tolist()
    if not on_space:
        return "height or width coordinates off the grid"
    return None if on_time else "time coordinates that are not the grid's frames over one fps"


LTX2_ROPE = {"interleaved": apply_interleaved_rotary_emb, "split": apply_split_rotary_emb}


def ltx2_qkv(attn: Any, hidden_states: torch.Tensor, query_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None,
             key_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None) -> QKV:
    """LTX-2 video self-attention's q, k, v ``[B, S, H, D]`` as ``LTX2AudioVideoAttnProcessor`` (and the perturbed
    one) make them: the projections, ``norm_q`` / ``norm_k`` across heads, then the RoPE of the module's
    ``rope_type`` on the flat channels (k turns by q's frequencies where it has none of its own)."""
    query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    query = attn.norm_q(query)              # one statement each, as in ltx_qkv
    key = attn.norm_k(key)
    if query_rotary_emb is not None:
        rope = LTX2_ROPE.get(attn.rope_type)
        if rope is None:
            raise ValueError(f"rope_type: expected one of {sorted(LTX2_ROPE)} (LTX-2's RoPE kinds), got "
                             f"{attn.rope_type!r}; build the model with one of them")
        query = rope(query, query_rotary_emb)
        key = rope(key, query_rotary_emb if key_rotary_emb is None else key_rotary_emb)
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
