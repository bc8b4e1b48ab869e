"""A backend slow to get ready warms up on a worker thread while the caller runs another one.

Issue 13 asks a new mask shape's first call to take at most 5 s, compile included. On the H200 host the ``fa4``
lowering's first call took 15-23 s in a fresh process: importing ``flash_attn.cute`` 8.4-11.7 s (most of it
``torch._dynamo``, which FA4's ``quack`` dependency imports) and FA4's CuTe DSL compile 4-9 s, where Triton's
first call on the masks it runs took 2.5-3.0 s (bench/results/gpu-2026-12-01-runs/notes.md, tenth and eleventh
sessions). So, in the ``"background"`` mode (the default), a kernel's call whose preferred backend is slow to load
(``Backend.slow_to_load``) and not yet warm for its inputs runs on the kernel's next backend that takes them, and
one worker thread loads the preferred backend and runs it once on a small sample of that call (the mask's first
and last blocks, :func:`.warmup_sample.sample_call`, with the lowering's decisions for the whole call:
``Backend.warmup_options``),
which compiles what later calls launch, on the caller's stream. From then on calls with such inputs run the
preferred backend, in that kernel and in every kernel of a mask of the same geometry (:func:`warm_key`): one
warm-up per geometry, however many kernels of it are called meanwhile (a method compiles a mask per layer and
step). Every backend is an exact lowering of the same mask, so the outputs differ only by rounding.

When it fails: a backend that does not load here (its library does not import) leaves every kernel on the next
one, as ``compile()`` does in the ``"wait"`` mode when its check fails. Any other error is shown once as a
``RuntimeWarning`` (:func:`failure`), and from then on kernels of that geometry load the backend in place, as in the
``"wait"`` mode: a call that fails there raises its own error. Nothing raised on the worker is raised to a caller
later (a transient error, an out-of-memory one next to the fallback's memory, would otherwise end a run whose
calls all succeeded).

Costs. The sample's cut takes one host read (a device mask's lists) at the call that queues it, and a few MB.
When the warm-up ended, the next call lowers the kernel's own mask in place (the plan's conversion: 0.005-0.1 s on
the H200); a sample that misses a trait of the whole call (heads alike, mask tiles: checked on CPU for five
layouts, ``tests/test_warmup_samples.py``) leaves that compile to the call. In a Wan 2.1 1.3B run at 2x the
warm-ups raised the peak by 15 (PASA) and 47 MiB (LVSA); a warm-up of the whole call had raised it by 767. Its
Python work (imports, CuTe DSL tracing and compile) holds the GIL for up to seconds at a time, during which the
caller's launches wait (H200, 2026-12-02: calls of 1-100 ms took up to 2.3-4.5 s meanwhile). FA4's two-CTA launches
(:mod:`sparsecore.backends.cuda.fa4_occupancy`) take one lock for a call, compile included: a call of the caller
waits for a two-CTA compile of the worker's. A CUDA graph captured in torch's default global capture mode while
a warm-up runs may fail: :func:`wait` first. At exit the worker's current task may run to its end
(:data:`EXIT_WAIT_S`), before any ``atexit`` handler (a library's cleanup) runs; queued ones are dropped.

``"wait"``: the call loads and compiles in place (15-23 s for ``fa4`` above) and every call of a kernel runs on one
backend; for benchmarks and runs that must not mix backends. ``compile(..., warmup=...)`` picks it per kernel,
the environment variable ``SPARSECORE_WARMUP`` for every kernel that does not (and for :func:`ready_for`).
"""

from __future__ import annotations

import atexit
import importlib
import math
import numbers
import os
import queue
import threading
import traceback
import warnings
from collections import OrderedDict
from concurrent.futures import CancelledError, Future, TimeoutError as FutureTimeout
from typing import Any, Callable, Hashable

import torch

from .launch_device import caller_stream, on_device, on_stream

MODES = ("background", "wait")
ENV = "SPARSECORE_WARMUP"
EXIT_WAIT_S = 60.0

# Written by the worker's task before its future ends (so a reader of _pending, then _warm, then _failed, finds the
# key in one of them once it was started); read by the callers.
_pending: dict[Hashable, Future] = {}         # warm-ups in flight
_warm: "OrderedDict[Hashable, None]" = OrderedDict()   # warm-up keys that ended well, the WARM_RECORDS last used
WARM_RECORDS = 256                            # (a geometry forgotten warms up again: seconds, not a wrong result)
_failed: "OrderedDict[Hashable, str]" = OrderedDict()  # ... that failed otherwise: the error, shown once (failure)
_unloadable: dict[tuple, str] = {}            # (backend, device) a warm-up found does not load there: why
_warned: set[Hashable] = set()
_tasks: "queue.SimpleQueue[tuple[Future, Callable[[], Any]] | None] | None" = None
_worker: threading.Thread | None = None
_lock = threading.Lock()
_stopping = False


