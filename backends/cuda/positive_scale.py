"""Scales FlashAttention-4 and FlashInfer compute correctly: positive ones; others are given to them as the same
scores.

On the H200 (2026-12-02) both gave NaN at scale -20; at scale 0 FA4 gave NaN and FlashInfer an output 0.30
(relative L2) from dense attention's, as if it took another scale. FA4's SM90 forward (``Softmax.online_softmax``
in flash_attn/cute/softmax.py) keeps an unscaled row maximum and multiplies by ``softmax_scale * log2(e)`` after
masking. With a negative scale that maximum is the row's smallest scaled score, so ``exp2`` overflows; with a zero
scale a masked-out score, -inf, times 0 is NaN. ``q * s == (-q) * (-s)`` exactly (negation is exact in every float
format), and ``q * 0`` at scale 1 gives the scores ``0`` (NaN where ``q`` is not finite, as ``q * 0`` in dense
attention), so both run as positive scales.
"""

from __future__ import annotations

import torch


def positive_scale(q: torch.Tensor, scale: float) -> tuple[torch.Tensor, float]:
    """``(q, scale)`` unchanged for a positive scale, else inputs with the same scores at a positive one."""
    if scale > 0:
        return q, scale
    return (-q, -scale) if scale < 0 else (q * 0, run_scale(scale))


def run_scale(scale: float) -> float:
    """The positive scale a call at ``scale`` runs with (:func:`positive_scale`): what a plan is made for."""
    return scale if scale > 0 else (-scale if scale < 0 else 1.0)
