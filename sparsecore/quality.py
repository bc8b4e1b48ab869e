"""How much of dense attention a block mask keeps: recall, relative L2 and cosine, per head.

For each head, with ``P`` the dense softmax and ``S`` the set of (query, key) pairs the
mask keeps:

- ``recall``: the softmax mass kept, ``mean_i sum_{j in S_i} P_ij`` (AdaSpa's Recall,
  arXiv 2502.21079 Eq. 9): 1 for the dense mask.
- ``rel_l2``: ``||O_mask - O_dense||_F / ||O_dense||_F`` over the head's outputs, where
  ``O_mask`` is what the lowerings compute: exact attention restricted to ``S`` (softmax
  renormalized over ``S``, 0 for a query that keeps nothing), and for a mask that approximates
  its unlisted blocks (``mask.unselected``, PASA's default) that approximation merged in, as the
  ``portable`` lowering computes it in ``compute_dtype`` (``recall`` stays the mass of ``S``).
- ``cosine``: cosine similarity of the flattened ``O_mask`` and ``O_dense``.
- ``min_recall``: the smallest per-query recall (the worst-served query).

The computation streams query chunks through all heads, so memory stays at
``max_elements`` scores (plus the inputs) whatever the sequence length; a mask that
approximates its unlisted blocks adds its output for one batch element (``[H, L_q, D]``,
held while that element is measured) and the ``portable`` lowering's working memory. The
time is that of dense attention, so this is for validation, not for the hot path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from sparsecore.ir import BlockMask
from sparsecore.ir.uploads import on_device
from sparsecore.ir.validation import check_int

from .inputs import attention_shape, check_scale


@dataclass(frozen=True)
class Fidelity:
    """Per-head fidelity of a mask against dense attention (float64 numpy ``[H]`` each)."""

    recall: np.ndarray
    rel_l2: np.ndarray
    cosine: np.ndarray
    min_recall: np.ndarray

    def summary(self) -> dict[str, float]:
        """Head means of recall, rel_l2, cosine and the smallest per-query recall."""
        return {"recall": float(self.recall.mean()), "rel_l2": float(self.rel_l2.mean()),
                "cosine": float(self.cosine.mean()), "min_recall": float(self.min_recall.min())}


def attention_fidelity(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockMask, *,
                       scale: float | None = None, max_elements: int = 1 << 22,
                       compute_dtype: torch.dtype = torch.float32) -> Fidelity:
    """Recall, relative L2 and cosine of the masked output against dense attention, per head.

    Args:
        q: ``[B, H, L_q, D]`` or ``[H, L_q, D]``; k, v: ``[B, H_kv, L_kv, D]`` or
            ``[H_kv, L_kv, D]`` with ``H % H_kv == 0`` (query head h reads key head
            ``h // (H // H_kv)``), of one dtype and device (checked by :func:`sparsecore.inputs.attention_shape`).
            Numpy arrays are accepted; inputs that require gradients are read without recording autograd's graph.
        mask: the block mask; its heads and lengths must match q and k.
        scale: softmax scale, default ``1 / sqrt(D)``.
        max_elements: scores held at once (query chunk x heads x keys); bounds memory.
        compute_dtype: float32 (default) or float64.

    Batch elements are pooled: a head's numbers cover all of them.
    """
    return fidelity_of_masks(q, k, v, [mask], scale=scale, max_elements=max_elements,
                             compute_dtype=compute_dtype)[0]


@torch.no_grad()            # inputs may require gradients (a model's activations): nothing here is for autograd
def fidelity_of_masks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masks: Sequence[BlockMask], *,
                      scale: float | None = None, max_elements: int = 1 << 22,
                      compute_dtype: torch.dtype = torch.float32) -> list[Fidelity]:
    """:func:`attention_fidelity` of several masks over one input, sharing the dense pass."""
    q, k, v = (_as_4d(t, name) for t, name in ((q, "q"), (k, "k"), (v, "v")))
    masks = list(masks)
    if not masks or not all(isinstance(m, BlockMask) for m in masks):
        raise TypeError(f"mask: expected sparsecore BlockMasks, got {[type(m).__name__ for m in masks]}")
    shape = attention_shape(q, k, v)
    batch, heads, q_len, head_dim = shape.batch, shape.num_heads, shape.q_len, shape.head_dim
    for mask in masks:
        if (heads, q_len) != (mask.num_heads, mask.q_len) or shape.kv_len != mask.kv_len:
            raise ValueError(f"q, k: expected q [B, {mask.num_heads}, {mask.q_len}, D] and k [B, H_kv, "
                             f"{mask.kv_len}, D] to match the mask, got q {list(q.shape)} and k {list(k.shape)}")
    max_elements = check_int(max_elements, "max_elements", 1)
    if compute_dtype not in (torch.float32, torch.float64):
        raise TypeError(f"compute_dtype: expected torch.float32 or torch.float64, got {compute_dtype!r}")
    scale = check_scale(scale, head_dim)
    group = shape.group
    device = q.device
    plans = [_TokenMap(mask, device) for mask in masks]
    chunk = max(1, max_elements // (heads * k.shape[2]))
    sums = [{name: torch.zeros(heads, dtype=torch.float64, device=device)
             for name in ("recall", "diff2", "ref2", "out2", "dot")} for _ in masks]
    min_recall = [torch.ones(heads, dtype=torch.float64, device=device) for _ in masks]
    for b in range(batch):
        approximated = [_approximated(mask, q[b:b + 1], k[b:b + 1], v[b:b + 1], scale, compute_dtype)
                        for mask in masks]                  # None for drop masks
        keys = k[b].to(compute_dtype).repeat_interleave(group, dim=0).transpose(1, 2)   # [H, D, L_kv]
        values = v[b].to(compute_dtype).repeat_interleave(group, dim=0)
        queries = q[b].to(compute_dtype) * scale
        for start in range(0, q_len, chunk):
            rows = slice(start, min(q_len, start + chunk))
            scores = torch.matmul(queries[:, rows], keys)                               # [H, c, L]
            probs = torch.softmax(scores, dim=-1)
            dense_out = torch.matmul(probs, values)
            dense64 = dense_out.double()
            for m, token_map in enumerate(plans):
                allowed = token_map.rows(rows)
                kept = probs * allowed
                recall = kept.sum(-1)                                                   # [H, c]
                tiny = recall < 1e-30      # kept weights may underflow: redo these rows in log space
                if approximated[m] is not None:
                    out = approximated[m][0, :, rows]
                    if tiny.any():
                        recall[tiny] = _log_space_rows(scores, allowed, values, tiny)[1][tiny]
                else:
                    out = torch.matmul(kept, values) / recall.clamp_min(torch.finfo(compute_dtype).tiny)[..., None]
                    if tiny.any():
                        redone, redone_recall = _log_space_rows(scores, allowed, values, tiny)
                        out[tiny], recall[tiny] = redone[tiny], redone_recall[tiny]
                recall, out = recall.double(), out.double()
                s = sums[m]
                s["recall"] += recall.sum(1)
                min_recall[m] = torch.minimum(min_recall[m], recall.min(1).values)
                s["diff2"] += ((out - dense64) ** 2).sum((1, 2))
                s["ref2"] += (dense64 ** 2).sum((1, 2))
                s["out2"] += (out ** 2).sum((1, 2))
                s["dot"] += (out * dense64).sum((1, 2))
    tiny = np.finfo(np.float64).tiny
    results = []
    for s, low in zip(sums, min_recall):
        s = {name: value.cpu().numpy() for name, value in s.items()}
        results.append(Fidelity(recall=s["recall"] / (batch * q_len),
                                rel_l2=np.sqrt(s["diff2"] / np.maximum(s["ref2"], tiny)),
                                cosine=s["dot"] / np.maximum(np.sqrt(s["out2"] * s["ref2"]), tiny),
                                min_recall=low.cpu().numpy()))
    return results


def _approximated(mask: BlockMask, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  dtype: torch.dtype) -> torch.Tensor | None:
    """The output ``[1, H, L_q, D]`` of one batch element for a mask that approximates its unlisted blocks, by the
    ``portable`` lowering in ``dtype`` (not cached: the user's kernels keep the cache); None for a drop mask."""
    if mask.unselected.kind == "drop":
        return None
    from .kernel import compile
    kernel = compile(mask, device=q.device.type, backend="portable", cache=False)
    return kernel(q.to(dtype), k.to(dtype), v.to(dtype), scale=scale)


class _TokenMap:
    """Expands a mask's block map to float 0/1 token rows ``[H, c, L_kv]`` for a query chunk."""

    def __init__(self, mask: BlockMask, device: torch.device) -> None:
        self.blocks = mask.to(device).to_dense().to(torch.float32)                     # [H, MB, NB]
        self.q_block = on_device(np.repeat(np.arange(mask.num_q_blocks), mask.q_block_sizes), device)
        self.kv_block = on_device(np.repeat(np.arange(mask.num_kv_blocks), mask.kv_block_sizes), device)

    def rows(self, rows: slice) -> torch.Tensor:
        return self.blocks[:, self.q_block[rows]][:, :, self.kv_block]


def _log_space_rows(scores: torch.Tensor, allowed: torch.Tensor, values: torch.Tensor,
                    rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked output ``[H, c, D]`` and recall ``[H, c]`` of the ``rows`` (bool ``[H, c]``) of ``scores [H, c, L]``
    under ``allowed`` (0/1), computed with log-sum-exps in the chunk's own layout (no per-row copy of the values);
    0 elsewhere."""
    dense_lse = torch.logsumexp(scores, dim=-1)
    masked = scores.masked_fill((allowed == 0) | ~rows[..., None], -torch.inf)
    kept_lse = torch.logsumexp(masked, dim=-1)
    shift = torch.where(torch.isfinite(kept_lse), kept_lse, 0.0)
    out = torch.matmul(torch.exp(masked - shift[..., None]), values)               # a row keeping nothing: 0
    return out, torch.exp(kept_lse - dense_lse)


def _as_4d(t, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        try:
            t = torch.as_tensor(np.asarray(t))
        except (TypeError, ValueError) as err:
            raise TypeError(f"{name}: expected a torch tensor or numpy array, got {type(t).__name__} ({err})") from None
    if t.ndim == 3:
        t = t[None]
    if t.ndim != 4 or not t.is_floating_point() or 0 in t.shape:
        raise ValueError(f"{name}: expected a non-empty float tensor [B, heads, length, D] or [heads, length, D], "
                         f"got {t.dtype} of shape {list(t.shape)}")
    return t
