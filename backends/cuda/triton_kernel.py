"""Triton block-sparse FlashAttention forward over a :class:`~.tiling.TileSchedule`.

One program computes one query tile of one head: it loads the tile's queries once,
walks the key tiles listed for its row with the online softmax of FlashAttention-2
(Dao 2023, Algorithm 1; base-2 exponent as in Triton's fused-attention tutorial), and
writes the output and the natural-log LSE. Full key tiles run without a mask; partial
tiles (a run's end that is not a tile edge) mask their extra columns to -inf. A row
with no tiles writes output 0 and LSE -inf.

Notation: M = query tile rows (BLOCK_M), N = key tile columns (BLOCK_N), D = head dim.
With ``USE_TMA`` the key/value (and query) tiles come through host-built tensor
descriptors (Hopper TMA); otherwise through pointer arithmetic. Both give the same
result; a tile that runs past its run reads neighbouring tokens (or TMA's zero fill
past the tensor end) whose scores are masked and whose values are replaced by 0 (a
non-finite value there would otherwise reach the row through its zero weight).
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # the host multiplies the softmax scale by this: scores are kept in log2 units


@triton.jit
def _finite_max(m_new):
    """The running maximum to shift by: 0 while a row's scores so far are all -inf (a key with a -inf component, or
    nothing seen yet), whose weights are then exp2(-inf) = 0, not exp2(-inf - -inf) = NaN."""
    return tl.where(m_new == float("-inf"), 0.0, m_new)


@triton.jit
def _attend_tile(q, k, v, acc, l_i, m_i, qk_scale, col_ok,
                 MASKED: tl.constexpr, SCALE_POSITIVE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One online-softmax step over a key tile; k is [D, N], v is [N, D]; m_i is in log2 units. While a row's
    maximum is -inf (every score so far -inf: a key with a -inf component) its weights are 0, not exp2(-inf - -inf)."""
    qk = tl.dot(q, k, input_precision=DOT_PRECISION)
    if MASKED or not SCALE_POSITIVE:
        qk = qk * qk_scale
        if MASKED:
            qk = tl.where(col_ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = _finite_max(m_new)
        p = tl.math.exp2(qk - m_safe[:, None])
    else:  # max(qk) * scale == max(qk * scale): fold the scale into one multiply-add
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_safe = _finite_max(m_new)
        p = tl.math.exp2(qk * qk_scale - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _load_kv(k_ptrs, v_ptrs, desc_k, desc_v, row, col_ok, stride_kn, stride_vn,
             MASKED: tl.constexpr, USE_TMA: tl.constexpr):
    """Key tile as [D, N] and value tile as [N, D], starting at key row ``row``."""
    if USE_TMA:
        k = desc_k.load([row, 0]).T
        v = desc_v.load([row, 0])
        if MASKED:  # past the run: the scores become -inf, but weight 0 * a NaN or inf value there is NaN
            v = tl.where(col_ok[:, None], v, 0.0)
    elif MASKED:
        k = tl.load(k_ptrs + row * stride_kn, mask=col_ok[None, :], other=0.0)
        v = tl.load(v_ptrs + row * stride_vn, mask=col_ok[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs + row * stride_kn)
        v = tl.load(v_ptrs + row * stride_vn)
    return k, v


@triton.jit
def block_sparse_attention_fwd(
        Q, K, V, Out, Lse, desc_q, desc_k, desc_v,
        Programs, FullStart, PartialStart, PartialEnd,
        stride_qb, stride_qh, stride_qm,
        stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn,
        stride_ob, stride_oh, stride_om,
        stride_lb, stride_lh,
        num_heads, num_kv_heads, q_len, kv_len, qk_scale,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        WRITE_LSE: tl.constexpr, USE_TMA: tl.constexpr, SCALE_POSITIVE: tl.constexpr,
        DOT_PRECISION: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, FULL_IN_BLOCKS: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    program = Programs + pid * 7  # fields: tiling.PROGRAM_FIELDS
    head = tl.load(program)
    q_start = tl.load(program + 1)
    q_end = tl.load(program + 2)
    full_first = tl.load(program + 3)
    num_full = tl.load(program + 4)
    partial_first = tl.load(program + 5)
    num_partial = tl.load(program + 6)
    kv_head = head // GROUP

    offs_m = q_start + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < q_end
    if USE_TMA:
        q = desc_q.load([(b * num_heads + head) * q_len + q_start, 0])
        kv_row0 = (b * num_kv_heads + kv_head) * kv_len
    else:
        q_ptrs = Q + b.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
        q = tl.load(q_ptrs + offs_m[:, None] * stride_qm + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        kv_row0 = 0
    k_ptrs = K + b.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh + offs_n[None, :] * stride_kn \
        + offs_d[:, None]
    v_ptrs = V + b.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh + offs_n[:, None] * stride_vn \
        + offs_d[None, :]

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    col_all = offs_n < BLOCK_N
    for t in tl.range(full_first, full_first + num_full, warp_specialize=WARP_SPECIALIZE):
        start = tl.load(FullStart + t)
        if FULL_IN_BLOCKS:                                   # key block ids of blocks that are the tiles
            start = start * BLOCK_N
        k, v = _load_kv(k_ptrs, v_ptrs, desc_k, desc_v, kv_row0 + start, col_all, stride_kn, stride_vn,
                        False, USE_TMA)
        acc, l_i, m_i = _attend_tile(q, k, v, acc, l_i, m_i, qk_scale, col_all, False, SCALE_POSITIVE,
                                     DOT_PRECISION)
    for t in range(partial_first, partial_first + num_partial):
        start = tl.load(PartialStart + t)
        col_ok = start + offs_n < tl.load(PartialEnd + t)
        k, v = _load_kv(k_ptrs, v_ptrs, desc_k, desc_v, kv_row0 + start, col_ok, stride_kn, stride_vn,
                        True, USE_TMA)
        acc, l_i, m_i = _attend_tile(q, k, v, acc, l_i, m_i, qk_scale, col_ok, True, SCALE_POSITIVE,
                                     DOT_PRECISION)

    # a row with keys (a NaN sum spreads, as in dense); one whose every score is -inf (a -inf key component) has sum
    # 0, and as in dense attention (inf - inf in its shift) its output and LSE are NaN
    has_keys = num_full + num_partial > 0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    o_ptrs = Out + b.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
    tl.store(o_ptrs + offs_m[:, None] * stride_om + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=row_ok[:, None])
    if WRITE_LSE:
        lse = (m_i + tl.math.log2(tl.where(has_keys, l_i, 1.0))) * 0.6931471805599453                      # * ln 2
        lse = tl.where(has_keys, tl.where(l_i == 0.0, float("nan"), lse), float("-inf"))
        tl.store(Lse + b.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh + offs_m, lse, mask=row_ok)
