"""sparsecore.compile: device and backend selection, errors, caching, and call-time input checks."""

from __future__ import annotations

import dataclasses
import math
import re
import subprocess
import sys
import warnings
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import pytest
import torch

import sparsecore
from sparsecore import BlockMask, Capabilities, UnsupportedError
from sparsecore import registry
from sparsecore.search import dense_attention

from host_reads import HostReads
from oracle import dense_attention as oracle_attention, expand_to_tokens


def mask() -> BlockMask:
    return BlockMask.from_dense(np.random.default_rng(1).random((4, 3, 2)) < 0.6, 40, 30, 16)


def tensors(dtype=torch.float32, heads=4, kv_heads=2, q_len=40, kv_len=30, dim=8):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, q_len, dim, generator=g, dtype=dtype)
    k = torch.randn(1, kv_heads, kv_len, dim, generator=g, dtype=dtype)
    return q, k, torch.randn_like(k)


def test_unknown_device_lists_known_ones():
    with pytest.raises(ValueError, match=r"device='tpu' is not known; known devices: .*cpu.*reference"):
        sparsecore.compile(mask(), device="tpu")


def test_device_must_be_a_string_or_a_torch_device():
    with pytest.raises(TypeError, match=r"device: expected a string such as 'cpu' or 'cuda:0', or a torch.device"):
        sparsecore.compile(mask(), device=0)
    by_string = sparsecore.compile(mask(), device="cpu")
    assert sparsecore.compile(mask(), device=torch.device("cpu")) is by_string      # the same kernel, cached
    with pytest.raises(ValueError, match=r"device='meta' is not known"):
        sparsecore.compile(mask(), device=torch.device("meta"))


def test_known_device_that_cannot_run_here_says_why():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the test is about machines without it")
    with pytest.raises(RuntimeError, match=r"no backend can run on device 'cuda' here: .*is_available\(\) is False"):
        sparsecore.compile(mask(), device="cuda")


def test_mask_must_be_a_block_mask():
    with pytest.raises(TypeError, match=r"mask: expected a sparsecore.ir.BlockMask, got ndarray"):
        sparsecore.compile(np.ones((1, 2, 2), bool), device="cpu")


def test_backend_errors():
    with pytest.raises(ValueError, match=r"backend='nope' is not registered; registered: .*portable.*reference"):
        sparsecore.compile(mask(), device="cpu", backend="nope")
    with pytest.raises(UnsupportedError, match=r"backend 'reference' compiles for \['reference'\], not device 'cpu'"):
        sparsecore.compile(mask(), device="cpu", backend="reference")


def test_options_are_checked():
    with pytest.raises(TypeError, match=r"backend 'portable' got unknown option\(s\) \['tile'\]; accepted: chunk_elements"):
        sparsecore.compile(mask(), device="cpu", tile=3)
    with pytest.raises(ValueError, match=r"chunk_elements: expected a positive int, got 0"):
        sparsecore.compile(mask(), device="cpu", chunk_elements=0)
    with pytest.raises(TypeError, match=r"backend 'reference' got unknown option\(s\) \['x'\]; accepted: none"):
        sparsecore.compile(mask(), device="reference", x=1)


def test_kernels_are_cached_by_structure_and_options():
    sparsecore.clear_cache()
    m = mask()
    first = sparsecore.compile(m, device="cpu")
    relabeled = BlockMask(m.num_heads, m.q_offsets, m.kv_offsets, m.indptr, m.indices, meta={"step": 9})
    assert sparsecore.compile(relabeled, device="cpu")._shared is first          # its own mask, first's plans
    assert sparsecore.compile(m, device="cpu", chunk_elements=1000) is not first
    sparsecore.clear_cache()
    assert sparsecore.compile(m, device="cpu") is not first
    assert "backend='portable'" in repr(first) and "device='cpu'" in repr(first)


def test_an_equal_pattern_with_other_meta_and_budgets_reports_its_own_mask_and_lowers_nothing_new(monkeypatch):
    """The cache keys host masks by fingerprint, which leaves out meta and budgets: compile(b) returned the kernel of
    an equal pattern compiled before, whose .mask was that first mask (b's meta and budgets were a's). b's kernel now
    reports b and shares a's plans: the first call lowered once, b's calls lower nothing, and both equal the oracle."""
    portable = sparsecore.registered_backends()["portable"]
    lowered = []
    monkeypatch.setattr(portable, "lower", lambda mask, *args, lower=portable.lower: lowered.append(mask) or
                        lower(mask, *args))
    sparsecore.clear_cache()
    keep = np.random.default_rng(7).random((2, 4, 4)) < 0.5
    keep[:, :, 0] = True
    a = BlockMask.from_dense(keep, 256, 256, q_block=64, meta={"method": "a"})
    b = BlockMask.from_dense(keep, 256, 256, q_block=64, meta={"method": "b"}, budgets=np.array([0.25, 0.75]))
    kernel_a = sparsecore.compile(a, device="cpu")
    kernel_b = sparsecore.compile(b, device="cpu")
    assert kernel_a.mask is a and kernel_b.mask is b and kernel_b.mask.meta == {"method": "b"}
    assert kernel_b.mask.budgets.tolist() == [0.25, 0.75] and "method='b'" in repr(kernel_b)
    assert sparsecore.compile(b, device="cpu") is kernel_b and isinstance(kernel_b, sparsecore.CompiledKernel)
    assert sparsecore.compile(BlockMask.from_dense(keep, 256, 256, q_block=64, meta={"method": "a"}),
                              device="cpu") is kernel_a                               # an equal mask: the kernel
    q, k, v = tensors(heads=2, kv_heads=2, q_len=256, kv_len=256, dim=16)
    want, _ = oracle_attention(q.numpy(), k.numpy(), v.numpy(), expand_to_tokens(a), 16 ** -0.5)
    for kernel in (kernel_a, kernel_b, kernel_b):
        np.testing.assert_allclose(kernel(q, k, v).numpy(), want, atol=1e-5)
    assert lowered == [a] and kernel_b.backend.name == "portable" and kernel_b.device == "cpu"
    kernel_b.warmup = "wait"                              # a setting on either view is the shared kernel's
    assert kernel_a.warmup == "wait" and kernel_b.mask is b
    sparsecore.clear_cache()
    again_a = sparsecore.compile(a, device="cpu")
    again_b = sparsecore.compile(b, device="cpu")         # kept by b, but sharing the dropped kernel: bound anew
    assert again_a is not kernel_a and again_b is not kernel_b and again_b._shared is again_a
    assert again_b.mask is b
    sparsecore.clear_cache()


def test_uncached_kernels_of_host_masks_live_as_long_as_their_holder():
    import gc
    import weakref
    sparsecore.clear_cache()
    m = mask()
    kernel = sparsecore.compile(m, device="cpu", cache=False)
    assert sparsecore.compile(m, device="cpu", cache=False) is kernel                  # the same object finds it
    assert sparsecore.compile(mask(), device="cpu", cache=False) is not kernel        # an equal one does not
    assert sparsecore.compile(m, device="cpu") is not kernel                          # nor the module's cache
    gc.collect()
    gone = weakref.ref(kernel)
    del kernel
    assert gone() is None
    with pytest.raises(TypeError, match="cache: expected a bool"):
        sparsecore.compile(m, device="cpu", cache="no")


def test_unhashable_options_are_named():
    with pytest.raises(TypeError, match=r"compile\(\): options must be plain values .*'chunk_elements': 'list'"):
        sparsecore.compile(mask(), device="cpu", chunk_elements=[1])


