"""Tile shapes and launch parameters of the Triton lowering: the tuned defaults and the user's overrides."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
        for name, lowest, what in (("block_m", 16, "a power of two >= 16 (a Triton tile side)"),
                                   ("block_n", 16, "a power of two >= 16 (a Triton tile side)"),
                                   ("num_warps", 1, "a power of two >= 1 (warps a program)"),
                                   ("num_stages", 1, "an int >= 1 (software pipeline stages)")):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name}: expected {what} or None, got {type(value).__name__} {value!r}")
            if value < lowest or (name != "num_stages" and value & (value - 1)):
                raise ValueError(f"{name}: expected {what}, got {value}")
        for name in ("use_tma", "warp_specialize"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}: expected a bool or None, got {getattr(self, name)!r}")


def below_ampere(device: torch.device) -> str | None:
    """Why the Triton kernels do not run on CUDA ``device`` (compute capability below 8.0), else None. Compiled for
    sm75 on CPU (tests/test_triton_targets.py): their products become FMA loops on CUDA cores, and their tiles at head
    dim 128 need up to 131,072 bytes of shared memory."""
    major, minor = torch.cuda.get_device_capability(device)
    if major >= 8:
        return None
    return (f"compute capability {major}.{minor}: below 8.0 Triton runs the kernels' matrix products on CUDA cores, "
            f"and their tiles at head dim 128 need up to 131,072 bytes of shared memory (a T4 allows 65,536, a V100 "
            f"98,304); the portable backend and torch's search passes run on this GPU")


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision for inputs of ``dtype``: IEEE float32 products for float32 inputs, TF32 for
    products the kernel takes in float32 from 16-bit inputs (unused where the operands stay 16-bit)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def default_config(head_dim: int, element_size: int, device: torch.device, q_block: int | None = None,
                   kv_block: int | None = None) -> TritonConfig:
    """The tuned tile shape (bench/results/cuda-2026-11-22*), narrowed to 64 for masks of 64-token blocks.

    ``q_block`` / ``kv_block``: the mask's largest block sizes (``BlockMask.largest_block_size``).
    A 128-wide tile over 64-token blocks would compute twice the pairs it keeps on each side
    (AdaSpa's blocks, measured 3x slower end to end), so masks whose blocks are all 64 tokens or
    fewer get 64-wide tiles, whatever else they hold: the ring shards of such masks (a shard edge cuts
    their first block short; with uniform sizes only, AdaSpa's ring step on 2 H200s ran at 0.93x one
    GPU's, 2026-11-30) and joint video + text masks, whose short last video block sits between full ones
    (HunyuanVideo 1.5's PASA step at 2x took 9.5 s on 128-wide tiles against 4.2 s without the
    approximation on fa4's 64-wide ones, H200 2026-12-01).
    """
    if device.type != "cuda":  # the interpreter: mid-size tiles exercise partial tiles and run fast
        return TritonConfig(64, 64, 4, 1, use_tma=False)
    hopper = torch.cuda.get_device_capability(device)[0] >= 9
    if element_size == 4:  # fp32: shared memory, not tiles, is the limit
        return TritonConfig(64, 32, 4, 2, use_tma=False)
    block_m = 64 if q_block is not None and q_block <= 64 else 128
    block_n = 64 if (kv_block is not None and kv_block <= 64) or head_dim < 128 else 128
    return TritonConfig(block_m, block_n, 8 if block_m == 128 else 4, 3, use_tma=hopper)
