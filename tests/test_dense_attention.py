"""Dense attention through a backend's faster dense op: the search's dense pass, FA4's stand-in, the diffusers path.

The float64 oracle (``oracle.dense_attention``) stands in for a backend's faster dense op on CPU, so the
tests check what reaches it and what comes back (layout, scale, GQA, LSE, which calls take it), against
the model's own attention and the oracle itself.
"""

from __future__ import annotations

import contextlib
import sys
import types

import numpy as np
import pytest
import torch
from diffusers.models.attention_dispatch import attention_backend
from oracle import dense_attention as oracle_attention
from test_integration_diffusers import CASES, check_dense_path_on_a_prefix, forward
from tolerances import LSE_ABS, OUT_REL

from sparsecore.backends.cuda import fa4_dense
from sparsecore.integrations import diffusers as sparse
from sparsecore.registry import DenseOp, registered_backends
from sparsecore import search
from sparsecore.search import cudnn_or_full_mask, dense_attention, dense_impl, faster_dense_allowed


def oracle_run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, return_lse: bool):
    """A dense op's contract computed by the float64 oracle, in q's dtype (LSE float32)."""
    tokens = np.ones((q.shape[1], q.shape[2], k.shape[2]), dtype=bool)
    out, lse = oracle_attention(q.double().numpy(), k.double().numpy(), v.double().numpy(), tokens, scale)
    return torch.from_numpy(out).to(q.dtype), (torch.from_numpy(lse).float() if return_lse else None)


class CountingOp:
    """A registered dense op on CPU that counts its calls."""

    def __init__(self, reason: str | None = None) -> None:
        self.calls: list[tuple[int, ...]] = []
        self.reason = reason

    def run(self, q, k, v, scale, return_lse):
        self.calls.append(tuple(q.shape))
        return oracle_run(q, k, v, scale, return_lse)

    def supports(self, q, k, v):
        return self.reason


@pytest.fixture
def counting_op(monkeypatch) -> CountingOp:
    """The ``portable`` backend (CPU) offers a dense op measured "faster": the oracle, counted."""
    op = CountingOp()
    monkeypatch.setattr(registered_backends()["portable"], "dense", DenseOp(run=op.run, supports=op.supports))
    return op


def inputs(group: int = 1, seed: int = 0, heads: int = 4, q_len: int = 24, kv_len: int = 40, dim: int = 16):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, q_len, dim, generator=gen)
    k, v = (torch.randn(2, heads // group, kv_len, dim, generator=gen) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("group", [1, 2])
def test_the_dense_pass_takes_a_registered_faster_op(counting_op, group):
    q, k, v = inputs(group)
    assert dense_impl(q, k, v) == "portable"
    out, lse = dense_attention(q, k, v, scale=0.3)
    tokens = np.ones((4, 24, 40), dtype=bool)
    want_out, want_lse = oracle_attention(q.numpy(), k.numpy(), v.numpy(), tokens, 0.3)
    np.testing.assert_allclose(out.double().numpy(), want_out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lse.double().numpy(), want_lse, rtol=1e-5, atol=1e-5)
    assert counting_op.calls == [tuple(q.shape)]


@pytest.mark.parametrize("group", [1, 2])
def test_the_default_dense_pass_takes_the_scale(group):
    q, k, v = inputs(group)
    assert dense_impl(q, k, v) == "full mask"
    out, lse = dense_attention(q, k, v, scale=0.3)
    want_out, want_lse = oracle_attention(q.numpy(), k.numpy(), v.numpy(), np.ones((4, 24, 40), dtype=bool), 0.3)
    np.testing.assert_allclose(out.double().numpy(), want_out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lse.double().numpy(), want_lse, rtol=1e-5, atol=1e-5)


def test_an_op_that_declines_leaves_the_default(counting_op):
    counting_op.reason = "head dim 16: not measured"
    q, k, v = inputs()
    assert dense_impl(q, k, v) == "full mask"
    out, _ = dense_attention(q, k, v)
    want, _ = oracle_attention(q.numpy(), k.numpy(), v.numpy(), np.ones((4, 24, 40), dtype=bool), 16 ** -0.5)
    np.testing.assert_allclose(out.double().numpy(), want, rtol=1e-5, atol=1e-6)
    assert counting_op.calls == []


def test_fa4_dense_declines_what_was_not_measured_with_the_reason(monkeypatch):
    q, k, v = inputs()
    assert "CUDA" in fa4_dense.supports(q, k, v)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))      # past the device check
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(fa4_dense, "_unavailable", lambda device: None)
    q, k, v = inputs(dim=128, q_len=fa4_dense.MIN_TOKENS, kv_len=fa4_dense.MIN_TOKENS, heads=2)
    half = [t.to(torch.bfloat16) for t in (q, k, v)]
    assert fa4_dense.supports(*half) is None
    assert "dtypes" in fa4_dense.supports(q, k, v)                                # float32
    assert "head dims" in fa4_dense.supports(half[0][..., :32], half[1][..., :32], half[2][..., :32])
    assert "tokens" in fa4_dense.supports(half[0][:, :, :1000], half[1], half[2])
    assert "heads" in fa4_dense.supports(half[0][:, :1], half[1], half[2])       # 1 query head, 2 key heads
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (10, 0))
    assert "10.0" in fa4_dense.supports(*half)


