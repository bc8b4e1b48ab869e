"""Issue 7: one GPU vs N GPUs (diffusers Ulysses) for a Wan transformer step with sparsecore.

    python3 bench/multigpu_benchmark.py --model wan-1.3b --method lvsa --out DIR             # one GPU
    torchrun --nproc_per_node 2 bench/multigpu_benchmark.py --model wan-1.3b --method lvsa --out DIR
    python3 bench/multigpu_benchmark.py --report DIR                                          # the table

Each launch appends one row to ``DIR/multigpu-rows.jsonl``: per-step time (one transformer
forward, median of the timed steps after one warm-up step; with N ranks the steps start
together after a barrier and end when every rank has synchronized), peak memory of every
rank, and the output of the last step saved as ``DIR/out-<model>-<method>-<L>layers-<N>.pt``. A run
with N > 1 compares its output with the one-GPU file of the same model and method (run
first). ``--report`` writes ``multigpu-<date>.json`` and ``.md``.

Models as in ``e2e_benchmark.py`` (random weights, bf16, batch 1, 512 text tokens) at 6x
length (121 latent frames, 480x832: 188,760 tokens): ``wan-1.3b`` (30 layers, 12 heads),
``wan-14b`` (40 heads; ``--layers`` of its 40 layers run, the time scaled to 40).
Methods: ``lvsa`` (steps 20-23: its anchors rotate, so every step plans and compiles its
mask, as in a real run), ``adaspa`` (step 10 searches, its time is ``first_step_s``; steps
11-13 reuse the mask) or ``dense`` (diffusers' own attention and own Ulysses).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from e2e_benchmark import Case, build_model, model_inputs, versions
from sparsecore.integrations import diffusers as sc_diffusers

STEPS = {"lvsa": (20, 21, 22, 23),       # the first is the warm-up
         "adaspa": (10, 11, 12, 13),     # 10: search (dense output; per-head recalls all-gathered), then reuse
         "dense": (0, 1, 2, 3)}
FULL_DEPTH = {"wan-1.3b": 30, "wan-14b": 40}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--model", choices=sorted(FULL_DEPTH), default="wan-1.3b")
    parser.add_argument("--method", choices=sorted(STEPS), default="lvsa")
    parser.add_argument("--layers", type=int, default=None, help="layers to run (default: all)")
    parser.add_argument("--frames", type=int, default=121, help="latent frames (121: 6x Wan's 21)")
    parser.add_argument("--report", type=Path, default=None, help="write the table from DIR/multigpu-rows.jsonl")
    parser.add_argument("--tiny", action="store_true", help="tiny model and video: a smoke test on any device")
    args = parser.parse_args()
    if args.report is not None:
        return report(args.report)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if world > 1:
        dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=datetime.timedelta(minutes=8))
    row = run(args, world, rank, device)
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        with open(args.out / "multigpu-rows.jsonl", "a") as rows:
            rows.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    if world > 1:
        dist.destroy_process_group()
    return 0


def run(args: argparse.Namespace, world: int, rank: int, device: str) -> dict:
    from diffusers import ContextParallelConfig

    layers = args.layers or FULL_DEPTH[args.model]
    height, width = (8, 8) if args.tiny else (60, 104)
    case = Case(args.model, f"{args.frames / 21:g}x", args.frames, height, width, layers, FULL_DEPTH[args.model])
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = build_model(case, args.tiny, device, dtype)
    inputs = model_inputs(model, case, device, dtype)
    handle = None
    if args.method != "dense":
        handle = sc_diffusers.apply(model, method=args.method, device=device, num_steps=50)
    if world > 1:
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
    steps = STEPS[args.method]
    seconds, output = [], None
    for i, step in enumerate(steps):
        if handle is not None:
            handle.set_step(step)
        if i == 1 and device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        elapsed, output = timed_step(model, inputs, 1000.0 - 20 * step, device, world)
        seconds.append(elapsed)
        if rank == 0:
            print(f"{args.model} {args.method} world={world} step {step}: {elapsed:.3f} s", flush=True)
    peaks = gather_floats(torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0, world, device)
    stats = handle.stats() if handle is not None else []
    last = [s for s in stats if s["step"] == steps[-1]]
    p_t, p_h, p_w = model.config.patch_size
    row = {"model": args.model, "method": args.method, "world": world, "latent_frames": args.frames,
           "tokens": case.frames // p_t * (case.height // p_h) * (case.width // p_w), "layers_run": layers,
           "layers_full": FULL_DEPTH[args.model], "first_step_s": seconds[0], "steps_s": seconds[1:],
           "step_s": statistics.median(seconds[1:]) * FULL_DEPTH[args.model] / layers,
           "peak_gib_per_gpu": peaks, "density": statistics.mean(s["density"] for s in last) if last else None,
           "backends": sorted({s["backend"] for s in last}), "heads_rank0": last[0]["heads"] if last else None,
           "meta": versions(device) | {"gpus": world}}
    stem = args.out / f"out-{args.model}-{args.method}-{layers}layers"
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        torch.save(output.float().cpu(), f"{stem}-{world}.pt")
        reference = Path(f"{stem}-1.pt")
        if world > 1 and reference.exists():                # the one-GPU run, made first
            row["vs_one_gpu"] = compare(output.float().cpu(), torch.load(reference))
    return row


def timed_step(model: torch.nn.Module, inputs: dict, timestep: float, device: str, world: int) -> tuple:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    if world > 1:
        dist.barrier()
    start = time.perf_counter()
    with torch.no_grad():
        out = model(timestep=torch.tensor([timestep], device=device), **inputs)[0]
    sync()
    if world > 1:
        dist.barrier()
    return time.perf_counter() - start, out


def gather_floats(value: float, world: int, device: str) -> list[float]:
    if world == 1:
        return [value]
    local = torch.tensor([value], dtype=torch.float64, device=device)
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local)
    return [float(p) for p in parts]


def compare(got: torch.Tensor, reference: torch.Tensor) -> dict:
    diff = (got - reference).double()
    return {"max_abs": float(diff.abs().max()), "reference_max_abs": float(reference.abs().max()),
            "rel_l2": float(diff.norm() / reference.double().norm())}


def report(folder: Path) -> int:
    rows = [json.loads(line) for line in (folder / "multigpu-rows.jsonl").read_text().splitlines() if line.strip()]
    meta = rows[-1]["meta"]
    stem = folder / f"multigpu-{meta['date']}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    stem.with_suffix(".md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))
    return 0


def markdown(rows: list[dict], meta: dict) -> str:
    one = {(r["model"], r["method"], r["layers_run"]): r for r in rows if r["world"] == 1}
    lines = [f"# One GPU vs several (diffusers Ulysses), Wan transformer step, {meta['date']}", "",
             f"Machine: {meta['gpus']}x {meta['gpu']}; torch {meta['torch']}, diffusers {meta['diffusers']}, triton "
             f"{meta['triton']}, flashinfer {meta['flashinfer']}. bf16, batch 1, random weights, 512 text tokens, "
             "6x length (121 latent frames at 480x832). Step = one transformer forward, median of the timed steps; "
             "rows run on fewer layers are scaled to the full depth. Rate = one-GPU step / this step (same model "
             "and method). First step: the untimed first step (LVSA: first compile; AdaSpa: its search step, "
             "dense output + block-mass search), scaled alike (blank: not recorded by that run). Peak memory "
             "over the timed steps. Output vs one GPU: "
             "relative L2 error and max |difference| of the last step's output.", "",
             "| model | method | GPUs | step (s) | rate vs 1 GPU | first step (s) | peak GiB per GPU | density | "
             "output vs 1 GPU (rel. L2 / max abs) | layers run/full | kernels |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["model"], list(STEPS).index(r["method"]), -r["layers_run"], r["world"])):
        base = one.get((r["model"], r["method"], r["layers_run"]))
        rate = f"{base['step_s'] / r['step_s']:.2f}x" if base else ""
        vs = r.get("vs_one_gpu")
        vs_text = f"{vs['rel_l2']:.1e} / {vs['max_abs']:.1e}" if vs else ("reference" if r["world"] == 1 else "")
        density = "" if r["density"] is None else f"{r['density']:.3f}"
        peaks = ", ".join(f"{p:.1f}" for p in r["peak_gib_per_gpu"])
        first = f"{r['first_step_s'] * r['layers_full'] / r['layers_run']:.2f}" if "first_step_s" in r else ""
        lines.append(f"| {r['model']} | {r['method']} | {r['world']} | {r['step_s']:.3f} | {rate} | {first} | "
                     f"{peaks} | {density} | {vs_text} | {r['layers_run']}/{r['layers_full']} | "
                     f"{', '.join(r['backends']) or 'diffusers SDPA'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
