"""Which CUDA lowering ``compile(..., device="cuda")`` prefers, per shape class, from measurements.

H100, bf16, H=12, D=128 (bench/results/cuda-2026-11-22.md): on every mask FlashInfer
can take (uniform blocks, key length a multiple of the block) its fa3 kernel with
folded heads was faster than our Triton kernel: 128-token blocks at densities 0.1-0.5,
and LVSA's 1560-token frame blocks. So FlashInfer is preferred wherever its
capabilities hold, and Triton, which takes every mask, covers the rest (ragged or
mixed block sizes, text segments, short last key block, fp32, head dims 16/32).
"""

from __future__ import annotations

from sparsecore.ir import BlockMask


def triton_preference(mask: BlockMask) -> int:
    return 10


def flashinfer_preference(mask: BlockMask) -> int:
    return 20
