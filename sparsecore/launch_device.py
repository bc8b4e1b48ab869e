"""Kernels launch on the CUDA device of their inputs.

Triton launches a kernel on the *current* CUDA device and its current stream (``JITFunction.run`` asks
``triton.runtime.driver.active.get_current_device()``), whatever device its tensor arguments are on.
Inputs on ``cuda:1`` while ``cuda:0`` is current (a pipeline moved with ``.to("cuda:1")`` and no
``torch.cuda.set_device``) would then run on the wrong device: an illegal address, or, where peer
access is on, reads not ordered after the work on ``cuda:1`` that wrote them. :func:`on_device_of`
makes the inputs' device current around a call (FA4's dense forward, called outside it, does so itself).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch


def on_device_of(tensor: Any) -> contextlib.AbstractContextManager[Any]:
    """A context in which ``tensor``'s CUDA device is the current one (nothing for other tensors and arrays)."""
    if isinstance(tensor, torch.Tensor) and tensor.is_cuda:
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()
