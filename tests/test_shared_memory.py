"""The pipeline depth a Triton launch takes on a GPU with less shared memory than the H200's
(``backends/cuda/shared_memory.py``): compiled candidates, deepest first; a clear error where none fits."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from sparsecore.backends.cuda import shared_memory

# bytes the block-sparse kernel's 128 x 128 tiles at head dim 128 need on sm89 (Triton 3.6; test_triton_targets.py)
NEEDED = {3: 163_840, 2: 98_304, 1: 98_304}


def compiled_at(stages: int) -> SimpleNamespace:
    return SimpleNamespace(metadata=SimpleNamespace(shared=NEEDED[stages]))


@pytest.mark.parametrize("limit, stages", [(232_448, 3), (166_912, 3), (101_376, 2)])   # H200, A100, RTX 4090
def test_the_deepest_pipeline_that_fits_the_gpu(monkeypatch, limit, stages):
    monkeypatch.setattr(shared_memory, "shared_memory_limit", lambda: limit)
    assert shared_memory.fitting_stages(compiled_at, 3, "kernel") == stages


def test_none_fits_names_each_depth_and_the_remedy(monkeypatch):
    monkeypatch.setattr(shared_memory, "shared_memory_limit", lambda: 65_536)              # a T4
    with pytest.raises(RuntimeError, match=r"triton lowering \(x\): no pipeline depth fits the 65536 bytes .*"
                                           r"3 stage\(s\): 163840 bytes; 2 stage\(s\): 98304 bytes; 1 stage\(s\): "
                                           r"98304 bytes\); pass smaller tiles"):
        shared_memory.fitting_stages(compiled_at, 3, "triton lowering (x)")


def test_without_a_compiled_kernel_to_read_nothing_is_decided(monkeypatch):
    """A JIT hook may give no compiled kernel: None (the launch keeps its configured stages and decides next time)."""
    monkeypatch.setattr(shared_memory, "shared_memory_limit", lambda: 65_536)
    assert shared_memory.fitting_stages(lambda stages: None, 3, "kernel") is None


def test_an_asynchronous_compile_is_waited_for(monkeypatch):
    """Under ``triton.AsyncCompileMode`` a warm-up gives a future: its kernel decides."""
    monkeypatch.setattr(shared_memory, "shared_memory_limit", lambda: 101_376)
    future = lambda stages: SimpleNamespace(result=lambda: compiled_at(stages))   # noqa: E731
    assert shared_memory.fitting_stages(future, 3, "kernel") == 2


# --- Selection: an approximating mask whose pass does not fit the GPU's shared memory runs where it fits -------------

RTX_4090 = 101_376          # shared_memory_per_block_optin of sm86 / sm89 GPUs (A10, RTX 3090, RTX 4090, L40S)


def _pasa_mask(kind: str, heads: int = 2):
    import numpy as np
    from sparsecore import BlockMask
    from sparsecore.ir import Unselected
    rng = np.random.default_rng(7)
    offsets = BlockMask.uniform_offsets(256, 16)                          # 16 blocks: two groups of 8
    rows = [[np.flatnonzero(rng.random(16) < 0.3) for _ in range(16)] for _ in range(heads)]
    mask = BlockMask.from_lists(rows, offsets, offsets)
    return BlockMask(mask.num_heads, mask.q_offsets, mask.kv_offsets, mask.indptr, mask.indices,
                     unselected=Unselected.parse(kind))


def _inputs(dtype, head_dim: int, heads: int = 2):
    import torch
    gen = torch.Generator().manual_seed(11)
    return [torch.randn(1, heads, 256, head_dim, generator=gen).to(dtype) for _ in range(3)]


@pytest.fixture
def gpu_of_99_kb(monkeypatch, triton_device):
    """The Triton backend's device (emulated on CPU) reporting a consumer GPU's 99 KB of shared memory a block; where
    it is emulated, ``portable`` runs on it too (on the CPU tensors the emulator takes)."""
    import sparsecore
    monkeypatch.setattr(shared_memory, "device_shared_memory", lambda device: RTX_4090, raising=False)
    if triton_device == "cpu":
        portable = sparsecore.registered_backends()["portable"]
        monkeypatch.setattr(portable, "unavailable_reason", lambda device: None)
        monkeypatch.setattr(portable, "tensor_device_problem", lambda device, tensor_device: None)
        monkeypatch.setattr(portable, "lower", lambda mask, device, options, lower=portable.lower:
                            lower(mask, "cpu", options))
    return triton_device


def test_a_pass_that_does_not_fit_the_gpu_runs_on_the_next_backend(gpu_of_99_kb):
    """PASA's grouped first-order pass in float16 at head dim 128 needs 163,840 bytes at its smallest tiles on sm89:
    the call runs ``portable`` (which matches the oracle) instead of Triton, which would refuse at launch."""
    import numpy as np
    import torch
    import sparsecore
    from oracle_unselected import approximated_attention
    from tolerances import OUT_REL
    mask = _pasa_mask("grouped-first-order:8")
    q, k, v = _inputs(torch.float16, 128)
    kernel = sparsecore.compile(mask, device="cuda")
    out = kernel(*(t.to(gpu_of_99_kb) for t in (q, k, v)), scale=0.1)
    assert kernel.backend.name == "portable"
    want, _ = approximated_attention(q.double().numpy(), k.double().numpy(), v.double().numpy(), mask, 0.1)
    error = np.linalg.norm(out.cpu().double().numpy() - want) / np.linalg.norm(want)
    assert error <= OUT_REL["float16"], error


def test_triton_named_refuses_such_inputs_naming_the_limit_and_the_remedy(gpu_of_99_kb):
    import torch
    import sparsecore
    kernel = sparsecore.compile(_pasa_mask("grouped-first-order:8"), device="cuda", backend="triton")
    with pytest.raises(sparsecore.UnsupportedError, match=r"unselected_shared_memory: .*grouped-first-order.* float16 "
                                                          r"at head dim 128 needs 163,840 bytes .* allows 101,376.*"
                                                          r"bfloat16"):
        kernel(*(t.to(gpu_of_99_kb) for t in _inputs(torch.float16, 128)))


@pytest.mark.parametrize("kind, dtype, head_dim", [("grouped-first-order:8", "float16", 64),
                                                    ("zeroth", "float16", 128),
                                                    ("grouped-first-order:16", "float16", 128)])   # one group: 100,096
def test_a_pass_that_fits_stays_on_triton(gpu_of_99_kb, kind, dtype, head_dim):
    import torch
    import sparsecore
    kernel = sparsecore.compile(_pasa_mask(kind), device="cuda")
    kernel.prepare(*(t.to(gpu_of_99_kb) for t in _inputs(getattr(torch, dtype), head_dim)))
    assert kernel.backend.name == "triton"
