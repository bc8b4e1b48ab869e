"""Which CUDA lowering ``compile(..., device="cuda")`` prefers for a mask, from measurements on the H200.

Each lowering's rank for a mask comes from the table below, keyed by the mask's key-block
class; the registry then takes the highest-ranked lowering that is available here and takes
the mask, and ``compile`` falls back down the ranking for inputs a lowering refuses (dtype,
head dim). Measured (bf16, H=12, D=128, eff TFLOP/s; bench/results/cuda-*.md and shared/ANCHORS.md):

- 128-token blocks, S = 32K / 98K, d = 0.1-0.5: the ``fa4`` lowering 610-654 (= FA4's own call,
  608-668), FlashInfer fold-heads 505-552, Triton 457-492 (H200, 2026-11-30). Per point of the
  selection sweep (d = 0.1 / 0.25, D = 64 / 128): fa4 1.3-1.7x faster than Triton everywhere.
- 64-token blocks (AdaSpa): FA4 runs them on 64 x 64 tiles (its key tile must equal the key block
  on SM90), one MMA warpgroup a CTA, which the ``fa4`` lowering launches two to an SM
  (:mod:`.fa4_occupancy`). Then fa4 is faster than Triton at all 8 points of the sweep (H200,
  2026-12-01): by 7-8% at D = 64 and 11-22% at D = 128 (S = 32K / 98K, d = 0.1 / 0.25); at 6x
  (188,736 tokens) 1.01-1.19x on uniform masks and 1.07-1.16x on the AdaSpa-shaped one, in runs up
  to 18% apart. At FA4's own one CTA per SM, Triton had been faster at 6 of 8 points (2026-11-30).
  FlashInfer 272 eff TFLOP/s against Triton's 440 and fails at 2,949 blocks x 12 heads (its
  ``max_rows``). Masks that approximate unlisted blocks (PASA's) run FA4's exact part with Triton's
  approximation pass merged in: on PASA's own masks at 6x, compiled and converted at each call as PASA
  runs them, 100.2 ms against Triton's 107.0 (H200, 2026-12-01, eighth session; the exact parts alone
  64.1 against 75.1).
- 1560-token frame blocks: on LVSA's frame mask at 6x (188,760 tokens, d = 0.17) fa4 runs at
  616 eff TFLOP/s (61.6 ms, keys gathered onto its tiles, 2% of its tiles masked; 551-557 in their own
  order, 10% masked; 2026-12-01), FlashInfer 506-529, Triton 411. On random
  frame rows fa4 wins at D = 64 (by 18-38%) and ties Triton at D = 128 (within 5% either way).
- Mixed sizes (text blocks, ragged): fa4 (exact through its mask tiles), else Triton. A mask whose
  first and last blocks are short (a ring shard's slice) is classed by its interior size, so a ring
  step of AdaSpa's mask has a 64-token interior; a mask whose blocks are all under 128 tokens is small
  whatever their sizes, so Triton's tiles are 64 wide for it. Of those, masks of 64-token blocks (a
  shorter last one allowed: Wan's 188,760 tokens) rank fa4 first, as measured; the others rank Triton
  first: a joint video + text mask of 64-token blocks, whose short last video block sits inside, a
  ring shard, uniform blocks of 16 or 32 tokens. fa4 takes those exactly through mask tiles
  (``bench/fa4_check.py`` on the H200) but was not timed against Triton on them at two CTAs per SM,
  except the joint ones: on the masks AdaSpa plans for HunyuanVideo 1.5 and CogVideoX 1.5 at 2x
  (``bench/method_mask_probe.py --model``, H200, 2026-12-02) a kernel compiled once runs faster on fa4
  (40.5 against Triton's 48.3-48.8 ms at D = 128, 16 heads; 46.4 against 47.9-49.3 at D = 64, 48
  heads), but AdaSpa's reuse steps compile each layer's held mask at every call, and there fa4's
  conversion of masks off its tile grid (then a tile map of every head) cost more than it saved: whole
  reuse steps (``bench/e2e_benchmark.py``, eager) 6.11 s on fa4 against 5.43 on Triton (HunyuanVideo
  1.5), 7.90 against 5.10 and 1.3 GiB above the peak (CogVideoX 1.5). With the conversion's Triton
  classification and its geometry tables kept (2026-12-04, five calls): 5.17-5.20 s on fa4 (5.74
  once) against 5.34-5.42 (HunyuanVideo 1.5, D = 128, 16 heads: fa4 3-4% faster), 5.49-7.41 against
  4.96-5.06 (CogVideoX 1.5, D = 64, 48 heads), peaks equal. That spread was the handle's statistics
  counting each held mask's pairs on the host at every layer (85 ms a layer on CogVideoX's mask), while
  fa4's conversion had made the host wait for the GPU; counted on the call's device copy since (same
  day, one call): 5.36 against 5.43 s (HunyuanVideo 1.5) and 5.14 against 4.99 s (CogVideoX 1.5).
  Within 3% either way, and the rank is the block class's, which cannot tell the two apart (head dim
  and count come with the call), so Triton stays first for joint masks. PASA's approximating masks,
  converted at each call too: Triton 55.2 against fa4's 74.4 ms, 59.3-59.6 against 86.0-89.5. Frame-causal
  masks (64-token blocks and a 24-token one in every causal block: SkyReels-V2 DF at 544x960) too: whole eager
  steps at 2x (102,000 tokens, ``bench/e2e_benchmark.py --backend fa4`` against the default, H200, 2026-12-03)
  AdaSpa's reuse 1.57 s on Triton against 2.28 on fa4, PASA's sparse step 1.66 against 2.54.
Files: bench/results/gpu-2026-11-30-runs/ (fa4-check.md, selection-2026-11-30.md),
bench/results/gpu-2026-12-04-runs/twenty-ninth-session/ (b-e2e-joint, c-geometry-cache), thirtieth-session/ and
thirty-first-session/,
bench/results/gpu-2026-12-01-runs/seventh-session/fa4-check.md,
bench/results/gpu-2026-12-01-runs/eighth-session/ (pasa-mask-probe.json),
bench/results/gpu-2026-12-01-runs/fifth-session/ (selection-64-2026-12-01.md, key-split-probe-fa4.md),
bench/results/e2e-2026-12-03_skyreels-df-2x-causal-masks-{default,fa4}_eager.md, bench/results/cuda-2026-11-22.md.
"""

