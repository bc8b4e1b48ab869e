"""Attention over two disjoint key sets, from each set's partial result: the split-KV merge.

If ``(out_a, lse_a)`` is softmax attention of a query over key set A and part B holds, over a disjoint set B, the
sum ``exp(lse_b) * mass_b`` of its weights and their weighted sum of values ``exp(lse_b) * out_b`` (normalised
when ``mass_b`` is 1, as a kernel returns it; unnormalised for the approximation of unlisted blocks, whose running
maximum is ``lse_b``), attention over A ∪ B is, around ``m = max(lse_a, lse_b)``:

    w_a = exp(lse_a - m),  w_b = exp(lse_b - m)
    out = (w_a out_a + w_b out_b) / (w_a + w_b mass_b),  lse = m + log(w_a + w_b mass_b)

(FlashDecoding's rule, what ring attention does per step). Dividing keeps ``log mass_b`` and ``log 2`` out of an
LSE before it is used: at float32 LSEs near 1e8 they round away (two equal parts weighted by ``exp(lse_x - lse)``
came out doubled, a row of approximated blocks scaled by up to a block's token count). A part with LSE -inf holds
no key and adds nothing, whatever its output holds (kernels may leave such rows undefined, and a listed block's
non-finite sums times a zero weight would be NaN); both empty give output 0, LSE -inf; a NaN LSE spreads.
Used by the NPU lowering's hybrid schedule, the approximation's torch merge and the diffusers ring.
"""

from __future__ import annotations

import torch


def merge(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor,
          mass_b: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` over both parts: outputs ``[..., D]``, natural-log LSEs ``[...]`` (float32 or wider), ``mass_b``
    ``[...]`` part B's weight sum relative to ``exp(lse_b)`` (None: 1). In the dtype of the inputs."""
    top = torch.maximum(lse_a, lse_b)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))           # NaN stays in the weights
    weight_a, weight_b = torch.exp(lse_a - top), torch.exp(lse_b - top)          # 0 on an empty part
    total = weight_a + (weight_b if mass_b is None else weight_b * mass_b)
    some = total != 0                                                            # a NaN total spreads
    divisor = torch.where(some, total, torch.ones_like(total))
    out = (_weighted(out_a, lse_a, weight_a) + _weighted(out_b, lse_b, weight_b)) / divisor[..., None]
    lse = torch.where(some, top + torch.log(divisor), torch.full_like(total, -torch.inf))
    return out, lse


def _weighted(out: torch.Tensor, lse: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``weight * out``, exactly 0 where ``lse`` is -inf (even if ``out`` is NaN there)."""
    return torch.where(torch.isneginf(lse)[..., None], torch.zeros_like(out), weight[..., None] * out)
