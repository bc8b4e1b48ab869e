"""The background warm-up where it can go wrong: many kernels of one geometry, errors, memory, handing over.

The fake backends and helpers are tests/test_warmup.py's (fixture ``fakes``): ``fake-slow`` stands in for fa4
(slow to load, tag FAST), ``fake-quick`` for triton (tag FALLBACK). CPU only; no numerical claims (the tags say
which backend ran).
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import sparsecore
from sparsecore import warmup, warmup_sample
from sparsecore.registry import UnsupportedError
from test_warmup import FALLBACK, FAST, _inputs, _mask, fakes  # noqa: F401  (fakes: the fixture)

torch.manual_seed(0)


def test_a_geometry_warmed_by_a_kernel_called_once_serves_the_next_mask(fakes):
    """Methods compile a new mask every layer and step and call each kernel once or a few times: a finished warm-up
    must make the geometry warm for them, without one more call of the kernel that queued it (else a kernel per
    mask never runs fa4 and every new mask queues one more warm-up on its inputs)."""
    slow, quick = fakes
    q, k, v = _inputs()
    first = sparsecore.compile(_mask(0), device="cuda")
    first(q, k, v)
    assert first.wait_for_warmups(timeout=30)
    second = sparsecore.compile(_mask(1), device="cuda")
    out = second(q, k, v)
    assert second.wait_for_warmups(timeout=30)
    assert [t for t, _ in slow.runs].count("sparsecore-warmup") == 1, "the geometry warmed up twice"
    assert float(out.flatten()[0]) == FAST


def test_kernels_of_one_geometry_queue_one_warm_up_and_hold_no_inputs_behind_it(fakes):
    """While one warm-up of a geometry runs (fa4: 15-23 s), every layer's new mask of that geometry queues its
    own, each holding its call's q, k, v until the worker gets to it: 40 layers of a video DiT's dense step hold 40
    layers' activations. One warm-up per geometry is enough (the others' compiles are the first's)."""
    slow, quick = fakes
    slow.gate.clear()
    held = []
    for seed in range(4):
        q, k, v = _inputs(seed=seed)
        assert float(sparsecore.compile(_mask(seed), device="cuda")(q, k, v).flatten()[0]) == FALLBACK
        held.append(weakref.ref(q))
        del q, k, v
    quick.runs.clear()                                # the fakes' records of what ran would hold the inputs too
    slow.runs[:] = [(thread, None) for thread, _ in slow.runs]
    gc.collect()
    alive = sum(ref() is not None for ref in held)
    slow.gate.set()
    sparsecore.warmup.submit(lambda: None).result(30)           # the worker's queue has drained
    assert alive <= 1, f"{alive} calls' inputs held by queued warm-ups"
    assert [t for t, _ in slow.runs].count("sparsecore-warmup") == 1, "one warm-up per kernel, not per geometry"


def test_a_failed_warm_up_is_not_replayed_at_every_later_call(fakes):
    """A warm-up that failed for a passing reason (an out-of-memory error: it runs next to the fallback's own
    memory) must not leave the kernel raising that stale error (the kernel is cached: compiling the mask again
    returns it). A call in place ("wait") would simply run again, and so does a later call here."""
    slow, quick = fakes
    slow.error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    kernel = sparsecore.compile(_mask(), device="cuda")
    q, k, v = _inputs()
    kernel(q, k, v)
    assert kernel.wait_for_warmups(timeout=30)
    slow.error = None                                           # memory is free again
    assert sparsecore.compile(_mask(), device="cuda") is kernel
    with pytest.warns(RuntimeWarning, match="OutOfMemoryError: CUDA out of memory"):
        out = kernel(q, k, v)
    assert float(out.flatten()[0]) == FAST


