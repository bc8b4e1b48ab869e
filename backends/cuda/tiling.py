"""Retile a BlockMask onto a kernel's fixed tiles: the launch metadata of the Triton lowering.

The kernel's tile (``block_m`` queries x ``block_n`` keys) is its own choice, not the
IR's block size. Queries: each IR query block is cut into tiles of ``block_m`` rows
that never straddle two blocks (rows of one tile share one key list); a block's last
tile may be short and the kernel masks its extra rows. Keys: the kept key blocks of a
row are merged into runs of consecutive blocks, and each run is cut into tiles of
``block_n`` keys from its first token; only a run's last tile can be partial, and only
partial tiles pay for an element mask. Full and partial tiles are kept in separate
lists, each in row order, so no sort is needed.

Programs are ordered by descending work (longest-processing-time first), so the rows
of unequal length that head-adaptive masks produce finish together.

When the key blocks are the tiles (every block but a shorter last one holds ``block_n``
keys: AdaSpa's and PASA's 64-token blocks on 64-key tiles), the full tiles of a row are its
listed blocks: the schedule then points into the mask's own ``indices`` (``full_in_blocks``:
the kernel reads block ids and multiplies by ``block_n``), and the only partial tile is the
last block, so no list of the size of ``nnz`` is built or kept.

The schedule is computed with torch ops on the device that holds the mask's lists (a
98K-token, 12-head mask has millions of tiles: a GPU builds it in about a millisecond),
and on CPU for tests. The number of tiles depends on the lists' values; the tile lists are
sized by bounds that follow from the host block boundaries and ``nnz`` instead, so
scheduling reads nothing back to the host (a new mask of a known shape waits for nothing).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sparsecore.ir import BlockMask
from sparsecore.ir.csr import row_of_entry
from sparsecore.ir.uploads import queued

PROGRAM_FIELDS = ("head", "q_start", "q_end", "full_first", "num_full", "partial_first", "num_partial")


@dataclass(frozen=True)
class TileSchedule:
    """Launch metadata, int32 tensors on one device.

    ``programs [P, 7]``: per program, the fields of :data:`PROGRAM_FIELDS`: the query
    head, its query rows ``q_start:q_end`` (at most ``block_m`` of them are computed),
    and its row's full tiles ``full_start[full_first : full_first + num_full]`` and
    partial tiles ``partial_start/partial_end[partial_first : ... + num_partial]``.
    A full tile covers keys ``start : start + block_n``; a partial one
    ``start : partial_end`` (fewer than ``block_n``); with ``full_in_blocks`` a full tile covers
    keys ``id * block_n : (id + 1) * block_n`` of the block id at ``full_start[t]``. The lists are
    sized by upper bounds: slots no program's range reaches hold arbitrary values.
    """

    block_m: int
    block_n: int
    programs: torch.Tensor
    full_start: torch.Tensor
    partial_start: torch.Tensor
    partial_end: torch.Tensor
    full_in_blocks: bool = False        # full_start holds key block ids: a tile starts at id * block_n

    @property
    def num_programs(self) -> int:
        return self.programs.shape[0]


def schedule_tiles(mask: BlockMask, block_m: int, block_n: int) -> TileSchedule:
    """The tile schedule of ``mask`` (lists on the device that will run it) for tiles of ``block_m`` x ``block_n``."""
    if mask.on_host:
        raise ValueError("mask: schedule_tiles needs the lists on the run device (mask.to(device)), got a host mask")
    if _blocks_are_tiles(mask, block_n):
        return _schedule_blocks(mask, block_m, block_n)
    device = mask.device
    indices = mask.indices.long()
    kv_offsets = queued(mask.kv_offsets, device)
    nnz = mask.nnz

    # Runs of consecutive key blocks within a row, as token ranges [begin, end), in arrays of
    # nnz slots (an upper bound on the number of runs) so nothing waits for a count.
    row = row_of_entry(mask.indptr, nnz)
    starts_run = torch.ones(nnz, dtype=torch.bool, device=device)
    starts_run[1:] = (indices[1:] != indices[:-1] + 1) | (row[1:] != row[:-1])
    run_id = torch.cumsum(starts_run, 0) - 1
    slots = torch.zeros(nnz, dtype=torch.int64, device=device)
    run_begin = slots.scatter_reduce(0, run_id, kv_offsets[indices], "amin", include_self=False)
    run_end = slots.scatter_reduce(0, run_id, kv_offsets[indices + 1], "amax", include_self=False)
    is_run = torch.arange(nnz, device=device) <= (run_id[-1] if nnz else -1)
    full_per_run = torch.where(is_run, (run_end - run_begin) // block_n, 0)
    has_partial = is_run & ((run_end - run_begin) % block_n > 0)

    # Tile lists sized by host bounds (a run of blocks has at most the sum of their full tiles, and
    # at most one partial tile): slots past the programs' ranges are never read, and no count is read.
    max_full = _max_full_tiles(mask, block_n)
    last_full = torch.cumsum(full_per_run, 0)                                   # one past each run's last full tile
    full_slot = torch.arange(max_full, device=device)
    full_run = torch.searchsorted(last_full, full_slot, right=True).clamp_(max=nnz - 1)
    full_start = run_begin[full_run] + block_n * (full_slot - (last_full - full_per_run)[full_run])
    max_partial = _max_partial_tiles(mask, block_n)
    partial_slot = torch.where(has_partial, torch.cumsum(has_partial, 0) - 1, max_partial)
    partial_start = torch.zeros(max_partial + 1, dtype=torch.int64, device=device).scatter_(
        0, partial_slot, run_begin + block_n * full_per_run)
    partial_end = torch.zeros(max_partial + 1, dtype=torch.int64, device=device).scatter_(0, partial_slot, run_end)

    # Per row, its runs are consecutive (a row's first entry starts one): prefix sums over runs, read at each row's
    # first run, count its tiles with no atomics (an index_add over the nnz slots sent every slot past the last run
    # to row 0: 4.5 M colliding adds on CogVideoX 1.5's 2x joint mask).
    rows_start = torch.cat([mask.indptr[:, :-1].reshape(-1), mask.indptr[-1:, -1]]).long()      # [num_rows + 1]
    first_run = torch.cat([run_id, run_id[-1:] + 1 if nnz else run_id.new_zeros(1)])[rows_start]
    zero = torch.zeros(1, dtype=torch.int64, device=device)
    full_before, partial_before = (torch.cat([zero, c])[first_run] for c in (last_full, torch.cumsum(has_partial, 0)))
    num_full, num_partial = full_before.diff(), partial_before.diff()
    programs = _programs(mask, block_m, num_full, num_partial, full_before[:-1], partial_before[:-1])
    to32 = lambda t: t.to(torch.int32).contiguous()  # noqa: E731
    return TileSchedule(block_m, block_n, to32(programs), to32(full_start), to32(partial_start), to32(partial_end))


def _max_full_tiles(mask: BlockMask, block_n: int) -> int:
    """A host bound on the full tiles: an entry has at most ``ceil(size / block_n)`` of its block, and a row lists a
    block once, so at most one entry a row takes the largest block's tiles, as many the next largest's, and so on
    until ``nnz`` (one block far larger than the others is charged once a row, not to every entry)."""
    tiles = np.sort(-(-np.diff(mask.kv_offsets) // block_n))[::-1]
    rows = mask.num_heads * mask.num_q_blocks
    taken = np.clip(mask.nnz - rows * np.arange(len(tiles), dtype=np.int64), 0, rows)      # entries per block, greedy
    return int((tiles * taken).sum())


def _max_partial_tiles(mask: BlockMask, block_n: int) -> int:
    """A host bound on the partial tiles: one per run (``nnz``), but when every key block except the last is a
    whole number of tiles (128-token blocks on 64-key tiles), a run's length is too unless it ends with the last
    block, which a row lists at most once: one per row. (The lists a step's plans keep alive shrink by 2 x nnz.)"""
    whole = not (np.diff(mask.kv_offsets)[:-1] % block_n).any()
    return min(mask.nnz, mask.num_heads * mask.num_q_blocks) if whole else mask.nnz


def _blocks_are_tiles(mask: BlockMask, block_n: int) -> bool:
    """Every key block holds ``block_n`` keys but the last, which holds at most that many."""
    sizes = np.diff(mask.kv_offsets)
    return len(sizes) > 0 and bool((sizes[:-1] == block_n).all()) and 0 < sizes[-1] <= block_n


def _schedule_blocks(mask: BlockMask, block_m: int, block_n: int) -> TileSchedule:
    """The schedule of a mask whose key blocks are the tiles: a row's full tiles are its listed blocks (the short
    last block, listed last in a sorted row, is its one partial tile), read from the mask's ``indices``."""
    device = mask.device
    indptr = mask.indptr.long()
    first, end = indptr[:, :-1].reshape(-1), indptr[:, 1:].reshape(-1)       # each flat row h * MB + i's entries
    counts = end - first
    last = mask.num_kv_blocks - 1
    last_start, kv_len = int(mask.kv_offsets[last]), int(mask.kv_offsets[-1])
    if kv_len - last_start < block_n and mask.nnz:        # a short last block: a row listing it has one partial tile
        final = mask.indices[(end - 1).clamp_(min=0)]
        num_partial = ((counts > 0) & (final == last)).long()
    else:
        num_partial = torch.zeros_like(counts)
    programs = _programs(mask, block_m, counts - num_partial, num_partial, first, torch.zeros_like(counts))
    bound = lambda value: torch.full((1,), value, dtype=torch.int32, device=device)  # noqa: E731
    ids = mask.indices if mask.indices.is_contiguous() else mask.indices.contiguous()       # int32 (device lists)
    return TileSchedule(block_m, block_n, programs.to(torch.int32).contiguous(), ids, bound(last_start),
                        bound(kv_len), full_in_blocks=True)


def _programs(mask: BlockMask, block_m: int, num_full: torch.Tensor, num_partial: torch.Tensor,
              full_first: torch.Tensor, partial_first: torch.Tensor) -> torch.Tensor:
    """One program per (head, query tile), longest rows first; the counts follow from the host offsets."""
    device = num_full.device
    tiles_per_block = -(-mask.q_block_sizes // block_m)                            # host: query tiles per IR block
    tile_block = np.repeat(np.arange(mask.num_q_blocks), tiles_per_block)
    tile_in_block = np.arange(len(tile_block)) - np.repeat(np.cumsum(tiles_per_block) - tiles_per_block,
                                                           tiles_per_block)
    tile_start = queued(mask.q_offsets[tile_block] + block_m * tile_in_block, device)
    tile_end = queued(mask.q_offsets[tile_block + 1], device)
    tile_block = queued(tile_block, device)
    tiles = len(tile_block)
    head = torch.arange(mask.num_heads, device=device).repeat_interleave(tiles)
    row = head * mask.num_q_blocks + tile_block.repeat(mask.num_heads)
    programs = torch.stack([head, tile_start.repeat(mask.num_heads), tile_end.repeat(mask.num_heads),
                            full_first[row], num_full[row], partial_first[row], num_partial[row]], dim=1)
    work = num_full[row] + num_partial[row]
    return programs[torch.argsort(work, descending=True, stable=True)]
