"""The block-mask IR as FlashAttention-4's block-sparse tensors, exact for any block boundaries.

FA4 (``flash_attn.cute``, pip ``flash-attn-4``) takes block sparsity on its own tile
grid: per (batch, head, query tile ``t``) a list of *full* key tiles, computed without
any mask, and a list of *mask* key tiles, on which a ``mask_mod`` decides each
(query, key) pair (``BlockSparseTensorsTorch``; see fa4_backend.py for the API facts).
The IR's blocks have any sizes (64/128-token blocks, 1560-token frames, odd text
blocks, short last blocks), so IR blocks and kernel tiles need not line up.

How this module makes it exact: **classification + a lookup mask_mod, no re-layout.**
For a tile pair (query tile ``t``, key tile ``n``) of head ``h`` we count, for every
IR query block (row) overlapping ``t``, the key tokens of ``n`` its row keeps.

- every row overlapping ``t`` keeps all of ``n``'s keys -> a *full* tile (no mask work);
- some row keeps some of them -> a *mask* tile: the ``mask_mod`` looks the pair up as
  ``keep[h, qblock(q), kvblock(k)]`` in three small aux tensors (token -> query block,
  token -> key block, and the IR's block map bit-packed into uint32 words);
- no row keeps any -> the tile is not listed.

Query tiles that straddle two IR query blocks are therefore handled by the same
lookup: their list is the union of both rows' tiles, and where the rows disagree the
tile is a mask tile. Key blocks that span tiles with boundaries inside them (LVSA's
1,560-token frames) would make a mask tile at each end of every kept run; there the keys
are read in another order (:mod:`.fa4_key_order`: each block's whole tiles on the grid,
the remainders packed after them), which on LVSA's 6x frame mask takes the mask tiles
from 10.2% of the listed tiles to 2.0% (counted on CPU), for a gather of k and v per call;
it is kept only where it lowers the estimated kernel time by more than the gather (:func:`tile_cost`).
Padding each block to whole tiles instead would cost on every tile (1560 -> 1664 tokens:
6.7% more rows and keys). Masks whose blocks align with the tiles (uniform 128 blocks on
128 tiles, 64 on 64) get only full tiles and no mask_mod at all: the path measured at
603-641 eff TFLOP/s on an H200. Where every block is exactly one tile (the last may be
shorter), the lists are the IR's rows themselves and are built from them directly
(:func:`_aligned_layout`), without the block and tile maps below.

The tile shape is the kernel's (on SM90 the sparse key block must equal the key tile;
the sparse query block may be a multiple of the query tile). :func:`choose_tile_side`
picks, per side, the candidate tile that minimizes the computed tokens of an isolated
block divided by a per-tile-size efficiency (:data:`SIDE_EFFICIENCY`, a prior until
bench/fa4_check.py measures it): 128 for 128-aligned or large blocks, 64 for 64-token
blocks (AdaSpa), whose 128 x 128 tiles would be mostly mask tiles computing 2-4x the
kept pairs.

Off CUDA this runs as torch ops through the block map, row coverage and tile map, refused above
:data:`DENSE_LIMIT` elements; on CUDA a Triton kernel reads the packed block map instead
(:mod:`.fa4_tile_lists`). No Python loop over heads, rows or blocks; one host read per layout
built, a single ``.tolist()`` that sizes the lists; the tables that follow from the offsets are
built once per geometry (:func:`.fa4_geometry.geometry_tables`); where a key order may pay, two layouts are
built and the cheaper kept (:func:`tile_cost`). ``indptr``/``indices``: numpy or torch, any device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from sparsecore.ir import BlockMask, csr
from sparsecore.ir.csr import row_of_entry
from sparsecore.ir.host_facts import host_reads, row_lengths
from sparsecore.registry import UnsupportedError

from .fa4_geometry import geometry_tables
from .fa4_key_order import key_order
from .fa4_key_ranges import tile_edges, widths_from_entries
from .fa4_tile_lists import HostRead, bit_words, dense_tile_lists, keep_bits, runs_on_triton, tile_lists

DENSE_LIMIT = 1 << 31      # elements of each dense intermediate: block map, row and run coverage, tile map
MASK_TILE_COST = 2.0       # a mask tile's time in full tiles' (LVSA's frame mask, H200, 2026-12-01: 2.1)
GATHER_TILE_COST = 3.6     # gathering k and v for a key order, in full tiles' time per (key tile, head) (same fit)
SM90_TILE_SIDES = (64, 128)
SIDE_EFFICIENCY = {64: 0.8, 128: 1.0, 256: 1.0}  # relative throughput per tile side (prior; measured by bench)


@dataclass(frozen=True)
class Fa4Layout:
    """FA4 block-sparse tensors of one mask for tiles of ``tile_m`` x ``tile_n``, on one device.

    ``mask_block_cnt / full_block_cnt``: int32 ``[1, H, QT]`` (batch broadcast by FA4);
    ``mask_block_idx / full_block_idx``: int32 ``[1, H, QT, W]``, ``W >= 1``, each list
    ascending in its first ``cnt`` entries (the rest is 0 and never read). ``QT =
    ceil(q_len / tile_m)`` query tiles, key tiles ``0 .. ceil(kv_len / tile_n) - 1``. Where every head's IR lists
    are the same (LVSA; :func:`_heads_alike`), their ``H`` is 1 and FA4 broadcasts it (20 -> 1.7 MiB at LVSA's 6x).

    Only when there are mask tiles (``needs_mask_mod``), the aux tensors of the lookup mask_mod: ``q_block_of_token``
    int32 ``[QT * tile_m]`` and ``kv_block_of_token`` int32 ``[NT * tile_n]`` (padded to whole tiles with the block
    of the last position, so padded positions read in bounds), and ``keep_bits`` int32 ``[H, MB, NW]``: bit ``j %
    32`` of word ``j // 32`` is 1 when row (h, i) keeps key block j (pass it to FA4 viewed as uint32; the word count
    is rounded up to even). ``empty_tokens``: bool ``[q_len, H]``, query tokens whose row keeps nothing, or None
    when there are none. ``kv_order``: int32 ``[kv_len]``, the key token at each position FA4 reads
    (:func:`.fa4_key_order.key_order`; keys and values go in gathered so), or None for the keys' own order; key
    tiles, ``kv_block_of_token`` and the lists count positions in that order. ``kept_pairs``: the (query, key)
    pairs the mask keeps, summed over heads (counted by the general conversion; None from the aligned one).
    ``key_edges``: the key-tile ranges :func:`to_fa4` was asked for (``(0, NT)`` for one); ``key_widths``, for
    several: per range the longest full list, then per range the longest mask list (:mod:`.fa4_key_ranges`).
    ``movable_cost``: the general path's :func:`tile_cost` of its key tiles that a key order may change, the most
    any order can save, and ``movable_kept_pairs`` the pairs kept on those tiles' keys (None from the aligned path).
    """

    tile_m: int
    tile_n: int
    num_heads: int
    q_len: int
    kv_len: int
    mask_block_cnt: torch.Tensor
    mask_block_idx: torch.Tensor
    full_block_cnt: torch.Tensor
    full_block_idx: torch.Tensor
    q_block_of_token: torch.Tensor | None
    kv_block_of_token: torch.Tensor | None
    keep_bits: torch.Tensor | None
    empty_tokens: torch.Tensor | None
    num_full_tiles: int
    num_mask_tiles: int
    kv_order: torch.Tensor | None = None
    kept_pairs: int | None = None
    key_edges: tuple[int, ...] | None = None
    key_widths: tuple[int, ...] | None = None
    movable_cost: float | None = None
    movable_kept_pairs: int | None = None

    @property
    def needs_mask_mod(self) -> bool:
        return self.num_mask_tiles > 0

    @property
    def num_q_tiles(self) -> int:
        return -(-self.q_len // self.tile_m)

    @property
    def num_kv_tiles(self) -> int:
        return -(-self.kv_len // self.tile_n)

    def computed_pairs(self) -> int:
        """Query x key pairs the kernel computes per batch element, padding and masked pairs included."""
        return (self.num_full_tiles + self.num_mask_tiles) * self.tile_m * self.tile_n


# --------------------------------------------------------------------------------------------- tile choice
def choose_tile_side(offsets: Any, candidates: Sequence[int] = SM90_TILE_SIDES) -> int:
    """The tile side among ``candidates`` that computes the fewest tokens per kept block, per efficiency.

    Each block is costed as if kept alone: the tiles it touches times the tile side,
    divided by :data:`SIDE_EFFICIENCY`. Ties go to the larger tile.
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    starts, ends = offsets[:-1], offsets[1:]
    best, best_cost = None, None
    for side in sorted(candidates, reverse=True):
        touched = -(-ends // side) - starts // side
        cost = float((touched * side).sum()) / SIDE_EFFICIENCY.get(side, 1.0)
        if best_cost is None or cost < best_cost:
            best, best_cost = side, cost
    return int(best)


# --------------------------------------------------------------------------------------------- conversion
def _check_size(name: str, shape: tuple[int, ...], tile_m: int, tile_n: int) -> None:
    size = int(np.prod(shape, dtype=np.int64))
    if size > DENSE_LIMIT:
        raise UnsupportedError(
            f"fa4: the {name} {list(shape)} has {size:,} elements, over the limit of {DENSE_LIMIT:,} "
            f"for tiles {tile_m}x{tile_n}; expected fewer tiles (larger blocks, fewer kept, a shorter sequence); "
            f"use backend='triton', which takes any block layout")


def to_fa4(mask: Any, tile_m: int, tile_n: int, device: torch.device | str = "cpu",
           reorder_keys: bool = True, key_parts: int = 1) -> Fa4Layout:
    """FA4's block-sparse tensors (and the lookup mask_mod's aux tensors) for ``mask`` on ``device``.

    ``mask`` is a :class:`sparsecore.ir.BlockMask` (or any object with its fields;
    ``indptr``/``indices`` may be torch tensors on any device). Exact for every
    layout the IR allows; see the module docstring. One host sync per layout built: where a key order may pay for
    its gather (:func:`tile_cost`), a second layout in that order is built (plus a read of per-block row counts), the
    cheaper kept. It may pay only where the tiles it can change cost more than the gather plus the fewest tiles their
    keys' kept pairs fill (``movable_kept_pairs``): a key tile inside one block whose width is a whole tile
    (not ``movable``) keeps its status as one of that block's whole tiles in :func:`.fa4_key_order.key_order`'s
    order, which has at least as many of them, and every other tile costs at least its kept pairs over its area.
    ``reorder_keys``: allow :func:`.fa4_key_order.key_order` (False: the keys in their own order). ``key_parts``:
    the key-tile ranges (:func:`.fa4_key_ranges.tile_edges`) whose list widths to read with the layout's host read.
    What a conversion read (and the key order it chose) is kept in the mask's
    :func:`sparsecore.ir.host_facts.host_reads`, shared with its copies: converting one again reads nothing and
    builds one layout. Where every block is one tile and the builder noted that no row is empty and how long rows
    may be (:func:`sparsecore.ir.host_facts.note_row_lengths`), one key range reads nothing even the first time:
    the lists are as wide as that bound, and no head's lists are broadcast.
    """
    device = torch.device(device)
    for name, side in (("tile_m", tile_m), ("tile_n", tile_n)):
        if isinstance(side, (bool, np.bool_)) or not isinstance(side, (int, np.integer)) or side < 1:
            raise ValueError(f"{name}: expected a positive int (a kernel tile side), got {side!r}")
    tile_m, tile_n = int(tile_m), int(tile_n)
    edges = tile_edges(-(-int(mask.kv_offsets[-1]) // tile_n), key_parts)
    memo = host_reads(mask) if isinstance(mask, BlockMask) else {}
    shape = (tile_m, tile_n, tuple(edges))
    if _on_tile_grid(mask.q_offsets, tile_m) and _on_tile_grid(mask.kv_offsets, tile_n):
        bounds = row_lengths(mask) if isinstance(mask, BlockMask) and len(edges) == 2 else None
        known = (bounds[1], 0, 0) if bounds and bounds[0] > 0 else None   # sizes the lists; "not alike" is safe
        return _aligned_layout(mask, tile_m, tile_n, device, edges, HostRead(memo, ("fa4 aligned", *shape), known))
    chosen = ("fa4 key order", *shape)
    if reorder_keys and chosen in memo:                                   # decided at an earlier conversion
        return _general_layout(mask, tile_m, tile_n, device, edges, memo[chosen], memo)
    plain = _general_layout(mask, tile_m, tile_n, device, edges, None, memo)
    gather = GATHER_TILE_COST * plain.num_kv_tiles * plain.num_heads      # key heads <= query heads: an upper bound
    fewest_movable = plain.movable_kept_pairs / (tile_m * tile_n)         # no order spends less on those keys
    may_pay = reorder_keys and plain.num_mask_tiles and fewest_movable + gather < plain.movable_cost
    order = key_order(mask, tile_n) if may_pay else None
    layout = plain
    if order is not None:
        ordered = _general_layout(mask, tile_m, tile_n, device, edges, order, memo)
        layout = ordered if tile_cost(ordered) + gather < tile_cost(plain) else plain
    if reorder_keys:                                                      # int32: 0.75 MB at 188,760 keys
        memo[chosen] = None if layout is plain else order.astype(np.int32)
    return layout


def tile_cost(layout: Fa4Layout) -> float:
    """The kernel time of ``layout`` in full tiles' time: full tiles plus :data:`MASK_TILE_COST` per mask tile.

    Fit on LVSA's frame mask at 6x (H200, 2026-12-01, bench/fa4_mask_mod_probe.py): FA4's call on 4,293,360 full
    and 486,144 mask tiles took 67.51 ms, on 4,487,352 and 94,044 (the same mask, keys reordered) 59.40 ms, 12.7 ns
    a full tile; the reordered call took 1.58 ms beyond FA4's own against 0.76 in the keys' order, so gathering k
    and v (1,475 key tiles x 12 heads) costs about 0.8 ms: :data:`GATHER_TILE_COST` per key tile and head."""
    return layout.num_full_tiles + MASK_TILE_COST * layout.num_mask_tiles


def _general_layout(mask: Any, tile_m: int, tile_n: int, device: torch.device, edges: list[int],
                    kv_order: np.ndarray | None = None, memo: dict | None = None) -> Fa4Layout:
    """:func:`to_fa4` for any block boundaries: every tile classified as the module docstring says, with the keys in
    ``kv_order`` (:func:`.fa4_key_order.key_order`; None: their own order), its host read kept in ``memo``. Every
    size is checked before the tables of that size are built or uploaded."""
    q_off = np.asarray(mask.q_offsets, dtype=np.int64)
    kv_off = np.asarray(mask.kv_offsets, dtype=np.int64)
    H, MB, NB = int(mask.num_heads), len(q_off) - 1, len(kv_off) - 1
    q_len, kv_len = int(q_off[-1]), int(kv_off[-1])
    QT, NT = -(-q_len // tile_m), -(-kv_len // tile_n)
    on_triton = runs_on_triton(device)
    if not on_triton:               # the torch path's maps (the kernel's transients are the lists' size: checked there)
        _check_size("block map [heads, query blocks, key blocks]", (H, MB, NB), tile_m, tile_n)
        _check_size("row coverage [heads, query blocks, key tiles]", (H, MB, NT), tile_m, tile_n)
        _check_size("tile map [heads, query tiles, key tiles]", (H, QT, NT), tile_m, tile_n)
    _check_size("packed block map [heads, query blocks, words]", (H, MB, bit_words(NB)), tile_m, tile_n)
    pack, most_runs, runs, movable_offsets = geometry_tables(q_off, kv_off, tile_m, tile_n, edges, kv_order,
                                                             on_triton)
    if not on_triton:
        _check_size("run coverage [heads, query blocks, runs of a block in a key tile]", (H, MB, runs), tile_m, tile_n)
    dev = pack.to(device)
    lists = {name: getattr(mask, name) for name in ("indptr", "indices")}
    on_host = {name: np.asarray(a) for name, a in lists.items() if not isinstance(a, torch.Tensor)}
    if on_host:
        dev.update(_upload(on_host, device))
    indptr = (dev["indptr"] if "indptr" in dev else lists["indptr"].to(device, torch.int64)).reshape(H, MB + 1)
    indices = (dev["indices"] if "indices" in dev else lists["indices"].to(device, torch.int64)).reshape(-1)
    nnz = indices.numel()
    row_len = (indptr[:, 1:] - indptr[:, :-1]).reshape(-1)                                 # [H*MB]
    row_of_entry = torch.repeat_interleave(torch.arange(H * MB, device=device), row_len, output_size=nnz)
    empty_row = (row_len == 0).view(H, MB)
    bits = keep_bits(row_of_entry, indices, H * MB, NB).view(H, MB, -1)

    def extra() -> torch.Tensor:              # [H, MB] kept key tokens x [MB] query block sizes, summed
        kept_pairs = (csr.kept_key_tokens(indptr, indices, kv_off) * dev["q_sizes"]).sum()
        movable_pairs = (csr.kept_key_tokens(indptr, indices, movable_offsets) * dev["q_sizes"]).sum()
        return torch.stack([empty_row.any(), _heads_alike(row_len.view(H, MB), indices), kept_pairs,
                            movable_pairs]).long()

    read = HostRead({} if memo is None else memo, ("fa4 general", tile_m, tile_n, tuple(edges), kv_order is not None))
    if on_triton:
        found = tile_lists(bits, dev, QT, NT, edges, most_runs, extra, read,
                           lambda name, shape: _check_size(name, shape, tile_m, tile_n))
    else:
        found = dense_tile_lists(row_of_entry, indices, dev, (H, MB, NB, QT, NT), edges, extra, read)
    del row_of_entry
    q_block = dev["q_block"].to(torch.int32)
    aux = (None, None, None)
    if found.num_mask:
        aux = (q_block, dev["kv_block"].to(torch.int32), bits)
    empty_tokens = empty_row[:, dev["q_block"][:q_len]].t().contiguous() if found.any_empty else None
    return Fa4Layout(
        tile_m=tile_m, tile_n=tile_n, num_heads=H, q_len=q_len, kv_len=kv_len,
        mask_block_cnt=found.mask_cnt[None], mask_block_idx=found.mask_idx,
        full_block_cnt=found.full_cnt[None], full_block_idx=found.full_idx,
        q_block_of_token=aux[0], kv_block_of_token=aux[1], keep_bits=aux[2], empty_tokens=empty_tokens,
        num_full_tiles=found.num_full, num_mask_tiles=found.num_mask, kept_pairs=found.kept_pairs,
        kv_order=dev["kv_order"].to(torch.int32) if "kv_order" in dev else None,   # a copy: the upload is freed
        key_edges=tuple(edges), key_widths=found.widths,
        movable_cost=found.num_full_movable + MASK_TILE_COST * found.num_mask_movable,
        movable_kept_pairs=found.movable_kept_pairs)


def _heads_alike(row_len: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Whether every head's IR lists are the first head's (the same row lengths ``[H, MB]``, then the same entries),
    as a device bool: then FA4 gets one head's tile lists and broadcasts them, on every path."""
    heads, nnz = row_len.shape[0], indices.numel()
    alike = (row_len == row_len[:1]).all()
    if heads > 1 and nnz % heads == 0:          # otherwise the row lengths differ already
        alike &= (indices.view(heads, -1) == indices[:nnz // heads]).all()
    return alike


def _on_tile_grid(offsets: Any, side: int) -> bool:
    """Whether every block is one tile of ``side`` tokens (the last one may be shorter)."""
    offsets = np.asarray(offsets, dtype=np.int64)
    return bool((offsets[:-1] == np.arange(len(offsets) - 1, dtype=np.int64) * side).all()
                and offsets[-1] - offsets[-2] <= side)


def _aligned_layout(mask: Any, tile_m: int, tile_n: int, device: torch.device, edges: list[int],
                    read: HostRead) -> Fa4Layout:
    """:func:`to_fa4` where every IR block is one tile on both sides (64-token blocks on 64 x 64 tiles, 128 on 128):
    a row's kept blocks are its query tile's full key tiles, so FA4's lists are the IR's rows (ascending, as the
    IR keeps them), packed to the longest, and there are no mask tiles. Without the block and tile maps of the
    general path (hundreds of MB at 6x for 64-token blocks); transients are a few int32 / int64 arrays of the
    lists' length, and one host sync (the longest row, whether a row is empty, whether all heads are alike), which
    ``read`` may know already."""
    H, MB = int(mask.num_heads), len(mask.q_offsets) - 1
    q_len, kv_len = int(mask.q_offsets[-1]), int(mask.kv_offsets[-1])
    lists = {name: getattr(mask, name) for name in ("indptr", "indices")}
    if not isinstance(lists["indptr"], torch.Tensor):
        lists = _upload(lists, device)                              # host lists: one host-to-device copy
    indptr = lists["indptr"].to(device, torch.int64).reshape(H, MB + 1)
    indices = lists["indices"].to(device, torch.int32).reshape(-1)
    nnz = indices.numel()
    row_len = indptr[:, 1:] - indptr[:, :-1]                                               # [H, MB]
    rows = row_of_entry(indptr, nnz)

    def stats(rows: torch.Tensor = rows) -> torch.Tensor:          # (bound now: the name is cut to one head below)
        found = torch.stack([row_len.max(), (row_len == 0).any(), _heads_alike(row_len, indices)]).long()
        return torch.cat([found, widths_from_entries(rows, indices, H * MB, edges)]) if len(edges) > 2 else found

    (longest, any_empty, alike), widths = _split(read(stats), 3)                          # one sync
    empty_tokens = None
    if any_empty:
        empty_tokens = (row_len == 0).repeat_interleave(tile_m, dim=1)[:, :q_len].t().contiguous()
    heads = H
    if alike and H > 1:           # every head's IR lists are the same: FA4 broadcasts one head's
        heads, indptr, indices, row_len, rows = 1, indptr[:1], indices[:nnz // H], row_len[:1], rows[:nnz // H]
    _check_size("lists [heads x query blocks, longest row]", (heads * MB, max(int(longest), 1)), tile_m, tile_n)
    place = torch.arange(indices.numel(), device=device) - indptr[:, :-1].reshape(-1)[rows]   # place in its row
    idx = torch.zeros(heads * MB, max(int(longest), 1), dtype=torch.int32, device=device)
    idx[rows, place] = indices
    del rows, place
    counts, idx = row_len.to(torch.int32)[None], idx.view(1, heads, MB, -1)
    no_mask = torch.zeros_like(counts)
    return Fa4Layout(tile_m=tile_m, tile_n=tile_n, num_heads=H, q_len=q_len, kv_len=kv_len,
                     mask_block_cnt=no_mask, mask_block_idx=no_mask[..., None],
                     full_block_cnt=counts, full_block_idx=idx,
                     q_block_of_token=None, kv_block_of_token=None, keep_bits=None, empty_tokens=empty_tokens,
                     num_full_tiles=nnz, num_mask_tiles=0, key_edges=tuple(edges), key_widths=widths)


def _split(values: tuple[int, ...], count: int) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """The first ``count`` values of a layout's host read, and the key ranges' list widths after them (or None)."""
    return values[:count], (tuple(int(w) for w in values[count:]) or None)


def _upload(arrays: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """Int arrays to ``device`` as int64 in one copy (a pageable copy waits for the stream: do it once)."""
    flat = np.concatenate([np.asarray(a, dtype=np.int64).ravel() for a in arrays.values()])
    buffer = torch.from_numpy(flat).to(device)
    out, start = {}, 0
    for name, a in arrays.items():
        size = int(np.asarray(a).size)
        out[name] = buffer[start:start + size].view(np.shape(a))
        start += size
    return out
