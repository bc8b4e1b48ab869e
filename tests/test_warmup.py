"""A backend slow to load warms up in the background while its kernel runs the next one (sparsecore.warmup).

Fake CUDA backends on CPU tensors stand in for ``fa4`` (slow to load) and ``triton``; each writes its tag into the
output, so a test sees which one ran. A gate holds the slow backend's first run (the warm-up) until a test
releases it. The real pair runs in the GPU test at the end, against a float64 dense oracle.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections import OrderedDict

import numpy as np
import pytest
import torch

import sparsecore
from sparsecore import registry, warmup
from sparsecore.capabilities import Capabilities
from sparsecore.ir import BlockMask
from sparsecore.registry import UnsupportedError

FAST, FALLBACK = 1.0, 2.0


class _Fake(registry.Backend):
    """Runs on CPU tensors while claiming CUDA; records its checks, lowerings and runs (with their thread)."""

    def __init__(self, name, rank, tag, slow, dtypes):
        self.name, self.rank, self.tag, self.slow_to_load = name, rank, tag, slow
        self.capabilities = Capabilities(devices=("cuda",), array_type="torch", dtypes=frozenset(dtypes),
                                         head_dims=frozenset({16}))
        self.reason = self.quick_reason = self.error = None
        self.checks, self.lowered, self.lowered_masks, self.runs, self.grad_enabled = [], [], [], [], []
        self.lowered_options = []
        self.gate = threading.Event()
        self.gate.set()

    def unavailable_reason(self, device):
        self.checks.append(("full", threading.current_thread().name))
        return self.reason

    def unavailable_before_loading(self, device):
        self.checks.append(("quick", threading.current_thread().name))
        return self.quick_reason

    def tensor_device_problem(self, device, tensor_device):
        return None

    def preference(self, mask):
        return self.rank

    def lower(self, mask, device, options):
        if not isinstance(mask, BlockMask):
            raise TypeError(f"lower(): expected a BlockMask, got {type(mask).__name__}")
        self.lowered.append(threading.current_thread().name)
        self.lowered_masks.append(mask)
        self.lowered_options.append(options)

        def run(q, k, v, scale, return_lse):
            self.runs.append((threading.current_thread().name, q))
            self.grad_enabled.append(torch.is_grad_enabled())
            assert self.gate.wait(30), "the test never released the gate"
            if self.error is not None:
                raise self.error
            return torch.full_like(q, self.tag), (torch.zeros(q.shape[:3]) if return_lse else None)
        return run


@pytest.fixture
def fakes(monkeypatch):
    slow = _Fake("fake-slow", 100, FAST, slow=True, dtypes={"float32", "float16"})
    quick = _Fake("fake-quick", 50, FALLBACK, slow=False, dtypes={"float32"})
    kept = {n: b for n, b in registry.registered_backends().items() if "cuda" not in b.capabilities.devices}
    monkeypatch.setattr(registry, "_REGISTRY", {**kept, slow.name: slow, quick.name: quick})
    _fresh_state(monkeypatch)
    yield slow, quick
    slow.gate.set()
    assert warmup.wait(30), "a warm-up this test queued did not end"   # before the next test's records exist
    sparsecore.clear_cache()


def _fresh_state(monkeypatch):
    """The process's warm-up records as in a new process (a test's geometries and errors stay its own). A warm-up
    that an earlier test queued and never waited for (its kernel fell back, and the test ended) would otherwise
    record its geometry as warm here: a fake's geometry is shared by many tests."""
    assert warmup.wait(30), "an earlier test's warm-up did not end"
    for name, empty in (("_warm", OrderedDict()), ("_pending", {}), ("_failed", OrderedDict()),
                        ("_unloadable", {}), ("_warned", set())):
        monkeypatch.setattr(warmup, name, empty)
    monkeypatch.delenv(warmup.ENV, raising=False)


def _mask(seed=0):
    rng = np.random.default_rng(seed)
    return BlockMask.from_dense(rng.random((2, 4, 4)) < 0.6, 64, 64, 16)


