"""Per-layer planning time of each method at Wan 2.1 geometries: what a step pays before its kernel launches.

    python bench/planning_benchmark.py [--device cuda] [--lengths 1x 6x] [--methods sta ...] [--out DIR]

For one layer of a Wan 2.1 1.3B-shaped model (12 heads, head dim 128; 480x832 video: 1x = 21
latent frames, 32,760 tokens; 6x = 121 frames, 188,760 tokens) and each method's step kinds,
the time from the session's decision to a kernel that only has to launch: ``session.action``,
``session.plan`` (with q, k where the method needs them), ``sparsecore.compile`` and the
kernel's ``prepare`` (tile plan, FA4 conversion, ...). The device queue is drained before each
timed repeat, so the number is the planning's own host time plus the device work it waits for
(its top-k, block masses): nothing of earlier layers. Also reported: how many host reads
(device-to-host copies) one plan makes, counted with torch's CUDA sync debug mode on GPU, and
the host's own time: the same call made while the device is still busy with a 1-second sleep
kernel queued before it, so the call only enqueues its work. A call that reads from the device
waits for the sleep there; its host time is not measurable this way and shows as "waits".

STA with a mask strategy plans each layer's per-head mask anew, from its windows' one-head masks (those are
what the integration compiles, once a run), so its rows time the plan alone, cycling over 30 layers' windows (each
head one of the three windows nearest density 0.15 on the grid, ``sta_search.candidate_windows``).
AdaSpa's search step runs the block-mass pass; on a CPU it takes random block masses instead
(a dense pass over 188K tokens is not a CPU job), so the CPU rows time the selection only.
Writes ``planning-<device>-<date>.json`` and ``.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from report import time_one_backend, versions, write_report

import sparsecore
from sparsecore import VideoGeometry
from sparsecore.methods import adaspa, lvsa, pasa, sta, sta_search
from sparsecore.search import dense_attention, dense_attention_with_mass
from sparsecore.timing import synchronize

LENGTHS = {"1x": VideoGeometry(21, 30, 52), "6x": VideoGeometry(121, 30, 52)}
HEADS, HEAD_DIM = 12, 128
STA_LAYERS = 30


def timed(fn, device: str, repeats: int) -> tuple[float, object]:
    fn()                                                     # warm: kernels compiled, caches filled
    times, result = [], None
    for _ in range(repeats):
        synchronize(device)
        began = time.perf_counter()
        result = fn()
        synchronize(device)
        times.append(time.perf_counter() - began)
    return statistics.median(times), result


def host_seconds(fn, device: str, repeats: int) -> float | None:
    """Median host time of ``fn()`` while the device works through a queued sleep (None: fn waited for it)."""
    if not device.startswith("cuda"):
        return None
    times = []
    for _ in range(repeats):
        synchronize(device)
        torch.cuda._sleep(2_000_000_000)                     # about a second of device time at ~2 GHz
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
        synchronize(device)
    seconds = statistics.median(times)
    return None if seconds > 0.5 else seconds


def host_reads(fn, device: str) -> int | None:
    """Device-to-host synchronizations during ``fn()`` (CUDA only: torch's sync debug mode warns on each)."""
    if not device.startswith("cuda"):
        return None
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def prepared(mask, q, k, v, device: str, cache: bool = True):
    """The compiled, planned kernel on a GPU; on a CPU the mask only (the portable lowering's plan of a
    188K-token mask would gather billions of token ids: not a CPU workload). ``cache=False`` as the
    diffusers integration compiles a session's host masks (nothing found in sparsecore's kernel cache)."""
    if not device.startswith("cuda"):
        return mask
    kernel = sparsecore.compile(mask, device=device, cache=cache)
    kernel.prepare(q, k, v)
    return kernel


def cases(geometry: VideoGeometry, device: str, dtype: torch.dtype, methods: list[str]):
    """(method, step kind, plan function) of the ``methods`` asked for (all when empty); a method's setup (AdaSpa's
    dense passes) runs only when it is."""
    wanted = lambda method: not methods or method in methods  # noqa: E731
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, geometry.tokens, HEAD_DIM, device=device, dtype=dtype, generator=gen)
               for _ in range(3))
    if wanted("pasa"):
        pasa_session = pasa.session(num_steps=50)
        yield "pasa", "select", lambda: prepared(pasa_session.plan(geometry, HEADS, step=20, layer=3, q=q, k=k),
                                                 q, k, v, device)
    if wanted("lvsa"):
        # a step's first layer builds the step's rotation (a new session each repeat: nothing memoized), compiled as
        # the integration compiles it; the step's other layers find it held
        yield "lvsa", "first layer of a step (new rotation)", \
            lambda: prepared(lvsa.session(num_steps=50).plan(geometry, HEADS, step=20), q, k, v, device, cache=False)
        lvsa_session = lvsa.session(num_steps=50)
        yield "lvsa", "other layers of the step (rotation held)", \
            lambda: prepared(lvsa_session.plan(geometry, HEADS, step=21), q, k, v, device)
        # its mask on 64-token blocks instead of frames (block_size=64): the plan alone, the lists being most of it
        yield "lvsa", "a step's new rotation, 64-token blocks (plan alone)", \
            lambda: lvsa.session(num_steps=50, block_size=64).plan(geometry, HEADS, step=20)
    if wanted("adaspa"):
        yield from adaspa_cases(geometry, device, q, k, v)
    if wanted("sta"):
        # a strategy gives each (step, layer) its per-head windows: each layer's mask is planned anew (the session
        # keeps the last 4), from the one-head masks of its windows; those are compiled once a run and run per window
        # (StepAction.head_groups), so the per-head mask itself is not compiled: its plan is the whole cost
        candidates = sta_search.candidate_windows(sta.tile_grid(geometry, (6, 8, 8)), 0.15)[:3]   # as a search takes
        windows = torch.randint(len(candidates), (STA_LAYERS, HEADS), generator=torch.Generator().manual_seed(2))
        strategy = {f"0_{layer}_{h}": candidates[int(windows[layer, h])] for layer in range(STA_LAYERS)
                    for h in range(HEADS)}
        sta_session, layers = sta.session(1, mask_strategy=strategy), itertools.cycle(range(STA_LAYERS))
        yield "sta", "strategy: a layer's per-head windows", \
            lambda: sta_session.plan(geometry, HEADS, step=0, layer=next(layers))


