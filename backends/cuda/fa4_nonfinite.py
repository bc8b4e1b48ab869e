"""Keeps a non-finite value inside the rows that attend to it, around FA4's mask tiles.

FA4 masks a pair (q, k) of a mask tile by setting its score to -inf (``mask.py``: a select,
so a NaN or inf *key* never reaches a masked row), but still multiplies the zero weight by
the value: ``0 * inf = NaN`` in ``P @ V``, so a non-finite value token of a key tile reaches
every row of the query tiles that compute that tile, attending or not. Full tiles are
attended by every row of their query tile, so only plans with mask tiles need this.

:func:`guard_values` hands FA4 the values with their non-finite elements replaced by 0 (the
output of every row is then what it would be without them) and notes where they were;
:func:`poison` then writes NaN where dense attention would give a non-finite output: rows
whose IR row lists a key block holding a non-finite value, in the head dims where that key
head has one. Exact when the non-finite values of a key head share their dims (one bad
token, or a bad token vector); otherwise an attending row may get NaN in a dim where dense
attention gives a finite value. One Triton pass reads ``v`` and writes the copy (0.55 GiB at
Wan 2.1 6x, freed after the call), a second touches only the rows to poison; the block and
row bookkeeping between them are small fixed-size tensor ops: no host sync. Neither kernel specializes on
the lengths or head counts (Triton would compile again for each class of their divisibility by 16: a
first call of a new length would pay a compile; the copies' addresses stay aligned through ``HEAD_DIM``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .fa4_layout import Fa4Layout

BLOCK_TOKENS = 64


class NonFinite(NamedTuple):
    """Where the values were not finite: per key token ``int8 [B * Hkv, S]``, per head dim ``int32 [B * Hkv, D]``."""

    tokens: torch.Tensor
    dims: torch.Tensor


@triton.jit(do_not_specialize=["kv_heads", "seq_len"])      # a new length compiles nothing new
def _zero_non_finite(v_ptr, order_ptr, clean_ptr, bad_token_ptr, bad_dim_ptr, kv_heads, seq_len,
                     stride_b, stride_h, stride_s, stride_d,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, ORDERED: tl.constexpr):
    row = tl.program_id(1).to(tl.int64)                      # b * kv_heads + h
    s = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    inside = (s[:, None] < seq_len) & (d[None, :] < HEAD_DIM)
    if ORDERED:                                              # the token at position s
        source = tl.load(order_ptr + s, mask=s < seq_len, other=0).to(tl.int64)
    else:
        source = s
    base = (row // kv_heads) * stride_b + (row % kv_heads) * stride_h
    x = tl.load(v_ptr + base + source[:, None] * stride_s + d[None, :] * stride_d, mask=inside, other=0.0)
    wide = x.to(tl.float32)
    bad = (wide != wide) | (tl.abs(wide) == float("inf"))
    tl.store(clean_ptr + (row * seq_len + s[:, None]) * HEAD_DIM + d[None, :], tl.where(bad, tl.zeros_like(x), x),
             mask=inside)
    flags = bad.to(tl.int32)
    tl.store(bad_token_ptr + row * seq_len + source, tl.max(flags, axis=1).to(tl.int8), mask=s < seq_len)
    dim_bad = tl.max(flags, axis=0)
    tl.atomic_max(bad_dim_ptr + row * HEAD_DIM + d, dim_bad, mask=(d < HEAD_DIM) & (dim_bad > 0))


@triton.jit(do_not_specialize=["heads", "group", "seq_len"])
def _write_nan(out_ptr, hit_ptr, bad_dim_ptr, heads, group, seq_len, stride_b, stride_s, stride_h, stride_d,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    row = tl.program_id(1).to(tl.int64)                      # b * heads + h
    s = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    hit = tl.load(hit_ptr + row * seq_len + s, mask=s < seq_len, other=0)
    if tl.max(hit.to(tl.int32), axis=0) > 0:
        b, h = row // heads, row % heads
        d = tl.arange(0, BLOCK_D)
        dims = tl.load(bad_dim_ptr + (b * (heads // group) + h // group) * HEAD_DIM + d, mask=d < HEAD_DIM, other=0)
        write = (hit[:, None] > 0) & (dims[None, :] > 0) & (s[:, None] < seq_len)
        pointers = out_ptr + b * stride_b + h * stride_h + s[:, None] * stride_s + d[None, :] * stride_d
        tl.store(pointers, tl.full([BLOCK_S, BLOCK_D], float("nan"), out_ptr.dtype.element_ty), mask=write)


def guard_values(v: torch.Tensor, order: torch.Tensor | None = None) -> tuple[torch.Tensor, NonFinite]:
    """``v [B, Hkv, S, D]`` (any strides) as a contiguous copy with non-finite elements 0, and where they were.

    ``order``: int32 ``[S]``, the copy's tokens gathered so (``copy[..., p, :] = v[..., order[p], :]``,
    :func:`.fa4_key_order.key_order`); ``tokens`` stays in ``v``'s order."""
    batch, kv_heads, kv_len, dim = v.shape
    clean = torch.empty((batch, kv_heads, kv_len, dim), dtype=v.dtype, device=v.device)
    tokens = torch.empty(batch * kv_heads, kv_len, dtype=torch.int8, device=v.device)
    dims = torch.zeros(batch * kv_heads, dim, dtype=torch.int32, device=v.device)
    grid = (triton.cdiv(kv_len, BLOCK_TOKENS), batch * kv_heads)
    _zero_non_finite[grid](v, clean if order is None else order, clean, tokens, dims, kv_heads, kv_len, *v.stride(),
                           HEAD_DIM=dim, BLOCK_D=triton.next_power_of_2(dim), BLOCK_S=BLOCK_TOKENS,
                           ORDERED=order is not None)
    return clean, NonFinite(tokens, dims)


