"""Triton kernel for AdaSpa's block attention mass (arXiv 2502.21079, Sec. 4.2, Alg. 1-2).

One program per (query tile, head, batch) loads its queries and row LSEs once, then
walks every key tile of the sequence and adds ``sum exp(scale * q.k - lse)`` over the
tile into ``mass[b, h, query block, key block]`` with one atomic add: the scores are
never written to memory. Key tiles are cut at key-block boundaries, so each tile
belongs to one block; query tiles never straddle two query blocks. Rows past the
block end, and rows whose LSE is not finite (no key under a cached LSE), add nothing.
"""

import triton
import triton.language as tl


@triton.jit
def block_mass_fwd(Q, K, Lse, Mass, Programs, TileStart, TileEnd, TileBlock,
                   stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                   stride_lb, stride_lh, stride_mb, stride_mh, stride_mi,
                   num_tiles, qk_scale,
                   GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    head = tl.program_id(1)
    b = tl.program_id(2)
    q_start = tl.load(Programs + pid * 3)
    q_end = tl.load(Programs + pid * 3 + 1)
    q_block = tl.load(Programs + pid * 3 + 2)
    offs_m = q_start + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < q_end
    q = tl.load(Q + b.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh + offs_m[:, None] * stride_qm
                + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    lse = tl.load(Lse + b.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh + offs_m, mask=row_ok,
                  other=float("inf"))
    lse = tl.where((lse > float("-inf")) & (lse < float("inf")), lse * 1.4426950408889634, float("inf"))  # log2
    k_ptrs = K + b.to(tl.int64) * stride_kb + (head // GROUP).to(tl.int64) * stride_kh \
        + offs_n[None, :] * stride_kn + offs_d[:, None]
    mass_row = Mass + b.to(tl.int64) * stride_mb + head.to(tl.int64) * stride_mh + q_block.to(tl.int64) * stride_mi
    for t in range(0, num_tiles):
        start = tl.load(TileStart + t)
        col_ok = start + offs_n < tl.load(TileEnd + t)
        k = tl.load(k_ptrs + start * stride_kn, mask=col_ok[None, :], other=0.0)
        scores = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale - lse[:, None]
        p = tl.where(col_ok[None, :], tl.math.exp2(scores), 0.0)
        tl.atomic_add(mass_row + tl.load(TileBlock + t), tl.sum(tl.sum(p, 1), 0))

