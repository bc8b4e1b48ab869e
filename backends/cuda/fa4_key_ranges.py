"""FA4's lists of one layout cut into consecutive key-tile ranges, one launch each (``Fa4Options.key_parts``).

A launch over key tiles ``[first, stop)`` reads the keys and values of those tiles only (a view of
``k, v``), so each range's K+V can fit the L2 where a whole head's would not (:func:`.fa4_launch.auto_key_parts`).
Its lists are the whole mask's lists restricted to the range, with tile ids counted from ``first``; every
list stays ascending, so a short last key tile is still taken first. Ranges are cut at tile boundaries,
so the lookup mask_mod's tables serve every range: its key table is read from ``first * tile_n`` on (a
view), the others as they are. The outputs merge by LSE (:mod:`.lse_merge`).

The cut is fixed-size tensor ops over the lists ``[H, QT, W]``; each range's longest list, which sizes its
packed lists, comes with the conversion's own host read where it was asked for these ranges
(:func:`.fa4_layout.to_fa4`'s ``key_parts``), else from one more; no loop over heads, rows or tiles. The range
edges and offsets go up through :func:`sparsecore.ir.uploads.queued` (small copies that do not wait and are not
kept).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from sparsecore.ir.uploads import queued

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
    empty: bool = False               # no list reaches these tiles


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
    inner = queued(np.asarray(edges[1:-1], dtype=np.int32), indices.device)
    keys = rows * parts + torch.bucketize(indices, inner, right=True)
    starts = torch.searchsorted(keys, torch.arange(num_rows * parts + 1, device=indices.device))
    longest = (starts[1:] - starts[:-1]).view(num_rows, parts).amax(0)
    return torch.cat([longest, torch.zeros_like(longest)])


def split_lists(layout: "Fa4Layout", edges: list[int]) -> list[RangeLists]:
    """``layout``'s lists cut at key-tile ``edges`` (:func:`tile_edges`); one range: the layout's own tensors. The
    ranges' widths come from the conversion where it sized them for these edges (``key_edges``), else from one
    host read here. A range no list reaches is marked ``empty`` (its launch can be skipped)."""
    if len(edges) == 2:
        return [RangeLists(0, layout.num_kv_tiles, layout.mask_block_cnt, layout.mask_block_idx,
                           layout.full_block_cnt, layout.full_block_idx)]
    parts = len(edges) - 1
    if layout.key_edges == tuple(edges) and layout.key_widths is not None:
        widths = [list(layout.key_widths[:parts]), list(layout.key_widths[parts:])]
    else:
        counts = [_range_counts(_entries(layout, kind, edges)[1], parts) for kind in ("full", "mask")]
        widths = torch.stack([c.amax(0) for c in counts]).tolist()                          # one host read
    lists = {kind: _pack(layout, kind, edges, [max(int(w), 1) for w in width])
             for kind, width in zip(("full", "mask"), widths)}
    return [RangeLists(edges[p], edges[p + 1], *lists["mask"][p], *lists["full"][p],
                       empty=widths[0][p] == 0 and widths[1][p] == 0) for p in range(parts)]


def _entries(layout: "Fa4Layout", kind: str, edges: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``kind`` lists as ``[rows, W]`` tile ids and each entry's range (``P`` past a row's count)."""
    counts = getattr(layout, f"{kind}_block_cnt")
    flat = getattr(layout, f"{kind}_block_idx").reshape(counts.numel(), -1)
    inner = queued(np.asarray(edges[1:-1], dtype=np.int32), flat.device)
    valid = torch.arange(flat.shape[1], device=flat.device) < counts.reshape(-1, 1)
    return flat, torch.where(valid, torch.bucketize(flat, inner, right=True), len(edges) - 1)


def _range_counts(part: torch.Tensor, parts: int) -> torch.Tensor:
    """Entries of each row's list in each of ``parts`` ranges (``part`` from :func:`_entries`): int32 ``[rows, P]``."""
    counts = torch.zeros(part.shape[0], parts + 1, dtype=torch.int32, device=part.device)
    return counts.scatter_add_(1, part, torch.ones_like(part, dtype=torch.int32))[:, :-1]


def _pack(layout: "Fa4Layout", kind: str, edges: list[int],
          widths: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(cnt, idx)`` of each range from the whole ``kind`` lists: each entry goes to its range's packed list at its
    place in the row minus the entries of earlier ranges, as its tile id minus the range's first; one scatter for
    all ranges into one buffer (the last slot takes the unused entries, so the rest stays 0)."""
    flat, part = _entries(layout, kind, edges)
    per_part = _range_counts(part, len(edges) - 1)
    shape = getattr(layout, f"{kind}_block_cnt").shape
    rows, parts, device = flat.shape[0], per_part.shape[1], flat.device
    starts = [0]
    for w in widths:                                      # each range's lists start 256-byte aligned
        starts.append(starts[-1] + -(-rows * w // ALIGN) * ALIGN)
    total = starts[-1]
    base, width, first = queued(np.array([starts[:-1], widths, edges[:-1]], dtype=np.int64), device)
    unused = part == parts
    slot = part.clamp_(max=parts - 1)                                                   # part's memory from here
    earlier = torch.cumsum(per_part, 1, dtype=torch.int64) - per_part                  # [rows, parts]
    target = torch.arange(flat.shape[1], device=device) - earlier.gather(1, slot)      # place in the range's list
    target += torch.arange(rows, device=device)[:, None] * width[slot]
    target += base[slot]
    value = (flat - first[slot].to(flat.dtype)).masked_fill_(unused, 0)
    del slot, part
    buffer = torch.zeros(total + 1, dtype=torch.int32, device=device)
    buffer.scatter_(0, target.masked_fill_(unused, total).reshape(-1), value.reshape(-1))
    return [(per_part[:, p].reshape(shape).contiguous(), buffer[starts[p]:starts[p] + rows * w].view(*shape, w))
            for p, w in enumerate(widths)]
