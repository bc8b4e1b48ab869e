"""The ``fa4`` conversion's Triton classification (:mod:`sparsecore.backends.cuda.fa4_tile_lists`), checked on CPU.

Runs the kernel in Triton's interpreter (TRITON_INTERPRET=1, as CI does), or on CUDA tensors on a GPU machine.
Every layout it gives must expand to the IR's token mask, written independently in tests/oracle.py (the check of
tests/test_fa4_layout.py, whose conversions take the torch path), carry the IR's block map in its packed bits, and
list the same tiles, counts and key-range widths as the torch path.
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies import block_masks
from test_fa4_layout import ANY, HEADS_NEARLY_ALIKE, assert_layout_exact, random_mask

import sparsecore
from sparsecore import BlockMask
from sparsecore.ir.host_facts import as_new
from sparsecore.backends.cuda import fa4_tile_lists, interpreter
from sparsecore.backends.cuda.fa4_layout import to_fa4
from sparsecore.backends.cuda.fa4_replay import tile_status

SIDES = st.sampled_from([16, 32, 64])


@pytest.fixture(scope="module")
def triton_layout():
    """``(mask, tile_m, tile_n, **options) -> layout`` through the Triton classification (on CUDA, or on CPU in the
    interpreter), each layout checked against the token mask and the IR's block map; skips where the kernel cannot
    run. Stateless, so one per module serves every generated input."""
    if torch.cuda.is_available():
        device, context = "cuda", contextlib.nullcontext
    elif interpreter.interpreting():
        device, context = "cpu", interpreter.emulating
    else:
        pytest.skip("the fa4 conversion's Triton kernel runs on CPU tensors only in Triton's interpreter "
                    "(set TRITON_INTERPRET=1)")

    def convert(mask, tile_m, tile_n, **options):
        with context():
            assert fa4_tile_lists.runs_on_triton(torch.device(device))
            layout = to_fa4(as_new(mask), tile_m, tile_n, device, **options)   # each path reads
        assert_layout_exact(layout, mask)
        assert_bits_are_the_block_map(layout, mask)
        return layout
    return convert


def assert_bits_are_the_block_map(layout, mask) -> None:
    """The packed bits (where the layout has mask tiles) are the IR's block map, read from the mask's rows."""
    if layout.keep_bits is not None:
        heads, rows, blocks = mask.num_heads, len(mask.q_offsets) - 1, len(mask.kv_offsets) - 1
        want = np.zeros((heads, rows, blocks), dtype=bool)
        for h in range(heads):
            for i in range(rows):
                want[h, i, np.asarray(mask.row(h, i), dtype=np.int64)] = True
        words = layout.keep_bits.cpu().numpy().view(np.uint32)                       # [H, MB, NW]
        position = np.arange(words.shape[-1] * 32)
        got = ((words[..., position // 32] >> (position % 32)) & 1).astype(bool)
        assert np.array_equal(got[..., :blocks], want) and not got[..., blocks:].any()


def torch_path(mask, tile_m, tile_n, **options):
    assert not fa4_tile_lists.runs_on_triton(torch.device("cpu"))
    return to_fa4(as_new(mask), tile_m, tile_n, "cpu", **options)


def assert_same_tiles(fast, slow) -> None:
    """The same full and mask tiles per (head, query tile), totals, widths and key order, and the same heads listed
    (one for all where every head's IR lists are alike)."""
    for a, b in zip(tile_status(fast), tile_status(slow)):
        assert torch.equal(a, b)
    assert fast.full_block_cnt.shape == slow.full_block_cnt.shape
    assert (fast.num_full_tiles, fast.num_mask_tiles, fast.kept_pairs) == \
        (slow.num_full_tiles, slow.num_mask_tiles, slow.kept_pairs)
    assert fast.key_widths == slow.key_widths and fast.movable_cost == slow.movable_cost
    assert fast.movable_kept_pairs == slow.movable_kept_pairs
    assert (fast.kv_order is None) == (slow.kv_order is None)
    assert (fast.keep_bits is None) == (slow.keep_bits is None)


@settings(max_examples=30, deadline=None)
@given(block_masks(ANY, num_heads=3), SIDES, SIDES, st.sampled_from([1, 2, 3]))
def test_triton_classification_is_exact_and_lists_the_torch_paths_tiles(triton_layout, mask, tile_m, tile_n,
                                                                         key_parts):
    fast = triton_layout(mask, tile_m, tile_n, key_parts=key_parts)
    assert_same_tiles(fast, torch_path(mask, tile_m, tile_n, key_parts=key_parts))


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 3))
def test_frames_in_another_key_order_and_a_joint_text_block(triton_layout, seed, heads):
    """39-token frames (1,560 scaled down) whose keys :func:`to_fa4` reorders onto 16-token tiles, and 16-token
    video blocks with a short one inside before a text block (the joint masks the kernel is for)."""
    rng = np.random.default_rng(seed)
    frames = np.append(np.arange(0, 39 * 6 + 1, 39), 39 * 6 + 23)
    joint = np.append(np.arange(0, 16 * 9, 16), [16 * 8 + 11, 16 * 8 + 11 + 20])
    for offsets, density in ((frames, 0.9), (joint, 0.3)):
        mask = random_mask(rng, offsets, offsets, heads, density)
        assert_same_tiles(triton_layout(mask, 16, 16), torch_path(mask, 16, 16))


