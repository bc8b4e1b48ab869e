"""The masks of the CUDA benchmark (issue 3), shared by the script and the pytest-benchmark suite.

- ``random_rows``: 128x128 blocks, a different random pattern per head, every query
  block row keeping the same number of key blocks with its diagonal block included
  (the mask family measured in shared/ANCHORS.md).
- ``lvsa_frames``: the LVSA pattern at 6x Wan 2.1 1.3B length: 121 latent frames of
  1560 tokens, window W=3 expanded to 7 non-anchor frames, anchors every 9th frame
  (14 anchors): every frame row keeps 21 of 121 frames, density 0.1736, shared by
  all heads. Built here directly so the benchmark does not depend on the planner.
"""

from __future__ import annotations

import numpy as np

from sparsecore import BlockMask

FRAME_TOKENS = 1560
LVSA_FRAMES = 121


def random_rows(num_heads: int, seq_len: int, density: float, block: int = 128, seed: int = 0) -> BlockMask:
    rng = np.random.default_rng(seed)
    n = seq_len // block
    keep = max(1, round(density * n))
    rows = []
    for _ in range(num_heads):
        head = []
        for i in range(n):
            others = rng.choice(np.delete(np.arange(n), i), size=keep - 1, replace=False)
            head.append([i, *others.tolist()])
        rows.append(head)
    offsets = BlockMask.uniform_offsets(seq_len, block)
    return BlockMask.from_lists(rows, offsets, offsets, meta={"method": "random_rows", "density": density,
                                                              "seed": seed})


def lvsa_frames(num_heads: int, frames: int = LVSA_FRAMES, window: int = 3, anchor_every: int = 9) -> BlockMask:
    anchors = set(range(0, frames, anchor_every))
    others = [f for f in range(frames) if f not in anchors]
    rows = []
    for t in range(frames):
        # expanded window: the 2W+1 non-anchor frames nearest t, shifted inward at the ends
        position = int(np.searchsorted(others, t))
        lo = min(max(0, position - window), len(others) - (2 * window + 1))
        rows.append(sorted(anchors | set(others[lo:lo + 2 * window + 1])))
    offsets = np.arange(frames + 1, dtype=np.int64) * FRAME_TOKENS
    return BlockMask.from_lists([rows] * num_heads, offsets, offsets,
                                meta={"method": "lvsa_frames_bench", "window": window, "anchor_every": anchor_every})
