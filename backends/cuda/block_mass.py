"""The CUDA implementation of AdaSpa's block-mass pass (:func:`sparsecore.search.block_mass`).

Pass 2 only: given the row LSE (fresh from the search's dense pass, or cached), the
fused kernels of :mod:`.block_mass_kernel` add ``exp(scale * q.k - lse)`` per (query
block, key block) without writing scores to memory. Key blocks of 64 tokens in segments
that each end with a block of 1 to 64 (AdaSpa's blocks: one segment; cut at the edges of
frame-causal blocks: one a causal block) take ``block_mass_segmented_fwd``, which needs no
tile tables: on an H200 at Wan 6x (188,760 tokens, 12 heads, bf16) 238 ms with 64-row x
128-key tiles read by TMA, against 383 ms for the table-driven kernel every other layout
takes and 380 ms for cuDNN's dense attention (2026-11-30, ``bench/search_step.py``, the
one-segment kernel before segments). Triton is imported only when it runs. Under
``TRITON_INTERPRET=1`` it also runs on CPU tensors inside the Triton backend's emulator, which
is how CI tests it. Offered through ``TritonBackend.block_mass`` (a
:class:`~sparsecore.registry.BlockMassOp`).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import numpy as np
import torch

from sparsecore.ir.uploads import queued

from . import interpreter
from .triton_config import below_ampere, dot_precision

BLOCK_M, BLOCK_N, NUM_WARPS = 64, 64, 4
UNIFORM_BLOCK = 64              # the block size block_mass_segmented_fwd takes
SEGMENT_BLOCKS = 4              # segments of fewer blocks on average take the table kernel: a segment's masked
                                # tail tile adds at most one 64-key unit to the table kernel's work, so at 4 blocks a
                                # segment at most 25%, under the segmented kernel's advantage (268 against 353 ms on
                                # SkyReels-V2's causal blocks, which add 1 in 160)
HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class SegmentedConfig:
    """Launch of the segmented 64-token-block kernel: ``block_n`` keys a tile (64 or 128), TMA key loads (Hopper)."""

    block_n: int
    num_warps: int
    num_stages: int
    use_tma: bool

    def __post_init__(self) -> None:
        if self.block_n not in (64, 128):
            raise ValueError(f"block_n: expected 64 or 128 keys (one or two blocks a tile), got {self.block_n}")


def default_segmented_config(q: torch.Tensor) -> SegmentedConfig:
    """H200, Wan 6x, bf16 (2026-11-30, search-step-2026-11-30_uniform.md): 128 keys, 4 warps, TMA 238 ms; 64 keys
    252 ms (TMA) / 261 ms (pointers); 128 keys with 8 warps by pointers 416 ms."""
    if q.device.type != "cuda":
        return SegmentedConfig(128, 4, 1, use_tma=False)
    if q.element_size() == 4:
        return SegmentedConfig(64, 4, 2, use_tma=False)
    return SegmentedConfig(128, 4, 3, use_tma=torch.cuda.get_device_capability(q.device)[0] >= 9)


def uniform_blocks(offsets: np.ndarray) -> bool:
    """Every block holds :data:`UNIFORM_BLOCK` tokens but the last, which holds 1 to that many."""
    sizes = np.diff(offsets)
    return bool(len(sizes) > 0 and (sizes[:-1] == UNIFORM_BLOCK).all() and 0 < sizes[-1] <= UNIFORM_BLOCK)


def supports(q: torch.Tensor, k: torch.Tensor, q_offsets: np.ndarray, kv_offsets: np.ndarray) -> str | None:
    """None if the Triton kernel takes these inputs, else why not (the search then uses torch)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if q.shape[-1] not in HEAD_DIMS:
        return f"head_dim {q.shape[-1]} is not one of {HEAD_DIMS}"
    if q.dtype not in DTYPES or k.dtype != q.dtype:
        return f"dtype {q.dtype}/{k.dtype} is not one of fp16, bf16, fp32 (same for q and k)"
    interpreted_dtype = interpreter.dtype_problem(q.dtype)
    if interpreted_dtype:
        return interpreted_dtype
    if not interpreter.active() and not torch.cuda.is_available():
        return "torch.cuda.is_available() is False"
    if not interpreter.active() and q.device.type == "cuda":
        old_gpu = below_ampere(q.device)
        if old_gpu:
            return old_gpu
    return interpreter.tensor_device_problem("cuda", q.device.type)