def _stand_in_flash_attn_fwd(q, k, v, *, softmax_scale, causal, return_lse, out):
    """FA4's private forward contract (``[B, S, H, D]`` in, written into ``out``), in float64 on CPU; a positive
    scale only (its softmax scales after the raw row maximum: NaN on the H200 at -20,
    backends/cuda/positive_scale.py)."""
    assert softmax_scale > 0 and not causal and all(t.stride(-1) == 1 for t in (q, k, v, out))
    assert out.shape == q.shape[:3] + v.shape[-1:] and out.dtype == q.dtype
    result, lse = oracle_run(*(t.transpose(1, 2) for t in (q, k, v)), softmax_scale, True)
    out.copy_(result.transpose(1, 2))
    return out, (lse if return_lse else None), None, None, None


def install_forward(monkeypatch, forward) -> None:
    """``flash_attn.cute.interface._flash_attn_fwd`` replaced by ``forward`` (FA4 itself need not be installed)."""
    interface = types.ModuleType("flash_attn.cute.interface")
    interface._flash_attn_fwd = forward
    cute = types.ModuleType("flash_attn.cute")
    cute.interface = interface
    for name, module in (("flash_attn", types.ModuleType("flash_attn")), ("flash_attn.cute", cute),
                         ("flash_attn.cute.interface", interface)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())


@pytest.mark.parametrize("scale", [0.25, -20.0, 0.0])
@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("return_lse", [True, False])
def test_fa4_dense_writes_head_major_output_through_a_stand_in(monkeypatch, group, return_lse, scale):
    install_forward(monkeypatch, _stand_in_flash_attn_fwd)
    q, k, v = inputs(group, seed=1)
    q_seq = q.transpose(1, 2).contiguous().transpose(1, 2)          # [B, H, S, D] views of [B, S, H, D] memory
    out, lse = fa4_dense.run(q_seq, k, v, scale, return_lse)
    assert out.shape == (2, 4, 24, 16) and out.is_contiguous()
    want_out, want_lse = oracle_attention(q.numpy(), k.numpy(), v.numpy(), np.ones((4, 24, 40), dtype=bool), scale)
    np.testing.assert_allclose(out.double().numpy(), want_out, rtol=1e-5, atol=1e-6)
    if return_lse:
        np.testing.assert_allclose(lse.double().numpy(), want_lse, rtol=1e-5, atol=1e-5)
    else:
        assert lse is None


def test_fa4_dense_refuses_an_output_fa4_did_not_write_into_out(monkeypatch):
    """A flash-attn-4 whose private forward returned its own tensor (not ``out=``) would leave ``out`` unwritten."""
    def own_output(q, k, v, *, out, **kwargs):
        written, *rest = _stand_in_flash_attn_fwd(q, k, v, out=out, **kwargs)
        return (written.clone(), *rest)
    install_forward(monkeypatch, own_output)
    q, k, v = inputs(1, seed=1)
    with pytest.raises(RuntimeError, match="not the out= it was given.*dense_attention='model'"):
        fa4_dense.run(q, k, v, 0.25, True)


# ------------------------------------------------------------------ diffusers: the dense steps
ADASPA = {"warmup_steps": 2, "search_steps": (2,), "sparsity": 0.5, "first_search": "cached"}


