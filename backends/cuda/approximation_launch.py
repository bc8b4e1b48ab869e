"""Host side of the Triton approximation of unlisted key blocks: statistics, then one pass that merges in place.

Per call: :func:`.statistics_kernel.block_statistics_fwd` reads k and v once for the block
summaries (k̄_j, v̄_j and the pieces of H_g), the pieces of each group are summed and divided
by its tokens (torch, ``[G, D, D]`` per key head), then :func:`.approximation_kernel.approximate_unselected_fwd`
runs over every (query tile, head, batch element), reading the exact kernel's output and LSE
and overwriting them with the merged result. Per mask and device, once: the block boundaries,
the group token counts and each query token's block. The block map the pass reads, packed in
bits (``[H, MB, ceil(NB / 32)]`` int32), is scattered from the lists at each call instead of kept
(a step's plans are alive for all layers at once). The pass's tiles are the configured ones where
their shared memory fits the device, else fewer pipeline stages or the group-by-group walk
(:meth:`ApproximationLaunch.fitting`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import triton

from sparsecore.ir import BlockMask, csr
from sparsecore.ir.uploads import queued

from ..approximation import PIECE_TOKENS, group_bounds, query_blocks
from . import interpreter, shared_memory
from .approximation_kernel import approximate_unselected_fwd
from .statistics_kernel import block_statistics_fwd
from .triton_config import dot_precision

# Operands of the pass's products per input dtype (float32 for the rest). The means enter the exponent: 16-bit
# ones go as hi + lo (two products carry a mean to about 2^-16 in bf16, 2^-22 in fp16), where one TF32 product
# of q and a mean put fp16 LSEs 2.1e-3 from the oracle. Value means and group matrices: bf16 keeps float32's
# range; fp16's group matrices could overflow, so both stay float32 (TF32 products) for fp16 inputs.
MEANS = {torch.bfloat16: torch.bfloat16, torch.float16: torch.float16}
OPERANDS = {torch.bfloat16: torch.bfloat16}


@dataclass(frozen=True)
class ApproximationConfig:
    """Tiles of the pass: ``block_m`` query rows per program, ``block_n`` key blocks per step."""

    block_m: int = 128
    block_n: int = 32
    num_warps: int = 8
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "num_warps", "num_stages"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ApproximationConfig.{name}: expected a positive int, got {value!r}")


# (the candidate tiles, the launch's constants, operand dtypes and alignment, GPU, shared memory) -> the tiles that
# fit: decided by compiling once for all masks and calls, as the exact kernel's stages (triton_launch._STAGES)
_FITTING: dict[tuple, dict] = {}
INTERPRETER_CONFIG = ApproximationConfig(64, 16, 4, 1)     # small tiles keep the CPU interpreter quick
# Without first-order terms the pass holds no ``q H_g`` product, and 4 warps ran it faster: PASA's 6x mask as
# "zeroth", 14.40 ms against 16.65 at 8 warps (H200, 2026-12-02, bench/approximation_benchmark.py --sweep; the
# grouped kind at 4 warps took 81.0 ms against 27.6: its 128 x 128 float32 product spills).
ZEROTH_CONFIG = ApproximationConfig(num_warps=4)


@dataclass(frozen=True)
class _DevicePlan:
    kv_offsets: torch.Tensor        # int64 [NB + 1]
    sizes: torch.Tensor             # float32 [NB]: |B_j|
    group_tokens: torch.Tensor | None   # float32 [G]: T_g (first-order kinds)
    q_block: torch.Tensor           # int32 [L]


@dataclass(frozen=True)
class _Statistics:
    means_high: torch.Tensor        # [B, Hk, NB, D] in the means' operand dtype (MEANS)
    means_low: torch.Tensor         # the remainder k̄ - hi when split, else means_high (unread)
    split: bool
    value_means: torch.Tensor       # [B, Hk, NB, D]: v̄_j in the operand dtype (OPERANDS)
    group_matrices: torch.Tensor    # [B, Hk, G, D, D]: H_g / T_g, as the value means (first-order kinds; else unread)


class ApproximationLaunch:
    """Merges the approximation of ``mask``'s unlisted blocks into an exact ``(out, lse)``."""

    def __init__(self, mask: BlockMask, config: ApproximationConfig | None = None) -> None:
        self.mask = mask
        self.config = config
        bounds = group_bounds(mask.num_kv_blocks, mask.unselected)
        self.first_order = bounds is not None
        self.group_blocks = mask.num_kv_blocks if bounds is None else int(bounds[1] - bounds[0])
        self.num_groups = 1 if bounds is None else len(bounds) - 1
        widest = int(np.diff(mask.kv_offsets).max())
        self.piece_blocks = max(1, min(self.group_blocks, PIECE_TOKENS // widest))   # blocks per statistics program
        self.pieces_per_group = -(-self.group_blocks // self.piece_blocks)
        self._plans: dict[str, _DevicePlan] = {}

    def plan(self, device: torch.device) -> _DevicePlan:
        key = str(device)
        if key not in self._plans:
            mask = self.mask
            offsets = np.asarray(mask.kv_offsets, dtype=np.int64)
            bounds = group_bounds(mask.num_kv_blocks, mask.unselected)
            group_tokens = None if bounds is None else queued(np.diff(offsets[bounds]).astype(np.float32), device)
            sizes = queued(np.diff(offsets).astype(np.float32), device)
            self._plans[key] = _DevicePlan(queued(offsets, device), sizes, group_tokens,
                                           query_blocks(mask, device).to(torch.int32))
        return self._plans[key]

    def config_for(self, device: torch.device) -> ApproximationConfig:
        if self.config is not None:
            return self.config
        if device.type != "cuda":
            return INTERPRETER_CONFIG
        return ApproximationConfig() if self.first_order else ZEROTH_CONFIG

    def statistics(self, k: torch.Tensor, v: torch.Tensor, plan: _DevicePlan) -> _Statistics:
        """The block summaries of ``k, v [B, Hk, T, D]`` (unit last stride) in the pass's operand dtypes."""
        batch, num_kv_heads, _, head_dim = k.shape
        means, operand = MEANS.get(k.dtype, torch.float32), OPERANDS.get(k.dtype, torch.float32)
        split = means != torch.float32
        shape = (batch, num_kv_heads, self.mask.num_kv_blocks, head_dim)
        high = torch.empty(shape, dtype=means, device=k.device)
        value_means = torch.empty(shape, dtype=operand, device=k.device)
        low = torch.empty_like(high) if split else high
        pieces = self.num_groups * self.pieces_per_group
        partials = torch.empty((batch, num_kv_heads, pieces, head_dim, head_dim) if self.first_order else (1,),
                               dtype=torch.float32, device=k.device)
        block_statistics_fwd[(pieces, num_kv_heads, batch)](
            k, v, plan.kv_offsets, high, low, value_means, partials,
            k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            num_kv_heads, self.mask.num_kv_blocks, self.group_blocks, self.pieces_per_group, self.piece_blocks,
            HEAD_DIM=head_dim, BLOCK_T=64 if k.device.type == "cuda" else 16, FIRST_ORDER=self.first_order,
            SPLIT_MEANS=split, DOT_PRECISION=dot_precision(k.dtype), num_warps=8 if k.device.type == "cuda" else 4,
            num_stages=2 if k.element_size() == 4 else 3)  # float32 first-order: 135 KB at 3, over a 4090's 99 KB
        matrices = value_means
        if self.first_order:
            grouped = partials.view(batch, num_kv_heads, self.num_groups, self.pieces_per_group, head_dim, head_dim)
            matrices = (grouped.sum(dim=3) / plan.group_tokens[:, None, None]).to(operand)
        return _Statistics(high, low, split, value_means, matrices)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                 scale: float) -> None:
        """``out``/``lse``: the exact kernel's result over the listed blocks (any strides with a unit last one: FA4's
        output comes as a transposed view), overwritten."""
        plan = self.plan(q.device)
        stats = self.statistics(k, v, plan)
        device_mask = self.mask.to(q.device)
        listed = csr.to_block_bits(device_mask.indptr, device_mask.indices, device_mask.num_kv_blocks)
        batch, num_heads, q_len, head_dim = q.shape
        num_kv_heads = k.shape[1]
        grid = (triton.cdiv(q_len, self.config_for(q.device).block_m), num_heads, batch)
        args = (q, out, lse, stats.means_high, stats.means_low, stats.value_means, plan.sizes,
                stats.group_matrices, listed, plan.q_block,
                q.stride(0), q.stride(1), q.stride(2),
                out.stride(0), out.stride(1), out.stride(2),
                lse.stride(0), lse.stride(1),
                num_heads, num_kv_heads, q_len, self.mask.num_q_blocks, self.mask.num_kv_blocks, self.group_blocks,
                self.num_groups, scale)
        common = dict(GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, FIRST_ORDER=self.first_order,
                      SPLIT_MEANS=stats.split, DOT_PRECISION=dot_precision(q.dtype))
        approximate_unselected_fwd[grid](*args, **common, **self.fitting(args, grid, common, q.device))

    def candidates(self, config: ApproximationConfig,
                   whole_groups: bool = True) -> list[tuple[ApproximationConfig, int]]:
        """``(config, groups per tile)`` in order of preference: the tiles as configured, then with fewer pipeline
        stages (each stage holds a tile's summaries, and its groups' ``D x D`` matrices when a tile holds whole
        groups, in shared memory), then, where tiles held whole groups, the group-by-group walk the same way.
        ``whole_groups=False``: the group-by-group walk only."""
        whole = self.groups_per_tile(config.block_n) if whole_groups else 0
        stages = range(config.num_stages, 0, -1)
        return [(replace(config, num_stages=n), groups) for groups in dict.fromkeys((whole, 0)) for n in stages]

    def fitting(self, args: tuple, grid: tuple, common: dict, device: torch.device) -> dict:
        """The pass's tile parameters for these arguments: the first of :meth:`candidates` whose compiled kernel's
        shared memory fits the device (Triton reports it at compile time and refuses the launch otherwise; at
        head dim 128, four 8-block groups a tile need 500 KB in bf16, and fp16's float32 group matrices 394 KB
        at one group a tile against the H200's 227 KB). Off CUDA, under Triton's interpreter, or where Triton
        gives no compiled kernel to read (a JIT hook), the configured tiles.

        On CUDA, float32 inputs (IEEE products, on CUDA cores) at head dims of 128 and more take the group-by-group
        walk only: tiles of whole groups put a ``D x D`` IEEE product per group into one unrolled body, whose
        compile for sm90 at head dim 128 and four groups a tile took 68.5 s (and needed 673 KB at three stages)
        against 6.7 s for the walk (149 KB); at head dim 64, 5.7 s and 215 KB (it fits: whole groups stay first
        there). Triton 3.6 on the 2-core development machine, 2026-12-01."""
        checked = device.type == "cuda" and not interpreter.interpreting()
        tried, limit = [], shared_memory.shared_memory_limit() if checked else None
        whole_groups = not (checked and common.get("DOT_PRECISION") == "ieee" and common["HEAD_DIM"] >= 128)
        candidates = [dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, GROUPS_PER_TILE=groups,
                           WORD_TILES=self.word_tiles(config.block_n, groups), num_warps=config.num_warps,
                           num_stages=config.num_stages)
                      for config, groups in self.candidates(self.config_for(device), whole_groups)]
        if limit is None:
            return candidates[0]
        key = (tuple(tuple(p.items()) for p in candidates), tuple(sorted(common.items())),
               tuple((a.dtype, a.data_ptr() % 16 == 0) for a in args if isinstance(a, torch.Tensor)),
               torch.cuda.get_device_capability(device), limit)
        if key in _FITTING:
            return _FITTING[key]
        for params in candidates:
            compiled = approximate_unselected_fwd.warmup(*args, grid=grid, **common, **params)
            needed = getattr(getattr(compiled, "metadata", None), "shared", None)
            if needed is None:                          # Triton gave no compiled kernel to read: decide next time
                return params
            if needed <= limit:
                _FITTING[key] = params
                return params
            tried.append(f"{params['num_stages']} stage(s), {params['GROUPS_PER_TILE']} group(s) a tile: {needed} "
                         f"bytes")
        raise RuntimeError(f"approximation pass ({self.mask.unselected.kind}, {args[0].dtype}, head dim "
                           f"{common['HEAD_DIM']}): no tile configuration fits the shared memory of {device} "
                           f"({limit} bytes: {'; '.join(tried)}); run this mask with approximation 'drop', or on a "
                           "device with more shared memory")

    def word_tiles(self, block_n: int, groups_per_tile: int) -> bool:
        """Whether every tile of ``block_n`` blocks lies inside one 32-block word of the packed map: tiles start at
        multiples of ``block_n`` (one flat walk, or groups that hold whole tiles) and ``block_n`` divides 32."""
        aligned = groups_per_tile > 0 or self.num_groups == 1 or self.group_blocks % block_n == 0
        return 32 % block_n == 0 and aligned

    def groups_per_tile(self, block_n: int) -> int:
        """Groups in a tile of ``block_n`` blocks when tiles hold whole groups (at most 4), else 0."""
        whole = self.num_groups > 1 and block_n % self.group_blocks == 0 and block_n // self.group_blocks <= 4
        return block_n // self.group_blocks if whole else 0

