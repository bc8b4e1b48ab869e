"""Whether Triton kernels run in Triton's CPU interpreter, and the emulation switch the tests use.

Under ``TRITON_INTERPRET=1`` Triton runs kernels on CPU tensors (fp16/fp32 only: the
interpreter's bf16 dot is wrong, :func:`dtype_problem`). Inside :func:`emulating` the CUDA lowerings that use
Triton accept CPU tensors, which is how CPU CI runs the property suite on them.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

from sparsecore import registry

_EMULATING = False


def interpreting() -> bool:
    """Whether Triton was told to interpret kernels (read as Triton reads it when a kernel is defined)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def active() -> bool:
    """Inside :func:`emulating`: kernels run on CPU tensors through the interpreter."""
    return _EMULATING


@contextlib.contextmanager
def emulating() -> Iterator[None]:
    global _EMULATING
    previous, _EMULATING = _EMULATING, True
    registry.changed()                     # "cuda" kernels chosen inside are not found outside, nor the other way
    try:
        yield
    finally:
        _EMULATING = previous
        registry.changed()


def dtype_problem(dtype: torch.dtype) -> str | None:
    """Why a Triton kernel's dot products cannot run on ``dtype`` here (None: they can): Triton's CPU interpreter
    stores bfloat16 as its bits and multiplies those in ``tl.dot`` (triton-lang/triton#11584, not supported upstream),
    so under ``TRITON_INTERPRET=1`` (or inside :func:`emulating`) bf16 inputs take another path."""
    if dtype == torch.bfloat16 and (interpreting() or _EMULATING):
        return ("bfloat16 under Triton's CPU interpreter (TRITON_INTERPRET=1): its bf16 dot multiplies bit patterns "
                "(triton-lang/triton#11584); fp16 and fp32 run, or a GPU without TRITON_INTERPRET")
    return None


def tensor_device_problem(device: str, tensor_device: str) -> str | None:
    """Why tensors on ``tensor_device`` cannot run a Triton kernel compiled for ``device`` (None: they can)."""
    if _EMULATING:
        return None if tensor_device == "cpu" else f"the Triton interpreter runs on CPU tensors, got {tensor_device!r}"
    if tensor_device != device.split(":")[0]:
        return f"tensors are on {tensor_device!r} but the kernel was compiled for device {device!r}"
    return None
