"""Triton kernels of AdaSpa's first search step in one dense pass: the output and every block mass.

AdaSpa (arXiv 2502.21079, Sec. 4.2) searches on the softmax mass of each (query block,
key block) pair, ``sum exp(s_ij - lse_i)``, which needs each row's final LSE; its Fused
Online Search is a dense attention for the output and the LSE, then a second pass over
every score for the masses. But the online softmax already sums each row's scores over
every key tile (the update of ``l_i``); only the final LSE is missing when it does. So
:func:`search_attention_fwd`, a dense FlashAttention-2 forward (the loop of
:mod:`.triton_kernel`), also writes, per row and per key *piece* (at most 64 keys inside one
key block: ``search_attention.PIECE``), the log of the piece's sum under the running maximum,
``a = m + log2(sum_piece exp2(s - m))``; :func:`piece_mass_fwd` then reduces them under
the final LSE: ``mass[p, q] = sum over rows i of p and pieces of q of exp2(a - lse2_i)``.
The scores are neither written nor recomputed; the extra traffic is one float per row and
piece, written once and read once.

A full key tile is ``PIECES`` (1 or 2) consecutive full pieces: an unmasked ``PIECES * 64``-key
tile whose first piece's sum is a masked row sum and whose second is the rest of the row sum
(one select and one add per score beyond FlashAttention's own work; the difference is exact
to float32 rounding of the tile's row sum, 2^-23 of it, and clamped at 0). Every other piece
(a short block's, or one left over) runs alone as a masked tile. Rows are cut into ``BLOCK_M`` tiles with no
regard to query blocks: the partial sums are per row.

Both kernels take a chunk of rows ``[row_start, row_end)`` (the host bounds the partial sums'
memory by chunks of heads and rows): the partial sums hold only the chunk's rows, at ``row - row_start``;
a query block cut by a chunk edge adds its two parts to its masses in two launches (atomic adds).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_kernel import _finite_max, _load_kv


@triton.jit
def _log_sum(sums, m_new):
    """``m + log2(sums)`` per row (-inf where the sum is 0, NaN where it is NaN: non-finite inputs stay visible)."""
    return tl.where(sums > 0.0, m_new + tl.math.log2(tl.where(sums > 0.0, sums, 1.0)),
                    tl.where(sums == 0.0, float("-inf"), sums))


# Offsets that change from launch to launch of one call (chunks of heads and rows) are not specialized on (Triton
# would compile a variant for each value that is 1 or divisible by 16, inside a timed search step).
@triton.jit(do_not_specialize=["row_start", "row_end", "head_offset"])
def search_attention_fwd(
        Q, K, V, Out, Lse, Partial, desc_k, desc_v,
        FullStart, FullPiece, SoloStart, SoloEnd, SoloPiece,
        stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
        stride_ob, stride_oh, stride_om, stride_lb, stride_lh, stride_pb, stride_ph, stride_pp,
        num_kv_heads, row_start, row_end, kv_len, num_full, num_solo, head_offset, qk_scale,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, PIECES: tl.constexpr,
        USE_TMA: tl.constexpr, SCALE_POSITIVE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Output, LSE and partial sums of ``BLOCK_M`` rows of the chunk ``[row_start, row_end)``."""
    BLOCK_N: tl.constexpr = PIECES * 64
    chunk_head = tl.program_id(1)
    b = tl.program_id(2)
    head = head_offset + chunk_head
    kv_head = head // GROUP
    offs_m = row_start + tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)      # absolute rows
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < row_end
    q = tl.load(Q + b.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh + offs_m[:, None] * stride_qm
                + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    k_ptrs = K + b.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh + offs_n[None, :] * stride_kn \
        + offs_d[:, None]
    v_ptrs = V + b.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh + offs_n[:, None] * stride_vn \
        + offs_d[None, :]
    kv_row0 = (b * num_kv_heads + kv_head) * kv_len if USE_TMA else 0
    partial = Partial + b.to(tl.int64) * stride_pb + chunk_head.to(tl.int64) * stride_ph + (offs_m - row_start)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    col_all = offs_n < BLOCK_N
    for t in range(0, num_full):
        start = tl.load(FullStart + t)
        piece = tl.load(FullPiece + t).to(tl.int64)
        k, v = _load_kv(k_ptrs, v_ptrs, desc_k, desc_v, kv_row0 + start, col_all, stride_kn, stride_vn, False,
                        USE_TMA)
        qk = tl.dot(q, k, input_precision=DOT_PRECISION)
        if SCALE_POSITIVE:                    # max(qk) * scale == max(qk * scale): one multiply-add per score
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_safe = _finite_max(m_new)
            p = tl.math.exp2(qk * qk_scale - m_safe[:, None])
        else:
            qk = qk * qk_scale
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_safe = _finite_max(m_new)
            p = tl.math.exp2(qk - m_safe[:, None])
        row_sum = tl.sum(p, 1)
        if PIECES == 1:
            tl.store(partial + piece * stride_pp, _log_sum(row_sum, m_new), mask=row_ok)
        else:                                 # two pieces: one masked sum; the second is the rest of the row's
            first = tl.sum(tl.where(offs_n[None, :] < 64, p, 0.0), 1)
            tl.store(partial + piece * stride_pp, _log_sum(first, m_new), mask=row_ok)
            rest = row_sum - first                    # rounding can leave it below 0; a NaN must stay (max drops it)
            tl.store(partial + (piece + 1) * stride_pp, _log_sum(tl.where(rest < 0.0, 0.0, rest), m_new), mask=row_ok)
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + row_sum
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    for t in range(0, num_solo):
        start = tl.load(SoloStart + t)
        col_ok = start + offs_n < tl.load(SoloEnd + t)
        k, v = _load_kv(k_ptrs, v_ptrs, desc_k, desc_v, start, col_ok, stride_kn, stride_vn, True, False)
        qk = tl.where(col_ok[None, :], tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = _finite_max(m_new)
        p = tl.math.exp2(qk - m_safe[:, None])
        row_sum = tl.sum(p, 1)
        tl.store(partial + tl.load(SoloPiece + t).to(tl.int64) * stride_pp, _log_sum(row_sum, m_new), mask=row_ok)
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + row_sum
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]                  # a row whose every score is -inf: 0 / 0, NaN as in dense attention
    tl.store(Out + b.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh + offs_m[:, None] * stride_om
             + offs_d[None, :], out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    lse = tl.where(l_i == 0.0, float("nan"), (m_i + tl.math.log2(l_i)) * 0.6931471805599453)   # natural log
    tl.store(Lse + b.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh + offs_m, lse, mask=row_ok)


@triton.jit(do_not_specialize=["head_offset", "program_offset", "row_start", "row_end"])
def piece_mass_fwd(Partial, Lse, Mass, Programs, PieceBlock,
                   stride_pb, stride_ph, stride_pp, stride_lb, stride_lh, stride_mb, stride_mh, stride_mi,
                   num_pieces, head_offset, program_offset, row_start, row_end,
                   BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
    """Add ``exp2(a - lse2)`` of one query tile's rows (inside one query block) into that block's masses.

    Only the tile's rows inside the chunk ``[row_start, row_end)`` whose partial sums ``Partial`` holds.
    """
    pid = program_offset + tl.program_id(0)
    chunk_head = tl.program_id(1)
    b = tl.program_id(2)
    head = head_offset + chunk_head
    q_start = tl.load(Programs + pid * 3)
    q_end = tl.load(Programs + pid * 3 + 1)
    q_block = tl.load(Programs + pid * 3 + 2)
    offs_r = q_start + tl.arange(0, BLOCK_R)
    row_ok = (offs_r >= row_start) & (offs_r < tl.minimum(q_end, row_end))
    lse = tl.load(Lse + b.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh + offs_r, mask=row_ok,
                  other=float("inf"))
    lse2 = tl.where((lse == float("-inf")) | (lse == float("inf")), float("inf"), lse * 1.4426950408889634)
    rows = Partial + b.to(tl.int64) * stride_pb + chunk_head.to(tl.int64) * stride_ph + (offs_r - row_start)[None, :]
    mass_row = Mass + b.to(tl.int64) * stride_mb + head.to(tl.int64) * stride_mh + q_block.to(tl.int64) * stride_mi
    for first in range(0, num_pieces, BLOCK_P):
        offs_p = first + tl.arange(0, BLOCK_P)
        piece_ok = offs_p < num_pieces
        a = tl.load(rows + offs_p.to(tl.int64)[:, None] * stride_pp, mask=piece_ok[:, None] & row_ok[None, :],
                    other=float("-inf"))
        sums = tl.sum(tl.math.exp2(a - lse2[None, :]), 1)
        tl.atomic_add(mass_row + tl.load(PieceBlock + offs_p, mask=piece_ok, other=0), sums, mask=piece_ok)