def test_a_warm_up_error_keeps_no_calls_inputs(fakes):
    """A stored exception raised again at each call would gather each call's frames (``__call__``, ``_run_for``,
    ``_meanwhile``, whose locals are the call's q, k, v) in its traceback and keep every failing call's inputs alive,
    and a stored traceback the warming call's (the worker's frames). The fake raises a new error at each
    failing run (``RuntimeError``, the class), as a real failure does."""
    slow, quick = fakes
    slow.error = RuntimeError
    kernel = sparsecore.compile(_mask(), device="cuda")
    refs = []
    q, k, v = _inputs(seed=10)
    kernel(q, k, v)
    refs.append(weakref.ref(q))
    del q, k, v
    assert kernel.wait_for_warmups(timeout=30)
    for seed in range(3):
        q, k, v = _inputs(seed=seed)
        try:
            kernel(q, k, v)
        except RuntimeError:
            pass
        refs.append(weakref.ref(q))
        del q, k, v
    quick.runs.clear()                                # the fakes' records of what ran would hold the inputs too
    slow.runs.clear()
    gc.collect()
    kept = [i for i, ref in enumerate(refs) if ref() is not None]
    assert not kept, f"calls {kept} (0: the warming call) still hold their q through the stored error"


def test_the_worker_keeps_no_kernel_after_its_warm_up(fakes):
    """A kernel of ``cache=False`` lives as long as its caller holds it: the worker's loop must not keep its last
    task (a closure over the kernel, its mask and its runs' device plans) while waiting for the next."""
    slow, quick = fakes
    q, k, v = _inputs()
    kernel = sparsecore.compile(_mask(), device="cuda", cache=False)
    kernel(q, k, v)
    assert kernel.wait_for_warmups(timeout=30)
    kernel(q, k, v)                                             # takes the warmed run up
    ref = weakref.ref(kernel)
    del kernel
    gc.collect()
    assert ref() is None


@pytest.fixture
def three(monkeypatch, fakes):
    """fa4, flashinfer and triton as the 128-token masks rank them (backends/cuda/selection.py: fa4 30, flashinfer
    20, triton 10): two slow backends ahead of the quick one."""
    from sparsecore import registry
    from test_warmup import _Fake
    slow, quick = fakes
    jit = _Fake("fake-jit", 75, 3.0, slow=True, dtypes={"float32", "float16"})
    monkeypatch.setattr(registry, "_REGISTRY", {**registry._REGISTRY, jit.name: jit})
    yield slow, jit, quick
    jit.gate.set()


def test_a_first_backend_that_does_not_load_hands_over_to_the_quick_one_not_to_another_slow_one(three):
    """fa4's warm-up finds flash_attn.cute unimportable: the kernel chooses again, and for 128-token masks its next
    choice is FlashInfer, slow too (84 s of nvcc JIT on the H200 host): it must warm up in the background in turn,
    not load and run in place where the first calls ran Triton."""
    slow, jit, quick = three
    slow.reason = "flash_attn.cute is not importable: ImportError: no cutlass"
    kernel = sparsecore.compile(_mask(), device="cuda")
    q, k, v = _inputs()
    assert float(kernel(q, k, v).flatten()[0]) == FALLBACK
    assert kernel.wait_for_warmups(timeout=30)
    kernel(q, k, v)
    kernel.wait_for_warmups(timeout=30)
    assert "MainThread" not in [t for t, _ in jit.runs], "the other slow backend loaded and ran in place"


def test_plans_asked_on_the_host_after_the_worker_lowered_go_there(fakes):
    """keep_plans_on_host() once the worker is inside the warm-up run, that is after it lowered its sample: the run the
    kernel lowers after the warm-up keeps its plans on the host, the sample's never did."""
    import time
    slow, quick = fakes
    slow.host_plans = True
    held = []
    lower = slow.lower

    def lower_with_plans(mask, device, options):
        run = lower(mask, device, options)
        run.keep_plans_on_host = lambda: held.append("host")
        return run
    slow.lower = lower_with_plans
    slow.gate.clear()
    kernel = sparsecore.compile(_mask(), device="cuda")
    q, k, v = _inputs()
    kernel(q, k, v)
    deadline = time.monotonic() + 30
    while not slow.runs and time.monotonic() < deadline:         # the worker lowered and waits in its run
        time.sleep(0.001)
    assert slow.runs and held == []
    kernel.keep_plans_on_host()
    slow.gate.set()
    assert kernel.wait_for_warmups(timeout=30)
    kernel(q, k, v)
    assert kernel.backend is slow and held == ["host"]


