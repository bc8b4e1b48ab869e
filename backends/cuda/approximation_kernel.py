"""Triton pass over block summaries: the approximation of the key blocks a row does not list, merged in place.

Runs after the exact block-sparse kernel (:mod:`.triton_kernel`), which leaves each row's
output and natural-log LSE over its listed blocks in ``Out`` / ``Lse``. One program takes
``BLOCK_M`` query rows of one head and batch element and walks every key block's summary
(``k̄_j``, ``ΣV_j``, ``|B_j|``) in tiles of ``BLOCK_N`` blocks, group by group (a group is
``group_blocks`` consecutive blocks: all of them for the global kind, one group of the
whole sequence for ``"zeroth"``). Listed blocks are masked out per row from the block map
(``uint8 [H, MB, NB]``, each row reading its own query block's line).

Online softmax in base 2, as the exact kernel: ``m`` the running max of ``s q·k̄_j``,
``z = Σ |B_j| 2^(score - m)``, ``acc = Σ 2^(score - m) ΣV_j + first-order terms``; every
quantity (also each group's running weight ``c``) is rescaled when ``m`` grows. At a
group's end the first-order term ``s c (q H_g / T_g)`` joins ``acc``. Finally the rows
merge with the exact part by log-sum-exp and overwrite ``Out`` / ``Lse``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def approximate_unselected_fwd(
        Q, Out, Lse, KeyMeans, ValueSums, Sizes, GroupMatrices, Listed, QBlock,
        stride_qb, stride_qh, stride_qm,
        stride_ob, stride_oh, stride_om,
        stride_lb, stride_lh,
        num_heads, num_kv_heads, q_len, num_q_blocks, num_kv_blocks, group_blocks, num_groups, scale,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        FIRST_ORDER: tl.constexpr, DOT_PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    head = tl.program_id(1)
    b = tl.program_id(2)
    kv_head = head // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < q_len
    q_ptrs = Q + b.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh + offs_m[:, None] * stride_qm \
        + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0).to(tl.float32)
    q_block = tl.load(QBlock + offs_m, mask=row_ok, other=0)
    listed_rows = Listed + (head.to(tl.int64) * num_q_blocks + q_block.to(tl.int64)) * num_kv_blocks
    stats = (b.to(tl.int64) * num_kv_heads + kv_head) * num_kv_blocks      # first block of this key head
    qk_scale = scale * 1.4426950408889634

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    z_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for g in range(0, num_groups):
        start = g * group_blocks
        end = tl.minimum(start + group_blocks, num_kv_blocks)
        c_i = tl.zeros([BLOCK_M], tl.float32)                               # this group's weight, in 2^m units
        for j0 in range(start, end, BLOCK_N):
            offs_n = j0 + tl.arange(0, BLOCK_N)
            col_ok = offs_n < end
            means = tl.load(KeyMeans + (stats + offs_n)[None, :] * HEAD_DIM + offs_d[:, None], mask=col_ok[None, :],
                            other=0.0)                                      # [D, N]
            listed = tl.load(listed_rows[:, None] + offs_n[None, :], mask=row_ok[:, None] & col_ok[None, :],
                             other=1)
            score = tl.dot(q, means, input_precision=DOT_PRECISION) * qk_scale
            score = tl.where((listed == 0) & col_ok[None, :], score, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(score, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.math.exp2(m_i - m_safe)                              # 0 while nothing was seen
            p = tl.math.exp2(score - m_safe[:, None])                       # 0 on listed blocks
            sizes = tl.load(Sizes + offs_n, mask=col_ok, other=0.0)
            mass = tl.sum(p * sizes[None, :], 1)
            z_i = z_i * alpha + mass
            c_i = c_i * alpha + mass
            sums = tl.load(ValueSums + (stats + offs_n)[:, None] * HEAD_DIM + offs_d[None, :], mask=col_ok[:, None],
                           other=0.0)                                       # [N, D]
            acc = tl.dot(p, sums, acc * alpha[:, None], input_precision=DOT_PRECISION)
            m_i = m_new
        if FIRST_ORDER:
            matrix = tl.load(GroupMatrices + ((b.to(tl.int64) * num_kv_heads + kv_head) * num_groups + g)
                             * HEAD_DIM * HEAD_DIM + offs_d[:, None] * HEAD_DIM + offs_d[None, :])   # H_g / T_g
            acc += (scale * c_i)[:, None] * tl.dot(q, matrix, input_precision=DOT_PRECISION)

    # merge with the exact part: total = 2^lse2 + z 2^m, numerator = 2^lse2 out + 2^m acc (base-2 units)
    o_ptrs = Out + b.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh + offs_m[:, None] * stride_om \
        + offs_d[None, :]
    l_ptrs = Lse + b.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh + offs_m
    exact_lse = tl.load(l_ptrs, mask=row_ok, other=float("-inf")) * 1.4426950408889634
    exact_out = tl.load(o_ptrs, mask=row_ok[:, None], other=0.0).to(tl.float32)
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    approx_lse = tl.where(z_i > 0.0, m_safe + tl.math.log2(tl.where(z_i > 0.0, z_i, 1.0)), float("-inf"))
    base = tl.maximum(exact_lse, approx_lse)
    base = tl.where(base == float("-inf"), 0.0, base)
    exact_weight = tl.math.exp2(exact_lse - base)
    approx_weight = tl.where(z_i > 0.0, tl.math.exp2(m_safe - base), 0.0)
    total = exact_weight + approx_weight * z_i
    has_mass = total > 0.0
    numerator = tl.where(exact_lse[:, None] == float("-inf"), 0.0, exact_weight[:, None] * exact_out) \
        + approx_weight[:, None] * acc
    out = numerator / tl.where(has_mass, total, 1.0)[:, None]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    lse = tl.where(has_mass, (base + tl.math.log2(tl.where(has_mass, total, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    tl.store(l_ptrs, lse, mask=row_ok)