def test_small_chunks_give_the_same_result():
    m = mask()
    q, k, v = tensors()
    whole = sparsecore.compile(m, device="cpu")(q, k, v)
    chunked = sparsecore.compile(m, device="cpu", chunk_elements=1)(q, k, v)
    assert torch.allclose(whole, chunked, atol=1e-6)


@pytest.mark.parametrize("return_lse", [False, True])
def test_a_row_cut_into_query_pieces_writes_only_its_own_query_tokens(return_lse):
    """A row whose scores exceed ``chunk_elements`` is cut into pieces of query tokens; its last piece ends at its
    block's end. Here block 1 keeps 256 key tokens (pieces of 16, run first), block 0 keeps 192 (pieces of 21: the
    last is 1 token). A last piece running past its block wrote block 0's attention over block 1's first rows."""
    m = BlockMask.from_lists([[[0, 1, 2], [0, 1, 2, 3]]], [0, 64, 128], [0, 64, 128, 192, 256])
    rng = np.random.default_rng(7)
    q, k, v = (torch.from_numpy(rng.standard_normal((1, 1, length, 16))) for length in (128, 256, 256))
    got = sparsecore.compile(m, device="cpu", backend="portable", chunk_elements=4096)(q, k, v, return_lse=return_lse)
    want = oracle_attention(q.numpy(), k.numpy(), v.numpy(), expand_to_tokens(m), 16 ** -0.5)
    np.testing.assert_allclose((got[0] if return_lse else got).numpy(), want[0], rtol=1e-10, atol=1e-12)
    if return_lse:
        np.testing.assert_allclose(got[1].numpy(), want[1], rtol=1e-6)


@pytest.mark.parametrize("return_lse", [False, True])
def test_a_portable_call_reads_nothing_back_to_the_host(return_lse):
    """The portable call writes each chunk's rows back through integer positions built with the schedule: it selected
    them with the boolean validity mask, a ``nonzero`` that waits for a GPU, once per chunk and twice per batch element
    and chunk (20 chunks here: 100 reads a call with the LSE). Its result still equals float64 dense attention."""
    keep = np.random.default_rng(0).random((4, 6, 6)) < 0.4
    keep[:, :, 0] = True
    m = BlockMask.from_dense(keep, q_len=6 * 64 - 5, kv_len=6 * 64 - 5, q_block=64)    # a short last block
    kernel = sparsecore.compile(m, device="cpu", backend="portable", chunk_elements=1 << 14)
    q, k, v = tensors(heads=4, kv_heads=2, q_len=m.q_len, kv_len=m.kv_len, dim=80)
    q, k, v = (torch.cat([t, -t]) for t in (q, k, v))                                   # batch 2
    kernel(q, k, v, return_lse=return_lse)                                              # builds the plan
    with HostReads() as reads:
        got = kernel(q, k, v, return_lse=return_lse)
    assert reads.calls == []
    want = oracle_attention(q.numpy(), k.numpy(), v.numpy(), expand_to_tokens(m), 80 ** -0.5)
    np.testing.assert_allclose((got[0] if return_lse else got).numpy(), want[0], atol=1e-5)
    if return_lse:
        np.testing.assert_allclose(got[1].numpy(), want[1], atol=1e-5)


def test_a_portable_plan_of_a_device_mask_reads_back_once_however_many_chunks():
    """Each chunk read whether its rows were padded (``kv_valid.all()``), a wait for a GPU once per chunk at every new
    device mask (a PASA or AdaSpa layer's); it follows from the row lengths the plan reads once."""
    from sparsecore.backends.portable.lowering import schedule_chunks
    keep = np.random.default_rng(0).random((4, 6, 6)) < 0.4
    keep[:, :, 0] = True
    m = BlockMask.from_dense(keep, q_len=6 * 64 - 5, kv_len=6 * 64 - 5, q_block=64).to("cpu")
    with HostReads() as reads:
        chunks = schedule_chunks(m, 1 << 13, torch.device("cpu"))
    assert len(chunks) > 5 and [op for op, _ in reads.calls] == ["cpu", "numpy"], reads.calls      # one read
    assert [c.padded for c in chunks] == [not bool(c.kv_valid.all()) for c in chunks]


@pytest.mark.parametrize("call, error, message", [
    (lambda kern, q, k, v: kern(q.numpy(), k, v), TypeError, r"q: backend 'portable' takes torch arrays, got ndarray"),
    (lambda kern, q, k, v: kern(q[0], k, v), ValueError, r"q: expected 4 dimensions \[B, heads, length, head_dim\]"),
    (lambda kern, q, k, v: kern(q[:, :3], k, v), ValueError, r"q: expected \[B, 4, 40, D\] to match the mask"),
    (lambda kern, q, k, v: kern(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)), ValueError,
     r"look like \[B, length, heads, D\]: pass q.transpose\(1, 2\)"),
    (lambda kern, q, k, v: kern(q, k, None), TypeError, r"v: backend 'portable' takes torch arrays, got NoneType$"),
    (lambda kern, q, k, v: kern(q[:, :, :39], k, v), ValueError, r"q: expected \[B, 4, 40, D\]"),
    (lambda kern, q, k, v: kern(q, k, v[:, :, :29]), ValueError, r"k, v: expected the same shape"),
    (lambda kern, q, k, v: kern(q, k[:, :, :29], v[:, :, :29]), ValueError, r"k: expected \[1, H_kv, 30, 8\]"),
    (lambda kern, q, k, v: kern(q, k[..., :4], v[..., :4]), ValueError, r"k: expected \[1, H_kv, 30, 8\]"),
    (lambda kern, q, k, v: kern(q, torch.cat([k, k[:, :1]], 1), torch.cat([v, v[:, :1]], 1)), ValueError,
     r"k: the number of key heads must divide the query heads \(4\), got 3; pass k and v with a divisor"),
    (lambda kern, q, k, v: kern(q, k[:, :0], v[:, :0]), ValueError,
     r"k: the number of key heads must divide the query heads \(4\), got 0"),
    (lambda kern, q, k, v: kern(q, torch.cat([k, k]), torch.cat([v, v])), ValueError,
     r"k: expected \[1, H_kv, 30, 8\] \(batch and head_dim of q"),
    (lambda kern, q, k, v: kern(q.half(), k, v), TypeError,
     r"q, k, v: expected one dtype, got float16, float32, float32; cast them to one"),
    (lambda kern, q, k, v: kern(q.int(), k.int(), v.int()), UnsupportedError,
     r"backend 'portable' cannot run these inputs: dtypes: supports .*got int32; give q, k, v what a backend takes"),
    (lambda kern, q, k, v: kern(q, k, v, scale="0.1"), TypeError, r"scale: expected a float or None"),
    (lambda kern, q, k, v: kern(q, k, v, scale=torch.tensor(0.1)), TypeError,
     r"scale: expected a float or None .*got Tensor; pass a Python float"),
    (lambda kern, q, k, v: kern(q, k, v, scale=float("inf")), ValueError,
     r"scale: expected a finite float with .*got inf"),
    (lambda kern, q, k, v: kern(q, k, v, scale=3e38), ValueError, r"scale: expected a finite float with .*got 3e\+38"),
    (lambda kern, q, k, v: kern(q, k, v, scale=10**400), ValueError, r"scale: expected a finite float with .*got 1000"),
    (lambda kern, q, k, v: kern(q, k, v, scale=Fraction(-10**400, 3)), ValueError,
     r"scale: expected a finite float with .*got -1000"),
    (lambda kern, q, k, v: dense_attention(q, k, v, scale=True), TypeError,
     r"scale: expected a float or None"),
    (lambda kern, q, k, v: kern(q.to("meta"), k.to("meta"), v.to("meta")), ValueError,
     r"tensors are on 'meta' but the kernel was compiled for device 'cpu'"),
    (lambda kern, q, k, v: kern(q, k.to("meta"), v), ValueError, r"q, k, v: expected one device.*; move them to one"),
])
def test_call_time_input_errors(call, error, message):
    kernel = sparsecore.compile(mask(), device="cpu")
    with pytest.raises(error, match=message):
        call(kernel, *tensors())


