"""The ``fa4`` lowering's conversion to FlashAttention-4 block-sparse tensors, checked on CPU.

No GPU and no flash_attn needed: :func:`to_fa4` is plain torch, and
:func:`expand_layout` replays what FA4 computes with its output (full tiles whole, mask
tiles through the lookup mask_mod's aux tensors), which must equal the IR's token mask
expanded independently (tests/oracle.py) for every block layout. The glue around the
kernel call (layouts, GQA, scale, LSE, empty rows) runs against a stand-in for
``flash_attn.cute`` that checks FA4's input contract and computes attention in float64.
"""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import types
from typing import NamedTuple

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from oracle import dense_attention, expand_to_tokens
from strategies import block_masks
from tolerances import LSE_ABS, OUT_REL

import sparsecore
from sparsecore import BlockMask, Capabilities
from sparsecore.backends.cuda import fa4_geometry, fa4_key_order, fa4_key_ranges, fa4_layout, fa4_tile_lists
from sparsecore.backends.cuda.fa4_layout import Fa4Layout, choose_tile_side, to_fa4
from sparsecore.backends.cuda.fa4_replay import expand_layout, tile_status
from sparsecore.registry import UnsupportedError

ANY = Capabilities(devices=("test",), array_type="numpy", dtypes=frozenset({"float64"}))
SIDES = st.sampled_from([16, 32, 64, 128])


def check_layout(layout: Fa4Layout) -> None:
    """Assert the invariants FA4 relies on; raises AssertionError naming the first broken one.

    Lists ascending and unique within their counts (FA4 walks them from the end and
    applies sequence-length masking to the first tile it takes, so the short last key
    tile must be last), ids in range, no tile both full and masked, counts within the
    index width, int32 tensors of the documented shapes.
    """
    H, QT, NT = layout.num_heads, layout.num_q_tiles, layout.num_kv_tiles
    for kind in ("full", "mask"):
        cnt, idx = getattr(layout, f"{kind}_block_cnt"), getattr(layout, f"{kind}_block_idx")
        assert cnt.dtype == torch.int32 and idx.dtype == torch.int32, f"{kind}: expected int32 tensors"
        heads = cnt.shape[1]                                # 1: every head's lists alike, broadcast by FA4
        assert tuple(cnt.shape) == (1, heads, QT) and heads in (1, H), \
            f"{kind}_block_cnt: expected [1, {H} or 1, {QT}], got {list(cnt.shape)}"
        assert idx.shape[:3] == (1, heads, QT) and 1 <= idx.shape[3] <= NT, \
            f"{kind}_block_idx: expected [1, {heads}, {QT}, 1..{NT}], got {list(idx.shape)}"
        assert (cnt >= 0).all() and (cnt <= idx.shape[3]).all(), f"{kind}: a count exceeds the index width"
        valid = torch.arange(idx.shape[3]) < cnt[..., None].cpu()
        ids = idx.cpu()
        assert ((ids >= 0) & (ids < NT))[valid].all(), f"{kind}: a key tile id is out of 0..{NT - 1}"
        ascending = (ids[..., 1:] > ids[..., :-1]) | ~valid[..., 1:]
        assert ascending.all(), f"{kind}: a list is not strictly ascending"
    full, partial = tile_status(layout)
    assert not (full & partial).any(), "a key tile is listed both as full and as mask"
    if layout.needs_mask_mod:
        assert layout.q_block_of_token is not None and layout.q_block_of_token.numel() == QT * layout.tile_m
        assert layout.kv_block_of_token is not None and layout.kv_block_of_token.numel() == NT * layout.tile_n
        assert layout.keep_bits is not None and layout.keep_bits.dtype == torch.int32


def assert_exact(mask: BlockMask, tile_m: int, tile_n: int, reorder_keys: bool = True) -> fa4_layout.Fa4Layout:
    layout = to_fa4(mask, tile_m, tile_n, reorder_keys=reorder_keys)
    assert_layout_exact(layout, mask)
    return layout


def assert_layout_exact(layout: Fa4Layout, mask: BlockMask) -> None:
    """``layout`` keeps FA4's invariants and computes exactly the token pairs of ``mask`` (tests/oracle.py), with
    its empty rows marked."""
    check_layout(layout)
    got = expand_layout(layout).numpy()
    want = expand_to_tokens(mask)
    assert got.shape == want.shape
    wrong = np.argwhere(got != want)
    assert wrong.size == 0, f"{len(wrong)} token pairs differ, first (head, q, k) = {wrong[0].tolist()}"
    empty = ~want.any(axis=2)                                                   # [H, q_len]
    if empty.any():
        assert layout.empty_tokens is not None and (layout.empty_tokens.cpu().numpy().T == empty).all()
    else:
        assert layout.empty_tokens is None


def random_mask(rng: np.random.Generator, q_offsets, kv_offsets, num_heads: int, density: float) -> BlockMask:
    mb, nb = len(q_offsets) - 1, len(kv_offsets) - 1
    dense = rng.random((num_heads, mb, nb)) < density
    rows = [[np.nonzero(dense[h, i])[0] for i in range(mb)] for h in range(num_heads)]
    return BlockMask.from_lists(rows, q_offsets, kv_offsets)


# ------------------------------------------------------------------------------------------ any layout
@given(block_masks(ANY, num_heads=3), SIDES, SIDES)
def test_conversion_is_exact_for_any_layout(mask, tile_m, tile_n):
    assert_exact(mask, tile_m, tile_n)


@given(st.integers(0, 2**32 - 1), st.integers(1, 4), st.sampled_from([(16, 16), (32, 16), (16, 32), (64, 32)]))
def test_frame_blocks_with_text_and_short_tails(seed, heads, tiles):
    # 39-token "frames" (1560 scaled down), a 23-token text block, query and key lengths that differ
    rng = np.random.default_rng(seed)
    frames = int(rng.integers(2, 9))
    q_offsets = np.append(np.arange(0, 39 * frames + 1, 39), 39 * frames + 23)
    kv_frames = int(rng.integers(1, 9))
    kv_offsets = np.append(np.arange(0, 39 * kv_frames + 1, 39), 39 * kv_frames + int(rng.integers(1, 40)))
    mask = random_mask(rng, q_offsets, kv_offsets, heads, float(rng.choice([0.2, 0.5, 0.9])))
    assert_exact(mask, *tiles)


@given(st.integers(0, 2**32 - 1), st.sampled_from([16, 32, 64]), st.integers(1, 4),
       st.sampled_from([0.0, 0.1, 0.5, 1.0]))
def test_masks_of_one_tile_per_block_convert_from_their_lists_as_the_general_path_does(seed, side, heads, density):
    """Blocks exactly one tile each (a shorter last one, query and key lengths apart): the lists straight from
    the rows (the aligned path) give the general path's tensors, and exactly the mask's token pairs."""
    rng = np.random.default_rng(seed)
    q_offsets = BlockMask.uniform_offsets(side * int(rng.integers(1, 12)) + int(rng.integers(1, side + 1)), side)
    kv_offsets = BlockMask.uniform_offsets(side * int(rng.integers(1, 12)) + int(rng.integers(1, side + 1)), side)
    mask = random_mask(rng, q_offsets, kv_offsets, heads, density)
    assert fa4_layout._on_tile_grid(q_offsets, side) and fa4_layout._on_tile_grid(kv_offsets, side)
    aligned = assert_exact(mask, side, side)
    general = fa4_layout._general_layout(mask, side, side, torch.device("cpu"), [0, mask.num_kv_blocks])
    assert not aligned.needs_mask_mod and aligned.num_full_tiles == general.num_full_tiles == mask.nnz
    for got, want in zip(tile_status(aligned), tile_status(general)):
        assert torch.equal(got, want.expand_as(got))               # the general path may broadcast alike heads
    edges = fa4_key_ranges.tile_edges(mask.num_kv_blocks, 3)       # ranges' widths from the rows and from the tiles
    if len(edges) > 2:
        from_rows = to_fa4(mask, side, side, key_parts=3)
        from_tiles = fa4_layout._general_layout(mask, side, side, torch.device("cpu"), edges)
        assert from_rows.key_edges == from_tiles.key_edges == tuple(edges)
        assert from_rows.key_widths == from_tiles.key_widths and len(from_rows.key_widths) == 2 * (len(edges) - 1)


def test_one_tile_per_block_masks_broadcast_alike_heads_only():
    offsets = BlockMask.uniform_offsets(64 * 5 + 9, 64)
    rows = [[0, 2], [1], [], [0, 1, 2, 3, 4, 5], [5], [3]]
    alike = assert_exact(BlockMask.from_lists([rows] * 3, offsets, offsets), 64, 64)
    assert alike.full_block_idx.shape[1] == 1 and alike.full_block_cnt.shape[1] == 1
    assert tuple(alike.empty_tokens.shape) == (64 * 5 + 9, 3)                  # every head's empty row, unfolded
    same_lengths = [rows, [[1, 2], [0], [], [0, 1, 2, 3, 4, 5], [4], [3]], rows]     # equal counts, other entries
    apart = assert_exact(BlockMask.from_lists(same_lengths, offsets, offsets), 64, 64)
    assert apart.full_block_idx.shape[1] == 3


def test_blocks_off_the_tile_grid_take_the_general_path():
    assert not fa4_layout._on_tile_grid(np.array([0, 64, 96, 160]), 64)       # a short block inside
    assert not fa4_layout._on_tile_grid(np.array([0, 64, 192]), 64)           # a last block over one tile
    assert fa4_layout._on_tile_grid(np.array([0, 64, 128, 130]), 64)


# ------------------------------------------------------------------------------------------ named layouts
@pytest.mark.parametrize("side", [True, 0, -64, 64.0, "64", None])
def test_a_tile_side_that_is_not_a_positive_int_is_refused(side):
    """``True`` is an int to Python; as a tile side it would have made 1-token tiles (a review, 2026-12-02)."""
    with pytest.raises(ValueError, match="tile_m: expected a positive int"):
        to_fa4(BlockMask.full(1, 100, 100, 50), side, 64)


def test_uniform_128_blocks_on_128_tiles_are_full_tiles_without_mask_mod():
    rng = np.random.default_rng(1)
    offsets = BlockMask.uniform_offsets(128 * 9 + 50, 128)                      # short last block
    mask = random_mask(rng, offsets, offsets, 4, 0.3)
    layout = assert_exact(mask, 128, 128)
    assert not layout.needs_mask_mod and layout.keep_bits is None
    assert layout.num_full_tiles == mask.nnz
    full, partial = tile_status(layout)
    assert torch.equal(full, torch.from_numpy(mask.to_dense())) and not partial.any()


def test_64_token_blocks_on_64_tiles_are_full_and_on_128_tiles_exact_through_mask_tiles():
    rng = np.random.default_rng(2)
    offsets = BlockMask.uniform_offsets(64 * 20, 64)
    mask = random_mask(rng, offsets, offsets, 3, 0.25)
    small = assert_exact(mask, 64, 64)
    assert not small.needs_mask_mod and small.computed_pairs() == mask.flops(1) // 4
    large = assert_exact(mask, 128, 128)
    assert large.needs_mask_mod and large.computed_pairs() > mask.flops(1) // 4


