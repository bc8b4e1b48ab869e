"""The block summaries behind the approximation of unlisted key blocks, by definition (float64, one key head).

For key block ``j`` with tokens ``B_j``: the mean key ``k̄_j``, the value sum ``ΣV_j``, the
size ``|B_j|`` and, for the first-order kinds, the matrix ``Ĥ_j`` that stands in for
``H_j = Σ_{t in B_j} (k_t - k̄_j)ᵀ v_t``: ``Ĥ_j = |B_j| H_g / T_g`` where ``H_g`` sums ``H_j``
over the blocks of ``j``'s group and ``T_g`` counts their tokens. ``"global-first-order"``
(PISA) has one group of every block; ``"grouped-first-order"`` (PASA) groups of
``group_blocks`` consecutive blocks (the last one may be shorter). Groups include the
blocks a row lists: the statistics depend on k and v only, not on the rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sparsecore.ir import Unselected


@dataclass(frozen=True)
class BlockSummaries:
    key_means: np.ndarray          # [NB, D]
    value_sums: np.ndarray         # [NB, D]
    sizes: np.ndarray              # [NB]
    first_order: np.ndarray | None   # [NB, D, D]: Ĥ_j (None for "zeroth")


def summarize(keys: np.ndarray, values: np.ndarray, kv_offsets: np.ndarray, unselected: Unselected) -> BlockSummaries:
    """Summaries of one key head's blocks; ``keys``, ``values`` ``[kv_len, D]`` float64."""
    blocks = [slice(start, stop) for start, stop in zip(kv_offsets[:-1], kv_offsets[1:])]
    sizes = np.diff(kv_offsets).astype(np.float64)
    key_means = np.stack([keys[c].mean(axis=0) for c in blocks])
    value_sums = np.stack([values[c].sum(axis=0) for c in blocks])
    if unselected.kind == "zeroth":
        return BlockSummaries(key_means, value_sums, sizes, None)
    per_block = np.stack([(keys[c] - key_means[j]).T @ values[c] for j, c in enumerate(blocks)])   # H_j
    group_blocks = len(blocks) if unselected.kind == "global-first-order" else unselected.group_blocks
    first_order = np.empty_like(per_block)
    for start in range(0, len(blocks), group_blocks):
        group = slice(start, min(len(blocks), start + group_blocks))
        per_token = per_block[group].sum(axis=0) / sizes[group].sum()                          # H_g / T_g
        first_order[group] = sizes[group][:, None, None] * per_token
    return BlockSummaries(key_means, value_sums, sizes, first_order)
