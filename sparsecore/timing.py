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
import threading
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
    Threads may time regions on one watch at once (each region's start is its thread's);
    :meth:`totals` reads the time and the count of the same finished regions.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        module = self._module = _module(self.device)
        self._event = getattr(module, "Event", None) if module is not None and self.device.type != "mps" else None
        self._host_seconds = 0.0
        self._events: list[tuple[Any, Any]] = []     # the finished regions' (start, end) events
        self._count = 0
        self._lock = threading.Lock()
        self._starts = threading.local()            # this thread's open regions' starts (innermost last)

    def __enter__(self) -> "Stopwatch":
        if self._event is not None:
            start = self._event(enable_timing=True)
            start.record(self._module.current_stream(self.device))     # this device's stream, not the current one
        else:
            synchronize(self.device)
            start = time.perf_counter()
        if not hasattr(self._starts, "open"):
            self._starts.open = []
        self._starts.open.append(start)
        return self

    def __exit__(self, *exc: Any) -> None:
        start = self._starts.open.pop()
        if self._event is not None:
            end = self._event(enable_timing=True)
            end.record(self._module.current_stream(self.device))
            with self._lock:
                self._events.append((start, end))
                self._count += 1
        else:
            synchronize(self.device)
            elapsed = time.perf_counter() - start
            with self._lock:
                self._host_seconds += elapsed
                self._count += 1

    @property
    def count(self) -> int:
        """How many regions finished."""
        return self._count

    @property
    def seconds(self) -> float:
        """Total time of the finished regions (waits for the device when events are pending); a region still
        running (another thread's) is left out, as it is from :attr:`count`."""
        return self.totals()[0]

    def totals(self) -> tuple[float, int]:
        """``(seconds, count)`` of the same finished regions (a region ending meanwhile is in neither)."""
        with self._lock:
            host, finished, count = self._host_seconds, list(self._events), self._count
        if finished:
            synchronize(self.device)
        return host + sum(start.elapsed_time(end) for start, end in finished) / 1e3, count


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
