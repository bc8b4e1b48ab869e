"""The Ascend NPU lowering: torch_npu's block-sparse op where the IR fits its grid, its fused op elsewhere.

Compile time (``lower``): :func:`.schedule.schedule_hybrid` maps the mask onto
``npu_block_sparse_attention``'s block grid exactly and collects what the grid cannot
express (mixed op blocks, see :mod:`.schedule`) into fallback chunks for
``npu_fusion_attention``. No torch_npu is needed to schedule.

Call time: the ``torch_npu`` module is looked up afresh (:func:`.loader.require_torch_npu`),
the schedule's arrays are moved to the tensors' device once per device, then

1. one block-sparse call per run of equal query blocks writes its rows (rows with no
   block get output 0 / LSE -inf: the op leaves them undefined);
2. each fallback chunk, per batch element, gathers its query rows and key tokens, runs
   the fused op under the expanded mask (True = masked out), sets fully masked rows to
   0 / -inf (undefined in the op without ``inner_precise=2``), and merges into the rows
   through the LSEs (:func:`.merge.merge_partials`).

The whole mask goes to the fallback schedule (:func:`.schedule.schedule_fallback`) when the
block-sparse op cannot take the call: float32 inputs (it takes fp16/bf16 only), a GQA
group it rejects (it needs G < 128 and 128 % G == 0), a torch_npu without it (older than
2.14; warned once), or ``path="fallback"``.
"""

from __future__ import annotations

import math
import types
import warnings
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Hashable

import numpy as np
import torch

from sparsecore.capabilities import Capabilities
from sparsecore.ir import BlockMask
from sparsecore.ir.unselected import KINDS
from sparsecore.ir.uploads import refuse_capture
from sparsecore.registry import Backend, Run

from ..approximation import ApproximatingRun
from . import calls, loader
from .emulator import emulate
from .merge import merge_partials
from .schedule import OpSchedule, schedule_fallback, schedule_hybrid

PATHS = ("auto", "fallback")
MAX_HEADS = 256                                   # npu_fusion_attention: "Nq 1..256"
BLOCK_SPARSE_DTYPES = (torch.float16, torch.bfloat16)
BLOCK_SPARSE_HEAD_DIMS = (64, 128)


@dataclass(frozen=True)
class NpuOptions:
    """Options of the npu lowering.

    ``path``: ``"auto"`` (block-sparse op where the IR fits its grid, fused op for the
    rest) or ``"fallback"`` (fused op only). ``chunk_elements``: largest fallback mask,
    ``heads x query rows x key tokens`` bool entries per call (64 Mi by default: 64 MiB).
    """

    path: str = "auto"
    chunk_elements: int = 1 << 26

    def __post_init__(self) -> None:
        if self.path not in PATHS:
            raise ValueError(f"path: expected 'auto' (block-sparse op where exact) or 'fallback' (fused op only), "
                             f"got {self.path!r}")
        if isinstance(self.chunk_elements, bool) or not isinstance(self.chunk_elements, int):
            raise TypeError(f"chunk_elements: expected an int (bool mask entries per fallback call), "
                            f"got {type(self.chunk_elements).__name__}")
        if self.chunk_elements < 1:
            raise ValueError(f"chunk_elements: expected a positive int such as {1 << 26}, got {self.chunk_elements}")


class NpuBackend(Backend):
    name = "npu"
    capabilities = Capabilities(devices=("npu",), array_type="torch",
                                dtypes=frozenset({"float16", "bfloat16", "float32"}),
                                head_dims=frozenset(BLOCK_SPARSE_HEAD_DIMS), max_heads=MAX_HEADS,
                                unselected=frozenset(KINDS),
                                infinite_values_exact=False)     # the fallback's guard: see _run_fallback
    install_hint = loader.INSTALL_HINT
    lowers_from_host = True
    options_type = NpuOptions

    def unavailable_reason(self, device: str) -> str | None:
        return loader.unavailable_reason()

    def emulator(self) -> AbstractContextManager[types.ModuleType]:
        return emulate()

    def tensor_device_problem(self, device: str, tensor_device: str) -> str | None:
        if tensor_device == "cpu" and loader.emulator_active():
            return None   # the emulator computes on CPU tensors
        return super().tensor_device_problem(device, tensor_device)

    def lower(self, mask: BlockMask, device: str, options: Hashable) -> Run:
        kernel = NpuKernel(mask, options)
        if mask.unselected.kind == "drop":
            return kernel
        # The approximation of unlisted blocks: torch ops on the NPU, merged with the ops' exact part by LSE.
        return _ApproximatingNpuRun(ApproximatingRun(lambda q, k, v, scale: kernel(q, k, v, scale, True), mask), kernel)


