"""The CUDA streams that have called sparsecore's kernels, and the release of shared device copies they may still read.

A memo that several kernels share (:func:`.uploads.on_device`'s copies, the approximation's statistics plans) keeps
tensors allocated on the stream of the call that built them. When it drops one, PyTorch's caching allocator hands
that memory to the next allocation on that stream, while a kernel queued on another stream may still read it: that
kernel would read what the new owner writes. :func:`retire` marks a dropped tensor as in use by every stream that
has called (``Tensor.record_stream``), so the allocator reuses its memory only once the work queued on those streams
when it is freed has run: an event on the device, nothing waits on the host. :func:`note_reader` is told of each
stream a kernel is called on (:class:`sparsecore.launch_device.StreamOrder`); the last :data:`STREAMS_KEPT` per device
are remembered.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import torch

STREAMS_KEPT = 32
_lock = threading.Lock()
_readers: dict[torch.device, OrderedDict[Any, None]] = {}      # device -> streams that called, oldest first


def note_reader(device: torch.device, stream: Any) -> None:
    """``stream`` (a ``torch.cuda.Stream`` of ``device``) runs sparsecore's kernels: dropped shared copies wait for
    its work."""
    with _lock:
        kept = _readers.setdefault(device, OrderedDict())
        kept[stream] = None
        kept.move_to_end(stream)
        while len(kept) > STREAMS_KEPT:
            kept.popitem(last=False)


def retire(tensors: Iterable[Any]) -> None:
    """``tensors`` (None and host tensors are skipped) are being dropped: their memory is reused only after the
    work queued so far on every stream that has called."""
    for tensor in tensors:
        if not getattr(tensor, "is_cuda", False):
            continue
        with _lock:
            streams = list(_readers.get(tensor.device, ()))
        for stream in streams:              # the allocating stream's own order holds: PyTorch skips it
            tensor.record_stream(stream)


def forget() -> None:
    """Forget the streams (tests)."""
    with _lock:
        _readers.clear()
