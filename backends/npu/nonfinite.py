"""Keys with a non-finite component in the npu fallback: the (row, key) scores dense attention gives them.

A key holding an infinity or NaN scores +-inf or NaN against a finite query. npu_fusion_attention's documents do not
say what it computes from such a score, so the fallback never hands it one: it scores these few keys itself, from
their non-finite components only (the finite ones cannot change an infinite sum), masks out the pairs whose score is
-inf (weight 0, as in dense attention) and makes the rows with a +inf or NaN score NaN (inf - inf in dense attention).
"""

from __future__ import annotations

import torch

PAIR_ELEMENTS = 1 << 24       # products [keys, G, R, D] scored at a time


def minus_inf_pairs(query: torch.Tensor, keys: torch.Tensor, key_bad: torch.Tensor, key_piece: torch.Tensor,
                    allowed_rows: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For one batch element's gathered ``query [1, H, R, D]`` and ``keys [1, H_kv, L, D]``, the keys ``key_bad
    [H_kv, L]`` to score (non-finite key, finite value), ``key_piece [L]`` and ``allowed_rows [H, R, P]``.

    Returns ``(head, row, key)`` index tensors of the attended pairs whose score is -inf, and bool ``[H, R]``: rows
    attending such a key with a score other than -inf (+inf or NaN). Syncs with the host (inputs with non-finite keys).
    """
    heads, rows, dim = query.shape[1:]
    group = heads // keys.shape[1]
    kv_head, token = key_bad.nonzero(as_tuple=True)
    grouped = query[0].reshape(keys.shape[1], group, rows, dim)
    nan_rows = torch.zeros(heads, rows, dtype=torch.int32, device=query.device)
    found: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    step = max(1, PAIR_ELEMENTS // (group * rows * dim))
    for first in range(0, len(token), step):
        h_kv, j = kv_head[first:first + step], token[first:first + step]
        k = keys[0, h_kv, j]                                                          # [E, D]
        terms = torch.where(torch.isfinite(k)[:, None, None], 0.0, grouped[h_kv].float() * k.float()[:, None, None])
        minus_inf = torch.isneginf(terms.sum(dim=-1) * scale)                        # [E, G, R]
        head = h_kv[:, None] * group + torch.arange(group, device=query.device)       # [E, G]
        attended = allowed_rows[head, :, key_piece[j][:, None]]                       # [E, G, R]
        nan_rows.index_add_(0, head.reshape(-1), (attended & ~minus_inf).reshape(-1, rows).int())
        e, g, r = (attended & minus_inf).nonzero(as_tuple=True)
        found.append((head[e, g], r, j[e]))
    if not found:
        empty = torch.zeros(0, dtype=torch.int64, device=query.device)
        return (empty, empty, empty), nan_rows > 0
    head, row, key = (torch.cat(parts) for parts in zip(*found))
    return (head, row, key), nan_rows > 0