def mode(value: str | None) -> str:
    """The warm-up mode of a kernel compiled with ``warmup=value``: ``value``, else ``$SPARSECORE_WARMUP``, else
    ``"background"``."""
    if value is None:
        found = os.environ.get(ENV, "background")
        if found not in MODES:
            raise ValueError(f"{ENV}: expected one of {list(MODES)} (or unset: 'background'), got {found[:40]!r}; "
                             f"unset it or set it to 'wait' to load slow backends in place")
        return found
    if not isinstance(value, str):
        raise TypeError(f"warmup: expected None or one of {list(MODES)}, got {type(value).__name__}")
    if value not in MODES:
        raise ValueError(f"warmup: expected None (${ENV}, else 'background') or one of {list(MODES)}, "
                         f"got {value[:40]!r}")
    return value


class Unloadable(RuntimeError):
    """The backend's full check (the import of its library) found that it cannot run here."""


def warm_key(backend: Any, device: str, signature: tuple, options: Hashable, mask: Any) -> tuple:
    """What a warm-up is shared by: backend, tensor device, input signature, options, and the mask's heads, block
    offsets and treatment of unlisted blocks. FA4's kernels depend on tiles and mask_mod, not on the lists, so a
    new mask of a warmed geometry compiles nothing (one whose tiles need FA4's mask_mod where the first one's did
    not, or whose heads all keep the same lists where the first one's differ (FA4 broadcasts such lists), or the
    other way round, compiles once, in place); the key holds the offsets (a few thousand integers at most), not the
    lists."""
    return (backend.name, device, signature, options, mask.num_heads, mask.q_offsets.tobytes(),
            mask.kv_offsets.tobytes(), mask.unselected)


def is_warm(key: Hashable) -> bool:
    with _lock:
        if key not in _warm:
            return False
        _warm.move_to_end(key)                    # least recently used first out (_remember)
        return True


def _remember(table: "OrderedDict[Hashable, Any]", key: Hashable, value: Any) -> None:
    """``table[key] = value``, forgetting the least recently used past :data:`WARM_RECORDS` (under ``_lock``)."""
    table[key] = value
    while len(table) > WARM_RECORDS:
        gone, _ = table.popitem(last=False)
        _warned.discard(gone)


def forget_records() -> None:
    """Forget how past warm-ups ended (``sparsecore.clear_cache``); those in flight stay."""
    with _lock:
        _warm.clear()
        _failed.clear()
        _warned.clear()
        _unloadable.clear()


def pending(key: Hashable) -> Future | None:
    """The warm-up of ``key`` in flight (None: none). Read before :func:`is_warm` and :func:`failure`: a warm-up
    leaves here after it is recorded there."""
    return _pending.get(key)


def unloadable(backend: str, device: str) -> str | None:
    """Why ``backend`` does not load on ``device`` (a tensor's, as ``str(tensor.device)``), as a warm-up found (None:
    none found that)."""
    return _unloadable.get((backend, device))


def failure(key: Hashable) -> str | None:
    """The error of ``key``'s warm-up where it failed (but for :class:`Unloadable`), else None. The first ask warns
    (``RuntimeWarning``): from then on the callers load that backend in place, as in the "wait" mode, where a call
    that fails again raises its own error; nothing raised on the worker is raised to a caller later."""
    found = _failed.get(key)
    if found is not None and key not in _warned:
        _warned.add(key)
        warnings.warn(f"sparsecore: warming {key[0]!r} up in the background failed ({found}); it is loaded in place "
                      f"from now on, as with {ENV}=wait", RuntimeWarning, stacklevel=4)
    return found


def status(key: tuple) -> str:
    """Where the warm-up of ``key`` (the backend's name, the device, ...) stands: ``"in flight"``, ``"warm"``,
    ``"failed"`` (:func:`failure` warns once), ``"unloadable"`` (:func:`unloadable` says why) or ``"none"``. Reads
    the in-flight table first: a warm-up is recorded as ended before it leaves it."""
    if pending(key) is not None:
        return "in flight"
    if is_warm(key):
        return "warm"
    if failure(key) is not None:
        return "failed"
    return "unloadable" if unloadable(*key[:2]) is not None else "none"


