"""Kernels run on their inputs' CUDA device, not on whichever device is current.

Triton launches on the current device; inputs on ``cuda:1`` while ``cuda:0`` is current (a pipeline
moved with ``.to("cuda:1")``, no ``torch.cuda.set_device``) must still get their attention, checked
against the float64 oracle. Needs two CUDA devices (skipped otherwise, with the count found).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sparsecore
from sparsecore import BlockMask

from sparsecore.methods.approximation import unselected_of, with_unselected

from checks import assert_matches
from oracle_unselected import approximated_attention

DEVICES = torch.cuda.device_count() if torch.cuda.is_available() else 0


def test_the_device_context_follows_the_tensor():
    """Host tensors and arrays get no device context (nothing to make current), so CPU callers pay nothing."""
    from sparsecore.launch_device import on_device_of
    with on_device_of(torch.zeros(1)) as got, on_device_of(np.zeros(1)) as got_array:
        assert got is None and got_array is None


@pytest.mark.skipif(DEVICES < 2, reason=f"needs two CUDA devices, found {DEVICES}")
@pytest.mark.parametrize("backend, approximation, block", [
    ("triton", "drop", 128), ("triton", "grouped-first-order", 128), ("fa4", "drop", 128), ("fa4", "drop", 96),
    ("flashinfer", "drop", 128), ("portable", "drop", 128)])
def test_a_kernel_runs_on_its_inputs_device_while_another_is_current(backend, approximation, block):
    """Lowering, plans and launches on ``cuda:1`` while ``cuda:0`` is current (the approximating mask adds
    Triton's statistics and pass, which size their tiles from the current device's shared memory; fa4's 96-token
    blocks, off its tiles, its conversion's Triton classification)."""
    reason = sparsecore.registered_backends()[backend].unavailable_reason("cuda")
    if reason:
        pytest.skip(f"{backend} cannot run here: {reason}")
    rng = np.random.default_rng(0)
    blocks = -(-1024 // block)
    keep = rng.random((4, blocks, blocks)) < 0.4
    keep[:, np.arange(blocks), np.arange(blocks)] = True
    mask = BlockMask.from_dense(keep, 1024, 1024, block)
    if approximation != "drop":
        mask = with_unselected(mask, unselected_of(approximation, 4))
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 1024, 64, generator=gen).to(torch.bfloat16) for _ in range(3))
    kernel = sparsecore.compile(mask, device="cuda", backend=backend)
    with torch.cuda.device(0):
        out, lse = kernel(q.to("cuda:1"), k.to("cuda:1"), v.to("cuda:1"), return_lse=True)
        torch.cuda.synchronize(1)
        assert torch.cuda.current_device() == 0
    assert out.device == torch.device("cuda:1")
    ref_out, ref_lse = approximated_attention(q.double().numpy(), k.double().numpy(), v.double().numpy(), mask,
                                              64 ** -0.5)                                    # drop: dense attention
    assert_matches("bfloat16", out.double().cpu().numpy(), lse.double().cpu().numpy(), ref_out, ref_lse)


@pytest.mark.skipif(DEVICES < 2, reason=f"needs two CUDA devices, found {DEVICES}")
def test_fa4_warms_up_behind_triton_on_the_inputs_device_while_another_is_current():
    """The background warm-up (sparsecore.warmup) loads and samples fa4 on ``cuda:1``, the inputs' device, while
    ``cuda:0`` is current: Triton answers first, fa4 after the warm-up, both on ``cuda:1`` and both exact."""
    reason = sparsecore.registered_backends()["fa4"].unavailable_reason("cuda")
    if reason:
        pytest.skip(f"fa4 cannot run here: {reason}")
    rng = np.random.default_rng(1)
    keep = rng.random((2, 12, 12)) < 0.3
    keep[:, np.arange(12), np.arange(12)] = True
    mask = BlockMask.from_dense(keep, 1500, 1500, 128)                           # a short last block
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 1500, 128, generator=gen).to(torch.bfloat16) for _ in range(3))
    kernel = sparsecore.compile(mask, device="cuda", warmup="background")
    with torch.cuda.device(0):
        first = kernel(q.to("cuda:1"), k.to("cuda:1"), v.to("cuda:1"), return_lse=True)
        ran_first = kernel.backend.name
        assert kernel.wait_for_warmups(timeout=300)
        later = kernel(q.to("cuda:1"), k.to("cuda:1"), v.to("cuda:1"), return_lse=True)
        torch.cuda.synchronize(1)
        assert torch.cuda.current_device() == 0
    assert (ran_first, kernel.backend.name) == ("triton", "fa4")
    ref_out, ref_lse = approximated_attention(q.double().numpy(), k.double().numpy(), v.double().numpy(), mask,
                                              128 ** -0.5)
    for out, lse in (first, later):
        assert out.device == torch.device("cuda:1")
        assert_matches("bfloat16", out.double().cpu().numpy(), lse.double().cpu().numpy(), ref_out, ref_lse)