def test_at_exit_the_current_warm_up_ends_and_queued_ones_are_dropped(tmp_path):
    """Native code cut off mid-compile by the interpreter's shutdown may crash it: the running task ends first."""
    import subprocess
    import sys
    import textwrap
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from sparsecore import warmup
        started = warmup.submit(lambda: (time.sleep(0.5), Path({str(tmp_path / 'ran')!r}).write_text('ended')))
        warmup.submit(lambda: Path({str(tmp_path / 'queued')!r}).write_text('ran'))
        while not started.running():
            time.sleep(0.01)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "ran").read_text() == "ended" and not (tmp_path / "queued").exists()


def test_a_forked_child_forgets_its_parents_warm_ups_and_their_futures_end():
    """The child has no worker: its kernels queue those warm-ups anew on one of their own; a future of the parent's
    that someone waits on ends with an error there, not never."""
    import os
    import threading as threads
    from sparsecore import warmup
    release = threads.Event()
    running = warmup.submit(lambda: release.wait(30))
    while not running.running():
        release.wait(0.01)
    queued = warmup.submit(lambda: None)
    warmup._pending[("fork-test", 1)], warmup._pending[("fork-test", 2)] = running, queued
    try:
        pid = os.fork()
        if pid == 0:                                                   # the child: report by exit code only
            ok = all(isinstance(f.exception(timeout=5), RuntimeError) for f in (running, queued))
            ok = ok and warmup.pending(("fork-test", 1)) is None and warmup.pending(("fork-test", 2)) is None
            os._exit(0 if ok and warmup.submit(lambda: 7).result(timeout=5) == 7 else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        release.set()
        del warmup._pending[("fork-test", 1)], warmup._pending[("fork-test", 2)]
    assert running.result(timeout=30) is True and queued.result(timeout=30) is None      # the parent's ran


def test_a_warm_up_runs_a_small_sample_of_the_call_with_the_same_block_traits(fakes):
    """The worker holds none of the call's tensors: it runs the mask's first blocks (up to SAMPLE_TOKENS tokens) and
    its last (short) block on each side, on copies of those tokens (tests/test_warmup_samples.py: what FA4's compile
    depends on)."""
    import numpy as np
    from sparsecore.ir import BlockMask
    slow, quick = fakes
    rng = np.random.default_rng(7)
    mask = BlockMask.from_dense(rng.random((2, 101, 101)) < 0.5, 1608, 1608, 16)   # 100 blocks of 16, one of 8
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 2, 1608, 16, generator=gen) for _ in range(3))
    kernel = sparsecore.compile(mask, device="cuda")
    kernel(q, k, v)
    assert kernel.wait_for_warmups(timeout=30)
    (thread, ran), = slow.runs
    assert thread == "sparsecore-warmup" and ran.shape[2] == warmup_sample.SAMPLE_TOKENS + 8
    assert torch.equal(ran, torch.cat([q[:, :, :1024], q[:, :, 1600:]], dim=2))
    sample, = slow.lowered_masks
    assert (sample.q_len, sample.kv_len) == (1032, 1032) and sample.q_offsets[-2:].tolist() == [1024, 1032]


def test_a_sample_is_the_sub_mask_of_its_tokens_and_approximating_masks_sample_their_exact_part():
    import dataclasses
    import numpy as np
    from sparsecore.ir import BlockMask, Unselected
    rng = np.random.default_rng(11)
    mask = BlockMask.from_dense(rng.random((2, 20, 30)) < 0.4, 1180, 1780, 60)      # short last blocks: 40 / 40
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(1, 2, 1180, 8, generator=gen)
    k, v = (torch.randn(1, 2, 1780, 8, generator=gen) for _ in range(2))
    part, q_s, k_s, v_s, scale, lse = warmup_sample.sample_call(mask, (q, k, v, 0.5, False))
    rows = np.r_[0:1020, 1140:1180]                                      # 17 blocks of 60 (1020 <= 1024), the last
    cols = np.r_[0:1020, 1740:1780]
    assert np.array_equal(part.token_mask(), mask.token_mask()[:, rows][:, :, cols])
    assert torch.equal(q_s, q[:, :, rows]) and torch.equal(k_s, k[:, :, cols]) and torch.equal(v_s, v[:, :, cols])
    assert q_s.untyped_storage().data_ptr() != q.untyped_storage().data_ptr() and (scale, lse) == (0.5, False)
    on_device, *_ = warmup_sample.sample_call(mask.to("cpu"), (q, k, v, 0.5, False))         # torch lists: one host read
    assert on_device.device is not None and np.array_equal(on_device.token_mask(), part.token_mask())
    grouped = dataclasses.replace(mask, unselected=Unselected("grouped-first-order", 4))
    part, *_, lse = warmup_sample.sample_call(grouped, (q, k, v, 0.5, False))
    assert part.unselected.kind == "drop" and lse is True
    assert np.array_equal(part.token_mask(), grouped.token_mask()[:, rows][:, :, cols])


