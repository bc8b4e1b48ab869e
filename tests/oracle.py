"""The test oracle: float64 dense attention under the mask expanded to tokens.

Written independently of every lowering: it expands the IR's lists to a token
mask itself and runs plain softmax attention on it. A row that keeps no key gives
output 0 and LSE -inf (the IR's rule); a key a row does not keep does not enter it,
whatever its key or value holds (a NaN value there leaves the row as it was).
"""

from __future__ import annotations

import numpy as np


def block_lists(mask) -> list[list[np.ndarray]]:
    """Each head's key block ids per query block, read from the raw CSR arrays (not through the mask's views)."""
    host = mask.to_host()
    indptr, indices = np.asarray(host.indptr), np.asarray(host.indices)
    return [[indices[indptr[h, i]:indptr[h, i + 1]] for i in range(indptr.shape[1] - 1)]
            for h in range(indptr.shape[0])]


def expand_to_tokens(mask) -> np.ndarray:
    """bool[H, q_len, kv_len]: True where query token attends to key token."""
    q_offsets, kv_offsets = np.asarray(mask.q_offsets), np.asarray(mask.kv_offsets)
    tokens = np.zeros((mask.num_heads, q_offsets[-1], kv_offsets[-1]), dtype=bool)
    for h, rows in enumerate(block_lists(mask)):
        for i, listed in enumerate(rows):
            for j in listed:
                tokens[h, q_offsets[i]:q_offsets[i + 1], kv_offsets[j]:kv_offsets[j + 1]] = True
    return tokens


def dense_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, tokens: np.ndarray,
                    scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Masked softmax attention in float64; q [B,H,S,D], k/v [B,Hkv,T,D], tokens [H,S,T]."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k = np.repeat(k, group, axis=1)
    v = np.repeat(v, group, axis=1)
    scores = q @ np.swapaxes(k, -1, -2) * scale
    scores = np.where(tokens[None], scores, -np.inf)
    # a row is empty when it lists no key, not when its scores are non-finite: a NaN query or key gives NaN as
    # dense attention does (np.max propagates NaN; an infinite maximum gives inf - inf = NaN in the shift)
    kept = np.broadcast_to(tokens[None].any(axis=-1, keepdims=True), scores.shape[:-1] + (1,))
    with np.errstate(invalid="ignore", over="ignore"):
        row_max = np.where(kept, scores.max(axis=-1, keepdims=True), 0.0)
        shifted = np.where(tokens[None], np.exp(scores - row_max), 0.0)
        total = shifted.sum(axis=-1, keepdims=True)
        probs = np.where(kept, shifted / np.where(kept, total, 1.0), 0.0)
        # a key a row does not list adds nothing to it, not its weight 0 times its value (0 x NaN = NaN): finite
        # values go through one product, the non-finite ones (of the few keys that hold any) only where listed
        finite = np.isfinite(v)
        out = probs @ np.where(finite, v, 0.0)
        held = np.flatnonzero(~finite.all(axis=(0, 1, 3)))                      # keys with a non-finite value
        rest = np.where(finite, 0.0, v)[:, :, None, held]                       # [B, H, 1, K, D]
        out += np.where(tokens[None, :, :, held, None], probs[..., held, None] * rest, 0.0).sum(axis=-2)
        lse = np.where(kept, row_max + np.log(np.where(kept, total, 1.0)), -np.inf)[..., 0]
    return out, lse
