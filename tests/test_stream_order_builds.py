"""Builds that :class:`sparsecore.launch_device.StreamOrder` must see (a review of the forty-fifth session's change).

Stand-in streams and events log what would be queued, each thread with its own current stream (as CUDA's are):
a call on another stream while a first call still builds, a build after a failed first call, and ``prepare`` of a
run that has no ``prepare`` of its own (``portable``: it builds its chunks when lowered).
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
from sparsecore.launch_device import StreamOrder

from test_stream_order import FakeEvent, FakeStream

TENSOR = SimpleNamespace(device=torch.device("cuda", 0))


@pytest.fixture
def streams(monkeypatch):
    """Streams ``a`` and ``b`` sharing a log; ``use(name)`` makes one the calling thread's current stream (``a``
    where a thread chose none); ``launch(name)`` logs a launch on the calling thread's stream."""
    log: list = []
    lock = threading.Lock()
    found = {name: FakeStream(name, log) for name in "ab"}
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
