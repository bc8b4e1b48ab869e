"""The portable lowering's spans: consecutive query blocks of one head that keep the same key blocks are one schedule
row (their keys gathered once, their queries attended together), checked against the float64 oracle.

A full mask of 48 x 48 blocks gathered all 2016 keys for each of its 96 (head, query block) rows, 48 times over: a
span is one row per head. Spans never cross heads, an empty row ends one, and a span too large for
``chunk_elements`` is cut into pieces of query tokens that may cross its blocks' boundaries.
"""

from __future__ import annotations

import warnings
from dataclasses import fields

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from host_reads import HostReads
from largest_result import LargestResult
from oracle import block_lists, dense_attention, expand_to_tokens

import sparsecore
from sparsecore import BlockMask
from sparsecore.backends.portable import lowering
from sparsecore.backends.portable.lowering import Chunk, schedule_chunks


def expected_spans(mask: BlockMask) -> list[tuple[int, int, int]]:
    """(head, first query token, end query token) of each run of consecutive non-empty rows of a head that list the
    same key blocks, read from the raw lists one row at a time."""
    q_offsets = np.asarray(mask.q_offsets)
    spans = []
    for h, rows in enumerate(block_lists(mask)):
        for i, listed in enumerate(rows):
            if len(listed) == 0:
                continue
            if i > 0 and spans and spans[-1][0] == h and spans[-1][2] == q_offsets[i] \
                    and np.array_equal(rows[i - 1], listed):
                spans[-1] = (h, spans[-1][1], int(q_offsets[i + 1]))
            else:
                spans.append((h, int(q_offsets[i]), int(q_offsets[i + 1])))
    return spans


def scheduled_rows(chunks) -> list[tuple[int, int, int]]:
    """(head, first query token, end query token) of each row of whole chunks (none cut into pieces)."""
    rows = []
    for chunk in chunks:
        flat = torch.zeros(chunk.q_tokens.numel(), dtype=torch.bool)
        flat[chunk.q_slots] = True
        valid = flat.view(chunk.q_tokens.shape)
        for head, tokens, keep in zip(chunk.heads.tolist(), chunk.q_tokens, valid):
            ids = tokens[keep]
            assert torch.equal(ids, torch.arange(int(ids[0]), int(ids[0]) + len(ids))), "a row's queries in a run"
            rows.append((head, int(ids[0]), int(ids[-1]) + 1))
    return sorted(rows)


def _repeats_and_changes() -> BlockMask:
    """Rows that repeat the one before and rows that do not, in every way a list can differ: the same length with
    other blocks, one block more, the same blocks after an empty row (not one span), a head's last row equal to the
    next head's first; a short last block on both sides."""
    rng = np.random.default_rng(5)
    keep = rng.random((3, 13, 13)) < 0.4
    for i in range(1, 13):
        repeat = rng.random(3) < 0.5
        keep[repeat, i] = keep[repeat, i - 1]
    keep[:, 3], keep[:, 4] = keep[:, 2], keep[:, 2]                  # a run of three
    keep[:, 5] = False                                                # an empty row between equal rows
    keep[:, 6] = keep[:, 4]
    keep[:, 7] = np.roll(keep[:, 6], 1, axis=1)                       # as many blocks, others
    keep[:, 8] = keep[:, 7]
    keep[:, 8, 12] = ~keep[:, 7, 12]                                  # one block more or fewer
    keep[1, 0] = keep[0, 12]                                          # equal lists across a head boundary
    keep[2, 0] = keep[1, 12]
    return BlockMask.from_dense(keep, q_len=13 * 7 - 3, kv_len=13 * 6 - 1, q_block=7, kv_block=6)


def _equal_heads() -> BlockMask:
    """Every row of every head lists the same blocks: one span a head, none across heads."""
    lists = [[[0, 2, 5, 6]] * 9 for _ in range(4)]
    return BlockMask.from_lists(lists, BlockMask.uniform_offsets(9 * 11 - 4, 11), BlockMask.uniform_offsets(70, 10))


def _frames_and_text() -> BlockMask:
    """A joint layout of frame blocks (39 tokens) then two text blocks (13, 9): video rows in a local window and the
    text blocks, text rows every block; in head 1 every row lists every block."""
    offsets = np.array([0, 39, 78, 117, 156, 195, 234, 247, 256])
    video, text = range(6), [6, 7]
    window = [sorted({*range(max(0, i - 1), min(6, i + 2)), *text}) for i in video]
    every = list(range(8))
    return BlockMask.from_lists([window + [every, every], [every] * 8], offsets, offsets)


