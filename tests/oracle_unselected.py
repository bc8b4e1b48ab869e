"""Test oracle for masks that approximate the key blocks a row does not list (PASA / PISA), float64.

Written from the token-level definition, independently of every lowering (no online
softmax, no shared statistics code). For query token ``q`` (row of query block ``i``,
head ``h``, key head ``h // G``), scale ``s``:

    Z = Σ_{t in listed blocks} exp(s q·k_t) + Σ_{j unlisted} |B_j| exp(s q·k̄_j)
    N = Σ_{t in listed blocks} exp(s q·k_t) v_t + Σ_{j unlisted} exp(s q·k̄_j) (ΣV_j + s qᵀ Ĥ_j)
    out = N / Z,  lse = log Z

with ``k̄_j`` the mean key of block ``j``, ``ΣV_j`` its value sum, and ``Ĥ_j`` 0 ("zeroth"),
``|B_j| H / T`` ("global-first-order") or ``|B_j| H_g / T_g`` ("grouped-first-order", groups of
``group_blocks`` consecutive key blocks), where ``H_g = Σ_{j in g} Σ_{t in B_j} (k_t - k̄_j) v_tᵀ``
(outer products, token by token) and ``T_g`` the tokens of the group. All exponents are taken
relative to the row's largest term, so nothing overflows. The sums over ``j unlisted`` take only
those blocks: a listed block adds no term, not a zero weight times its statistics (a key with an
infinite component makes its group's ``H_g`` NaN; a row that lists the whole group stays finite).
"""

from __future__ import annotations

import numpy as np

from oracle import block_lists, dense_attention, expand_to_tokens


def block_terms(keys: np.ndarray, values: np.ndarray, kv_offsets: np.ndarray, kind: str,
                group_blocks: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(k̄ [NB, D], ΣV [NB, D], Ĥ [NB, D, D]) of one key head, from the tokens."""
    num_blocks, dim = len(kv_offsets) - 1, keys.shape[1]
    mean_key = np.zeros((num_blocks, dim))
    value_sum = np.zeros((num_blocks, dim))
    h_block = np.zeros((num_blocks, dim, dim))
    for j in range(num_blocks):
        tokens = range(kv_offsets[j], kv_offsets[j + 1])
        mean_key[j] = sum(keys[t] for t in tokens) / len(tokens)
        value_sum[j] = sum(values[t] for t in tokens)
        for t in tokens:
            h_block[j] += np.outer(keys[t] - mean_key[j], values[t])
    h_hat = np.zeros_like(h_block)
    if kind in ("global-first-order", "grouped-first-order"):
        size = num_blocks if kind == "global-first-order" else group_blocks
        for j in range(num_blocks):
            members = range((j // size) * size, min(num_blocks, (j // size + 1) * size))
            group_tokens = sum(kv_offsets[m + 1] - kv_offsets[m] for m in members)
            h_hat[j] = (kv_offsets[j + 1] - kv_offsets[j]) * sum(h_block[m] for m in members) / group_tokens
    return mean_key, value_sum, h_hat


def approximated_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask, scale: float
                           ) -> tuple[np.ndarray, np.ndarray]:
    """Output ``[B, H, S, D]`` and LSE ``[B, H, S]`` (float64) of ``mask`` with its ``unselected`` kind."""
    kind, group_blocks = mask.unselected.kind, mask.unselected.group_blocks
    tokens = expand_to_tokens(mask)
    if kind == "drop":
        return dense_attention(q, k, v, tokens, scale)
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    batch, heads, q_len, dim = q.shape
    group = heads // k.shape[1]
    offsets = np.asarray(mask.kv_offsets)
    num_blocks = len(offsets) - 1
    sizes = np.diff(offsets).astype(np.float64)
    block_map = np.zeros((heads, len(mask.q_offsets) - 1, num_blocks), dtype=bool)        # [H, MB, NB]
    for h, rows in enumerate(block_lists(mask)):
        for i, listed in enumerate(rows):
            block_map[h, i, listed] = True
    q_block = np.searchsorted(np.asarray(mask.q_offsets), np.arange(q_len), side="right") - 1
    out = np.zeros((batch, heads, q_len, dim))
    lse = np.zeros((batch, heads, q_len))
    for b in range(batch):
        for kv_head in range(k.shape[1]):
            mean_key, value_sum, h_hat = block_terms(k[b, kv_head], v[b, kv_head], offsets, kind, group_blocks)
            for h in range(kv_head * group, (kv_head + 1) * group):
                rows = q[b, h]
                exact = np.where(tokens[h], rows @ k[b, kv_head].T * scale, -np.inf)       # [S, T]
                unlisted = ~block_map[h][q_block]                                           # [S, NB]
                approx = np.where(unlisted, rows @ mean_key.T * scale, -np.inf)             # [S, NB]
                top = np.maximum(exact.max(axis=1), approx.max(axis=1))                     # finite: NB >= 1
                z = np.exp(exact - top[:, None]).sum(axis=1)
                n = np.exp(exact - top[:, None]) @ v[b, kv_head]
                for j in range(num_blocks):
                    w = np.exp(approx[:, j] - top)                                          # 0 where listed
                    z += w * sizes[j]
                    term = w[:, None] * (value_sum[j][None, :] + scale * rows @ h_hat[j])
                    n += np.where(unlisted[:, j, None], term, 0.0)       # a listed block adds no term: not 0 x NaN
                out[b, h] = n / z[:, None]
                lse[b, h] = top + np.log(z)
    return out, lse
