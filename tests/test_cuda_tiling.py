"""The CUDA lowerings' launch metadata, checked on any machine (no GPU, no triton needed).

Triton's tile schedule must cover every kept (query, key) pair exactly once and nothing
else; FlashInfer's folded CSR must map head h of batch b to key head h // G.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from host_reads import HostReads
from oracle import expand_to_tokens
from strategies import block_masks
from test_block_mask_views import ANY

import sparsecore
from sparsecore import BlockMask, VideoGeometry
from sparsecore.methods import pasa
from sparsecore.workloads import video_qkv
from sparsecore.backends.cuda.flashinfer_backend import FoldedHeadsLaunch
from sparsecore.backends.cuda.tiling import schedule_tiles


def covered_pairs(mask: BlockMask, block_m: int, block_n: int) -> np.ndarray:
    """Count, per (head, query, key) token pair, how often the schedule's programs compute it."""
    tiles = schedule_tiles(mask.to("cpu"), block_m, block_n)
    full, p_start, p_end = (t.numpy() for t in (tiles.full_start, tiles.partial_start, tiles.partial_end))
    full = full * block_n if tiles.full_in_blocks else full              # block ids of blocks that are the tiles
    counts = np.zeros((mask.num_heads, mask.q_len, mask.kv_len), dtype=np.int64)
    for head, q_start, q_end, full_first, num_full, partial_first, num_partial in tiles.programs.numpy():
        rows = slice(q_start, min(q_end, q_start + block_m))
        for start in full[full_first:full_first + num_full]:
            counts[head, rows, start:start + block_n] += 1
        for start, end in zip(p_start[partial_first:partial_first + num_partial],
                              p_end[partial_first:partial_first + num_partial]):
            assert 0 < end - start < block_n, "partial tiles are partial, not empty"
            counts[head, rows, start:end] += 1
    return counts


@given(block_masks(ANY, num_heads=3), st.sampled_from([16, 64]), st.sampled_from([16, 32, 128]))
def test_tiles_cover_every_kept_pair_exactly_once(mask, block_m, block_n):
    counts = covered_pairs(mask, block_m, block_n)
    assert (counts == expand_to_tokens(mask)).all()


@given(block_masks(ANY, num_heads=2))
def test_programs_are_ordered_longest_first(mask):
    programs = schedule_tiles(mask.to("cpu"), 32, 32).programs.numpy()
    work = programs[:, 4] + programs[:, 6]
    assert (np.diff(work) <= 0).all()


@given(st.integers(1, 3), st.integers(2, 7), st.integers(1, 64), st.integers(0, 2**32 - 1))
def test_blocks_of_whole_tiles_have_at_most_one_partial_tile_per_row(tiles_per_block, blocks, last, seed):
    """Key blocks of whole tiles (64-token blocks, 32-key tiles) but a short last one: the partial lists are
    sized by the rows, not the kept blocks, and the schedule still covers every kept pair once."""
    block_n = 32
    offsets = np.append(np.arange(blocks) * tiles_per_block * block_n, (blocks - 1) * tiles_per_block * block_n + last)
    keep = np.random.default_rng(seed).random((2, blocks, blocks)) < 0.6
    mask = BlockMask.from_lists([[np.flatnonzero(row).tolist() for row in head] for head in keep], offsets, offsets)
    tiles = schedule_tiles(mask.to("cpu"), 16, block_n)
    assert tiles.partial_start.shape[0] <= 2 * blocks + 1 and tiles.partial_end.shape == tiles.partial_start.shape
    assert (covered_pairs(mask, 16, block_n) == expand_to_tokens(mask)).all()


@given(st.sampled_from([16, 32, 64]), st.integers(1, 9), st.integers(1, 64), st.integers(0, 2**32 - 1))
def test_blocks_that_are_the_tiles_schedule_from_the_lists_themselves(block_n, blocks, last, seed):
    """Key blocks of ``block_n`` keys (a shorter last one): the full tiles are the mask's own indices (block ids),
    no list of nnz entries is built, and every kept pair is still covered once."""
    last = min(last, block_n)
    offsets = np.append(np.arange(blocks) * block_n, (blocks - 1) * block_n + last)
    keep = np.random.default_rng(seed).random((3, blocks, blocks)) < 0.5
    mask = BlockMask.from_lists([[np.flatnonzero(row).tolist() for row in head] for head in keep], offsets, offsets)
    device_mask = mask.to("cpu")
    tiles = schedule_tiles(device_mask, 16, block_n)
    assert tiles.full_in_blocks and tiles.full_start.data_ptr() == device_mask.indices.data_ptr()
    assert tiles.partial_start.numel() == 1
    assert (covered_pairs(mask, 16, block_n) == expand_to_tokens(mask)).all()