def test_adaspa_like_head_adaptive_rows_with_text_sink():
    rng = np.random.default_rng(3)
    video, text = 64 * 24 + 24, 70                                              # short last video block, odd text
    offsets = np.concatenate([BlockMask.uniform_offsets(video, 64), video + np.array([64, text])])
    mb = len(offsets) - 1
    rows = []
    for h, keep in enumerate([3, 8, 15]):                                       # three row-count levels
        head = []
        for i in range(mb):
            chosen = set(rng.choice(mb - 2, size=min(keep, mb - 2), replace=False).tolist()) | {i} | {mb - 2, mb - 1}
            head.append(sorted(c for c in chosen if c < mb) if i < mb - 2 else list(range(mb)))
        rows.append(head)
    mask = BlockMask.from_lists(rows, offsets, offsets)
    for tiles in ((64, 64), (128, 128), (128, 64)):
        layout = assert_exact(mask, *tiles)
        assert layout.full_block_idx.shape[1] == layout.mask_block_cnt.shape[1] == 3      # per-head lists


def test_lvsa_like_frame_windows():
    frames, frame = 14, 39
    offsets = np.arange(0, frames * frame + 1, frame)
    rows = [[sorted({*range(max(0, i - 2), min(frames, i + 3)), 0, 7}) for i in range(frames)]]
    mask = BlockMask.from_lists(rows * 2, offsets, offsets)
    layout = assert_exact(mask, 32, 32)
    assert layout.needs_mask_mod and layout.num_full_tiles > 0
    assert layout.full_block_idx.shape[1] == layout.mask_block_cnt.shape[1] == 1      # alike heads: one, broadcast
    assert layout.num_full_tiles == 2 * int(layout.full_block_cnt.sum())                 # counted over both heads


def frames_with_anchors(frames: int, frame: int, window: int, anchor_every: int, heads: int = 2) -> BlockMask:
    """LVSA's shape scaled down: every row keeps its window of frames and every ``anchor_every``-th frame."""
    offsets = np.arange(0, frames * frame + 1, frame)
    rows = [sorted({*range(max(0, i - window), min(frames, i + window + 1)), *range(0, frames, anchor_every)})
            for i in range(frames)]
    return BlockMask.from_lists([rows] * heads, offsets, offsets)


