"""The ``flashinfer`` lowering (backends/cuda/flashinfer_backend.py) run on CPU tensors against a stand-in for
``flashinfer.BlockSparseAttentionWrapper``, checked against the float64 oracle.

CI has neither CUDA nor FlashInfer, so without this nothing executes the lowering's own code: the folding of batch
and heads into rows (GQA included), the padding of a short last query block, the plans per (batch, dtype, head dim,
scale), the base-2 to natural-log LSE and the fix-up of rows that keep no block. The stand-in follows FlashInfer's
documented BSR semantics (docs.flashinfer.ai/api/sparse.html: ``plan(indptr, indices, M, N, R, C, num_qo_heads,
num_kv_heads, head_dim, ...)`` over an ``M x N`` matrix of ``R x C`` blocks, with ``indptr`` of length
``M // R + 1``; ``run(q [M, Hq, D], k / v [N, Hkv, D], out=, lse=, return_lse=)``, LSE in base 2). It computes in
float64 and writes NaN into rows that keep no block (FlashInfer does not document what it writes there), so the
lowering's fix-up is what makes those rows 0 / -inf. The fixture makes the backend report itself available (its
CUDA check fails here) and lets it take CPU tensors; it installs the stand-in in ``sys.modules`` and restores all of
it after the test.
"""

from __future__ import annotations

import gc
import importlib.machinery
import math
import sys
import types
import weakref

import numpy as np
import pytest
import torch

from checks import assert_matches
from oracle import dense_attention, expand_to_tokens

import sparsecore
from sparsecore import BlockMask
from sparsecore.backends.cuda import flashinfer_backend
from sparsecore.ir.memo import LruMemo


