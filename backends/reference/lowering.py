"""NumPy reference lowering, written to be read rather than to be fast.

For every batch element, head and query block it walks the listed key blocks in
order and keeps a running (max, sum, output) triple: the online softmax of
FlashAttention (Dao et al. 2022, Algorithm 1), in float64. A row with no blocks
keeps sum 0 and yields output 0 and LSE -inf, which is the IR's rule.

When the mask approximates the blocks a row does not list (``mask.unselected``, PASA /
PISA), the same walk continues over those blocks: block ``j`` enters the running
triple as one score ``s q·k̄_j`` counted ``|B_j|`` times in the sum, carrying the value
``ΣV_j + s qᵀ Ĥ_j`` (:mod:`.unselected` computes the statistics). Because it goes through
the running maximum like any exact block, the approximated mass is rescaled whenever
the maximum grows. A row then always has mass (every key block is listed or
approximated), so its LSE is finite, also when its list is empty.
"""

from __future__ import annotations

from typing import Hashable

import numpy as np

from sparsecore.capabilities import Capabilities
from sparsecore.ir import BlockMask
from sparsecore.ir.unselected import KINDS
from sparsecore.registry import Backend, Run

from .unselected import BlockSummaries, summarize


class ReferenceBackend(Backend):
    name = "reference"
    capabilities = Capabilities(devices=("reference",), array_type="numpy", dtypes=frozenset({"float32", "float64"}),
                                unselected=frozenset(KINDS))
    install_hint = "needs only numpy"
    lowers_from_host = True

    def unavailable_reason(self, device: str) -> str | None:
        return None

    def lower(self, mask: BlockMask, device: str, options: Hashable) -> Run:
        def run(q, k, v, scale, return_lse):
            out, lse = reference_attention(mask, q, k, v, scale)
            return out.astype(q.dtype), (lse if return_lse else None)
        return run


def reference_attention(mask: BlockMask, q: np.ndarray, k: np.ndarray, v: np.ndarray,
                        scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Block-sparse attention by definition; returns float64 output and float32 LSE."""
    batch, num_heads, q_len, head_dim = q.shape
    group = num_heads // k.shape[1]  # query heads per key head
    approximate = mask.unselected.kind != "drop"
    out = np.zeros((batch, num_heads, q_len, head_dim), dtype=np.float64)
    lse = np.full((batch, num_heads, q_len), -np.inf, dtype=np.float64)
    for b in range(batch):
        summaries: dict[int, BlockSummaries] = {}   # per key head: shared by the query heads of its group
        for h in range(num_heads):
            keys, values = k[b, h // group].astype(np.float64), v[b, h // group].astype(np.float64)
            if approximate and h // group not in summaries:
                summaries[h // group] = summarize(keys, values, mask.kv_offsets, mask.unselected)
            for i in range(mask.num_q_blocks):
                rows = slice(mask.q_offsets[i], mask.q_offsets[i + 1])
                query = q[b, h, rows].astype(np.float64)
                running_max = np.full(query.shape[0], -np.inf)
                running_sum = np.zeros(query.shape[0])
                acc = np.zeros_like(query)
                listed = mask.row(h, i)
                for j in listed:
                    cols = slice(mask.kv_offsets[j], mask.kv_offsets[j + 1])
                    scores = query @ keys[cols].T * scale
                    new_max = np.maximum(running_max, scores.max(axis=1))
                    correction, shift = _rescale(running_max, new_max)
                    weights = np.exp(scores - shift[:, None])
                    running_sum = running_sum * correction + weights.sum(axis=1)
                    acc = acc * correction[:, None] + weights @ values[cols]
                    running_max = new_max
                if approximate:
                    for j in np.setdiff1d(np.arange(mask.num_kv_blocks), listed):
                        s = summaries[h // group]
                        score = query @ s.key_means[j] * scale                       # one score per row
                        new_max = np.maximum(running_max, score)
                        correction, shift = _rescale(running_max, new_max)
                        weight = np.exp(score - shift)
                        value = s.value_sums[j] + (0.0 if s.first_order is None else scale * query @ s.first_order[j])
                        running_sum = running_sum * correction + s.sizes[j] * weight
                        acc = acc * correction[:, None] + weight[:, None] * value
                        running_max = new_max
                if len(listed) or (approximate and len(listed) < mask.num_kv_blocks):   # else empty: 0 / -inf
                    out[b, h, rows] = acc / running_sum[:, None]      # a sum of 0 (every score -inf): NaN, as dense
                    lse[b, h, rows] = running_max + np.log(running_sum)
    return out, lse.astype(np.float32)


def _rescale(running_max: np.ndarray, new_max: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The online softmax's correction of the sums so far and the shift of this block's scores, safe where every
    score so far is -inf (a key of -inf scores has weight 0, as in dense attention: exp(-inf - -inf) would be NaN)."""
    shift = np.where(np.isneginf(new_max), 0.0, new_max)
    return np.exp(running_max - shift), shift