@pytest.mark.parametrize("scale", [np.float16(0.5), np.float32(0.25)], ids=repr)
def test_a_narrow_numpy_scale_is_taken_without_a_warning(scale):
    """check_scale compared the scale with SCALE_MAX in its own dtype: float16 cannot hold it, so a valid
    np.float16 scale warned "overflow encountered in cast" (an error under -W error)."""
    m = mask()
    q, k, v = tensors()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = sparsecore.compile(m, device="cpu")(q, k, v, scale=scale)
    want, _ = oracle_attention(*(t.double().numpy() for t in (q, k, v)), expand_to_tokens(m), float(scale))
    np.testing.assert_allclose(out.double().numpy(), want, atol=1e-5)


def test_a_numpy_timedelta_scale_is_refused_naming_scale():
    """np.timedelta64 is a NumPy signed integer (numbers.Integral), so check_scale took it and compared it with
    SCALE_MAX: NumPy's UFuncTypeError "ufunc 'greater' did not contain a loop ..." named neither scale nor a remedy."""
    kernel = sparsecore.compile(mask(), device="cpu")
    with pytest.raises(TypeError, match=r"scale: expected a float or None \(for 1/sqrt\(D\)\), got timedelta64; pass a "
                                        r"Python float"):
        kernel(*tensors(), scale=np.timedelta64(1))


class _TensorOutsideTorch(torch.Tensor):
    """A torch.Tensor subclass defined outside torch (as libraries wrapping tensors define them)."""


def test_tensor_subclasses_defined_outside_torch_are_torch_arrays():
    """They were refused ("takes torch arrays, got _TensorOutsideTorch"): the kind was read from the module name."""
    m = mask()
    q, k, v = (t.as_subclass(_TensorOutsideTorch) for t in tensors())
    out = sparsecore.compile(m, device="cpu")(q, k, v)
    want, _ = oracle_attention(*(t.as_subclass(torch.Tensor).double().numpy() for t in (q, k, v)), expand_to_tokens(m),
                               8 ** -0.5)
    np.testing.assert_allclose(out.as_subclass(torch.Tensor).double().numpy(), want, atol=1e-5)


def test_reference_takes_numpy_only_and_its_dtypes():
    kernel = sparsecore.compile(mask(), device="reference")
    q, k, v = (t.numpy() for t in tensors())
    with pytest.raises(TypeError, match=r"q: backend 'reference' takes numpy arrays, got Tensor \(convert with .numpy\(\)\)"):
        kernel(*tensors())
    with pytest.raises(UnsupportedError, match=r"dtypes: supports \['float32', 'float64'\], got float16"):
        kernel(q.astype(np.float16), k.astype(np.float16), v.astype(np.float16))
    out = kernel(q, k, v)
    assert out.dtype == np.float32 and out.shape == q.shape
    swapped = [x.astype(">f4") for x in (q, k, v)]          # float32 in the other byte order is float32 too
    np.testing.assert_array_equal(kernel(*swapped), out)


@dataclass(frozen=True)
class _Opts:
    pass


class _UniformOnly(registry.Backend):
    """A fake backend that needs uniform key blocks and prefers itself: exercises capability-based selection."""

    name = "uniform-only-test"
    capabilities = Capabilities(devices=("cpu",), array_type="torch", dtypes=frozenset({"float32"}),
                                uniform_kv_blocks=True, kv_len_divisible=True, head_dims=frozenset({8}), lse=False,
                                min_q_block=4)
    install_hint = "test only"

    def unavailable_reason(self, device):
        return None

    def preference(self, mask):
        return 100

    def lower(self, mask, device, options):
        return lambda q, k, v, scale, return_lse: (torch.zeros_like(q), None)


@pytest.fixture
def uniform_only(monkeypatch):
    backend = _UniformOnly()
    monkeypatch.setitem(registry._REGISTRY, backend.name, backend)
    yield backend
    sparsecore.clear_cache()


def test_selection_follows_capabilities_and_preference(uniform_only):
    uniform = BlockMask.full(2, 32, 32, 16)
    assert sparsecore.compile(uniform, device="cpu").backend is uniform_only
    ragged = BlockMask.from_lists([[[0, 1]], [[1]]], [0, 10], [0, 7, 32])
    assert sparsecore.compile(ragged, device="cpu").backend.name == "portable"
    short_last = BlockMask.full(1, 30, 30, 16)
    assert sparsecore.compile(short_last, device="cpu").backend.name == "portable"
    with pytest.raises(UnsupportedError, match=r"uniform_kv_blocks: needs key blocks of one size.*got sizes \[7, 25\]"):
        sparsecore.compile(ragged, device="cpu", backend=uniform_only.name)
    with pytest.raises(UnsupportedError, match=r"kv_len_divisible: needs kv_len to be a multiple"):
        sparsecore.compile(short_last, device="cpu", backend=uniform_only.name)
    tiny_rows = BlockMask.full(1, 30, 32, 3, 16)
    with pytest.raises(UnsupportedError, match=r"min_q_block: needs query blocks of at least 4 tokens, got one of 3"):
        sparsecore.compile(tiny_rows, device="cpu", backend=uniform_only.name)
    kernel = sparsecore.compile(uniform, device="cpu")
    q = torch.zeros(1, 2, 32, 16)
    kernel(q, q, q, return_lse=True)                    # inputs the preferred backend refuses run on another one
    assert kernel.backend.name == "portable"
    named = sparsecore.compile(uniform, device="cpu", backend=uniform_only.name)
    with pytest.raises(UnsupportedError, match=r"head_dims: supports \[8\], got 16; lse: cannot return"):
        named(q, q, q, return_lse=True)
    with pytest.raises(UnsupportedError, match=r"no backend compiled for this mask can run these inputs: "
                                               r"uniform-only-test: .*portable: dtypes: .*got int32; give q, k, v"):
        kernel(*(q.int() for _ in range(3)))              # neither takes them: each says why, then the remedy


def test_register_rejects_duplicates_and_non_backends():
    with pytest.raises(TypeError, match=r"register\(\): expected a sparsecore Backend instance"):
        sparsecore.register(object())
    portable = type(sparsecore.registered_backends()["portable"])()
    with pytest.raises(ValueError, match=r"a backend named 'portable' is already registered"):
        sparsecore.register(portable)


class _FakeCuda(registry.Backend):
    """A backend that claims an available CUDA device and runs on CPU tensors; writes its tag into the output."""

    def __init__(self, name, dtypes, head_dims, lse, rank, tag):
        self.name, self.rank, self.tag = name, rank, tag
        self.capabilities = Capabilities(devices=("cuda",), array_type="torch", dtypes=frozenset(dtypes),
                                         head_dims=frozenset(head_dims), lse=lse)
        self.lowered = 0
        self.reason, self.checked = None, 0        # why it cannot run here (None: it can); availability checks

    def unavailable_reason(self, device):
        self.checked += 1
        return self.reason

    def tensor_device_problem(self, device, tensor_device):
        return None

    def preference(self, mask):
        return self.rank

    def lower(self, mask, device, options):
        self.lowered += 1

        def run(q, k, v, scale, return_lse):
            out = torch.full_like(q, self.tag)
            return out, (torch.zeros(q.shape[:3]) if return_lse else None)
        return run


