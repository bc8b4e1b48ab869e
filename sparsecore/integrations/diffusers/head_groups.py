"""A mask whose heads take a few one-head patterns, run as one kernel per pattern (``StepAction.head_groups``).

STA's mask strategies give every (step, layer) its own per-head windows out of a handful: compiling each call's
mask converts it again for the kernel (FlashAttention-4's layout: 12-21 ms a layer at Wan 2.1 1.3B's 480 x 832 grid
on an H200, against a 2.9 ms kernel; ``bench/sta_strategy_probe.py``, three runs). Each window's one-head mask is
compiled once a run instead (the session keeps the mask, the mask keeps the kernel) and runs on the heads that have
it, folded into the batch. The gather that puts the tokens in the mask's order also sorts the heads by pattern,
``[H, B, L, D]`` with each pattern's heads together, so every pattern's inputs are a view ``[n * B, 1, L, D]``; each
output goes straight to its rows of a head-major ``[B, H, S, D]`` buffer, returned as the ``[B, S, H, D]`` view the
processors take (padding rows 0). The rows are read where the model's q, k, v lie, in either layout (token-major
eagerly, head-major under ``torch.compile``), without a copy. The outputs are the mask's (the same blocks per head;
bf16 rounding may differ by a unit where the lowering tiles a one-head call otherwise).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from sparsecore.ir import BlockMask
from sparsecore.ir.uploads import on_device
from sparsecore.ordering import TokenOrder


def rows_of(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """``[B, S, H, D]`` ``t`` as its storage's rows ``[N, D]`` and the row strides of (b, s, h), without a copy where
    its rows are dense in memory in any order of (b, s, h) (both layouts the processors pass); else a copy."""
    strides = [t.stride(i) for i in range(3)]
    order = sorted(range(3), key=lambda i: -strides[i])
    dense = t.stride(3) == 1 and t.permute(*order, 3).is_contiguous()
    if not dense:
        t = t.contiguous()
        strides = [t.stride(i) for i in range(3)]
    rows = torch.as_strided(t, (t.shape[0] * t.shape[1] * t.shape[2], t.shape[3]), (t.shape[3], 1))
    return rows, tuple(s // t.shape[3] for s in strides)


class HeadGroupKernel:
    """Runs ``mask`` (H = ``mask.num_heads`` heads, L = ``mask.q_len`` tokens) as ``parts``: ``(kernel of a one-head
    mask, the heads that have it as an int array)``, together covering every head once. ``backend``: the parts'."""

    def __init__(self, mask: BlockMask, parts: Sequence[tuple[Any, np.ndarray]]) -> None:
        heads = np.concatenate([np.asarray(members, dtype=np.int64) for _, members in parts])
        if len(heads) != mask.num_heads or not np.array_equal(np.sort(heads), np.arange(mask.num_heads)):
            raise ValueError(f"head groups: expected every one of the mask's {mask.num_heads} heads in exactly one "
                             f"group, got heads {heads.tolist()}")
        self.mask = mask
        self.backend = parts[0][0].backend
        self._kernels = [kernel for kernel, _ in parts]
        self._sizes = [len(members) for _, members in parts]
        self._heads = heads                                                 # sorted by part

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               order: TokenOrder | None) -> torch.Tensor:
        """Attention ``[B, S, H, D]`` (a head-major view) of the model's ``[B, S, H, D]`` q, k, v whose first L tokens
        the mask covers (over ``order``'s token order where given; tokens past the order stay in place), other rows
        0."""
        batch, seq_len, heads, dim = query.shape
        tokens, dim_v = self.mask.q_len, value.shape[3]
        shapes = [tuple(t.shape[:3]) for t in (query, key, value)]
        if len(set(shapes)) > 1 or heads != self.mask.num_heads or seq_len < tokens:
            raise ValueError(f"q, k, v: expected [B, S, {self.mask.num_heads}, D] each with S >= {tokens} (head "
                             f"groups run without GQA), got {shapes}; a strategy's windows need q, k, v of one "
                             f"shape: apply one window (STAParams.window) for such a model")
        device = query.device
        positions = torch.arange(tokens, device=device) if order is None else order.device_index(device, tokens)
        sorted_heads = on_device(self._heads, device)

        def index(strides: tuple[int, int, int]) -> torch.Tensor:                     # rows of [H', B, L], flat
            b, s, h = (torch.arange(batch, device=device)[None, :, None] * strides[0],
                       positions[None, None, :] * strides[1], sorted_heads[:, None, None] * strides[2])
            return (b + s + h).reshape(-1)

        indices: dict[tuple[int, int, int], torch.Tensor] = {}                   # one per layout (q, k, v share one)

        def sorted_rows(t: torch.Tensor) -> torch.Tensor:
            rows, strides = rows_of(t)
            if strides not in indices:
                indices[strides] = index(strides)
            return rows.index_select(0, indices[strides]).view(heads, batch, tokens, rows.shape[1])

        q, k, v = map(sorted_rows, (query, key, value))
        out = (value.new_zeros if tokens < seq_len else value.new_empty)(batch, heads, seq_len, dim_v)
        out_rows = out.view(-1, dim_v)
        head_major = index((heads * seq_len, 1, seq_len)).view(heads, batch * tokens)
        start = 0
        for kernel, size in zip(self._kernels, self._sizes):       # a few patterns, not heads
            part = [t[start:start + size].view(size * batch, 1, tokens, t.shape[3]) for t in (q, k, v)]
            out_rows.index_copy_(0, head_major[start:start + size].reshape(-1), kernel(*part).reshape(-1, dim_v))
            start += size
        return out.transpose(1, 2)