def test_every_head_alike_broadcasts_one_heads_lists(triton_layout):
    rows = [[[0, 2], [1], [], [0, 1, 2]]] * 4
    mask = BlockMask.from_lists(rows, [0, 20, 41, 50, 77], [0, 30, 45, 77])
    fast = triton_layout(mask, 16, 16)
    assert fast.full_block_cnt.shape[1] == 1 and fast.num_heads == 4
    assert_same_tiles(fast, torch_path(mask, 16, 16))


def test_keep_bits_set_each_kept_block_once():
    rng = np.random.default_rng(3)
    keep = rng.random((5, 70)) < 0.4                                     # 5 rows, 70 key blocks: 2 x 2 words
    rows, blocks = np.nonzero(keep)
    bits = fa4_tile_lists.keep_bits(torch.from_numpy(rows), torch.from_numpy(blocks), 5, 70)
    assert bits.dtype == torch.int32 and tuple(bits.shape) == (5, 4)
    words = bits.numpy().view(np.uint32)
    got = (words[:, np.arange(128) // 32] >> (np.arange(128) % 32)) & 1
    assert np.array_equal(got[:, :70].astype(bool), keep) and not got[:, 70:].any()


def test_lists_longer_than_one_program_step(triton_layout):
    """More key tiles than a program classifies at once (:data:`fa4_tile_lists.BLOCK`): the later steps' tiles go
    after the earlier ones' in each list, and their counts add up."""
    rng = np.random.default_rng(11)
    kv_offsets = np.concatenate([[0], np.arange(7, 16 * 300, 16), [16 * 300]])   # a 7-token first block: off the grid
    mask = random_mask(rng, [0, 20, 45], kv_offsets, 2, 0.5)
    fast = triton_layout(mask, 16, 16, key_parts=3)
    assert fast.num_kv_tiles > 2 * fa4_tile_lists.BLOCK
    assert_same_tiles(fast, torch_path(mask, 16, 16, key_parts=3))


@pytest.mark.parametrize("rows", HEADS_NEARLY_ALIKE.values(), ids=HEADS_NEARLY_ALIKE.keys())
def test_heads_alike_but_in_their_row_lengths_or_entries_keep_their_own_lists(triton_layout, rows):
    """Each head keeps its own lists (the torch path's and the aligned path's cases are in test_fa4_layout.py)."""
    offsets = [0, 20, 41, 50, 77]
    mask = BlockMask.from_lists(rows, offsets, offsets)
    fast = triton_layout(mask, 16, 16)
    assert fast.full_block_cnt.shape[1] == 2
    assert_same_tiles(fast, torch_path(mask, 16, 16))


def test_the_torch_and_triton_paths_keep_their_own_tables_of_one_geometry(triton_layout):
    """The geometry cache tells the paths apart (the kernel's tables are only in the Triton path's): a geometry
    converted on the torch path first, then on the Triton path, is exact on both."""
    sparsecore.clear_cache()
    mask = random_mask(np.random.default_rng(12), [0, 20, 41, 50, 77, 90], [0, 20, 41, 50, 77, 90], 2, 0.5)
    slow = torch_path(mask, 16, 16)
    assert_layout_exact(slow, mask)
    assert_same_tiles(triton_layout(mask, 16, 16), slow)


def test_a_conversion_on_cuda_waits_for_the_gpu_once_and_a_copy_of_a_converted_mask_never():
    """One host read per layout built, the one that sizes the lists: with the IR's lists on the GPU (as the methods
    plan them) nothing else in the conversion waits for the stream (torch's sync debug mode counts the waits). A held
    mask's copy brought back to the GPU (AdaSpa's ``store="host"``) after one conversion converts without a wait."""
    if not torch.cuda.is_available() or interpreter.interpreting():
        pytest.skip("counts waits for a CUDA stream: needs a CUDA device without TRITON_INTERPRET=1")
    offsets_q, offsets_kv = [0, 20, 41, 50, 77, 90], [0, 20, 41, 50, 77, 90, 101]
    rng = np.random.default_rng(14)
    to_fa4(random_mask(rng, offsets_q, offsets_kv, 3, 0.5).to("cuda"), 16, 16, "cuda", reorder_keys=False)  # compiles
    mask = random_mask(rng, offsets_q, offsets_kv, 3, 0.5)
    held = mask.to("cuda").copy_to("cpu")                               # pinned host lists, as AdaSpa holds them
    torch.cuda.synchronize()

    def waits_converting(on_gpu):
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                layout = to_fa4(on_gpu, 16, 16, "cuda", reorder_keys=False)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert_layout_exact(layout, mask)
        return [str(w.message) for w in caught if "synchroniz" in str(w.message)]

    first = waits_converting(held.copy_to("cuda"))
    assert len(first) == 1, first
    for _ in range(2):
        again = waits_converting(held.copy_to("cuda"))
        assert again == [], again


def test_the_triton_path_is_refused_by_its_lists_size_not_a_tile_map_it_never_builds(triton_layout, monkeypatch):
    """The torch path builds maps of [heads, query blocks or tiles, key blocks or tiles]; the Triton path only lists
    of the longest row's width. A diagonal mask of 24-token blocks (off the 16-token tiles) whose maps are past the
    (lowered) limit converts there; lists past it are refused, naming them (a 48-head, 428,900-token mask of 64-token
    blocks was refused for its tile map before)."""
    from sparsecore.backends.cuda import fa4_layout
    from sparsecore.registry import UnsupportedError
    offsets = BlockMask.uniform_offsets(24 * 20, 24)
    diagonal = BlockMask.from_lists([[[i] for i in range(20)]] * 2, offsets, offsets)      # tile map 2 x 30 x 30
    monkeypatch.setattr(fa4_layout, "DENSE_LIMIT", 200)
    assert triton_layout(diagonal, 16, 16).kept_pairs == 2 * 20 * 24 * 24
    with pytest.raises(UnsupportedError, match=r"fa4: the block map \[heads, query blocks, key blocks\] \[2, 20, 20\]"):
        torch_path(diagonal, 16, 16)
    with pytest.raises(UnsupportedError, match=r"fa4: the \w+ tile lists \[heads, query tiles, longest list\] "
                                               r"\[\d, 30, \d+\] has \d+ elements.*backend='triton'"):
        triton_layout(BlockMask.full(2, 24 * 20, 24 * 20, 24), 16, 16)
