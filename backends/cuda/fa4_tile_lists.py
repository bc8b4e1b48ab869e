"""FA4's key-tile lists of a mask off its tile grid, from the IR's lists without block or tile maps on CUDA.

The general path of :func:`.fa4_layout.to_fa4` classifies every (head, query tile, key tile) as full, mask or
unlisted. As torch ops (:func:`dense_tile_lists`) it builds the block map ``[H, MB, NB]``, each row's coverage of
every key tile and the tile map ``[H, QT, NT]``, a few bytes an element each: on the joint video + text masks AdaSpa
plans for CogVideoX 1.5 at 2x (48 heads, 1,343 blocks of 64 tokens) that took 38.9 ms (27.3 ms of GPU time) and
3.8 GiB of transients on an H200 for a mask new at every call (bench/fa4_conversion_probe.py, 2026-12-04). On CUDA
the classification runs instead in :mod:`.fa4_tile_lists_kernel` (:func:`tile_lists`), one program per (query
tile, head) reading the rows' blocks from the packed block map ``keep_bits`` (which the lookup mask_mod needs
anyway), in two passes: counts per key range, one host read that sizes the lists, then the lists. The torch path
stays the definition on other devices (and for the tests' comparison); both list the same tiles, and both list one
head for all where every head's IR lists are the same (``alike``, decided by the caller).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
import torch

from sparsecore.launch_device import on_device

from . import interpreter
from .fa4_key_ranges import widths_from_tiles

BLOCK = 128                 # key tiles a program classifies at once
RUN_STEP = 2                # runs of blocks whose lookups the kernel unrolls in one step of its loop (H200: best)


class TileLists(NamedTuple):
    """What a layout takes from its classification: counts ``[H', QT]`` and lists ``[1, H', QT, W]`` (int32; ``H'``
    is 1 where every head's lists are alike), totals, and the host read's extra values."""
    full_cnt: torch.Tensor
    mask_cnt: torch.Tensor
    full_idx: torch.Tensor
    mask_idx: torch.Tensor
    num_full: int
    num_mask: int
    any_empty: bool
    kept_pairs: int
    widths: tuple[int, ...] | None
    num_full_movable: int                # of the tiles, those in key tiles a key order may change
    num_mask_movable: int
    movable_kept_pairs: int              # the pairs kept on those key tiles' keys (from ``extra``)


class HostRead:
    """The one host read of a conversion: ``read(values)`` reads the device tensor ``values()`` makes (a wait for
    the device's queue), or returns what an earlier conversion of the same lists read under ``key`` in ``memo``
    (:func:`sparsecore.ir.host_facts.host_reads`: a held mask brought back for each call reads once), or else
    ``known``, values that stand for the read (bounds the caller knows), without calling ``values``."""

    def __init__(self, memo: dict, key: tuple, known: tuple[int, ...] | None = None) -> None:
        self.memo, self.key, self.known = memo, key, known

    def __call__(self, values: Callable[[], torch.Tensor]) -> tuple[int, ...]:
        found = self.memo.get(self.key, self.known)
        if found is None:
            found = self.memo[self.key] = tuple(values().tolist())
        return found


def runs_on_triton(device: torch.device) -> bool:
    """Whether the classification runs in the Triton kernel here: on CUDA, or on CPU inside the interpreter's
    emulation (:func:`.interpreter.emulating`, as the tests run it)."""
    return device.type == "cuda" or (interpreter.active() and interpreter.interpreting())


def bit_words(num_kv_blocks: int) -> int:
    """Words of a row of the packed block map: ``2 * ceil(NB / 64)`` (an even count keeps the last dim the only one
    of unit stride, which FA4's aux-tensor import wants unambiguous)."""
    return 2 * -(-num_kv_blocks // 64)


def keep_bits(row_of_entry: torch.Tensor, indices: torch.Tensor, num_rows: int, num_kv_blocks: int) -> torch.Tensor:
    """The block map bit-packed from the IR's entries (``row_of_entry``, ``indices``: row and key block of each):
    int32 ``[num_rows, NW]`` (:func:`bit_words`), bit ``j % 32`` of word ``j // 32`` set when the row keeps key
    block ``j`` (bit 31 is the int32 sign: the words are the uint32 patterns). A row's blocks are unique (the IR's
    invariant), so adding their bits is OR-ing them, and no sum leaves int32."""
    words = bit_words(num_kv_blocks)
    blocks = indices.long()
    bit = blocks % 32
    values = ((1 << bit) - ((bit == 31).long() << 32)).to(torch.int32)      # on the device: no host copy, no wait
    flat = torch.zeros(num_rows * words, dtype=torch.int32, device=indices.device)
    flat.index_add_(0, row_of_entry.long() * words + blocks // 32, values)
    return flat.view(num_rows, words)


def tile_lists(bits: torch.Tensor, dev: dict[str, torch.Tensor], num_q_tiles: int, num_kv_tiles: int,
               edges: list[int], most_runs: int, extra: Callable[[], torch.Tensor], read: HostRead,
               check_size: Callable[[str, tuple[int, ...]], None]) -> TileLists:
    """Classify on the GPU: ``bits`` int32 ``[H, MB, NW]``; ``dev``: the conversion's uploaded tables (``rows``
    ``[rmax, QT]``, ``run_start`` ``[NT + 1]``, ``run_block``, ``run_length``, ``width``, ``edges_padded``,
    ``movable``); ``most_runs``: the most runs of blocks in one key tile (:func:`host_tables`); ``extra``: makes int64
    ``[4]`` on the device (any row empty, every head's IR lists alike, kept pairs, kept pairs on movable key tiles),
    read with the counts in the one host read, ``read``, which may know them already; ``check_size(name, shape)``
    refuses lists too large to build, once their widths are read."""
    from .fa4_tile_lists_kernel import fa4_tile_lists_kernel
    heads, num_rows, words = bits.shape
    rows_per_tile = dev["rows"].shape[0]
    parts = len(dev["edges_padded"]) - 1
    tables = (dev["rows"], dev["run_start"], dev["run_block"], dev["run_length"], dev["width"], dev["edges_padded"],
              dev["movable"])
    sizes = (num_q_tiles, num_kv_tiles, num_rows, words)
    loops = dict(rows_per_tile=rows_per_tile, most_runs=most_runs, PARTS=parts, BLOCK=BLOCK, RUN_STEP=RUN_STEP)
    # zeros, not empty: a launch that only compiles (tests/test_triton_targets.py) leaves them as they are
    counts = torch.zeros(heads, num_q_tiles, 2, parts, dtype=torch.int32, device=bits.device)
    moved = torch.zeros(heads, num_q_tiles, 2, dtype=torch.int32, device=bits.device)
    with on_device(bits.device):
        fa4_tile_lists_kernel[(num_q_tiles, heads)](bits, *tables, counts, moved, counts, counts, *sizes, 1, 1,
                                                    WRITE=False, **loops)
    full_cnt, mask_cnt = (c.contiguous() for c in counts.sum(-1, dtype=torch.int32).unbind(2))   # FA4: unit stride
    ranges = len(edges) - 1

    def stats() -> torch.Tensor:
        parts = [full_cnt.max().long(), mask_cnt.max().long(), full_cnt.sum(dtype=torch.int64),
                 mask_cnt.sum(dtype=torch.int64), extra(), moved.sum(dim=(0, 1), dtype=torch.int64)]
        if ranges > 1:
            parts.append(counts[..., :ranges].amax(dim=(0, 1)).reshape(-1).long())   # full per range, then mask
        return torch.cat([s.reshape(-1) for s in parts])

    values = read(stats)                                                            # the one host read
    longest_full, longest_mask, num_full, num_mask, any_empty, alike, kept, kept_moved, full_moved, mask_moved = \
        values[:10]
    widths = tuple(int(w) for w in values[10:]) or None
    if alike and heads > 1:              # every head's IR lists are the same: FA4 broadcasts one head's
        heads, full_cnt, mask_cnt = 1, full_cnt[:1], mask_cnt[:1]
    full_width, mask_width = max(int(longest_full), 1), max(int(longest_mask), 1)
    for name, width in (("full", full_width), ("mask", mask_width)):
        check_size(f"{name} tile lists [heads, query tiles, longest list]", (heads, num_q_tiles, width))
    full_idx = torch.zeros(heads, num_q_tiles, full_width, dtype=torch.int32, device=bits.device)
    mask_idx = torch.zeros(heads, num_q_tiles, mask_width, dtype=torch.int32, device=bits.device)
    with on_device(bits.device):
        fa4_tile_lists_kernel[(num_q_tiles, heads)](bits, *tables, counts, moved, full_idx, mask_idx, *sizes,
                                                    full_width, mask_width, WRITE=True, **loops)
    return TileLists(full_cnt, mask_cnt, full_idx[None], mask_idx[None], int(num_full), int(num_mask),
                     bool(any_empty), int(kept), widths, int(full_moved), int(mask_moved), int(kept_moved))


def host_tables(run_tile: np.ndarray, num_kv_tiles: int, edges: list[int]) -> tuple[dict[str, np.ndarray], int]:
    """The kernel's host tables beyond the conversion's own: each key tile's first run (``run_start`` ``[NT + 1]``,
    runs in key-position order) and the key-range edges padded to a power of two of ranges with empty ones; and
    the most runs in one tile."""
    run_start = np.searchsorted(run_tile, np.arange(num_kv_tiles + 1, dtype=np.int64))
    parts = 1 << (len(edges) - 2).bit_length()
    padded = np.array(list(edges) + [num_kv_tiles] * (parts + 1 - len(edges)), dtype=np.int64)
    return {"run_start": run_start, "edges_padded": padded}, int(np.diff(run_start).max(initial=1))


def dense_tile_lists(row_of_entry: torch.Tensor, indices: torch.Tensor, dev: dict[str, torch.Tensor],
                     sizes: tuple[int, int, int, int, int], edges: list[int], extra: Callable[[], torch.Tensor],
                     read: HostRead) -> TileLists:
    """The classification as torch ops through the block map ``[H, MB, NB]``, each row's coverage of the key tiles
    and the tile map ``[H, QT, NT]`` (off CUDA; :func:`tile_lists` on it), with the one host read (``extra`` and
    ``read`` as :func:`tile_lists` takes them)."""
    H, MB, NB, QT, NT = sizes
    device = indices.device
    keep = torch.zeros(H * MB * NB, dtype=torch.bool, device=device)
    keep[row_of_entry * NB + indices] = True
    keep = keep.view(H, MB, NB)

    # Key side: kept key tokens of each row in each key tile.
    runs = keep.view(H * MB, NB)[:, dev["run_block"]] * dev["run_length"].to(torch.int32)   # [H*MB, runs]
    del keep
    cover = torch.zeros(H * MB, NT, dtype=torch.int32, device=device).index_add_(1, dev["run_tile"], runs)
    del runs
    row_full = (cover == dev["width"].to(torch.int32)).view(H, MB, NT)
    row_any = (cover > 0).view(H, MB, NT)
    del cover

    # Query side: a tile is full if every row overlapping it is, listed if any row is.
    full = torch.ones(H, QT, NT, dtype=torch.bool, device=device)
    listed = torch.zeros(H, QT, NT, dtype=torch.bool, device=device)
    for c in range(dev["rows"].shape[0]):
        full &= row_full[:, dev["rows"][c], :]
        listed |= row_any[:, dev["rows"][c], :]
    del row_full, row_any
    partial = listed & ~full

    full_cnt = full.sum(-1, dtype=torch.int32)                                            # [H, QT]
    mask_cnt = partial.sum(-1, dtype=torch.int32)
    def stats() -> torch.Tensor:
        movable = dev["movable"].bool()
        found = torch.cat([torch.stack([full_cnt.max().long(), mask_cnt.max().long(), full_cnt.sum(dtype=torch.int64),
                                        mask_cnt.sum(dtype=torch.int64)]), extra(),
                           torch.stack([(full & movable).sum(), (partial & movable).sum()])])
        return torch.cat([found, widths_from_tiles(full, partial, edges)]) if len(edges) > 2 else found

    values = read(stats)                                                            # the one host read
    max_full, max_mask, num_full, num_mask, any_empty, alike, kept, kept_moved, full_moved, mask_moved = values[:10]
    widths = tuple(int(w) for w in values[10:]) or None
    if alike:               # every head's IR lists are the same (LVSA): FA4 broadcasts one head's
        full, partial, full_cnt, mask_cnt = full[:1], partial[:1], full_cnt[:1], mask_cnt[:1]
    return TileLists(full_cnt, mask_cnt, packed_lists(full, max_full), packed_lists(partial, max_mask),
                     int(num_full), int(num_mask), bool(any_empty), int(kept), widths, int(full_moved),
                     int(mask_moved), int(kept_moved))


def packed_lists(flags: torch.Tensor, width: int) -> torch.Tensor:
    """Ascending column ids of the set flags of each row, packed left: int32 ``[1, H, QT, max(width, 1)]``."""
    H, QT, NT = flags.shape
    width = max(int(width), 1)
    ctype = torch.int16 if NT < (1 << 15) else torch.int32
    running = flags.reshape(H * QT, NT).cumsum(-1, dtype=ctype)                            # non-decreasing
    wanted = torch.arange(1, width + 1, dtype=ctype, device=flags.device).expand(H * QT, width).contiguous()
    ids = torch.searchsorted(running, wanted)                                              # first column reaching k
    ids = torch.where(ids < NT, ids, torch.zeros_like(ids))                                # past the count: unused
    return ids.to(torch.int32).view(1, H, QT, width)
