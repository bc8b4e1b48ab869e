"""``sparsecore check``: run one backend on random masks and compare with float64 dense attention.

A self-test for a user's machine (does the kernel for my device compute the right
thing?). It covers short last blocks, arbitrary block boundaries, empty rows,
per-head patterns and GQA; it stops at the first mismatch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from sparsecore.ir import BlockMask

from .dense import masked_dense_attention, relative_error, to_numpy64
from .kernel import compile

TOLERANCE = {"float64": 1e-10, "float32": 1e-5, "float16": 3e-3, "bfloat16": 2e-2}  # relative L2 of the output


@dataclass(frozen=True)
class CheckResult:
    case: int
    description: str
    backend: str
    rel_err: float
    passed: bool


def random_case(rng: np.random.Generator, head_dims: tuple[int, ...]) -> tuple[BlockMask, int, int]:
    """A random mask (uniform or arbitrary blocks, empty rows, GQA) with its key-head count and head dim."""
    kv_heads, group = int(rng.integers(1, 3)), int(rng.choice([1, 2, 4]))
    heads = kv_heads * group

    def offsets() -> np.ndarray:
        length = int(rng.integers(1, 300))
        if rng.random() < 0.6:
            return BlockMask.uniform_offsets(length, int(rng.integers(max(1, length // 40), 129)))
        cuts = rng.choice(np.arange(1, length), size=min(length - 1, int(rng.integers(0, 30))), replace=False)
        return np.concatenate([[0], np.sort(cuts), [length]]).astype(np.int64)

    q_off, kv_off = offsets(), offsets()
    density = rng.choice([0.0, 0.1, 0.4, 0.8, 1.0], size=(heads, 1, 1))
    dense = rng.random((heads, len(q_off) - 1, len(kv_off) - 1)) < density
    rows = [[np.nonzero(r)[0] for r in head] for head in dense]
    return BlockMask.from_lists(rows, q_off, kv_off), kv_heads, int(rng.choice(head_dims))


def run_check(device: str, backend: str | None, cases: int, seed: int, dtype: str,
              report: Callable[[CheckResult], None]) -> bool:
    """Run ``cases`` random cases; returns True when all pass."""
    rng = np.random.default_rng(seed)
    for case in range(cases):
        mask, kv_heads, head_dim = random_case(rng, (16, 32, 64))
        kernel = compile(mask, device=device, backend=backend)
        shapes = [(1, mask.num_heads, mask.q_len, head_dim)] + [(1, kv_heads, mask.kv_len, head_dim)] * 2
        arrays = [rng.standard_normal(s) for s in shapes]
        if kernel.backend.capabilities.array_type == "numpy":
            inputs = [a.astype(dtype) for a in arrays]
        else:
            inputs = [torch.from_numpy(a).to(device=device, dtype=getattr(torch, dtype)) for a in arrays]
        out = kernel(*inputs)
        ref, _ = masked_dense_attention(mask, *inputs, scale=head_dim ** -0.5)
        _, rel = relative_error(to_numpy64(out), ref)
        passed = bool(np.isfinite(rel) and rel <= TOLERANCE[dtype])
        report(CheckResult(case, f"{mask!r}, kv_heads={kv_heads}, head_dim={head_dim}", kernel.backend.name,
                           rel, passed))
        if not passed:
            return False
    return True
