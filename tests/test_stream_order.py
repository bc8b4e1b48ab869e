"""Calls of one kernel on several CUDA streams wait, on the device, for the copies that built its plans.

The CPU tests drive :class:`sparsecore.launch_device.StreamOrder` with stand-in streams and events that log what
would be queued (one current stream per thread): waits once per stream and build, chained builds, failed calls, a
call on another thread while the first one builds, ``prepare`` of a run that builds when lowered, the release of a
dropped kernel. The GPU test builds a Triton (and, where it imports, FA4) kernel's plans behind a long sleep on
one stream and calls it at once on another, against the float64 oracle.
"""

from __future__ import annotations

import gc
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import sparsecore
from sparsecore import BlockMask, launch_device
from sparsecore.ir import Unselected, stream_readers
from sparsecore.launch_device import StreamOrder

from checks import assert_matches
from oracle_unselected import approximated_attention


CALLER_STREAM = launch_device.caller_stream


class FakeStream:
    def __init__(self, name: str, log: list) -> None:
        self.name, self.log = name, log

    def wait_event(self, event: "FakeEvent") -> None:
        self.log.append(("wait", self.name, event.name))


class FakeEvent:
    def __init__(self, name: str) -> None:
        self.name = name

    def record(self, stream: FakeStream) -> None:
        stream.log.append(("record", stream.name, self.name))


@pytest.fixture
def streams(monkeypatch):
    """Streams ``a`` to ``d`` sharing a log, events named ``e1``, ``e2``, ... in the order made; ``use(name)`` makes a
    stream the calling thread's current one (``a`` where a thread chose none: each thread has its own, as CUDA's
    do); ``launch()`` logs a launch on it. Orders the test dropped are released before the stand-ins go, and the
    streams noted as readers are forgotten."""
    log: list = []
    lock = threading.Lock()
    found = {name: FakeStream(name, log) for name in "abcd"}
    local = threading.local()
    made = iter(range(1, 1000))

    def current(tensor):
        return getattr(local, "stream", found["a"])

    def event():
        with lock:
            return FakeEvent(f"e{next(made)}")
    monkeypatch.setattr(launch_device, "caller_stream", current)
    monkeypatch.setattr(torch.cuda, "Event", event)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    yield SimpleNamespace(log=log, use=lambda name: setattr(local, "stream", found[name]),
                          launch=lambda: log.append(("launch", current(None).name)))
    gc.collect()
    stream_readers.forget()             # the stand-ins noted as readers: a later real release must not mark them


TENSOR = SimpleNamespace(device=torch.device("cuda", 0))


def call(order: StreamOrder, key, fail: bool = False) -> None:
    with order.ordered(key, TENSOR):
        if fail:
            raise RuntimeError("the launch failed")


def test_calls_on_the_stream_that_built_wait_for_nothing(streams):
    order = StreamOrder()
    for _ in range(3):
        call(order, "plans")
    assert streams.log == [("record", "a", "e1")]


def test_another_stream_waits_once_for_the_build(streams):
    order = StreamOrder()
    call(order, "plans")
    streams.use("b")
    call(order, "plans")
    call(order, "plans")
    streams.use("a")
    call(order, "plans")
    assert streams.log == [("record", "a", "e1"), ("wait", "b", "e1")]


def test_a_later_build_is_recorded_after_the_earlier_one(streams):
    """c builds new plans after a's: it waits for a's event before recording its own, so d, waiting for the newest
    only, is ordered after both builds."""
    order = StreamOrder()
    call(order, "float16 plans")
    streams.use("c")
    call(order, "bfloat16 plans")
    streams.use("d")
    call(order, "float16 plans")
    assert streams.log == [("record", "a", "e1"), ("wait", "c", "e1"), ("record", "c", "e2"), ("wait", "d", "e2")]


