"""The ``fa4`` conversion's Triton classification (:mod:`sparsecore.backends.cuda.fa4_tile_lists`), checked on CPU.

Runs the kernel in Triton's interpreter (TRITON_INTERPRET=1, as CI does), or on CUDA tensors on a GPU machine.
Every layout it gives must expand to the IR's token mask, written independently in tests/oracle.py (the check of
tests/test_fa4_layout.py, whose conversions take the torch path), and list the same tiles, counts, key-range
widths and packed block map as the torch path.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies import block_masks
from test_fa4_layout import ANY, assert_exact, check_layout, random_mask

from sparsecore import BlockMask
from sparsecore.backends.cuda import fa4_tile_lists, interpreter
from sparsecore.backends.cuda.fa4_layout import to_fa4
from sparsecore.backends.cuda.fa4_replay import tile_status

SIDES = st.sampled_from([16, 32, 64])


@pytest.fixture(scope="module")
def triton_layout():
    """``(mask, tile_m, tile_n, **options) -> layout`` through the Triton classification, checked against the token
    mask where it runs on CPU (on CUDA against the torch path only, below); skips where the kernel cannot run.
    Stateless, so one per module serves every generated input."""
    if torch.cuda.is_available():
        def on_cuda(mask, tile_m, tile_n, **options):
            layout = to_fa4(mask, tile_m, tile_n, "cuda", **options)
            check_layout(layout)
            return layout
        return on_cuda
    if not interpreter.interpreting():
        pytest.skip("the fa4 conversion's Triton kernel runs on CPU tensors only in Triton's interpreter "
                    "(set TRITON_INTERPRET=1)")

    def emulated(mask, tile_m, tile_n, **options):
        with interpreter.emulating():
            assert fa4_tile_lists.runs_on_triton(torch.device("cpu"))
            assert_exact(mask, tile_m, tile_n)                  # the token mask's pairs, exactly
            layout = to_fa4(mask, tile_m, tile_n, "cpu", **options)
            check_layout(layout)
            return layout
    return emulated


def torch_path(mask, tile_m, tile_n, **options):
    assert not fa4_tile_lists.runs_on_triton(torch.device("cpu"))
    return to_fa4(mask, tile_m, tile_n, "cpu", **options)


def assert_same_tiles(fast, slow) -> None:
    """The same full and mask tiles per (head, query tile), totals, widths, key order and packed block map (heads
    broadcast where a path lists one head for all)."""
    for a, b in zip(tile_status(fast), tile_status(slow)):
        a, b = torch.broadcast_tensors(a.cpu(), b.cpu())
        assert torch.equal(a, b)
    assert (fast.num_full_tiles, fast.num_mask_tiles, fast.kept_pairs) == \
        (slow.num_full_tiles, slow.num_mask_tiles, slow.kept_pairs)
    assert fast.key_widths == slow.key_widths and fast.movable_cost == slow.movable_cost
    assert (fast.kv_order is None) == (slow.kv_order is None)
    assert (fast.keep_bits is None) == (slow.keep_bits is None)
    if fast.keep_bits is not None:
        assert torch.equal(fast.keep_bits.cpu(), slow.keep_bits.cpu())


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