def adaspa_run(case, dense_attention_setting: str, context=contextlib.nullcontext):
    model, inputs_ = case.build(), case.inputs(batch=1, text="same")
    reference = [forward(model, inputs_, t) for t in (999.0, 800.0)]
    handle = sparse.apply(model, method="adaspa", device="cpu", num_steps=4, dense_attention=dense_attention_setting,
                          **ADASPA)
    try:
        with context():
            outputs = [forward(model, inputs_, t) for t in (999.0, 800.0)]
    finally:
        handle.remove()
    return reference, outputs, {(row["layer"], row["step"]): row["dense_kernel"] for row in handle.stats()}


# Calls of the op in steps 0 and 1 (2 layers each; Wan VACE 3): step 0's dense attention; step 1's dense pass that
# gives the search its LSE and the step its output, on the valid tokens where text padding makes the sequence longer
# (HunyuanVideo 1.5 and 1.0, Mochi: until 2026-12-04 they ran a second pass there, for the search's LSE).
CALLS = {"wan": 2 + 2, "hunyuan": 2 + 2, "hunyuan-1.0": 2 + 2, "cogvideox": 2 + 2, "cogvideox-1.5": 2 + 2,
         "wan-vace": 3 + 3, "wan-animate": 2 + 2, "skyreels-v2": 2 + 2, "mochi": 2 + 2, "ltx": 2 + 2,
         "ltx2": 2 + 2, "kandinsky-5": 2 + 2, "cosmos": 2 + 2}


@pytest.mark.parametrize("name", sorted(CASES))
def test_dense_steps_run_the_faster_op_and_give_the_models_output(counting_op, name):
    reference, outputs, kernels = adaspa_run(CASES[name], "auto")
    for got, expected in zip(outputs, reference):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert len(counting_op.calls) == CALLS[name]
    assert set(kernels.values()) == {"portable"}     # the stats name the dense kernel of every dense row


def test_dense_attention_model_keeps_diffusers_dispatch(counting_op):
    reference, outputs, kernels = adaspa_run(CASES["wan"], "model")
    for got, expected in zip(outputs, reference):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert counting_op.calls == []                   # nor the pass that gives the search its LSE
    assert kernels == {(0, 0): "model", (1, 0): "model", (0, 1): "full mask", (1, 1): "full mask"}   # (CPU: no cuDNN)


@pytest.mark.parametrize("name", sorted(CASES))
def test_dense_attention_model_keeps_the_methods_own_lse_passes_off_the_faster_op(counting_op, name):
    """HunyuanVideo's text padding makes AdaSpa's session compute its search's LSE itself (search.dense_lse)."""
    adaspa_run(CASES[name], "model")
    assert counting_op.calls == []


def test_without_diffusers_backend_registry_the_models_dispatch_runs(counting_op, monkeypatch):
    from diffusers.models import attention_dispatch
    monkeypatch.delattr(attention_dispatch, "_AttentionBackendRegistry")
    model = CASES["wan"].build()
    handle = sparse.apply(model, method="lvsa", device="cpu")
    try:
        processor = CASES["wan"].attention(model)[0].processor
        q = torch.randn(1, 64, 2, 16, generator=torch.Generator().manual_seed(0))
        assert processor.faster_dense(q, q, q) is None
    finally:
        handle.remove()


def test_sparse_rows_name_no_dense_kernel(counting_op):
    model, inputs_ = CASES["wan"].build(), CASES["wan"].inputs(batch=1)
    handle = sparse.apply(model, method="adaspa", device="cpu", num_steps=4, **ADASPA)
    try:
        for t in (999.0, 800.0, 600.0):
            forward(model, inputs_, t)
    finally:
        handle.remove()
    rows = handle.stats()
    assert all(("dense_kernel" in row) == (row["backend"] == "dense") for row in rows)
    assert {row["backend"] for row in rows} == {"dense", "portable"}


def test_guidance_calls_of_a_step_name_every_kernel_they_ran(counting_op):
    """Two forwards per step (classifier-free guidance as separate calls): the step that keeps the LSE runs its pass
    at the first call and the model's attention at the second."""
    model, inputs_ = CASES["wan"].build(), CASES["wan"].inputs(batch=1)
    handle = sparse.apply(model, method="adaspa", device="cpu", num_steps=4, dense_attention="model", **ADASPA)
    try:
        for t in (999.0, 999.0, 800.0, 800.0):
            forward(model, inputs_, t)
    finally:
        handle.remove()
    kernels = {(row["layer"], row["step"]): row["dense_kernel"] for row in handle.stats()}
    assert kernels == {(0, 0): "model", (1, 0): "model", (0, 1): "full mask+model", (1, 1): "full mask+model"}