def _runs_of_random_lengths() -> BlockMask:
    """Runs of 1 to 7 equal rows (spans of 10 to 70 query tokens, a short last block), random lists."""
    rng = np.random.default_rng(9)
    keep = rng.random((3, 24, 20)) < 0.5
    for h in range(3):
        i = 0
        while i < 24:
            run = int(rng.integers(1, 8))
            keep[h, i:i + run] = keep[h, i]
            i += run
    return BlockMask.from_dense(keep, q_len=234, kv_len=200, q_block=10)


def _many_block_sizes() -> BlockMask:
    """2 heads, 120 query blocks of 1 to 39 tokens, 80 key blocks of 1 to 23: spans of one width keep very
    different key tokens (the schedule sorts by width first)."""
    rng = np.random.default_rng(13)
    q_offsets = np.concatenate([[0], np.cumsum(rng.integers(1, 40, 120))])
    kv_offsets = np.concatenate([[0], np.cumsum(rng.integers(1, 24, 80))])
    keep = rng.random((2, 120, 80)) < rng.random((2, 120, 1))               # rows from nearly empty to nearly full
    lists = [[np.flatnonzero(row).tolist() for row in head] for head in keep]
    return BlockMask.from_lists(lists, q_offsets, kv_offsets)


def _chunk_rows(chunk) -> tuple[np.ndarray, np.ndarray]:
    """Each row's real query tokens and kept key tokens."""
    valid = torch.zeros(chunk.q_tokens.numel(), dtype=torch.bool)
    valid[chunk.q_slots] = True
    return valid.view(chunk.q_tokens.shape).sum(1).numpy(), chunk.kv_valid.sum(1).numpy()


BOUND_MASKS = {"runs_of_random_lengths": _runs_of_random_lengths, "many_block_sizes": _many_block_sizes}
BUDGET_NO_PIECES = {"runs_of_random_lengths": 8_400, "many_block_sizes": 35_631}     # the largest span alone


CASES = {
    # name: (mask, key heads, a chunk_elements that cuts spans into pieces of a few query tokens)
    "full_small_blocks_gqa": (BlockMask.full(4, 101, 93, 8), 2, 300),
    "repeats_and_changes": (_repeats_and_changes(), 3, 300),
    "equal_heads_gqa_4_to_1": (_equal_heads(), 1, 300),
    "frames_and_text": (_frames_and_text(), 1, 1300),          # 5 tokens a piece of 256 keys: 39 is no multiple
}


def test_a_full_mask_of_48_by_48_blocks_over_2_heads_is_2_rows():
    """The demo's dense layer (2016 tokens in 42-token blocks): one row of all 2016 queries a head, read from a
    device mask's lists in one host read."""
    mask = BlockMask.full(2, 2016, 2016, 42).to("cpu")
    with HostReads() as reads:
        chunks = schedule_chunks(mask, 1 << 24, torch.device("cpu"))
    assert [op for op, _ in reads.calls] == ["cpu", "numpy"], reads.calls                 # one read: .cpu().numpy()
    assert scheduled_rows(chunks) == [(0, 0, 2016), (1, 0, 2016)]
    assert [tuple(c.kv_tokens.shape) for c in chunks] == [(2, 2016)] and not chunks[0].padded


def test_a_mask_whose_rows_all_differ_has_a_row_per_non_empty_row():
    """No two consecutive rows of a head list the same blocks (some as many blocks, some a prefix of the next), and
    some rows are empty: one scheduled row per non-empty (head, query block), as before spans."""
    keep = np.zeros((2, 10, 10), dtype=bool)
    for i in range(10):
        keep[0, i, i % 5:i % 5 + 2] = True                # as many blocks as the row before, shifted
        keep[1, i, :i + 1] = True                          # the row before's blocks and one more
    keep[0, 4] = keep[1, 7] = False                        # empty rows
    mask = BlockMask.from_dense(keep, q_len=95, kv_len=100, q_block=10)
    rows = scheduled_rows(schedule_chunks(mask, 1 << 24, torch.device("cpu")))
    assert len(rows) == int(keep.any(axis=2).sum()) == 18
    assert rows == expected_spans(mask)


