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
  shorter last one allowed: Wan's 188,760 tokens) rank fa4 first, as measured, and so do joint video + text
  masks of 64-token blocks (``joint-64``: the short last video block inside, the text's last block) that
  compute only their listed blocks. On the masks AdaSpa plans for HunyuanVideo 1.5 and CogVideoX 1.5 at 2x
  a kernel compiled once runs faster on fa4 (``bench/method_mask_probe.py --model``, H200, 2026-12-02: 40.5
  against Triton's 48.3-48.8 ms at D = 128, 16 heads; 46.4 against 47.9-49.3 at D = 64, 48 heads), but
  AdaSpa's reuse steps convert each layer's held mask at every call, and until 2026-12-04 that conversion
  cost fa4 its lead: whole reuse steps (``bench/e2e_benchmark.py``, eager) 6.11 s on fa4 against 5.43 on
  Triton (HunyuanVideo 1.5) and 7.90 against 5.10 (CogVideoX 1.5) on 2026-12-02; 5.36 against 5.43 and 5.14
  against 4.99 after the conversion's Triton classification, its cached geometry tables and the statistics'
  count on the device (thirty-first session). Since the thirty-second session a held mask's copy converts
  without a host read (:func:`sparsecore.ir.host_facts.host_reads`) and CogVideoX's text tiles no longer make
  the conversion try a key order; in one call (H200, 2026-12-04): reuse 4.57 s on fa4 against 4.77 on
  Triton (CogVideoX 1.5), 4.76 against 5.22 (HunyuanVideo 1.5), and the search steps, whose masks are new at
  every call, 13.39 against 13.58 and 12.64 against 13.12 s; compiled, reuse 3.61 against 3.77 and 3.55 against
  4.07 s, 50-step generations 246.5 against 251.1 and 242.0 against 261.2 s (there fa4's one search step a
  generation is slower: 14.33 against 12.98 and 12.58 against 11.84 s). Text padding comes as padding blocks like
  the mask's (:meth:`.BlockMask.with_padding`), and a padded mask is classed by its blocks before the padding (no
  row lists the padding's), so a padded joint mask is joint-64 too: HunyuanVideo 1.5 with a short t2v prompt
  (``hv15-t2v``, 1,835 of 1,985 text slots padding) at 2x, AdaSpa's masks, 103,500 valid of 105,335 tokens (H200,
  2026-12-04, ``bench/padding_probe.py``): fa4 36.1-39.6 ms against Triton's 40.6-43.2; whole reuse steps 4.56
  against 4.82 s eager, 3.35 against 3.65 compiled, generations 296.5 against 307.9 and 239.4 against 249.6 s. The
  padding as one block had made Triton tile such masks 128 wide: 144-147 ms. And HunyuanVideo 1.5's 1,305 valid
  text tokens (with an image) are joint-64 again (a cap of 1,024 had taken them to Triton): its eager reuse step
  4.69 s on fa4. The other small masks rank Triton first: ring shards, uniform blocks of 16 or 32 tokens, PASA's
  approximating masks (converted at each call: Triton 55.2
  against fa4's 74.4 ms, 59.3-59.6 against 86.0-89.5 on the joint models, 2026-12-02; whole sparse steps tie since
  the thirty-second session, 0.584-0.600 against 0.585-0.588 s for 6 layers of HunyuanVideo 1.5), frame-causal masks
  (64-token blocks and a 24-token one in every causal block: SkyReels-V2 DF at 544x960, whole eager steps at
  2x, 102,000 tokens, ``bench/e2e_benchmark.py --backend fa4`` against the default, H200, 2026-12-03: AdaSpa's
  reuse 1.57 s on Triton against 2.28 on fa4, PASA's sparse step 1.66 against 2.54; FA4's kernel itself takes
  1.45-1.76x Triton's there, 2026-12-04). fa4 takes all of them exactly through mask tiles
  (``bench/fa4_check.py`` on the H200).
Files: bench/results/gpu-2026-11-30-runs/ (fa4-check.md, selection-2026-11-30.md),
bench/results/gpu-2026-12-04-runs/twenty-ninth-session/ (b-e2e-joint, c-geometry-cache), thirtieth-session/,
thirty-first-session/, thirty-second-session/ and thirty-third-session/,
bench/results/gpu-2026-12-01-runs/seventh-session/fa4-check.md,
bench/results/gpu-2026-12-01-runs/eighth-session/ (pasa-mask-probe.json),
bench/results/gpu-2026-12-01-runs/fifth-session/ (selection-64-2026-12-01.md, key-split-probe-fa4.md),
bench/results/e2e-2026-12-03_skyreels-df-2x-causal-masks-{default,fa4}_eager.md, bench/results/cuda-2026-11-22.md.
"""

from __future__ import annotations

import numpy as np

from sparsecore.ir import BlockMask
from sparsecore.ir.padding import unpadded

JOINT_TEXT_TOKENS = 1344     # the longest valid text after the video of a "joint-64" mask: HunyuanVideo 1.5's 1,305
#                              tokens with an image (729 image, 64 ByT5, 512 Qwen2.5-VL) were measured, in 21 blocks

# key-block class -> lowering -> rank (higher is preferred)
RANKS = {
    "tile-aligned": {"fa4": 30, "flashinfer": 20, "triton": 10},   # uniform blocks, a multiple of 128 tokens
    "uniform-64": {"fa4": 30, "triton": 20, "flashinfer": 5},     # 64-token blocks (AdaSpa's, PASA's), FA4's tiles
    "joint-64": {"fa4": 30, "triton": 20, "flashinfer": 5},       # 64-token blocks and two short ones: video + text
    "small": {"triton": 30, "fa4": 20, "flashinfer": 5},          # every other mask of blocks under 128 tokens
    "frames": {"fa4": 30, "flashinfer": 20, "triton": 10},        # uniform blocks not aligned to 128 (frames)
    "ragged": {"fa4": 30, "triton": 20, "flashinfer": 0},         # mixed sizes: FlashInfer cannot take them
}


def block_class(mask: BlockMask) -> str:
    """The mask's key-block class; a shard of a uniform mask (first and last blocks cut short) keeps its class, and
    a mask padded by :meth:`.BlockMask.with_padding` (and its copies on other devices, its heads) has the class of
    the mask (no row lists a padding block). An equal mask built otherwise (by hand, from a file) is classed by all
    its blocks, so the two may rank the backends differently; every backend is exact."""
    mask = unpadded(mask)
    if mask.largest_block_size("kv") < 128:
        if mask.uniform_block_size("q") == 64 and mask.uniform_block_size("kv") == 64:
            return "uniform-64"
        same = np.array_equal(mask.q_offsets, mask.kv_offsets)                    # self-attention over one sequence
        joint = same and _joint_64(mask.kv_offsets) and mask.unselected.kind == "drop"
        return "joint-64" if joint else "small"
    block = mask.interior_block_size("kv")
    if block is None:
        return "ragged"
    return "tile-aligned" if block % 128 == 0 else "frames"


def _joint_64(offsets: np.ndarray) -> bool:
    """Blocks as ``VideoGeometry.block_offsets(64)`` cuts a video + text sequence, the text last: 64 tokens up to the
    video's short last block, then at most :data:`JOINT_TEXT_TOKENS` tokens of text (no more than the video) in
    64-token blocks, the last one possibly shorter. A ring shard's first block is cut short; a frame-causal mask
    has a short block in every causal block, and a text-first sequence its whole video after its first short block:
    none of those is such a mask, but for two that look like one: a frame-causal mask of two causal blocks whose
    second is no longer than that text (one frame of at most 1,344 tokens), and a text-first sequence whose video is
    no longer than its text (tiny configurations)."""
    sizes = np.diff(np.asarray(offsets, dtype=np.int64))
    off_grid = np.flatnonzero(sizes != 64)
    if len(off_grid) == 0 or off_grid[0] == 0 or sizes[off_grid[0]] > 64:
        return False
    tail = sizes[off_grid[0] + 1:]
    return bool((tail[:-1] == 64).all() and (tail[-1:] <= 64).all() and
                tail.sum() <= min(JOINT_TEXT_TOKENS, sizes[:off_grid[0] + 1].sum()))


def preference(backend: str, mask: BlockMask) -> int:
    return RANKS[block_class(mask)][backend]
