"""A backend slow to get ready warms up in a background thread while its kernel runs another one.

Issue 13 asks a new mask shape's first call to take at most 5 s, compile included. On the H200 host the ``fa4``
lowering's first call took 15-23 s in a fresh process: importing ``flash_attn.cute`` 8.4-11.7 s (most of it
``torch._dynamo``, which FA4's ``quack`` dependency imports) and FA4's CuTe DSL compile 4-9 s, where Triton's
first call on the masks it runs took 2.5-3.0 s (bench/results/gpu-2026-12-01-runs/notes.md, tenth and eleventh
sessions). So, in the ``"background"`` mode (the default), a call whose preferred backend is slow to load
(``Backend.slow_to_load``) and not yet ready for the call's inputs runs on the next backend of the kernel that
takes them, and one worker thread loads the preferred backend, lowers the mask and runs it once on that call's
inputs (which compiles what later calls launch), on the caller's stream; the first call after it ends runs on
it. Every backend is an exact lowering of the same mask, so the outputs differ only by rounding. A failure to
load (the library does not import here) leaves the kernel on the other backend, as ``compile()`` does in the
``"wait"`` mode when the check fails; any other error is raised at the next call with these inputs.

While it runs, the worker holds the warming call's q, k and v and allocates what one call of the preferred
backend does (its output and plan): device memory the main thread's peak may see once. Its Python work also
takes the GIL from the main thread's launches.

``"wait"``: the call loads and compiles in place (15-23 s for ``fa4`` above) and every call of a kernel runs on one
backend; for benchmarks and runs that must not mix backends. ``compile(..., warmup=...)`` picks it per kernel,
the environment variable ``SPARSECORE_WARMUP`` for every kernel that does not.
"""

from __future__ import annotations

import os
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Hashable

import torch

from .launch_device import on_device_of, on_stream

MODES = ("background", "wait")
ENV = "SPARSECORE_WARMUP"

_warm: set[Hashable] = set()     # what warm-ups ended well for: see is_warm
_tasks: "queue.SimpleQueue[tuple[Future, Callable[[], Any]]] | None" = None
_lock = threading.Lock()


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


def is_warm(key: Hashable) -> bool:
    """Whether a warm-up ended well for ``key``: (backend, tensor device, input signature, options, the mask's heads,
    block offsets and treatment of unlisted blocks). A kernel of another mask with that key lowers and runs in place:
    a new mask of a seen geometry needs no new compile (FA4's kernels depend on tiles and mask_mod, not on the
    lists; a mask of that geometry whose tiles need FA4's mask_mod where the first one's did not compiles once
    in place)."""
    return key in _warm


def mark_warm(key: Hashable) -> None:
    _warm.add(key)


class Unloadable(RuntimeError):
    """The backend's full check (the import of its library) found that it cannot run here."""


@dataclass(eq=False)
class Warming:
    """One background warm-up of ``backend`` for the inputs of the call that queued it (``call``: q, k, v, scale,
    return_lse; released when it ends). Calls run ``fallback`` (a backend and its options) meanwhile."""

    fallback: tuple[Any, Hashable]
    backend: Any
    options: Hashable
    call: tuple | None
    stream: Any                  # the caller's stream (launch_device.caller_stream)
    future: Future | None = None

    def run(self, device: str, lower: Callable[[Any, Hashable, Any], Any], existing: Any) -> Any:
        """On the worker: load the backend (:class:`Unloadable` if it cannot run here), lower the mask (unless the
        kernel has its run already: ``existing``), run it once on the call's inputs; return the run."""
        try:
            reason = self.backend.unavailable_reason(device)
            if reason is not None:
                raise Unloadable(reason)
            q, k, v, scale, return_lse = self.call
            with on_device_of(q), on_stream(self.stream), torch.no_grad():
                run = existing if existing is not None else lower(self.backend, self.options, q)
                run(q, k, v, scale, return_lse)
            return run
        except Unloadable:
            raise
        except BaseException as exc:
            exc.add_note(f"sparsecore: raised while backend {self.backend.name!r} warmed up in the background; it is "
                         f"raised at each call with these inputs (compile(..., warmup='wait') loads it in place)")
            raise
        finally:
            self.call = None


def submit(task: Callable[[], Any]) -> Future:
    """Run ``task`` on the worker thread (one for the process, started on first use; tasks run one at a time in
    the order given) and return its future."""
    global _tasks
    future: Future = Future()
    with _lock:
        if _tasks is None:
            _tasks = queue.SimpleQueue()
            threading.Thread(target=_work, args=(_tasks,), name="sparsecore-warmup", daemon=True).start()
        _tasks.put((future, task))
    return future


def _work(tasks: "queue.SimpleQueue[tuple[Future, Callable[[], Any]]]") -> None:
    while True:
        future, task = tasks.get()
        if not future.set_running_or_notify_cancel():
            continue
        try:
            future.set_result(task())
        except BaseException as exc:  # noqa: BLE001  (handed to the caller, who raises it: nothing is lost)
            future.set_exception(exc)


def _forget_worker() -> None:
    """A forked child has no worker thread: the next submit starts one (tasks queued before the fork are the
    parent's)."""
    global _tasks, _lock
    _tasks, _lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_worker)