@pytest.fixture
def fake_cuda(monkeypatch):
    fast = _FakeCuda("fake-fast", {"bfloat16", "float16"}, {64, 128}, lse=False, rank=100, tag=1.0)
    wide = _FakeCuda("fake-wide", {"float32", "bfloat16", "float16"}, {32, 64, 128}, lse=True, rank=50, tag=2.0)
    registered = {name: b for name, b in registry.registered_backends().items() if "cuda" not in b.capabilities.devices}
    monkeypatch.setattr(registry, "_REGISTRY", {**registered, fast.name: fast, wide.name: wide})
    yield fast, wide
    sparsecore.clear_cache()


@pytest.mark.parametrize("dtype, head_dim, lse, expected", [
    (torch.bfloat16, 128, False, "fake-fast"),       # the preferred backend takes these
    (torch.float32, 128, False, "fake-wide"),        # fp32: only the other one
    (torch.bfloat16, 32, False, "fake-wide"),        # head dim 32: only the other one
    (torch.bfloat16, 128, True, "fake-wide"),        # the LSE: only the other one
])
def test_compile_runs_each_input_signature_on_a_backend_that_takes_it(fake_cuda, dtype, head_dim, lse, expected):
    mask = BlockMask.full(2, 64, 64, 32)
    kernel = sparsecore.compile(mask, device="cuda")
    q = torch.zeros(1, 2, 64, head_dim, dtype=dtype)
    result = kernel(q, q, q, return_lse=lse)
    out = result[0] if lse else result
    assert kernel.backend.name == expected and float(out.flatten()[0]) == {"fake-fast": 1.0, "fake-wide": 2.0}[expected]
    kernel(q, q, q, return_lse=lse)                                       # the same signature: chosen and lowered once
    assert sum(b.lowered for b in fake_cuda) == 1


@pytest.mark.parametrize("options, error, field", [
    ({"block_m": "64"}, TypeError, "block_m"), ({"block_n": 64.0}, TypeError, "block_n"),
    ({"block_m": 48}, ValueError, "block_m"), ({"num_warps": 0}, ValueError, "num_warps"),
    ({"num_warps": 3}, ValueError, "num_warps"), ({"num_stages": -1}, ValueError, "num_stages"),
    ({"num_stages": True}, TypeError, "num_stages"), ({"use_tma": 1}, TypeError, "use_tma"),
])
def test_triton_options_name_the_field(options, error, field):
    """A string tile side raised "'<' not supported"; zero warps and negative stages were taken."""
    from sparsecore.backends.cuda.triton_config import TritonOptions
    with pytest.raises(error, match=f"^{field}: expected"):
        TritonOptions(**options)


def test_a_batch_past_a_backends_per_call_rows_runs_on_the_next_one(fake_cuda):
    """FlashInfer plans at most 32,768 (batch element, head, query block) rows a call: CFG's batch of 2 raised
    there, where Triton would take it. The choice now counts the batch against each backend's limit."""
    fast, wide = fake_cuda
    fast.capabilities = dataclasses.replace(fast.capabilities, max_call_rows=2 * 4 * 3)   # 2 heads x 2 blocks x B
    kernel = sparsecore.compile(BlockMask.full(2, 64, 64, 32), device="cuda")
    for batch, expected in ((6, "fake-fast"), (7, "fake-wide"), (6, "fake-fast")):
        q = torch.zeros(batch, 2, 64, 128, dtype=torch.bfloat16)
        kernel(q, q, q)
        assert kernel.backend.name == expected
    problems = fast.capabilities.tensor_problems("bfloat16", 128, 2, 2, False, call_rows=28)
    assert problems == ["max_call_rows: takes at most 24 (batch element, head, query block) rows a call, got 28; "
                        "split the batch"]


def test_a_named_backend_still_refuses_inputs_it_cannot_take(fake_cuda):
    kernel = sparsecore.compile(BlockMask.full(2, 64, 64, 32), device="cuda", backend="fake-fast")
    q = torch.zeros(1, 2, 64, 32)
    with pytest.raises(UnsupportedError, match=r"backend 'fake-fast' cannot run these inputs: dtypes: .*float32; "
                                               r"head_dims: supports \[64, 128\], got 32"):
        kernel(q, q, q)


def test_a_fallback_is_checked_to_run_here_only_when_a_call_needs_it(fake_cuda):
    """compile() checks that the preferred backend runs here; a fallback (maybe slow to load: importing
    flash-attn-4 takes seconds) is checked at the first call whose inputs need it, once."""
    fast, wide = fake_cuda
    kernel = sparsecore.compile(BlockMask.full(2, 64, 64, 32), device="cuda")
    assert (fast.checked, wide.checked) == (1, 0)
    q = torch.zeros(1, 2, 64, 128, dtype=torch.bfloat16)
    kernel(q, q, q)
    assert (fast.checked, wide.checked) == (1, 0) and kernel.backend is fast
    wide_only = torch.zeros(1, 2, 64, 128)                                 # float32: the fallback's
    kernel(wide_only, wide_only, wide_only)
    kernel(wide_only, wide_only, wide_only, return_lse=True)              # another signature, the same fallback
    assert (fast.checked, wide.checked) == (1, 1) and kernel.backend is wide


def test_a_fallback_that_cannot_run_here_says_why_at_the_call_that_needs_it(fake_cuda):
    fast, wide = fake_cuda
    wide.reason = "its library is not installed"
    kernel = sparsecore.compile(BlockMask.full(2, 64, 64, 32), device="cuda")
    q = torch.zeros(1, 2, 64, 128)
    with pytest.raises(UnsupportedError, match=r"fake-fast: dtypes: .*float32; fake-wide: cannot run here: its "
                                               r"library is not installed"):
        kernel(q, q, q)


def test_compile_takes_the_most_preferred_backend_that_runs_here(fake_cuda):
    fast, wide = fake_cuda
    fast.reason = "no such device here"
    assert sparsecore.compile(BlockMask.full(2, 64, 64, 32), device="cuda").backend is wide
    wide.reason = "its library is not installed"
    with pytest.raises(RuntimeError, match=r"no backend can run on device 'cuda' here: fake-fast: no such device "
                                           r"here; fake-wide: its library is not installed"):
        sparsecore.compile(BlockMask.full(2, 64, 64, 16), device="cuda")


def test_when_only_backends_that_cannot_run_here_take_the_mask_compile_says_so(fake_cuda):
    """The backends that run here cannot take the mask (UnsupportedError); or they take the mask but not the options,
    which only a backend that cannot run here takes (RuntimeError naming it)."""
    fast, wide = fake_cuda
    fast.capabilities = dataclasses.replace(fast.capabilities, max_heads=1)
    wide.reason = "its library is not installed"
    with pytest.raises(UnsupportedError, match=r"no available backend for device 'cuda' can take .*fake-fast: max_heads"
                                               r".*; those that can take it cannot run here: fake-wide: its library"):
        sparsecore.compile(BlockMask.full(2, 64, 64, 32), device="cuda")
    fast.capabilities = dataclasses.replace(fast.capabilities, max_heads=None)
    wide.options_type = _WideOptions
    with pytest.raises(RuntimeError, match=r"no backend for device 'cuda' that takes this mask and these options can "
                                           r"run here: fake-wide: its library"):
        sparsecore.compile(BlockMask.full(2, 64, 64, 16), device="cuda", width=2)