def record_failure(key: tuple, exc: Exception) -> None:
    """A warm-up whose setup failed in the caller's call (:mod:`sparsecore.warmup_sample`), recorded as one that failed
    on the worker: :func:`failure` warns once, and its geometry then loads in place."""
    with _lock:
        _remember(_failed, key, f"{type(exc).__name__}: {exc}")


def loaded_run(load: Callable[[], str | None], device: Any, stream: Any, run: Callable[[], Any]) -> Any:
    """On the worker: ``load()`` (:class:`Unloadable` with its reason, if any), then ``run()``, both on ``device`` (a
    torch.device or None) and the caller's ``stream``, without autograd."""
    with on_device(device), on_stream(stream), torch.no_grad():      # "cuda" means the call's device here too
        reason = load()
        if reason is not None:
            raise Unloadable(reason)
        return run()


def start(key: tuple, task: Callable[[], Any]) -> Future:
    """Run ``task`` (a warm-up of ``key``: the backend's name, the device, then what its compiles depend on) on the
    worker, recording how it ended (:func:`is_warm`, :func:`failure`, :func:`unloadable`) before it leaves the
    in-flight table. One warm-up per key: where one is in flight (callers on two threads read "none" before either
    started it) its future is returned, and where one ended, a done future. Where the worker thread cannot start,
    the warm-up is recorded as failed (its geometry then loads in place)."""
    future: Future = Future()

    def recorded() -> Any:
        try:
            result = task()
        except Unloadable as exc:
            _unloadable[key[:2]] = str(exc)
            raise
        except BaseException as exc:
            with _lock:
                _remember(_failed, key, f"{type(exc).__name__}: {exc}")
            raise
        else:
            with _lock:
                _remember(_warm, key, None)
            return result
        finally:
            if _pending.get(key) is future:
                del _pending[key]
    with _lock:
        if key in _pending:
            return _pending[key]
        if key in _warm or key in _failed:
            future.set_result(None)
            return future
        _pending[key] = future
    submit(recorded, future)
    if future.done() and _pending.get(key) is future:       # it never ran: cancelled at exit, or no worker thread
        del _pending[key]
        if not future.cancelled():
            with _lock:
                _remember(_failed, key, str(future.exception()))
    return future


def wait(timeout: float | None = None) -> bool:
    """Wait until every warm-up queued so far has ended (they run in order); True if they did within ``timeout``
    seconds (None or ``math.inf``: no limit)."""
    timeout = _seconds(timeout)
    try:
        submit(lambda: None).result(timeout)
    except (FutureTimeout, CancelledError):              # cancelled: the process is exiting
        return False
    except _NoWorker:                                    # no worker thread: nothing was queued to wait for
        pass
    return True


def _seconds(timeout: Any) -> float | None:
    """``timeout`` checked: None or a number >= 0 (``math.inf``: None, no limit)."""
    if timeout is None:
        return None
    expected = "timeout: expected None or a number of seconds >= 0 (math.inf: no limit)"
    if not isinstance(timeout, numbers.Real) or isinstance(timeout, bool):
        raise TypeError(f"{expected}, got {type(timeout).__name__}; pass float(timeout)")
    seconds = float(timeout)
    if not seconds >= 0:                                  # NaN too
        raise ValueError(f"{expected}, got {seconds:g}")
    return None if seconds == math.inf else seconds


def ready_for(key: tuple, load: Callable[[], str | None], sample_run: Callable[[], Callable[[], Any]],
              like: Any) -> str | None:
    """Whether an op outside a kernel that is slow to get ready (FA4's dense forward) may run now: None when it may,
    else why not yet (the caller runs another op meanwhile).

    ``key``: the op's name, the device, then what its compiles depend on. ``load()``: None when the op can run
    here, else why not (it imports the library). ``sample_run()``: called once, in the caller's thread, when the
    warm-up starts; returns a function the worker calls, which runs the op once on a small sample of the caller's
    inputs (copies: the caller's tensors are not held) and so compiles what later runs launch. ``like``: one of the
    inputs, for its device and the caller's stream. In the "wait" mode (:func:`mode`) this is ``load()``: the op
    loads and compiles in place. In the "background" mode the first ask for ``key`` starts the warm-up and says so
    until it ended; then None, or ``load()``'s reason; where it failed otherwise, it warns once and the op loads in
    place from then on (``load()``)."""
    if mode(None) == "wait":
        return load()
    found = status(key)
    if found == "warm":
        return None
    if found == "failed":
        return load()
    if found == "unloadable":
        return unloadable(*key[:2])
    if found == "none":
        device = like.device if isinstance(like, torch.Tensor) else None     # the task holds no input of the call
        stream, first_run = caller_stream(like), sample_run()
        start(key, lambda: loaded_run(load, device, stream, first_run))
    return f"warming up in the background ({ENV}=wait loads it in place)"


