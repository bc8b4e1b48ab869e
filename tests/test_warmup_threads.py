"""Warm-ups across threads and devices: a worker thread that cannot start, two callers of one geometry, one device
where the slow backend does not load.

Fake backends from tests/test_warmup.py (fixture ``fakes``: ``fake-slow`` stands in for fa4, tag FAST; ``fake-quick``
for triton, tag FALLBACK). CPU only; Event gates, no long sleeps. Each test failed before its fix (a review,
2026-12-02).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import sparsecore
from sparsecore import BlockMask
from sparsecore import warmup
from test_warmup import FALLBACK, FAST, _inputs, _mask, fakes  # noqa: F401  (fakes: the fixture)

torch.manual_seed(0)


def _thread_start_fails_once(monkeypatch):
    """A fresh process's state (no worker yet) where the first start of the worker thread fails as
    ``threading.Thread.start`` does when the OS refuses a thread (RLIMIT_NPROC / a container's pids.max: "can't start
    new thread"), or, from Python 3.12, in an atexit handler ("can't create new thread at interpreter shutdown")."""
    monkeypatch.setattr(warmup, "_tasks", None)
    monkeypatch.setattr(warmup, "_worker", None)
    real_start, failed = threading.Thread.start, []

    def start(self):
        if self.name == "sparsecore-warmup" and not failed:
            failed.append(True)
            raise RuntimeError("can't start new thread")
        return real_start(self)
    monkeypatch.setattr(threading.Thread, "start", start)


def test_a_call_whose_fallback_ran_does_not_raise_because_the_warm_up_thread_could_not_start(fakes, monkeypatch):
    """A call submits its warm-up after its own launch; a worker thread that cannot start does not replace the call's
    result with an error (it did): the warm-up is recorded as failed, warned about, and the geometry loads in
    place."""
    slow, quick = fakes
    _thread_start_fails_once(monkeypatch)
    kernel = sparsecore.compile(_mask(), device="cuda")
    with pytest.warns(RuntimeWarning, match="could not start"):
        out = kernel(*_inputs())                                 # was: RuntimeError: can't start new thread
        assert float(out.flatten()[0]) == FALLBACK
        assert float(kernel(*_inputs()).flatten()[0]) == FAST    # the geometry loads in place, as when a warm-up fails


def test_a_worker_that_failed_to_start_once_does_not_wedge_every_later_warm_up_and_wait(fakes, monkeypatch):
    """After one failed start the worker starts at the next submit: wait() returns, the failed geometry loads in
    place, and another geometry warms up. (The queue used to be kept without a thread to read it: every later
    warm-up stayed "in flight" for good and wait() without a timeout blocked.)"""
    slow, quick = fakes
    _thread_start_fails_once(monkeypatch)
    kernel = sparsecore.compile(_mask(), device="cuda")
    q, k, v = _inputs()
    assert float(kernel(q, k, v).flatten()[0]) == FALLBACK       # this call's warm-up finds no worker thread
    assert warmup.wait(timeout=1.0), "wait() does not return: nothing runs the worker's queue"
    second = sparsecore.compile(_mask(), device="cuda", warmup="background", cache=False)
    with pytest.warns(RuntimeWarning, match="could not start"):
        assert float(second(q, k, v).flatten()[0]) == FAST       # failed: loaded in place, not "in flight" for good
    other = sparsecore.compile(BlockMask.from_dense(np.ones((2, 2, 2), bool), 64, 64, 32), device="cuda")
    assert float(other(q, k, v).flatten()[0]) == FALLBACK        # another geometry warms up, on a new worker
    assert warmup.wait(timeout=5.0) and float(other(q, k, v).flatten()[0]) == FAST


def test_kernels_of_one_geometry_called_from_two_threads_warm_it_up_once(fakes, monkeypatch):
    """Two threads whose calls both read "none" for a geometry (a key is in flight only once a call's warm-up is
    submitted, after its fallback ran) start one warm-up: the second start() finds the first in flight. (Both
    used to queue one: another 15-23 s of fa4 import and compile holding the GIL, another sample held.)"""
    slow, quick = fakes
    slow.gate.clear()                                            # the worker's warm-ups wait until both are queued
    entered, release = threading.Event(), threading.Event()
    lower_quick = quick.lower

    def lower(mask, device, options):
        run = lower_quick(mask, device, options)

        def gated(*args):
            if threading.current_thread().name == "caller-a":    # thread A is inside its fallback's launch
                entered.set()
                assert release.wait(30)
            return run(*args)
        return gated
    monkeypatch.setattr(quick, "lower", lower)
    q, k, v = _inputs()
    first, second = sparsecore.compile(_mask(0), device="cuda"), sparsecore.compile(_mask(1), device="cuda")
    errors = []

    def caller_a():
        try:
            first(q, k, v)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
    thread = threading.Thread(target=caller_a, name="caller-a")
    thread.start()
    assert entered.wait(30)
    assert float(second(q, k, v).flatten()[0]) == FALLBACK     # thread B: queues and submits the geometry's warm-up
    release.set()
    thread.join(30)
    slow.gate.set()
    assert warmup.wait(timeout=30) and not errors
    runs = [t for t, _ in slow.runs].count("sparsecore-warmup")
    assert runs == 1, f"the geometry warmed up {runs} times"


def test_a_backend_found_unloadable_on_one_device_is_still_warmed_by_the_same_kernel_on_another(fakes, monkeypatch):
    """A backend a warm-up found unloadable on one device is left there only: the same kernel still warms it up
    on tensors of another device (a host mask's kernel is cached by content and ``device="cuda"``, so pipelines on
    cuda:0 and cuda:1 share it). The kernel used to drop it for every device. "meta" stands for the other device."""
    slow, quick = fakes
    for backend in fakes:                                        # lists stay NumPy: no upload to "meta"
        monkeypatch.setattr(backend, "lowers_from_host", True)
    kernel = sparsecore.compile(_mask(), device="cuda")
    meta = [torch.empty(1, 2, 64, 16, device="meta") for _ in range(3)]
    slow.reason = "compute capability 8.0"                       # the warm-up on the meta tensors finds it unloadable
    kernel(*meta)
    assert kernel.wait_for_warmups(timeout=30) and warmup.unloadable("fake-slow", "meta") is not None
    slow.reason = None                                           # it loads on the other device
    kernel(*meta)                                                # the kernel learns it (fallback on meta: right)
    assert kernel.backend is quick
    q, k, v = _inputs()
    kernel(q, k, v)                                              # cpu: warms up (a fresh kernel does)
    assert kernel.wait_for_warmups(timeout=30)
    assert float(kernel(q, k, v).flatten()[0]) == FAST, "the kernel never runs the backend on the device it loads on"


def test_first_compiles_from_two_threads_both_find_the_backends():
    """The registry loads once, and a thread asking meanwhile waits for it (a fresh process each time: the first
    use is the race; before, the second thread saw an empty registry, 'device='cpu' is not known')."""
    import subprocess
    import sys
    from pathlib import Path

    script = """
import threading, sparsecore
from sparsecore import BlockMask
mask, barrier, errors = BlockMask.full(1, 64, 64, 16), threading.Barrier(2), []
def work():
    barrier.wait()
    try:
        sparsecore.compile(mask, device="cpu")
    except Exception as err:
        errors.append(repr(err))
threads = [threading.Thread(target=work) for _ in range(2)]
[t.start() for t in threads]; [t.join() for t in threads]
print(errors)
"""
    root = Path(__file__).resolve().parent.parent
    for _ in range(3):
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=root, timeout=120)
        assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


def test_compiles_from_two_threads_share_the_kernel_cache():
    """Lookups, insertions, evictions and clear_cache() from three threads (before: 'OrderedDict mutated during
    iteration' while one thread summed the cache for eviction)."""
    import sys

    masks = [[BlockMask.from_dense(np.random.default_rng(t * 1000 + i).random((1, 4, 4)) < 0.5, 64, 64, 16)
              for i in range(300)] for t in range(2)]
    errors, interval = [], sys.getswitchinterval()

    def work(t):
        try:
            for _ in range(5):
                for m in masks[t]:
                    sparsecore.compile(m, device="cpu")
        except Exception as err:                # collected, then asserted empty below
            errors.append(f"{type(err).__name__}: {err}")

    def clearing(workers):
        while any(w.is_alive() for w in workers):
            sparsecore.clear_cache()

    sys.setswitchinterval(1e-5)
    try:
        threads = [threading.Thread(target=work, args=(t,)) for t in range(2)]
        [t.start() for t in threads]
        clearer = threading.Thread(target=clearing, args=(threads,))
        clearer.start()
        [t.join() for t in (*threads, clearer)]
    finally:
        sys.setswitchinterval(interval)
        sparsecore.clear_cache()
    assert errors == []
