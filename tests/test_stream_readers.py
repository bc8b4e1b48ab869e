"""A device copy that a shared memo drops is reused only after the work queued on every stream that called.

CPU tests: :class:`sparsecore.ir.memo.LruMemo` hands what it evicts, replaces and clears to its ``on_drop``; the
memos of uploads and of the approximation's statistics plans retire what they drop; :func:`retire` marks a CUDA
tensor in use by each stream noted, then and later while it lives (stand-ins); :class:`StreamOrder` notes the
streams it orders. The GPU test reads an upload on one stream behind a long sleep, drops it from the memo and
allocates its size on the stream that uploaded it while the read is still queued: that allocation must not take
the upload's memory, and the read must see the upload.
"""

from __future__ import annotations

import gc
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import sparsecore
from sparsecore import launch_device, ordering
from sparsecore.backends import approximation
from sparsecore.ir import Unselected, stream_readers, uploads
from sparsecore.ir.memo import LruMemo
from sparsecore.launch_device import StreamOrder


@pytest.fixture(autouse=True)
def no_streams_noted():
    stream_readers.forget()
    yield
    stream_readers.forget()


def test_a_memo_hands_what_it_evicts_replaces_and_clears_to_on_drop():
    dropped = []
    memo = LruMemo(2, on_drop=dropped.append)
    for key in "abc":
        memo.get(key, lambda key=key: key.upper())
    assert dropped == ["A"]
    memo.put("b", "B2")
    memo.put("b", "B2")                 # the same value again: nothing leaves
    assert dropped == ["A", "B"]
    memo.clear()
    assert sorted(dropped) == ["A", "B", "B2", "C"] and len(memo) == 0


class StandIn:
    """A CUDA tensor's stand-in that logs the streams it is marked in use by."""

    def __init__(self, device: torch.device) -> None:
        self.is_cuda, self.device, self.marked = True, device, []

    def record_stream(self, stream) -> None:
        self.marked.append(stream.name)


class Stream:
    """A CUDA stream's stand-in: hashable by name and device, as torch's are by id and device."""

    def __init__(self, name: str, index: int = 0) -> None:
        self.name, self.device = name, torch.device("cuda", index)

    def __eq__(self, other) -> bool:
        return isinstance(other, Stream) and (self.name, self.device) == (other.name, other.device)

    def __hash__(self) -> int:
        return hash((self.name, self.device))

    def wait_event(self, event) -> None:
        pass


stream = Stream


def test_a_retired_cuda_tensor_is_marked_in_use_by_each_stream_of_its_device():
    a, b, other = stream("a"), stream("b"), stream("c", index=1)
    for each in (a, b, other, a):
        stream_readers.note_reader(each.device, each)
    tensor, host = StandIn(torch.device("cuda", 0)), torch.zeros(3)
    stream_readers.retire([tensor, host, None])
    assert tensor.marked == ["a", "b"]          # in the order first noted; cuda:1's stream not at all


def test_a_retired_tensor_still_alive_is_marked_for_each_stream_noted_later_and_a_dead_one_is_forgotten():
    kept, dropped = StandIn(torch.device("cuda", 0)), StandIn(torch.device("cuda", 0))
    stream_readers.note_reader(torch.device("cuda", 0), stream("a"))
    stream_readers.retire([kept, dropped, kept])            # twice: one entry
    del dropped
    gc.collect()
    stream_readers.note_reader(torch.device("cuda", 0), stream("b"))
    stream_readers.note_reader(torch.device("cuda", 0), stream("b"))      # noted before: nothing again
    stream_readers.note_reader(torch.device("cuda", 1), stream("c", index=1))
    assert kept.marked == ["a", "a", "b"]
    assert len(stream_readers._retired[torch.device("cuda", 0)]) == 1


def test_noting_a_stream_survives_a_retired_tensor_dying_meanwhile():
    """A retired tensor's weakref callback (the garbage collector freeing it, in this thread, under the re-entrant
    lock) may delete entries while a new stream is noted: the stand-in ref deletes one as the noting reads it."""
    device = torch.device("cuda", 0)
    first, second = StandIn(device), StandIn(device)
    stream_readers.retire([first, second])
    alive = stream_readers._retired[device]
    doomed = next(iter(alive))
    real = alive[doomed]

    def dying():
        alive.pop(doomed, None)
        return real()
    alive[doomed] = dying
    stream_readers.note_reader(device, stream("late"))
    assert first.marked == ["late"] and second.marked == ["late"]


def test_every_stream_noted_is_kept():
    names = [f"s{i}" for i in range(100)]
    for name in names:
        stream_readers.note_reader(torch.device("cuda", 0), stream(name))
    stream_readers.note_reader(torch.device("cuda", 0), stream("s0"))      # noted first and again: kept once
    tensor = StandIn(torch.device("cuda", 0))
    stream_readers.retire([tensor])
    assert tensor.marked == names


def test_the_uploads_memo_retires_the_copy_it_evicts(monkeypatch):
    retired = []
    monkeypatch.setattr(uploads, "retire", lambda tensors: retired.extend(tensors))
    monkeypatch.setattr(uploads, "_UPLOADS", LruMemo(uploads.CACHE_ENTRIES, on_drop=uploads._UPLOADS._on_drop))
    first = uploads.on_device(np.arange(3), "cpu")
    for i in range(1, uploads.CACHE_ENTRIES + 1):
        uploads.on_device(np.arange(3) + i, "cpu")
    assert len(retired) == 1 and retired[0] is first


