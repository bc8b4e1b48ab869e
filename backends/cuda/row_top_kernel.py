"""Triton kernel for the planners' row-wise top-k (PASA's selection; :class:`sparsecore.registry.RowTopOp`).

One program per (row, head) holds its row of scores in registers, adds the row's Gumbel noise
from its counters (:class:`sparsecore.noise.GumbelNoise`: the same 32-bit hash as the torch path,
then Triton's float32 ``log``, which may round differently from torch's in the last bit), finds
the ``k``-th largest value exactly by bisection over an order-preserving int32 image of the
floats (32 counting rounds), and writes
the ids of the kept columns in ascending order through a prefix sum: entries above the
``k``-th value, then the lowest-id entries equal to it until ``k`` are kept. Scores, noise
and ranks never leave the program; nothing is sorted.
"""

import triton
import triton.language as tl

from sparsecore.noise import LOWBIAS_1, LOWBIAS_2

_LOWBIAS_1 = tl.constexpr(LOWBIAS_1)
_LOWBIAS_2 = tl.constexpr(LOWBIAS_2)


@triton.jit
def _lowbias32(x):
    """Chris Wellons' lowbias32 on int32 (wrapping products; logical shifts as masked arithmetic shifts)."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _LOWBIAS_1
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * _LOWBIAS_2
    return x ^ ((x >> 16) & 0xFFFF)


@triton.jit
def row_top_kernel(Scores, Keys, Out, cols, k, neg_noise_scale,
                   stride_sh, stride_sr, stride_sc, stride_oh, stride_or,
                   HAS_NOISE: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    h = tl.program_id(1)
    c = tl.arange(0, BLOCK)
    valid = c < cols
    s = tl.load(Scores + h.to(tl.int64) * stride_sh + r.to(tl.int64) * stride_sr + c * stride_sc, mask=valid,
                other=0.0)
    if HAS_NOISE:
        bits = _lowbias32((r * cols + c) ^ tl.load(Keys + h))
        uniform = (((bits >> 9) & 0x7FFFFF).to(tl.float32) + 0.5) * 1.1920928955078125e-07      # 2 ** -23
        s = s + tl.log(-tl.log(uniform)) * neg_noise_scale
    s = tl.where(s == s, s + 0.0, float("nan"))       # -0.0 as +0.0 (equal scores: lowest id), one NaN for all
    raw = s.to(tl.int32, bitcast=True)
    key = raw ^ ((raw >> 31) & 0x7FFFFFFF)              # signed order of ``key`` = float order of ``s``
    lo = tl.full([], -2147483648, tl.int64)            # count(key >= lo) >= k; count(key > hi) < k
    hi = tl.full([], 2147483647, tl.int64)
    for _ in range(32):
        mid = lo + (hi - lo + 1) // 2
        count = tl.sum((valid & (key >= mid.to(tl.int32))).to(tl.int32), axis=0)
        lo = tl.where(count >= k, mid, lo)
        hi = tl.where(count >= k, hi, mid - 1)
    threshold = lo.to(tl.int32)                         # the k-th largest key
    above = valid & (key > threshold)
    ties = valid & (key == threshold)
    room = k - tl.sum(above.to(tl.int32), axis=0)
    kept = above | (ties & (tl.cumsum(ties.to(tl.int32), axis=0) <= room))
    slot = tl.cumsum(kept.to(tl.int32), axis=0) - 1
    tl.store(Out + h.to(tl.int64) * stride_oh + r.to(tl.int64) * stride_or + slot, c, mask=kept)
