"""The ``triton`` lowering: any BlockMask on NVIDIA GPUs through one Triton kernel.

Compile builds nothing device-side; the first call for a (tile config) plans the
mask's tiles (:mod:`.tiling`) and uploads them; later calls only launch. Under
``TRITON_INTERPRET=1`` Triton runs kernels on CPU tensors; the backend then offers
that as its :meth:`emulator`, which is how CPU CI runs the property suite on it
(fp16/fp32 only: the interpreter's bf16 dot is wrong).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Iterator

import torch

from sparsecore.capabilities import Capabilities
from sparsecore.ir import BlockMask
from sparsecore.registry import Backend, Run

_EMULATING = False  # set inside TritonBackend.emulator(): kernels run on CPU tensors through the interpreter


def interpreting() -> bool:
    """Whether Triton was told to interpret kernels (read once, as Triton reads it when a kernel is defined)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class TritonConfig:
    """Kernel tile shape and launch parameters."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    use_tma: bool
    warp_specialize: bool = False


@dataclass(frozen=True)
class TritonOptions:
    """Overrides of the tuned config (None: keep the default for the head dim, dtype and GPU)."""

    block_m: int | None = None
    block_n: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    use_tma: bool | None = None
    warp_specialize: bool | None = None

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if value is not None and (value < 16 or value & (value - 1)):
                raise ValueError(f"{name}: expected a power of two >= 16 (a Triton tile side), got {value}")


def default_config(head_dim: int, element_size: int, device: torch.device, q_block: int | None = None,
                   kv_block: int | None = None) -> TritonConfig:
    """The tuned tile shape (bench/results/cuda-2026-11-22*), narrowed to 64 for masks of 64-token blocks.

    ``q_block`` / ``kv_block``: the mask's uniform block sizes (None when ragged). A
    128-wide tile over 64-token blocks would compute twice the pairs it keeps on each
    side (AdaSpa's blocks, measured 3x slower end to end), so such masks get 64-wide tiles.
    """
    if device.type != "cuda":  # the interpreter: mid-size tiles exercise partial tiles and run fast
        return TritonConfig(64, 64, 4, 1, use_tma=False)
    hopper = torch.cuda.get_device_capability(device)[0] >= 9
    if element_size == 4:  # fp32: shared memory, not tiles, is the limit
        return TritonConfig(64, 32, 4, 2, use_tma=False)
    block_m = 64 if q_block is not None and q_block <= 64 else 128
    block_n = 64 if (kv_block is not None and kv_block <= 64) or head_dim < 128 else 128
    return TritonConfig(block_m, block_n, 8 if block_m == 128 else 4, 3, use_tma=hopper)


class TritonBackend(Backend):
    name = "triton"
    install_hint = "pip install triton (an NVIDIA GPU, or TRITON_INTERPRET=1 for the CPU interpreter)"
    options_type = TritonOptions

    def __init__(self) -> None:
        dtypes = {"float16", "float32"} if interpreting() else {"float16", "bfloat16", "float32"}
        self.capabilities = Capabilities(devices=("cuda",), array_type="torch", dtypes=frozenset(dtypes),
                                         head_dims=frozenset({16, 32, 64, 128}))

    def unavailable_reason(self, device: str) -> str | None:
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
        if _EMULATING:
            return None
        if interpreting():
            return "TRITON_INTERPRET=1: kernels run in Triton's CPU interpreter, not on the GPU"
        if not torch.cuda.is_available():
            return f"torch.cuda.is_available() is False in torch {torch.__version__}"
        return None

    def emulator(self) -> contextlib.AbstractContextManager[None] | None:
        return _emulating() if interpreting() and importlib.util.find_spec("triton") else None

    def tensor_device_problem(self, device: str, tensor_device: str) -> str | None:
        if _EMULATING:
            return None if tensor_device == "cpu" else f"the Triton interpreter runs on CPU tensors, got {tensor_device!r}"
        return super().tensor_device_problem(device, tensor_device)

    def preference(self, mask: BlockMask) -> int:
        from .selection import triton_preference
        return triton_preference(mask)

    def lower(self, mask: BlockMask, device: str, options: TritonOptions) -> Run:
        from .triton_launch import TritonLaunch
        return TritonLaunch(mask, options)


@contextlib.contextmanager
def _emulating() -> Iterator[None]:
    global _EMULATING
    previous, _EMULATING = _EMULATING, True
    try:
        yield
    finally:
        _EMULATING = previous