def test_a_failed_call_still_records_what_it_may_have_queued(streams):
    """... and leaves its key unbuilt: the next call (here on b, after waiting for a's event) may build, and records."""
    order = StreamOrder()
    with pytest.raises(RuntimeError, match="the launch failed"):
        call(order, "plans", fail=True)
    streams.use("b")
    call(order, "plans")
    call(order, "plans")
    assert streams.log == [("record", "a", "e1"), ("wait", "b", "e1"), ("record", "b", "e2")]


def test_preparing_and_calling_record_separately(streams):
    """``prepare`` may build part of the plans and the first call the rest: each records."""
    order = StreamOrder()
    call(order, ("prepare", "plans"))
    call(order, "plans")
    assert streams.log == [("record", "a", "e1"), ("record", "a", "e2")]


def test_a_dropped_kernel_orders_its_builders_after_every_other_caller(streams):
    order = StreamOrder()
    call(order, "plans")
    streams.use("b")
    call(order, "plans")
    del order
    gc.collect()
    released = streams.log[2:]                   # an event on each caller (in any order), a waits for b's
    recorded = {stream: event for kind, stream, event in released if kind == "record"}
    assert sorted(recorded) == ["a", "b"]
    assert [entry for entry in released if entry[0] == "wait"] == [("wait", "a", recorded["b"])]


def test_a_dropped_kernel_called_on_one_stream_queues_nothing(streams):
    order = StreamOrder()
    call(order, "plans")
    del order
    gc.collect()
    assert streams.log == [("record", "a", "e1")]


def test_inside_a_capture_nothing_is_ordered(streams, monkeypatch):
    order = StreamOrder()
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    call(order, "plans")
    assert streams.log == []


def test_off_cuda_nothing_is_ordered(streams, monkeypatch):
    monkeypatch.setattr(launch_device, "caller_stream", CALLER_STREAM)       # the real one: None for a CPU tensor
    order = StreamOrder()
    with order.ordered("plans", torch.zeros(1)):
        pass
    assert streams.log == []


def test_a_call_on_another_stream_while_the_first_call_builds_waits_for_that_build(streams):
    """Thread A's first call builds the plans (its copies queued on stream a); thread B calls meanwhile on stream b
    and reads them: B's launch must come after a wait for an event recorded after A's build."""
    order = StreamOrder()
    building, done_building, b_launched = threading.Event(), threading.Event(), threading.Event()

    def first_call():
        with order.ordered("plans", TENSOR):
            streams.launch()                # the build's copies and the launch, on stream a
            building.set()
            done_building.wait(5)

    def other_call():
        streams.use("b")
        with order.ordered("plans", TENSOR):
            streams.launch()
            b_launched.set()

    a = threading.Thread(target=first_call)
    a.start()
    assert building.wait(5)
    b = threading.Thread(target=other_call)
    b.start()
    b_launched.wait(1.0)                    # with the fix B waits here for A's call to end: released after 1 s
    done_building.set()
    a.join(5)
    b.join(5)
    b_launch = streams.log.index(("launch", "b"))
    assert ("record", "a", "e1") in streams.log[:b_launch] and ("wait", "b", "e1") in streams.log[:b_launch], \
        streams.log


def test_a_build_after_a_failed_first_call_is_recorded(streams):
    """The first call fails before building (an out-of-memory error, say); the second, on the same stream, builds;
    a call on another stream must wait for an event recorded after that build, not only for the failed call's."""
    order = StreamOrder()
    with pytest.raises(RuntimeError, match="out of memory"):
        with order.ordered("plans", TENSOR):
            raise RuntimeError("CUDA out of memory")
    with order.ordered("plans", TENSOR):
        streams.launch()                    # the build, on stream a
    streams.use("b")
    with order.ordered("plans", TENSOR):
        streams.launch()
    build = streams.log.index(("launch", "a"))
    waits = [entry for entry in streams.log if entry[:2] == ("wait", "b")]
    records_after_build = {entry[2] for entry in streams.log[build:] if entry[:2] == ("record", "a")}
    assert waits and waits[-1][2] in records_after_build, streams.log


