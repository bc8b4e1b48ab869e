"""Kernels launch on the CUDA device of their inputs, on the caller's stream, after the work that built their plans.

Triton launches a kernel on the *current* CUDA device and its current stream (``JITFunction.run`` asks
``triton.runtime.driver.active.get_current_device()``), whatever device its tensor arguments are on.
Inputs on ``cuda:1`` while ``cuda:0`` is current (a pipeline moved with ``.to("cuda:1")`` and no
``torch.cuda.set_device``) would then run on the wrong device: an illegal address, or, where peer
access is on, reads not ordered after the work on ``cuda:1`` that wrote them. :func:`on_device_of`
makes the inputs' device current around a call (FA4's dense forward, called outside it, does so itself).
A call's work done on another thread (:mod:`sparsecore.warmup`) goes on the caller's stream
(:func:`caller_stream`, :func:`on_stream`): each thread has its own current stream, and work on the caller's
stream is ordered after the kernels that wrote its inputs. :func:`check_device_index` refuses, at ``compile()``,
a device index this machine does not have; :func:`without_autocast` keeps an ambient ``torch.autocast`` out of
a call.

:class:`StreamOrder`: a kernel's calls on several CUDA streams, ordered after the work that built its device plans.

A lowering builds what it keeps on the device between calls (Triton's tile schedules, FA4's converted lists,
portable's chunks, the approximation's plans, FlashInfer's plans) when it lowers the mask and at its first call for
an input signature, batch size and scale (or at ``prepare``), with device work and host copies queued on that call's
stream without waiting (:func:`sparsecore.ir.uploads.queued`). A later call on another stream (two pipelines sharing a
cached kernel, each on its own stream) would launch before that work ends and read whatever the memory held.
:class:`StreamOrder` records an event on the stream of each call that is the first for its key (the run and those
inputs; the lowering of a run has its own), and a call on a stream that has not yet waited for the newest such event
waits for it: on the device (nothing is read back), once per stream and build, so calls of a built kernel on two
streams stay concurrent. A call that may build holds a lock until its event is recorded, so that a call on another
thread meanwhile waits for it on the host before it reads what it built; a failed call records its event but leaves
its key unbuilt. A new event is recorded after its stream has waited for the one before, so waiting for the newest
orders a stream after every build. A plan a run drops and builds again for a key it has seen would not be
recorded; the one run that drops plans, FlashInfer's (its ``PLANS_KEPT`` most recent batch sizes and scales), keeps
them per stream, so only the stream that built one reads it. What several kernels share (a host mask's device copy,
a statistics plan, a cached upload, a token order's indices) goes up by pageable copies, which return once they have
landed, so no kernel reads it early. A copy that a memo or ``clear_cache`` drops is retired
(:mod:`sparsecore.ir.stream_readers`): its memory is reused only after the work queued on every stream a call was
ordered on (each is noted there). A host mask's device copy lives as long as the mask.

When the kernel is dropped, its plans' memory goes back to the caching allocator's pool of the stream that built
them, whose next allocation may take it while a call on another stream still reads it: so at that moment the
streams that built wait for the work queued so far on every other stream that called. Nothing is ordered inside
a CUDA graph capture (sparsecore refuses the calls that would copy there:
:func:`sparsecore.ir.uploads.refuse_capture`), nor off CUDA.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Any, Hashable, Iterator

import torch

from sparsecore.ir.stream_readers import note_reader


def on_device_of(tensor: Any) -> contextlib.AbstractContextManager[Any]:
    """A context in which ``tensor``'s CUDA device is the current one (nothing for other tensors and arrays)."""
    return on_device(tensor.device if isinstance(tensor, torch.Tensor) else None)


def without_autocast(tensor: Any) -> contextlib.AbstractContextManager[Any]:
    """A context in which ``tensor``'s device type runs no ``torch.autocast``: a kernel computes in its own
    documented precision (``portable``'s float32 products followed an ambient bf16 autocast: output error 0.69)."""
    if isinstance(tensor, torch.Tensor) and torch.amp.is_autocast_available(tensor.device.type):
        return torch.autocast(tensor.device.type, enabled=False)
    return contextlib.nullcontext()