def adaspa_cases(geometry: VideoGeometry, device: str, q, k, v):
    """AdaSpa's step kinds: on CUDA the searches on the dense passes' outputs and the reuse; on a CPU the selection."""
    ada = adaspa.session(num_steps=50, first_search="fused")     # the paper's first search, in both of its forms
    if device.startswith("cuda"):
        _, lse = dense_attention(q, k, v)
        yield "adaspa", "search (pass 2 on the dense pass's LSE)", \
            lambda: prepared(ada.plan(geometry, HEADS, step=10, layer=0, q=q, k=k, lse=lse), q, k, v, device)
        offsets = geometry.block_offsets(64)
        _, found = dense_attention_with_mass(q, k, v, offsets, offsets)
        fused_lse, fused_mass = found.lse, found.mass.sum(0)
        yield "adaspa", f"search (masses from the dense pass: {found.impl})", \
            lambda: prepared(ada.plan(geometry, HEADS, step=10, layer=0, lse=fused_lse, mass=fused_mass), q, k, v,
                             device)
        yield "adaspa", "cached search", \
            lambda: prepared(ada.plan(geometry, HEADS, step=30, layer=0, q=q, k=k), q, k, v, device)
        searched = ada.cached_mask(0)            # the rows above ran (timed) before this line: layer 0 is searched
        yield "adaspa", "reuse", lambda: prepared(searched, q, k, v, device)
    else:
        offsets = geometry.block_offsets(64)
        mass = torch.rand(HEADS, len(offsets) - 1, len(offsets) - 1, generator=torch.Generator().manual_seed(1))
        yield "adaspa", "selection (given masses)", \
            lambda: prepared(adaspa.plan(geometry, HEADS, step=10, layer=0, mass=mass), q, k, v, device)


