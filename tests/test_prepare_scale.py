"""``prepare()`` with and without a scale, on the CPU through the stand-ins of FA4 and FlashInfer.

``CompiledKernel.prepare`` hands each launch ``run.prepare(q, k, v, scale)`` with the scale resolved
(``sparsecore/kernel.py``); a launch's ``prepare`` also takes ``scale=None`` from a direct caller, meaning the
default a call computes (1/sqrt(D)). FA4's prepare converts the mask (the scale changes nothing of it); FlashInfer's
plans its wrapper at the scale the call will run with.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from checks import assert_matches
from oracle import dense_attention, expand_to_tokens
from test_fa4_layout import fake_fa4, mask_with_an_empty_row  # noqa: F401  (fake_fa4: the fixture)
from test_flashinfer_standin import D, _compile, _inputs, _mask, standin  # noqa: F401  (standin: the fixture)

import sparsecore
from sparsecore.backends.cuda import fa4_launch, flashinfer_backend, triton_launch


@pytest.mark.parametrize("launch", [fa4_launch.Fa4Launch, flashinfer_backend.FoldedHeadsLaunch,
                                    triton_launch.TritonLaunch], ids=lambda c: c.__name__)
def test_every_cuda_launch_prepares_with_the_scale_a_compiled_kernel_passes_or_none(launch):
    """The calls ``CompiledKernel.prepare`` and a direct caller make, bound to the signature (without Triton's
    interpreter too: the fa4 stand-in below needs it)."""
    signature = inspect.signature(launch.prepare)
    assert signature.bind("self", "q", "k", "v", 0.3).arguments["scale"] == 0.3
    signature.bind("self", "q", "k", "v")
    assert signature.parameters["scale"].default is None


@pytest.fixture
def fa4_on_cpu(fake_fa4, monkeypatch):
    """The ``fa4`` backend as an SM90 reports it, taking CPU tensors, over ``test_fa4_layout``'s stand-in kernel."""
    backend = sparsecore.registered_backends()["fa4"]
    monkeypatch.setattr(backend, "unavailable_reason", lambda device: None)
    monkeypatch.setattr(backend, "tensor_device_problem", lambda device, tensor_device: None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    yield backend
    sparsecore.clear_cache()


def test_a_compiled_fa4_kernel_prepares_at_a_scale_and_its_call_reuses_the_conversion(fa4_on_cpu):
    """``CompiledKernel.prepare(q, k, v, scale=0.3)`` reaches ``Fa4Launch.prepare`` with the scale (as the diffusers
    planner prepares AdaSpa's kernels); the call after it runs on that conversion and equals dense attention."""
    mask = mask_with_an_empty_row()
    kernel = sparsecore.compile(mask, "cuda", backend="fa4", key_parts=1, warmup="wait", cache=False)
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, mask.q_len, 64, generator=gen).half()
    k, v = (torch.randn(1, 2, mask.kv_len, 64, generator=gen).half() for _ in range(2))
    kernel.prepare(q, k, v, scale=0.3)
    assert kernel.backend.name == "fa4"
    (run,) = kernel._runs.values()
    prepared = run.converted("cpu", 1)
    assert list(run._prepared) == [(torch.device("cpu"), 1)]
    out, lse = kernel(q, k, v, scale=0.3, return_lse=True)
    assert run.converted("cpu", 1) is prepared and len(run._prepared) == 1
    want_out, want_lse = dense_attention(q.double().numpy(), k.double().numpy(), v.double().numpy(),
                                         expand_to_tokens(mask), 0.3)
    assert_matches("float16", out.double().numpy(), lse.numpy(), want_out, want_lse)


def test_a_flashinfer_launch_prepared_without_a_scale_plans_the_default_calls_wrapper(standin):
    """``FoldedHeadsLaunch.prepare(q, k, v)``: scale None is 1/sqrt(D), as the call without a scale computes it; that
    call then runs on the one plan, and equals dense attention at 1/sqrt(D)."""
    mask = _mask(7)
    kernel = _compile(mask)
    (q, k, v), (q64, k64, v64) = _inputs(torch.float16, 10)
    run = kernel._run_for(q, k, v, None, False)[0]
    run.prepare(q, k, v)
    assert [p["sm_scale"] for w in standin for p in w.plans] == [1 / np.sqrt(D)]
    out, lse = kernel(q, k, v, return_lse=True)
    assert len([p for w in standin for p in w.plans]) == 1
    want_out, want_lse = dense_attention(q64, k64, v64, expand_to_tokens(mask), 1 / np.sqrt(D))
    assert_matches("float16", out.double().numpy(), lse.numpy(), want_out, want_lse)