class StandInWrapper:
    """``flashinfer.BlockSparseAttentionWrapper`` on CPU: FlashInfer's BSR semantics, float64 arithmetic."""

    instances: list["StandInWrapper"] = []

    def __init__(self, float_workspace_buffer: torch.Tensor, backend: str = "auto") -> None:
        assert float_workspace_buffer.dtype == torch.uint8 and backend in ("auto", "fa2", "fa3")
        self.workspace = float_workspace_buffer
        self.plans: list[dict] = []
        self.nan_rows = 0                         # rows that kept no block, written as NaN by run()
        StandInWrapper.instances.append(self)

    def plan(self, indptr, indices, M, N, R, C, num_qo_heads, num_kv_heads, head_dim, mask=None,
             packed_mask=None, causal=False, pos_encoding_mode="NONE", use_fp16_qk_reduction=False,
             logits_soft_cap=None, sm_scale=None, rope_scale=None, rope_theta=None, q_data_type="float16",
             kv_data_type=None, o_data_type=None, non_blocking=True) -> None:
        assert indptr.dtype == indices.dtype == torch.int32, (indptr.dtype, indices.dtype)
        assert M % R == 0 and N % C == 0, (M, R, N, C)
        indptr, indices = indptr.cpu().long(), indices.cpu().long()
        assert indptr.shape == (M // R + 1,) and int(indptr[0]) == 0 and int(indptr[-1]) == len(indices)
        assert bool((indptr[1:] >= indptr[:-1]).all())
        assert len(indices) == 0 or (int(indices.min()) >= 0 and int(indices.max()) < N // C)
        assert num_qo_heads % num_kv_heads == 0
        # what the H200 showed (2026-12-02): NaN at sm_scale -20, an output 0.30 from dense attention's at 0
        assert sm_scale is None or sm_scale > 0, f"FlashInfer computes positive scales only, got {sm_scale}"
        self.plans.append(dict(M=M, N=N, R=R, C=C, num_qo_heads=num_qo_heads, num_kv_heads=num_kv_heads,
                               head_dim=head_dim, sm_scale=head_dim ** -0.5 if sm_scale is None else sm_scale,
                               q_data_type=q_data_type, o_data_type=o_data_type or q_data_type,
                               indptr=indptr, indices=indices))

    def run(self, q, k, v, out=None, lse=None, return_lse=False, enable_pdl=None):
        p = self.plans[-1]                                         # a run uses the latest plan
        assert q.shape == (p["M"], p["num_qo_heads"], p["head_dim"]) and q.dtype == p["q_data_type"]
        assert k.shape == v.shape == (p["N"], p["num_kv_heads"], p["head_dim"])
        allow = torch.zeros(p["M"], p["N"], dtype=torch.bool)
        indptr, indices, R, C = p["indptr"], p["indices"], p["R"], p["C"]
        for i in range(p["M"] // R):
            for j in indices[indptr[i]:indptr[i + 1]].tolist():
                allow[i * R:(i + 1) * R, j * C:(j + 1) * C] = True
        group = p["num_qo_heads"] // p["num_kv_heads"]
        q64 = q.double().transpose(0, 1)                                          # [Hq, M, D]
        k64, v64 = (t.double().repeat_interleave(group, dim=1).transpose(0, 1) for t in (k, v))
        scores = (q64 @ k64.transpose(1, 2) * p["sm_scale"]).masked_fill(~allow, -math.inf)
        lse_e = torch.logsumexp(scores, dim=-1)                                   # [Hq, M]
        o = torch.softmax(scores, dim=-1) @ v64                                   # NaN on rows without a block
        o[~torch.isfinite(lse_e)] = math.nan
        self.nan_rows += int((~torch.isfinite(lse_e)).sum())
        o = o.transpose(0, 1).to(p["o_data_type"])
        lse2 = torch.where(torch.isfinite(lse_e), lse_e / math.log(2.0), math.nan).transpose(0, 1).float()
        if out is None:
            out = o
        else:
            assert out.shape == o.shape and out.dtype == o.dtype
            out.copy_(o)
        if not return_lse:
            return out
        if lse is None:
            lse = lse2
        else:
            assert lse.shape == lse2.shape and lse.dtype == torch.float32
            lse.copy_(lse2)
        return out, lse


def _check_standin() -> None:
    """FlashInfer's own example (docs: mask [[0, 0, 1], [1, 0, 1], [0, 1, 1]], R = C = 1), with 4 query heads over
    2 key heads, against a dense masked softmax: the stand-in itself keeps the documented semantics."""
    gen = torch.Generator().manual_seed(11)
    wrapper = StandInWrapper(torch.empty(8, dtype=torch.uint8))
    wrapper.plan(torch.tensor([0, 1, 3, 5], dtype=torch.int32), torch.tensor([2, 0, 2, 1, 2], dtype=torch.int32),
                 3, 3, 1, 1, 4, 2, 8, q_data_type=torch.float32)
    q, k, v = (torch.randn(3, h, 8, generator=gen) for h in (4, 2, 2))
    out, lse = wrapper.run(q, k, v, return_lse=True)
    allowed = torch.tensor([[0, 0, 1], [1, 0, 1], [0, 1, 1]], dtype=torch.bool)
    for h in range(4):
        s = (q[:, h].double() @ k[:, h // 2].double().T / math.sqrt(8)).masked_fill(~allowed, -math.inf)
        assert torch.allclose(out[:, h].double(), torch.softmax(s, -1) @ v[:, h // 2].double(), atol=1e-6)
        assert torch.allclose(lse[:, h].double(), torch.logsumexp(s, -1) / math.log(2.0), atol=1e-6)
    StandInWrapper.instances.clear()


@pytest.fixture
def standin(monkeypatch):
    """The ``flashinfer`` backend, on CPU tensors, over the stand-in module (everything restored after)."""
    _check_standin()
    module = types.ModuleType("flashinfer")
    module.__spec__ = importlib.machinery.ModuleSpec("flashinfer", None)    # found by the backend's import check
    module.BlockSparseAttentionWrapper = StandInWrapper
    monkeypatch.setitem(sys.modules, "flashinfer", module)
    monkeypatch.setattr(StandInWrapper, "instances", [])
    monkeypatch.setattr(flashinfer_backend, "_WORKSPACES", LruMemo(flashinfer_backend.WORKSPACES_KEPT))
    backend = sparsecore.registered_backends()["flashinfer"]
    if not torch.cuda.is_available():       # the stand-in passes the import check; only the CUDA one is left
        assert backend.unavailable_reason("cuda").startswith("torch.cuda.is_available() is False")
    monkeypatch.setattr(backend, "unavailable_reason", lambda device: None)
    monkeypatch.setattr(backend, "tensor_device_problem", lambda device, tensor_device: None)
    yield StandInWrapper.instances
    sparsecore.clear_cache()


H, H_KV, BATCH, D = 4, 2, 2, 64
Q_LEN, KV_LEN, R, C = 100, 80, 32, 16           # 3 query blocks of 32 and a short last one of 4; 5 key blocks of 16


def _mask(seed: int) -> BlockMask:
    """Per-head random lists with empty rows: head 1's third row, head 3's first, head 2's short last one."""
    rng = np.random.default_rng(seed)
    keep = rng.random((H, 4, KV_LEN // C)) < 0.45
    keep[:, :, 0] |= ~keep.any(axis=2)              # every other row keeps a block
    keep[1, 2] = keep[3, 0] = keep[2, 3] = False
    return BlockMask.from_dense(keep, Q_LEN, KV_LEN, R, C)


def _inputs(dtype: torch.dtype, seed: int) -> tuple[list[torch.Tensor], list[np.ndarray]]:
    gen = torch.Generator().manual_seed(seed)
    args = [torch.randn(BATCH, heads, length, D, generator=gen).to(dtype)
            for heads, length in ((H, Q_LEN), (H_KV, KV_LEN), (H_KV, KV_LEN))]
    return args, [a.double().numpy() for a in args]


def _compile(mask: BlockMask):
    return sparsecore.compile(mask, "cuda", backend="flashinfer", warmup="wait", cache=False)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_gqa_batch_short_last_block_and_empty_rows_match_the_oracle_at_two_scales(standin, dtype):
    mask = _mask(3)
    kernel = _compile(mask)
    (q, k, v), (q64, k64, v64) = _inputs(getattr(torch, dtype), 4)
    tokens = expand_to_tokens(mask)
    assert not tokens.any(axis=2).all(), "the case must have rows that keep no key"
    for scale in (None, 0.3):
        ref_out, ref_lse = dense_attention(q64, k64, v64, tokens, D ** -0.5 if scale is None else scale)
        out, lse = kernel(q, k, v, scale=scale, return_lse=True)
        assert kernel.backend.name == "flashinfer"
        assert out.dtype == q.dtype and lse.dtype == torch.float32
        assert_matches(dtype, out.double().numpy(), lse.numpy(), ref_out, ref_lse)
        assert_matches(dtype, kernel(q, k, v, scale=scale).double().numpy(), None, ref_out, ref_lse)
    plans = [p for w in standin for p in w.plans]          # a wrapper and a plan per scale
    assert sum(w.nan_rows for w in standin) > 0, "the stand-in wrote no NaN row: the empty-row fix-up did not run"
    assert [p["sm_scale"] for p in plans] == [D ** -0.5, 0.3]
    assert {(p["M"], p["N"], p["R"], p["C"], p["num_qo_heads"], p["num_kv_heads"]) for p in plans} == \
        {(BATCH * H * 4 * R, BATCH * H_KV * KV_LEN, R, C, 1, 1)}          # heads folded into rows, padded to 4 x R


def test_a_plan_is_made_once_per_scale_and_batch_and_reused(standin):
    """``prepare`` plans the default scale's wrapper; calls with it reuse that plan, a new scale or batch size plans
    once more (a plan keyed without the scale would run the second scale with the first one's)."""
    mask = _mask(5)
    kernel = _compile(mask)
    (q, k, v), (q64, k64, v64) = _inputs(torch.float16, 6)
    kernel.prepare(q, k, v)
    assert sum(len(w.plans) for w in standin) == 1
    tokens = expand_to_tokens(mask)
    for scale in (None, 0.5, None, 0.5):
        out, lse = kernel(q, k, v, scale=scale, return_lse=True)
        ref_out, ref_lse = dense_attention(q64, k64, v64, tokens, D ** -0.5 if scale is None else scale)
        assert_matches("float16", out.double().numpy(), lse.numpy(), ref_out, ref_lse)
    assert sum(len(w.plans) for w in standin) == 2
    one = [t[:1] for t in (q, k, v)]
    out = kernel(*one, scale=0.5)
    ref_out, ref_lse = dense_attention(q64[:1], k64[:1], v64[:1], tokens, 0.5)
    assert_matches("float16", out.double().numpy(), None, ref_out, ref_lse)
    assert sum(len(w.plans) for w in standin) == 3


def test_calls_on_two_streams_plan_apart_over_their_own_workspaces(standin, monkeypatch):
    """The wrapper's kernels may keep split rows' partial results in the float workspace, so two streams share
    neither a plan nor a workspace; calls on one stream reuse both. (Stand-in streams: CPU tensors have none.)"""
    current = {"stream": "stream a"}
    monkeypatch.setattr(flashinfer_backend, "caller_stream", lambda q: current["stream"])
    mask = _mask(8)
    kernel = _compile(mask)
    (q, k, v), (q64, k64, v64) = _inputs(torch.float16, 9)
    ref_out, ref_lse = dense_attention(q64, k64, v64, expand_to_tokens(mask), D ** -0.5)
    for stream in ("stream a", "stream b", "stream a", "stream b"):
        current["stream"] = stream
        out, lse = kernel(q, k, v, return_lse=True)
        assert_matches("float16", out.double().numpy(), lse.numpy(), ref_out, ref_lse)
    assert len(standin) == 2 and [len(w.plans) for w in standin] == [1, 1]
    assert standin[0].workspace.data_ptr() != standin[1].workspace.data_ptr()
    current["stream"] = "stream a"
    kernel(q, k, v, scale=0.3)                      # a new plan on stream a: its workspace again
    assert len(standin) == 3 and standin[2].workspace is standin[0].workspace


def test_a_launch_keeps_only_its_most_recently_used_plans(standin):
    """A caller varying the scale per call grew the launch's planned wrappers without bound (each holds FlashInfer's
    8 MiB int workspace on the device, its pinned host copy and the folded lists): the launch keeps the
    ``PLANS_KEPT`` most recently used. A scale used again is not planned again while kept; one evicted is planned
    once more; every call matches the oracle."""
    kept = flashinfer_backend.PLANS_KEPT
    assert kept >= 4, "the sequence below evicts scales 2, 3 and 4 only where at least 4 are kept"
    mask = _mask(8)
    kernel = _compile(mask)
    (q, k, v), (q64, k64, v64) = _inputs(torch.float16, 9)
    tokens = expand_to_tokens(mask)
    scales = [0.05 * (i + 1) for i in range(kept + 3)]

    def call(scale: float) -> None:
        ref_out, ref_lse = dense_attention(q64, k64, v64, tokens, scale)
        assert_matches("float16", kernel(q, k, v, scale=scale).double().numpy(), None, ref_out, ref_lse)

    for scale in scales[:kept] + [scales[0]]:       # the oldest used again: now the most recent
        call(scale)
    assert len(standin) == kept
    for scale in scales[kept:] + [scales[0]]:       # 3 more evict scales 1, 2 and 3; scale 0 is still kept
        call(scale)
    assert len(standin) == kept + 3
    call(scales[1])                                 # evicted: planned again (evicting scale 4)
    assert len(standin) == kept + 4
    made = [weakref.ref(wrapper) for wrapper in standin]
    standin.clear()                                 # the stand-in's own list held every wrapper
    gc.collect()
    alive = sorted(ref().plans[-1]["sm_scale"] for ref in made if ref() is not None)
    assert alive == pytest.approx(sorted(set(scales) - {scales[2], scales[3], scales[4]}))


@pytest.mark.parametrize("scale", [-20.0, -0.125, 0.0])
def test_scales_flashinfer_gets_wrong_run_as_the_same_scores_at_a_positive_one(standin, scale):
    """A negative scale runs as ``-q`` at ``-scale``, zero as ``q * 0`` at 1 (``backends/cuda/positive_scale.py``):
    FlashInfer's plan gets a positive ``sm_scale`` (the stand-in refuses others, as the H200 got them wrong)."""
    mask = _mask(4)
    kernel = _compile(mask)
    (q, k, v), (q64, k64, v64) = _inputs(torch.float16, 9)
    out, lse = kernel(q, k, v, scale=scale, return_lse=True)
    ref_out, ref_lse = dense_attention(q64, k64, v64, expand_to_tokens(mask), scale)
    assert_matches("float16", out.double().numpy(), lse.numpy(), ref_out, ref_lse)
    assert [p["sm_scale"] for w in standin for p in w.plans] == [-scale if scale else 1.0]


@pytest.mark.parametrize("head_dim, scale", [(128, None), (64, -0.5), (64, 0.0)])
def test_prepare_plans_the_wrapper_the_call_then_uses(standin, monkeypatch, head_dim, scale):
    """``prepare`` plans at the scale the call runs with: 1/sqrt(D) as the call computes it (at D = 128 it differs
    from ``D ** -0.5`` in the last bit), and a negative or zero scale as FlashInfer gets it."""
    monkeypatch.setattr(sys.modules[__name__], "D", head_dim)
    kernel = _compile(_mask(7))
    (q, k, v), _ = _inputs(torch.float16, 10)
    kernel.prepare(q, k, v, scale=scale)
    kernel(q, k, v, scale=scale)
    assert len([p for w in standin for p in w.plans]) == 1


@pytest.mark.parametrize("scale", [None, 0.3])
def test_an_all_empty_mask_gives_zeros_and_minus_inf_without_a_plan(standin, scale):
    """No row lists a block: output 0 and LSE -inf (float32) everywhere, and FlashInfer is not handed an empty
    plan (the lowering says its plan needs one block), by a call or by ``prepare``."""
    empty = BlockMask.from_dense(np.zeros((H, 4, KV_LEN // C), dtype=bool), Q_LEN, KV_LEN, R, C)
    kernel = _compile(empty)
    (q, k, v), (q64, k64, v64) = _inputs(torch.float16, 8)
    kernel.prepare(q, k, v)
    out, lse = kernel(q, k, v, scale=scale, return_lse=True)
    ref_out, ref_lse = dense_attention(q64, k64, v64, expand_to_tokens(empty), 0.3 if scale else D ** -0.5)
    assert lse.dtype == torch.float32 and out.dtype == torch.float16
    assert_matches("float16", out.double().numpy(), lse.numpy(), ref_out, ref_lse)
    assert bool((out == 0).all()) and bool(torch.isneginf(lse).all())
    assert sum(len(w.plans) for w in standin) == 0


def test_an_all_empty_mask_gives_a_float32_lse_and_a_contiguous_output_whatever_the_default_dtype(standin):
    """The LSE followed torch's default dtype and the output q's strides (a transposed view)."""
    empty = BlockMask.from_dense(np.zeros((H, 4, KV_LEN // C), dtype=bool), Q_LEN, KV_LEN, R, C)
    (q, k, v), _ = _inputs(torch.float16, 8)
    q = q.transpose(2, 3).contiguous().transpose(2, 3)
    torch.set_default_dtype(torch.float64)
    try:
        out, lse = _compile(empty)(q, k, v, return_lse=True)
    finally:
        torch.set_default_dtype(torch.float32)
    assert lse.dtype == torch.float32 and out.is_contiguous() and out.dtype == torch.float16


def test_a_short_last_query_block_below_four_tokens_is_taken(standin):
    """The lowering pads the last query block to the others' size R: min_q_block holds for R (a 1-token last block
    was refused); one query block of 3 tokens is still refused."""
    keep = np.random.default_rng(0).random((2, 4, 4)) < 0.6
    keep[:, :, 0] = True
    mask = BlockMask.from_dense(keep, 49, 64, 16, 16)
    kernel = _compile(mask)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 64, generator=g).half() for n in (49, 64, 64))
    out, lse = kernel(q, k, v, return_lse=True)
    ref_out, ref_lse = dense_attention(*(t.double().numpy() for t in (q, k, v)), expand_to_tokens(mask), 64 ** -0.5)
    assert_matches("float16", out.double().numpy(), lse.numpy(), ref_out, ref_lse)
    assert "min_q_block" in " ".join(flashinfer_backend.FlashInferBackend.capabilities.mask_problems(
        BlockMask.from_dense(np.ones((1, 1, 2), bool), 3, 32, 16, 16)))