def _inputs(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 2, 64, 16, generator=gen).to(dtype) for _ in range(3)]


def test_the_first_call_runs_the_fallback_while_the_preferred_backend_warms_up_on_its_inputs(fakes):
    slow, quick = fakes
    slow.gate.clear()
    kernel = sparsecore.compile(_mask(), device="cuda")
    assert slow.checks == [("quick", "MainThread")] and kernel.warmup == "background"   # compile() imports nothing
    q, k, v = _inputs()
    out = kernel(q, k, v)
    assert float(out.flatten()[0]) == FALLBACK and kernel.backend is quick
    assert kernel(q, k, v).flatten()[0] == FALLBACK                      # still warming: the fallback again
    slow.gate.set()
    assert kernel.wait_for_warmups(timeout=30)
    assert [c for c in slow.checks if c[0] == "full"] == [("full", "sparsecore-warmup")]     # imported there only
    assert slow.lowered == ["sparsecore-warmup"]                                 # the sample's mask, on the worker
    (thread, ran), = slow.runs
    assert thread == "sparsecore-warmup" and ran is not q and torch.equal(ran, q)   # a copy: a small mask is whole
    assert float(kernel(q, k, v).flatten()[0]) == FAST and kernel.backend is slow
    assert slow.lowered == ["sparsecore-warmup", "MainThread"] and slow.runs[-1][0] == "MainThread"
    assert quick.lowered == ["MainThread"]


def test_a_kernel_of_a_geometry_warmed_before_runs_the_preferred_backend_at_once(fakes):
    """Methods compile a new mask every layer and step: once one warmed up, masks of its geometry need no warm-up."""
    slow, quick = fakes
    q, k, v = _inputs()
    first = sparsecore.compile(_mask(0), device="cuda")
    first(q, k, v)
    assert first.wait_for_warmups(timeout=30)
    first(q, k, v)                                    # the warm-up is taken up by the next call
    second = sparsecore.compile(_mask(1), device="cuda")
    assert float(second(q, k, v).flatten()[0]) == FAST and len(slow.lowered) == 3     # sample, first, second
    assert [thread for thread, _ in slow.runs] == ["sparsecore-warmup", "MainThread", "MainThread"]
    other_shape = sparsecore.compile(BlockMask.full(2, 64, 64, 32), device="cuda")    # new block offsets
    assert float(other_shape(q, k, v).flatten()[0]) == FALLBACK


def test_the_records_of_warm_geometries_are_bounded_and_clear_cache_forgets_them(fakes, monkeypatch):
    """A new text length is a new geometry (HunyuanVideo 1.5: every prompt): the records grew by one a geometry for
    good. The least recently used is forgotten past WARM_RECORDS (it warms up again), and clear_cache() forgets
    them all."""
    slow, quick = fakes
    monkeypatch.setattr(warmup, "WARM_RECORDS", 2)
    q, k, v = _inputs()

    def first_call(block: int, heads: list[int]) -> float:
        kernel = sparsecore.compile(BlockMask.full(2, 64, 64, block).select_heads(heads), device="cuda")
        value = float(kernel(q, k, v).flatten()[0])
        assert kernel.wait_for_warmups(timeout=30)
        return value
    assert first_call(16, [0, 1]) == FALLBACK and first_call(32, [0, 1]) == FALLBACK      # two geometries warm up
    assert first_call(16, [1, 0]) == FAST                    # a new kernel of the first: warm, now the most recent
    assert first_call(64, [0, 1]) == FALLBACK                # a third: the least recently used (32) is forgotten
    assert len(warmup._warm) == 2
    assert first_call(16, [0, 1]) == FAST and first_call(32, [1, 0]) == FALLBACK
    slow.error = RuntimeError("compile failed")                  # failures are bounded too, with their warnings
    with pytest.warns(RuntimeWarning, match="compile failed"):
        for block in (8, 4, 2):
            first_call(block, [0, 1])
            warmup.failure(next(reversed(warmup._failed)))
    assert len(warmup._failed) == 2 and warmup._warned <= set(warmup._failed)
    warmup._unloadable[("fake-slow", "cpu")] = "a reason"
    sparsecore.clear_cache()
    assert not warmup._warm and not warmup._failed and not warmup._warned and not warmup._unloadable