class _NoWorker(RuntimeError):
    """The worker thread could not start (the OS refused a thread; or, from Python 3.12, at interpreter shutdown)."""


def submit(task: Callable[[], Any], future: Future | None = None) -> Future:
    """Run ``task`` on the worker thread (one for the process, started on first use; tasks run one at a time in
    the order given) and return its future (``future``, where given). Where the thread cannot start, the future
    ends with :class:`_NoWorker` and the next submit tries again."""
    global _tasks, _worker
    future = Future() if future is None else future
    if _stopping:                                   # the process is exiting: nothing new starts
        future.cancel()
        return future
    with _lock:
        if _tasks is None:
            tasks = queue.SimpleQueue()
            worker = threading.Thread(target=_work, args=(tasks,), name="sparsecore-warmup", daemon=True)
            try:
                worker.start()
            except RuntimeError as exc:
                future.set_exception(_NoWorker(f"sparsecore's warm-up thread could not start: {exc}"))
                return future
            _tasks, _worker = tasks, worker
        _tasks.put((future, task))
    return future


def _work(tasks: "queue.SimpleQueue[tuple[Future, Callable[[], Any]] | None]") -> None:
    while True:
        item = tasks.get()
        if item is None:
            return
        future, task = item
        if _stopping:
            future.cancel()
        elif future.set_running_or_notify_cancel():
            try:
                future.set_result(task())
            except BaseException as exc:  # noqa: BLE001  (recorded by start(); kept on the future for its waiters)
                future.set_exception(_without_frames(exc))
        del item, future, task      # nothing of the last task (its inputs, its kernel) is held while waiting


def _without_frames(exc: BaseException) -> BaseException:
    """``exc`` with its traceback as a note instead of frames: a stored exception's frames would keep their locals and
    functions (a call's tensors) alive as long as the error is kept; so would those of its causes. (Python 3.10 has
    no ``add_note``: the note is kept in ``__notes__`` there, as 3.11's does.)"""
    note = "raised on sparsecore's warm-up thread:\n" + "".join(traceback.format_tb(exc.__traceback__))
    if hasattr(exc, "add_note"):
        exc.add_note(note)
    else:
        exc.__notes__ = [*getattr(exc, "__notes__", ()), note]
    seen, cause = set(), exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        cause.__traceback__ = None
        cause = cause.__cause__ or cause.__context__
    return exc


def _drain() -> None:
    """At exit: drop the queued warm-ups and let the current one end (native code cut off mid-compile by the
    interpreter's shutdown may crash it), at most :data:`EXIT_WAIT_S` seconds."""
    global _stopping
    _stopping = True
    if _tasks is not None and _worker is not None and _worker.is_alive():
        _tasks.put(None)
        _worker.join(EXIT_WAIT_S)


def _at_exit(func: Callable[[], None]) -> None:
    """Run ``func`` at exit before every ``atexit`` handler (those of libraries imported later, which a compile on the
    worker may use, run first otherwise: atexit is last in, first out) and before concurrent.futures' workers
    stop (a compile may submit to a pool), with CPython's hook they use (private: where it is absent or closed,
    ``atexit``)."""
    importlib.import_module("concurrent.futures.thread")   # its hook first, so it runs after ours (last in, first out)
    register = getattr(threading, "_register_atexit", None)
    if callable(register):
        try:
            register(func)
            return
        except RuntimeError:                        # "can't register atexit after shutdown"
            pass
    atexit.register(func)


_at_exit(_drain)


def _forget_worker() -> None:
    """A forked child has no worker thread: the warm-ups its parent had queued or running are forgotten there (their
    futures end with an error, for whoever waits on them), so the child's kernels queue them anew on a worker of
    its own, started by the next submit."""
    global _tasks, _worker, _lock
    _tasks, _worker, _lock = None, None, threading.Lock()
    for key, future in list(_pending.items()):
        del _pending[key]
        if not future.done() and (future.running() or future.set_running_or_notify_cancel()):
            future.set_exception(RuntimeError("sparsecore's warm-up thread did not survive fork(): this warm-up was "
                                              "lost with it"))


os.register_at_fork(after_in_child=_forget_worker)
