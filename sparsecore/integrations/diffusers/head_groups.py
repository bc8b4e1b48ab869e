"""A mask whose heads take a few one-head patterns, run as one kernel per pattern (``StepAction.head_groups``).

STA's mask strategies give every (step, layer) its own per-head windows out of a handful: compiling each call's
mask converts it again for the kernel (FlashAttention-4's layout: 15-17 ms a layer at Wan 2.1 1.3B's 480 x 832 grid
on an H200, against a 2.9 ms kernel; ``bench/sta_strategy_probe.py``). Each window's one-head mask is compiled once
instead (the session keeps the mask, the mask keeps the kernel) and runs on the heads that have it, folded into the
batch. The gather that puts the tokens in the mask's order also sorts the heads by pattern, ``[H, B, L, D]`` with
each pattern's heads together, so every pattern's inputs are a view ``[n * B, 1, L, D]``; the output goes back to
the model's ``[B, S, H, D]`` in one scatter (padding rows 0). The outputs are the mask's (the same blocks per head;
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


class HeadGroupKernel:
    """Runs ``mask`` (H = ``mask.num_heads`` heads, L = ``mask.q_len`` tokens) as ``parts``: ``(kernel of a one-head
    mask, the heads that have it)``, together covering every head once. ``backend``: the parts' (for stats)."""

    def __init__(self, mask: BlockMask, parts: Sequence[tuple[Any, Sequence[int]]]) -> None:
        covered = sorted(head for _, members in parts for head in members)
        if covered != list(range(mask.num_heads)):
            raise ValueError(f"head groups: expected every one of the mask's {mask.num_heads} heads in exactly one "
                             f"group, got heads {covered}")
        self.mask = mask
        self.backend = parts[0][0].backend
        self._kernels = [kernel for kernel, _ in parts]
        self._sizes = [len(members) for _, members in parts]
        self._heads = np.concatenate([np.asarray(members, dtype=np.int64) for _, members in parts])  # sorted by part

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               order: TokenOrder | None) -> torch.Tensor:
        """Attention ``[B, S, H, D]`` of the model's ``[B, S, H, D]`` q, k, v whose first L tokens the mask covers
        (over ``order``'s token order where given; tokens past the order stay in place), the other rows 0."""
        batch, seq_len, heads, _ = query.shape
        tokens = self.mask.q_len
        if heads != self.mask.num_heads or key.shape[2] != heads or value.shape[2] != heads or seq_len < tokens:
            raise ValueError(f"q, k, v: expected {self.mask.num_heads} heads each (head groups run without GQA) and at "
                             f"least {tokens} tokens, got {heads}, {key.shape[2]}, {value.shape[2]} heads and "
                             f"{seq_len} tokens")
        device = query.device
        positions = torch.arange(tokens, device=device) if order is None else order.device_index(device, tokens)
        rows = torch.arange(batch, device=device)[:, None] * seq_len + positions[None, :]         # [B, L]
        index = (rows[None] * heads + on_device(self._heads, device)[:, None, None]).reshape(-1)   # [H, B, L]
        q, k, v = (t.reshape(-1, t.shape[3]).index_select(0, index).view(heads, batch, tokens, t.shape[3])
                   for t in (query, key, value))
        outputs, start = [], 0
        for kernel, size in zip(self._kernels, self._sizes):       # a few patterns, not heads
            part = [t[start:start + size].view(size * batch, 1, tokens, t.shape[3]) for t in (q, k, v)]
            outputs.append(kernel(*part).view(size, batch, tokens, value.shape[3]))
            start += size
        out = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        result = value.new_zeros if tokens < seq_len else value.new_empty
        return result(batch * seq_len * heads, value.shape[3]).index_copy_(0, index, out.reshape(-1, value.shape[3])) \
            .view(batch, seq_len, heads, value.shape[3])
