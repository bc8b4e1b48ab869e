"""Where a step's peak GPU memory goes: the live allocations at the peak, grouped by the code that made them.

    python bench/memory_profile.py --method pasa --length 6x [--out bench/results]

Builds the e2e benchmark's random-weight Wan 2.1 1.3B at ``--length`` (bf16, one GPU) and records
PyTorch's CUDA allocator history (``torch.cuda.memory._record_memory_history``) over steps of
``--method`` (``dense``: diffusers' own attention): the first compiles its kernels and plans its
masks, the last is a step of the kind that repeats (AdaSpa's three: step 9 keeps its dense pass's
LSE, step 10 searches on it, step 11 reuses; ``--steps`` picks them). The recorded trace
is replayed to the moment of the highest allocated total; the blocks alive then are grouped by their innermost frame in this repository (else
their innermost frame) and listed largest first, with ``max_memory_allocated`` for reference.
Writes ``memory-<method>-<length>-<date>.md``.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

from e2e_models import build_model, cases, model_inputs
from report import run_meta

from sparsecore.integrations import diffusers as sc_diffusers

REPO = str(Path(__file__).resolve().parent.parent)
STEPS = {"pasa": (12, 13), "lvsa": (22, 23),    # (a step that compiles, the next one)
         "adaspa": (9, 10, 11)}                   # the dense pass that keeps its LSE, the first search, a reuse


def replay(trace: list[dict], stop: int | None = None) -> tuple[int, int, dict[int, dict]]:
    """Blocks allocated within ``trace[:stop]`` and still alive at its end, the bytes they hold at their highest,
    and the event index of that highest (frees of blocks allocated before the trace are ignored)."""
    live: dict[int, dict] = {}
    now = peak = peak_index = 0
    for index, event in enumerate(trace[:stop]):
        if event["action"] == "alloc":
            live[event["addr"]] = event
            now += event["size"]
            if now > peak:
                peak, peak_index = now, index
        elif event["action"] == "free_completed" and event["addr"] in live:
            now -= live.pop(event["addr"])["size"]
    return peak, peak_index, live


def peak_blocks(trace: list[dict]) -> tuple[int, list[dict]]:
    """The highest total of bytes allocated within ``trace`` (the allocator's events, in order) and the
    ``alloc`` events of the blocks alive at that moment."""
    peak, index, _ = replay(trace)
    return peak, list(replay(trace, index + 1)[2].values())


def origin(event: dict) -> str:
    """The innermost frame of this repository that made the block (else the innermost frame)."""
    frames = event.get("frames") or []
    ours = [f for f in frames if f["filename"].startswith(REPO)]
    frame = (ours or frames or [{"filename": "?", "line": 0, "name": "?"}])[0]
    return f"{Path(frame['filename']).name}:{frame['line']} {frame['name']}"


def step(model, inputs: dict, timestep: float = 500.0) -> None:
    with torch.no_grad():
        model(timestep=torch.tensor([timestep], device="cuda", dtype=model.dtype), **inputs)
    torch.cuda.synchronize()


def model_on_gpu(length: str, name: str = "wan-1.3b") -> tuple[torch.nn.Module, dict]:
    """The e2e benchmark's random-weight model ``name`` (Wan 2.1 1.3B by default) at ``length`` and its inputs, bf16 on
    the GPU."""
    found = [c for c in cases([name], tiny=False) if c.label == length]
    if not found:
        raise ValueError(f"length: the e2e benchmark runs {name} at {[c.label for c in cases([name], tiny=False)]}, "
                         f"got {length!r}")
    case = found[0]
    model = build_model(case, False, "cuda", torch.bfloat16)
    return model, model_inputs(model, case, "cuda", torch.bfloat16)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="pasa", choices=["dense", *STEPS],
                        help="adaspa: its search step compiles, its first reuse step is recorded")
    parser.add_argument("--length", default="6x", choices=["1x", "2x", "4x", "6x"])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--steps", type=int, nargs="+", metavar="STEP",
                        help=f"the steps recorded (default {STEPS})")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device: the allocator history is CUDA's")
    model, inputs = model_on_gpu(args.length)
    handle, steps = None, args.steps or STEPS.get(args.method, (0, 1))
    if args.method != "dense":
        handle = sc_diffusers.apply(model, method=args.method, device="cuda", num_steps=50)
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(stacks="python", max_entries=2_000_000)
    peaks = []
    for index in steps:
        if handle is not None:
            handle.set_step(index)
        step(model, inputs)
        peaks.append(torch.cuda.max_memory_allocated() / 2**30)
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    trace = [e for device in snapshot["device_traces"] for e in device]
    peak, live = peak_blocks(trace)
    groups: dict[str, list[int]] = defaultdict(list)
    for event in live:
        groups[origin(event)].append(event["size"])
    meta = run_meta()
    date = meta["date"]
    lines = [f"# Peak GPU memory of a {args.method} step, Wan 2.1 1.3B at {args.length} ({date})", "",
             f"{meta['versions']}; max_memory_allocated "
             f"{peaks[-1]:.2f} GiB (after step {steps[0]}: {peaks[0]:.2f}); the recorded peak {peak / 2**30:.2f} GiB "
             f"above what was allocated before step {steps[0]} (the model's weights, inputs), over {len(trace)} "
             f"events.", "",
             "| made at | blocks | GiB |", "|---|---:|---:|"]
    for where, sizes in sorted(groups.items(), key=lambda kv: -sum(kv[1]))[:args.top]:
        lines.append(f"| `{where}` | {len(sizes)} | {sum(sizes) / 2**30:.2f} |")
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"memory-{args.method}-{args.length}-{date}.md").write_text(text)
    print(text)
    if handle is not None:
        handle.remove()
    return 0


if __name__ == "__main__":
    sys.exit(main())