def test_a_backend_that_does_not_load_leaves_the_kernel_on_the_fallback(fakes):
    slow, quick = fakes
    slow.reason = "flash_attn.cute is not importable: ImportError: no cutlass"
    kernel = sparsecore.compile(_mask(), device="cuda")
    q, k, v = _inputs()
    kernel(q, k, v)
    assert kernel.wait_for_warmups(timeout=30)
    for _ in range(2):
        assert float(kernel(q, k, v).flatten()[0]) == FALLBACK and kernel.backend is quick
    assert slow.lowered == [] and [c for c, _ in slow.checks] == ["quick", "quick", "full"]   # not checked again
    assert warmup._unloadable == {("fake-slow", "cpu"): slow.reason}          # by backend and the tensors' device
    half = _inputs(torch.float16)                          # only the slow backend takes float16: says why not
    with pytest.raises(UnsupportedError, match=r"fake-slow: cannot run here: flash_attn.cute is not importable.*"
                                               r"fake-quick: dtypes"):
        kernel(*half)


def test_a_failed_warm_up_warns_once_then_the_backend_loads_in_place_as_in_the_wait_mode(fakes):
    """Nothing raised on the worker is raised to a caller later (every call so far succeeded on the fallback): a
    warning, then kernels of the geometry load the backend in place, where a failing call raises its own error."""
    slow, quick = fakes
    slow.error = RuntimeError("CuTe DSL compile failed")
    kernel = sparsecore.compile(_mask(), device="cuda")
    q, k, v = _inputs()
    kernel(q, k, v)
    assert kernel.wait_for_warmups(timeout=30)
    with pytest.warns(RuntimeWarning, match=r"warming 'fake-slow' up in the background failed \(RuntimeError: CuTe "
                                            r"DSL compile failed\); it is loaded in place from now on"):
        with pytest.raises(RuntimeError, match="CuTe DSL compile failed"):        # in place: it fails again there
            kernel(q, k, v)
    assert [t for t, _ in slow.runs] == ["sparsecore-warmup", "MainThread"]
    slow.error = None
    assert float(kernel(q, k, v).flatten()[0]) == FAST
    other = sparsecore.compile(_mask(1), device="cuda")       # the geometry's warm-up failed: in place, no warning
    assert float(other(q, k, v).flatten()[0]) == FAST and slow.runs[-1][0] == "MainThread"


def test_inputs_no_other_backend_takes_load_the_preferred_one_in_place(fakes):
    slow, quick = fakes
    kernel = sparsecore.compile(_mask(), device="cuda")
    out = kernel(*_inputs(torch.float16))
    assert float(out.flatten()[0]) == FAST and [t for t, _ in slow.runs] == ["MainThread"]
    assert [c for c, _ in slow.checks] == ["quick", "quick", "full"]
    named = sparsecore.compile(_mask(), device="cuda", backend="fake-slow")    # a named backend has no fallback
    assert float(named(*_inputs()).flatten()[0]) == FAST


def test_wait_mode_loads_in_place_and_runs_one_backend_throughout(fakes, monkeypatch):
    slow, quick = fakes
    kernel = sparsecore.compile(_mask(), device="cuda", warmup="wait")
    assert slow.checks == [("full", "MainThread")]
    assert float(kernel(*_inputs()).flatten()[0]) == FAST and [t for t, _ in slow.runs] == ["MainThread"]
    monkeypatch.setenv(warmup.ENV, "wait")
    assert sparsecore.compile(_mask(), device="cuda").warmup == "wait"
    assert sparsecore.compile(_mask(), device="cuda", warmup="background").warmup == "background"


