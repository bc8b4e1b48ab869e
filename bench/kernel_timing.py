"""One way to time a kernel for the published tables: ``triton.testing.do_bench``'s median over enough repeats.

``do_bench(fn, rep=300)`` repeats ``fn`` for about 300 ms, so a kernel of 300 ms or more (a dense pass at Wan 6x)
gets one sample and a 60 ms one five (a review counted them behind the 2026-12-01 tables). :func:`median_ms` asks
for at least ``min_samples`` repeats: an estimate from one short call of ``do_bench``, then a repeat window of
``min_samples + 1`` times it (never under 300 ms). The L2 is flushed before every repeat, as ``do_bench`` does.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Hashable, Mapping

MIN_SAMPLES = 10
WINDOW_MS = 300
ROUNDS = 3


def median_ms(fn: Callable[[], object], min_samples: int = MIN_SAMPLES) -> float:
    """Median milliseconds of ``fn`` over about ``min_samples`` repeats or more after a 50 ms warm-up (do_bench sizes
    its window by an estimate of its own, so a first estimate well below its second gives a few samples fewer)."""
    from triton.testing import do_bench
    estimate = float(do_bench(fn, warmup=1, rep=1, return_mode="median"))
    # do_bench divides the window by its own estimate, which adds the L2 flush: one sample more keeps the count
    return float(do_bench(fn, warmup=50, rep=max(WINDOW_MS, (min_samples + 1) * estimate), return_mode="median"))


def interleaved_ms(fns: Mapping[Hashable, Callable[[], object]], rounds: int = ROUNDS) -> dict[Hashable, list[float]]:
    """Each kernel's :func:`median_ms` in each of ``rounds`` rounds: a round times every kernel once, and each round
    starts one kernel later than the one before (kernel ``i`` is timed ``(i - r) mod n``-th in round ``r``). Returns
    every kernel's round medians, in round order; report their median (:func:`summary`).

    Why: on an H100 (2026-12-05, ``bench/fa4_wave_probe.py``) the same kernel timed twice in a row, one
    :func:`median_ms` each, differed by up to 15% (98,304 tokens, 12-17 heads; the GPU's clocks are not locked
    here). Timed once each, one after another, two kernels differ by that much for no reason of theirs; in rounds, a
    slow spell falls on every kernel in turn."""
    if not fns:
        return {}
    names = list(fns)
    samples: dict[Hashable, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        first = r % len(names)
        for name in names[first:] + names[:first]:
            samples[name].append(median_ms(fns[name]))
    return samples


def summary(samples: list[float]) -> dict[str, float]:
    """``ms`` (the median of a kernel's round medians) and its spread over the rounds (``ms_min``, ``ms_max``)."""
    return {"ms": float(statistics.median(samples)), "ms_min": float(min(samples)), "ms_max": float(max(samples))}


def time_rows(timed: list[tuple[dict, Callable[[], object]]], rounds: int = ROUNDS) -> None:
    """Time the calls of one shape together (:func:`interleaved_ms`) and give each row its :func:`summary` and its
    round medians (``ms_rounds``), so the ratios between the rows' kernels do not carry one run's slow spell."""
    samples = interleaved_ms(dict(enumerate(fn for _, fn in timed)), rounds)
    for i, (row, _) in enumerate(timed):
        row.update(summary(samples[i]), ms_rounds=samples[i])


def wall_seconds(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Wall seconds of one call of ``fn`` on the GPU (synchronized before and after) and its result: for one-off
    work such as planning or a first call that compiles."""
    import torch
    torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start, result


def rel_l2(a: Any, b: Any) -> float:
    """Relative L2 distance of ``a`` from ``b`` in float32."""
    return float((a.float() - b.float()).norm() / b.float().norm())


def write_rows(out: Path, stem: str, title: str, rows: list[dict], meta: dict, notes: tuple[str, ...]) -> None:
    """``out/stem.json`` (meta and rows) and ``out/stem.md``: a table of case, density, row, its ms (with the spread of
    its rounds where :func:`time_rows` timed it) or s and the ``notes`` keys a row has."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = ["| case | density | row | ms / s | note |", "|---|---|---|---|---|"]
    for row in rows:
        value = f"{row['ms']:.2f} ms" if "ms" in row else (f"{row['s']:.3f} s" if "s" in row else "")
        if "ms_rounds" in row:
            value += f" ({row['ms_min']:.2f}-{row['ms_max']:.2f} over {len(row['ms_rounds'])} rounds)"
        note = {key: row[key] for key in notes if key in row}
        lines.append(f"| {row['case']} | {row['density']:.3f} | {row['row']} | {value} | {note or ''} |")
    (out / f"{stem}.md").write_text(f"# {title} ({meta['machine']}, {meta['date']})\n\n"
                                    f"Versions: {meta['versions']}\n\n" + "\n".join(lines) + "\n")


def run_cases(cases: list[tuple], wanted: list[str] | None, rows_of: Callable[..., list[dict]],
              write: Callable[[list[dict]], None]) -> list[dict]:
    """``rows_of(*case)`` for every case whose name (its first field) is in ``wanted`` (all when empty), each row
    printed as json when made; ``write(rows)`` after every case, so what ran survives a time limit."""
    import torch
    rows: list[dict] = []
    for case in cases:
        if wanted and case[0] not in wanted:
            continue
        for row in rows_of(*case):
            rows.append(row)
            print(json.dumps(row), flush=True)
        write(rows)
        torch.cuda.empty_cache()
    return rows


def cudnn_dense(q: Any, k: Any, v: Any, ours: Any) -> tuple[Callable[[], Any], float]:
    """cuDNN dense attention on ``q, k, v`` as a call (to time with the others, :func:`time_rows`) and the relative L2
    of ``ours`` from its output."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def call() -> Any:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return call, rel_l2(ours, call())
