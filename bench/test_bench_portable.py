"""pytest-benchmark suite for the CPU lowerings at small shapes, dense baseline beside every mask.

Run with ``make bench``. Each case times, in one group: torch SDPA without a mask
(the dense baseline), the portable lowering, and (for the smallest shape) the NumPy
reference. ``extra_info`` carries density and effective GFLOP/s (useful FLOPs of the
mask / time), and every timed result is checked against the float64 oracle after
timing. CPU numbers are for regressions only; performance claims come from GPU runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from oracle import dense_attention, expand_to_tokens

import sparsecore
from sparsecore import BlockMask


@dataclass(frozen=True)
class BenchConfig:
    tokens: int
    heads: int
    head_dim: int
    block: int
    density: float

    @property
    def id(self) -> str:
        return f"S{self.tokens}-H{self.heads}-D{self.head_dim}-b{self.block}-d{self.density}"

    def mask(self) -> BlockMask:
        rng = np.random.default_rng(0)
        n = -(-self.tokens // self.block)
        dense = rng.random((self.heads, n, n)) < self.density
        dense[:, np.arange(n), np.arange(n)] = True
        return BlockMask.from_dense(dense, self.tokens, self.tokens, self.block)


CONFIGS = [BenchConfig(512, 2, 64, 64, 0.25), BenchConfig(4096, 4, 64, 128, 0.1), BenchConfig(4096, 4, 64, 128, 0.5)]
KERNELS = ["dense-sdpa", "portable", "reference"]


@pytest.mark.parametrize("kind", KERNELS)
@pytest.mark.parametrize("config", CONFIGS, ids=[c.id for c in CONFIGS])
def test_attention_speed(benchmark, config, kind):
    if kind == "reference" and config.tokens > 1024:
        pytest.skip("the NumPy reference is a spec, timed only at the smallest shape")
    mask = config.mask()
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, config.heads, config.tokens, config.head_dim, generator=gen) for _ in range(3))
    benchmark.group = config.id
    if kind == "dense-sdpa":
        fn, args, flops = torch.nn.functional.scaled_dot_product_attention, (q, k, v), mask.dense_flops(config.head_dim)
    else:
        device = "reference" if kind == "reference" else "cpu"
        fn = sparsecore.compile(mask, device=device)  # planning stays outside the timed call
        args = tuple(t.numpy() for t in (q, k, v)) if kind == "reference" else (q, k, v)
        flops = mask.flops(config.head_dim)
    out = benchmark(fn, *args)
    benchmark.extra_info.update(density=mask.density(), useful_flops=flops,
                                eff_gflops=flops / benchmark.stats.stats.median / 1e9 if benchmark.stats else None)
    if kind != "dense-sdpa":
        ref, _ = dense_attention(q.numpy(), k.numpy(), v.numpy(), expand_to_tokens(mask), config.head_dim ** -0.5)
        out = out if isinstance(out, np.ndarray) else out.numpy()
        assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-5