def check_dense_lse(device: str) -> float:
    """Max |LSE difference| of :func:`dense_attention` (FA4's or cuDNN's on CUDA: ``dense_impl``) against float32
    logsumexp, GQA 2:1."""
    gen = torch.Generator(device=device).manual_seed(3)
    q = torch.randn(1, 4, 777, HEAD_DIM, device=device, generator=gen).to(torch.bfloat16)
    k = torch.randn(1, 2, 901, HEAD_DIM, device=device, generator=gen).to(torch.bfloat16)
    _, lse = dense_attention(q, k, k)
    want = torch.logsumexp(q.float() @ k.float().repeat_interleave(2, 1).transpose(-1, -2) * HEAD_DIM ** -0.5, -1)
    return float((lse - want).abs().max())


def run(device: str, lengths: list[str], repeats: int, methods: list[str]) -> list[dict]:
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    rows = []
    for label in lengths:
        geometry = LENGTHS[label]
        for method, step, fn in cases(geometry, device, dtype, methods):
            seconds, kernel = timed(fn, device, repeats)
            reads = host_reads(fn, device)
            host = host_seconds(fn, device, repeats)
            mask = getattr(kernel, "mask", kernel)
            backend = kernel.backend.name if hasattr(kernel, "backend") else "(plan only)"
            rows.append({"length": label, "tokens": geometry.tokens, "method": method, "step": step,
                         "ms_per_layer": seconds * 1e3, "host_ms": None if host is None else host * 1e3,
                         "host_reads": reads, "backend": backend,
                         "density": mask.density()})
            print(f"{label} {method:7s} {step:42s} {seconds * 1e3:9.2f} ms  host {host}  reads {reads}  {backend}",
                  flush=True)
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# Per-layer planning time, {meta['date']}", "",
             f"Device: {meta['device']}; torch {meta['torch']}. Wan 2.1 1.3B layer shape: {HEADS} heads x "
             f"{HEAD_DIM}, 480x832. Median of {meta['repeats']} after a warm-up; the device queue is drained before "
             "each repeat. `bench/planning_benchmark.py`. The dense pass's LSE (the search's pass 1) against float32 "
             f"logsumexp: max |diff| {meta['dense_lse_max_abs_diff']:.1e}.", "",
             "| length | tokens | method | step | ms per layer | host ms | host reads | backend | density |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        reads = "" if r["host_reads"] is None else r["host_reads"]
        host = "waits" if r["host_reads"] and r["host_ms"] is None else \
            ("" if r["host_ms"] is None else f"{r['host_ms']:.2f}")
        lines.append(f"| {r['length']} | {r['tokens']:,} | {r['method']} | {r['step']} | {r['ms_per_layer']:.2f} | "
                     f"{host} | {reads} | {r['backend']} | {r['density']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    time_one_backend()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--lengths", nargs="*", default=["1x", "6x"], choices=sorted(LENGTHS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--methods", nargs="*", default=[], choices=["pasa", "lvsa", "adaspa", "sta"],
                        help="only these methods' rows (default: all)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--tag", default="", help="appended to the file names (two runs of one day)")
    args = parser.parse_args()
    meta = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "repeats": args.repeats,
            "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else
            f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
            "versions": versions(args.device)}
    meta["dense_lse_max_abs_diff"] = check_dense_lse(args.device)
    print(f"dense_attention LSE vs float32 logsumexp: max |diff| {meta['dense_lse_max_abs_diff']:.2e}", flush=True)
    rows = run(args.device, args.lengths, args.repeats, args.methods)
    stem = f"planning-{args.device.split(':')[0]}-{meta['date']}" + (f"_{args.tag}" if args.tag else "")
    write_report(args.out / stem, meta, rows, markdown(rows, meta))
    print(markdown(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