def test_the_worker_runs_on_the_callers_device_and_stream_without_gradients(fakes, monkeypatch):
    """Each thread has its own current stream and device: the warm-up's reads of q, k, v must be ordered after the
    caller's kernels that wrote them (its stream), on their device; and it records no autograd graph."""
    from sparsecore import warmup_sample
    slow, quick = fakes
    entered = []
    monkeypatch.setattr(warmup_sample, "caller_stream", lambda tensor: "the caller's stream")
    monkeypatch.setattr(warmup, "on_stream", lambda stream: _Recorded(entered, "stream", stream))
    monkeypatch.setattr(warmup, "on_device", lambda device: _Recorded(entered, "device", device))
    q, k, v = (t.requires_grad_() for t in _inputs())
    sparsecore.compile(_mask(), device="cuda")(q, k, v)
    assert warmup.wait(timeout=30)
    worker = "sparsecore-warmup"
    assert entered == [("device", q.device, worker), ("stream", "the caller's stream", worker)]
    assert slow.grad_enabled == [False]


class _Recorded:
    """A context manager that records what it was entered for, and on which thread."""

    def __init__(self, log, what, value):
        self.log, self.what, self.value = log, what, value

    def __enter__(self):
        self.log.append((self.what, self.value, threading.current_thread().name))

    def __exit__(self, *exc):
        return False


def test_a_kernel_not_called_again_after_its_warm_up_holds_no_inputs(fakes):
    """A method's kernel is often called once: the warm-up it queued must not keep that call's q, k, v alive."""
    import gc
    import weakref
    slow, quick = fakes
    kernel = sparsecore.compile(_mask(), device="cuda")
    q, k, v = _inputs()
    kernel(q, k, v)
    held = weakref.ref(q)
    del q, k, v
    assert warmup.wait(timeout=30)
    slow.runs.clear()                                  # the fakes' own records of what ran hold the inputs
    quick.runs.clear()
    gc.collect()
    assert held() is None and kernel is not None


def test_the_sample_runs_with_the_options_its_backend_fixes_for_it(fakes, monkeypatch):
    """A lowering that decides from the whole mask or the inputs' lengths (fa4: tiles, key ranges) fixes those
    decisions for the sample (Backend.warmup_options); the kernel's own run keeps the kernel's options."""
    slow, quick = fakes
    monkeypatch.setattr(slow, "warmup_options", lambda mask, options, call: ("fixed for", mask.q_len, call[0].shape))
    q, k, v = _inputs()
    kernel = sparsecore.compile(_mask(), device="cuda")
    kernel(q, k, v)
    assert warmup.wait(timeout=30) and float(kernel(q, k, v).flatten()[0]) == FAST
    assert slow.lowered_options == [("fixed for", 64, q.shape), kernel.options]


def test_the_warm_up_starts_after_the_calls_own_launch(fakes, monkeypatch):
    """The worker's import and compile hold the GIL for seconds: queued during the call, started after its run."""
    import time
    slow, quick = fakes
    events = []
    run_quick, check_slow = quick.lower, slow.unavailable_reason

    def lower_quick(mask, device, options):
        run = run_quick(mask, device, options)

        def slow_launch(*args):
            time.sleep(0.05)                       # a worker started before the launch would check meanwhile
            events.append("fallback ran")
            return run(*args)
        return slow_launch
    monkeypatch.setattr(quick, "lower", lower_quick)
    monkeypatch.setattr(slow, "unavailable_reason", lambda device: events.append("slow loaded") or check_slow(device))
    sparsecore.compile(_mask(), device="cuda")(*_inputs())
    assert warmup.wait(timeout=30) and events == ["fallback ran", "slow loaded"]


def test_each_input_signature_and_each_options_value_warms_up_on_its_own(fakes, monkeypatch):
    """FA4 compiles per dtype, head dim, LSE wanted, options: warm for one of them is not warm for another."""
    slow, quick = fakes
    for backend in fakes:
        monkeypatch.setattr(backend, "options_type", _Width, raising=False)
    q, k, v = _inputs()
    kernel = sparsecore.compile(_mask(), device="cuda", width=1)
    kernel(q, k, v)
    assert warmup.wait(timeout=30) and float(kernel(q, k, v).flatten()[0]) == FAST
    out, _ = kernel(q, k, v, return_lse=True)                     # another signature: warms up behind again
    assert float(out.flatten()[0]) == FALLBACK
    wider = sparsecore.compile(_mask(1), device="cuda", width=2)    # the geometry, other options
    assert float(wider(q, k, v).flatten()[0]) == FALLBACK
    same = sparsecore.compile(_mask(1), device="cuda", width=1)     # the geometry and options warmed
    assert float(same(q, k, v).flatten()[0]) == FAST


