"""sparsecore.timing: the device timer the integration's stats read."""

from __future__ import annotations

import types

import pytest
import torch

from sparsecore import timing


class _Event:
    """A device event whose elapsed time is read from a clock the test advances; reading an event before it is
    recorded fails as a device event does."""

    clock = 0.0

    def __init__(self, enable_timing: bool = False) -> None:
        self.at: float | None = None

    def record(self, stream: object = None) -> None:
        self.at = _Event.clock

    def elapsed_time(self, end: "_Event") -> float:
        if self.at is None or not isinstance(end, _Event) or end.at is None:
            raise RuntimeError("elapsed_time: both events must be recorded")
        return (end.at - self.at) * 1e3


class _Device:
    """The parts of ``torch.cuda`` a Stopwatch uses."""

    Event = _Event
    synchronized = 0

    @staticmethod
    def current_stream(device: object = None) -> str:
        return "stream"

    @staticmethod
    def synchronize(device: object = None) -> None:
        _Device.synchronized += 1


@pytest.fixture
def events(monkeypatch):
    monkeypatch.setattr(timing, "_module", lambda device: None if device.type == "cpu" else _Device)
    _Event.clock = 0.0


def test_a_stopwatch_read_while_a_region_runs_counts_the_finished_regions(events):
    """``seconds`` ("total time of the finished regions") raised while a region was open on a device with events:
    ``handle.stats()`` read from another thread during a timed generation failed in ``elapsed_time(None)``."""
    watch = timing.Stopwatch(torch.device("cuda"))
    with watch:
        _Event.clock = 2.0
    watch.__enter__()                               # a region in flight, as in another thread's attention call
    _Event.clock = 5.0
    assert (watch.seconds, watch.count) == (2.0, 1)
    watch.__exit__(None, None, None)
    assert (watch.seconds, watch.count) == (5.0, 2)



def _in_thread(steps):
    """A thread that runs each of ``steps`` when told (``next_step()``), and returns once it ran it."""
    import threading
    go, done, errors = threading.Semaphore(0), threading.Semaphore(0), []

    def work():
        for step in steps:
            go.acquire()
            try:
                step()
            except BaseException as err:       # re-raised in the test's thread below
                errors.append(err)
            done.release()
    thread = threading.Thread(target=work, daemon=True)
    thread.start()

    def next_step():
        go.release()
        assert done.acquire(timeout=30), "the other thread's step did not end"
        if errors:
            raise errors[0]
    return next_step


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_two_threads_timing_one_stopwatch_at_once_each_count_their_own_region(events, monkeypatch, device):
    """Two threads' regions overlapping on one watch (two pipelines sharing a handle): a region's start was one slot
    (``_began``, ``_events[-1]``) that the other thread's entry overwrote, so the first exit measured from the
    second start and the other region's start event was never ended (6 s were counted of 3 s + 6 s)."""
    clock = types.SimpleNamespace(now=0.0)
    monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=lambda: clock.now))

    def at(seconds):
        clock.now = _Event.clock = seconds
    watch = timing.Stopwatch(torch.device(device))
    other = _in_thread([watch.__enter__, lambda: watch.__exit__(None, None, None)])
    at(0.0)
    watch.__enter__()                     # this thread's region: 0 s .. 3 s
    at(1.0)
    other()                               # the other thread's region: 1 s .. 7 s
    at(3.0)
    watch.__exit__(None, None, None)
    at(7.0)
    other()
    assert (watch.seconds, watch.count) == (9.0, 2)


def test_stats_rows_read_a_watchs_count_and_seconds_together(events, monkeypatch):
    """A call that ended while a row was read (between its ``seconds`` and its ``count``) divided one call's time by
    two calls: ``ms`` was half the time of the one call the row's ``ms_total`` counts."""
    from sparsecore.geometry import VideoGeometry
    from sparsecore.integrations.diffusers.stats import Stats
    stats = Stats()
    record = stats.record(0, 0, 0, VideoGeometry(1, 2, 2), 4, 1, None, "sparse")
    record.fields["calls"] = 2
    record.watch = timing.Stopwatch(torch.device("cuda"))
    with record.watch:
        _Event.clock = 2.0                # a finished call of 2 s
    other = _in_thread([record.watch.__enter__, lambda: record.watch.__exit__(None, None, None)])
    other()                               # another thread's call runs
    _Event.clock = 6.0
    ended = []

    def synchronize(device=None):         # that call ends while the row waits for the device
        if not ended:
            ended.append(True)
            other()
    monkeypatch.setattr(_Device, "synchronize", staticmethod(synchronize))
    row, = stats.rows()
    assert ended and (row["ms"], row["ms_total"]) == (2000.0, 2000.0), row


def test_two_threads_making_a_records_first_timed_call_at_once_keep_both_regions(monkeypatch):
    """``Stats.time`` made a record's watch with an unlocked check-then-set: two threads timing a record's first call
    at once each saw no watch and made one; a region timed on the watch that was replaced was lost (1 call of 2)."""
    import threading

    from sparsecore.geometry import VideoGeometry
    from sparsecore.integrations.diffusers import stats as stats_module
    made, entered, both_made = [], threading.Event(), threading.Barrier(2)

    class Watch(timing.Stopwatch):
        def __enter__(self):
            entered.set()
            return super().__enter__()

    def make(device):                    # both threads past the check before either sets the watch, where they can be
        watch = Watch(device)
        made.append(watch)
        try:
            both_made.wait(timeout=1.0)
        except threading.BrokenBarrierError:     # the other thread waits for the lock: only one watch is made
            pass
        if len(made) == 2 and watch is made[1]:
            assert entered.wait(timeout=10)      # the first watch times its region before this one replaces it
        return watch
    monkeypatch.setattr(stats_module, "Stopwatch", make)
    stats = stats_module.Stats()
    stats.timing = True
    record = stats.record(0, 0, 0, VideoGeometry(1, 2, 2), 4, 1, None, "sparse")
    like = torch.zeros(1)
    threads = [threading.Thread(target=stats.time, args=(record, like, lambda: None)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert record.watch.count == 2, f"{len(made)} watches made, the record's counted {record.watch.count} calls"
