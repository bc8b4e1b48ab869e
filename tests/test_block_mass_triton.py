"""The Triton block-mass kernel (AdaSpa's search on CUDA) against float64 dense block masses.

Runs on a GPU, or on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1, as CI
does) inside the Triton backend's emulator; otherwise it skips with the backend's reason.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from strategies import offsets
from test_method_adaspa import ANY, mass_float64

import sparsecore
from sparsecore.backends.cuda import block_mass as triton_block_mass
from sparsecore.search import block_mass


@pytest.fixture
def device():
    backend = sparsecore.registered_backends()["triton"]
    emulator = backend.emulator()
    if emulator is None and backend.unavailable_reason("cuda") is not None:
        pytest.skip(f"triton on cuda: {backend.unavailable_reason('cuda')} (or set TRITON_INTERPRET=1)")
    with emulator or contextlib.nullcontext():
        yield "cpu" if emulator is not None else "cuda"


@settings(max_examples=15, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(offsets(ANY, "q"), offsets(ANY, "kv"), st.sampled_from([(1, 1), (4, 2), (2, 1)]), st.sampled_from([16, 32]),
       st.sampled_from(["float32", "float16"]), st.integers(0, 2**32 - 1))
def test_triton_block_mass_matches_float64(device, q_offsets, kv_offsets, heads, head_dim, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads[0], int(q_offsets[-1]), head_dim, generator=gen).to(getattr(torch, dtype))
    k = torch.randn(1, heads[1], int(kv_offsets[-1]), head_dim, generator=gen).to(getattr(torch, dtype))
    want = mass_float64(q, k, q_offsets, kv_offsets)
    lse = torch.logsumexp(q.double() @ k.double().repeat_interleave(heads[0] // heads[1], 1).transpose(-1, -2)
                          * head_dim ** -0.5, dim=-1).float()                 # the fresh LSE, float64 then rounded
    mass = triton_block_mass.run(q.to(device), k.to(device), q_offsets, kv_offsets, lse.to(device), head_dim ** -0.5)
    tolerance = 1e-5 if dtype == "float32" else 2e-3
    got = mass.double().cpu().numpy()
    assert np.linalg.norm(got - want) <= tolerance * np.linalg.norm(want)
    np.testing.assert_allclose(got.sum(axis=3), np.broadcast_to(np.diff(q_offsets), got.shape[:3]), rtol=tolerance)
    older = triton_block_mass.run(q.to(device), k.to(device), q_offsets, kv_offsets, lse.to(device) + 0.5,
                                  head_dim ** -0.5)                          # a cached, stale LSE rescales every mass
    np.testing.assert_allclose(older.double().cpu().numpy(), got * np.exp(-0.5), rtol=tolerance, atol=1e-9)


def test_cuda_tensors_dispatch_to_the_triton_kernel():
    if not torch.cuda.is_available():
        pytest.skip("torch.cuda.is_available() is False: dispatch to the CUDA kernel needs CUDA tensors")
    q = torch.randn(1, 2, 256, 64, device="cuda", dtype=torch.bfloat16)
    result = block_mass(q, q, np.array([0, 128, 256]), np.array([0, 64, 256]))
    assert result.impl == "triton"

