"""Which CUDA lowering ``compile(..., device="cuda")`` prefers for a mask, from measurements on the H200.

Each lowering's rank for a mask comes from the table below, keyed by the mask's key-block
class; the registry then takes the highest-ranked lowering that is available here and takes
the mask, and ``compile`` falls back down the ranking for inputs a lowering refuses (dtype,
head dim). Measured (bf16, H=12, D=128, eff TFLOP/s; bench/results/cuda-*.md and shared/ANCHORS.md):

- 128-token blocks, S = 32K / 98K, d = 0.1-0.5: the ``fa4`` lowering 610-654 (= FA4's own call,
  608-668), FlashInfer fold-heads 505-552, Triton 457-492 (H200, 2026-11-30).
- 64-token blocks (AdaSpa), S = 98K-189K, d = 0.2: Triton 440, ``fa4`` on 64x64 tiles 397-409 (its
  128-row tiles over pairs of blocks turn most tiles into mask tiles: 170 and below), FlashInfer
  272 (H200, 2026-11-30); FlashInfer fails at 2,949 blocks x 12 heads (its ``max_rows``).
- 1560-token frame blocks (LVSA, S = 188,760, d = 0.17): ``fa4`` 557 (11% of its tiles masked),
  FlashInfer 506-529, Triton 411.
Files: bench/results/gpu-2026-11-30-runs/fa4-check.md, bench/results/cuda-2026-11-22.md.
"""

from __future__ import annotations

from sparsecore.ir import BlockMask

# key-block class -> lowering -> rank (higher is preferred)
RANKS = {
    "tile-aligned": {"fa4": 30, "flashinfer": 20, "triton": 10},   # uniform blocks, a multiple of 128 tokens
    "small": {"triton": 30, "fa4": 20, "flashinfer": 5},          # uniform blocks under 128 tokens
    "frames": {"fa4": 30, "flashinfer": 20, "triton": 10},        # uniform blocks not aligned to 128 (frames)
    "ragged": {"fa4": 30, "triton": 20, "flashinfer": 0},         # mixed sizes: FlashInfer cannot take them
}


def block_class(mask: BlockMask) -> str:
    block = mask.uniform_block_size("kv")
    if block is None:
        return "ragged"
    if block < 128:
        return "small"
    return "tile-aligned" if block % 128 == 0 else "frames"


def preference(backend: str, mask: BlockMask) -> int:
    return RANKS[block_class(mask)][backend]