def test_a_chosen_attention_backend_is_kept(counting_op):
    _, outputs, _ = adaspa_run(CASES["wan"], "auto", lambda: attention_backend("_native_math"))
    assert len(counting_op.calls) == 2               # the pass that gives the search its LSE only (sparsecore's)
    model = CASES["wan"].build()
    for module in CASES["wan"].attention(model):
        module.set_attention_backend("_native_math")
    handle = sparse.apply(model, method="adaspa", device="cpu", num_steps=4, **ADASPA)
    try:
        forward(model, CASES["wan"].inputs(batch=1), 999.0)
    finally:
        handle.remove()
    assert len(counting_op.calls) == 2


@pytest.mark.parametrize("tokens", [37, 40])
def test_the_faster_dense_op_takes_the_valid_prefix_and_gives_padding_rows_zero(counting_op, tokens):
    check_dense_path_on_a_prefix(tokens)
    assert counting_op.calls == [(2, 2, tokens, 16)]


@pytest.mark.parametrize("value", ["fast", None, 1])
def test_bad_dense_attention_settings_are_refused(value):
    with pytest.raises(ValueError if isinstance(value, str) else TypeError, match="dense_attention"):   # apply's doc
        sparse.apply(CASES["wan"].build(), method="lvsa", device="cpu", dense_attention=value)


@pytest.mark.parametrize("is_cuda, dtype, head_dim, enabled, verdict, want", [
    (True, torch.bfloat16, 128, True, True, "cudnn"),
    (True, torch.float16, 64, True, True, "cudnn"),
    (True, torch.bfloat16, 128, True, False, "full mask"),         # torch's cuDNN refuses (GPU, cuDNN, strides)
    (False, torch.bfloat16, 128, True, None, "full mask"),
    (True, torch.float32, 128, True, None, "full mask"),
    (True, torch.float16, 60, True, None, "full mask"),
    (True, torch.float16, 256, True, None, "full mask"),
    (True, torch.float16, 64, False, None, "full mask"),
])
def test_cudnn_runs_only_where_every_fact_and_torchs_verdict_allow_it(is_cuda, dtype, head_dim, enabled, verdict,
                                                                        want):
    """torch's verdict decides among the inputs the rest allow, and is not asked (no SDPAParams built) otherwise."""
    asked = []

    def torch_takes():
        asked.append(True)
        return verdict

    assert cudnn_or_full_mask(is_cuda, dtype, head_dim, enabled, torch_takes) == want
    assert asked == ([True] if verdict is not None else [])


class ClaimsCuda(torch.Tensor):
    """A CPU tensor that answers ``is_cuda`` True: dense_impl's CUDA branch on a machine without a GPU."""

    is_cuda = True


@pytest.mark.parametrize("verdict, want", [(True, "cudnn"), (False, "full mask")])
@pytest.mark.parametrize("group", [1, 3])
def test_dense_impl_asks_torchs_cudnn_check_on_the_tensors_the_call_passes(monkeypatch, verdict, want, group):
    """cuDNN was named on CUDA for fp16/bf16 and head dims 8..128 whatever torch's cuDNN takes (GQA head counts,
    strides, compute capability, cuDNN version). Now torch is asked, on what ``_scaled_dot_product_cudnn_attention``
    gets: q as given, keys and values repeated to every query head (contiguous), no mask, dropout or causality."""
    seen = []

    def can_use_cudnn_attention(params, debug=False):
        seen.append(params)
        return verdict

    monkeypatch.setattr(torch.backends.cuda, "can_use_cudnn_attention", can_use_cudnn_attention)
    monkeypatch.setattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: True)
    q, k, v = (t.to(torch.bfloat16) for t in inputs(group=group, heads=6, dim=64))
    q = q.transpose(2, 3).contiguous().transpose(2, 3).as_subclass(ClaimsCuda)     # strides as given, not contiguous
    with faster_dense_allowed(False):
        assert dense_impl(q, k, v) == want
    (params,) = seen
    assert params.query.data_ptr() == q.data_ptr() and params.query.stride() == q.stride()
    assert params.attn_mask is None and params.dropout == 0.0 and not params.is_causal and not params.enable_gqa
    repeated = k.repeat_interleave(group, dim=1)
    for given, original in ((params.key, k), (params.value, v)):
        assert given.shape == repeated.shape and given.stride() == repeated.stride() and given.dtype == k.dtype
        assert (given.data_ptr() == original.data_ptr()) == (group == 1)          # MHA: the tensors themselves