def test_a_device_check_stops_at_the_first_backend_that_runs_there_slow_ones_last(fake_cuda):
    """apply() and the CLI check the device with any backend: one slow to check (flash-attn-4's import) is not
    checked while another runs there."""
    from sparsecore.check import device_problem
    fast, wide = fake_cuda
    fast.slow_to_load = True
    assert device_problem("cuda") is None and (fast.checked, wide.checked) == (0, 1)
    assert device_problem("cuda", dtype="float32") is None and (fast.checked, wide.checked) == (0, 2)
    wide.reason = "its library is not installed"
    assert device_problem("cuda") is None and (fast.checked, wide.checked) == (1, 3)
    assert device_problem("cuda", dtype="float32") == ("dtype 'float32' is not supported on device 'cuda': fake-fast "
                                                       "takes bfloat16, float16; those that take it cannot run here: "
                                                       "fake-wide: its library is not installed")


@dataclasses.dataclass(frozen=True)
class _WideOptions:
    width: int = 1


def test_a_device_masks_kernels_are_freed_with_it_without_the_garbage_collector():
    """A device mask holds its kernels weakly (a kernel refers to its mask): while a kernel is held, compiling
    the mask again returns it; once dropped, mask and kernel are freed by reference counting alone."""
    import gc
    import weakref
    gc.collect()
    gc.disable()
    try:
        device_mask = mask().to("cpu")
        kernel = sparsecore.compile(device_mask, device="cpu")
        assert sparsecore.compile(device_mask, device="cpu") is kernel
        mask_ref, kernel_ref = weakref.ref(device_mask), weakref.ref(kernel)
        del device_mask, kernel
        assert mask_ref() is None and kernel_ref() is None
    finally:
        gc.enable()


