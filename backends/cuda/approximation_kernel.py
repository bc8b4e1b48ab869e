"""Triton pass over block summaries: the approximation of the key blocks a row does not list, merged in place.

Runs after the exact block-sparse kernel (:mod:`.triton_kernel`), which leaves each row's
output and natural-log LSE over its listed blocks in ``Out`` / ``Lse``. One program takes
``BLOCK_M`` query rows of one head and batch element and walks every key block's summary
(``k̄_j``, ``v̄_j = ΣV_j / |B_j|``, ``|B_j|``) in tiles of ``BLOCK_N`` blocks (a group is ``group_blocks``
consecutive blocks: all of them for the global kind, one group of the whole sequence for
``"zeroth"``). When a tile holds whole groups (``GROUPS_PER_TILE`` of them: PASA's 32-block
groups in 32-block tiles) the walk is one flat loop, each tile adding its groups' first-order
terms; otherwise it goes group by group. Listed blocks are masked out per row from the block
map packed in bits (``int32 [H, MB, ceil(NB / 32)]``, :func:`sparsecore.ir.csr.to_block_bits`; each
row reads its own query block's line). When no tile crosses a 32-block word (``WORD_TILES``: tiles
of at most 32 blocks starting at multiples of their width, PASA's case) a row reads one word a tile:
at Wan 6x this took the grouped pass from 60.5 to 27.2 ms against a byte per block (H200, 2026-11-30).

Online softmax in base 2, as the exact kernel: ``m`` the running max of ``s q·k̄_j``,
``z = Σ |B_j| 2^(score - m)``, ``acc = Σ |B_j| 2^(score - m) v̄_j + first-order terms`` (means, not sums:
a listed block's weight is 0, and 0 times a sum past float32's range was NaN); every
quantity (also each group's running weight ``c``) is rescaled when ``m`` grows. Once a
group's weight ``c`` is complete, its first-order term ``s c (q H_g / T_g)`` joins ``acc``, selected,
not multiplied, by whether the row approximates a block of the group: ``c`` is 0 where it lists them
all, and ``H_g`` NaN where a key of the group is infinite (a row that lists the group stays finite).
Finally the rows merge with the exact part by log-sum-exp and overwrite ``Out`` / ``Lse``.

Operands (:mod:`.approximation_launch` picks them per input dtype): the key means have one dtype,
the value means and group matrices another; q is converted to each. For bf16 inputs all are
bf16, for fp16 the key means fp16 and the rest float32 (TF32 products: fp16's range a group
matrix may exceed, and the value means share its dtype); 16-bit key means go as ``hi + lo``
(``SPLIT_MEANS``: the mean enters the exponent, and two products carry it to about 2^-16 in
bf16). float32 inputs: all float32 (IEEE). Products accumulate in float32.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_kernel import _finite_max


@triton.jit
def _summary_tile(q, m_i, acc, listed_rows, row_ok, j0, offs_n, col_ok, offs_d, stats, qk_scale,
                  MeansHigh, MeansLow, ValueMeans, Sizes,
                  HEAD_DIM: tl.constexpr, SPLIT_MEANS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  WORD_TILES: tl.constexpr):
    """One tile of block summaries: the new running max, the rescale ``alpha``, each unlisted block's weight
    ``|B_j| 2^(score - m)`` (0 on listed blocks), ``acc`` rescaled plus their products with ``v̄_j``, and which of the
    tile's blocks each row approximates (a weight of 0 does not say: an unlisted block's may underflow)."""
    at = (stats + offs_n)[:, None] * HEAD_DIM + offs_d[None, :]                  # [N, D]
    score = tl.dot(q, tl.trans(tl.load(MeansHigh + at, mask=col_ok[:, None], other=0.0)),
                   input_precision=DOT_PRECISION)
    if SPLIT_MEANS:
        score = tl.dot(q, tl.trans(tl.load(MeansLow + at, mask=col_ok[:, None], other=0.0)), score)
    if WORD_TILES:                        # the tile's blocks share one word of the row's bits: one load a row
        word = tl.load(listed_rows + j0 // 32, mask=row_ok, other=-1)[:, None]
    else:
        word = tl.load(listed_rows[:, None] + (offs_n // 32)[None, :], mask=row_ok[:, None] & col_ok[None, :],
                       other=-1)
    approximated = (((word >> (offs_n % 32)[None, :]) & 1) == 0) & col_ok[None, :]
    score = tl.where(approximated, score * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(score, 1))
    m_safe = _finite_max(m_new)
    alpha = tl.math.exp2(m_i - m_safe)                                          # 0 while nothing was seen
    p = tl.math.exp2(score - m_safe[:, None])                                   # 0 on listed blocks
    weights = p * tl.load(Sizes + offs_n, mask=col_ok, other=0.0)[None, :]
    value_means = tl.load(ValueMeans + at, mask=col_ok[:, None], other=0.0)
    acc = tl.dot(weights.to(value_means.dtype), value_means, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return m_new, alpha, weights, acc, approximated


@triton.jit
def approximate_unselected_fwd(
        Q, Out, Lse, MeansHigh, MeansLow, ValueMeans, Sizes, GroupMatrices, Listed, QBlock,
        stride_qb, stride_qh, stride_qm,
        stride_ob, stride_oh, stride_om,
        stride_lb, stride_lh,
        num_heads, num_kv_heads, q_len, num_q_blocks, num_kv_blocks, group_blocks, num_groups, scale,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        FIRST_ORDER: tl.constexpr, GROUPS_PER_TILE: tl.constexpr, SPLIT_MEANS: tl.constexpr,
        DOT_PRECISION: tl.constexpr, WORD_TILES: tl.constexpr):
    pid_m = tl.program_id(0)
    head = tl.program_id(1)
    b = tl.program_id(2)
    kv_head = head // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < q_len
    q_ptrs = Q + b.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh + offs_m[:, None] * stride_qm \
        + offs_d[None, :]
    q_in = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    q = q_in.to(MeansHigh.dtype.element_ty)                                 # the operand dtype of the means
    q_block = tl.load(QBlock + offs_m, mask=row_ok, other=0)
    listed_rows = Listed + (head.to(tl.int64) * num_q_blocks + q_block.to(tl.int64)) * ((num_kv_blocks + 31) // 32)
    stats = (b.to(tl.int64) * num_kv_heads + kv_head) * num_kv_blocks      # first block of this key head
    first_group = (b.to(tl.int64) * num_kv_heads + kv_head) * num_groups   # this key head's first H_g / T_g
    square = offs_d[:, None] * HEAD_DIM + offs_d[None, :]
    qk_scale = scale * 1.4426950408889634

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    z_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if GROUPS_PER_TILE > 0:              # each tile holds whole groups: one flat (pipelined) loop
        for j0 in range(0, num_kv_blocks, BLOCK_N):
            offs_n = j0 + tl.arange(0, BLOCK_N)
            m_new, alpha, weights, acc, approximated = _summary_tile(
                q, m_i, acc, listed_rows, row_ok, j0, offs_n, offs_n < num_kv_blocks, offs_d, stats, qk_scale,
                MeansHigh, MeansLow, ValueMeans, Sizes, HEAD_DIM, SPLIT_MEANS, DOT_PRECISION, WORD_TILES)
            z_i = z_i * alpha + tl.sum(weights, 1)
            member = tl.arange(0, BLOCK_N) // (BLOCK_N // GROUPS_PER_TILE)      # each column's group in the tile
            for gi in tl.static_range(GROUPS_PER_TILE):
                g = j0 // (BLOCK_N // GROUPS_PER_TILE) + gi
                c = tl.sum(tl.where(member[None, :] == gi, weights, 0.0), 1)
                used = tl.max(tl.where((member[None, :] == gi) & approximated, 1, 0), 1) > 0
                matrix = tl.load(GroupMatrices + (first_group + g) * HEAD_DIM * HEAD_DIM + square, mask=g < num_groups,
                                 other=0.0)
                term = (scale * c)[:, None] * tl.dot(q_in.to(matrix.dtype), matrix, input_precision=DOT_PRECISION)
                acc += tl.where(used[:, None], term, 0.0)
            m_i = m_new
    else:                                # walk group by group; a group's weight ``c`` rescales with the max
        for g in range(0, num_groups):
            start = g * group_blocks
            end = tl.minimum(start + group_blocks, num_kv_blocks)
            c_i = tl.zeros([BLOCK_M], tl.float32)
            used = tl.zeros([BLOCK_M], tl.int32)             # whether the row approximates a block of the group
            for j0 in range(start, end, BLOCK_N):
                offs_n = j0 + tl.arange(0, BLOCK_N)
                m_new, alpha, weights, acc, approximated = _summary_tile(
                    q, m_i, acc, listed_rows, row_ok, j0, offs_n, offs_n < end, offs_d, stats, qk_scale,
                    MeansHigh, MeansLow, ValueMeans, Sizes, HEAD_DIM, SPLIT_MEANS, DOT_PRECISION, WORD_TILES)
                mass = tl.sum(weights, 1)
                z_i = z_i * alpha + mass
                c_i = c_i * alpha + mass
                if FIRST_ORDER:
                    used = tl.maximum(used, tl.max(tl.where(approximated, 1, 0), 1))
                m_i = m_new
            if FIRST_ORDER:
                matrix = tl.load(GroupMatrices + (first_group + g) * HEAD_DIM * HEAD_DIM + square)
                term = (scale * c_i)[:, None] * tl.dot(q_in.to(matrix.dtype), matrix, input_precision=DOT_PRECISION)
                acc += tl.where(used[:, None] > 0, term, 0.0)

    # merge with the exact part: total = 2^lse2 + z 2^m, numerator = 2^lse2 out + 2^m acc (base-2 units)
    o_ptrs = Out + b.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh + offs_m[:, None] * stride_om \
        + offs_d[None, :]
    l_ptrs = Lse + b.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh + offs_m
    exact_lse = tl.load(l_ptrs, mask=row_ok, other=float("-inf")) * 1.4426950408889634
    exact_out = tl.load(o_ptrs, mask=row_ok[:, None], other=0.0).to(tl.float32)
    m_safe = _finite_max(m_i)
    approx_lse = tl.where(z_i != 0.0, m_safe + tl.math.log2(tl.where(z_i != 0.0, z_i, 1.0)), float("-inf"))
    base = tl.maximum(exact_lse, approx_lse)
    base = tl.where(base == float("-inf"), 0.0, base)
    exact_weight = tl.math.exp2(exact_lse - base)
    approx_weight = tl.where(z_i != 0.0, tl.math.exp2(m_safe - base), 0.0)
    total = exact_weight + approx_weight * z_i
    has_mass = total != 0.0                      # a NaN total (a NaN score, exact or approximated) spreads
    numerator = tl.where(exact_lse[:, None] == float("-inf"), 0.0, exact_weight[:, None] * exact_out) \
        + tl.where(z_i[:, None] != 0.0, approx_weight[:, None] * acc, 0.0)    # z = 0: nothing approximated
    out = numerator / tl.where(has_mass, total, 1.0)[:, None]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    lse = tl.where(has_mass, (base + tl.math.log2(tl.where(has_mass, total, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    tl.store(l_ptrs, lse, mask=row_ok)
