"""Combining attention over two disjoint key sets from each one's output and log-sum-exp.

If ``(out_a, lse_a)`` is softmax attention of a query over key set A and ``(out_b, lse_b)``
over a disjoint set B, attention over A ∪ B is

    lse = log(exp(lse_a) + exp(lse_b))
    out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b

(the split-KV rule of FlashDecoding, and what ring attention does per step), computed around
``m = max(lse_a, lse_b)``: ``w = exp(lse - m)`` each, ``out = (w_a out_a + w_b out_b) / (w_a + w_b)``,
``lse = m + log(w_a + w_b)``. Dividing keeps the weights' sum out of ``lse`` before it is used: at
float32 LSEs near 1e8, ``log 2`` added to ``1e8`` rounds away, and two equal parts weighted by
``exp(lse_x - lse)`` came out doubled. A set with ``lse = -inf`` holds no key and contributes
nothing, whatever its ``out`` holds (ops leave such rows undefined); if both are empty the row is
output 0, LSE -inf.
"""

from __future__ import annotations

import torch


def merge_partials(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                   lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial results; ``out_*`` ``[..., D]``, ``lse_*`` ``[...]`` natural log, in float32 or wider.

    Returns ``(out, lse)`` in the dtype of the inputs.
    """
    if out_a.shape != out_b.shape or lse_a.shape != lse_b.shape or out_a.shape[:-1] != lse_a.shape:
        raise ValueError(f"merge_partials: expected out [..., D] and lse [...] of matching shapes, got out "
                         f"{list(out_a.shape)}, {list(out_b.shape)} and lse {list(lse_a.shape)}, {list(lse_b.shape)}")
    top = torch.maximum(lse_a, lse_b)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))           # NaN stays in the weights
    weight_a, weight_b = torch.exp(lse_a - top), torch.exp(lse_b - top)          # 0 on an empty part
    total = weight_a + weight_b
    some = total != 0                                                            # a NaN total spreads
    out = (_weighted(out_a, lse_a, weight_a) + _weighted(out_b, lse_b, weight_b)) \
        / torch.where(some, total, torch.ones_like(total))[..., None]
    lse = torch.where(some, top + torch.log(torch.where(some, total, torch.ones_like(total))),
                      torch.full_like(total, -torch.inf))
    return out, lse


def _weighted(out: torch.Tensor, lse: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``weight * out``, exactly 0 where ``lse`` is -inf (even if ``out`` is NaN there)."""
    return torch.where(torch.isneginf(lse)[..., None], torch.zeros_like(out), weight[..., None] * out)