def test_a_backend_found_unloadable_where_a_kernel_had_loaded_it_does_not_send_the_kernel_round_in_circles(fakes):
    """A kernel that loaded the slow backend in place (float16: nothing else takes it) and then learns from a warm-up
    that it does not load on that device chooses again without it: the next backend for float32, and for float16
    an error naming why (before: _reason() said yes from the kernel's own record and _meanwhile recursed)."""
    from sparsecore import warmup
    slow, quick = fakes
    kernel = sparsecore.compile(_mask(0), device="cuda")
    assert float(kernel(*_inputs(torch.float16)).flatten()[0]) == FAST          # loaded in place
    warmup._unloadable[("fake-slow", "cpu")] = "compute capability 8.0"          # a warm-up on these tensors' device
    assert float(kernel(*_inputs()).flatten()[0]) == FALLBACK
    with pytest.raises(UnsupportedError, match="fake-slow: cannot run here: compute capability 8.0"):
        kernel(*_inputs(torch.float16))


def test_a_backend_found_unloadable_on_one_device_still_warms_up_on_another(fakes):
    from sparsecore import warmup
    slow, quick = fakes
    warmup._unloadable[("fake-slow", "cuda:0")] = "compute capability 8.0"       # these tensors are on "cpu"
    kernel = sparsecore.compile(_mask(0), device="cuda")
    q, k, v = _inputs()
    assert float(kernel(q, k, v).flatten()[0]) == FALLBACK
    assert kernel.wait_for_warmups(timeout=30) and float(kernel(q, k, v).flatten()[0]) == FAST


def test_a_named_slow_backend_that_does_not_load_is_refused_by_compile_as_in_the_wait_mode(fakes):
    """With no other backend to run meanwhile, compile() checks a slow backend whole, as the "wait" mode does, and
    raises naming why (not an UnsupportedError at the first call)."""
    slow, quick = fakes
    slow.reason = "flash_attn.cute is not importable: ImportError: no cutlass"
    for mode in ("wait", "background"):
        with pytest.raises(RuntimeError, match="fake-slow: flash_attn.cute is not importable"):
            sparsecore.compile(_mask(), device="cuda", backend=slow.name, warmup=mode)
    assert sparsecore.compile(_mask(), device="cuda", warmup="background").backend is slow   # quick one meanwhile


def test_without_a_worker_thread_the_slow_backend_is_checked_before_it_runs_here(fakes, monkeypatch):
    """Where the OS refuses the warm-up thread, the geometry's warm-up fails and the call loads the slow backend in
    place as in the "wait" mode: checked whole first, so one that cannot load leaves the call on the fallback (it
    ran unchecked, and every later call failed on it)."""
    import threading
    import warnings

    slow, quick = fakes
    slow.reason = "its library is not importable here"
    start = threading.Thread.start

    def refuse_the_worker(thread):
        if thread.name == "sparsecore-warmup":
            raise RuntimeError("can't start new thread")
        return start(thread)

    monkeypatch.setattr(threading.Thread, "start", refuse_the_worker)
    monkeypatch.setattr(warmup, "_tasks", None)          # as in a process whose worker has not started yet
    kernel = sparsecore.compile(_mask(), device="cuda", warmup="background")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tags = [float(kernel(*_inputs()).flatten()[0]) for _ in range(3)]
    assert tags == [FALLBACK] * 3 and not slow.runs
    assert ("full", threading.current_thread().name) in slow.checks