class _ApproximatingNpuRun:
    """An approximating mask's run: its ``plan_bytes`` are the exact kernel's and the approximation's row plans."""

    def __init__(self, run: ApproximatingRun, kernel: "NpuKernel") -> None:
        self._run, self._kernel = run, kernel

    @property
    def plan_bytes(self) -> int:
        return self._kernel.plan_bytes + self._run.plan_bytes

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                 return_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._run(q, k, v, scale, return_lse)


def block_sparse_problems(dtype: torch.dtype, head_dim: int, group: int) -> list[str]:
    """Why ``npu_block_sparse_attention`` cannot take these inputs (empty: it can)."""
    problems = []
    if dtype not in BLOCK_SPARSE_DTYPES:
        problems.append(f"it takes float16/bfloat16, got {str(dtype).removeprefix('torch.')}")
    if head_dim not in BLOCK_SPARSE_HEAD_DIMS:
        problems.append(f"it takes head dim 64 or 128, got {head_dim}")
    if not (group < 128 and 128 % group == 0):
        problems.append(f"it needs a GQA group G < 128 with 128 % G == 0, got {group}")
    return problems


@dataclass(frozen=True)
class _DeviceCall:
    q_start: int
    q_end: int
    block_x: int
    compute: torch.Tensor       # int8 [H, MBq, NBk]
    row_empty: torch.Tensor     # bool [H, rows]
    merges: bool


@dataclass(frozen=True)
class _DeviceChunk:
    q_tokens: torch.Tensor      # int64 [R]
    kv_tokens: torch.Tensor     # int64 [L]
    row_group: torch.Tensor     # int64 [R]
    key_piece: torch.Tensor     # int64 [L]
    allowed: torch.Tensor       # bool [H, G, P], True = attend (compact: expanded per call, one chunk at a time)
    row_has_keys: torch.Tensor  # bool [H, R]


