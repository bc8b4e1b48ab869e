"""Kernels launch on the CUDA device of their inputs.

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
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch


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
