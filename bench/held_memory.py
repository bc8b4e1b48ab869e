"""What a method keeps on the GPU between steps: the blocks made after ``apply()`` and still allocated after its steps.

    python bench/held_memory.py --length 2x [--model wan-1.3b] [--mode compiled]
                                [--methods dense-sparsecore pasa lvsa adaspa] [--out bench/results]

The e2e benchmark reports, per row, the memory still allocated after the row's steps above dense's
(``allocated_mib``); this names what it is. Builds the e2e benchmark's random-weight Wan 2.1 1.3B (or
``--model hv15``, its HunyuanVideo 1.5 of 6 layers) at ``--length`` (bf16, one GPU), runs two dense steps
(compiled with diffusers' regional compilation in ``--mode compiled``, as the e2e benchmark does), then per
method: starts PyTorch's CUDA allocator history (``torch.cuda.memory._record_memory_history``), applies
the method, runs the e2e benchmark's steps for it (:data:`e2e_schedules.STEPS`), collects garbage, and lists
the blocks allocated since ``apply()`` that are still allocated, grouped by the code that made them (up to
``--frames`` frames of this repository, else the innermost frame), with ``memory_allocated`` before and
after. The method is removed after that. Writes ``held-memory-[hv15-]<length>-<mode>-<date>.{md,json}``.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

from e2e_schedules import METHOD_PARAMS, STEPS, VARIANTS, full_attention
from memory_profile import REPO, model_on_gpu, replay, step
from report import run_meta

from sparsecore.integrations import diffusers as sc_diffusers

MAX_ENTRIES = 2_000_000         # allocator events the history keeps (the oldest go first)


def made_at(event: dict, depth: int) -> str:
    """Up to ``depth`` frames of this repository that made the block, innermost first (else the innermost frame)."""
    frames = event.get("frames") or []
    ours = [f for f in frames if f["filename"].startswith(REPO)][:depth] or frames[:1]
    return " < ".join(f"{Path(f['filename']).name}:{f['line']} {f['name']}" for f in ours) or "?"


def held_by(model, inputs: dict, method: str, depth: int) -> dict:
    """One method's blocks still allocated after its steps, made since its ``apply()``."""
    gc.collect()
    before = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(stacks="python", max_entries=MAX_ENTRIES)
    name, params = VARIANTS.get(method, (method, {}))              # as the e2e rows run it (e2e_runner.run_mode)
    params = {**METHOD_PARAMS.get(name, {}), **params}
    handle = sc_diffusers.apply(model, method=full_attention if method == "dense-sparsecore" else name,
                                device="cuda", num_steps=50, **params)
    try:
        for _, index in STEPS[method]:
            handle.set_step(index)
            step(model, inputs, 1000.0 - 19 * index)
        gc.collect()
        after = torch.cuda.memory_allocated()
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
        handle.remove()
    trace = [e for device in snapshot["device_traces"] for e in device]
    if len(trace) >= MAX_ENTRIES:
        print(f"warning: {method}: the allocator history reached {MAX_ENTRIES:,} events and dropped the oldest; "
              "blocks made before them are not listed", flush=True)
    groups: dict[str, list[int]] = defaultdict(list)
    for event in replay(trace)[2].values():
        groups[made_at(event, depth)].append(event["size"])
    gc.collect()
    return {"method": method, "allocated_before": before, "allocated_after": after,
            "allocated_after_remove": torch.cuda.memory_allocated(), "events": len(trace),
            "held": sorted(({"made_at": k, "blocks": len(v), "bytes": sum(v)} for k, v in groups.items()),
                           key=lambda g: -g["bytes"])}


def markdown(meta: dict, rows: list[dict], top: int) -> str:
    model = {"wan-1.3b": "Wan 2.1 1.3B", "hv15": "HunyuanVideo 1.5 (6 layers)"}[meta.get("model", "wan-1.3b")]
    lines = [f"# Held between steps, {model} at {meta['length']}, {meta['mode']} ({meta['date']})", "",
             f"{meta['versions']}. Per method: `memory_allocated` before `apply()`, after its "
             "steps (e2e_benchmark's), and after `remove()`, in bytes; then the blocks made since `apply()` and "
             "still allocated after the steps, by where they were made.", ""]
    for row in rows:
        lines += [f"## {row['method']}", "",
                  f"before {row['allocated_before']:,}; after the steps {row['allocated_after']:,} "
                  f"({row['allocated_after'] - row['allocated_before']:+,}); after remove() "
                  f"{row['allocated_after_remove']:,} ({row['allocated_after_remove'] - row['allocated_before']:+,}); "
                  f"{row['events']:,} allocator events", "",
                  "| made at | blocks | bytes |", "|---|---:|---:|"]
        lines += [f"| `{g['made_at']}` | {g['blocks']} | {g['bytes']:,} |" for g in row["held"][:top]]
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", default="2x", choices=["1x", "2x", "4x", "6x"])
    parser.add_argument("--model", default="wan-1.3b", choices=["wan-1.3b", "hv15"])
    parser.add_argument("--mode", default="compiled", choices=["eager", "compiled"])
    parser.add_argument("--methods", nargs="+", default=["dense-sparsecore", "pasa", "lvsa", "adaspa"],
                        choices=sorted(set(STEPS) - {"sta-file"}))      # sta-file's windows: e2e's --sta-strategy
    parser.add_argument("--frames", type=int, default=3, help="frames of this repository named per group")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device: the allocator history is CUDA's")
    try:
        model, inputs = model_on_gpu(args.length, args.model)
    except ValueError as err:
        parser.error(str(err))
    if args.mode == "compiled":
        model.compile_repeated_blocks(fullgraph=True)
    step(model, inputs, 999.0)                        # compiles the blocks in compiled mode
    step(model, inputs, 999.0)
    meta = run_meta(model=args.model, length=args.length, mode=args.mode,
                    dense_allocated=torch.cuda.memory_allocated())
    date = meta["date"]
    rows = []
    for method in args.methods:
        rows.append(held_by(model, inputs, method, args.frames))
        print(f"{method}: held {rows[-1]['allocated_after'] - rows[-1]['allocated_before']:+,} bytes", flush=True)
    prefix = "" if args.model == "wan-1.3b" else f"{args.model}-"
    stem = args.out / f"held-memory-{prefix}{args.length}-{args.mode}-{date}"
    args.out.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    text = markdown(meta, rows, args.top)
    stem.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
