"""Copies between the host and a device.

:func:`on_device`: small host arrays (block boundaries, block ids) on a device, uploaded once per
content and device and kept (at most :data:`CACHE_ENTRIES`). A pageable host-to-device copy waits
for the device's queue to drain, so code that runs every layer and step asks here or below instead.

:func:`queued`: a small host array on a device, copied at each call without waiting and not kept:
for the per-call paths (PASA's plans, FA4 conversions, the approximation's plan, Triton's tile schedules,
the block-mass passes, Triton's and torch's, the fused search, ring slices), whose cached copies had stayed on
the GPU through every layer's work and after the method's removal (what a row keeps above dense's: 49,664
bytes for AdaSpa on HunyuanVideo 1.5's joint masks, tenth session). :func:`moved`: a
tensor held in host memory between steps and brought back at each use, without waiting: the way there
lands in pinned memory, the way back runs asynchronously in stream order. :class:`HostPack`: a plan's
tensors in one pinned buffer, brought to a device in one copy at each call. :class:`HostCounts`: counts
made on a device, copied back to pinned memory without waiting, so nothing of them stays on the device.
:func:`refuse_capture`: ``queued`` and ``moved`` raise inside a CUDA graph or NPU graph capture (a replay would
copy from memory freed or rewritten since).
"""

from __future__ import annotations

import numpy as np
import torch

from .memo import LruMemo
from .stream_readers import retire

CACHE_ENTRIES = 64
_UPLOADS = LruMemo(CACHE_ENTRIES, on_drop=lambda copy: retire([copy]))   # shared by threads and by streams


def on_device(array: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """``array`` as a tensor on ``device`` (the cached upload; do not write to it)."""
    array = np.asarray(array)
    key = (array.dtype.str, array.shape, array.tobytes(), str(device))
    return _UPLOADS.get(key, lambda: torch.from_numpy(np.array(array)).to(device))


def clear() -> None:
    """Forget the cached uploads (``sparsecore.clear_cache``)."""
    _UPLOADS.clear()


def queued(array: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """A small host array on ``device`` without waiting for the device's queue and without keeping it: on CUDA a
    copy from pinned memory, queued on the current stream (use it on that stream; not inside a CUDA graph
    capture, whose replays would read the freed pinned source: :func:`refuse_capture` raises there); on the host
    a copy. Other devices (NPU, MPS, XPU), where a copy per call would wait, get :func:`on_device`'s cached
    upload (do not write to it)."""
    kind = torch.device(device).type
    if kind == "cpu":
        return torch.from_numpy(np.array(array))                 # a copy: it must not alias ``array``
    if kind != "cuda":
        return on_device(array, device)
    refuse_capture(device, "a per-call copy of a plan to the device")
    return torch.from_numpy(np.array(array)).pin_memory().to(device, non_blocking=True)


def refuse_capture(device: torch.device | str, what: str,
                   why: str = "its replays would reuse this call's host-side plan") -> None:
    """Raises where ``device``'s current stream is capturing a graph (a CUDA graph, or an NPU aclgraph through
    ``torch.npu`` once torch_npu is imported): sparsecore's calls copy per-call plans from host memory and decide
    on the host (which step, which mask), so a replay would repeat the captured copies from freed memory and the
    captured decisions. Asking waits for nothing."""
    device = torch.device(device)
    runtime = {"cuda": torch.cuda, "npu": getattr(torch, "npu", None)}.get(device.type)
    if runtime is None or not hasattr(runtime, "is_current_stream_capturing"):
        return
    if device.index is None or device.index == runtime.current_device():
        capturing = runtime.is_current_stream_capturing()
    else:
        with runtime.device(device):                    # the capture to look for is on ``device``'s stream
            capturing = runtime.is_current_stream_capturing()
    if not capturing:
        return
    remedy = "Keep sparsecore's calls out of the captured region (capture the work before and after them)"
    if device.type == "cuda":
        remedy += (". Under torch.compile with diffusers, sparsecore's op is tagged cudagraph_unsafe from PyTorch 2.8 "
                   "on, so inductor keeps it out of its CUDA graphs; on earlier versions use "
                   "mode='max-autotune-no-cudagraphs' or the default mode")
    kind = "a CUDA graph" if device.type == "cuda" else "an NPU graph (aclgraph)"
    raise RuntimeError(f"sparsecore: {what} inside {kind} capture: {why}. {remedy}")


def moved(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``: itself if it is there, else a copy the caller owns.

    From an accelerator to the host: a pinned copy (the call waits for it, so the host may read it). From
    pinned host memory to an accelerator: queued on the current stream without waiting; the pinned
    memory's allocator keeps the source until the copy has run.
    """
    if tensor.device == device:
        return tensor
    if device.type == "cpu":
        return torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=True).copy_(tensor)
    refuse_capture(device, "a copy of a tensor held in host memory back to the device")
    return tensor.to(device, non_blocking=tensor.is_pinned())


class HostCounts:
    """Counts made on a device, copied into pinned host memory without waiting, so none stays on the device.

    :meth:`add` queues a 0-d tensor's copy on the current stream into the next slot of a pinned int64 chunk
    (one pinned allocation per :attr:`CHUNK` counts, not one per count, freed with the last slot its caller holds) and
    returns that slot; read it only after
    the device has run the copy (synchronize it first). A count elsewhere is returned as it is (a copy back would
    wait on NPU, MPS and XPU; the host needs none).
    """

    CHUNK = 1024

    def __init__(self) -> None:
        self._chunk: torch.Tensor | None = None     # the chunk being filled; a full one lives while a slot is held
        self._used = 0

    def add(self, count: torch.Tensor) -> torch.Tensor:
        if count.device.type != "cuda":
            return count
        slot = self._used % self.CHUNK
        if slot == 0:
            self._chunk = torch.empty(self.CHUNK, dtype=torch.int64, device="cpu", pin_memory=True)
        self._used += 1
        return self._chunk[slot].copy_(count.to(torch.int64), non_blocking=True)


class HostPack:
    """Tensors kept in one pinned host buffer and brought to a device in one copy that does not wait.

    For plans a kernel keeps between calls but needs only during them: held so, they take no device memory
    between calls; each call pays one host-to-device copy (queued in stream order) and gets its own tensors.
    """

    ALIGN = 256                 # bytes between the starts of two tensors in the buffer

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.specs: dict[str, tuple[int, torch.dtype, tuple[int, ...]]] = {}
        start = 0
        for name, tensor in tensors.items():
            self.specs[name] = (start, tensor.dtype, tuple(tensor.shape))
            start += -(-tensor.numel() * tensor.element_size() // self.ALIGN) * self.ALIGN
        self.buffer = torch.empty(max(start, 1), dtype=torch.uint8, device="cpu",   # host memory whatever the default
                                  pin_memory=torch.cuda.is_available())
        for name, tensor in tensors.items():
            self._view(self.buffer, name).copy_(tensor)

    def to(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The tensors on ``device`` (new ones per call: the caller owns them)."""
        buffer = self.buffer.to(device, non_blocking=self.buffer.is_pinned(), copy=True)
        return {name: self._view(buffer, name) for name in self.specs}

    def _view(self, buffer: torch.Tensor, name: str) -> torch.Tensor:
        start, dtype, shape = self.specs[name]
        count = int(np.prod(shape, dtype=np.int64))
        size = dtype.itemsize
        return buffer[start:start + count * size].view(dtype).view(shape)