@pytest.mark.parametrize("frame, tile", [(39, 16), (39, 32), (100, 32), (1560 // 8, 64)])
def test_key_order_puts_whole_tiles_on_the_grid_and_makes_fewer_mask_tiles(frame, tile):
    mask = frames_with_anchors(frames=27, frame=frame, window=2, anchor_every=9)
    order = fa4_key_order.key_order(mask, tile)
    assert order is not None and np.array_equal(np.sort(order), np.arange(mask.kv_len))
    whole = frame // tile * tile
    for f in range(27):                                   # each frame's whole tiles first, in frame order, on the grid
        assert np.array_equal(order[f * whole:(f + 1) * whole], np.arange(f * frame, f * frame + whole))
    remnants = order[27 * whole:]
    frames_in_order = list(dict.fromkeys((remnants // frame).tolist()))
    assert frames_in_order[:3] == [0, 9, 18]             # remnants every row keeps (the anchors) first
    reordered, plain = assert_exact(mask, tile, tile), assert_exact(mask, tile, tile, reorder_keys=False)
    assert torch.equal(reordered.kv_order.long(), torch.from_numpy(order)) and plain.kv_order is None
    assert reordered.num_mask_tiles < plain.num_mask_tiles
    assert reordered.computed_pairs() < plain.computed_pairs()


def test_key_order_applies_only_to_blocks_off_the_grid_with_whole_tiles():
    rng = np.random.default_rng(9)
    on_grid = random_mask(rng, np.array([0, 256, 384, 900]), np.array([0, 256, 384, 900]), 2, 0.5)
    assert fa4_key_order.key_order(on_grid, 128) is None              # boundaries on the grid, a short last tile
    small = random_mask(rng, BlockMask.uniform_offsets(64 * 20, 64), BlockMask.uniform_offsets(64 * 20, 64), 2, 0.5)
    assert fa4_key_order.key_order(small, 128) is None                # no block holds a whole tile
    assert to_fa4(small, 128, 128).kv_order is None
    mixed = random_mask(rng, np.array([0, 60]), np.array([0, 40, 80, 140, 150]), 1, 1.0)
    assert fa4_key_order.key_order(mixed, 64) is None                 # whole tiles: 0 of 150 keys


def test_key_runs_split_runs_at_tile_edges():
    tile, block, length = fa4_key_order.key_runs(np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3]), 4)
    assert tile.tolist() == [0, 0, 1, 1, 2, 2] and block.tolist() == [0, 1, 1, 2, 2, 3]
    assert length.tolist() == [3, 1, 1, 3, 1, 1]
    tile, block, length = fa4_key_order.key_runs(np.array([5, 5, 5, 5, 7]), 4)
    assert tile.tolist() == [0, 1] and block.tolist() == [5, 7] and length.tolist() == [4, 1]


def test_key_order_is_kept_only_where_it_lowers_the_tile_cost_by_more_than_its_gather():
    window_only = frames_with_anchors(frames=27, frame=39, window=3, anchor_every=100)   # anchor 0 only: a band
    plain = to_fa4(window_only, 32, 32, reorder_keys=False)
    ordered = fa4_layout._general_layout(window_only, 32, 32, torch.device("cpu"), [0, plain.num_kv_tiles],
                                         fa4_key_order.key_order(window_only, 32))
    assert plain.num_mask_tiles > 0 and fa4_layout.tile_cost(ordered) > fa4_layout.tile_cost(plain)
    assert assert_exact(window_only, 32, 32).kv_order is None
    anchored = frames_with_anchors(frames=27, frame=39, window=3, anchor_every=9)
    assert assert_exact(anchored, 32, 32).kv_order is not None
    everything = frames_with_anchors(frames=9, frame=39, window=9, anchor_every=1)       # every row keeps all
    assert assert_exact(everything, 32, 32).kv_order is None                             # no mask tiles to cut


def test_no_key_order_is_built_where_none_could_pay_for_its_gather(monkeypatch):
    calls = []
    monkeypatch.setattr(fa4_layout, "key_order", lambda mask, tile_n: calls.append(tile_n))
    offsets = np.append(BlockMask.uniform_offsets(64 * 10 + 40, 64), 64 * 10 + 40 + 50)    # short video block, text
    mask = random_mask(np.random.default_rng(11), offsets, offsets, 2, 0.3)
    layout = assert_exact(mask, 64, 64)
    assert layout.num_mask_tiles > 0 and layout.kv_order is None and calls == []
    gather = fa4_layout.GATHER_TILE_COST * layout.num_kv_tiles * layout.num_heads
    assert layout.kept_pairs / 64 ** 2 + gather >= fa4_layout.tile_cost(layout)


def kept_pairs_on_movable_key_tiles(mask: BlockMask, tile: int) -> int:
    """By definition: the token pairs ``mask`` keeps whose key sits in a key tile that holds keys of more than one
    block or is shorter than ``tile`` (the last)."""
    kv_offsets = np.asarray(mask.kv_offsets)
    block = np.searchsorted(kv_offsets, np.arange(mask.kv_len), side="right") - 1
    movable = np.zeros(mask.kv_len, dtype=bool)
    for start in range(0, mask.kv_len, tile):
        keys = block[start:start + tile]
        movable[start:start + tile] = len(keys) < tile or keys[0] != keys[-1]
    return int(expand_to_tokens(mask)[:, :, movable].sum())


@given(st.integers(0, 2**32 - 1), st.sampled_from([16, 32]), st.sampled_from([0.2, 0.6, 0.95]),
       st.sampled_from([16, 24, 32]))
def test_no_key_order_costs_less_than_the_fixed_tiles_plus_the_kept_pairs_of_the_others(seed, tile, density, q_block):
    """Any key order's layout costs at least the keys' own layout's tiles that no order changes plus the fewest tiles
    the kept pairs on the other tiles' keys fill (``movable_kept_pairs``, counted here by definition): key order's
    layout against the keys' own, on blocks off the grid (frames, a short block, text) with rows of any density and
    query blocks that straddle query tiles."""
    rng = np.random.default_rng(seed)
    sizes = rng.choice([tile, tile + 7, 3 * tile - 5, 2 * tile], size=int(rng.integers(3, 9)))
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    q_offsets = np.append(np.arange(0, offsets[-1], q_block), offsets[-1])
    mask = random_mask(rng, q_offsets, offsets, 2, density)
    order = fa4_key_order.key_order(mask, tile)
    if order is None:                                    # every boundary on the grid: nothing a key order changes
        assert fa4_layout.to_fa4(mask, tile, tile).kv_order is None
        order = np.arange(mask.kv_len)
    plain = fa4_layout._general_layout(mask, tile, tile, torch.device("cpu"), [0, -(-mask.kv_len // tile)])
    ordered = fa4_layout._general_layout(mask, tile, tile, torch.device("cpu"), [0, -(-mask.kv_len // tile)], order)
    assert plain.movable_kept_pairs == kept_pairs_on_movable_key_tiles(mask, tile)
    fixed = fa4_layout.tile_cost(plain) - plain.movable_cost
    assert fa4_layout.tile_cost(ordered) >= fixed + plain.movable_kept_pairs / tile ** 2 - 1e-9


def test_no_key_order_is_tried_where_only_the_text_after_the_video_is_off_the_grid(monkeypatch):
    """A joint mask as the planners lay out CogVideoX 1.5's (``VideoGeometry.block_offsets``): 16-token video blocks,
    the last one short, then text in 16-token blocks off the grid, which every row keeps and whose rows keep
    everything. The fewest tiles any order lists, and the tiles it can change against the gather, would both let an
    order be tried (as they did on CogVideoX 1.5 at 2x); but the text's tiles are mostly kept pairs, so no order can
    save its gather there, and none is built."""
    calls = []
    monkeypatch.setattr(fa4_layout, "key_order", lambda *a: calls.append(1) or fa4_key_order.key_order(*a))
    video = 16 * 60 + 13
    offsets = np.concatenate([BlockMask.uniform_offsets(video, 16), video + np.array([16, 32, 48, 54])])
    blocks = len(offsets) - 1
    keep = np.random.default_rng(2).random((2, blocks, blocks)) < 0.1
    keep[:, :, -4:] = keep[:, -4:, :] = True                                     # text: kept by all, keeping all
    rows = [[np.nonzero(keep[h, i])[0] for i in range(blocks)] for h in range(2)]
    mask = BlockMask.from_lists(rows, offsets, offsets)
    plain = assert_exact(mask, 16, 16, reorder_keys=False)
    gather = fa4_layout.GATHER_TILE_COST * plain.num_kv_tiles * plain.num_heads
    assert plain.kept_pairs / 16 ** 2 + gather < fa4_layout.tile_cost(plain) and plain.movable_cost > gather
    assert plain.movable_kept_pairs / 16 ** 2 + gather >= plain.movable_cost
    layout = assert_exact(mask, 16, 16)
    assert calls == [] and layout.kv_order is None and layout.num_mask_tiles == plain.num_mask_tiles


def test_no_key_order_is_built_where_the_tiles_it_can_change_cost_less_than_its_gather(monkeypatch):
    """Keys in 16-token blocks but for a short one and a text block (a joint mask's), queries in 24-token blocks
    (their rows disagree inside most query tiles: mask tiles everywhere, which no key order changes). Only the key
    tiles holding the short block's end and the text's short end can change, costing less than the gather: no key
    order is built, although the fewest tiles any order lists would have let it try. Frames still get one."""
    calls = []
    monkeypatch.setattr(fa4_layout, "key_order", lambda *a: calls.append(1) or fa4_key_order.key_order(*a))
    kv_offsets = np.append(BlockMask.uniform_offsets(16 * 40 + 11, 16), 16 * 40 + 11 + 20)
    q_offsets = np.append(np.arange(0, 24 * 27 + 1, 24), 16 * 40 + 11 + 20)
    mask = random_mask(np.random.default_rng(4), q_offsets, kv_offsets, 2, 0.5)
    plain = assert_exact(mask, 16, 16, reorder_keys=False)
    gather = fa4_layout.GATHER_TILE_COST * plain.num_kv_tiles * plain.num_heads
    assert plain.num_mask_tiles > 0 and plain.kept_pairs / 16 ** 2 + gather < fa4_layout.tile_cost(plain)
    assert 0 < plain.movable_cost <= gather
    layout = assert_exact(mask, 16, 16)
    assert calls == [] and layout.kv_order is None and layout.num_full_tiles == plain.num_full_tiles
    assert assert_exact(frames_with_anchors(frames=27, frame=39, window=2, anchor_every=9), 16, 16).kv_order is not None
    assert calls == [1]


def remainders_that_fill_a_tile() -> BlockMask:
    """Four 48-token key blocks, one row keeping blocks 0 and 2: on 32-token tiles, 2 full and 2 mask tiles per
    query tile in the keys' order; reordered, their whole tiles and their two 16-token remainders make 3 full
    tiles (48 queries: two query tiles)."""
    return BlockMask.from_lists([[[0, 2]]], np.array([0, 48]), np.arange(0, 193, 48))


def test_key_order_can_leave_no_mask_tile(monkeypatch):
    monkeypatch.setattr(fa4_layout, "GATHER_TILE_COST", 0.0)      # at this size the gather would outweigh the gain
    mask = remainders_that_fill_a_tile()
    plain, ordered = assert_exact(mask, 32, 32, reorder_keys=False), assert_exact(mask, 32, 32)
    assert (plain.num_full_tiles, plain.num_mask_tiles) == (4, 4)
    assert ordered.kv_order is not None and (ordered.num_full_tiles, ordered.num_mask_tiles) == (6, 0)


def test_empty_rows_all_empty_heads_and_q_len_differs_from_kv_len():
    offsets_q = np.array([0, 5, 40, 41, 100])
    offsets_kv = np.array([0, 16, 17, 60])
    rows = [[[], [0, 2], [], [1]], [[], [], [], []], [[0, 1, 2], [0, 1, 2], [0, 1, 2], [0, 1, 2]]]
    mask = BlockMask.from_lists(rows, offsets_q, offsets_kv)
    for tiles in ((16, 16), (32, 64), (128, 128)):
        layout = assert_exact(mask, *tiles)
        assert layout.empty_tokens is not None


def test_every_tile_empty_gives_zero_counts():
    offsets = BlockMask.uniform_offsets(200, 50)
    mask = BlockMask.from_lists([[[]] * 4] * 2, offsets, offsets)
    layout = assert_exact(mask, 64, 64)
    assert layout.num_full_tiles == layout.num_mask_tiles == 0
    assert layout.full_block_idx.shape[-1] == 1 and layout.mask_block_idx.shape[-1] == 1


def test_short_last_key_tile_is_last_in_its_list():
    # FA4 applies sequence-length masking only to the first tile it takes, walking lists from the end
    offsets_q = BlockMask.uniform_offsets(64, 64)
    offsets_kv = np.array([0, 100, 150])                                       # kv_len 150: tiles 0..2, tile 2 short
    mask = BlockMask.from_lists([[[0, 1]]], offsets_q, offsets_kv)
    layout = assert_exact(mask, 64, 64)
    full_cnt, full_idx = layout.full_block_cnt[0, 0, 0], layout.full_block_idx[0, 0, 0]
    mask_cnt, mask_idx = layout.mask_block_cnt[0, 0, 0], layout.mask_block_idx[0, 0, 0]
    assert full_idx[:full_cnt].tolist() == [0, 1, 2] and mask_cnt == 0
    assert mask_idx.shape[0] == 1


def counting_reads(monkeypatch) -> list[tuple]:
    """The keys of the conversions' host reads that read the device (a memoized read is not counted)."""
    made = []
    real = fa4_tile_lists.HostRead.__call__

    def counted(self, values):
        return real(self, lambda: made.append(self.key) or values())

    monkeypatch.setattr(fa4_tile_lists.HostRead, "__call__", counted)
    return made


@pytest.mark.parametrize("case", ["aligned", "general", "key order"])
def test_a_mask_converted_again_reads_nothing_and_builds_its_chosen_layout_only(monkeypatch, case):
    """A second conversion of a mask (any key ranges, tiles) reads nothing from the device and, where a key order
    was tried, builds only the layout chosen the first time; each conversion is exact. Another mask of the same
    geometry reads its own."""
    made = counting_reads(monkeypatch)
    orders = []
    monkeypatch.setattr(fa4_layout, "key_order", lambda *a: orders.append(1) or fa4_key_order.key_order(*a))
    rng = np.random.default_rng(12)
    make = {"aligned": lambda: random_mask(rng, BlockMask.uniform_offsets(16 * 9 + 5, 16),
                                           BlockMask.uniform_offsets(16 * 9 + 5, 16), 2, 0.4),
            "general": lambda: random_mask(rng, [0, 7, 15, 30, 41, 50, 63, 77], [0, 7, 15, 30, 41, 50, 63, 77], 2, 0.5),
            "key order": lambda: frames_with_anchors(frames=27, frame=39, window=2, anchor_every=9)}[case]
    mask = make()
    first = assert_exact(mask, 16, 16)
    reads, tried = len(made), len(orders)
    assert reads == (2 if case == "key order" else 1) and tried == (case != "aligned")
    again = assert_exact(mask, 16, 16)
    assert len(made) == reads and len(orders) == tried
    assert (again.num_full_tiles, again.num_mask_tiles) == (first.num_full_tiles, first.num_mask_tiles)
    assert (again.kv_order is None) == (first.kv_order is None)
    for tile in (tile_status(first), tile_status(again)):
        assert torch.equal(tile[0], tile_status(first)[0]) and torch.equal(tile[1], tile_status(first)[1])
    assert_layout_exact(to_fa4(mask, 16, 16, key_parts=2), mask)            # other key ranges: a read of their own
    assert len(made) == reads + (2 if case == "key order" else 1)
    other = make() if case != "key order" else frames_with_anchors(frames=27, frame=39, window=3, anchor_every=9)
    assert_exact(other, 16, 16)
    assert len(made) > reads + (2 if case == "key order" else 1)


def test_a_mask_whose_builder_noted_its_row_lengths_converts_without_a_read(monkeypatch):
    """Blocks on the tiles, no empty row and a bound on the longest (as PASA's planner notes them): no read, and
    exact with lists as wide as the bound. Rows that may be empty, or several key ranges, read as before."""
    from sparsecore.ir.host_facts import note_row_lengths
    made = counting_reads(monkeypatch)
    offsets = BlockMask.uniform_offsets(16 * 9 + 5, 16)
    rows = [[[0, 3], [1], [2, 5, 9], [3], [0, 4], [5, 6], [6], [7, 1], [8], [9, 0]]] * 2
    exact = assert_exact(note_row_lengths(BlockMask.from_lists(rows, offsets, offsets), 1, 3), 16, 16)
    wide = assert_exact(note_row_lengths(BlockMask.from_lists(rows, offsets, offsets), 1, 7), 16, 16)
    assert made == [] and exact.full_block_idx.shape[-1] == 3 and wide.full_block_idx.shape[-1] == 7
    assert exact.full_block_idx.shape[1] == 2                          # alike heads not told apart: both listed
    assert_exact(note_row_lengths(BlockMask.from_lists(rows, offsets, offsets), 0, 3), 16, 16)
    assert len(made) == 1
    mask = note_row_lengths(BlockMask.from_lists(rows, offsets, offsets), 1, 3)
    assert_layout_exact(to_fa4(mask, 16, 16, key_parts=2), mask)
    assert len(made) == 2


def test_copies_of_a_mask_share_what_its_conversions_read(monkeypatch):
    """``copy_to`` (a held mask brought back for a call) shares the source's host reads: the copy's conversion reads
    nothing the source's read, and the source's conversion nothing a copy's read (a stand-in device: the copy is a
    clone on the CPU)."""
    from sparsecore.ir import placement, uploads
    rng = np.random.default_rng(13)
    offsets = [0, 7, 15, 30, 41, 50, 63, 77]                                     # no key order to try
    host = random_mask(rng, offsets, offsets, 2, 0.5).to("cpu")                    # torch lists, as a held mask
    unrelated = random_mask(rng, offsets, offsets, 2, 0.5).to("cpu")
    monkeypatch.setattr(placement, "run_device", lambda device: "elsewhere")
    monkeypatch.setattr(uploads, "moved", lambda tensor, device: tensor.clone())
    made = counting_reads(monkeypatch)
    copy = host.copy_to("elsewhere")
    assert copy is not host and copy.indices is not host.indices
    assert_exact(copy, 16, 16)
    assert len(made) == 1
    assert_exact(host, 16, 16)
    assert_exact(host.copy_to("elsewhere"), 16, 16)
    assert len(made) == 1
    assert_exact(unrelated.copy_to("elsewhere"), 16, 16)
    assert len(made) == 2


def test_the_padded_masks_of_a_held_masks_copies_share_what_their_conversions_read(monkeypatch):
    """Text padding: the planner pads each call's copy of a held mask by padding blocks (a new mask a call). The
    padded copies of one held mask share their host reads (kept with it per length), not the held mask's own (their
    lists differ: the padding's rows are empty), so the second call's conversion reads nothing."""
    from sparsecore.integrations.diffusers.planner import Planner
    from sparsecore.ir import placement, uploads
    from sparsecore.ir.host_facts import note_row_lengths, row_lengths
    offsets = BlockMask.uniform_offsets(16 * 6, 16)
    held = note_row_lengths(random_mask(np.random.default_rng(15), offsets, offsets, 2, 0.5).to("cpu"), 0, 6)
    monkeypatch.setattr(placement, "run_device", lambda device: "elsewhere")
    monkeypatch.setattr(uploads, "moved", lambda tensor, device: tensor.clone())
    made = counting_reads(monkeypatch)
    padded = [Planner.padded_mask(None, held.copy_to("elsewhere"), 16 * 6 + 20) for _ in range(2)]
    assert padded[0] is not padded[1] and row_lengths(padded[0]) is None
    for mask in padded:
        assert_exact(mask, 16, 16)
    assert len(made) == 1
    other_length = Planner.padded_mask(None, held.copy_to("elsewhere"), 16 * 6 + 30)
    assert_exact(other_length, 16, 16)
    assert len(made) == 2


def test_masks_of_one_geometry_build_its_tables_once(monkeypatch):
    """The tables that follow from the offsets are built once per geometry and tiles (kept in host memory), a key
    order's each time, and again after ``sparsecore.clear_cache``; every conversion stays exact."""
    built = []
    monkeypatch.setattr(fa4_geometry, "key_runs", lambda *a: built.append(1) or fa4_key_order.key_runs(*a))
    sparsecore.clear_cache()
    rng = np.random.default_rng(5)
    offsets = [0, 20, 41, 50, 77, 90]
    for density in (0.3, 0.6, 0.9):
        assert_exact(random_mask(rng, offsets, offsets, 2, density), 16, 16, reorder_keys=False)
    assert len(built) == 1
    assert_exact(random_mask(rng, offsets, offsets, 2, 0.5), 32, 16, reorder_keys=False)     # other tiles
    assert len(built) == 2
    sparsecore.clear_cache()
    assert_exact(random_mask(rng, offsets, offsets, 2, 0.5), 16, 16, reorder_keys=False)
    assert len(built) == 3
    frames = frames_with_anchors(frames=27, frame=39, window=2, anchor_every=9)
    for _ in range(2):                                    # the plain layout's tables kept, the key order's not
        assert assert_exact(frames, 16, 16).kv_order is not None
    assert len(built) == 3 + 1 + 2


def test_the_geometry_cache_keys_on_every_input_of_its_tables_and_keeps_the_last_used(monkeypatch):
    """Query offsets, key offsets, key ranges and either tile side (17 tokens: as many tiles as 16) each make a
    geometry of their own; of more than :data:`fa4_geometry.GEOMETRY_ENTRIES` geometries the least recently used is
    built again."""
    built = []
    monkeypatch.setattr(fa4_geometry, "key_runs", lambda *a: built.append(1) or fa4_key_order.key_runs(*a))
    monkeypatch.setattr(fa4_geometry._GEOMETRIES, "entries", 3)
    sparsecore.clear_cache()
    rng = np.random.default_rng(6)
    base, other = [0, 20, 41, 50, 77, 90], [0, 21, 41, 50, 77, 90]
    variants = {"base": (base, base, 16, 16, 1), "q": (other, base, 16, 16, 1), "kv": (base, other, 16, 16, 1),
                "ranges": (base, base, 16, 16, 2), "tile_m": (base, base, 17, 16, 1), "tile_n": (base, base, 16, 17, 1)}
    counts = []
    order = ("base", "base", "q", "kv", "base", "ranges", "base", "tile_m", "tile_n", "base", "tile_m", "tile_n",
             "q", "ranges")
    for name in order:
        q_offsets, kv_offsets, tile_m, tile_n, key_parts = variants[name]
        mask = random_mask(rng, q_offsets, kv_offsets, 2, 0.5)
        assert_layout_exact(to_fa4(mask, tile_m, tile_n, reorder_keys=False, key_parts=key_parts), mask)
        counts.append(len(built))
    assert counts == [1, 1, 2, 3, 3, 4, 4, 5, 6, 6, 6, 6, 7, 8]


HEADS_NEARLY_ALIKE = {"same row lengths": [[[0], [2], [1], [3]], [[1], [3], [0], [2]]],
                      "same entries": [[[0, 1], [], [2], [3]], [[0], [1], [2], [3]]]}


@pytest.mark.parametrize("offsets", [[0, 20, 41, 50, 77], [0, 16, 32, 48, 64]], ids=["off-grid", "one-tile-blocks"])
@pytest.mark.parametrize("rows", HEADS_NEARLY_ALIKE.values(), ids=HEADS_NEARLY_ALIKE.keys())
def test_heads_alike_but_in_their_row_lengths_or_entries_keep_their_own_lists(offsets, rows):
    """Heads alike in their row lengths (entries not), or in their entries read in a row (row lengths not): each
    keeps its own lists, on the general path and on the aligned one (the Triton path's in test_fa4_tile_lists.py)."""
    mask = BlockMask.from_lists(rows, offsets, offsets)
    layout = assert_exact(mask, 16, 16)
    assert layout.full_block_cnt.shape[1] == 2


def test_lists_from_torch_tensors_match_lists_from_numpy():
    rng = np.random.default_rng(4)
    ragged = random_mask(rng, np.array([0, 30, 31, 90, 128]), np.array([0, 7, 64, 100, 190]), 3, 0.5)
    frames = frames_with_anchors(frames=27, frame=39, window=2, anchor_every=9)      # reordered on 32 tiles
    for mask, reordered in ((ragged, False), (frames, True)):
        as_tensors = types.SimpleNamespace(num_heads=mask.num_heads, q_offsets=mask.q_offsets,
                                           kv_offsets=mask.kv_offsets, indptr=torch.tensor(np.array(mask.indptr)),
                                           indices=torch.tensor(np.array(mask.indices)))
        a, b = to_fa4(mask, 32, 32), to_fa4(as_tensors, 32, 32)
        assert (a.kv_order is not None) == reordered
        for name in ("mask_block_cnt", "mask_block_idx", "full_block_cnt", "full_block_idx", "q_block_of_token",
                     "kv_block_of_token", "keep_bits", "empty_tokens", "kv_order"):
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None and y is None) or torch.equal(x, y), name


def test_masks_with_lists_on_a_torch_device_convert_identically():
    if not hasattr(BlockMask, "to"):
        pytest.skip("this IR keeps its lists in NumPy only (no BlockMask.to)")
    rng = np.random.default_rng(6)
    ragged = random_mask(rng, np.array([0, 20, 64, 65, 130]), np.array([0, 64, 100, 190]), 2, 0.6)
    frames = frames_with_anchors(frames=27, frame=100, window=2, anchor_every=9)      # reordered on 64 tiles
    for mask, reordered in ((ragged, False), (frames, True)):
        on_torch = mask.to("cpu")
        assert isinstance(on_torch.indices, torch.Tensor)
        a, b = to_fa4(mask, 32, 64), to_fa4(on_torch, 32, 64)
        assert (a.kv_order is not None) == reordered
        for name in ("mask_block_cnt", "mask_block_idx", "full_block_cnt", "full_block_idx", "keep_bits",
                     "kv_block_of_token", "kv_order"):
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None and y is None) or torch.equal(x, y), name


# ------------------------------------------------------------------------------------------ tile choice, limits
def test_tile_choice_follows_the_blocks():
    assert choose_tile_side(BlockMask.uniform_offsets(32768, 128)) == 128
    assert choose_tile_side(BlockMask.uniform_offsets(32768 + 17, 128)) == 128
    assert choose_tile_side(BlockMask.uniform_offsets(188736, 64)) == 64
    assert choose_tile_side(np.arange(0, 121 * 1560 + 1, 1560)) == 128         # LVSA frames
    assert choose_tile_side(BlockMask.uniform_offsets(4096, 256)) == 128


def test_too_large_dense_intermediates_are_refused_with_a_remedy(monkeypatch):
    monkeypatch.setattr(fa4_layout, "DENSE_LIMIT", 1000)
    mask = BlockMask.full(4, 64 * 16, 64 * 16, 64)                             # block map 4 x 16 x 16 = 1024
    with pytest.raises(UnsupportedError, match="triton"):
        to_fa4(mask, 128, 128)                        # (on 64 x 64 tiles the lists convert without these maps)


def test_bad_tile_sides_raise():
    mask = BlockMask.full(1, 64, 64, 32)
    with pytest.raises(ValueError, match="tile_m"):
        to_fa4(mask, 0, 64)


# ------------------------------------------------------------------------------------------ backend glue
def test_importing_the_backend_imports_no_device_library():
    code = ("import sys, sparsecore.backends.cuda.fa4_backend as b; "
            "bad = [m for m in ('flash_attn', 'cutlass') if m in sys.modules]; "
            "assert not bad, bad; print(b.Fa4Backend.name)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "fa4"


def test_unavailable_here_says_why():
    from sparsecore.backends.cuda.fa4_backend import Fa4Backend
    reason = Fa4Backend().unavailable_reason("cuda")
    if reason is None:
        pytest.skip("fa4 is available on this machine (an SM90 GPU with flash-attn-4)")
    assert "flash" in reason or "cuda" in reason or "capability" in reason


def test_tile_shape_options_are_checked():
    from sparsecore.backends.cuda.fa4_backend import Fa4Options, tile_shape
    mask = BlockMask.full(1, 1560 * 3, 1560 * 3, 1560)
    assert tile_shape(mask, Fa4Options()) == (128, 128)
    assert tile_shape(BlockMask.full(1, 640, 640, 64), Fa4Options()) == (64, 64)
    assert tile_shape(mask, Fa4Options(tile_m=64)) == (64, 128)
    with pytest.raises(UnsupportedError, match="tile_n"):
        tile_shape(mask, Fa4Options(tile_n=256))
    with pytest.raises(ValueError, match="tile_m"):
        Fa4Options(tile_m=100)


class _FakeSparse(NamedTuple):
    mask_block_cnt: torch.Tensor
    mask_block_idx: torch.Tensor
    full_block_cnt: torch.Tensor | None = None
    full_block_idx: torch.Tensor | None = None
    cu_total_m_blocks: torch.Tensor | None = None
    cu_block_idx_offsets: torch.Tensor | None = None
    block_size: tuple[int, int] | None = None


def _fake_flash_attn_fwd(q, k, v, *, softmax_scale, causal, pack_gqa, mask_mod, aux_tensors,
                         block_sparse_tensors, return_lse, out):
    """FA4's private forward contract (``out=``, written in place and returned, then the LSE and three more),
    computed in float64 on CPU. As FA4's softmax finalize (``softmax.py``: a row sum of 0 or NaN scales by 1 and
    gives LSE -inf): a row with no key gets output 0 and LSE -inf, a row with a NaN score its NaN output and LSE
    -inf."""
    assert out.shape == q.shape[:3] + v.shape[-1:] and out.dtype == q.dtype and out.stride(-1) == 1
    result, lse = _fake_attention(q, k, v, softmax_scale=softmax_scale, causal=causal, pack_gqa=pack_gqa,
                                  mask_mod=mask_mod, aux_tensors=aux_tensors, block_sparse_tensors=block_sparse_tensors,
                                  return_lse=return_lse)
    out.copy_(result)
    return out, lse, None, None, None


def _fake_attention(q, k, v, *, softmax_scale, causal, pack_gqa, mask_mod, aux_tensors, block_sparse_tensors,
                    return_lse):
    """The stand-in's attention: out ``[B, q_len, H, D]`` (FA4's own layout) and the LSE."""
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
    assert not causal and pack_gqa is False and isinstance(block_sparse_tensors, _FakeSparse)
    batch, q_len, heads, dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    bm, bn = block_sparse_tensors.block_size
    pairs = torch.zeros(heads, q_len, kv_len, dtype=torch.bool)
    q_tile, kv_tile = torch.arange(q_len) // bm, torch.arange(kv_len) // bn
    for kind in ("full", "mask"):
        cnt = getattr(block_sparse_tensors, f"{kind}_block_cnt")[0]
        idx = getattr(block_sparse_tensors, f"{kind}_block_idx")[0]
        assert cnt.dtype == idx.dtype == torch.int32 and cnt.shape[1] == -(-q_len // bm)
        assert cnt.shape[0] in (1, heads) and idx.shape[0] == cnt.shape[0]      # FA4 broadcasts a head dim of 1
        cnt, idx = cnt.expand(heads, -1), idx.expand(heads, -1, -1)
        grid = torch.zeros(heads, cnt.shape[1], -(-kv_len // bn), dtype=torch.bool)
        for h in range(heads):
            for t in range(cnt.shape[1]):
                grid[h, t, idx[h, t, :cnt[h, t]].long()] = True
        tiles = grid[:, q_tile][:, :, kv_tile]
        if kind == "full":
            pairs |= tiles
        elif cnt.any():
            assert mask_mod is not None and [a.dtype for a in aux_tensors] == [torch.int32, torch.int32, torch.uint32]
            q_block, kv_block, bits = aux_tensors
            words = bits.view(torch.int32).long() & 0xFFFFFFFF
            qb, kb = q_block[:q_len].long(), kv_block[:kv_len].long()
            kept = (words[:, qb][:, :, kb // 32] >> (kb % 32)) & 1
            pairs |= tiles & kept.bool()
    group = heads // kv_heads
    kk = k.double().repeat_interleave(group, dim=2).permute(0, 2, 1, 3)
    vv = v.double().repeat_interleave(group, dim=2).permute(0, 2, 1, 3)
    scores = (q.double().permute(0, 2, 1, 3) @ kk.transpose(-1, -2)) * softmax_scale
    scores = scores.masked_fill(~pairs[None], -math.inf)
    lse = torch.logsumexp(scores, dim=-1)                                      # -inf on empty rows
    lse = lse.masked_fill(lse.isnan(), -math.inf)                              # NaN sums: -inf too
    out = (torch.softmax(scores, dim=-1) @ vv).masked_fill(~pairs.any(-1)[None, ..., None], 0.0)   # empty rows: 0
    return out.permute(0, 2, 1, 3).to(q.dtype).contiguous(), (lse.float() if return_lse else None)   # FA4's layout


H200_L2_BYTES = 50 * 2**20


@pytest.fixture
def fake_fa4(monkeypatch):
    """``flash_attn.cute`` replaced by the stand-in; the non-finite guard's Triton kernels run on the CPU tensors
    in Triton's interpreter, so the tests using it need TRITON_INTERPRET=1 (as CI sets)."""
    from sparsecore.backends.cuda import interpreter
    if not interpreter.interpreting():
        pytest.skip("the fa4 lowering's non-finite guard is Triton: on CPU tensors it runs only in Triton's "
                    "interpreter (set TRITON_INTERPRET=1)")
    interface = types.ModuleType("flash_attn.cute.interface")
    interface._flash_attn_fwd = _fake_flash_attn_fwd
    cute = types.ModuleType("flash_attn.cute")
    cute.interface = interface
    sparsity = types.ModuleType("flash_attn.cute.block_sparsity")
    sparsity.BlockSparseTensorsTorch = _FakeSparse
    root = types.ModuleType("flash_attn")
    root.cute = cute
    for name, module in (("flash_attn", root), ("flash_attn.cute", cute), ("flash_attn.cute.interface", interface),
                         ("flash_attn.cute.block_sparsity", sparsity)):
        monkeypatch.setitem(sys.modules, name, module)
    from sparsecore.backends.cuda import fa4_launch
    monkeypatch.setattr(fa4_launch, "lookup_mask_mod", lambda: "lookup-mask-mod")
    monkeypatch.setattr(fa4_launch, "l2_bytes", lambda device: H200_L2_BYTES)     # key_parts=None asks the device
    # gathering k and v for a key order is free here, so these small masks take it where it cuts tiles (at their
    # size the cost model would keep the keys' order): the launches below run the reordered path too
    from sparsecore.backends.cuda import fa4_layout as layouts
    monkeypatch.setattr(layouts, "GATHER_TILE_COST", 0.0)
    monkeypatch.setattr(torch.cuda, "device", lambda device: __import__("contextlib").nullcontext())
    return fa4_launch


@pytest.mark.parametrize("tiles", [(32, 32), (16, 64)])
@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("key_parts", [1, 3])
def test_launch_matches_dense_attention_through_a_stand_in_kernel(fake_fa4, tiles, group, key_parts):
    mask = mask_with_an_empty_row()
    launch = fake_fa4.Fa4Launch(mask, *tiles, key_parts=key_parts)
    torch.manual_seed(5)
    q = torch.randn(2, 4, 101, 16, dtype=torch.float64)
    k = torch.randn(2, 4 // group, 130, 16, dtype=torch.float64)
    v = torch.randn(2, 4 // group, 130, 16, dtype=torch.float64)
    assert launch.key_parts_for(k, v) == key_parts
    check_against_dense(launch, mask, q, k, v, merged=key_parts > 1)
    assert len(launch.converted("cpu", key_parts).ranges) == key_parts          # 5 or 3 key tiles, cut in 3
    if key_parts == 1:              # 39-token key blocks: on 32-wide key tiles FA4 reads them in key_order
        assert (launch.converted("cpu").layout.kv_order is not None) == (tiles[1] == 32)


def test_launch_refuses_an_output_fa4_did_not_write_into_out(fake_fa4, monkeypatch):
    """A flash-attn-4 whose private forward returned its own ``[B, q_len, H, D]`` tensor (not ``out=``)."""
    interface = sys.modules["flash_attn.cute.interface"]

    def own_output(q, k, v, *, out, **kwargs):
        written, *rest = _fake_flash_attn_fwd(q, k, v, out=out, **kwargs)
        return (written.contiguous(), *rest)                  # FA4's own layout: not out's head-major memory

    monkeypatch.setattr(interface, "_flash_attn_fwd", own_output)
    torch.manual_seed(5)
    q = torch.randn(2, 4, 101, 16, dtype=torch.float64)
    k, v = (torch.randn(2, 4, 130, 16, dtype=torch.float64) for _ in range(2))
    with pytest.raises(RuntimeError, match="not the out= it was given.*backend='triton'"):
        fake_fa4.Fa4Launch(mask_with_an_empty_row(), 32, 32, key_parts=1)(q, k, v, 0.3, True)


def test_a_mask_that_lists_nothing_gives_what_a_launch_gives(fake_fa4):
    """No block listed anywhere (no kernel runs): output 0 contiguous and head-major with v's head dim, as FA4 writes
    it, and a float32 LSE of -inf, whatever torch's default dtype (it followed it, and q's strides and head dim)."""
    offsets = BlockMask.uniform_offsets(130, 64)
    empty = BlockMask.from_lists([[[], [], []]] * 2, offsets, offsets)
    q = torch.randn(1, 130, 2, 64, dtype=torch.float16).transpose(1, 2)       # diffusers' [B, S, H, D], viewed
    k, v = torch.randn(1, 2, 130, 64, dtype=torch.float16), torch.randn(1, 2, 130, 32, dtype=torch.float16)
    torch.set_default_dtype(torch.float64)
    try:
        out, lse = fake_fa4.Fa4Launch(empty, 64, 64)(q, k, v, 0.125, True)
    finally:
        torch.set_default_dtype(torch.float32)
    assert out.shape == (1, 2, 130, 32) and out.is_contiguous() and out.dtype == torch.float16 and not out.any()
    assert lse.dtype == torch.float32 and torch.isneginf(lse).all()


def test_reordered_keys_without_mask_tiles_match_dense_attention_through_a_stand_in_kernel(fake_fa4):
    mask = remainders_that_fill_a_tile()             # no mask tile: the values go in gathered, unguarded
    launch = fake_fa4.Fa4Launch(mask, 32, 32, key_parts=1)
    torch.manual_seed(7)
    q = torch.randn(2, 1, 48, 16, dtype=torch.float64)
    k, v = (torch.randn(2, 1, 192, 16, dtype=torch.float64) for _ in range(2))
    out, lse = launch(q, k, v, 0.3, True)
    want_out, want_lse = dense_attention(q.numpy(), k.numpy(), v.numpy(), expand_to_tokens(mask), 0.3)
    layout = launch.converted("cpu").layout
    assert layout.kv_order is not None and not layout.needs_mask_mod
    np.testing.assert_allclose(out.numpy(), want_out, atol=1e-10)
    np.testing.assert_allclose(lse.numpy(), want_lse, rtol=1e-6)


def test_keys_in_their_own_order_give_the_same_attention_through_a_stand_in_kernel(fake_fa4):
    mask = mask_with_an_empty_row()
    torch.manual_seed(6)
    q = torch.randn(2, 4, 101, 16, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 130, 16, dtype=torch.float64) for _ in range(2))
    plain = fake_fa4.Fa4Launch(mask, 32, 32, key_parts=1, reorder_keys=False)
    check_against_dense(plain, mask, q, k, v, merged=False)
    assert plain.converted("cpu").layout.kv_order is None
    from sparsecore.backends.cuda.fa4_backend import Fa4Options
    with pytest.raises(TypeError, match="reorder_keys"):
        Fa4Options(reorder_keys=1)


def mask_with_an_empty_row() -> BlockMask:
    """4 heads over 3 query blocks (39, 39, 23 tokens) and 4 key blocks (39, 39, 39, 13), half the blocks kept,
    head 1's last row empty."""
    q_offsets, kv_offsets = np.array([0, 39, 78, 101]), np.array([0, 39, 78, 117, 130])
    mask = random_mask(np.random.default_rng(5), q_offsets, kv_offsets, 4, 0.5)
    rows = [[list(mask.row(h, i)) for i in range(3)] for h in range(4)]
    rows[1][2] = []
    return BlockMask.from_lists(rows, q_offsets, kv_offsets)


def assert_float32_like_dense(out, lse, mask: BlockMask, q, k, v) -> None:
    """A float32 launch's output and LSE (scale 0.3) equal :func:`dense_attention` in float64 within float32 merging."""
    want_out, want_lse = dense_attention(q.double().numpy(), k.double().numpy(), v.double().numpy(),
                                         expand_to_tokens(mask), 0.3)
    np.testing.assert_allclose(out.double().numpy(), want_out, atol=2e-6)
    np.testing.assert_allclose(lse.double().numpy(), want_lse, rtol=1e-5, atol=1e-5)


def check_against_dense(launch, mask: BlockMask, q, k, v, merged: bool) -> None:
    """``launch`` on the float64 inputs equals :func:`dense_attention` (the mask of the layouts above: head 1's last
    query block empty), with and without the LSE."""
    out, lse = launch(q, k, v, 0.3, True)
    want_out, want_lse = dense_attention(q.numpy(), k.numpy(), v.numpy(), expand_to_tokens(mask), 0.3)
    assert out.shape == q.shape and lse.shape == (2, 4, 101) and lse.dtype == torch.float32
    assert out.is_contiguous()          # head-major: the diffusers op returns it without a copy
    np.testing.assert_allclose(out.numpy(), want_out, atol=1e-6 if merged else 1e-10)   # merged in float32
    np.testing.assert_allclose(lse.numpy(), want_lse, rtol=1e-6)
    assert (out[:, 1, 78:] == 0).all() and torch.isneginf(lse[:, 1, 78:]).all()
    assert launch(q, k, v, 0.3, False)[1] is None


@pytest.mark.parametrize("key_parts", [1, 3])
def test_a_nan_key_gives_its_attending_rows_lse_nan_through_the_key_ranges(fake_fa4, key_parts):
    """FA4 writes LSE -inf where a NaN score made a row's sum NaN (the stand-in does as its finalize does); merged
    over key ranges that -inf read as "no keys" and dropped the row's NaN. Now those rows get LSE NaN, as dense."""
    mask = mask_with_an_empty_row()
    launch = fake_fa4.Fa4Launch(mask, 32, 32, key_parts=key_parts)
    torch.manual_seed(7)
    q = torch.randn(2, 4, 101, 16, dtype=torch.float64)
    k, v = torch.randn(2, 2, 130, 16, dtype=torch.float64), torch.randn(2, 2, 130, 16, dtype=torch.float64)
    k[1, 0, 5, 3] = math.nan                                                   # key head 0: query heads 0 and 1
    out, lse = launch(q, k, v, 0.3, True)
    attends = np.zeros(out.shape[:3], dtype=bool)                              # [B, H, q_len]
    attends[1, :2] = expand_to_tokens(mask)[:2, :, 5]                          # rows listing key token 5's block
    assert attends.any() and not attends.all() and np.array_equal(np.isnan(lse.numpy()), attends)
    assert np.array_equal(np.isnan(out.numpy()).any(-1), attends)


def test_auto_key_parts_split_the_two_cta_kernel_when_a_heads_keys_and_values_exceed_the_l2(fake_sm90, monkeypatch):
    """key_parts=None on the two-CTA kernel with an L2 a third of one head's K+V: ceil(2 * 33,280 / 11,093) = 7
    ranges, capped at the mask's 5 key tiles; cut once at tile edges, reused, and prepared by prepare(); the same
    launch on the one-CTA kernel or with a large L2 runs unsplit (FA4's SM90 interface stands in for the two-CTA
    kernel)."""
    fake_fa4 = fake_sm90.backend
    mask = mask_with_an_empty_row()
    torch.manual_seed(6)
    q = torch.randn(2, 4, 101, 16, dtype=torch.float64)
    k, v = torch.randn(2, 2, 130, 16, dtype=torch.float64), torch.randn(2, 2, 130, 16, dtype=torch.float64)
    kv_bytes = 130 * 16 * 8 * 2                                                 # one key head's keys plus values
    monkeypatch.setattr(fake_fa4, "l2_bytes", lambda device: kv_bytes // 3)
    split = fake_fa4.Fa4Launch(mask, 32, 32, two_per_sm=True)
    split.prepare(q, k, v)
    assert split.key_parts_for(k, v) == 5 and list(split._prepared) == [(torch.device("cpu"), 5)]
    prepared = split.converted("cpu", 5)
    assert [(r.first, r.stop) for r in prepared.ranges] == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]
    check_against_dense(split, mask, q, k, v, merged=True)
    assert len(fake_sm90.calls) == 2 * 5                                       # 5 two-CTA launches a call
    assert split.converted("cpu", 5) is prepared and len(split._prepared) == 1  # reused, not rebuilt per call
    one_cta = fake_fa4.Fa4Launch(mask, 32, 32, two_per_sm=False)
    assert one_cta.key_parts_for(k, v) == 1
    check_against_dense(one_cta, mask, q, k, v, merged=False)
    assert [key for _, key in one_cta._prepared] == [1]
    monkeypatch.setattr(fake_fa4, "l2_bytes", lambda device: kv_bytes)          # fits exactly: one launch
    fits = fake_fa4.Fa4Launch(mask, 32, 32, two_per_sm=True)
    assert fits.key_parts_for(k, v) == 1
    check_against_dense(fits, mask, q, k, v, merged=False)
    assert [key for _, key in fits._prepared] == [1]


@pytest.mark.parametrize("kv_bytes, l2, tiles, expected", [
    (50_331_648, 52_428_800, 1536, 1),           # H200: 98,304 tokens, D=128, bf16 fit the 50 MiB L2
    (52_428_800, 52_428_800, 1536, 1),           # exactly the L2
    (52_428_801, 52_428_800, 1536, 3),           # a byte over: ceil(2 + tiny) = 3
    (96_632_832, 52_428_800, 2949, 4),           # H200: 188,736 tokens, the fastest measured
    (96_632_832, 52_428_800, 3, 3),              # capped at the key tiles
    (10**12, 52_428_800, 10**6, 16),             # capped at MAX_KEY_PARTS
])
def test_auto_key_parts_rule(kv_bytes, l2, tiles, expected):
    from sparsecore.backends.cuda.fa4_launch import MAX_KEY_PARTS, auto_key_parts
    assert MAX_KEY_PARTS == 16
    assert auto_key_parts(kv_bytes, l2, tiles) == expected


def test_key_parts_defaults_to_auto_and_lower_passes_it_on(monkeypatch):
    from sparsecore.backends.cuda import fa4_occupancy
    from sparsecore.backends.cuda.fa4_backend import Fa4Backend, Fa4Options
    assert Fa4Options().key_parts is None and Fa4Options(key_parts=None).key_parts is None
    assert Fa4Options(key_parts=1).key_parts == 1 and Fa4Options(key_parts=16).key_parts == 16
    assert Fa4Backend().parse_options({}) == Fa4Options()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(fa4_occupancy, "supported", lambda: True)
    mask = BlockMask.full(2, 64 * 8, 64 * 8, 64)
    launch = Fa4Backend().lower(mask, "cuda", Fa4Options())
    assert launch.key_parts is None and launch.two_per_sm                       # auto, on the two-CTA kernel
    assert Fa4Backend().lower(mask, "cuda", Fa4Options(key_parts=3)).key_parts == 3


NONFINITE_LAYOUTS = {   # (q offsets, kv offsets, bad value tokens)
    "4 blocks": (np.array([0, 39, 78, 101]), np.array([0, 39, 78, 117, 130]), (5, 80, 129)),
    "70 blocks (two words, bit 31)": (np.arange(0, 106, 5), np.append(np.arange(0, 346, 5), 349),
                                      (158, 162, 318, 347)),                # blocks 31, 32, 63, 69 (the short last)
}


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("layout_name", sorted(NONFINITE_LAYOUTS))
@pytest.mark.parametrize("key_parts", [1, 2])
def test_a_non_finite_value_reaches_only_the_rows_that_attend_to_it_through_a_stand_in_kernel(fake_fa4, value,
                                                                                              group, layout_name,
                                                                                              key_parts):
    """The stand-in, like FA4's mask tiles, multiplies masked-out values by weight 0 (``0 * inf = NaN``) over
    every key: only the lowering's guard keeps the value to the rows whose lists name its block."""
    rng = np.random.default_rng(8)
    q_offsets, kv_offsets, tokens = NONFINITE_LAYOUTS[layout_name]
    q_len, kv_len, mb = int(q_offsets[-1]), int(kv_offsets[-1]), len(q_offsets) - 1
    mask = random_mask(rng, q_offsets, kv_offsets, 4, 0.5)
    launch = fake_fa4.Fa4Launch(mask, 32, 32, key_parts=key_parts)
    q = torch.randn(2, 4, q_len, 16, dtype=torch.float64)
    k = torch.randn(2, 4 // group, kv_len, 16, dtype=torch.float64)
    v = torch.randn(2, 4 // group, kv_len, 16, dtype=torch.float64)
    clean, clean_lse = launch(q, k, v, 0.3, True)
    assert launch.converted("cpu", launch.key_parts_for(k, v)).layout.needs_mask_mod
    for token in tokens:
        bad = v.clone()
        bad[1, 0, token, 3] = value
        out, lse = launch(q, k, bad, 0.3, True)
        block = int(np.searchsorted(kv_offsets, token, side="right")) - 1
        hit = torch.zeros(2, 4, q_len, dtype=torch.bool)
        for h in range(group):                                             # the query heads of key head 0
            for i in range(mb):
                if block in list(mask.row(h, i)):
                    hit[1, h, q_offsets[i]:q_offsets[i + 1]] = True
        assert hit.any()
        assert torch.equal(out[~hit], clean[~hit]) and torch.equal(lse, clean_lse)
        assert not torch.isfinite(out[hit][:, 3]).any()
        assert torch.equal(out[hit][:, [0, 1, 2, 4]], clean[hit][:, [0, 1, 2, 4]])


@pytest.fixture
def fake_sm90(fake_fa4, monkeypatch):
    """The stand-in plus FA4's ``interface._flash_attn_fwd`` and SM90 forward class, recording each call."""
    calls = []

    class FakeForwardSm90:
        """FA4's order in ``__call__``: the register split, then ``_setup_attributes``, then ``kernel``."""

        def __init__(self, num_wg_mma, num_threads=128):
            self.num_wg_mma, self.num_threads = num_wg_mma, num_threads
            self.num_mma_regs, self.num_producer_regs = {1: (256, 56), 2: (240, 24)}[num_wg_mma]

        def _setup_attributes(self):
            self.setup_saw = (self.num_mma_regs, self.num_producer_regs)

        def kernel(self, *args):
            return types.SimpleNamespace(launch=lambda **kwargs: kwargs)

    interface = sys.modules["flash_attn.cute.interface"]                    # the stand-in's, one-CTA calls too
    monkeypatch.setattr(interface, "FlashAttentionForwardSm90", FakeForwardSm90, raising=False)

    def fake_fwd(q, k, v, *, num_threads=None, **kwargs):
        calls.append((interface.FlashAttentionForwardSm90, num_threads))
        if q.shape[-1] == 8:
            raise RuntimeError("a compile error")
        return _fake_flash_attn_fwd(q, k, v, **kwargs)

    interface._flash_attn_fwd = fake_fwd
    sm90 = types.ModuleType("flash_attn.cute.flash_fwd_sm90")
    sm90.FlashAttentionForwardSm90 = FakeForwardSm90
    monkeypatch.setitem(sys.modules, "flash_attn.cute.flash_fwd_sm90", sm90)
    from sparsecore.backends.cuda import fa4_occupancy
    fa4_occupancy._forward_class.cache_clear()
    yield types.SimpleNamespace(calls=calls, original=FakeForwardSm90, backend=fake_fa4)
    fa4_occupancy._forward_class.cache_clear()


def test_two_ctas_per_sm_builds_one_warpgroup_kernels_with_a_shared_register_split(fake_sm90):
    """The subclass changes one-warpgroup kernels only, and only while the lowering's own call runs."""
    from sparsecore.backends.cuda import fa4_occupancy
    rng = np.random.default_rng(3)
    mask = random_mask(rng, np.array([0, 32, 64]), np.array([0, 32, 64, 96]), 2, 0.6)
    q = torch.randn(1, 2, 64, 16)
    k, v = torch.randn(1, 2, 96, 16), torch.randn(1, 2, 96, 16)
    two, one = (fake_sm90.backend.Fa4Launch(mask, 32, 32, two_per_sm=flag) for flag in (True, False))
    torch.testing.assert_close(two(q, k, v, 0.3, True), one(q, k, v, 0.3, True))
    (cls, threads), (one_cls, one_threads) = fake_sm90.calls
    assert one_cls is fake_sm90.original and one_threads is None         # the one-CTA launch: FA4's own kernel
    assert threads == fa4_occupancy.TWO_PER_SM_THREADS and cls is not fake_sm90.original
    assert issubclass(cls, fake_sm90.original)
    assert sys.modules["flash_attn.cute.interface"].FlashAttentionForwardSm90 is fake_sm90.original   # restored
    threads = fa4_occupancy.TWO_PER_SM_THREADS
    single, double, theirs = cls(1, num_threads=threads), cls(2, num_threads=threads), cls(1, num_threads=384)
    for built in (single, double, theirs):
        built._setup_attributes()
    assert single.setup_saw == (fa4_occupancy.MMA_REGS, fa4_occupancy.PRODUCER_REGS)
    assert double.setup_saw == (240, 24) and theirs.setup_saw == (256, 56)     # FA4's own calls keep FA4's kernel
    assert single.kernel().launch(grid=1, min_blocks_per_mp=1)["min_blocks_per_mp"] == 2
    assert double.kernel().launch(grid=1, min_blocks_per_mp=1)["min_blocks_per_mp"] == 1
    assert theirs.kernel().launch(grid=1, min_blocks_per_mp=1)["min_blocks_per_mp"] == 1
    single.num_mma_regs = 256                               # as if FA4 set its split after _setup_attributes
    with pytest.raises(RuntimeError, match="ctas_per_sm=1"):
        single.kernel()
    bad = torch.randn(1, 2, 64, 8)
    with pytest.raises(RuntimeError, match="a compile error"):
        two(bad, bad[:, :, :1].expand(1, 2, 96, 8), bad[:, :, :1].expand(1, 2, 96, 8), 0.3, False)
    assert sys.modules["flash_attn.cute.interface"].FlashAttentionForwardSm90 is fake_sm90.original   # restored


@pytest.mark.parametrize("tiles, ctas, installed, expected", [
    ((64, 64), 2, True, True), ((64, 128), 2, True, False), ((128, 128), 2, True, False),
    ((64, 64), 1, True, False), ((64, 64), 2, False, False)])
def test_two_ctas_per_sm_only_for_the_measured_case(monkeypatch, tiles, ctas, installed, expected):
    """SM90, 64 x 64 tiles (64 x 128 needs ~144 KB of shared memory a CTA), the tested flash-attn-4, ctas_per_sm=2."""
    from sparsecore.backends.cuda import fa4_backend, fa4_occupancy
    monkeypatch.setattr(fa4_occupancy, "supported", lambda: installed)
    assert fa4_backend.two_ctas_per_sm(*tiles, fa4_backend.Fa4Options(ctas_per_sm=ctas)) is expected


@pytest.mark.parametrize("regs", [(232, 40), (220, 36), (240, 16), (120, 136), (216.0, 40)])
def test_register_splits_two_ctas_cannot_share_are_refused(regs):
    from sparsecore.backends.cuda import fa4_occupancy
    with pytest.raises(ValueError, match="mma_regs, producer_regs"):
        fa4_occupancy.forward_class(*regs)


@pytest.mark.parametrize("value", [0, 3, True, "2", 2.0])
def test_ctas_per_sm_takes_one_or_two(value):
    from sparsecore.backends.cuda.fa4_backend import Fa4Options
    with pytest.raises(ValueError, match="ctas_per_sm"):
        Fa4Options(ctas_per_sm=value)


def test_lse_merge_is_attention_over_both_key_sets():
    """The in-place merge against the float64 rule, rows empty on either side or both, a NaN output of a set
    with keys kept and one of an empty set ignored (Triton's interpreter on CPU)."""
    from sparsecore.backends.cuda import interpreter
    from sparsecore.backends.cuda.lse_merge import merge_into
    if not interpreter.interpreting():
        pytest.skip("lse_merge is a Triton kernel: on CPU tensors it runs only in Triton's interpreter "
                    "(set TRITON_INTERPRET=1)")
    gen = torch.Generator().manual_seed(4)
    out = torch.randn(2, 3, 70, 24, generator=gen).transpose(1, 2).contiguous().transpose(1, 2)   # FA4's layout
    part = torch.randn(2, 3, 70, 24, generator=gen)
    lse, part_lse = (torch.randn(2, 3, 70, generator=gen) * 4 for _ in range(2))
    lse[0, 0, :5] = -math.inf                                      # empty in the first set
    part_lse[0, 1, :5] = -math.inf                                 # empty in the second
    lse[1, 2, :3] = part_lse[1, 2, :3] = -math.inf                 # empty in both
    out[0, 0, :5] = 0.0
    part[0, 1, :5] = math.nan                                      # undefined where its set is empty
    part[1, 0, 7, 3] = math.nan                                    # a set with keys that attends a NaN value
    out[1, 2, :3] = part[1, 2, :3] = 0.0
    part_lse[1, 1, 9] = math.nan                                   # a set that attends a NaN key (or query)
    lse[1, 1, 10] = math.nan
    part_lse[0, 2, 11] = lse[0, 2, 12] = math.inf
    a, la, b, lb = (t.double() for t in (out, lse, part, part_lse))
    want_lse = torch.logaddexp(la, lb)
    base = torch.where(torch.isfinite(want_lse), want_lse, 0.0)
    wa = torch.where(torch.isneginf(la), 0.0, torch.exp(la - base))[..., None]
    wb = torch.where(torch.isneginf(lb), 0.0, torch.exp(lb - base))[..., None]
    want = torch.where(wa > 0, wa * a, 0.0) + torch.where(wb > 0, wb * b, 0.0)
    merge_into(out, lse, part, part_lse)
    finite = torch.isfinite(want_lse)
    np.testing.assert_allclose(lse.double()[finite].numpy(), want_lse[finite].numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out.double()[finite].numpy(), want[finite].numpy(), rtol=1e-5, atol=1e-6)
    assert torch.isnan(out[1, 0, 7, 3]) and torch.isfinite(out[0, 1, :5]).all()
    assert (out[1, 2, :3] == 0).all() and torch.isneginf(lse[1, 2, :3]).all()
    for h, row in ((1, 9), (1, 10), (2, 11), (2, 12)):                # NaN or inf LSE: the row is not empty
        batch = 1 if h == 1 else 0
        assert not torch.isfinite(lse[batch, h, row]) and not torch.isneginf(lse[batch, h, row])
        assert torch.isnan(out[batch, h, row]).all()


def test_lse_merge_reads_any_strides():
    from sparsecore.backends.cuda import interpreter
    from sparsecore.backends.cuda.lse_merge import merge_into
    if not interpreter.interpreting():
        pytest.skip("lse_merge is a Triton kernel: on CPU tensors it runs only in Triton's interpreter "
                    "(set TRITON_INTERPRET=1)")
    gen = torch.Generator().manual_seed(5)
    out = torch.randn(1, 2, 16, 40, generator=gen)[..., ::2]         # a last stride of 2
    lse = torch.randn(1, 16, 2, generator=gen).transpose(1, 2)      # a sequence stride of 2
    part, part_lse = torch.randn(1, 2, 16, 20, generator=gen), torch.randn(1, 2, 16, generator=gen)
    want_lse = torch.logaddexp(lse, part_lse)
    want = torch.exp(lse - want_lse)[..., None] * out + torch.exp(part_lse - want_lse)[..., None] * part
    merge_into(out, lse, part, part_lse)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_a_new_length_compiles_no_new_guard_merge_or_tile_lists_kernel():
    """The non-finite guard's, the merge's and the conversion's Triton kernels do not specialize on lengths, counts
    or list widths: a length of another divisibility by 16 (1970 after 2048, so are its tile counts; blocks of 48
    tokens on 64-token tiles, off the grid) reuses the compiled kernels (Triton's per-device kernel cache)."""
    from sparsecore.backends.cuda import interpreter
    from sparsecore.backends.cuda.fa4_nonfinite import _zero_non_finite, guard_values
    from sparsecore.backends.cuda.fa4_tile_lists_kernel import fa4_tile_lists_kernel
    from sparsecore.backends.cuda.lse_merge import _merge_into, merge_into
    if not torch.cuda.is_available() or interpreter.interpreting():
        pytest.skip("counts compiled Triton kernels: needs a CUDA device without TRITON_INTERPRET=1")
    import triton
    compiled = {}
    rng = np.random.default_rng(13)
    for length in (2048, 1970):                                   # 32 and 31 tiles of 64
        v = torch.randn(1, 2, length, 64, device="cuda", dtype=torch.bfloat16)
        guard_values(v)
        out, part = (torch.randn(1, 2, length, 64, device="cuda") for _ in range(2))
        lse, part_lse = (torch.randn(1, 2, length, device="cuda") for _ in range(2))
        merge_into(out, lse, part, part_lse)
        offsets = np.append(np.arange(0, length, 48), length)
        mask = random_mask(rng, offsets, offsets, 2, 0.3 if length == 2048 else 0.6)
        assert to_fa4(mask, 64, 64, "cuda").num_mask_tiles > 0
        device = triton.runtime.driver.active.get_current_device()
        compiled[length] = [len(kernel.device_caches[device][0])
                            for kernel in (_zero_non_finite, _merge_into, fa4_tile_lists_kernel)]
    assert compiled[1970] == compiled[2048], compiled


@pytest.mark.parametrize("key_parts", [1, 2, 3])
def test_a_nan_key_reaches_every_row_that_attends_it_across_key_parts(fake_fa4, key_parts):
    """A NaN key makes a listing row's LSE NaN: the merge must carry it, not take the row for empty; rows whose
    first key range lists nothing (merged into a zero output) come out right too."""
    rng = np.random.default_rng(9)
    q_offsets, kv_offsets = np.array([0, 32, 64, 96]), np.array([0, 32, 64, 96, 128, 160, 192])
    base = random_mask(rng, q_offsets, kv_offsets, 2, 0.5)
    rows = [[[b for b in base.row(h, i) if b >= 2] for i in range(3)] for h in range(2)]   # key range 0 unlisted
    rows[0][0] = sorted({*rows[0][0], 4})
    rows[1][1] = [b for b in rows[1][1] if b != 4]
    mask = BlockMask.from_lists(rows, q_offsets, kv_offsets)
    launch = fake_fa4.Fa4Launch(mask, 32, 32, key_parts=key_parts)
    q, k, v = torch.randn(1, 2, 96, 16), torch.randn(1, 2, 192, 16), torch.randn(1, 2, 192, 16)
    clean_out, clean_lse = launch(q, k, v, 0.3, True)
    assert_float32_like_dense(clean_out, clean_lse, mask, q, k, v)
    bad = k.clone()
    bad[0, 0, 4 * 32 + 3, 5] = math.nan                                   # a key in block 4, key head 0
    out, lse = launch(q, bad, v, 0.3, True)
    for h in range(2):
        for i in range(3):
            span = slice(int(q_offsets[i]), int(q_offsets[i + 1]))
            if h == 0 and 4 in list(mask.row(h, i)):
                assert torch.isnan(lse[0, h, span]).all() and torch.isnan(out[0, h, span]).all()
            else:
                assert torch.equal(out[0, h, span], clean_out[0, h, span])
                assert torch.equal(lse[0, h, span], clean_lse[0, h, span])


@pytest.mark.parametrize("value", [0, -1, 17, 2.0, True, "auto", "4"])
def test_key_parts_takes_none_or_an_int_from_1_to_16(value):
    from sparsecore.backends.cuda.fa4_backend import Fa4Options
    with pytest.raises(ValueError, match="key_parts: expected None .auto"):
        Fa4Options(key_parts=value)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("key_parts", [1, 3])
def test_masks_of_one_tile_per_block_match_the_float64_oracle_on_a_gpu(dtype, key_parts):
    """The lists-as-they-are conversion and key ranges on FA4 itself: 64-token blocks (short last one, q_len and
    kv_len apart, empty rows, GQA) on 64 x 64 tiles."""
    from sparsecore.backends.cuda.fa4_backend import Fa4Backend
    reason = Fa4Backend().unavailable_reason("cuda")
    if reason is not None:
        pytest.skip(f"fa4 is not available here: {reason}")
    rng = np.random.default_rng(11)
    q_offsets, kv_offsets = BlockMask.uniform_offsets(64 * 20 + 17, 64), BlockMask.uniform_offsets(64 * 23 + 5, 64)
    keep = rng.random((4, 21, 24)) < 0.3
    keep[:, 3], keep[1, 7], keep[2, 20] = False, False, False                  # empty rows, the short last one too
    mask = BlockMask.from_lists([[np.flatnonzero(row) for row in head] for head in keep], q_offsets, kv_offsets)
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(1, 4, mask.q_len, 128, generator=gen)
    k, v = (torch.randn(1, 2, mask.kv_len, 128, generator=gen) for _ in range(2))
    kernel = sparsecore.compile(mask, device="cuda", backend="fa4", key_parts=key_parts, cache=False)
    out, lse = kernel(*(t.to("cuda", getattr(torch, dtype)) for t in (q, k, v)), scale=0.1, return_lse=True)
    q, k, v = (t.to(getattr(torch, dtype)).double().numpy() for t in (q, k, v))
    want_out, want_lse = dense_attention(q, k, v, expand_to_tokens(mask), 0.1)
    got = out.double().cpu().numpy()
    assert np.linalg.norm(got - want_out) / np.linalg.norm(want_out) <= OUT_REL[dtype]
    kept = np.isfinite(want_lse)
    assert (np.isneginf(lse.cpu().numpy()) == ~kept).all()
    assert np.abs(lse.double().cpu().numpy()[kept] - want_lse[kept]).max() <= LSE_ABS[dtype] * max(
        1.0, np.abs(want_lse[kept]).max())


# ------------------------------------------------------------------------------------------ key-tile ranges
@pytest.mark.parametrize("tiles, reorder_keys", [((32, 32), True), ((32, 32), False), ((16, 64), True),
                                                 ((64, 64), True)])
@pytest.mark.parametrize("count", [2, 3, 7])
def test_key_ranges_are_the_whole_lists_cut_at_tile_edges(tiles, reorder_keys, count):
    """Each range's lists, shifted back by its first tile, are the whole layout's tiles inside the range, full and
    mask alike; the lists stay ascending (checked as FA4 needs them) and the ranges cover every listed tile once."""
    from sparsecore.backends.cuda.fa4_key_ranges import ALIGN, split_lists, tile_edges
    rng = np.random.default_rng(count)
    masks = [mask_with_an_empty_row(), random_mask(rng, BlockMask.uniform_offsets(64 * 5 + 9, 64),
                                                   BlockMask.uniform_offsets(64 * 9 + 1, 64), 3, 0.4)]
    for mask in masks:
        layout = to_fa4(mask, *tiles, reorder_keys=reorder_keys, key_parts=count)
        edges = tile_edges(layout.num_kv_tiles, count)
        assert edges[0] == 0 and edges[-1] == layout.num_kv_tiles and len(edges) == min(count, edges[-1]) + 1
        assert layout.key_edges == tuple(edges) and len(layout.key_widths) == 2 * (len(edges) - 1)
        ranges = split_lists(layout, edges)
        read_here = split_lists(dataclasses.replace(layout, key_widths=None), edges)    # widths read by the cut
        for got, want in zip(ranges, read_here):
            assert all(torch.equal(getattr(got, f), getattr(want, f)) for f in ("mask_block_cnt", "mask_block_idx",
                                                                              "full_block_cnt", "full_block_idx"))
        whole_full, whole_mask = tile_status(layout)
        for lists, first, stop in zip(ranges, edges[:-1], edges[1:]):
            assert (lists.first, lists.stop) == (first, stop)
            keys = slice(first * layout.tile_n, stop * layout.tile_n)
            tables = {"kv_block_of_token": layout.kv_block_of_token[keys]} if layout.needs_mask_mod else {}
            part = Fa4Layout(**{**layout.__dict__, "kv_len": (stop - first) * layout.tile_n, **tables,
                                **{f: getattr(lists, f) for f in ("mask_block_cnt", "mask_block_idx",
                                                                  "full_block_cnt", "full_block_idx")}})
            check_layout(part)
            full, partial = tile_status(part)
            assert torch.equal(full, whole_full[:, :, first:stop])
            assert torch.equal(partial, whole_mask[:, :, first:stop])
            for kind in ("full", "mask"):
                idx, cnt = getattr(lists, f"{kind}_block_idx"), getattr(lists, f"{kind}_block_cnt")
                assert idx.storage_offset() % ALIGN == 0 and idx.is_contiguous()
                unused = torch.arange(idx.shape[-1]) >= cnt[..., None]
                assert (idx[unused] == 0).all()                                # the layout's contract: 0, never read
            assert lists.empty == (not full[:, :, :].any() and not partial.any())


def test_one_key_range_is_the_layout_itself():
    from sparsecore.backends.cuda.fa4_key_ranges import split_lists, tile_edges
    layout = to_fa4(mask_with_an_empty_row(), 32, 32)
    (lists,) = split_lists(layout, tile_edges(layout.num_kv_tiles, 1))
    assert lists.full_block_idx is layout.full_block_idx and lists.mask_block_cnt is layout.mask_block_cnt


# ------------------------------------------------------------------------------------------ approximating masks
@pytest.mark.parametrize("kind", ["zeroth", "global-first-order", "grouped-first-order:2"])
@pytest.mark.parametrize("key_parts", [1, 3])
@pytest.mark.parametrize("group", [1, 2])
def test_approximating_masks_match_the_float64_oracle_through_a_stand_in_kernel(fake_fa4, kind, key_parts, group):
    """FA4's exact part (the stand-in) over the listed blocks, in key ranges, then Triton's approximation pass (in
    the interpreter) merged in place: the result is the oracle's, also for the row that lists nothing (head 1's
    last) and with the LSE."""
    from oracle_unselected import approximated_attention
    from sparsecore.ir import Unselected
    base = mask_with_an_empty_row()
    mask = BlockMask(base.num_heads, base.q_offsets, base.kv_offsets, base.indptr, base.indices,
                     unselected=Unselected.parse(kind))
    launch = fake_fa4.Fa4Launch(mask, 32, 32, key_parts=key_parts)
    gen = torch.Generator().manual_seed(12)
    q = torch.randn(2, 4, 101, 16, generator=gen)
    k, v = (torch.randn(2, 4 // group, 130, 16, generator=gen) for _ in range(2))
    out, lse = launch(q, k, v, 0.3, True)
    want_out, want_lse = approximated_attention(q.double().numpy(), k.double().numpy(), v.double().numpy(), mask, 0.3)
    assert np.linalg.norm(out.double().numpy() - want_out) / np.linalg.norm(want_out) <= OUT_REL["float32"]
    np.testing.assert_allclose(lse.double().numpy(), want_lse, atol=LSE_ABS["float32"] * np.abs(want_lse).max())
    alone, no_lse = launch(q, k, v, 0.3, False)
    assert no_lse is None and torch.equal(alone, out)


def test_plans_kept_on_the_host_give_the_same_attention_and_hold_no_device_tensor(fake_fa4):
    """keep_plans_on_host: the converted tensors wait in one host buffer and are assembled anew at each call;
    before and after the switch, with key ranges, mask tiles and a key order, the results are the same."""
    from sparsecore.backends.cuda.fa4_launch import _HostPlan
    mask = mask_with_an_empty_row()
    torch.manual_seed(4)
    q = torch.randn(2, 4, 101, 16, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 130, 16, dtype=torch.float64) for _ in range(2))
    for key_parts in (1, 3):
        on_device = fake_fa4.Fa4Launch(mask, 32, 32, key_parts=key_parts)
        want = on_device(q, k, v, 0.3, True)
        assert on_device.converted("cpu", key_parts).layout.kv_order is not None      # the reordered path
        on_device.keep_plans_on_host()                                                # after a first call
        held = fake_fa4.Fa4Launch(mask, 32, 32, key_parts=key_parts)
        held.keep_plans_on_host()                                                     # before any call
        bad = v.clone()
        bad[1, 0, 80, 3] = math.nan                                    # the non-finite guard runs from the host plan
        want_bad = fake_fa4.Fa4Launch(mask, 32, 32, key_parts=key_parts)(q, k, bad, 0.3, True)
        assert torch.isnan(want_bad[0]).any()
        for launch in (on_device, held):
            for _ in range(2):
                got = launch(q, k, v, 0.3, True)
                assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
            got_bad = launch(q, k, bad, 0.3, True)
            assert torch.equal(got_bad[0].isnan(), want_bad[0].isnan())
            assert torch.equal(got_bad[0].nan_to_num(), want_bad[0].nan_to_num())
            (plan,) = launch._prepared.values()
            assert isinstance(plan, _HostPlan) and not any(
                isinstance(value, torch.Tensor) for value in vars(plan.layout).values())


def test_ranges_no_list_reaches_are_not_launched_and_the_whole_lists_are_not_kept(fake_sm90):
    """Rows listing only the last key blocks: with 3 ranges over 6 key tiles the first range is empty, so a call
    launches FA4 twice; the plan keeps the ranges' lists, not the whole mask's as well."""
    fake_fa4 = fake_sm90.backend
    offsets = np.arange(0, 193, 32)
    mask = BlockMask.from_lists([[[4, 5], [2, 5], [3]], [[5], [4], [2, 3, 4]]], offsets[:4], offsets)
    launch = fake_fa4.Fa4Launch(mask, 32, 32, two_per_sm=True, key_parts=3)
    torch.manual_seed(2)
    q, k, v = torch.randn(1, 2, 96, 16), torch.randn(1, 2, 192, 16), torch.randn(1, 2, 192, 16)
    assert_float32_like_dense(*launch(q, k, v, 0.3, True), mask, q, k, v)
    prepared = launch.converted("cpu", 3)
    assert [(r.first, r.stop) for r in prepared.ranges] == [(2, 4), (4, 6)] and len(fake_sm90.calls) == 2
    assert [lists.empty for lists in prepared.lists] == [True, False, False]
    assert prepared.layout.full_block_idx is None and prepared.layout.mask_block_cnt is None


def test_rows_fa4_leaves_nan_with_lse_minus_inf_get_lse_nan():
    """FA4's finalize gives LSE -inf to a row whose sum is NaN (a NaN score) and keeps the NaN in its output; the
    key ranges' merge and the approximation pass then read "no keys" and drop the NaN. Rows without keys (output 0,
    LSE -inf) and rows with numbers keep theirs."""
    from sparsecore.backends.cuda.fa4_launch import nan_score_lse
    out = torch.zeros(2, 5, 3, 4)                                  # FA4's [B, q_len, H, D]
    lse = torch.randn(2, 3, 5)                                     # [B, H, q_len]
    out[1, 2, 0] = math.nan                                        # a NaN score: FA4 wrote -inf for it
    lse[1, 0, 2] = lse[0, 2, 4] = -math.inf                        # ... and for a row without keys
    out[0, 3, 1, 2] = math.nan                                     # a NaN value's dim: its LSE is a number
    fixed = nan_score_lse(out, lse)
    assert math.isnan(fixed[1, 0, 2]) and fixed[0, 2, 4] == -math.inf
    assert torch.equal(fixed.isnan(), torch.zeros_like(lse, dtype=torch.bool).index_put_(
        (torch.tensor([1]), torch.tensor([0]), torch.tensor([2])), torch.tensor(True)))
    assert fixed[0, 1, 3] == lse[0, 1, 3]


@pytest.mark.parametrize("blocks", [3, 33, 65, 70])
def test_keep_bits_have_an_even_word_count(blocks):
    """The keep bits' word count is rounded up to even (FA4's import of an aux tensor), contiguous."""
    kv_offsets = np.arange(0, 3 * blocks + 1, 3)
    keep = np.random.default_rng(blocks).random((2, 2, blocks)) < 0.4
    mask = BlockMask.from_lists([[np.flatnonzero(r).tolist() for r in h] for h in keep], [0, 7, 16], kv_offsets)
    layout = to_fa4(mask, 16, 16, reorder_keys=False)
    assert layout.needs_mask_mod
    assert layout.keep_bits.shape[-1] == 2 * -(-blocks // 64) and layout.keep_bits.stride(-1) == 1