def on_device(device: Any) -> contextlib.AbstractContextManager[Any]:
    """A context in which ``device`` (a torch.device, or None) is the current CUDA device, if it is a CUDA one."""
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def caller_stream(tensor: Any) -> Any:
    """The calling thread's current stream on ``tensor``'s CUDA device (None for other tensors and arrays)."""
    if isinstance(tensor, torch.Tensor) and tensor.is_cuda:
        return torch.cuda.current_stream(tensor.device)
    return None


def on_stream(stream: Any) -> contextlib.AbstractContextManager[Any]:
    """A context in which ``stream`` (from :func:`caller_stream`) is this thread's current stream (None: nothing)."""
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def check_device_index(device: str) -> None:
    """``"cuda:3"`` on a machine with fewer devices is refused here, not at the first call."""
    kind, _, index = device.partition(":")
    if not index or kind in ("cpu", "reference"):
        return
    module = getattr(torch, kind, None)
    if module is not None and hasattr(module, "device_count") and module.is_available() \
            and int(index) >= module.device_count():
        raise ValueError(f"device={device!r}: this machine has {module.device_count()} {kind} device(s), numbered "
                         f"from 0")


class StreamOrder:
    """Orders the calls of one kernel (see the module docstring); ``key``: what a call builds plans for."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._building = threading.RLock()      # held by a call that may build: calls meanwhile wait for its event
        self._built: set[Hashable] = set()
        self._newest: dict[torch.device, tuple[Any, set]] = {}   # device -> (event, the streams ordered after it)
        self._builders: dict[torch.device, set] = {}             # device -> streams that built plans
        self._callers: dict[torch.device, set] = {}              # device -> streams that called
        weakref.finalize(self, _release, self._builders, self._callers).atexit = False

    @contextlib.contextmanager
    def ordered(self, key: Hashable, tensor: Any) -> Iterator[None]:
        """Around a call on ``tensor``'s device and the current stream, for inputs whose plans are ``key``'s. A call
        whose key has not been built holds ``_building`` throughout, so that a call on another thread meanwhile (the
        same key, or another one reading what this call builds) waits for it on the host, then for its event."""
        stream = caller_stream(tensor)
        if stream is None:
            yield
            return
        if key in self._built:                  # the per-call path: no lock held during the call
            found = self._newest.get(tensor.device)
            if not (found is not None and stream in found[1]) and not torch.cuda.is_current_stream_capturing():
                self._follow(tensor.device, stream)         # a stream new since the newest build: one wait
            yield
            return
        if torch.cuda.is_current_stream_capturing():
            yield
            return
        with self._building:
            self._follow(tensor.device, stream)
            succeeded = False
            try:
                yield
                succeeded = True
            finally:                            # a failed call may have queued some of the copies: recorded, and
                if key not in self._built:      # the key stays unbuilt, so that the call that builds records again
                    with self._lock:
                        event = torch.cuda.Event()
                        event.record(stream)
                        self._newest[tensor.device] = (event, {stream})
                        self._builders.setdefault(tensor.device, set()).add(stream)
                        if succeeded:
                            self._built.add(key)

    def _follow(self, device: torch.device, stream: Any) -> None:
        """``stream`` waits for the newest build's event (once) and counts as a caller."""
        with self._lock:
            found = self._newest.get(device)
            if found is not None and stream not in found[1]:
                stream.wait_event(found[0])
                found[1].add(stream)
            self._callers.setdefault(device, set()).add(stream)
        note_reader(device, stream)


def _release(builders: dict[torch.device, set], callers: dict[torch.device, set]) -> None:
    """The kernel is gone: each stream that built plans waits for the work queued on the other streams that
    called, before its next allocation can reuse the plans' memory."""
    for device, built_on in builders.items():
        called = callers.get(device, set())
        if len(called) < 2:                     # one stream: its own order holds
            continue
        events = {caller: torch.cuda.Event() for caller in called}
        for caller, event in events.items():
            event.record(caller)
        for builder in built_on:
            for caller in called - {builder}:
                builder.wait_event(events[caller])
