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

The plan is computed with torch ops on the device that will run the kernel (a
98K-token, 12-head mask has millions of tiles: a GPU plans it in about a millisecond),
and on CPU for tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsecore.ir import BlockMask

PROGRAM_FIELDS = ("head", "q_start", "q_end", "full_first", "num_full", "partial_first", "num_partial")


@dataclass(frozen=True)
class TilePlan:
    """Launch metadata, int32 tensors on one device.

    ``programs [P, 7]``: per program, the fields of :data:`PROGRAM_FIELDS`: the query
    head, its query rows ``q_start:q_end`` (at most ``block_m`` of them are computed),
    and its row's full tiles ``full_start[full_first : full_first + num_full]`` and
    partial tiles ``partial_start/partial_end[partial_first : ... + num_partial]``.
    A full tile covers keys ``start : start + block_n``; a partial one
    ``start : partial_end`` (fewer than ``block_n``).
    """

    block_m: int
    block_n: int
    programs: torch.Tensor
    full_start: torch.Tensor
    partial_start: torch.Tensor
    partial_end: torch.Tensor

    @property
    def num_programs(self) -> int:
        return self.programs.shape[0]

    def computed_pairs(self) -> int:
        """Query x key pairs the kernel computes per batch element, padding included."""
        tiles = self.programs[:, 4].sum() + self.programs[:, 6].sum()
        return int(tiles) * self.block_m * self.block_n


def plan_tiles(mask: BlockMask, block_m: int, block_n: int, device: torch.device | str = "cpu") -> TilePlan:
    """The tile plan of ``mask`` for tiles of ``block_m`` x ``block_n``, built on ``device``."""
    device = torch.device(device)
    as_tensor = lambda a: torch.tensor(a, dtype=torch.int64, device=device)  # noqa: E731  (copies: IR arrays are read-only)
    indices, kv_offsets = as_tensor(mask.indices), as_tensor(mask.kv_offsets)
    row_lengths = as_tensor(mask.row_lengths.ravel())
    num_rows = mask.num_heads * mask.num_q_blocks

    # Runs of consecutive key blocks within a row, as token ranges [begin, end).
    row_of_entry = torch.repeat_interleave(torch.arange(num_rows, device=device), row_lengths,
                                           output_size=mask.nnz)
    starts_run = torch.ones(mask.nnz, dtype=torch.bool, device=device)
    starts_run[1:] = (indices[1:] != indices[:-1] + 1) | (row_of_entry[1:] != row_of_entry[:-1])
    run_first = torch.nonzero(starts_run).squeeze(1)
    run_last = torch.cat([run_first[1:] - 1, torch.tensor([mask.nnz - 1], device=device)])[:len(run_first)]
    run_begin = kv_offsets[indices[run_first]]
    run_end = kv_offsets[indices[run_last] + 1]
    run_row = row_of_entry[run_first]

    # Each run: its full tiles from the run's first token, then at most one partial tile.
    full_per_run = (run_end - run_begin) // block_n
    has_partial = (run_end - run_begin) % block_n > 0
    full_run = torch.repeat_interleave(torch.arange(len(run_first), device=device), full_per_run)
    full_in_run = torch.arange(len(full_run), device=device) - torch.repeat_interleave(
        torch.cumsum(full_per_run, 0) - full_per_run, full_per_run)
    full_start = run_begin[full_run] + block_n * full_in_run
    partial_start = (run_begin + block_n * full_per_run)[has_partial]
    partial_end = run_end[has_partial]

    num_full = torch.zeros(num_rows, dtype=torch.int64, device=device).index_add_(0, run_row, full_per_run)
    num_partial = torch.bincount(run_row[has_partial], minlength=num_rows)
    programs = _programs(mask, block_m, num_full, num_partial, device)
    to32 = lambda t: t.to(torch.int32).contiguous()  # noqa: E731
    return TilePlan(block_m, block_n, to32(programs), to32(full_start), to32(partial_start), to32(partial_end))


def _programs(mask: BlockMask, block_m: int, num_full: torch.Tensor, num_partial: torch.Tensor,
              device: torch.device) -> torch.Tensor:
    """One program per (head, query tile), longest rows first."""
    q_offsets = torch.tensor(mask.q_offsets, device=device)
    q_tiles = (q_offsets[1:] - q_offsets[:-1] + block_m - 1) // block_m       # query tiles per IR block
    per_row = q_tiles.repeat(mask.num_heads)
    row = torch.repeat_interleave(torch.arange(len(per_row), device=device), per_row)
    tile_in_block = torch.arange(len(row), device=device) - torch.repeat_interleave(
        torch.cumsum(per_row, 0) - per_row, per_row)
    block = row % mask.num_q_blocks
    full_first = torch.cumsum(num_full, 0) - num_full
    partial_first = torch.cumsum(num_partial, 0) - num_partial
    programs = torch.stack([row // mask.num_q_blocks, q_offsets[block] + block_m * tile_in_block,
                            q_offsets[block + 1], full_first[row], num_full[row], partial_first[row],
                            num_partial[row]], dim=1)
    work = num_full[row] + num_partial[row]
    return programs[torch.argsort(work, descending=True, stable=True)]