def run(q: torch.Tensor, k: torch.Tensor, q_offsets: np.ndarray, kv_offsets: np.ndarray, lse: torch.Tensor,
        scale: float, *, visible: np.ndarray | None = None, config: SegmentedConfig | None = None) -> torch.Tensor:
    """Block masses float32 ``[B, H, MB, NB]`` under the row LSE ``lse`` (natural log, float32 ``[B, H, L_q]``).

    ``visible``: int per query block, the leading key blocks it sees (frame-causal attention); the tiles of the
    others are not walked and their masses are 0. None: every block. ``config``: the launch of the segmented
    64-token-block kernel (None: :func:`default_segmented_config`), for tuning runs and tests; layouts it does not
    take (:func:`segments`) take the table-driven kernel.
    """
    q, k, lse = q.contiguous(), k.contiguous(), lse.contiguous()
    batch, heads, q_len, head_dim = q.shape
    mass = torch.zeros(batch, heads, len(q_offsets) - 1, len(kv_offsets) - 1, dtype=torch.float32, device=q.device)
    from .triton_kernel import LOG2E
    found = segments(q_offsets, kv_offsets, visible)
    if found is not None:
        _run_segmented(q, k, lse, mass, q_offsets, found, scale * LOG2E, config or default_segmented_config(q))
        return mass
    from .block_mass_kernel import block_mass_fwd
    programs, tile_start, tile_end, tile_block = (queued(a, q.device) for a in _tiles(q_offsets, kv_offsets,
                                                                                     visible))
    block_mass_fwd[(programs.shape[0], heads, batch)](
        q, k, lse, mass, programs, tile_start, tile_end, tile_block,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        lse.stride(0), lse.stride(1), mass.stride(0), mass.stride(1), mass.stride(2),
        scale * LOG2E,
        GROUP=heads // k.shape[1], HEAD_DIM=head_dim, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        DOT_PRECISION=dot_precision(q.dtype), num_warps=NUM_WARPS)
    return mass


@dataclass(frozen=True)
class Segments:
    """Key blocks in segments for ``block_mass_segmented_fwd``: ``starts`` the segments' token offsets and
    ``blocks`` their first blocks (each with the totals after the last), ``walked`` the leading segments each query
    block walks."""

    starts: np.ndarray
    blocks: np.ndarray
    walked: np.ndarray


def segments(q_offsets: np.ndarray, kv_offsets: np.ndarray, visible: np.ndarray | None) -> Segments | None:
    """The key blocks' segments where the segmented kernel takes the layout, else None (the table kernel).

    It takes query blocks of at most 64 tokens and key blocks of at most 64, cut into segments after each block
    shorter than 64 and at each ``visible`` count (frame-causal blocks cut into 64-token blocks: a segment a causal
    block), with at least :data:`SEGMENT_BLOCKS` blocks a segment on average unless there is one."""
    q_sizes, kv_sizes = np.diff(q_offsets), np.diff(kv_offsets)
    if q_sizes.max() > UNIFORM_BLOCK or kv_sizes.max() > UNIFORM_BLOCK:
        return None
    cuts = [[0], np.flatnonzero(kv_sizes < UNIFORM_BLOCK) + 1, [len(kv_sizes)], [] if visible is None else visible]
    blocks = np.unique(np.concatenate(cuts).astype(np.int64))
    count = len(blocks) - 1
    if count > 1 and count * SEGMENT_BLOCKS > len(kv_sizes):
        return None
    walked = np.full(len(q_sizes), count) if visible is None else np.searchsorted(blocks, visible)
    return Segments(*_int32(kv_offsets[blocks], blocks, walked))


def _run_segmented(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, mass: torch.Tensor, q_offsets: np.ndarray,
                   found: Segments, qk_scale: float, config: SegmentedConfig) -> None:
    from .block_mass_kernel import block_mass_segmented_fwd
    from .triton_launch import describe
    batch, heads, _, head_dim = q.shape
    num_kv_heads, kv_len = k.shape[1], k.shape[2]
    desc_k = describe(k, config.block_n) if config.use_tma else None
    tables = (queued(a, q.device) for a in (*_int32(q_offsets), found.walked, found.starts, found.blocks))
    block_mass_segmented_fwd[(len(q_offsets) - 1, heads, batch)](
        q, k, lse, mass, desc_k, *tables,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        lse.stride(0), lse.stride(1), mass.stride(0), mass.stride(1), mass.stride(2),
        num_kv_heads, kv_len, qk_scale,
        GROUP=heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_N=config.block_n, USE_TMA=config.use_tma,
        DOT_PRECISION=dot_precision(q.dtype), ONE_SEGMENT=len(found.blocks) == 2 and bool((found.walked == 1).all()),
        num_warps=config.num_warps, num_stages=config.num_stages)


def cut_blocks(offsets: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each block cut into spans of at most ``size`` tokens from its start: per span (start, its block's end, block)."""
    per_block = -(-np.diff(offsets) // size)
    block = np.repeat(np.arange(len(per_block)), per_block)
    within = np.arange(len(block)) - np.repeat(np.cumsum(per_block) - per_block, per_block)
    return offsets[block] + size * within, offsets[block + 1], block


def _tiles(q_offsets: np.ndarray, kv_offsets: np.ndarray, visible: np.ndarray | None):
    """Query-tile programs (start, end, block, key tiles walked) and key tiles (start, end, block), cut at block
    edges; a program walks the leading tiles of its block's ``visible`` key blocks (all where None)."""
    q_start, q_end, q_block = cut_blocks(q_offsets, BLOCK_M)
    kv_start, kv_end, kv_block = cut_blocks(kv_offsets, BLOCK_N)
    walked = np.full(len(q_block), len(kv_block)) if visible is None else \
        np.searchsorted(kv_block, np.asarray(visible, dtype=np.int64)[q_block])       # tiles of blocks < visible
    return (*_int32(np.stack([q_start, q_end, q_block, walked], axis=1)), *_int32(kv_start, kv_end, kv_block))


def _int32(*arrays: np.ndarray) -> list[np.ndarray]:
    """Contiguous int32 copies of host arrays, as the kernels' tables take them."""
    return [np.ascontiguousarray(a, dtype=np.int32) for a in arrays]
