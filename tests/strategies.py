"""Hypothesis strategies that generate block-mask IRs and matching attention inputs.

Masks are drawn to fit a backend's declared capabilities (uniform blocks, key
length a multiple of the block, head dims), so every backend sees as many cases as
it can take instead of rejecting most of them. Covered: odd lengths, short last
blocks, block sizes 1..256, arbitrary (frame/text-like) boundaries, empty rows,
full rows, all-empty and all-full heads, per-head differences, GQA ratios, and
densities from 0 to 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

from sparsecore import BlockMask, Capabilities

MAX_BLOCKS = 48          # per side: keeps the reference's Python loops quick
MAX_LEN = 320
HEAD_DIMS = (8, 16, 32, 64)


@dataclass(frozen=True)
class AttentionCase:
    mask: BlockMask
    batch: int
    num_kv_heads: int
    head_dim: int
    seed: int
    scale: float | None

    def inputs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """float64 q, k, v drawn from N(0, 1) with a seeded generator."""
        rng = np.random.default_rng(self.seed)
        q = rng.standard_normal((self.batch, self.mask.num_heads, self.mask.q_len, self.head_dim))
        k = rng.standard_normal((self.batch, self.num_kv_heads, self.mask.kv_len, self.head_dim))
        v = rng.standard_normal((self.batch, self.num_kv_heads, self.mask.kv_len, self.head_dim))
        return q, k, v


@st.composite
def offsets(draw, caps: Capabilities, side: str, length: int | None = None) -> np.ndarray:
    """Block boundaries for one side ("q" or "kv") that the capabilities allow."""
    uniform = caps.uniform_q_blocks if side == "q" else caps.uniform_kv_blocks
    min_block = caps.min_q_block if side == "q" else 1
    style = "uniform" if uniform or min_block > 1 else draw(st.sampled_from(["uniform", "uniform", "arbitrary"]))
    if style == "uniform":
        block = draw(st.integers(min_block, 256))
        if length is None:
            length = draw(st.integers(min_block, min(MAX_LEN, block * MAX_BLOCKS)))
            if block < length and 0 < length % block < min_block:  # a short last block may not go below it
                length -= length % block
            if side == "kv" and caps.kv_len_divisible:
                length = block * max(1, length // block)
        return BlockMask.uniform_offsets(length, block)
    if length is None:
        length = draw(st.integers(1, MAX_LEN))
    cuts = draw(st.lists(st.integers(1, max(1, length - 1)), max_size=min(MAX_BLOCKS - 1, length - 1), unique=True))
    return np.array([0, *sorted(c for c in cuts if c < length), length], dtype=np.int64)


@st.composite
def block_masks(draw, caps: Capabilities, num_heads: int) -> BlockMask:
    q_offsets = draw(offsets(caps, "q"))
    kv_offsets = draw(offsets(caps, "kv"))
    mb, nb = len(q_offsets) - 1, len(kv_offsets) - 1
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    densities = draw(st.lists(st.sampled_from([0.0, 0.05, 0.3, 0.6, 0.95, 1.0]), min_size=num_heads,
                              max_size=num_heads))
    dense = rng.random((num_heads, mb, nb)) < np.array(densities)[:, None, None]
    if draw(st.booleans()):                      # force some empty and some full rows
        dense[rng.random((num_heads, mb)) < 0.2] = False
        dense[rng.random((num_heads, mb)) < 0.2] = True
    rows = [[np.nonzero(dense[h, i])[0] for i in range(mb)] for h in range(num_heads)]
    return BlockMask.from_lists(rows, q_offsets, kv_offsets, meta={"method": "hypothesis"})


@st.composite
def attention_cases(draw, caps: Capabilities) -> AttentionCase:
    num_kv_heads = draw(st.integers(1, 2))
    group = draw(st.sampled_from([1, 2, 4])) if caps.gqa else 1
    head_dims = sorted(caps.head_dims) if caps.head_dims is not None else HEAD_DIMS
    return AttentionCase(
        mask=draw(block_masks(caps, num_kv_heads * group)),
        batch=draw(st.integers(1, 2)),
        num_kv_heads=num_kv_heads,
        head_dim=draw(st.sampled_from(head_dims)),
        seed=draw(st.integers(0, 2**32 - 1)),
        scale=draw(st.sampled_from([None, None, 0.5, 1.7])),
    )
