"""Combining the hybrid schedule's two partial results (the block-sparse op's and the fused op's, over disjoint
key sets) by their log-sum-exps: :func:`sparsecore.partials.merge`, with the shapes checked."""

from __future__ import annotations

import torch

from sparsecore.partials import merge


def merge_partials(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                   lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial results; ``out_*`` ``[..., D]``, ``lse_*`` ``[...]`` natural log, in float32 or wider.

    Returns ``(out, lse)`` in the dtype of the inputs.
    """
    if out_a.shape != out_b.shape or lse_a.shape != lse_b.shape or out_a.shape[:-1] != lse_a.shape:
        raise ValueError(f"merge_partials: expected out [..., D] and lse [...] of matching shapes, got out "
                         f"{list(out_a.shape)}, {list(out_b.shape)} and lse {list(lse_a.shape)}, {list(lse_b.shape)}")
    return merge(out_a, lse_a, out_b, lse_b)