@pytest.mark.parametrize("name", sorted(CASES))
def test_spans_are_the_runs_of_equal_rows(name):
    mask, _, _ = CASES[name]
    spans = expected_spans(mask)
    assert len(spans) < int(mask.to_host().row_lengths.astype(bool).sum())    # the case has rows to merge
    for held in (mask, mask.to("cpu")):
        assert scheduled_rows(schedule_chunks(held, 1 << 24, torch.device("cpu"))) == spans


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("pieces", [False, True])
@pytest.mark.parametrize("name", sorted(CASES))
def test_spans_match_dense_attention(name, pieces, dtype):
    """With and without the LSE, host and device lists; with ``pieces``, a ``chunk_elements`` that cuts spans into
    pieces of a few query tokens, some of which cross a block boundary inside their span."""
    mask, kv_heads, small = CASES[name]
    chunk_elements = small if pieces else 1 << 24
    rng = np.random.default_rng(11)
    q = rng.standard_normal((2, mask.num_heads, mask.q_len, 16))
    k, v = rng.standard_normal((2, 2, kv_heads, mask.kv_len, 16))
    want_out, want_lse = dense_attention(q, k, v, expand_to_tokens(mask), 16 ** -0.5)
    tolerance = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    chunks = schedule_chunks(mask, chunk_elements, torch.device("cpu"))
    if not pieces:                                          # what is checked below runs the mask's spans
        assert scheduled_rows(chunks) == expected_spans(mask)
    else:
        boundaries = torch.tensor(mask.q_offsets[1:-1])
        assert any(len(c.heads) == 1 and bool(torch.isin(c.q_tokens[0, 1:], boundaries).any())
                   and int(c.q_tokens[0, 0]) not in boundaries.tolist() for c in chunks), "no piece crosses a block"
    for held in (mask, mask.to("cpu")):
        kernel = sparsecore.compile(held, device="cpu", backend="portable", chunk_elements=chunk_elements)
        inputs = [torch.from_numpy(a).to(dtype) for a in (q, k, v)]
        out, lse = kernel(*inputs, return_lse=True)
        np.testing.assert_allclose(out.double().numpy(), want_out, **tolerance)
        np.testing.assert_allclose(lse.double().numpy(), want_lse, rtol=1e-6, atol=1e-6)      # LSE: float32
        assert (np.isneginf(lse.numpy()) == np.isneginf(want_lse)).all()
        np.testing.assert_allclose(kernel(*inputs).double().numpy(), want_out, **tolerance)


