"""The npu lowering and the emulator's assumptions on a real Ascend NPU.

Collected only where ``import torch_npu`` succeeds and ``torch.npu.is_available()``;
everywhere else the whole module is one skip that says why. Run on an Atlas A2/A3 host
(torch_npu >= 2.14, CANN >= 9.0, ``source <CANN>/set_env.sh``) with
``HYPOTHESIS_PROFILE=ci python -m pytest tests/test_npu_hardware.py`` (see docs/npu.md).
The property suite (``tests/test_backends_match_oracle.py``) also runs its
``npu-npu-*`` targets there.
"""

from __future__ import annotations

import numpy as np
import pytest

from sparsecore.backends.npu import loader

_PROBLEM = loader.hardware_problem()
if _PROBLEM is not None:
    pytest.skip(f"needs a real Ascend NPU: {_PROBLEM}", allow_module_level=True)

import torch  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from checks import run_and_compare  # noqa: E402
from npu_cases import PATH_CASES  # noqa: E402
from strategies import attention_cases  # noqa: E402
from targets import Target  # noqa: E402

from sparsecore.backends.npu import NpuBackend, calls, emulator  # noqa: E402

TORCH_NPU = loader.require_torch_npu()
DTYPES = ("float16", "bfloat16", "float32")


@pytest.fixture
def spied(monkeypatch):
    """Record which of the two ops each kernel call reaches on the real module."""
    log = {loader.BLOCK_SPARSE_OP: 0, loader.FUSION_OP: 0}
    for name in log:
        op = getattr(TORCH_NPU, name)

        def spy(*args, _op=op, _name=name, **kwargs):
            log[_name] += 1
            return _op(*args, **kwargs)

        monkeypatch.setattr(TORCH_NPU, name, spy)
    return log


@pytest.mark.parametrize("dtype", DTYPES)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_generated_masks_match_dense_oracle_on_device(dtype, data):
    case = data.draw(attention_cases(NpuBackend.capabilities), label="case")
    run_and_compare(Target("npu", "npu", dtype), case.mask, *case.inputs(), scale=case.scale)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", sorted(PATH_CASES))
def test_each_path_on_device(spied, name, dtype):
    path_case = PATH_CASES[name]
    run_and_compare(Target("npu", "npu", dtype), path_case.case.mask, *path_case.case.inputs(),
                    scale=path_case.case.scale)
    used = (spied[loader.BLOCK_SPARSE_OP] > 0, spied[loader.FUSION_OP] > 0)
    expected = {"block_sparse": (True, False), "both": (True, True), "fallback": (False, True)}[path_case.route]
    assert used == expected, f"{name}: {path_case.why}"


def test_block_sparse_gqa_maps_query_head_n_to_key_head_n_div_g():
    """The lowering assumes n // G (public tests only cover G = 1 and one key head); the op is called as the
    lowering calls it (``calls.block_sparse_attention``: its arguments, the sequence lengths included)."""
    q = torch.zeros(1, 4, 1, 64, dtype=torch.float16)
    k = torch.zeros(1, 2, 128, 64, dtype=torch.float16)
    v = torch.stack([torch.full((128, 64), 1.0), torch.full((128, 64), 2.0)])[None].half()
    mask = torch.ones(1, 4, 1, 1, dtype=torch.int8)
    out, _ = calls.block_sparse_attention(TORCH_NPU, q.npu(), k.npu(), v.npu(), mask.npu(), 1, 0.125, False)
    heads = out[0, :, 0, 0].float().cpu().tolist()
    assert heads == [1.0, 1.0, 2.0, 2.0], (f"query heads read key heads {heads}: expected n // G = [1, 1, 2, 2]; "
                                           f"[1, 2, 1, 2] means n % N2 and the npu lowering must permute heads")


def _random_inputs(seed: int, dtype: torch.dtype, heads: int, kv_heads: int, q_len: int, kv_len: int):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(2, heads, q_len, 64, generator=gen).to(dtype),
            torch.randn(2, kv_heads, kv_len, 64, generator=gen).to(dtype),
            torch.randn(2, kv_heads, kv_len, 64, generator=gen).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_emulated_block_sparse_matches_the_device(dtype):
    """The emulator and the device, both called as the lowering calls the op (``calls.block_sparse_attention``)."""
    q, k, v = _random_inputs(0, dtype, 4, 2, 200, 300)
    mask = torch.from_numpy(np.random.default_rng(0).random((2, 4, 4, 3)) < 0.5).to(torch.int8)
    mask[..., 0] = 1                                              # every row keeps a block: defined behaviour only
    want_out, want_lse = calls.block_sparse_attention(emulator, q, k, v, mask, 64, 0.1, True)
    out, lse = calls.block_sparse_attention(TORCH_NPU, q.npu(), k.npu(), v.npu(), mask.npu(), 64, 0.1, True)
    torch.testing.assert_close(out.cpu().float(), want_out.float(), rtol=5e-3, atol=5e-3 if dtype == torch.float16
                               else 2e-2)
    torch.testing.assert_close(lse.cpu(), want_lse, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_emulated_fusion_attention_matches_the_device(dtype):
    q, k, v = _random_inputs(1, dtype, 4, 2, 100, 150)
    masked = torch.from_numpy(np.random.default_rng(1).random((2, 4, 100, 150)) < 0.7)
    masked[..., 0] = False                                        # no fully masked row: defined behaviour only
    want = emulator.npu_fusion_attention(q, k, v, 4, "BNSD", atten_mask=masked, scale=0.2, sparse_mode=0)
    got = TORCH_NPU.npu_fusion_attention(q.npu(), k.npu(), v.npu(), 4, "BNSD", atten_mask=masked.npu(), scale=0.2,
                                         sparse_mode=0)
    tol = {torch.float16: 5e-3, torch.bfloat16: 2e-2, torch.float32: 1e-4}[dtype]
    torch.testing.assert_close(got[0].cpu().float(), want[0].float(), rtol=tol, atol=tol)
    assert tuple(got[1].shape) == tuple(want[1].shape) == (2, 4, 100, 8)
    torch.testing.assert_close(got[1].cpu() + torch.log(got[2].cpu()), want[1] + torch.log(want[2]),
                               rtol=1e-3, atol=1e-3)
