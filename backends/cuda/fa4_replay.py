"""What FA4 computes with a :class:`.fa4_layout.Fa4Layout`, replayed in plain torch on CPU (for tests).

:func:`expand_layout` gives the attended (query, key) pairs of a layout: full tiles whole, mask tiles through
the lookup mask_mod's tables (:mod:`.fa4_mask_mods`), in the keys' own order; tests compare it with the IR's
token mask expanded independently.
"""

from __future__ import annotations

import torch

from .fa4_layout import Fa4Layout


def tile_status(layout: Fa4Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """bool ``[H, QT, NT]`` maps of the full and the mask tiles, rebuilt from the lists (on CPU)."""
    H, QT, NT = layout.num_heads, layout.num_q_tiles, layout.num_kv_tiles
    maps = []
    for kind in ("full", "mask"):
        cnt = getattr(layout, f"{kind}_block_cnt").cpu()[0].long().expand(H, QT)
        idx = getattr(layout, f"{kind}_block_idx").cpu()[0].long()
        idx = idx.expand(H, *idx.shape[1:])
        valid = torch.arange(idx.shape[-1]) < cnt[..., None]
        grid = torch.zeros(H, QT, NT + 1, dtype=torch.bool)
        grid.scatter_(2, torch.where(valid, idx, NT), torch.ones_like(valid))
        maps.append(grid[:, :, :NT])
    return maps[0], maps[1]


def expand_layout(layout: Fa4Layout) -> torch.Tensor:
    """What FA4 computes with these tensors, as bool ``[H, q_len, kv_len]`` (True = attended).

    Full tiles: every pair in bounds. Mask tiles: the pairs the lookup mask_mod keeps,
    ``keep_bits[h, q_block[q], kv_block[k] // 32] >> (kv_block[k] % 32) & 1``. Plain
    torch on CPU, for tests at small sizes.
    """
    q_len, kv_len = layout.q_len, layout.kv_len
    full, partial = tile_status(layout)
    q_tile = torch.arange(q_len) // layout.tile_m
    kv_tile = torch.arange(kv_len) // layout.tile_n
    attended = full[:, q_tile][:, :, kv_tile]
    if layout.needs_mask_mod:
        q_block = layout.q_block_of_token.cpu().long()[:q_len]
        kv_block = layout.kv_block_of_token.cpu().long()[:kv_len]
        words = layout.keep_bits.cpu().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        word = words[:, q_block][:, :, kv_block // 32]                                    # [H, q_len, kv_len]
        kept = ((word >> (kv_block % 32)) & 1).bool()
        attended |= partial[:, q_tile][:, :, kv_tile] & kept
    if layout.kv_order is not None:                            # positions FA4 reads -> the keys' own order
        reordered = torch.empty_like(attended)
        reordered[:, :, layout.kv_order.cpu()] = attended
        attended = reordered
    return attended
