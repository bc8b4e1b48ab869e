"""Host side of the Triton approximation of unlisted key blocks: statistics, then one pass that merges in place.

Per call: the block statistics of k and v (:func:`sparsecore.backends.approximation.statistics`,
torch, on the GPU: O(kv_len D²) per key head), then :func:`.approximation_kernel.approximate_unselected_fwd`
over every (query tile, head, batch element), which reads the exact kernel's output and LSE and
overwrites them with the merged result. Per mask and device, once: the statistics plan, the
block map as ``uint8 [H, MB, NB]`` and each query token's block.
"""

from __future__ import annotations

import torch
import triton

from sparsecore.ir import BlockMask

from ..approximation import StatisticsPlan, group_bounds, query_blocks, statistics
from .approximation_kernel import approximate_unselected_fwd


class ApproximationLaunch:
    """Merges the approximation of ``mask``'s unlisted blocks into an exact ``(out, lse)``."""

    def __init__(self, mask: BlockMask) -> None:
        self.mask = mask
        bounds = group_bounds(mask.num_kv_blocks, mask.unselected)
        self.first_order = bounds is not None
        self.group_blocks = mask.num_kv_blocks if bounds is None else int(bounds[1] - bounds[0])
        self.num_groups = 1 if bounds is None else len(bounds) - 1
        self._plans: dict[str, tuple[StatisticsPlan, torch.Tensor, torch.Tensor]] = {}

    def plan(self, device: torch.device) -> tuple[StatisticsPlan, torch.Tensor, torch.Tensor]:
        key = str(device)
        if key not in self._plans:
            mask = self.mask
            self._plans[key] = (StatisticsPlan.build(mask.kv_offsets, mask.unselected, device),
                                mask.to(device).to_dense().to(torch.uint8).contiguous(),
                                query_blocks(mask, device).to(torch.int32))
        return self._plans[key]

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                 scale: float) -> None:
        """``out``/``lse``: the exact kernel's result over the listed blocks (contiguous), overwritten."""
        stats_plan, listed, q_block = self.plan(q.device)
        stats = statistics(k, v, stats_plan)
        batch, num_heads, q_len, head_dim = q.shape
        num_kv_heads = k.shape[1]
        block_m, block_n = (64, 32) if q.device.type == "cuda" else (64, 16)   # the interpreter: smaller tiles
        matrices = stats.group_matrices if self.first_order else stats.key_means   # unread without first order
        grid = (triton.cdiv(q_len, block_m), num_heads, batch)
        approximate_unselected_fwd[grid](
            q, out, lse, stats.key_means.contiguous(), stats.value_sums.contiguous(), stats.sizes.contiguous(),
            matrices.contiguous(), listed, q_block,
            q.stride(0), q.stride(1), q.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            lse.stride(0), lse.stride(1),
            num_heads, num_kv_heads, q_len, self.mask.num_q_blocks, self.mask.num_kv_blocks, self.group_blocks,
            self.num_groups, scale,
            GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
            FIRST_ORDER=self.first_order, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            num_warps=4, num_stages=2)
