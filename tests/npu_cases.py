"""IRs that force each path of the npu lowering, shared by the emulated and the hardware tests.

Each case says which op(s) its plan must use, so a test can check the route as well as
the numbers: ``"block_sparse"`` (npu_block_sparse_attention only), ``"both"`` (the
block-sparse op plus the npu_fusion_attention fallback merged through LSEs), or
``"fallback"`` (npu_fusion_attention only).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from strategies import AttentionCase

from sparsecore import BlockMask


@dataclass(frozen=True)
class PathCase:
    case: AttentionCase
    route: str          # "block_sparse", "both" or "fallback" (for fp16/bf16 inputs)
    why: str


def _random_dense(shape: tuple[int, int, int], density: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(shape) < density


def aligned_128_multiples() -> BlockMask:
    """128-token query blocks, 256-token key blocks (two op blocks each): exact on the op grid."""
    return BlockMask.from_dense(_random_dense((2, 3, 2), 0.6, 1) | np.eye(3, 2, dtype=bool)[None], 384, 512,
                                q_block=128, kv_block=256)


def blocks_64_in_agreeing_pairs() -> BlockMask:
    """64-token blocks whose key blocks come in aligned pairs with equal choices: retiled exactly."""
    pairs = _random_dense((2, 4, 2), 0.5, 2)
    pairs[:, :, 0] = True
    return BlockMask.from_dense(np.repeat(pairs, 2, axis=2), 256, 256, q_block=64)


def blocks_64_in_disagreeing_pairs() -> BlockMask:
    """64-token key blocks that split 128-token op blocks: those op blocks go to the fallback."""
    dense = np.zeros((2, 4, 4), dtype=bool)
    dense[:, :, 0] = True                 # op block 0 half kept: mixed
    dense[0, :, 2:] = True                # head 0: op block 1 full
    dense[1, 1, 3] = True                 # head 1: op block 1 mixed in one row
    return BlockMask.from_dense(dense, 256, 256, q_block=64)


def frames_1560_with_text(frames: int = 2, text: int = 77) -> BlockMask:
    """Real frame-sized blocks (1560 = 12 x 128 + 24 tokens) plus a text block; each frame sees itself and
    the next frame, text sees everything, everything sees text."""
    offsets = np.array([1560 * f for f in range(frames + 1)] + [1560 * frames + text], dtype=np.int64)
    n = frames + 1
    rows = [[sorted({i, min(i + 1, frames - 1), frames}) if i < frames else range(n) for i in range(n)]
            for _ in range(2)]
    rows[1][0] = [0]                      # head 1, frame 0: only itself (no text)
    return BlockMask.from_lists(rows, offsets, offsets)


def short_last_block() -> BlockMask:
    """300 tokens in 128-token blocks: the last block has 44 tokens, as the op's ceil grid expects."""
    return BlockMask.from_dense(_random_dense((2, 3, 3), 0.6, 3), 300, 300, q_block=128)


def empty_rows_and_head() -> BlockMask:
    dense = _random_dense((3, 3, 3), 0.6, 4)
    dense[0, 1] = False                   # one empty row
    dense[1] = False                      # one head that attends to nothing
    dense[2, :, 0] = True
    return BlockMask.from_dense(dense, 384, 384, q_block=128)


def gqa(num_heads: int) -> BlockMask:
    return BlockMask.from_dense(_random_dense((num_heads, 2, 3), 0.5, 5) | np.eye(2, 3, dtype=bool)[None],
                                256, 384, q_block=128)


PATH_CASES = {
    "aligned_128_multiples": PathCase(AttentionCase(aligned_128_multiples(), 2, 2, 64, 21, None),
                                      "block_sparse", "IR blocks are multiples of the op block"),
    "blocks_64_agreeing_pairs": PathCase(AttentionCase(blocks_64_in_agreeing_pairs(), 1, 1, 128, 22, 0.3),
                                         "block_sparse", "pairs of 64-token key blocks retile onto 128"),
    "blocks_64_disagreeing_pairs": PathCase(AttentionCase(blocks_64_in_disagreeing_pairs(), 1, 2, 64, 23, None),
                                            "both", "half-kept op blocks go to the fallback"),
    "frames_1560_with_text": PathCase(AttentionCase(frames_1560_with_text(), 1, 1, 64, 24, None),
                                      "both", "frame boundaries straddle op blocks; text is 77 tokens"),
    "short_last_block": PathCase(AttentionCase(short_last_block(), 1, 2, 64, 25, 1.7),
                                 "block_sparse", "the op's ceil grid ends in the same short block"),
    "empty_rows_and_head": PathCase(AttentionCase(empty_rows_and_head(), 1, 3, 128, 26, None),
                                    "block_sparse", "rows without blocks: output 0, LSE -inf"),
    "gqa_4_to_1": PathCase(AttentionCase(gqa(8), 1, 2, 64, 27, None),
                           "block_sparse", "G = 4: num_key_value_heads, query head n -> key head n // 4"),
    "gqa_3_to_1": PathCase(AttentionCase(gqa(6), 1, 2, 64, 28, None),
                           "fallback", "G = 3 fails the op's 128 % G == 0: fused op only"),
}
