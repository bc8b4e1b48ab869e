"""Combining attention over two disjoint key sets from each one's output and log-sum-exp.

If ``(out_a, lse_a)`` is softmax attention of a query over key set A and ``(out_b, lse_b)``
over a disjoint set B, attention over A ∪ B is

    lse = log(exp(lse_a) + exp(lse_b))
    out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b

(the split-KV rule of FlashDecoding, and what ring attention does per step). A set with
``lse = -inf`` holds no key and contributes nothing, whatever its ``out`` holds (ops leave
such rows undefined); if both are empty the row is output 0, LSE -inf.
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
    lse = torch.logaddexp(lse_a, lse_b)                     # -inf only when both are -inf
    base = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    out = _weighted(out_a, lse_a, base) + _weighted(out_b, lse_b, base)
    return out, lse


def _weighted(out: torch.Tensor, lse: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``exp(lse - base) * out``, exactly 0 where ``lse`` is -inf (even if ``out`` is NaN there)."""
    weight = torch.exp(lse - base)[..., None]
    return torch.where(torch.isneginf(lse)[..., None], torch.zeros_like(out), weight * out)
