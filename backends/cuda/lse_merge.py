"""Merge a partial attention over more keys into another, in place, by their log-sum-exps (one Triton pass).

For attention of a row over disjoint key sets A and B, with outputs ``o_a, o_b`` and natural-log
LSEs ``l_a, l_b`` (FlashDecoding's split-KV rule; :mod:`sparsecore.partials` states it):

    l = log(exp(l_a) + exp(l_b)),    o = exp(l_a - l) o_a + exp(l_b - l) o_b

A set with ``l = -inf`` holds no key and adds nothing (its output is not read); both empty: output 0,
LSE -inf. A NaN output or LSE of a set with keys (a NaN value, key or query it attends) stays NaN.
Products and sums in float32; ``out`` keeps its dtype, so P parts round the output P - 1 more times
(bf16: about 2e-3 relative each). Used by the ``fa4`` lowering's key ranges (:class:`.fa4_launch.Fa4Launch`):
unlike torch ops, it holds no float32 copy of the outputs (1.2 GB at Wan 6x). Tested in Triton's interpreter
against the float64 rule, and on the H200 through the ``fa4`` lowering's key ranges (its GPU oracle tests and
the e2e runs since 2026-12-01's sixth session).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_ROWS = 64


@triton.jit(do_not_specialize=["heads", "rows", "sl_b", "sl_h", "spl_b", "spl_h"])  # lengths: compile once
def _merge_into(out_ptr, lse_ptr, part_ptr, part_lse_ptr, heads, rows,
                so_b, so_h, so_s, so_d, sl_b, sl_h, sl_s, sp_b, sp_h, sp_s, sp_d, spl_b, spl_h, spl_s,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    b = tl.program_id(1) // heads
    h = tl.program_id(1) % heads
    s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    row_ok = s < rows
    ok = row_ok[:, None] & (d[None, :] < HEAD_DIM)
    b64, h64, s64, d64 = b.to(tl.int64), h.to(tl.int64), s.to(tl.int64), d.to(tl.int64)
    lse_at = lse_ptr + b64 * sl_b + h64 * sl_h + s64 * sl_s
    l_a = tl.load(lse_at, mask=row_ok, other=float("-inf"))
    l_b = tl.load(part_lse_ptr + b64 * spl_b + h64 * spl_h + s64 * spl_s, mask=row_ok, other=float("-inf"))
    in_a = l_a != float("-inf")                                 # a set with keys (a NaN LSE counts: it spreads)
    in_b = l_b != float("-inf")
    top = tl.maximum(l_a, l_b, propagate_nan=tl.PropagateNan.ALL)
    top = tl.where(top == float("-inf"), 0.0, top)
    w_a = tl.where(in_a, tl.exp(l_a - top), 0.0)
    w_b = tl.where(in_b, tl.exp(l_b - top), 0.0)
    total = w_a + w_b
    out_at = out_ptr + b64 * so_b + h64 * so_h + s64[:, None] * so_s + d64[None, :] * so_d
    o_a = tl.load(out_at, mask=ok, other=0.0).to(tl.float32)
    o_b = tl.load(part_ptr + b64 * sp_b + h64 * sp_h + s64[:, None] * sp_s + d64[None, :] * sp_d, mask=ok,
                  other=0.0).to(tl.float32)
    merged = tl.where(in_a[:, None], w_a[:, None] * o_a, 0.0) + tl.where(in_b[:, None], w_b[:, None] * o_b, 0.0)
    some = in_a | in_b
    merged = tl.where(some[:, None], merged / tl.where(some, total, 1.0)[:, None], 0.0)
    tl.store(out_at, merged.to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(lse_at, tl.where(some, top + tl.log(tl.where(some, total, 1.0)), float("-inf")), mask=row_ok)


def merge_into(out: torch.Tensor, lse: torch.Tensor, part: torch.Tensor, part_lse: torch.Tensor) -> None:
    """``(out, lse)`` becomes attention over both key sets: ``out, part [B, H, L, D]``, ``lse, part_lse`` float32
    ``[B, H, L]`` (any strides); ``out`` and ``lse`` are written in place."""
    batch, heads, rows, dim = out.shape
    grid = (triton.cdiv(rows, BLOCK_ROWS), batch * heads)
    _merge_into[grid](out, lse, part, part_lse, heads, rows, *out.stride(), *lse.stride(), *part.stride(),
                      *part_lse.stride(), HEAD_DIM=dim, BLOCK_D=triton.next_power_of_2(dim), BLOCK_S=BLOCK_ROWS)
