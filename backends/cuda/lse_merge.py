"""Merge a partial attention over more keys into another, in place, by their log-sum-exps (one Triton pass).

For attention of a row over disjoint key sets A and B, with outputs ``o_a, o_b`` and natural-log
LSEs ``l_a, l_b`` (FlashDecoding's split-KV rule; :mod:`sparsecore.backends.npu.merge` states it):

    l = log(exp(l_a) + exp(l_b)),    o = exp(l_a - l) o_a + exp(l_b - l) o_b

A set with ``l = -inf`` holds no key and adds nothing (its output is not read); both empty: output 0,
LSE -inf. A NaN output of a set with keys stays NaN. Products and sums in float32; ``out`` keeps its
dtype. Used by the ``fa4`` lowering's key-range parts (:class:`.fa4_backend.Fa4Launch`): unlike torch
ops, it holds no float32 copy of the outputs (1.2 GB at Wan 6x). Tested in Triton's interpreter against
the float64 rule; not yet run on a GPU (2026-12-01).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_ROWS = 64


@triton.jit
def _merge_into(out_ptr, lse_ptr, part_ptr, part_lse_ptr, heads, rows,
                so_b, so_h, so_s, sl_b, sl_h, sp_b, sp_h, sp_s, spl_b, spl_h,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    b = tl.program_id(1) // heads
    h = tl.program_id(1) % heads
    s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    row_ok = s < rows
    ok = row_ok[:, None] & (d[None, :] < HEAD_DIM)
    b64, h64, s64 = b.to(tl.int64), h.to(tl.int64), s.to(tl.int64)
    lse_at = lse_ptr + b64 * sl_b + h64 * sl_h + s64
    l_a = tl.load(lse_at, mask=row_ok, other=float("-inf"))
    l_b = tl.load(part_lse_ptr + b64 * spl_b + h64 * spl_h + s64, mask=row_ok, other=float("-inf"))
    top = tl.maximum(l_a, l_b)
    top = tl.where(top == float("-inf"), 0.0, top)
    w_a = tl.exp(l_a - top)                                     # 0 for an empty set
    w_b = tl.exp(l_b - top)
    total = w_a + w_b
    out_at = out_ptr + b64 * so_b + h64 * so_h + s64[:, None] * so_s + d[None, :]
    o_a = tl.load(out_at, mask=ok, other=0.0).to(tl.float32)
    o_b = tl.load(part_ptr + b64 * sp_b + h64 * sp_h + s64[:, None] * sp_s + d[None, :], mask=ok,
                  other=0.0).to(tl.float32)
    merged = tl.where((l_a > float("-inf"))[:, None], w_a[:, None] * o_a, 0.0) \
        + tl.where((l_b > float("-inf"))[:, None], w_b[:, None] * o_b, 0.0)
    merged = merged / tl.where(total > 0.0, total, 1.0)[:, None]
    tl.store(out_at, merged.to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(lse_at, tl.where(total > 0.0, top + tl.log(tl.where(total > 0.0, total, 1.0)), float("-inf")),
             mask=row_ok)


def merge_into(out: torch.Tensor, lse: torch.Tensor, part: torch.Tensor, part_lse: torch.Tensor) -> None:
    """``(out, lse)`` becomes attention over both key sets: ``out, part [B, H, L, D]`` (unit last stride),
    ``lse, part_lse`` float32 ``[B, H, L]`` (unit last stride); ``out`` and ``lse`` are written in place."""
    batch, heads, rows, dim = out.shape
    grid = (triton.cdiv(rows, BLOCK_ROWS), batch * heads)
    _merge_into[grid](out, lse, part, part_lse, heads, rows, out.stride(0), out.stride(1), out.stride(2),
                      lse.stride(0), lse.stride(1), part.stride(0), part.stride(1), part.stride(2),
                      part_lse.stride(0), part_lse.stride(1),
                      HEAD_DIM=dim, BLOCK_D=triton.next_power_of_2(dim), BLOCK_S=BLOCK_ROWS)
