"""One way to time device work, for every device: the demo, the benchmarks and the integration's stats use it.

Device work is asynchronous: a host clock read right after a launch measures the launch.
:func:`synchronize` waits for a device (``torch.cuda``, ``torch.npu``, ``torch.xpu``,
``torch.mps`` all have ``synchronize``; the CPU needs none); :class:`Stopwatch` times a
region with the device's events where it has them (no wait inside the timed code) and with
synchronize + ``time.perf_counter`` elsewhere; :func:`median_seconds` warms up, repeats and
takes the median, the way timings here are reported.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch

from sparsecore.ir.validation import check_int


def _module(device: torch.device) -> Any:
    return None if device.type == "cpu" else getattr(torch, device.type, None)


def synchronize(device: torch.device | str) -> None:
    """Wait until ``device`` has finished all queued work (a no-op on the CPU)."""
    device = torch.device(device)
    module = _module(device)
    if module is None or not hasattr(module, "synchronize"):
        return
    if device.type == "mps":                    # one device, whose synchronize takes none
        module.synchronize()
    else:                                       # cuda, xpu, npu: that device, not the current one
        module.synchronize(device)


class Stopwatch:
    """Accumulated time of regions run on one device: ``with watch: ...``, then :attr:`seconds`.

    With device events (CUDA, XPU, NPU) the regions are only marked while they run and
    read when :attr:`seconds` is asked for, so timing does not stall the device's queue.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        module = self._module = _module(self.device)
        self._event = getattr(module, "Event", None) if module is not None and self.device.type != "mps" else None
        self._host_seconds = 0.0
        self._events: list[tuple[Any, Any]] = []
        self._began = 0.0
        self.count = 0

    def __enter__(self) -> "Stopwatch":
        if self._event is not None:
            start = self._event(enable_timing=True)
            start.record(self._module.current_stream(self.device))     # this device's stream, not the current one
            self._events.append((start, None))
        else:
            synchronize(self.device)
            self._began = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._event is not None:
            end = self._event(enable_timing=True)
            end.record(self._module.current_stream(self.device))
            self._events[-1] = (self._events[-1][0], end)
        else:
            synchronize(self.device)
            self._host_seconds += time.perf_counter() - self._began
        self.count += 1

    @property
    def seconds(self) -> float:
        """Total time of the finished regions (waits for the device when events are pending); a region still
        running (another thread's) is left out, as it is from :attr:`count`."""
        finished = [(start, end) for start, end in list(self._events) if end is not None]
        if finished:
            synchronize(self.device)
        return self._host_seconds + sum(start.elapsed_time(end) for start, end in finished) / 1e3


def median_seconds(fn: Callable[[], Any], device: torch.device | str, *, warmup: int = 1, repeats: int = 5) -> float:
    """Median wall time of ``fn()`` on ``device`` over ``repeats`` runs after ``warmup`` untimed ones."""
    check_int(warmup, "warmup", 0)
    check_int(repeats, "repeats", 1)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        began = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - began)
    return statistics.median(times)