def _chunk_bytes(kernel) -> int:
    """Bytes of the storages of every tensor field of the kernel's portable chunks (read from the dataclass's
    fields), each storage once: pieces of one span share its key positions."""
    from sparsecore.backends.portable.lowering import Chunk
    held = {}
    for run in kernel._runs.values():
        for chunk in getattr(run, "chunks", []):
            for f in dataclasses.fields(Chunk):
                value = getattr(chunk, f.name)
                if isinstance(value, torch.Tensor):
                    held[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
    return sum(held.values())


@pytest.mark.parametrize("bound", ["CACHE_BLOCKS", "CACHE_TOKEN_PLAN_BYTES"])
def test_the_host_mask_cache_is_bounded_by_blocks_and_by_plans_that_grow_with_tokens(monkeypatch, bound):
    """New large host masks every step must not pile up compiled kernels: the least recently used go first. The
    blocks bound alone let portable's plans (gathered positions of the tokens its spans list) grow without limit at
    large blocks; the bytes bound counts only such plans (a Triton or FA4 kernel's grow with blocks), once a call
    has lowered them."""
    from sparsecore import kernel_cache
    sparsecore.clear_cache()
    masks = [BlockMask.from_dense(np.random.default_rng(seed).random((4, 4, 4)) < 0.9, 64, 64, 16) for seed in range(3)]
    assert [m.nnz for m in masks] == [59, 58, 61]
    q = torch.ones(1, 4, 64, 8)
    plans = []
    for mask in masks:                                              # what each one's plans take, measured alone
        kernel = sparsecore.compile(mask, device="cpu")
        kernel(q, q, q)
        plans.append(_chunk_bytes(kernel))
        assert list(kernel_cache._SIZES.values())[-1] == (mask.nnz, plans[-1])
    sparsecore.clear_cache()
    monkeypatch.setattr(kernel_cache, bound, 130 if bound == "CACHE_BLOCKS" else sum(plans) - 1)
    kernels = [sparsecore.compile(m, device="cpu") for m in masks[:2]]       # two fit either bound, not three
    for kernel in kernels:
        kernel(q, q, q)
    assert sparsecore.compile(masks[0], device="cpu") is kernels[0]           # masks[0] now the most recently used
    sparsecore.compile(masks[2], device="cpu")(q, q, q)                      # over the bound: masks[1] goes
    assert sparsecore.compile(masks[0], device="cpu") is kernels[0]
    assert sparsecore.compile(masks[1], device="cpu") is not kernels[1]
    sparsecore.compile(masks[2], device="reference")                # plans that do not grow with the tokens
    assert (61, 0) in kernel_cache._SIZES.values()
    assert kernel_cache._SIZES.keys() == kernel_cache._CACHE.keys()
    sparsecore.clear_cache()


def test_a_dense_mask_of_small_blocks_is_charged_what_its_spans_hold(monkeypatch):
    """A full mask of 48 x 48 blocks over 2016 tokens, 2 heads, is one span a head: its plans hold each head's 2016
    query positions three times (int64) and its 2016 key positions (int64) with their validity (bool), 133,072 bytes
    with the two heads' ids, where 9 bytes a listed key token (the bound's estimate before spans) charged 1.74 MB:
    past a 1 MB bound, it evicted every other kernel."""
    from sparsecore import kernel_cache
    sparsecore.clear_cache()
    monkeypatch.setattr(kernel_cache, "CACHE_TOKEN_PLAN_BYTES", 1 << 20)
    other = sparsecore.compile(BlockMask.full(2, 64, 64, 16), device="cpu")
    q = torch.ones(1, 2, 64, 8)
    other(q, q, q)
    dense = sparsecore.compile(BlockMask.full(2, 2016, 2016, 42), device="cpu")
    q = torch.ones(1, 2, 2016, 8)
    dense(q, q, q)
    assert 9 * 2 * 48 * 2016 > 1 << 20
    assert list(kernel_cache._CACHE.values()) == [other, dense]
    assert _chunk_bytes(dense) == 2 * 8 + 2 * (3 * 8 * 2016 + 9 * 2016) == 133_072
    assert list(kernel_cache._SIZES.values())[-1] == (2 * 48 * 48, _chunk_bytes(dense))
    sparsecore.clear_cache()


def test_a_span_cut_into_pieces_is_charged_its_key_positions_once():
    """A full 2-head mask of 16 blocks a side with ``chunk_elements=4096``: each head's span (256 queries x 256 keys)
    is cut into 16 pieces of 16 queries, which share its gathered key positions. Counted once a piece, the charge
    was 86,272 bytes where the chunks hold 17,152 (review, forty-third session)."""
    from sparsecore import kernel_cache
    sparsecore.clear_cache()
    kernel = sparsecore.compile(BlockMask.full(2, 256, 256, 16), device="cpu", chunk_elements=4096)
    q = torch.ones(1, 2, 256, 8)
    kernel(q, q, q)
    run, = kernel._runs.values()
    assert len(run.chunks) == 32
    assert list(kernel_cache._SIZES.values()) == [(512, _chunk_bytes(kernel))]
    # each piece: its head (int64) and its 16 queries' three positions (int64); each head: 256 key positions (int64)
    # and their validity (bool), once
    assert _chunk_bytes(kernel) == 32 * (8 + 3 * 8 * 16) + 2 * 9 * 256 == 17_152
    sparsecore.clear_cache()


def test_an_approximating_kernel_is_charged_its_block_map_too():
    """An approximating mask on portable also holds its row plans, built when it is lowered: the block map (a bool a
    cell, 2 heads x 6 x 5 blocks) and each query token's block (int64), once: the call reuses them (review, forty-third
    session: they were built at the first call, after the cache had counted the run)."""
    from sparsecore import kernel_cache
    from sparsecore.ir import Unselected
    sparsecore.clear_cache()
    lists = [[[0, 2], [1], [], [0, 1, 4], [3], [2, 3]], [[4], [0, 4], [1, 2], [], [0], [1, 3]]]
    listed = BlockMask.from_lists(lists, BlockMask.uniform_offsets(46, 8), BlockMask.uniform_offsets(37, 8))
    mask = BlockMask(2, listed.q_offsets, listed.kv_offsets, listed.indptr, listed.indices,
                     unselected=Unselected.parse("grouped-first-order:2"))
    kernel = sparsecore.compile(mask, device="cpu")
    q, k = torch.ones(1, 2, 46, 8), torch.ones(1, 2, 37, 8)
    kernel(q, k, k)
    run, = kernel._runs.values()
    assert kernel.backend.name == "portable" and len(run._call._plans) == 1
    assert list(kernel_cache._SIZES.values()) == [(mask.nnz, _chunk_bytes(kernel) + 2 * 6 * 5 + 8 * 46)]
    sparsecore.clear_cache()


def test_charging_a_kernel_survives_a_run_lowered_meanwhile():
    """Another thread's call may add a run to a shared kernel (unlocked) while the cache counts its runs' plans: the
    count reads a copy ("dictionary changed size during iteration" before; review, forty-third session)."""
    from sparsecore import kernel_cache
    sparsecore.clear_cache()
    kernel = sparsecore.compile(BlockMask.full(1, 64, 64, 16), device="cpu")

    class LoweredMeanwhile:                 # counting it adds a run, as another thread's _run_for would
        @property
        def plan_bytes(self) -> int:
            kernel._runs[("other", "cpu")] = None
            return 7

    kernel._runs[("meanwhile", "cpu")] = LoweredMeanwhile()
    kernel_cache.lowered(kernel)
    assert list(kernel_cache._SIZES.values()) == [(16, 7)]
    sparsecore.clear_cache()


def test_a_mask_over_the_cache_bounds_alone_stays_cached_and_a_fallbacks_plans_count(monkeypatch):
    """The newest kernel stays even past the bounds (else it recompiled at every call); a kernel whose calls fall
    back to portable holds portable's plans, which the bound counted as 0 (the preferred backend's)."""
    from sparsecore import kernel_cache

    class HalfOnly(_UniformOnly):                               # preferred, available, float16 only
        name = "half-only-test"
        capabilities = Capabilities(devices=("cpu",), array_type="torch", dtypes=frozenset({"float16"}))
    monkeypatch.setitem(registry._REGISTRY, HalfOnly.name, HalfOnly())
    sparsecore.clear_cache()
    monkeypatch.setattr(kernel_cache, "CACHE_BLOCKS", 10)
    mask = BlockMask.full(2, 256, 256, 64)                           # 32 blocks, over the bound alone
    kernel = sparsecore.compile(mask, device="cpu")
    assert kernel.backend.name == HalfOnly.name and sparsecore.compile(mask, device="cpu") is kernel
    assert list(kernel_cache._SIZES.values()) == [(32, 0)]
    q = torch.ones(1, 2, 256, 16)
    kernel(q, q, q)                                                  # float32: portable runs, its plans counted
    assert kernel.backend.name == "portable" and _chunk_bytes(kernel) > 0
    assert list(kernel_cache._SIZES.values()) == [(32, _chunk_bytes(kernel))]
    sparsecore.clear_cache()


class _HostPlans(registry.Backend):
    """A fake backend whose runs can keep their plans on the host: records the masks it lowers."""

    name = "host-plans-test"
    capabilities = Capabilities(devices=("cpu",), array_type="torch", dtypes=frozenset({"float32"}))
    install_hint = "test only"
    host_plans = True

    def __init__(self):
        self.lowered = []

    def unavailable_reason(self, device):
        return None

    def lower(self, mask, device, options):
        backend = self

        class Run:
            on_host = False

            def keep_plans_on_host(self):
                self.on_host = True

            def __call__(self, q, k, v, scale, return_lse):
                return torch.zeros_like(q), None
        backend.lowered.append(mask)
        return Run()


def test_kernels_keeping_plans_on_the_host_lower_a_host_mask_from_the_host(monkeypatch):
    """keep_plans_on_host before the first call: the run gets the host mask itself (no device copy of its lists
    is made or kept) and is asked to keep its plans on the host; without it, the mask's device copy."""
    backend = _HostPlans()
    monkeypatch.setitem(registry._REGISTRY, backend.name, backend)
    q = torch.zeros(1, 2, 32, 8)
    held = BlockMask.full(2, 32, 32, 16)
    kernel = sparsecore.compile(held, device="cpu", backend=backend.name, cache=False)
    kernel.keep_plans_on_host()
    kernel(q, q, q)
    assert backend.lowered[-1] is held and kernel._runs[(backend.name, "cpu")].on_host
    assert "cpu" not in {str(key) for key in held.derived}                  # no device copy was made
    plain = BlockMask.full(2, 32, 32, 16)
    other = sparsecore.compile(plain, device="cpu", backend=backend.name, cache=False)
    other(q, q, q)
    assert backend.lowered[-1] is plain.derived["cpu"] and not backend.lowered[-1].on_host   # the memoized copy
    assert not other._runs[(backend.name, "cpu")].on_host
    other.keep_plans_on_host()                                              # a run lowered before is asked too
    assert other._runs[(backend.name, "cpu")].on_host


def test_inputs_that_require_gradients_get_the_same_forward_and_a_backward_that_raises(triton_device):
    """Triton's kernels have no backward: with inputs that require gradients the forward is unchanged (its output
    may be changed in place), and a backward through it raises naming the backend, rather than a gradient silently
    missing (Triton's outputs carried none) or silently wrong (FA4's own backward is dense over its tiles)."""
    mask = BlockMask.from_dense(np.tril(np.ones((4, 4), dtype=bool))[None].repeat(2, 0), 64, 64, 16)
    kernel = sparsecore.compile(mask, device="cuda", backend="triton")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 16, generator=gen).to(triton_device) for _ in range(3))
    want = kernel(q, k, v)
    leaf = q.clone().requires_grad_()
    got = kernel(leaf, k, v)
    assert got.requires_grad and torch.equal(got.detach(), want)
    with pytest.raises(NotImplementedError, match="inference-only: backend 'triton'"):
        got.sum().backward()
    out, lse = kernel(leaf, k, v, return_lse=True)
    out.mul_(2.0)                                                    # an output is the caller's to change
    assert out.requires_grad and lse.shape == (1, 2, 64)
    with torch.no_grad():
        assert not kernel(leaf, k, v).requires_grad


