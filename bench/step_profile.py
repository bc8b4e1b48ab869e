"""Probe (GPU): where the time of a method's repeating step goes, on each backend side by side in one process.

CogVideoX 1.5's AdaSpa reuse step on ``fa4`` spread 5.49-7.41 s over four calls on three lent machines while
Triton's stayed at 4.99-5.06 s, with the same masks (2026-12-04, ``bench/results/gpu-2026-12-04-runs/notes.md``,
thirty-first session: the GPU idled while the host counted each held mask's pairs). This probe builds one
random-weight model of ``bench/e2e_benchmark.py`` once and, for each method and backend in turn (alternating, so
all see the same host and GPU state), applies the method, walks its steps as the benchmark does up to the kind of
step that repeats in a generation (AdaSpa's reuse, PASA's and LVSA's sparse steps), and then:

- times ``--repeats`` such steps (wall seconds, the device synchronized around each);
- profiles one with ``torch.profiler`` (host and CUDA): the step's wall time, the GPU's busy time (the union of
  its kernels' and copies' intervals) and so its idle time (an upper bound: the profiler's own host time adds to
  it), the host's waits for the device within the forward (``cudaStreamSynchronize``, ``cudaEventSynchronize``,
  ``cudaDeviceSynchronize``, synchronous copies: count and time; until 2026-12-04 the count and time also took the
  timer's own synchronizes around the forward, the closing one waiting for all the step's queued work), and the
  kernels' total time by name;
- runs one more under ``cProfile``: the host functions with the most cumulative time (a host wait shows up as
  the time of the call that reads the device).

    python bench/step_profile.py --out DIR [--model cogvideox-1.5] [--length 2x] [--methods adaspa pasa lvsa]
                                 [--prompt-tokens N] [--negative-tokens N]
                                 [--backends fa4 triton fa4 triton | default ...] [--repeats 3] [--tiny]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
from pathlib import Path

import torch

from e2e_models import MODELS, build_model, cases, model_inputs, prompt_options_error
from e2e_schedules import METHOD_PARAMS, PLAN_PROBE, STEPS
from e2e_timing import FORWARD_RANGE, timed_forward, warm_batch_lengths, warm_kernels
from report import run_meta, time_one_backend, write_report

from sparsecore.integrations import diffusers as sc_diffusers

WAIT_CALLS = ("cudaStreamSynchronize", "cudaEventSynchronize", "cudaDeviceSynchronize", "cudaMemcpy")


def host_cpu() -> str:
    """The host's CPU model and count (the lent machines' hosts differ: imports took 3.8-8.2 s across them)."""
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
    except OSError:
        names = []
    return f"{names[0] if names else 'unknown CPU'} x {os.cpu_count()}"


def timestep(step: int) -> float:
    """The timestep ``bench/e2e_benchmark.py`` passes at ``step`` (a new value marks a new step)."""
    return 1000.0 - 19 * step


def busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """The length of the union of ``(start, end)`` intervals."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def profiled_step(model, inputs: dict, step: int, device: str) -> dict:
    """One step under ``torch.profiler``: wall, GPU busy and idle, host waits, kernels by total time."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        wall = timed_forward(model, inputs, timestep(step), device)
    events = prof.events()
    device_events = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    intervals = [(e.time_range.start / 1e6, e.time_range.end / 1e6) for e in device_events]
    forward = next(e for e in events if e.name == FORWARD_RANGE and e.device_type == torch.autograd.DeviceType.CPU)
    waits = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU      # inside the forward only: the
             and forward.time_range.start <= e.time_range.start <= forward.time_range.end   # timer's own do not count
             and any(e.name.startswith(w) and "Async" not in e.name for w in WAIT_CALLS)]
    kernels: dict[str, float] = {}
    for e in device_events:
        kernels[e.name[:90]] = kernels.get(e.name[:90], 0.0) + (e.time_range.end - e.time_range.start) / 1e6
    busy = busy_seconds(intervals)
    return {"wall_s": wall, "gpu_busy_s": busy, "gpu_idle_s": max(0.0, wall - busy),
            "host_waits": len(waits), "host_wait_s": sum((e.time_range.end - e.time_range.start) / 1e6 for e in waits),
            "kernels_s": dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:8])}


def host_profile(model, inputs: dict, step: int, device: str, top: int = 45) -> str:
    """One step under ``cProfile``: the ``top`` functions by cumulative time."""
    profiler = cProfile.Profile()
    profiler.enable()
    timed_forward(model, inputs, timestep(step), device)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(top)
    return text.getvalue()


def repeated_steps(model, inputs: dict, handle, method: str, device: str, repeats: int) -> list[int]:
    """Walk ``method``'s steps as ``bench/e2e_benchmark.py`` does (its dense, search and warm-up steps included),
    then return ``repeats + 2`` steps of the kind that repeats (AdaSpa's reuse, the others' sparse steps)."""
    handle.set_step(0)
    timed_forward(model, inputs, timestep(0), device)
    warm_batch_lengths(model, inputs, device, handle)                   # as the e2e benchmark
    for _, step in STEPS[method]:
        handle.set_step(step)
        timed_forward(model, inputs, timestep(step), device)
    first = PLAN_PROBE[method] + 1             # AdaSpa's PLAN_PROBE step is the first reuse after a cached search
    return list(range(first, first + repeats + 2))


def measure(args) -> tuple[list[dict], list[str]]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    case = next(c for c in cases([args.model], tiny=args.tiny) if c.model == args.model and c.label == args.length)
    backends = args.backends or (["fa4", "triton", "fa4", "triton"] if device == "cuda" else ["default"])
    model = build_model(case, args.tiny, device, dtype)
    inputs = model_inputs(model, case, device, dtype, args.prompt_tokens, args.negative_tokens)
    scale = case.layers_full / case.layers_run
    rows, texts, warmed = [], [], set()
    for turn, (method, backend) in enumerate((m, b) for m in args.methods for b in backends):
        kernel_backend = None if backend == "default" else backend
        if backend not in warmed:
            warm_kernels(model, inputs, device, dtype, backend=kernel_backend)
            warmed.add(backend)
        params = dict(METHOD_PARAMS.get(method, {}))
        if case.layers_run < case.layers_full and method in ("pasa", "radial"):   # as e2e_benchmark: every layer
            params["dense_layers"] = () if method == "pasa" else 0             # run is sparse
        handle = sc_diffusers.apply(model, method=method, device=device, num_steps=50, backend=kernel_backend,
                                    **params)
        try:
            steps = iter(repeated_steps(model, inputs, handle, method, device, args.repeats))
            walls = []
            for _ in range(args.repeats):
                step = next(steps)
                handle.set_step(step)
                walls.append(timed_forward(model, inputs, timestep(step), device))
            step = next(steps)
            handle.set_step(step)
            row = {"turn": turn, "method": method, "backend": backend, "model": case.model, "length": case.label,
                   "layers_run": case.layers_run, "layers_full": case.layers_full, "kernels": sorted(
                       {s["backend"] for s in handle.stats() if s["step"] >= PLAN_PROBE[method]}),
                   "steps_s": walls, "step_scaled_s": statistics.median(walls) * scale,
                   **profiled_step(model, inputs, step, device)}
            step = next(steps)
            handle.set_step(step)
            texts.append(f"## turn {turn}: {method} on {backend}\n\n```\n"
                         f"{host_profile(model, inputs, step, device)}```\n")
        finally:
            handle.remove()
        print(f"{method} {backend} ({', '.join(row['kernels'])}): steps {['%.3f' % w for w in walls]} s "
              f"({case.layers_run} layers); profiled {row['wall_s']:.3f} s, GPU busy {row['gpu_busy_s']:.3f}, "
              f"idle {row['gpu_idle_s']:.3f}, {row['host_waits']} host waits {row['host_wait_s']:.3f} s", flush=True)
        rows.append(row)
    return rows, texts


def batch_text(meta: dict) -> str:
    """The batch the steps ran, in words: its size and the valid tokens of its prompts."""
    if meta.get("negative_tokens") is not None:
        return (f"batch 2 (classifier-free guidance: a {meta['prompt_tokens'] or 'full'}-token prompt and a negative "
                f"prompt of {meta['negative_tokens']} valid tokens)")
    return "batch 1" + (f" (a {meta['prompt_tokens']}-token prompt)" if meta.get("prompt_tokens") else "")


def markdown(meta: dict, rows: list[dict], texts: list[str]) -> str:
    lines = [f"# Repeating steps profiled, {meta['date']}", "", str(meta["versions"]), "", f"Host: {meta['host_cpu']}.",
             "", f"{rows[0]['model']} {rows[0]['length']}, eager, {batch_text(meta)}, {rows[0]['layers_run']} of "
             f"{rows[0]['layers_full']} layers (seconds of the layers run, not scaled; `scaled` = the median step "
             "scaled to the depth). Steps: AdaSpa's reuse, the others' sparse steps. GPU idle = wall - busy (an "
             "upper bound: the profiler's host time adds to it).", "",
             "| turn | method | backend (kernels) | steps | scaled | profiled step | GPU busy | GPU idle "
             "| host waits (s) |",
             "|---:|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['turn']} | {r['method']} | {r['backend']} ({', '.join(r['kernels'])}) | "
                     f"{', '.join(f'{w:.3f}' for w in r['steps_s'])} | {r['step_scaled_s']:.3f} | {r['wall_s']:.3f} | "
                     f"{r['gpu_busy_s']:.3f} | {r['gpu_idle_s']:.3f} | {r['host_waits']} ({r['host_wait_s']:.3f}) |")
    lines += ["", "Kernels by total time in the profiled step (seconds):", ""]
    for r in rows:
        lines.append(f"- turn {r['turn']} {r['method']} on {r['backend']}: "
                     + "; ".join(f"`{name}` {s:.4f}" for name, s in r["kernels_s"].items()))
    return "\n".join(lines + ["", "# Host profiles (cProfile, one more step each)", "", *texts])


def main() -> int:
    time_one_backend()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="cogvideox-1.5", choices=MODELS)
    parser.add_argument("--length", default="2x")
    parser.add_argument("--methods", nargs="+", default=["adaspa"],
                        choices=sorted(PLAN_PROBE.keys() & STEPS.keys() - {"dense-sparsecore"}))
    parser.add_argument("--backends", nargs="+", default=None,
                        help="sparsecore backends, each method run on each in turn ('default': each mask's own; "
                             "default fa4 triton fa4 triton on CUDA, else default)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="tiny configs on any device (a smoke test)")
    parser.add_argument("--prompt-tokens", type=int, default=None,
                        help="HunyuanVideo 1.0's and Mochi's text slots hold a prompt of this many tokens (as e2e)")
    parser.add_argument("--negative-tokens", type=int, default=None,
                        help="Mochi runs classifier-free guidance's batch of two, its negative prompt this many "
                        "valid tokens (as e2e)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats: expected at least 1, got {args.repeats}")
    error = prompt_options_error(args.prompt_tokens, args.negative_tokens, [args.model])
    if error:
        parser.error(error)
    if not torch.cuda.is_available() and not args.tiny:
        parser.error("needs a CUDA device (the profile is of GPU steps; --tiny runs anywhere)")
    lengths = [c.label for c in cases([args.model], tiny=args.tiny) if c.model == args.model]
    if args.length not in lengths:
        parser.error(f"--length: {args.model}{' (tiny)' if args.tiny else ''} has {lengths}, got {args.length!r}")
    meta = run_meta(model=args.model, length=args.length, methods=args.methods, host_cpu=host_cpu(),
                    prompt_tokens=args.prompt_tokens, negative_tokens=args.negative_tokens)
    rows, texts = measure(args)
    stem = args.out / f"step-profile-{meta['date']}-{args.model}-{args.length}"
    write_report(stem, meta, rows, markdown(meta, rows, texts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