@dataclasses.dataclass(frozen=True)
class _Width:
    width: int = 1


@pytest.mark.parametrize("value, error, match", [
    ("later", ValueError, r"warmup: expected None \(\$SPARSECORE_WARMUP, else 'background'\) or one of "
                          r"\['background', 'wait'\], got 'later'"),
    (1, TypeError, r"warmup: expected None or one of \['background', 'wait'\], got int"),
])
def test_compile_refuses_an_unknown_warmup_mode(value, error, match):
    with pytest.raises(error, match=match):
        sparsecore.compile(_mask(), device="cpu", warmup=value)


def test_an_unknown_mode_in_the_environment_is_refused_naming_it(monkeypatch):
    monkeypatch.setenv(warmup.ENV, "eager")
    with pytest.raises(ValueError, match=r"SPARSECORE_WARMUP: expected one of \['background', 'wait'\] .*got "
                                         r"'eager'"):
        sparsecore.compile(_mask(), device="cpu")


@pytest.mark.parametrize("timeout, error, match", [
    ("5", TypeError, r"timeout: expected None or a number of seconds >= 0 \(math.inf: no limit\), got str"),
    (True, TypeError, r"timeout: expected None or a number of seconds .*got bool"),
    (-1, ValueError, r"timeout: expected None or a number of seconds >= 0 .*got -1"),
    (float("nan"), ValueError, r"timeout: expected .*got nan"),
])
def test_waiting_for_warm_ups_refuses_a_timeout_that_is_no_number_of_seconds(fakes, timeout, error, match):
    """A string failed deep in threading ("'>' not supported between instances of 'str' and 'int'"), NaN, a negative
    number and True were taken (False at once, or a 1 s wait)."""
    slow, quick = fakes
    slow.gate.clear()                                       # a warm-up in flight: the timeout is used
    kernel = sparsecore.compile(_mask(), device="cuda")
    kernel(*_inputs())
    with pytest.raises(error, match=match):
        kernel.wait_for_warmups(timeout)


def test_an_infinite_timeout_waits_without_a_limit(fakes):
    """math.inf is a natural "no limit"; it raised OverflowError ("timestamp out of range for platform time_t")."""
    slow, quick = fakes
    slow.gate.clear()
    kernel = sparsecore.compile(_mask(), device="cuda")
    kernel(*_inputs())
    releaser = threading.Timer(0.2, slow.gate.set)
    releaser.start()
    assert kernel.wait_for_warmups(math.inf) and warmup.wait(float("inf"))
    releaser.join()


def _dense_oracle(q, k, v, mask):
    """Float64 dense attention over the mask's token pattern, written here."""
    allowed = torch.from_numpy(mask.token_mask())                                  # [H, q_len, kv_len]
    scores = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed, -math.inf)
    return torch.nan_to_num(torch.softmax(scores, dim=-1)) @ v.double()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.cuda.is_available() is False: fa4 needs an SM90 GPU")
