"""The order in which FA4 reads the keys, so that blocks off the tile grid make few mask tiles.

FA4's block sparsity works on its own key tiles (128 tokens at head dim 128 on SM90); a key tile that a
row keeps only in part is a *mask* tile, where FA4 evaluates the mask per element (:mod:`.fa4_layout`).
On LVSA's frame mask at 6x, where 10.2% of the tiles are mask tiles, FA4 ran at 557 eff TFLOP/s with our
lookup mask_mod and at 623 with one keeping every pair (H200, 2026-12-01, bench/fa4_mask_mod_probe.py;
:mod:`.fa4_mask_mods`). Attention does not depend on the order of the keys, so for blocks that span
tiles with boundaries inside them (1,560-token frames), :func:`key_order` lays every block's whole tiles
on the grid and packs the remainders together: on that mask, mask tiles go from 10.2% of the listed tiles
to 2.0%, the pairs computed from 1.055 to 1.012 times those kept (:func:`.fa4_layout.to_fa4` on CPU),
and the call from 557 to 623 eff TFLOP/s (616 in bench/fa4_check.py's run). The keys and values are
gathered once per call (:class:`.fa4_launch.Fa4Launch`; the call's time beyond FA4's own grew from 0.76 to
1.58 ms at 6x); queries, outputs and LSEs keep their order.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

KEY_ORDER_SHARE = 0.5      # key_order applies where the blocks' whole tiles hold at least this share of the keys


def key_order(mask: Any, tile_n: int) -> np.ndarray | None:
    """The key tokens in the order FA4 should read them (``order[p]``: the token at position ``p``), or None (theirs).

    Where key blocks span tiles but their boundaries fall inside tiles (LVSA's 1,560-token frames on 128-token
    tiles), each kept run of blocks has a mask tile at both ends. In this order every block's whole tiles
    (its first ``size // tile_n * tile_n`` tokens) come first, block after block, on the tile grid, and the
    blocks' remnants (``< tile_n`` tokens each) after them, those listed by most rows first (ties by block):
    remnants that every row keeps (LVSA's anchor frames) then share full tiles, and only tiles holding the
    remnants of blocks the rows disagree on are mask tiles. Offered when some block boundary is off the grid and
    the whole tiles hold at least :data:`KEY_ORDER_SHARE` of the keys; :func:`.fa4_layout.to_fa4` keeps it only
    where it lowers the estimated kernel time by more than the gather costs (rows keeping wide bands of blocks
    can get more mask tiles in this order). For lists on a device, the per-block row counts cost one host read.
    """
    offsets = np.asarray(mask.kv_offsets, dtype=np.int64)
    sizes = np.diff(offsets)
    whole = sizes // tile_n * tile_n
    if not (offsets[1:-1] % tile_n).any() or whole.sum() < KEY_ORDER_SHARE * offsets[-1]:
        return None
    indices = mask.indices
    if isinstance(indices, torch.Tensor):                  # counted on the device, one read (bincount would sync)
        listed = torch.zeros(len(sizes), dtype=torch.int64, device=indices.device).index_add_(
            0, indices.long(), torch.ones_like(indices, dtype=torch.int64)).cpu().numpy()
    else:
        listed = np.bincount(np.asarray(indices, dtype=np.int64), minlength=len(sizes))
    remnant = sizes - whole
    ranked = np.nonzero(remnant)[0]
    ranked = ranked[np.argsort(-listed[ranked], kind="stable")]
    starts = np.concatenate([offsets[:-1], offsets[:-1][ranked] + whole[ranked]])
    lengths = np.concatenate([whole, remnant[ranked]])
    run = np.repeat(np.arange(len(lengths)), lengths)
    return starts[run] + np.arange(int(offsets[-1]), dtype=np.int64) - (np.cumsum(lengths) - lengths)[run]


def key_runs(block_at: np.ndarray, tile_n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The runs of one block inside each key tile, from the block of each key position, in position order:
    ``(tile, block, length)`` int64 arrays of one entry per run."""
    count = len(block_at)
    position = np.arange(count, dtype=np.int64)
    starts = np.ones(count, dtype=bool)
    starts[1:] = (block_at[1:] != block_at[:-1]) | (position[1:] % tile_n == 0)
    run_start = np.nonzero(starts)[0]
    return run_start // tile_n, block_at[run_start].astype(np.int64), np.diff(np.append(run_start, count))