def test_prepare_of_a_run_without_prepare_records_what_its_lowering_built(streams):
    """``portable``'s run builds its chunks (copies queued on the caller's stream on CUDA) when lowered and has no
    ``prepare``: ``kernel.prepare`` on stream a lowers it, and a call on stream b must wait for that."""
    rng = np.random.default_rng(46)
    offsets = BlockMask.uniform_offsets(64, 16)
    lists = [[rng.choice(4, size=2, replace=False).tolist() for _ in range(4)]]
    kernel = sparsecore.compile(BlockMask.from_lists(lists, offsets, offsets), device="cpu", backend="portable",
                                cache=False)
    q, k, v = (torch.from_numpy(rng.standard_normal((1, 1, 64, 16))) for _ in range(3))
    kernel.prepare(q, k, v)
    streams.use("b")
    kernel(q, k, v)
    assert [entry[:2] for entry in streams.log[:2]] == [("record", "a"), ("wait", "b")], streams.log
    assert streams.log[1][2] == streams.log[0][2], streams.log


CUDA_REASON = None if torch.cuda.is_available() else f"torch.cuda.is_available() is False in torch {torch.__version__}"


def _backends() -> list[str]:
    found = ["triton"]
    if sparsecore.registered_backends()["fa4"].unavailable_reason("cuda") is None:
        found.append("fa4")
    return found


def _mask(lists, offsets, unselected: str) -> BlockMask:
    """A new mask object each time: a device mask holds its own kernels."""
    mask = BlockMask.from_lists(lists, offsets, offsets)
    return BlockMask(mask.num_heads, mask.q_offsets, mask.kv_offsets, mask.indptr, mask.indices, mask.budgets,
                     mask.meta, Unselected.parse(unselected))


@pytest.mark.skipif(CUDA_REASON is not None, reason=str(CUDA_REASON))
@pytest.mark.parametrize("unselected", ["drop", "grouped-first-order:2"])
def test_a_call_on_another_stream_reads_plans_built_behind_a_sleep(unselected):
    """Stream a sleeps about a second, then the kernel's first call builds its plans behind the sleep; the same kernel
    called at once on stream b must wait for them (its output checked against the oracle, its end after a's sleep, timed
    by events on the device). The mask is on the device beforehand: a host mask's upload, a pageable copy, would wait
    for the sleep on the host. Triton's and FA4's first calls on a device mask read nothing back; portable's reads its
    row lengths back, which waits for the sleep on the host, so it cannot show the race."""
    rng = np.random.default_rng(45)
    offsets = BlockMask.uniform_offsets(1000, 128)
    blocks = len(offsets) - 1
    lists = [[rng.choice(blocks, size=3, replace=False).tolist() for _ in range(blocks)] for _ in range(2)]
    q, k, v = (torch.from_numpy(rng.standard_normal((1, 2, 1000, 64))).to("cuda", torch.float16) for _ in range(3))
    expected_out, expected_lse = approximated_attention(*(t.double().cpu().numpy() for t in (q, k, v)),
                                                        _mask(lists, offsets, unselected), 64 ** -0.5)
    for backend in _backends() if unselected == "drop" else ["triton"]:
        warm, kernel = (sparsecore.compile(_mask(lists, offsets, unselected).to("cuda"), device="cuda",
                                           backend=backend, warmup="wait") for _ in range(2))
        warm(q, k, v, return_lse=True)                   # compiles the kernels: the calls under test only launch
        torch.cuda.synchronize()
        a, b = torch.cuda.Stream(), torch.cuda.Stream()
        slept, done = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(a):
            torch.cuda._sleep(2_000_000_000)            # about a second at 2 GHz
            slept.record(a)
            kernel(q, k, v, return_lse=True)
        with torch.cuda.stream(b):
            out, lse = kernel(q, k, v, return_lse=True)
            done.record(b)
        torch.cuda.synchronize()
        after = slept.elapsed_time(done)                # ms from the end of a's sleep to the end of b's call
        assert after > 0, f"{backend}: the call on stream b ended {-after:.0f} ms before stream a's plans were built"
        assert_matches("float16", out.double().cpu().numpy(), lse.double().cpu().numpy(), expected_out,
                       expected_lse)