@pytest.mark.parametrize("q_len, contiguous, stand_in_is_q", [(40, True, True), (40, False, False),
                                                                (24, True, False)])
def test_a_gqa_check_asks_on_q_itself_where_it_has_the_repeated_keys_shape(monkeypatch, q_len, contiguous,
                                                                           stand_in_is_q):
    """Self-attention with GQA: q has the repeated keys' shape, dtype and (when contiguous) strides, so the check
    asks on q and allocates nothing (an uninitialised stand-in took as much memory as the repeated keys); a
    transposed q, or one of another length, gets the stand-in of the repeated shape as before."""
    seen = []

    def can_use_cudnn_attention(params, debug=False):
        seen.append(params)
        return True

    monkeypatch.setattr(torch.backends.cuda, "can_use_cudnn_attention", can_use_cudnn_attention)
    q, k, v = (t.to(torch.bfloat16) for t in inputs(group=2, heads=6, q_len=q_len, kv_len=40, dim=64))
    if not contiguous:
        q = q.transpose(2, 3).contiguous().transpose(2, 3)
    assert search.cudnn_takes(q, k, v)
    (params,) = seen
    repeated = k.repeat_interleave(2, dim=1)
    for given in (params.key, params.value):
        assert given.shape == repeated.shape and given.stride() == repeated.stride() and given.dtype == k.dtype
        assert (given.data_ptr() == q.data_ptr()) == stand_in_is_q


def test_the_cudnn_check_works_on_the_oldest_torch_pyproject_allows(monkeypatch):
    """pyproject allows torch 2.4, whose ``SDPAParams`` takes no ``enable_gqa`` (a TypeError at every search step's
    dense pass) and which may lack ``can_use_cudnn_attention`` (then the facts checked before it decide, as before)."""
    real, built = torch.backends.cuda.SDPAParams, []

    def params_without_gqa(*args):
        if len(args) != 6:
            raise TypeError(f"SDPAParams() takes 6 positional arguments but {len(args)} were given")
        built.append(args)
        return real(*args, False)

    monkeypatch.setattr(torch.backends.cuda, "SDPAParams", params_without_gqa)
    monkeypatch.setattr(torch.backends.cuda, "can_use_cudnn_attention", lambda params, debug=False: True)
    q, k, v = (t.to(torch.bfloat16) for t in inputs(dim=64))
    assert search.cudnn_takes(q, k, v) and len(built) == 1
    monkeypatch.delattr(torch.backends.cuda, "can_use_cudnn_attention")
    assert search.cudnn_takes(q, k, v) and len(built) == 1                 # nothing to ask: nothing built


def test_cudnn_check_is_not_asked_off_cuda(monkeypatch):
    monkeypatch.setattr(search, "cudnn_takes", lambda *args: pytest.fail("torch's cuDNN check asked for CPU inputs"))
    q, k, v = (t.half() for t in inputs(dim=64))
    with faster_dense_allowed(False):
        assert dense_impl(q, k, v) == "full mask"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("dim, group", [(128, 1), (64, 1), (64, 2), (128, 4)])
