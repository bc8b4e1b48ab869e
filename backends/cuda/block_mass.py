"""The CUDA implementation of AdaSpa's block-mass pass (:func:`sparsecore.search.block_mass`).

Pass 2 only: given the row LSE (fresh from the search's dense pass, or cached), the
fused kernel of :mod:`.block_mass_kernel` adds ``exp(scale * q.k - lse)`` per (query
block, key block) without writing scores to memory. On an H200 at Wan 6x (188,736 tokens,
12 heads, 64-token blocks, bf16) it takes 380 ms, as long as cuDNN's dense attention there
(389 ms); a variant with 128 x 128 tiles summed per block pair in registers took 421 ms
and was not kept (bench/results/gpu-2026-11-30-runs/notes.md). Triton is imported only when it
runs. Under ``TRITON_INTERPRET=1`` it also runs on CPU tensors inside the Triton
backend's emulator, which is how CI tests it. Offered through
``TritonBackend.block_mass`` (a :class:`~sparsecore.registry.BlockMassOp`).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import torch

from sparsecore.ir.uploads import on_device

from . import interpreter
from .triton_config import dot_precision

BLOCK_M, BLOCK_N, NUM_WARPS = 64, 64, 4
HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def supports(q: torch.Tensor, k: torch.Tensor, q_offsets: np.ndarray, kv_offsets: np.ndarray) -> str | None:
    """None if the Triton kernel takes these inputs, else why not (the search then uses torch)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if q.shape[-1] not in HEAD_DIMS:
        return f"head_dim {q.shape[-1]} is not one of {HEAD_DIMS}"
    if q.dtype not in DTYPES or k.dtype != q.dtype:
        return f"dtype {q.dtype}/{k.dtype} is not one of fp16, bf16, fp32 (same for q and k)"
    if not interpreter.active() and not torch.cuda.is_available():
        return "torch.cuda.is_available() is False"
    return interpreter.tensor_device_problem("cuda", q.device.type)


def run(q: torch.Tensor, k: torch.Tensor, q_offsets: np.ndarray, kv_offsets: np.ndarray, lse: torch.Tensor,
        scale: float, *, num_warps: int = NUM_WARPS, num_stages: int | None = None) -> torch.Tensor:
    """Block masses float32 ``[B, H, MB, NB]`` under the row LSE ``lse`` (natural log, float32 ``[B, H, L_q]``).

    ``num_warps``, ``num_stages``: launch overrides (None: Triton's default stages) for tuning runs.
    """
    from .block_mass_kernel import block_mass_fwd
    from .triton_kernel import LOG2E
    batch, heads, q_len, head_dim = q.shape
    q, k, lse = q.contiguous(), k.contiguous(), lse.contiguous()
    mass = torch.zeros(batch, heads, len(q_offsets) - 1, len(kv_offsets) - 1, dtype=torch.float32, device=q.device)
    programs, tile_start, tile_end, tile_block = (on_device(a, q.device) for a in _tiles(q_offsets, kv_offsets))
    block_mass_fwd[(programs.shape[0], heads, batch)](
        q, k, lse, mass, programs, tile_start, tile_end, tile_block,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        lse.stride(0), lse.stride(1), mass.stride(0), mass.stride(1), mass.stride(2),
        tile_start.shape[0], scale * LOG2E,
        GROUP=heads // k.shape[1], HEAD_DIM=head_dim, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        DOT_PRECISION=dot_precision(q.dtype), num_warps=num_warps,
        **({} if num_stages is None else {"num_stages": num_stages}))
    return mass


def cut_blocks(offsets: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each block cut into spans of at most ``size`` tokens from its start: per span (start, its block's end, block)."""
    per_block = -(-np.diff(offsets) // size)
    block = np.repeat(np.arange(len(per_block)), per_block)
    within = np.arange(len(block)) - np.repeat(np.cumsum(per_block) - per_block, per_block)
    return offsets[block] + size * within, offsets[block + 1], block


def _tiles(q_offsets: np.ndarray, kv_offsets: np.ndarray):
    """Query-tile programs (start, end, block) and key tiles (start, end, block), cut at block edges."""
    q_start, q_end, q_block = cut_blocks(q_offsets, BLOCK_M)
    kv_start, kv_end, kv_block = cut_blocks(kv_offsets, BLOCK_N)
    as32 = lambda *arrays: [np.ascontiguousarray(a, dtype=np.int32) for a in arrays]  # noqa: E731
    return (as32(np.stack([q_start, q_end, q_block], axis=1))[0], *as32(kv_start, kv_end, kv_block))