@given(st.integers(2, 12), st.integers(65, 600), st.integers(0, 2**32 - 1))
def test_one_large_key_block_is_charged_once_a_row_in_the_full_tile_list(blocks, large, seed):
    """16-token blocks and one large block (a text block beside 64-token blocks): the full-tile list is sized by
    the rows' tiles, each row listing the large block once, not every entry charged the large block's tiles (7.4 GB
    for 2.7 M entries beside one 4,096-token block), and the schedule still covers every kept pair once."""
    offsets = np.append(np.arange(blocks + 1) * 16, blocks * 16 + large)
    keep = np.random.default_rng(seed).random((2, blocks + 1, blocks + 1)) < 0.6
    mask = BlockMask.from_lists([[np.flatnonzero(row).tolist() for row in head] for head in keep], offsets, offsets)
    tiles = schedule_tiles(mask.to("cpu"), 16, 16)
    rows = mask.num_heads * mask.num_q_blocks
    assert tiles.full_start.shape[0] <= mask.nnz + rows * -(-large // 16)
    assert (covered_pairs(mask, 16, 16) == expand_to_tokens(mask)).all()


def test_adjacent_blocks_merge_into_runs_so_only_run_ends_are_partial():
    # frame blocks of 39 tokens: frames 0-2 kept together form one run of 117 tokens
    offsets = np.arange(0, 39 * 6 + 1, 39)
    mask = BlockMask.from_lists([[[0, 1, 2, 5]] * 6], offsets, offsets)
    tiles = schedule_tiles(mask.to("cpu"), 64, 32)
    _, _, _, full_first, num_full, partial_first, num_partial = tiles.programs[0].tolist()
    assert (num_full, num_partial) == (4, 2)               # 117 = 3*32 + 21 ; 39 = 32 + 7
    assert tiles.full_start[full_first:full_first + 4].tolist() == [0, 32, 64, 195]
    assert tiles.partial_start[partial_first:partial_first + 2].tolist() == [96, 227]
    assert tiles.partial_end[partial_first:partial_first + 2].tolist() == [117, 234]


def test_flashinfer_fold_maps_heads_to_their_key_head_per_batch():
    # 4 query heads, 2 key heads (G = 2), 2 query blocks, 3 key blocks
    lists = [[[0], [1, 2]], [[2], []], [[0, 1], [0]], [[1], [2]]]
    mask = BlockMask.from_lists(lists, [0, 8, 16], [0, 8, 16, 24])
    indptr, indices = (t.tolist() for t in FoldedHeadsLaunch(mask.to("cpu"), "auto")._folded_csr(2, 2))
    rows = [indices[indptr[r]:indptr[r + 1]] for r in range(len(indptr) - 1)]
    expected = []
    for b in range(2):
        for h, head in enumerate(lists):
            key_space = (b * 2 + h // 2) * 3
            expected += [[key_space + j for j in row] for row in head]
    assert rows == expected


def test_scheduling_keeps_no_upload_between_calls():
    """The schedule copies its small host arrays at each call: nothing stays in the process-wide upload cache."""
    from sparsecore.ir import uploads
    uploads._UPLOADS.clear()
    mask = BlockMask.from_lists([[[0, 1], [1]]], np.array([0, 20, 44]), np.array([0, 24, 60]))
    schedule_tiles(mask.to("cpu"), 16, 16)
    assert len(uploads._UPLOADS) == 0


@given(block_masks(ANY, num_heads=3), st.sampled_from([16, 64]), st.sampled_from([16, 128]))
def test_scheduling_reads_nothing_back_to_the_host(mask, block_m, block_n):
    held = mask.to("cpu")                              # as a method builds it: lists on the run device
    with HostReads() as reads:
        schedule_tiles(held, block_m, block_n)
    assert reads.calls == []


def test_a_pasa_step_plans_and_prepares_its_triton_kernel_without_host_reads():
    """Per layer and step, PASA's plan and the kernel's preparation only queue device work."""
    backend = sparsecore.registered_backends()["triton"]
    emulator = backend.emulator()
    if emulator is None:
        pytest.skip(f"triton on cuda: {backend.unavailable_reason('cuda')} (the CPU check needs TRITON_INTERPRET=1)")
    g = VideoGeometry(5, 6, 8, text_tokens=7)
    q, k, v = video_qkv(g, 4, 32, seed=3)
    q, k, v = (t.half() for t in (q, k, v))
    session = pasa.session(num_steps=50)
    with emulator:
        session.plan(g, 4, step=20, layer=1, q=q, k=k)                    # first use: uploads of the layout
        sparsecore.compile(session.plan(g, 4, step=20, layer=2, q=q, k=k), device="cuda").prepare(q, k, v)
        with HostReads() as reads:
            mask = session.plan(g, 4, step=21, layer=3, q=q, k=k)
            sparsecore.compile(mask, device="cuda", backend="triton").prepare(q, k, v)
    assert reads.calls == []