def test_the_cudnn_dense_pass_matches_the_float64_oracle_on_a_gpu(dtype, dim, group):
    """The search's dense pass where cuDNN runs it (the backends' faster ops off): out and LSE against the float64
    oracle on odd lengths, MHA and GQA (keys repeated before cuDNN), head dims 64 and 128."""
    if not torch.cuda.is_available():
        pytest.skip(f"torch.cuda.is_available() is False in torch {torch.__version__}: cuDNN attention runs on CUDA")
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(1, 4, 1031, dim, generator=gen)
    k, v = (torch.randn(1, 4 // group, 777, dim, generator=gen) for _ in range(2))
    q, k, v = (t.to("cuda", getattr(torch, dtype)) for t in (q, k, v))
    with faster_dense_allowed(False):
        impl = dense_impl(q, k, v)
        out, lse = dense_attention(q, k, v, 0.1)
    if torch.cuda.get_device_capability()[0] == 9:
        assert impl == "cudnn"                       # H100/H200: torch's cuDNN takes these (what the lead measures)
    tokens = np.ones((4, 1031, 777), dtype=bool)
    want_out, want_lse = oracle_attention(*(t.double().cpu().numpy() for t in (q, k, v)), tokens, 0.1)
    got = out.double().cpu().numpy()
    assert out.shape == q.shape and lse.shape == (1, 4, 1031) and lse.dtype == torch.float32
    assert np.linalg.norm(got - want_out) / np.linalg.norm(want_out) <= OUT_REL[dtype], impl
    assert np.abs(lse.double().cpu().numpy() - want_lse).max() / max(1.0, np.abs(want_lse).max()) <= LSE_ABS[dtype], \
        impl


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("dim, group", [(128, 1), (64, 2)])
def test_fa4_dense_matches_the_float64_oracle_on_a_gpu(dtype, dim, group):
    """What the dense steps run on an H200 (FlashAttention-4's forward), on odd lengths, GQA, both dtypes."""
    if not torch.cuda.is_available():
        pytest.skip(f"torch.cuda.is_available() is False in torch {torch.__version__}: FA4's dense forward runs on "
                    f"CUDA only")
    reason = fa4_dense._unavailable(str(torch.device("cuda", torch.cuda.current_device())))
    if reason is None and torch.cuda.get_device_capability()[0] != 9:
        reason = f"compute capability {torch.cuda.get_device_capability()}: the op is measured on 9.x only"
    if reason is not None:
        pytest.skip(f"the fa4 backend's dense op is not usable here: {reason}")
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(1, 4, 1031, dim, generator=gen)
    k, v = (torch.randn(1, 4 // group, 777, dim, generator=gen) for _ in range(2))
    q, k, v = (t.to("cuda", getattr(torch, dtype)) for t in (q, k, v))
    out, lse = fa4_dense.run(q, k, v, 0.1, True)
    tokens = np.ones((4, 1031, 777), dtype=bool)
    want_out, want_lse = oracle_attention(*(t.double().cpu().numpy() for t in (q, k, v)), tokens, 0.1)
    got = out.double().cpu().numpy()
    assert np.linalg.norm(got - want_out) / np.linalg.norm(want_out) <= OUT_REL[dtype]
    assert np.abs(lse.double().cpu().numpy() - want_lse).max() / max(1.0, np.abs(want_lse).max()) <= LSE_ABS[dtype]
    long = torch.empty(1, 2, fa4_dense.MIN_TOKENS, dim, device="cuda", dtype=q.dtype)
    assert dense_impl(long, long, long) == "fa4"                  # what the dense steps take at this length


def test_diffusers_context_parallel_dispatch_stays_diffusers(counting_op, monkeypatch):
    """A call that diffusers' own context parallelism runs (``parallel=True`` with a parallel config) keeps its
    dispatch; a rank's local call inside the all-to-alls (``parallel=False``, Ulysses) takes the faster op."""
    from sparsecore.integrations.diffusers import processors
    seen = []
    monkeypatch.setattr(processors, "dispatch_attention_fn",
                        lambda query, *args, **kwargs: seen.append(kwargs["parallel_config"]) or query)
    model = CASES["wan"].build()
    handle = sparse.apply(model, method="lvsa", device="cpu")
    try:
        processor = CASES["wan"].attention(model)[0].processor
        q, k, v = (torch.randn(1, 64, 2, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
        config = object()
        processor.original._parallel_config = config
        processor.dispatch(q, k, v, None, parallel=True)
        assert seen == [config] and counting_op.calls == []
        processor.dispatch(q, k, v, None, parallel=False)
        assert seen == [config] and counting_op.calls == [(1, 2, 64, 16)]
        processor.original._parallel_config = None
        processor.dispatch(q, k, v, torch.ones(1, 1, 64, 64, dtype=torch.bool), parallel=True)   # a mask: diffusers
        assert seen == [config, None] and len(counting_op.calls) == 1
    finally:
        handle.remove()
