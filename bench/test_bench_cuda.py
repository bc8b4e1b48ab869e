"""pytest-benchmark suite for the CUDA lowerings, dense cuDNN beside every mask.

    pytest bench/test_bench_cuda.py --benchmark-enable

Same masks as bench/cuda_benchmark.py (which prints the committed table with
triton.testing.do_bench and the external baselines). Each case is skipped, with the
backend's own reason, where its backend cannot run. The timed call synchronizes the
GPU (pytest-benchmark times on the host); results are checked after timing against
float64 attention under the mask on a sample of rows of every head (:func:`sampled_error`).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sparsecore
from cuda_cases import random_rows
from sparsecore.timing import synchronize

HEADS, HEAD_DIM, SEQ = 12, 128, 32768
DENSITIES = [0.1, 0.25, 0.5]
KERNELS = ["cudnn-dense", "default", "fa4", "triton", "flashinfer"]


def sampled_error(mask: sparsecore.BlockMask, q, k, v, out, rows_per_head: int = 64) -> float:
    """Relative L2 error of ``out`` against float64 attention under ``mask`` (expanded here from its raw lists), on
    ``rows_per_head`` rows spread over every head (the whole float64 problem would take 100 GB at S = 32K)."""
    host = mask.to_host()
    indptr, indices = np.asarray(host.indptr), np.asarray(host.indices)
    q_offsets, kv_offsets = np.asarray(host.q_offsets), np.asarray(host.kv_offsets)
    rows = np.linspace(0, q.shape[2] - 1, rows_per_head).astype(int)
    blocks = np.searchsorted(q_offsets, rows, side="right") - 1
    err2 = ref2 = 0.0
    for h in range(q.shape[1]):
        allowed = np.zeros((len(rows), k.shape[2]), dtype=bool)
        for r, i in enumerate(blocks):
            for j in indices[indptr[h, i]:indptr[h, i + 1]]:
                allowed[r, kv_offsets[j]:kv_offsets[j + 1]] = True
        scores = (q[0, h, rows].double() @ k[0, h].double().T) * q.shape[-1] ** -0.5
        scores = scores.masked_fill(~torch.from_numpy(allowed).to(scores.device), float("-inf"))
        ref = torch.softmax(scores, dim=-1).nan_to_num(0.0) @ v[0, h].double()
        err2 += float(((out[0, h, rows].double() - ref) ** 2).sum())
        ref2 += float((ref ** 2).sum())
    return (err2 / ref2) ** 0.5


def _skip_reason(kind: str) -> str | None:
    backend = {"cudnn-dense": "portable", "default": "triton"}.get(kind, kind)
    return sparsecore.registered_backends()[backend].unavailable_reason("cuda")


@pytest.mark.parametrize("kind", KERNELS)
@pytest.mark.parametrize("density", DENSITIES)
def test_cuda_attention_speed(benchmark, density, kind):
    reason = _skip_reason(kind)
    if reason is not None:
        pytest.skip(f"{kind} on cuda: {reason}")
    mask = random_rows(HEADS, SEQ, density)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, SEQ, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
               for _ in range(3))
    if kind == "cudnn-dense":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def fn():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v)
        flops = mask.dense_flops(HEAD_DIM)
    else:
        kernel = sparsecore.compile(mask, device="cuda", backend=None if kind == "default" else kind)
        fn = lambda: kernel(q, k, v)  # noqa: E731
        flops = mask.flops(HEAD_DIM)
    fn()

    def timed():
        out = fn()
        synchronize("cuda")
        return out
    benchmark.group = f"S{SEQ}-d{density}"
    out = benchmark.pedantic(timed, rounds=20, warmup_rounds=3)
    median = benchmark.stats.stats.median if benchmark.stats else None      # None under --benchmark-disable
    benchmark.extra_info.update(density=mask.density(), eff_tflops=flops / median / 1e12 if median else None)
    if kind != "cudnn-dense":
        assert sampled_error(mask, q, k, v, out) < 2e-2
