"""Triton kernel for the block statistics of the approximation of unlisted key blocks: one read of k and v.

For each key block ``j`` (arbitrary boundaries ``KvOffsets``) of one key head and batch
element: the mean key ``k̄_j`` and the mean value ``v̄_j = ΣV_j / |B_j|`` (summed from values divided by the
block's size first, so that it stays finite wherever the values are: 64 values of 1e37 sum past float32's range);
for first-order kinds also the block's share of its group matrix, ``Σ_{t in B_j} (k_t - k̄_j)ᵀ v_t`` (the
definition in :mod:`sparsecore.ir.unselected`), in the same walk as ``Σ k_tᵀ v_t - (Σ k_t)ᵀ v̄_j``:
``[D x T] x [T x D]`` products of the key and value tiles as loaded (16-bit products are exact in the float32
accumulator), then the block's outer product subtracted in float32. The cancellation costs about
``log2(|k̄| / spread)`` bits of float32's 24: far below bf16's rounding of the matrices, but visible where they stay
float32 (fp16 and float32 inputs): relative errors about 1e-6 / 1e-5 / 1e-4 at key means 6 / 60 / 600 times their
spread, against about 1e-7 for centred keys (a review's CPU check). At Wan 6x with PASA's groups (bf16, H200,
2026-12-01) this walk takes 1.64 ms where a second walk over centred keys took 2.78, and its matrices are as close to
float64's (1.67e-3 against 1.72e-3, with keys sharing a mean three times their spread).

One program takes a *piece*: at most ``piece_blocks`` consecutive blocks inside one group
(``pieces_per_group`` pieces per group, the last group's surplus pieces empty), and writes
its partial matrix; the host sums the pieces of a group and divides by its tokens. Means go
out in ``MeansHigh``'s dtype, as ``hi + lo`` when ``SPLIT_MEANS`` (16-bit operands: the mean
enters the exponent, and two terms carry it to about 2^-16 in bf16), value means in ``ValueMeans``'.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def block_statistics_fwd(
        K, V, KvOffsets, MeansHigh, MeansLow, ValueMeans, Partials,
        stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
        num_kv_heads, num_kv_blocks, group_blocks, pieces_per_group, piece_blocks,
        HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, FIRST_ORDER: tl.constexpr, SPLIT_MEANS: tl.constexpr,
        DOT_PRECISION: tl.constexpr):
    piece = tl.program_id(0)
    kv_head = tl.program_id(1)
    b = tl.program_id(2)
    group = piece // pieces_per_group
    group_end = tl.minimum((group + 1) * group_blocks, num_kv_blocks)
    first = group * group_blocks + (piece % pieces_per_group) * piece_blocks
    last = tl.minimum(first + piece_blocks, group_end)
    k_base = K + b.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    stats = (b.to(tl.int64) * num_kv_heads + kv_head) * num_kv_blocks      # this key head's first block
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, HEAD_DIM)
    means_type = MeansHigh.dtype.element_ty

    matrix = tl.zeros([HEAD_DIM, HEAD_DIM], tl.float32)
    for j in range(first, last):
        start = tl.load(KvOffsets + j)
        end = tl.load(KvOffsets + j + 1)
        inverse_size = 1.0 / (end - start).to(tl.float32)
        key_sum = tl.zeros([HEAD_DIM], tl.float32)
        value_mean = tl.zeros([HEAD_DIM], tl.float32)
        for t0 in range(start, end, BLOCK_T):
            rows = t0 + offs_t
            ok = rows < end
            keys = tl.load(k_base + rows[:, None] * stride_kt + offs_d[None, :], mask=ok[:, None], other=0.0)
            values = tl.load(v_base + rows[:, None] * stride_vt + offs_d[None, :], mask=ok[:, None], other=0.0)
            key_sum += tl.sum(keys.to(tl.float32), 0)
            value_mean += tl.sum(values.to(tl.float32) * inverse_size, 0)
            if FIRST_ORDER:                  # Σ k_tᵀ v_t on the inputs' own operands, float32 accumulation
                matrix = tl.dot(tl.trans(keys), values, matrix, input_precision=DOT_PRECISION)
        mean = key_sum / (end - start).to(tl.float32)
        high = mean.to(means_type)
        tl.store(MeansHigh + (stats + j) * HEAD_DIM + offs_d, high)
        if SPLIT_MEANS:
            tl.store(MeansLow + (stats + j) * HEAD_DIM + offs_d, (mean - high.to(tl.float32)).to(means_type))
        tl.store(ValueMeans + (stats + j) * HEAD_DIM + offs_d, value_mean.to(ValueMeans.dtype.element_ty))
        if FIRST_ORDER:                      # centred: Σ (k_t - k̄_j)ᵀ v_t = Σ k_tᵀ v_t - (Σ k_t)ᵀ v̄_j
            matrix -= key_sum[:, None] * value_mean[None, :]
    if FIRST_ORDER:
        slot = (b.to(tl.int64) * num_kv_heads + kv_head) * tl.num_programs(0) + piece
        tl.store(Partials + slot * HEAD_DIM * HEAD_DIM + offs_d[:, None] * HEAD_DIM + offs_d[None, :], matrix)