def test_a_warm_up_whose_setup_fails_in_the_call_leaves_the_call_on_its_fallback(fakes, monkeypatch):
    """The warm-up's setup runs in the caller's call (the slow backend's warmup_options: fa4's lowers, reads the
    device's L2 and its package's version; the sample's cut): where it raises, the call runs the fallback and the
    failure is the warm-up's, warned once, the slow backend then loaded in place. Every call raised it before, and
    nothing was recorded."""
    slow, quick = fakes

    def broken(mask, options, call):
        raise RuntimeError("boom in warmup_options")

    monkeypatch.setattr(slow, "warmup_options", broken)
    q, k, v = _inputs()
    kernel = sparsecore.compile(_mask(0), device="cuda")
    assert float(kernel(q, k, v).flatten()[0]) == FALLBACK and not slow.runs
    with pytest.warns(RuntimeWarning, match="warming 'fake-slow' up in the background failed .*boom in warmup_options"):
        assert float(kernel(q, k, v).flatten()[0]) == FAST                  # loaded in place, as with "wait"


class _WithoutAddNote(RuntimeError):
    """An error as every error is on Python 3.10 (pyproject: requires-python >= 3.10): no ``add_note`` (3.11)."""

    def __getattribute__(self, name):
        if name == "add_note":
            raise AttributeError(f"{type(self).__name__!r} object has no attribute 'add_note'")
        return super().__getattribute__(name)


def test_a_failed_warm_up_on_python_3_10_does_not_end_the_worker_thread(fakes, monkeypatch):
    """The worker kept a failed task's traceback as a note with ``add_note``, which Python 3.10 lacks: the worker
    thread died (AttributeError), so every later warm-up stayed in flight for good and wait() never returned True."""
    slow, quick = fakes
    monkeypatch.setattr(warmup, "_tasks", None)              # a worker of this test's own (restored afterwards)
    monkeypatch.setattr(warmup, "_worker", None)
    slow.error = _WithoutAddNote("CuTe DSL compile failed")
    q, k, v = _inputs()
    failing = sparsecore.compile(_mask(), device="cuda")
    failing(q, k, v)
    assert failing.wait_for_warmups(timeout=10)
    slow.error = None
    other = sparsecore.compile(sparsecore.BlockMask.full(2, 64, 64, 32), device="cuda")   # another geometry
    assert float(other(q, k, v).flatten()[0]) == FALLBACK and other.wait_for_warmups(timeout=10)
    assert float(other(q, k, v).flatten()[0]) == FAST
    error = warmup.submit(lambda: (_ for _ in ()).throw(_WithoutAddNote("failed"))).exception(timeout=10)
    assert error.__traceback__ is None and "raised on sparsecore's warm-up thread" in error.__notes__[0]


def test_at_exit_the_running_warm_up_ends_before_atexit_handlers_of_packages_imported_later():
    """A package imported after sparsecore (flash_attn, cutlass, triton) registers its atexit cleanup later, so it ran
    first (atexit is last in, first out) while a compile still ran on the worker: the worker now ends before every
    atexit handler, and before concurrent.futures' exit hook (which refuses new pool work), with that hook's API."""
    import subprocess
    import sys
    import textwrap
    script = textwrap.dedent("""
        import atexit, threading, time
        from concurrent.futures import ThreadPoolExecutor
        from sparsecore import warmup
        began, done = threading.Event(), threading.Event()
        def compile_slowly():
            began.set()
            time.sleep(0.5)
            with ThreadPoolExecutor(1) as pool:      # a compile's worker pool (refused once its exit hook ran)
                pool.submit(time.sleep, 0.01).result()
            print("warm-up ended", flush=True)
            done.set()
        def library_cleanup():                       # a package imported later tears its state down
            print("cleanup with the warm-up " + ("ended" if done.is_set() else "still running"), flush=True)
        atexit.register(library_cleanup)
        warmup.submit(compile_slowly)
        began.wait(30)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert done.stdout.splitlines() == ["warm-up ended", "cleanup with the warm-up ended"], done.stdout


def test_the_exit_hook_falls_back_to_atexit_where_threadings_private_hook_is_absent_or_closed(monkeypatch):
    """``threading._register_atexit`` is CPython's private API: without it, or after its shutdown began, ``atexit``."""
    import atexit
    import threading as threads
    from sparsecore import warmup
    registered = []
    monkeypatch.setattr(atexit, "register", registered.append)
    monkeypatch.delattr(threads, "_register_atexit")
    warmup._at_exit(print)

    def closed(func):
        raise RuntimeError("can't register atexit after shutdown")
    monkeypatch.setattr(threads, "_register_atexit", closed, raising=False)
    warmup._at_exit(len)
    assert registered == [print, len]
