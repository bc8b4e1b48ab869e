"""sparsecore.timing: the device timer the integration's stats read."""

from __future__ import annotations

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

