"""Where one compiled step's memory peak comes from: the tensors alive at its highest point, and where each was made.

The e2e benchmark reports each row's peak (``torch.cuda.max_memory_allocated`` over its steps). This script runs one
model case as ``bench/e2e_benchmark.py`` does (its models, inputs, compile and step plans), records the allocator's
history during one forward of a method's repeating kind of step (``torch.cuda.memory._record_memory_history``), and
prints the peak over the memory allocated before the forward, with every allocation alive at that moment (of at
least ``--min-mib``) and the first frames of its Python stack in sparsecore, diffusers, inductor's generated code or
flash-attn. ``dense-sparsecore`` (every step dense through sparsecore) is the reference row.

    python bench/peak_trace.py --model cosmos --length 2x --methods dense-sparsecore lvsa pasa --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from e2e_models import FULL_CASES, build_model, model_inputs  # noqa: E402
from e2e_schedules import STEPS, full_attention  # noqa: E402
from e2e_timing import timed_forward  # noqa: E402
from report import run_meta  # noqa: E402

from sparsecore.integrations import diffusers as sc_diffusers  # noqa: E402

KEEP = ("sparsecore", "/backends/", "diffusers", "torchinductor", "flash_attn")   # frames worth printing
MIB = 2**20


def site(frames: list[dict]) -> str:
    """The first three frames of an allocation's stack that are ours, diffusers', inductor's code or FA4's."""
    kept = [f"{Path(f['filename']).name}:{f['line']} {f['name']}" for f in frames
            if any(part in f["filename"] for part in KEEP)]
    return " < ".join(kept[:3]) or "(no frame of ours)"


def live_at_peak(trace: list[dict]) -> tuple[int, list[tuple[int, str]]]:
    """The highest sum of the traced forward's live allocations, and those allocations (bytes, site), largest first.
    Blocks freed during the forward but made before it count as negative, so the sum is the change from its start."""
    live: dict[int, tuple[int, str]] = {}
    current = peak = 0
    at_peak: dict[int, tuple[int, str]] = {}
    for event in trace:
        action, addr, size = event["action"], event["addr"], event["size"]
        if action == "alloc":
            live[addr] = (size, site(event.get("frames", [])))
            current += size
            if current > peak:
                peak, at_peak = current, dict(live)
        elif action == "free_completed":
            current -= size
            live.pop(addr, None)
    return peak, sorted(at_peak.values(), reverse=True)


def traced(model, inputs: dict, timestep: float, device: str) -> dict:
    """One forward with the allocator's history recorded: the peak over the memory allocated at its start."""
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(max_entries=500_000, context="alloc", stacks="python")
    timed_forward(model, inputs, timestep, device)
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    peak, alive = live_at_peak(snapshot["device_traces"][0])
    return {"allocated_before_mib": start / MIB, "max_allocated_mib": torch.cuda.max_memory_allocated() / MIB,
            "traced_peak_over_start_mib": peak / MIB, "alive_at_peak": [(size / MIB, where) for size, where in alive]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="cosmos")
    parser.add_argument("--length", default="2x")
    parser.add_argument("--methods", nargs="+", default=["dense-sparsecore", "lvsa", "pasa"])
    parser.add_argument("--min-mib", type=float, default=32.0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    device = "cuda"
    case = next(c for c in FULL_CASES[args.model] if c.label == args.length)
    model = build_model(case, False, device, torch.bfloat16)
    inputs = model_inputs(model, case, device, torch.bfloat16)
    if model._repeated_blocks:
        model.compile_repeated_blocks(fullgraph=True)
    else:
        for block in model.transformer_blocks:
            block.compile(fullgraph=True)
    result = {"meta": run_meta(device, case=vars(case)), "rows": {}}
    for method in args.methods:
        handle = sc_diffusers.apply(model, method=full_attention if method == "dense-sparsecore" else method,
                                    device=device, num_steps=50)
        try:
            handle.set_step(0)
            timed_forward(model, inputs, 1000.0, device)                      # compiles with sparsecore's processors
            plan = STEPS[method]
            for kind, step in plan:                                           # searches and warm-ups as the e2e runs
                handle.set_step(step)
                timed_forward(model, inputs, 1000.0 - 19 * step, device)
            kind, step = plan[-1]
            handle.set_step(step + 1)
            row = traced(model, inputs, 1000.0 - 19 * (step + 1), device)
        finally:
            handle.remove()
        row["alive_at_peak"] = [(mib, where) for mib, where in row["alive_at_peak"] if mib >= args.min_mib]
        result["rows"][method] = {"kind": kind, "step": step + 1, **row}
        print(f"{method} ({kind}, step {step + 1}): {row['allocated_before_mib']:.0f} MiB before, max "
              f"{row['max_allocated_mib']:.0f}, traced peak +{row['traced_peak_over_start_mib']:.0f}", flush=True)
        for mib, where in row["alive_at_peak"]:
            print(f"    {mib:9.1f} MiB  {where}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"peak-trace-{args.model}-{args.length}.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