@pytest.mark.parametrize("chunk_elements", [1 << 24, 20_000, 3_000, 300])
@pytest.mark.parametrize("name", sorted(BOUND_MASKS))
def test_chunks_bound_their_padded_work_and_query_padding(name, chunk_elements):
    """Spans of 1 to 7 blocks, or of blocks of many sizes: a chunk's rows x most query tokens x most key tokens fits
    ``chunk_elements`` (a lone span over it: pieces of at most ``chunk_elements`` // its key tokens query tokens), its
    padded query tokens exceed its real ones by at most a quarter (spans were padded to the widest of the mask), its
    padded work exceeds its rows' own query x key tokens by at most a half (spans of many block sizes padded keys
    2x), and each query token of a non-empty row is written once."""
    mask = BOUND_MASKS[name]()
    if chunk_elements == 1 << 24:
        assert scheduled_rows(schedule_chunks(mask, chunk_elements, torch.device("cpu"))) == expected_spans(mask)
    written = np.zeros((mask.num_heads, mask.q_len), dtype=np.int64)
    for c in schedule_chunks(mask, chunk_elements, torch.device("cpu")):
        rows, width, keys = len(c.heads), c.q_tokens.shape[1], c.kv_tokens.shape[1]
        q_tokens, kept = _chunk_rows(c)
        assert rows * width * keys <= chunk_elements or rows == 1 and width <= max(1, chunk_elements // keys)
        assert 4 * rows * width <= 5 * len(c.q_slots)
        assert 2 * rows * width * keys <= 3 * int((q_tokens * kept).sum())
        np.add.at(written, (c.q_rows.numpy() // mask.q_len, c.q_rows.numpy() % mask.q_len), 1)
    listed = np.repeat(mask.to_host().row_lengths > 0, mask.q_block_sizes, axis=1)
    assert (written == listed).all()


@pytest.mark.parametrize("name, chunk_elements", [(name, budget) for name in sorted(BOUND_MASKS)
                                                   for budget in (1 << 24, 60_000, 20_000, 15_000)
                                                   if budget >= BUDGET_NO_PIECES[name]])
def test_a_chunk_takes_every_span_that_fits(name, chunk_elements):
    """Chunks are maximal: a chunk followed by another would break one of its three bounds (padded work within the
    budget, query padding within a quarter, padded work within 1.5 times the rows' own) by taking the next span too,
    the next chunk's first (spans in order of query tokens, the widest first). No span here is over these budgets
    alone, so none is cut into pieces."""
    mask = BOUND_MASKS[name]()
    chunks = schedule_chunks(mask, chunk_elements, torch.device("cpu"))
    assert scheduled_rows(chunks) == expected_spans(mask)
    for a, b in zip(chunks, chunks[1:]):
        rows, width, keys = len(a.heads), a.q_tokens.shape[1], a.kv_tokens.shape[1]
        own = int(np.prod(_chunk_rows(a), axis=0).sum())
        next_width, next_keys = b.q_tokens.shape[1], int(b.kv_valid[0].sum())       # b's first row is its widest
        assert next_width <= width and rows * width * keys <= chunk_elements
        most = max(keys, next_keys)
        assert (rows + 1) * width * most > chunk_elements \
            or 4 * (rows + 1) * width > 5 * (len(a.q_slots) + next_width) \
            or 2 * (rows + 1) * width * most > 3 * (own + next_width * next_keys), (rows, width, keys, next_keys)


@pytest.mark.parametrize("chunk_elements", [1 << 63, 1 << 70])
def test_a_chunk_bound_beyond_int64_bounds_nothing_more(chunk_elements):
    """``chunk_elements`` is any positive int: one past NumPy's int64 raised OverflowError at compile; it schedules
    as the largest bound the arithmetic takes, and the kernel matches the oracle."""
    mask, _, _ = CASES["repeats_and_changes"]
    chunks = schedule_chunks(mask, chunk_elements, torch.device("cpu"))
    assert scheduled_rows(chunks) == scheduled_rows(schedule_chunks(mask, 1 << 60, torch.device("cpu")))
    rng = np.random.default_rng(3)
    q = rng.standard_normal((1, 3, mask.q_len, 8))
    k, v = (rng.standard_normal((1, 3, mask.kv_len, 8)) for _ in range(2))
    want_out, want_lse = dense_attention(q, k, v, expand_to_tokens(mask), 8 ** -0.5)
    kernel = sparsecore.compile(mask, device="cpu", backend="portable", chunk_elements=chunk_elements)
    out, lse = kernel(*(torch.from_numpy(a) for a in (q, k, v)), return_lse=True)
    np.testing.assert_allclose(out.numpy(), want_out, atol=1e-12)
    np.testing.assert_allclose(lse.numpy(), want_lse, atol=1e-6)


def test_a_chunks_query_padding_may_reach_a_quarter_of_its_query_tokens():
    """Spans of 40 and 24 query tokens (8-token blocks) keeping the same 2 key blocks: padded to 40, the chunk's 80
    query slots are 64 real ones and a quarter more, still one chunk."""
    lists = [[[0, 1]] * 5, [[0, 1]] * 3 + [[]] * 2]
    mask = BlockMask.from_lists(lists, BlockMask.uniform_offsets(40, 8), BlockMask.uniform_offsets(16, 8))
    chunks = schedule_chunks(mask, 1 << 24, torch.device("cpu"))
    assert scheduled_rows(chunks) == [(0, 0, 40), (1, 0, 24)] == expected_spans(mask)
    assert [tuple(c.q_tokens.shape) for c in chunks] == [(2, 40)] and len(chunks[0].q_slots) == 64


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                     reason="torch.cuda.is_available() is False: lists on a GPU"))


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("window", [1, 5, 64])
@pytest.mark.parametrize("name", sorted(CASES) + sorted(BOUND_MASKS))
def test_spans_do_not_depend_on_how_many_entries_are_compared_at_a_time(name, window, device, monkeypatch):
    """Windows of 1, 5 and 64 list entries split rows (and a row's earlier entries) across windows: the same spans,
    from lists on the CPU or a GPU."""
    mask = CASES[name][0] if name in CASES else BOUND_MASKS[name]()
    monkeypatch.setattr(lowering, "SPAN_WINDOW", window)
    assert int(mask.to_host().row_lengths.sum()) > window     # more than one window
    held = mask.to(device)
    assert scheduled_rows(_to_cpu(schedule_chunks(held, 1 << 24, torch.device(device)))) == expected_spans(mask)


def _to_cpu(chunks):
    return [Chunk(*(getattr(c, f.name).cpu() if f.name != "padded" else c.padded for f in fields(Chunk)))
            for c in chunks]


def test_finding_spans_makes_no_tensor_larger_than_its_window_or_its_rows(monkeypatch):
    """A full mask of 2 heads x 40 x 40 blocks lists 3,200 entries; compared 256 at a time, no temporary of the
    search for equal rows holds more than 257 elements (the window and one; there are 80 rows); comparing the whole
    lists at once made several of 3,200 (a dense 24-head layer at 6x lists 209 M)."""
    mask = BlockMask.full(2, 400, 400, 10).to("cpu")
    monkeypatch.setattr(lowering, "SPAN_WINDOW", 256)
    lengths = mask.row_lengths.reshape(-1)
    with LargestResult() as largest:
        same = lowering._same_as_previous(mask, lengths)
    assert largest.most <= 257, largest.most
    assert same.tolist() == [i % 40 != 0 for i in range(80)]


def test_rows_that_differ_only_in_the_lists_last_entry_are_two_spans():
    """The last list entry is compared too (a window that stopped one short judged [0, 1] and [0, 2] equal; review,
    forty-third session)."""
    mask = BlockMask.from_lists([[[0, 1], [0, 2]]], BlockMask.uniform_offsets(8, 4), BlockMask.uniform_offsets(12, 4))
    assert scheduled_rows(schedule_chunks(mask.to("cpu"), 1 << 24, torch.device("cpu"))) \
        == expected_spans(mask) == [(0, 0, 4), (0, 4, 8)]


@st.composite
def _repeating_masks(draw) -> BlockMask:
    """1-4 heads of 1-9 query blocks over 1-7 key blocks: rows repeated, shifted (as many blocks, others), emptied,
    or whole heads empty, a head's first row equal to the last of the head before; from no entries to all."""
    heads, rows, cols = draw(st.integers(1, 4)), draw(st.integers(1, 9)), draw(st.integers(1, 7))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    keep = rng.random((heads, rows, cols)) < draw(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]))
    for h in range(heads):
        for i in range(1, rows):
            pick = rng.random()
            if pick < 0.35:
                keep[h, i] = keep[h, i - 1]
            elif pick < 0.7:
                keep[h, i] = np.roll(keep[h, i - 1], 1)
            elif pick < 0.8:
                keep[h, i] = False
    keep[rng.random(heads) < 0.15] = False
    if heads > 1:
        keep[1, 0] = keep[0, -1]
    return BlockMask.from_dense(keep, q_len=rows * 3 - 1, kv_len=cols * 2, q_block=3, kv_block=2)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mask=_repeating_masks(), window=st.integers(1, 40))