def test_the_statistics_plans_memo_retires_every_tensor_of_the_plan_it_evicts(monkeypatch):
    retired = []
    monkeypatch.setattr(approximation, "retire", lambda tensors: retired.append(list(tensors)))
    monkeypatch.setattr(approximation, "_PLANS",
                        LruMemo(approximation.PLAN_ENTRIES, on_drop=approximation._PLANS._on_drop))
    kind = Unselected("grouped-first-order", group_blocks=2)
    plans = [approximation.StatisticsPlan.build(np.array([0, 3, 5 + i, 9 + i]), kind, torch.device("cpu"))
             for i in range(approximation.PLAN_ENTRIES + 1)]
    assert len(retired) == 1
    held = plans[0].tensors()
    assert len(held) == 10 and all(isinstance(t, torch.Tensor) for t in held)
    assert [id(t) for t in retired[0]] == [id(t) for t in held]


def test_clear_cache_retires_the_token_orders_device_indices(monkeypatch):
    retired = []
    monkeypatch.setattr(ordering, "retire", lambda tensors: retired.extend(tensors))
    order = ordering.TokenOrder(np.array([2, 0, 1]), "test")
    index = order.device_index("cpu", 5)
    sparsecore.clear_cache()
    assert any(found is index for found in retired) and not order._on_device


def test_stream_order_notes_each_stream_it_orders(monkeypatch):
    noted = []
    monkeypatch.setattr(launch_device, "note_reader", lambda device, stream: noted.append(stream))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "Event", lambda: SimpleNamespace(record=lambda stream: None))
    order, tensor = StreamOrder(), SimpleNamespace(device=torch.device("cuda", 0))
    for now in (stream("a"), stream("a"), stream("b"), stream("b")):
        monkeypatch.setattr(launch_device, "caller_stream", lambda tensor, now=now: now)
        with order.ordered("key", tensor):
            pass
    assert [s.name for s in noted] == ["a", "b"]        # once each: later calls on a stream take the fast path


CUDA_REASON = None if torch.cuda.is_available() else f"torch.cuda.is_available() is False in torch {torch.__version__}"
if CUDA_REASON is None and torch.cuda.get_allocator_backend() != "native":
    CUDA_REASON = (f"the allocator is {torch.cuda.get_allocator_backend()!r}: the test reads the native caching "
                   f"allocator's choice of block")


@pytest.mark.skipif(CUDA_REASON is not None, reason=CUDA_REASON or "")
def test_an_upload_dropped_while_another_stream_reads_it_keeps_its_memory_until_that_read():
    """The allocator's choice is checked while the read is still queued (shown by its event), not raced: a first
    launch may load its kernel lazily and synchronize the device, which ran the reader's read before the builder's
    write in the first version of this test (H200, 2026-12-05: it passed with the memo retiring nothing)."""
    size = 1 << 18                          # float32: 1 MiB, half of a 2 MiB segment of the allocator's small pool
    builder, reader = torch.cuda.Stream(), torch.cuda.Stream()
    for each in (builder, reader):
        stream_readers.note_reader(each.device, each)
    for each in (builder, reader):          # every kernel launched below, loaded now
        with torch.cuda.stream(each):
            torch.cuda._sleep(1)
            torch.mul(torch.ones(size, device="cuda"), 1, out=torch.empty(size, device="cuda")).fill_(-1.0)
    uploads.clear()
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()                # builder's pool is empty: the upload takes a new segment's first half
    array = np.arange(size, dtype=np.float32)
    with torch.cuda.stream(builder):
        copy = uploads.on_device(array, "cuda")
    start, end = copy.data_ptr(), copy.data_ptr() + copy.nbytes
    torch.cuda.synchronize()
    with torch.cuda.stream(reader):
        read = torch.empty(size, dtype=torch.float32, device="cuda")      # allocated before the sleep, not behind it
        torch.cuda._sleep(1_000_000_000)    # about half a second at 2 GHz
        torch.mul(copy, 1, out=read)
        read_done = torch.cuda.Event()
        read_done.record(reader)
    del copy
    uploads.clear()                         # the memo drops the copy: no reference is left
    with torch.cuda.stream(builder):
        reused = torch.empty(size, dtype=torch.float32, device="cuda")     # the best fit in builder's pool
        reused.fill_(-1.0)
    pending = not read_done.query()
    torch.cuda.synchronize()
    assert pending, "the read had run before the builder's allocation: the test checked nothing"
    assert not (reused.data_ptr() < end and start < reused.data_ptr() + reused.nbytes), \
        "the builder's next allocation took the dropped upload's memory while another stream's read was queued"
    np.testing.assert_array_equal(read.cpu().numpy(), array)


def test_a_token_orders_device_indices_are_bounded_and_dropped_ones_retired(monkeypatch):
    """A serving loop gathering one order at many sequence lengths (text padded to each prompt's length) kept an
    index per (direction, device, length) until clear_cache, without bound. Now the last DEVICE_COPIES_KEPT are
    kept, an evicted one is retired for the streams that may read it, and a length asked again gathers right."""
    retired = []
    monkeypatch.setattr(ordering, "retire", lambda tensors: retired.extend(tensors))
    order = ordering.TokenOrder(np.array([2, 0, 1]), "test")
    kept = ordering.DEVICE_COPIES_KEPT
    first = order.device_index("cpu", 4)
    for length in range(5, 5 + 4 * kept):
        values = torch.arange(length, dtype=torch.float64)[None]
        assert torch.equal(order.scatter(order.gather(values, 1), 1), values)
        assert len(order._on_device) <= kept
    assert any(found is first for found in retired)
    assert order.device_index("cpu", 4).tolist() == [2, 0, 1, 3]