def _dense_attention_torch(q, k, v, tokens, scale):
    """Masked softmax attention in float64 torch ops (differentiable), ``tokens [H, S, T]``: the output (empty rows
    give 0) and the LSE (-inf on empty rows)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    keep = torch.from_numpy(tokens)[None]
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~keep, -torch.inf)
    has_keys = keep.any(-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(~has_keys, 0.0), dim=-1).masked_fill(~has_keys, 0.0)
    return probs @ v, torch.logsumexp(scores, dim=-1)


@pytest.mark.parametrize("return_lse", [False, True])
@pytest.mark.parametrize("empty", [False, True])
def test_the_portable_lowering_keeps_true_gradients(return_lse, empty):
    """``portable`` runs torch ops, so it keeps autograd's gradients: they equal float64 dense attention's under the
    same mask (GQA, a row that keeps nothing, blocks of two sizes), through the output and the LSE (its path forms
    the scores itself; the other is torch's SDPA). A mask that keeps nothing gives zero gradients (before, an output
    that did not require grad, and backward raised)."""
    keep = np.random.default_rng(3).random((4, 4, 4)) < 0.5
    keep[:, np.arange(4), np.arange(4)] = True
    keep[1, 2] = False                                          # head 1, query block 2 keeps no key
    mask = BlockMask.from_dense(keep & (not empty), 64, 64, 16)
    kernel = sparsecore.compile(mask, device="cpu", backend="portable")
    gen = torch.Generator().manual_seed(1)
    inputs = [torch.randn(1, h, 64, 16, generator=gen, dtype=torch.float64, requires_grad=True) for h in (4, 2, 2)]
    weights = torch.randn(1, 4, 64, 16, generator=gen, dtype=torch.float64)
    lse_weights = torch.randn(1, 4, 64, generator=gen, dtype=torch.float64)
    if empty:                                       # a NaN input reaches no row: zeros and -inf stay
        poisoned = inputs[1].detach().clone().requires_grad_()
        with torch.no_grad():
            poisoned[0, 0, 3, 5] = math.nan
        out, lse = kernel(inputs[0], poisoned, inputs[2], return_lse=True)
        assert not out.any() and (lse == -math.inf).all()

    def loss(out, lse):
        total = (out * weights).sum()
        if return_lse:
            finite = lse.isfinite()
            total = total + (lse.double() * lse_weights)[finite].sum()
        return total
    got = torch.autograd.grad(loss(*kernel(*inputs, return_lse=True)) if return_lse else loss(kernel(*inputs), None),
                              inputs)
    want = torch.autograd.grad(loss(*_dense_attention_torch(*inputs, expand_to_tokens(mask), 0.25)), inputs)
    for name, g, w in zip("qkv", got, want):   # the LSE is float32: its gradient to float32 precision
        torch.testing.assert_close(g, w, rtol=1e-6 if return_lse else 1e-10, atol=1e-6 if return_lse else 1e-12,
                                   msg=f"d{name}")
        assert not empty or not g.any()


def test_portable_approximating_masks_are_inference_only():
    """The approximation of unlisted blocks merges into the exact part in place, which autograd cannot follow: with
    inputs that require gradients the forward is unchanged and a backward raises sparsecore's message."""
    from sparsecore.methods.approximation import unselected_of, with_unselected
    mask = with_unselected(BlockMask.from_dense(np.eye(4, dtype=bool)[None].repeat(2, 0), 64, 64, 16),
                           unselected_of("grouped-first-order", 2))
    kernel = sparsecore.compile(mask, device="cpu", backend="portable")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 16, generator=gen) for _ in range(3))
    leaf = q.clone().requires_grad_()
    got = kernel(leaf, k, v)
    assert torch.equal(got.detach(), kernel(q, k, v))
    with pytest.raises(NotImplementedError, match="inference-only: backend 'portable'"):
        got.sum().backward()


@pytest.mark.parametrize("value", [True, 1.0])
def test_an_option_refused_on_a_fresh_cache_is_refused_after_an_equal_value_was_compiled(value):
    """The cache key tells 1, 1.0 and True apart: what compile() refuses does not depend on what it compiled before."""
    mask = BlockMask.full(2, 64, 64, 16)
    sparsecore.clear_cache()
    with pytest.raises((TypeError, ValueError), match="chunk_elements") as fresh:
        sparsecore.compile(mask, device="cpu", chunk_elements=value)
    sparsecore.compile(mask, device="cpu", chunk_elements=1)
    with pytest.raises(fresh.type, match="chunk_elements"):
        sparsecore.compile(mask, device="cpu", chunk_elements=value)


def test_an_ambient_autocast_does_not_change_a_kernels_precision():
    """portable computes bf16 inputs in float32 also inside ``torch.autocast(bfloat16)`` (its products followed the
    autocast: output error 0.69 and LSE error 0.15 against the oracle)."""
    from checks import assert_matches
    from oracle import dense_attention, expand_to_tokens

    keep = np.random.default_rng(0).random((2, 4, 4)) < 0.5
    keep[:, :, 0] = True
    mask = BlockMask.from_dense(keep, 256, 256, 64)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 256, 64, generator=gen).to(torch.bfloat16) * 3 for _ in range(3))
    want_out, want_lse = dense_attention(q.double().numpy(), k.double().numpy(), v.double().numpy(),
                                         expand_to_tokens(mask), 64 ** -0.5)
    kernel = sparsecore.compile(mask, device="cpu", backend="portable")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, lse = kernel(q, k, v, return_lse=True)
        plain = kernel(q, k, v)
    assert_matches("bfloat16", out.double().numpy(), lse.double().numpy(), want_out, want_lse)
    assert_matches("bfloat16", plain.double().numpy(), None, want_out, want_lse)


def test_clear_cache_forgets_the_uploads_and_the_approximation_plans():
    """clear_cache() said it frees the device buffers sparsecore holds, but the uploaded offsets and the
    approximation pass's statistics plans (4.8 MiB each at Wan 6x) stayed."""
    from sparsecore.backends import approximation
    from sparsecore.ir import Unselected, uploads
    offsets = np.array([0, 16, 32, 40])
    uploads.on_device(offsets, "cpu")
    approximation.StatisticsPlan.build(offsets, Unselected("zeroth"), torch.device("cpu"))
    assert uploads._UPLOADS and approximation._PLANS
    sparsecore.clear_cache()
    assert not uploads._UPLOADS and not approximation._PLANS


def test_masks_copy_and_pickle_and_a_kernel_copies_as_itself():
    """A mask's read-only meta made copy.deepcopy and pickle raise (so did every object holding a mask); a kernel's
    copy would share its torch.compile slot, so it is the kernel itself, and pickling one names the remedy."""
    import copy
    import pickle
    rng = np.random.default_rng(0)
    base = BlockMask.from_dense(rng.random((2, 4, 4)) < 0.5, 256, 256, 64)
    from sparsecore.ir import Unselected
    mask = BlockMask(base.num_heads, base.q_offsets, base.kv_offsets, base.indptr, base.indices,
                     budgets=[0.5, 0.75], meta={"method": "test", "levels": [1, {"deep": [2, 3]}]},
                     unselected=Unselected("grouped-first-order", 2))
    on_device = mask.to("cpu")
    for source, copied in ((mask, copy.deepcopy(mask)), (mask, pickle.loads(pickle.dumps(mask))),
                           (on_device, copy.deepcopy(on_device))):
        assert copied is not source and copied == source and copied.meta == source.meta
        assert copied.device == source.device and copied.unselected == source.unselected
        assert np.array_equal(copied.to_host().budgets, [0.5, 0.75])
    kernel = sparsecore.compile(mask, device="cpu")
    assert copy.deepcopy(kernel) is kernel and copy.copy(kernel) is kernel
    with pytest.raises(TypeError, match="pickle its mask"):
        pickle.dumps(kernel)


def test_a_named_backend_that_cannot_take_the_mask_says_so_before_saying_it_is_missing():
    """It said only "flashinfer is not installed (pip install ...)": installing it would not have helped."""
    from sparsecore.ir import Unselected
    full = BlockMask.full(2, 256, 256, 64)
    mask = BlockMask(2, full.q_offsets, full.kv_offsets, full.indptr, full.indices, unselected=Unselected("zeroth"))
    backend = sparsecore.registered_backends()["flashinfer"]
    if backend.unavailable_reason("cuda") is None:
        pytest.skip("flashinfer runs here: this test is for a machine where it does not")
    with pytest.raises(UnsupportedError, match=r"flashinfer: unselected: .* \(nor does it run here: "):
        sparsecore.compile(mask, "cuda", backend="flashinfer")


