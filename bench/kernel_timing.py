"""One way to time a kernel for the published tables: ``triton.testing.do_bench``'s median over enough repeats.

``do_bench(fn, rep=300)`` repeats ``fn`` for about 300 ms, so a kernel of 300 ms or more (a dense pass at Wan 6x)
gets one sample and a 60 ms one five (a review counted them behind the 2026-12-01 tables). :func:`median_ms` asks
for at least ``min_samples`` repeats: an estimate from one short call of ``do_bench``, then a repeat window of
``min_samples + 1`` times it (never under 300 ms). The L2 is flushed before every repeat, as ``do_bench`` does.
"""

from __future__ import annotations

from typing import Callable

MIN_SAMPLES = 10
WINDOW_MS = 300


def median_ms(fn: Callable[[], object], min_samples: int = MIN_SAMPLES) -> float:
    """Median milliseconds of ``fn`` over at least ``min_samples`` repeats after a 50 ms warm-up."""
    from triton.testing import do_bench
    estimate = float(do_bench(fn, warmup=1, rep=1, return_mode="median"))
    # do_bench divides the window by its own estimate, which adds the L2 flush: one sample more keeps the count
    return float(do_bench(fn, warmup=50, rep=max(WINDOW_MS, (min_samples + 1) * estimate), return_mode="median"))
