"""Which text tokens of each sample are valid, from the masks HunyuanVideo 1.5 and 1.0 pass their attention."""

from __future__ import annotations

from collections.abc import Callable

import torch


def valid_text(mask: torch.Tensor, batch: int, text: int, layer: int, model: str,
               remedy: Callable[[], str]) -> list[int]:
    """Valid text tokens per sample, checked to come first in each sample's text (the model's order); one host read.

    ``mask``: HunyuanVideo 1.5's text mask ``[B, text]``, or HunyuanVideo 1.0's key mask ``[B, 1, 1, S]`` over the
    whole sequence (its last ``text`` columns are the text's; its forward marks every video token valid). ``layer``,
    ``model`` (its class name) and ``remedy()`` (how to run the input densely) go into the errors.
    """
    keys = mask.ndim == 4 and tuple(mask.shape[:3]) == (batch, 1, 1) and mask.shape[3] >= text
    if not keys and (mask.ndim != 2 or tuple(mask.shape) != (batch, text)):
        raise ValueError(f"attention_mask: expected the text mask [{batch}, {text}] (batch, text tokens) or a "
                         f"key mask [{batch}, 1, 1, S] ending with the text's, got {list(mask.shape)} at layer {layer}")
    valid = (mask[:, 0, 0, mask.shape[3] - text:] if keys else mask).bool()
    counts = valid.sum(dim=1)
    prefix = torch.arange(text, device=valid.device)[None, :] < counts[:, None]
    video = mask[:, 0, 0, :mask.shape[3] - text].bool().all() if keys else valid.new_ones(())
    ordered, video_valid, *result = torch.cat([torch.stack([(prefix == valid).all(), video]), counts]).tolist()
    if not video_valid:
        raise ValueError("attention_mask: expected every video token valid in the key mask [B, 1, 1, S] (the mask "
                         "HunyuanVideoTransformer3DModel.forward builds), got a masked video token; the block-mask "
                         f"IR has no token mask; {remedy()}")
    if not ordered:
        raise ValueError(f"attention_mask: expected each sample's valid text tokens first, then its padding (the "
                         f"order {model}'s pipeline gives), got padding before a valid token; the block-mask IR has "
                         f"one pattern for the whole batch and cannot skip tokens inside the sequence; {remedy()}")
    return result
