"""FA4's lists of one layout cut into consecutive key-tile ranges, one launch each (``Fa4Options.key_parts``).

A launch over key tiles ``[first, stop)`` reads the keys and values of those tiles only (a view of
``k, v``), so each range's K+V can fit the L2 where a whole head's would not (:func:`.fa4_launch.auto_key_parts`).
Its lists are the whole mask's lists restricted to the range, with tile ids counted from ``first``; every
list stays ascending, so a short last key tile is still taken first. Ranges are cut at tile boundaries,
so the lookup mask_mod's tables serve every range: its key table is read from ``first * tile_n`` on (a
view), the others as they are. The outputs merge by LSE (:mod:`.lse_merge`).

The cut is fixed-size tensor ops over the lists ``[H, QT, W]``; each range's longest list, which sizes its
packed lists, comes with the conversion's own host read where it was asked for these ranges
(:func:`.fa4_layout.to_fa4`'s ``key_parts``), else from one more; no loop over heads, rows or tiles. The range edges and offsets go up
through :func:`sparsecore.ir.uploads.on_device` (cached small uploads).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from sparsecore.ir.uploads import on_device

if TYPE_CHECKING:
    from .fa4_layout import Fa4Layout

ALIGN = 64      # int32 elements (256 bytes) between the starts of two ranges' lists in their shared buffer


@dataclass(frozen=True)
class RangeLists:
    """FA4's block-sparse lists of key tiles ``[first, stop)`` (ids from ``first``), shapes as in :class:`Fa4Layout`."""

    first: int
    stop: int
    mask_block_cnt: torch.Tensor
    mask_block_idx: torch.Tensor
    full_block_cnt: torch.Tensor
    full_block_idx: torch.Tensor


def tile_edges(num_kv_tiles: int, count: int) -> list[int]:
    """Edges of ``count`` ranges of about equal key tiles (at most one range per tile): ``[0, ..., num_kv_tiles]``."""
    count = max(1, min(count, num_kv_tiles))
    return [num_kv_tiles * p // count for p in range(count)] + [num_kv_tiles]


def widths_from_tiles(full: torch.Tensor, partial: torch.Tensor, edges: list[int]) -> torch.Tensor:
    """Each range's longest full list, then each range's longest mask list (int64 ``[2 P]``, on the device), from the
    tile maps ``[H, QT, NT]`` of a conversion, to be read with its one host read."""
    ranges = list(zip(edges[:-1], edges[1:]))
    return torch.stack([flags[..., a:b].sum(-1).amax() for flags in (full, partial) for a, b in ranges]).long()


def widths_from_entries(rows: torch.Tensor, indices: torch.Tensor, num_rows: int, edges: list[int]) -> torch.Tensor:
    """As :func:`widths_from_tiles` for a layout whose lists are the IR's rows (each block one tile): from the
    entries' rows ``rows`` and ids ``indices`` (ascending within a row), whose (row, range) keys then ascend too, so
    a search finds each (row, range)'s entries without atomics. The mask lists of such a layout are empty."""
    parts = len(edges) - 1
    inner = on_device(np.asarray(edges[1:-1], dtype=np.int32), indices.device)
    keys = rows * parts + torch.bucketize(indices, inner, right=True)
    starts = torch.searchsorted(keys, torch.arange(num_rows * parts + 1, device=indices.device))
    longest = (starts[1:] - starts[:-1]).view(num_rows, parts).amax(0)
    return torch.cat([longest, torch.zeros_like(longest)])


def split_lists(layout: "Fa4Layout", edges: list[int]) -> list[RangeLists]:
    """``layout``'s lists cut at key-tile ``edges`` (:func:`tile_edges`); one range: the layout's own tensors. The
    ranges' widths come from the conversion where it sized them for these edges (``key_edges``), else from one
    host read here."""
    if len(edges) == 2:
        return [RangeLists(0, layout.num_kv_tiles, layout.mask_block_cnt, layout.mask_block_idx,
                           layout.full_block_cnt, layout.full_block_idx)]
    parts = len(edges) - 1
    device = layout.full_block_cnt.device
    inner = on_device(np.asarray(edges[1:-1], dtype=np.int32), device)
    cut = {}
    for kind in ("full", "mask"):
        counts = getattr(layout, f"{kind}_block_cnt")
        idx = getattr(layout, f"{kind}_block_idx")
        rows = counts.numel()
        flat = idx.reshape(rows, -1)
        valid = torch.arange(flat.shape[1], device=device) < counts.reshape(rows, 1)
        part = torch.where(valid, torch.bucketize(flat, inner, right=True), parts)        # [rows, W]; parts: unused
        per_part = torch.zeros(rows, parts + 1, dtype=torch.int32, device=device)
        per_part.scatter_add_(1, part, torch.ones_like(part, dtype=torch.int32))
        cut[kind] = (counts.shape, flat, valid, part, per_part[:, :parts])
    if layout.key_edges == tuple(edges) and layout.key_widths is not None:
        widths = [layout.key_widths[:parts], layout.key_widths[parts:]]
    else:
        widths = torch.stack([cut[kind][4].amax(0) for kind in ("full", "mask")]).tolist()   # one host read
    lists = {kind: _pack(*cut[kind], edges, [max(int(w), 1) for w in width])
             for kind, width in zip(("full", "mask"), widths)}
    return [RangeLists(edges[p], edges[p + 1], *lists["mask"][p], *lists["full"][p]) for p in range(parts)]


def _pack(shape: torch.Size, flat: torch.Tensor, valid: torch.Tensor, part: torch.Tensor, per_part: torch.Tensor,
          edges: list[int], widths: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(cnt, idx)`` of each range from the whole lists ``flat [rows, W]``: each entry goes to its range's packed
    list at its place in the row minus the entries of earlier ranges, as its tile id minus the range's first; one
    scatter for all ranges into one buffer (the last slot takes the unused entries)."""
    rows, parts, device = flat.shape[0], per_part.shape[1], flat.device
    starts = [0]
    for w in widths:                                      # each range's lists start 256-byte aligned
        starts.append(starts[-1] + -(-rows * w // ALIGN) * ALIGN)
    total = starts[-1]
    base, width, first = on_device(np.array([starts[:-1], widths, edges[:-1]], dtype=np.int64), device)
    earlier = (torch.cumsum(per_part, 1, dtype=torch.int64) - per_part)                 # [rows, parts]
    slot = part.clamp(max=parts - 1)
    place = torch.arange(flat.shape[1], device=device) - earlier.gather(1, slot)       # place in the range's list
    row = torch.arange(rows, device=device)[:, None]
    target = torch.where(valid, base[slot] + row * width[slot] + place, total)
    buffer = torch.zeros(total + 1, dtype=torch.int32, device=device)
    buffer.scatter_(0, target.reshape(-1), (flat - first[slot]).to(torch.int32).reshape(-1))
    return [(per_part[:, p].reshape(shape).contiguous(), buffer[starts[p]:starts[p] + rows * w].view(*shape, w))
            for p, w in enumerate(widths)]
