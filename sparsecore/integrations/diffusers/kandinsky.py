"""Kandinsky 5 (diffusers 0.42.1, ``Kandinsky5Transformer3DModel``): its visual self-attention's q, k, v and output as
``Kandinsky5AttnProcessor`` makes them, around the attention call that sparsecore's processor
(:class:`.processors.Kandinsky5SparseAttnProcessor`) replaces.

The model takes latents ``[B, F, H, W, C]`` and flattens its patch grid frame by frame: in raster order, or, where
its pipelines pass ``sparse_params`` (the NABLA configurations, ``attention_type="nabla"``), in 8 x 8 tiles of each
frame (``transformer_kandinsky.fractal_flatten``). Both keep every frame's tokens together, which is all the masks
need: LVSA's blocks are frames, AdaSpa's and PASA's blocks are planned from q and k in the order they come (under
NABLA's order each 64-token block is one 8 x 8 tile). ``method="nabla"`` (:mod:`sparsecore.methods.nabla`) plans the
masks those configurations were trained with, and needs that order.
"""

from __future__ import annotations

from typing import Any

import torch

QKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
RASTER_METHODS = ("radial", "sta")      # their masks read a token's (y, x) from its raster place in the frame


def kandinsky_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Kandinsky 5's RoPE (a closure inside ``Kandinsky5AttnProcessor``, re-stated with the same arithmetic): channel
    pairs ``(2i, 2i + 1)`` of ``x [B, S, H, D]`` times the 2 x 2 matrices of ``rope [B, S, 1, D/2, 2, 2]`` in float32,
    rounded to bfloat16 as diffusers does whatever the model's dtype, then to ``x``'s dtype."""
    pairs = x.reshape(*x.shape[:-1], -1, 1, 2).to(torch.float32)
    return (rope * pairs).sum(dim=-1).reshape(*x.shape).to(torch.bfloat16).type_as(x)


def kandinsky_qkv(attn: Any, hidden_states: torch.Tensor, rotary_emb: torch.Tensor | None) -> QKV:
    """The visual self-attention's q, k, v ``[B, S, H, D]``: the projections, the per-head RMS norms in float32, then
    the RoPE on q and k (one statement each: q's temporaries are freed before k's, as in the original)."""
    query = attn.to_query(hidden_states).unflatten(-1, (attn.num_heads, -1))
    key = attn.to_key(hidden_states).unflatten(-1, (attn.num_heads, -1))
    value = attn.to_value(hidden_states).unflatten(-1, (attn.num_heads, -1))
    query = attn.query_norm(query.float()).type_as(query)
    key = attn.key_norm(key.float()).type_as(key)
    if rotary_emb is not None:
        query = kandinsky_rope(query, rotary_emb)
        key = kandinsky_rope(key, rotary_emb)
    return query, key, value


def kandinsky_output(attn: Any, out: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """The attention output ``[B, S, H, D]`` through the module's ``out_layer``."""
    return attn.out_layer(out.flatten(-2, -1).type_as(query))


def nabla_params(config: Any) -> dict[str, Any]:
    """NABLA's parameters of a NABLA configuration, as its pipelines pass them in ``sparse_params`` (diffusers 0.42.1,
    ``Kandinsky5T2VPipeline.get_sparse_params``): ``attention_P`` and the window ``attention_wT / wH / wW``. Other
    configurations order tokens by raster, where NABLA's blocks are not tiles: refused."""
    if getattr(config, "attention_type", None) != "nabla":
        raise ValueError(f"method: 'nabla' plans 8 x 8 tiles, which Kandinsky 5 puts its tokens in only where "
                         f"attention_type='nabla' (the 10 s and Pro configurations), got attention_type="
                         f"{getattr(config, 'attention_type', None)!r}; use 'lvsa', 'adaspa' or 'pasa' here")
    return {"threshold": config.attention_P,
            "window": (config.attention_wT, config.attention_wH, config.attention_wW)}


def tiled_forward(args: tuple, kwargs: dict) -> bool:
    """Whether a forward's arguments put its tokens in 8 x 8 tiles: ``sparse_params`` (its 8th argument) with
    ``to_fractal``, as Kandinsky 5's pipelines pass it for NABLA configurations."""
    sparse_params = kwargs.get("sparse_params", args[7] if len(args) > 7 else None)
    return bool((sparse_params or {}).get("to_fractal", False))


def check_token_order(method: Any, tiled: bool) -> None:
    """Refuse a forward whose token order the method cannot plan on: NABLA needs the 8 x 8 tiles (``tiled``), Radial
    Attention and STA read a token's (y, x) from its raster place in the frame."""
    if method == "nabla" and not tiled:
        raise ValueError("sparse_params: method 'nabla' plans 8 x 8 tiles, and this forward keeps its tokens in "
                         "raster order (its pipelines pass sparse_params with to_fractal=True for NABLA "
                         "configurations); call the transformer as they do, or apply another method")
    if method in RASTER_METHODS and tiled:
        raise ValueError(f"sparse_params: method {method!r} places tokens by their raster position in a "
                         f"frame, and this forward keeps them in 8 x 8 tiles (NABLA's order, to_fractal=True); "
                         f"call the transformer without sparse_params, or apply 'nabla'")