def poison(out: torch.Tensor, found: NonFinite, layout: Fa4Layout, kv_offsets: torch.Tensor) -> torch.Tensor:
    """FA4's ``out [B, q_len, H, D]`` with NaN where a row lists a block holding a non-finite value, in its dims.

    ``layout`` must have mask tiles (its ``keep_bits`` and ``q_block_of_token``); ``kv_offsets``: the mask's key
    block offsets on ``out``'s device (int64 ``[NB + 1]``).
    """
    batch, q_len, heads, dim = out.shape
    kv_rows = found.tokens.shape[0]
    kv_heads, num_blocks = kv_rows // batch, kv_offsets.numel() - 1
    seen = torch.nn.functional.pad(found.tokens.cumsum(-1, dtype=torch.int32), (1, 0))          # [B*Hkv, S+1]
    bad_block = (seen[:, kv_offsets[1:]] - seen[:, kv_offsets[:-1]]) > 0                      # [B*Hkv, NB]
    # fa4_layout.pack_bits' encoding in four ops (its bit loop suits the plan's large maps, not a per-call small one)
    words = layout.keep_bits.shape[-1]
    bad = torch.nn.functional.pad(bad_block, (0, words * 32 - num_blocks)).view(batch, kv_heads, words, 32)
    packed = (bad.long() << torch.arange(32, device=out.device)).sum(-1)                     # [B, Hkv, NW]
    bad_words = torch.where(packed >= 1 << 31, packed - (1 << 32), packed).to(torch.int32)  # keep_bits' encoding
    kv_head = torch.arange(heads, device=out.device) // (heads // kv_heads)
    row_hit = ((layout.keep_bits[None] & bad_words[:, kv_head, None, :]) != 0).any(-1)      # [B, H, MB]
    hit = row_hit[:, :, layout.q_block_of_token[:q_len].long()].to(torch.int8).contiguous()  # [B, H, q_len]
    grid = (triton.cdiv(q_len, BLOCK_TOKENS), batch * heads)
    _write_nan[grid](out, hit, found.dims, heads, heads // kv_heads, q_len, *out.stride(), HEAD_DIM=dim,
                     BLOCK_D=triton.next_power_of_2(dim), BLOCK_S=BLOCK_TOKENS)
    return out