def test_fa4_warms_up_behind_triton_on_the_gpu_and_both_match_dense():
    fa4 = sparsecore.registered_backends()["fa4"]
    reason = fa4.unavailable_reason("cuda")
    if reason is not None:
        pytest.skip(f"fa4 on cuda: {reason}")
    rng = np.random.default_rng(3)
    keep = rng.random((2, 12, 12)) < 0.3
    keep[:, np.arange(12), np.arange(12)] = True
    mask = BlockMask.from_dense(keep, 1500, 1500, 128)                           # a short last block
    gen = torch.Generator(device="cuda").manual_seed(3)
    q, k, v = (torch.randn(1, 2, 1500, 128, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):                                     # the warm-up goes on the caller's stream
        kernel = sparsecore.compile(mask, device="cuda", warmup="background")
        first = kernel(q, k, v)
        ran_first = kernel.backend.name
        assert kernel.wait_for_warmups(timeout=300)
        later = kernel(q, k, v)
    torch.cuda.synchronize()
    expected = _dense_oracle(q.cpu(), k.cpu(), v.cpu(), mask)
    assert ran_first == "triton" and kernel.backend.name == "fa4"
    for out in (first, later):
        assert torch.allclose(out.cpu().double(), expected, atol=2e-2, rtol=0)


class _Held:
    """An object a warm-up task refers to, to see whether anything keeps it after the task."""


def test_an_op_outside_a_kernel_runs_once_it_warmed_up_on_the_worker(monkeypatch):
    _fresh_state(monkeypatch)
    gate, runs, sampled = threading.Event(), [], []
    load = lambda: None  # noqa: E731

    def first_run():                     # called where the ask is: copies a sample, returns what the worker runs
        sampled.append(threading.current_thread().name)
        return lambda: (gate.wait(30), runs.append(threading.current_thread().name))
    like = torch.zeros(1)
    first = warmup.ready_for(("op", "cpu"), load, first_run, like)
    assert "warming up in the background (SPARSECORE_WARMUP=wait" in first
    assert "warming up" in warmup.ready_for(("op", "cpu"), load, first_run, like) and runs == []     # started once
    gate.set()
    assert warmup.wait(timeout=30)
    assert warmup.ready_for(("op", "cpu"), load, first_run, like) is None and runs == ["sparsecore-warmup"]
    assert sampled == ["MainThread"]


def test_an_op_that_does_not_load_says_why_and_one_that_fails_warns_once_then_loads_in_place(monkeypatch):
    _fresh_state(monkeypatch)
    ran = []
    record = lambda: lambda: ran.append("ran")  # noqa: E731
    assert "warming up" in warmup.ready_for(("absent", "cpu"), lambda: "flash-attn-4 is not installed", record, None)
    assert warmup.wait(timeout=30)
    found = warmup.ready_for(("absent", "cpu"), lambda: None, record, None)
    assert found == "flash-attn-4 is not installed" and not ran

    def fail():
        raise RuntimeError("CuTe DSL compile failed")
    failing = lambda: fail  # noqa: E731
    warmup.ready_for(("failing", "cpu"), lambda: None, failing, None)
    assert warmup.wait(timeout=30)
    with pytest.warns(RuntimeWarning, match=r"warming 'failing' up in the background failed \(RuntimeError: CuTe"):
        assert warmup.ready_for(("failing", "cpu"), lambda: None, failing, None) is None      # then in place: it runs
    assert warmup.ready_for(("failing", "cpu"), lambda: "why not", failing, None) == "why not"


def test_the_wait_mode_loads_in_place_without_the_worker(monkeypatch):
    _fresh_state(monkeypatch)
    monkeypatch.setenv(warmup.ENV, "wait")
    assert warmup.ready_for(("op", "cpu"), lambda: "why not", None, None) == "why not"
    assert warmup.ready_for(("op", "cpu"), lambda: None, None, None) is None and warmup._pending == {}


def test_nothing_keeps_a_warm_up_tasks_inputs_after_it_ended_well_or_not():
    """A warm-up holds the call's tensors (q, k, v: hundreds of MB at 6x) only while it runs, also where it raised
    (the exception's frames would hold its locals)."""
    import gc
    import weakref

    def task(held, fail):
        inputs = held                                       # a local of a frame in the traceback
        if fail:
            raise RuntimeError(f"failed with {type(inputs).__name__}")
    for fail in (False, True):
        held = _Held()
        ref = weakref.ref(held)
        future = warmup.submit(lambda held=held, fail=fail: task(held, fail))
        del held
        assert warmup.wait(timeout=30) and (future.exception() is not None) == fail
        gc.collect()
        assert ref() is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.cuda.is_available() is False: fa4 needs an SM90 GPU")
def test_fa4s_dense_op_warms_up_behind_cudnn_and_both_match_dense(monkeypatch):
    from sparsecore.search import dense_attention, dense_impl
    reason = sparsecore.registered_backends()["fa4"].unavailable_reason("cuda")
    if reason is not None:
        pytest.skip(f"fa4 on cuda: {reason}")
    _fresh_state(monkeypatch)
    monkeypatch.setenv(warmup.ENV, "background")
    gen = torch.Generator(device="cuda").manual_seed(5)
    q, k, v = (torch.randn(1, 2, 8192, 128, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
    assert dense_impl(q, k, v) == "cudnn"                        # the first ask starts FA4's warm-up
    first, first_lse = dense_attention(q, k, v)
    assert warmup.wait(timeout=300) and dense_impl(q, k, v) == "fa4"
    later, later_lse = dense_attention(q, k, v)
    scores = q.double() @ k.double().transpose(-1, -2) / math.sqrt(128)
    expected, expected_lse = torch.softmax(scores, dim=-1) @ v.double(), torch.logsumexp(scores, dim=-1)
    for out, lse in ((first, first_lse), (later, later_lse)):
        assert torch.allclose(out.double(), expected, atol=2e-2, rtol=0)
        assert torch.allclose(lse.double(), expected_lse, atol=1e-2, rtol=0)


def test_a_warm_up_another_thread_took_first_does_not_fail_this_call(fakes, monkeypatch):
    """compile() hands one cached kernel to every thread: two calls that both queued a warm-up each start what is
    left. The list read non-empty, then another thread popped its last item before this one did (6 rounds of 1,500
    with 8 threads raised IndexError from a call whose output was computed); here that interleaving, made certain."""
    class TakenMeanwhile(list):                  # non-empty when checked, empty when popped: the other thread's turn
        def __bool__(self):
            return True
    kernel = sparsecore.compile(_mask(), device="cuda")
    kernel(*_inputs())                             # queues and starts the slow backend's warm-up
    monkeypatch.setattr(kernel, "_queued", TakenMeanwhile())
    kernel(*_inputs())


def test_a_call_decides_on_gradients_by_its_own_backend_not_one_another_thread_chose(fakes, monkeypatch):
    """``kernel.backend`` is the last call's, and threads share a cached kernel: a call that read it back after
    choosing could see another thread's (differentiable) backend and return a non-differentiable backend's output
    as if autograd had recorded it. Here the other thread's write lands between the choice and the check."""
    import types
    slow, quick = fakes
    kernel = sparsecore.compile(_mask(), device="cuda")
    other = types.SimpleNamespace(name="another thread's", differentiable=True)
    chosen = kernel._run_for

    def chosen_then_overwritten(*args):
        found = chosen(*args)
        kernel.backend = other
        return found
    monkeypatch.setattr(kernel, "_run_for", chosen_then_overwritten)
    q, k, v = (t.requires_grad_() for t in _inputs())
    out = kernel(q, k, v)
    with pytest.raises(RuntimeError, match="fake-quick"):      # the backend that ran has no backward: named
        out.sum().backward()


def test_waiting_from_another_thread_starts_a_warm_up_a_running_call_queued(fakes):
    """A call queues its warm-up and starts it after its own launch: a thread waiting meanwhile (its first call still
    in the fallback) got True at once and its next call still ran the fallback. Waiting now starts it."""
    slow, quick = fakes
    kernel = sparsecore.compile(_mask(), device="cuda")
    q, k, v = _inputs()
    quick.gate.clear()                                      # the first call stays in the fallback's run
    first = threading.Thread(target=lambda: kernel(q, k, v), name="first-call")
    first.start()
    try:
        for _ in range(300):
            if quick.runs:
                break
            threading.Event().wait(0.1)
        assert quick.runs and first.is_alive() and not slow.runs     # queued, not started
        assert kernel.wait_for_warmups(timeout=30)
        assert [thread for thread, _ in slow.runs] == ["sparsecore-warmup"]
        assert float(kernel(q, k, v).flatten()[0]) == FAST
    finally:
        quick.gate.set()
        first.join(30)