from __future__ import annotations

from sparsecore.ir import BlockMask

# key-block class -> lowering -> rank (higher is preferred)
RANKS = {
    "tile-aligned": {"fa4": 30, "flashinfer": 20, "triton": 10},   # uniform blocks, a multiple of 128 tokens
    "uniform-64": {"fa4": 30, "triton": 20, "flashinfer": 5},     # 64-token blocks (AdaSpa's, PASA's), FA4's tiles
    "small": {"triton": 30, "fa4": 20, "flashinfer": 5},          # every other mask of blocks under 128 tokens
    "frames": {"fa4": 30, "flashinfer": 20, "triton": 10},        # uniform blocks not aligned to 128 (frames)
    "ragged": {"fa4": 30, "triton": 20, "flashinfer": 0},         # mixed sizes: FlashInfer cannot take them
}


def block_class(mask: BlockMask) -> str:
    """The mask's key-block class; a shard of a uniform mask (first and last blocks cut short) keeps its class."""
    if mask.largest_block_size("kv") < 128:
        uniform_64 = mask.uniform_block_size("q") == 64 and mask.uniform_block_size("kv") == 64
        return "uniform-64" if uniform_64 else "small"
    block = mask.interior_block_size("kv")
    if block is None:
        return "ragged"
    return "tile-aligned" if block % 128 == 0 else "frames"


def preference(backend: str, mask: BlockMask) -> int:
    return RANKS[block_class(mask)][backend]