def test_the_statistics_plans_are_kept_least_recently_used_first(monkeypatch):
    """Three geometries taking turns (HunyuanVideo 1.5's text lengths) must not rebuild the one used last."""
    from sparsecore.backends import approximation
    from sparsecore.ir import Unselected
    monkeypatch.setattr(approximation._PLANS, "entries", 2)
    sparsecore.clear_cache()
    build = lambda end: approximation.StatisticsPlan.build(np.array([0, 16, end]), Unselected("zeroth"),  # noqa: E731
                                                           torch.device("cpu"))
    first = build(20)
    build(24)
    assert build(20) is first                                   # used again: now the most recent
    build(28)                                                   # a third: the least recently used (24) goes
    assert build(20) is first and len(approximation._PLANS) == 2
    sparsecore.clear_cache()


def test_no_backend_taking_the_mask_names_each_one_and_why(monkeypatch):
    """Without a name, every backend for the device says what it lacks (and, where it does not run here, why)."""
    class FewHeads(_UniformOnly):
        name = "few-heads-npu-test"
        capabilities = Capabilities(devices=("npu",), array_type="torch", dtypes=frozenset({"float16"}), max_heads=8)
    monkeypatch.setitem(registry._REGISTRY, FewHeads.name, FewHeads())
    mask = BlockMask.full(300, 64, 64, 16)                           # more heads than the NPU's op takes too
    npu = sparsecore.registered_backends()["npu"]
    if npu.unavailable_reason("npu") is None:
        pytest.skip("torch_npu runs here: this test is for a machine without it")
    with pytest.raises(UnsupportedError) as refused:
        sparsecore.compile(mask, "npu")
    message = str(refused.value)                                   # in the registry's order, whichever it is
    assert "few-heads-npu-test: max_heads: takes at most 8 " in message
    assert re.search(r"npu: max_heads: takes at most \d+ query heads.*\(nor does it run here: ", message)


def test_a_backend_is_checked_on_each_gpu_its_calls_run_on():
    """A backend that runs on one GPU may not on another of the machine (another architecture: fa4 needs SM90):
    availability is checked, once, on each device (with its index) the tensors are on, not on the compiled device
    alone nor once for all."""
    from sparsecore.inputs import attention_shape
    from sparsecore.kernel import CompiledKernel

    class OnGpuZeroOnly(_FakeCuda):
        def unavailable_reason(self, device):
            self.checked += 1
            return None if device in ("cuda", "cuda:0") else f"compute capability 8.0 on {device}"
    backend = OnGpuZeroOnly("gpu0-only", ["float32"], [16], True, 1, 1.0)
    kernel = CompiledKernel(mask(), "cuda", [(backend, None)])
    assert [kernel._reason(backend, where) for where in ("cuda:0", "cuda:0", "cuda:1")] == \
        [None, None, "compute capability 8.0 on cuda:1"]
    assert backend.checked == 2                              # cuda:0 once, then remembered; cuda:1 checked
    backend.slow_to_load = True                              # loaded in place (its warm-up failed): the same check
    kernel = CompiledKernel(mask(), "cuda:0", [(backend, None)], warmup="background", first_checked=False)
    signature = ("float32", 16, 4, 4, False, "cuda:1", ())
    shape = attention_shape(torch.zeros(1, 4, 40, 16), torch.zeros(1, 4, 30, 16), torch.zeros(1, 4, 30, 16))
    with pytest.raises(UnsupportedError, match="compute capability 8.0 on cuda:1"):
        kernel._loaded_in_place(("gpu0-only", "cuda:1", signature), signature, shape, backend, None, None)


def test_an_install_hint_is_given_only_where_a_package_is_missing():
    """Without a GPU, triton's reason "torch.cuda.is_available() is False" came with "(pip install triton ...)",
    which does not help where triton is installed; a missing package still gets its hint."""
    from sparsecore.registry import explained
    triton = sparsecore.registered_backends()["triton"]
    assert explained(triton, "torch.cuda.is_available() is False") == "torch.cuda.is_available() is False"
    assert explained(triton, "triton is not installed") == f"triton is not installed ({triton.install_hint})"
    reason = triton.unavailable_reason("cuda")      # no GPU, or TRITON_INTERPRET=1 (CI): installed either way
    if reason is not None and "not installed" not in reason:                 # the whole message, where it is said
        with pytest.raises(RuntimeError) as raised:
            sparsecore.compile(mask(), device="cuda", backend="triton")
        assert reason in str(raised.value) and "pip install" not in str(raised.value)


def test_a_backend_registered_after_a_compile_is_chosen_for_that_mask_too(monkeypatch):
    """compile() cached a mask's kernel with the backends of its first compile: a better one registered later ran
    for new masks only, and a mask compiled before kept its old choice (registry.changed() now keys the caches)."""
    class Better(registry.Backend):
        name = "better-cpu"
        capabilities = Capabilities(devices=("cpu",), array_type="torch", dtypes=frozenset({"float32"}))

        def unavailable_reason(self, device):
            return None

        def preference(self, mask):
            return 100

        def lower(self, mask, device, options):
            return lambda q, k, v, scale, return_lse: (torch.full_like(q, 7.0), None)

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry.registered_backends()))
    m = mask()
    before = sparsecore.compile(m, device="cpu")
    assert sparsecore.compile(m, device="cpu") is before                        # no change: the cached kernel
    sparsecore.register(Better())
    after = sparsecore.compile(m, device="cpu")
    assert after is not before and [b.name for b, _ in after._choices][0] == "better-cpu"


def test_the_first_compiles_of_a_process_find_the_same_kernel():
    """The registry loads its built-in backends at the first compile; that is no change of what runs where (the
    second compile of an equal mask missed the cache and built another kernel, from a docs review)."""
    code = ("import numpy as np, sparsecore; from sparsecore import BlockMask; "
            "m = BlockMask.from_dense(np.eye(3, dtype=bool)[None], 48, 48, 16); "
            "a = sparsecore.compile(m, device='cpu'); b = sparsecore.compile(m, device='cpu'); print(a is b)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"


def test_a_kernel_compiled_inside_the_triton_emulator_is_not_found_outside(monkeypatch):
    """Inside the emulator 'cuda' kernels run on CPU tensors; outside, on a machine without CUDA, compile() says that
    nothing runs there (it returned the emulated kernel, whose call then failed naming the tensors' device)."""
    from sparsecore.backends.cuda import interpreter
    if torch.cuda.is_available() or not interpreter.interpreting():
        pytest.skip("needs Triton's interpreter (TRITON_INTERPRET=1) on a machine without CUDA")
    m = mask()
    with sparsecore.registered_backends()["triton"].emulator():
        inside = sparsecore.compile(m, device="cuda", warmup="wait")
    with pytest.raises(RuntimeError, match="no backend can run on device 'cuda' here"):
        sparsecore.compile(m, device="cuda", warmup="wait")
    with sparsecore.registered_backends()["triton"].emulator():
        assert sparsecore.compile(m, device="cuda", warmup="wait") is not inside    # chosen again: still valid


def test_sparse_tensors_and_masked_arrays_are_refused_by_name():
    """They passed the input check and failed deep inside (torch's reshape of a sparse tensor; the reference backend
    ignored a NumPy mask and failed to broadcast), naming nothing."""
    m = mask()
    q, k, v = tensors()
    with pytest.raises(TypeError, match=r"q: expected dense values, got a torch.sparse_coo tensor; pass "
                                        r"q.to_dense\(\)"):
        sparsecore.compile(m, device="cpu")(q.to_sparse(), k, v)
    qn, kn, vn = (t.numpy() for t in (q, k, v))
    with pytest.raises(TypeError, match=r"k: expected dense values, got a masked array; pass np.ma.getdata"):
        sparsecore.compile(m, device="reference")(qn, np.ma.masked_array(kn, kn > 1), vn)
