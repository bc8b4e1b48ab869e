"""The CUDA streams that have called sparsecore's kernels, and the release of shared device copies they may read.

A memo that several kernels share (:func:`.uploads.on_device`'s copies, the approximation's statistics plans; token
orders' indices, which ``clear_cache`` drops) keeps tensors allocated on the stream of the call that built them.
When it drops one, PyTorch's caching allocator hands that memory to the next allocation on that stream, while a
kernel queued on another stream may still read it: that kernel would read what the new owner writes. :func:`retire`
marks a dropped tensor as in use by every stream noted on its device (``Tensor.record_stream``). The allocator then
records an event on each of them when the memory is really freed (a kernel may still hold the tensor) and reuses
the memory once those events have passed: nothing waits on the host. A retired tensor still alive is marked again
for each stream noted later (a kernel that holds a dropped plan, called on a new stream). :func:`note_reader` is
told of each stream a kernel is called on (:class:`sparsecore.launch_device.StreamOrder`). Every stream noted is
kept: PyTorch's own streams are a fixed pool; a ``torch.cuda.ExternalStream`` that called must stay valid as long
as sparsecore may drop shared copies, in practice the process (the allocator records events on it at their free).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable
from typing import Any

import torch

_lock = threading.RLock()          # re-entrant: a retired tensor's weakref callback may run while it is held
_readers: dict[torch.device, dict[Any, None]] = {}                # device -> streams that called, first noted first
_retired: dict[torch.device, dict[int, weakref.ref]] = {}          # device -> retired tensors still alive, by id


def note_reader(device: torch.device, stream: Any) -> None:
    """``stream`` (a ``torch.cuda.Stream`` of ``device``) runs sparsecore's kernels: dropped shared copies wait for
    its work, those already dropped and still alive included."""
    with _lock:
        kept = _readers.setdefault(device, {})
        if stream in kept:
            return
        kept[stream] = None
        refs = list(_retired.get(device, {}).values())      # a copy: a callback run here may delete entries
        alive = [found for found in (ref() for ref in refs) if found is not None]
    for tensor in alive:
        tensor.record_stream(stream)


def retire(tensors: Iterable[Any]) -> None:
    """``tensors`` (None and host tensors are skipped) are being dropped: their memory is reused only after the
    work queued, when it is freed, on every stream noted (now or later, while the tensor lives)."""
    for tensor in tensors:
        if not getattr(tensor, "is_cuda", False):
            continue
        with _lock:
            streams = list(_readers.get(tensor.device, ()))
            alive = _retired.setdefault(tensor.device, {})
            key = id(tensor)
            if key not in alive or alive[key]() is not tensor:
                alive[key] = weakref.ref(tensor, lambda ref, alive=alive, key=key: _forget(alive, key, ref))
        for stream in streams:              # the allocating stream's own order holds (the native allocator skips it)
            tensor.record_stream(stream)


def _forget(alive: dict[int, weakref.ref], key: int, ref: weakref.ref) -> None:
    """A retired tensor died: forget it (unless its id was reused by a tensor retired since)."""
    with _lock:
        if alive.get(key) is ref:
            del alive[key]


def forget() -> None:
    """Forget the streams and the retired tensors (tests)."""
    with _lock:
        _readers.clear()
        _retired.clear()
