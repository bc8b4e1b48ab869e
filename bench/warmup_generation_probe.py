"""Probe (GPU): what the background warm-up does to a whole generation, against loading in place.

``sparsecore.warmup``'s default (``background``) makes a first call quick: calls run Triton while FA4 loads on a
worker thread. But the worker's imports and compiles hold Python's GIL for seconds at a time, and a transformer
step launches hundreds of kernels from Python, so steps taken during the warm-up run slower (a Wan 2.1 1.3B step
at 2x compiled took 4.8 s against 1.66 s dense on the H200 while FA4 warmed up, 2026-12-02). This probe times
what a user waits for: a fresh process per mode (``SPARSECORE_WARMUP=wait`` / ``background``), the model built,
``apply()``, optionally ``compile_repeated_blocks(fullgraph=True)``, then ``--steps`` transformer steps of the
method's schedule, each timed, and the total from ``apply()`` to the last step's end; empty Triton and Inductor
caches in each process. Random weights (the kernels do not depend on them); Wan 2.1 1.3B geometry as
``e2e_benchmark.py``.

    python bench/warmup_generation_probe.py --out DIR [--method lvsa] [--length 2x] [--steps 20] [--modes ...]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from report import versions  # noqa: E402


def child(method: str, length: str, steps: int, compiled: bool) -> dict:
    """One generation's steps in this process (its warm-up mode from ``SPARSECORE_WARMUP``)."""
    import torch

    from e2e_models import build_model, cases, model_inputs
    from e2e_schedules import NUM_STEPS
    from e2e_timing import timed_forward
    from sparsecore.integrations import diffusers as sc_diffusers
    case = next(c for c in cases(["wan-1.3b"], tiny=False) if c.label == length)
    model = build_model(case, False, "cuda", torch.bfloat16)
    inputs = model_inputs(model, case, "cuda", torch.bfloat16)
    torch.cuda.synchronize()
    started = time.perf_counter()
    handle = sc_diffusers.apply(model, method=method, device="cuda", num_steps=NUM_STEPS)
    if compiled:
        model.compile_repeated_blocks(fullgraph=True)
    times = []
    for step in range(steps):
        handle.set_step(step)
        times.append(timed_forward(model, inputs, 1000.0 - 19 * step, "cuda"))
    total = time.perf_counter() - started
    backends = sorted({s["backend"] for s in handle.stats()})
    return {"method": method, "length": length, "compiled": compiled, "mode": os.environ["SPARSECORE_WARMUP"],
            "step_s": times, "total_s": total, "backends": backends}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--method", default="lvsa")
    parser.add_argument("--length", default="2x")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--modes", nargs="+", default=["wait", "background"], choices=["wait", "background"])
    parser.add_argument("--eager", action="store_true", help="no compile_repeated_blocks")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.method, args.length, args.steps, not args.eager)), flush=True)
        return 0
    rows = []
    for mode in args.modes:
        command = [sys.executable, __file__, "--child", "--out", str(args.out), "--method", args.method,
                   "--length", args.length, "--steps", str(args.steps)] + (["--eager"] if args.eager else [])
        caches = tempfile.mkdtemp(prefix=f"warmup-{mode}-")     # empty Triton and Inductor caches for each mode
        env = {**os.environ, "SPARSECORE_WARMUP": mode, "TRITON_CACHE_DIR": f"{caches}/triton",
               "TORCHINDUCTOR_CACHE_DIR": f"{caches}/inductor"}
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        found = [line[7:] for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if not found:
            rows.append({"mode": mode, "error": (done.stderr or done.stdout)[-2000:]})
        else:
            rows.append(json.loads(found[0]))
        print(json.dumps(rows[-1]), flush=True)
    meta = {"date": datetime.date.today().isoformat(), **versions()}
    meta.pop("warmup")                                  # each row names its own mode
    args.out.mkdir(parents=True, exist_ok=True)
    lines = [f"# Whole generations by warm-up mode, {meta['date']}", "", str(meta), "",
             "| method | length | compiled | mode | total s | first step s | steps 2-5 s | median of the rest s |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {args.method} | {args.length} | | {r['mode']} | failed | | | |")
            continue
        s = r["step_s"]
        rest = sorted(s[5:])
        lines.append(f"| {r['method']} | {r['length']} | {r['compiled']} | {r['mode']} | {r['total_s']:.1f} "
                     f"| {s[0]:.2f} | {', '.join(f'{t:.2f}' for t in s[1:5])} "
                     f"| {rest[len(rest) // 2] if rest else float('nan'):.3f} |")
    stem = args.out / f"warmup-generation-{args.method}-{args.length}-{'eager' if args.eager else 'compiled'}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
