"""The IR slice (``sparsecore.ir.slicing``) against the token mask: random masks and ranges, host and torch lists."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies import block_masks

from sparsecore import BlockMask, Capabilities
from sparsecore.ir import Unselected
from sparsecore.ir.slicing import slice_mask, slices

ANY = Capabilities(devices=("test",), array_type="numpy", dtypes=frozenset({"float64"}))


@st.composite
def token_ranges(draw, length: int) -> list[tuple[int, int]]:
    """One to three ascending, non-overlapping ``(start, stop)`` ranges inside ``[0, length)``."""
    edges = sorted(draw(st.lists(st.integers(0, length), min_size=2, max_size=6, unique=True)))
    pairs = [(a, b) for a, b in zip(edges[0::2], edges[1::2])]
    return pairs if pairs else [(0, length)]


def tokens(ranges: list[tuple[int, int]]) -> np.ndarray:
    return np.concatenate([np.arange(a, b) for a, b in ranges])


def revalidated(mask: BlockMask) -> BlockMask:
    """The same lists through the validating constructor (sorted, unique, in range, consistent indptr)."""
    host = mask.to_host()
    return BlockMask(host.num_heads, host.q_offsets, host.kv_offsets, np.array(host.indptr), np.array(host.indices),
                     np.array(host.budgets), dict(host.meta))


@settings(max_examples=150, deadline=None)
@given(data=st.data(), num_heads=st.integers(1, 3), on_device=st.booleans())
def test_slice_is_the_token_mask_sub_matrix(data, num_heads, on_device):
    mask = data.draw(block_masks(ANY, num_heads))
    q = data.draw(token_ranges(mask.q_len))
    kv_sets = [data.draw(token_ranges(mask.kv_len)) for _ in range(data.draw(st.integers(1, 3)))]
    source = mask.to("cpu") if on_device else mask
    got = slices(source, q, kv_sets)
    expected_rows = mask.token_mask()[:, tokens(q)]
    for kv, sub in zip(kv_sets, got):
        assert sub.on_host is not on_device
        assert np.array_equal(revalidated(sub).token_mask(), expected_rows[:, :, tokens(kv)]), (q, kv)
        assert sub.q_len == len(tokens(q)) and sub.kv_len == len(tokens(kv))
        assert np.array_equal(sub.to_host().budgets, mask.budgets)


def test_a_cut_block_becomes_shorter_blocks_with_the_same_lists():
    # q blocks [0, 4, 8, 10], kv blocks [0, 4, 6]; head 0 rows keep {0}, {0, 1}, {}
    dense = np.array([[[1, 0], [1, 1], [0, 0]]], dtype=bool)
    mask = BlockMask.from_dense(dense, 10, 6, 4)
    sub = slice_mask(mask, (2, 9), [(1, 2), (3, 5)])
    assert sub.q_offsets.tolist() == [0, 2, 6, 7]            # [2,4) of block 0, block 1, [8,9) of block 2
    assert sub.kv_offsets.tolist() == [0, 1, 2, 3]           # [1,2) and [3,4) of kv block 0, [4,5) of block 1
    assert [sub.row(0, i).tolist() for i in range(3)] == [[0, 1], [0, 1, 2], []]
    assert sub.meta["slice"] == {"q": ((2, 9),), "kv": ((1, 2), (3, 5))}


def test_empty_slice_and_device_lists_stay_on_their_device():
    mask = BlockMask.from_dense(np.eye(4, dtype=bool)[None], 16, 16, 4).to("cpu")
    sub = slice_mask(mask, (0, 8), (8, 16))
    assert sub.nnz == 0 and sub.device == torch.device("cpu") and sub.q_len == 8 and sub.kv_len == 8
    whole = slice_mask(mask, (0, 16), (0, 16))
    assert np.array_equal(whole.to_host().indices, mask.to_host().indices)
    assert np.array_equal(whole.to_host().indptr, mask.to_host().indptr)


@pytest.mark.parametrize("q, kv, message", [
    ((4, 2), (0, 16), "start < stop"),
    ([(0, 8), (4, 12)], (0, 16), "non-overlapping"),
    ((0, 17), (0, 16), "<= 16"),
    ((0, 16), [], "at least one"),
    ((0, 16), "ab", "expected (start, stop)"),
    (torch.tensor(3), (0, 16), "got Tensor tensor(3)"),
    ((np.array(2.0), np.array(7.0)), (0, 16), "q_ranges[0][0]: expected an int, got float 2.0"),
    ((torch.tensor(True), 4), (0, 16), "q_ranges[0][0]: expected an int, got bool True"),
    ([(0, 8), (12, 12)], (0, 16), "q_ranges[1]: expected 8 <= start < stop <= 16"),      # an empty range
    ((0, 16), (5, 5), "kv_range_sets[0][0]: expected 0 <= start < stop <= 16"),
    ([(0, 4), 8], (0, 16), "q_ranges[1]: expected a (start, stop) pair"),                # not read as one pair
])
def test_bad_ranges_name_the_field(q, kv, message):
    mask = BlockMask.full(1, 16, 16, 4)
    with pytest.raises((ValueError, TypeError), match=r"(q_ranges|kv_range_sets\[0\])") as err:
        slice_mask(mask, q, kv)
    assert message in str(err.value)


@pytest.mark.parametrize("q, kv, kv_ints", [
    (torch.tensor([2, 7]), (np.array(0), np.array(16)), [(0, 16)]),
    ((np.array(2), np.int64(7)), np.array([[0, 4], [8, 16]]), [(0, 4), (8, 16)]),
    (torch.tensor([[2, 7]]), [torch.tensor([0, 4]), (8, torch.tensor(16))], [(0, 4), (8, 16)]),
])
def test_ranges_from_arrays_and_tensors_equal_the_same_ints(q, kv, kv_ints):
    """A range given as a NumPy array or tensor, or with 0-d arrays or tensors for ends, is read as the same ints
    (0-d ones have ``__len__`` but no length: they failed with a bare TypeError naming nothing)."""
    mask = BlockMask.from_dense(np.random.default_rng(0).random((2, 4, 4)) < 0.5, 16, 16, 4)
    for source in (mask, mask.to("cpu")):
        assert slice_mask(source, q, kv) == slice_mask(mask, (2, 7), kv_ints)


def test_approximated_masks_slice_by_rows_only():
    mask = BlockMask.full(1, 16, 16, 4)
    approx = BlockMask.unchecked(1, mask.q_offsets, mask.kv_offsets, mask.indptr, mask.indices, mask.budgets,
                                 None, Unselected("zeroth"))
    assert slice_mask(approx, (4, 12), (0, 16)).unselected == Unselected("zeroth")
    assert slice_mask(approx, (0, 16), [(0, 8), (8, 16)]).meta["slice"]["kv"] == ((0, 16),)   # adjacent: one range
    with pytest.raises(ValueError, match="kv_ranges: a mask with unselected='zeroth'"):
        slice_mask(approx, (0, 16), (0, 8))
    with pytest.raises(ValueError, match=r"kv_ranges: .* got \[\(8, 16\)\]"):      # any one partial set refuses
        slices(approx, (0, 16), [(0, 16), (8, 16)])


@given(blocks=st.integers(1, 12), block=st.integers(1, 9), cut=st.data())
def test_a_shard_of_a_uniform_mask_keeps_its_interior_block_size(blocks, block, cut):
    mask = BlockMask.full(1, blocks * block, blocks * block, block)
    start = cut.draw(st.integers(0, mask.q_len - 1))
    stop = cut.draw(st.integers(start + 1, mask.q_len))
    shard = slice_mask(mask, (start, stop), (start, stop))
    expected = block if stop - start > 2 * block else int(shard.q_block_sizes.max())
    assert shard.interior_block_size("q") == shard.interior_block_size("kv") == expected


def test_interior_block_size_is_none_for_mixed_interior_sizes():
    mask = BlockMask.from_lists([[[0], [1], [2], [3]]], [0, 4, 8, 10, 14], [0, 4, 8, 10, 14])
    assert mask.interior_block_size("q") is None and mask.uniform_block_size("q") is None
    assert BlockMask.full(1, 20, 20, 8).interior_block_size("kv") == 8
    first_longer = BlockMask.from_lists([[[0], [1], [2], [3]]], [0, 8, 12, 16, 18], [0, 4, 8, 12, 16])
    assert first_longer.interior_block_size("q") is None                # only a shorter first block is allowed
    assert first_longer.interior_block_size("kv") == 4


def test_each_slice_records_its_own_key_ranges():
    mask = BlockMask.from_lists([[[0, 1], [1]]], [0, 8, 16], [0, 8, 16])
    kv_sets = [[(0, 4)], [(4, 12)], [(12, 16)]]
    cut = slices(mask, [(0, 16)], kv_sets)
    assert [[tuple(r) for r in piece.meta["slice"]["kv"]] for piece in cut] == kv_sets