def test_spans_match_a_row_by_row_comparison_at_any_window(mask, window, monkeypatch):
    """Windows from one entry to more than the lists hold, windows that divide the lists exactly, none at all."""
    monkeypatch.setattr(lowering, "SPAN_WINDOW", window)
    assert scheduled_rows(schedule_chunks(mask.to("cpu"), 1 << 24, torch.device("cpu"))) == expected_spans(mask)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.cuda.is_available() is False: CUDA's sync debug mode")
def test_finding_spans_on_a_gpu_never_waits_for_it(monkeypatch):
    """Lists on a GPU, compared 64 entries at a time: no op of the search synchronizes with the host (CUDA's sync
    debug mode raises on any that does), also under deterministic algorithms (index_add_ then accumulates by
    index_put_)."""
    mask = _runs_of_random_lengths().to("cuda")
    lengths = mask.row_lengths.reshape(-1)
    monkeypatch.setattr(lowering, "SPAN_WINDOW", 64)
    want = lowering._same_as_previous(mask, lengths).cpu()
    for deterministic in (False, True):
        previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(deterministic)
        torch.cuda.set_sync_debug_mode("error")
        try:
            same = lowering._same_as_previous(mask, lengths)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            torch.use_deterministic_algorithms(previous)
        assert torch.equal(same.cpu(), want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.cuda.is_available() is False: CUDA's sync debug mode")
def test_scheduling_chunks_on_a_gpu_waits_for_it_once():
    """A mask on the GPU cut into many chunks: one host read in all (the rows' lengths, kept tokens and repeats); the
    chunks' host arrays go up queued from pinned memory, where pageable copies waited for the GPU at each one."""
    mask = _runs_of_random_lengths().to("cuda")
    schedule_chunks(mask, 1 << 24, torch.device("cuda"))                      # warms the pinned pool and the ops
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            chunks = schedule_chunks(mask, 1 << 24, torch.device("cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    waits = [w for w in caught if "synchronizing" in str(w.message)]
    assert len(chunks) == 5 and len(waits) == 1, [str(w.message) for w in waits]   # before: one a chunk copy too
    assert scheduled_rows(_to_cpu(chunks)) == expected_spans(mask.to("cpu"))