class NpuKernel:
    """The run function of one compiled mask: schedules per kind, their tensors per device."""

    def __init__(self, mask: BlockMask, options: NpuOptions) -> None:
        self.mask = mask
        self.options = options
        self._schedules: dict[str, OpSchedule] = {}
        self._on_device: dict[tuple[str, str], tuple[list[_DeviceCall], list[_DeviceChunk]]] = {}
        self._warned = False
        self.schedule("hybrid" if options.path == "auto" else "fallback")   # at compile time, off the hot path

    @property
    def plan_bytes(self) -> int:
        """Bytes of the schedules built (host) and of their device copies: they grow with the tokens (rows per call,
        gathered positions per chunk), so the kernel cache counts them (:mod:`sparsecore.kernel_cache`)."""
        host = [a for s in tuple(self._schedules.values()) for a in _schedule_arrays(s)]
        on_device = [t for calls, chunks in tuple(self._on_device.values())
                     for t in [x for c in calls for x in (c.compute, c.row_empty)]
                     + [x for c in chunks for x in (c.q_tokens, c.kv_tokens, c.row_group, c.key_piece, c.allowed,
                                                     c.row_has_keys)]]
        return sum(a.nbytes for a in host) + sum(t.untyped_storage().nbytes() for t in on_device)

    def schedule(self, kind: str) -> OpSchedule:
        if kind not in self._schedules:
            build = schedule_hybrid if kind == "hybrid" else schedule_fallback
            self._schedules[kind] = build(self.mask, self.options.chunk_elements)
        return self._schedules[kind]

    def kind_for(self, torch_npu: types.ModuleType, q: torch.Tensor, k: torch.Tensor) -> str:
        """``"hybrid"`` (block-sparse op + fallback) or ``"fallback"`` (fused op only) for this call."""
        if self.options.path == "fallback":
            return "fallback"
        if not hasattr(torch_npu, loader.BLOCK_SPARSE_OP):
            if not self._warned:
                self._warned = True
                warnings.warn(f"npu kernel: torch_npu {getattr(torch_npu, '__version__', '?')} lacks "
                              f"{loader.BLOCK_SPARSE_OP} (needs torch_npu >= 2.14 and CANN >= 9.0); every block "
                              f"goes through {loader.FUSION_OP}", RuntimeWarning, stacklevel=4)
            return "fallback"
        return "fallback" if block_sparse_problems(q.dtype, q.shape[-1], q.shape[1] // k.shape[1]) else "hybrid"

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                 return_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        torch_npu = loader.require_torch_npu()
        refuse_capture(q.device, "an npu kernel call", f"torch_npu documents {loader.FUSION_OP} without graph mode "
                       "or aclgraph, and a call copies its schedule to the device the first time")
        block_calls, chunks = self._device_schedule(self.kind_for(torch_npu, q, k), q.device)
        batch, heads, q_len, _ = q.shape
        out = torch.zeros_like(q, memory_format=torch.contiguous_format)
        lse = torch.full((batch, heads, q_len), -math.inf, dtype=torch.float32, device=q.device)
        key, value = k.contiguous(), v.contiguous()
        for call in block_calls:
            _run_block_sparse(torch_npu, call, q, key, value, scale, return_lse or call.merges, out, lse)
        for chunk in chunks:
            _run_fallback(torch_npu, chunk, q, key, value, scale, out, lse)
        return out, (lse if return_lse else None)

    def _device_schedule(self, kind: str, device: torch.device) -> tuple[list[_DeviceCall], list[_DeviceChunk]]:
        key = (kind, str(device))
        if key not in self._on_device:
            schedule = self.schedule(kind)

            def put(a: np.ndarray) -> torch.Tensor:
                return torch.from_numpy(np.ascontiguousarray(a)).to(device)

            block_calls = [_DeviceCall(c.q_start, c.q_end, c.block_x, put(c.block_mask), put(c.row_empty), c.merges)
                           for c in schedule.block_sparse_calls]
            chunks = [_DeviceChunk(put(c.q_tokens), put(c.kv_tokens), put(c.row_group), put(c.key_piece),
                                   put(c.allowed), put(c.row_has_keys))
                      for c in schedule.fallback_chunks]
            self._on_device[key] = (block_calls, chunks)
        return self._on_device[key]


def _schedule_arrays(schedule: OpSchedule) -> list[np.ndarray]:
    return ([a for c in schedule.block_sparse_calls for a in (c.block_mask, c.row_empty)]
            + [a for c in schedule.fallback_chunks
               for a in (c.q_tokens, c.kv_tokens, c.row_group, c.key_piece, c.allowed, c.row_has_keys)])


def _run_block_sparse(torch_npu: types.ModuleType, call: _DeviceCall, q: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, scale: float, want_lse: bool, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Rows ``q_start:q_end`` from one block-sparse call; rows without a block become 0 / -inf."""
    batch = q.shape[0]
    query = q[:, :, call.q_start:call.q_end].contiguous()
    compute = call.compute.expand(batch, -1, -1, -1).contiguous()
    part_out, part_lse = calls.block_sparse_attention(torch_npu, query, key, value, compute, call.block_x, scale,
                                                      want_lse)
    out[:, :, call.q_start:call.q_end] = part_out.masked_fill(call.row_empty[None, :, :, None], 0)
    if want_lse:
        lse[:, :, call.q_start:call.q_end] = part_lse.masked_fill(call.row_empty[None], -math.inf)


def _run_fallback(torch_npu: types.ModuleType, chunk: _DeviceChunk, q: torch.Tensor, key: torch.Tensor,
                  value: torch.Tensor, scale: float, out: torch.Tensor, lse: torch.Tensor) -> None:
    """One fallback chunk per batch element, merged into ``out``/``lse`` through the LSEs.

    The chunk's token mask ``[1, H, R, L]`` (in the op's polarity, built once for the batch) exists only during this
    function: at most ``chunk_elements`` entries, whatever the sequence length; the rest is per row or per piece.
    """
    rows = chunk.q_tokens
    masked_out = (~chunk.allowed)[:, chunk.row_group][:, :, chunk.key_piece][None]
    allowed_rows = chunk.allowed[:, chunk.row_group]                                        # [H, R, P]
    no_keys = ~chunk.row_has_keys[None]
    kv_of = torch.arange(q.shape[1], device=q.device) // (q.shape[1] // key.shape[1])
    for b in range(q.shape[0]):
        query = q[b:b + 1, :, rows]
        keys, values = key[b:b + 1, :, chunk.kv_tokens], value[b:b + 1, :, chunk.kv_tokens]
        # The fused op computes masked-out keys with weight 0, and 0 * NaN = NaN: it gets finite tokens, and
        # the rows that attend to a non-finite one are made NaN (dense attention makes them non-finite).
        bad = ~(torch.isfinite(keys).all(dim=-1) & torch.isfinite(values).all(dim=-1))      # [1, H_kv, L]
        keys, values = keys.masked_fill(bad[..., None], 0), values.masked_fill(bad[..., None], 0)
        bad_piece = torch.zeros(bad.shape[1], allowed_rows.shape[2], dtype=torch.int32, device=q.device)
        bad_piece = bad_piece.index_add_(1, chunk.key_piece, bad[0].int()) > 0                # [H_kv, P]
        poisoned = (allowed_rows & bad_piece[kv_of, None, :]).any(dim=-1)[None]              # [1, H, R]
        part_out, part_lse = calls.fusion_attention(torch_npu, query, keys, values, masked_out, scale)
        part_out = part_out.float().masked_fill(no_keys[..., None], 0).masked_fill(poisoned[..., None], math.nan)
        part_lse = part_lse.float().masked_fill(no_keys, -math.inf).masked_fill(poisoned, math.nan)
        merged_out, merged_lse = merge_partials(out[b:b + 1, :, rows].float(), lse[b:b + 1, :, rows],
                                                part_out, part_lse)
        out[b:b + 1, :, rows] = merged_out.to(out.dtype)
        lse[b:b + 1, :, rows] = merged_lse
