"""One GPU vs N GPUs (context parallelism: Ulysses, ring, ring x Ulysses) for a transformer step with sparsecore.

    python3 bench/multigpu_benchmark.py --model wan-1.3b --method lvsa --out DIR             # one GPU
    torchrun --nproc_per_node 2 bench/multigpu_benchmark.py --model wan-1.3b --method lvsa --out DIR
    torchrun --nproc_per_node 2 bench/multigpu_benchmark.py --model wan-1.3b --method lvsa --mode ring --out DIR
    torchrun --nproc_per_node 4 bench/multigpu_benchmark.py --model wan-1.3b --method lvsa --mode unified --out DIR
    python3 bench/multigpu_benchmark.py --report DIR                                          # the table

Each launch appends one row to ``DIR/multigpu-rows.jsonl``: per-step time (one transformer
forward, median of the timed steps after one warm-up step; with N ranks the steps start
together after a barrier and end when every rank has synchronized), peak memory of every
rank, and the output of the last step saved as ``DIR/out-<model>-<method>-<L>layers-<N>.pt``
(``-<mode>`` added for ring and unified). A run with N > 1 compares its output with the one-GPU
file of the same model and method (run first). ``--report`` writes ``multigpu-<date>.json`` and ``.md``.

Modes (``--mode``; N = the launch's world size): ``ulysses`` (``ulysses_degree=N``: heads split,
diffusers' own all-to-alls; N must divide the heads), ``ring`` (``ring_degree=N``: sparsecore's ring,
each rank's query shard against the key shards its mask rows list, P2P transfers skipped where no
row needs them), ``unified`` (``ring_degree=--ring-degree`` x ``ulysses_degree=N/--ring-degree``).
Ring and unified runs are set up with ``sparsecore.integrations.diffusers.parallel.enable_parallelism``
(HunyuanVideo 1.5's context-parallel plan; Wan's cross-attention runs locally). Their rows also
record ``ring_pairs``: the fraction of (query shard, key shard) pairs the last step's masks need
(1.0: every ring step runs and transfers; lower: steps skipped), averaged over layers, and
``ring_load``: the token pairs each rank's ring steps compute (a ring step ends with its slowest rank).

Models as in ``e2e_benchmark.py`` (random weights, bf16, batch 1, 512 text tokens) at 6x
length (121 latent frames, 480x832: 188,760 tokens): ``wan-1.3b`` (30 layers, 12 heads),
``wan-14b`` (40 heads; ``--layers`` of its 40 layers run, the time scaled to 40), ``hv15``
(HunyuanVideo 1.5, 16 heads, 54 layers; ``--frames 65`` at 480p: 103,350 video tokens, which
only 2 ranks divide; ``--layers`` as for the 14B). Methods: ``lvsa`` (steps 20-23: its anchors
rotate, so every step plans and compiles its mask, as in a real run; ``--sp-world R`` adds the
released code's boundary guards at the edges of R shards, also on the one-GPU reference run), ``pasa``
(steps 10-13, sparse: one GPU or Ulysses; its default approximation refuses a ring), ``adaspa``
(step 10 searches, its time is ``first_step_s``; steps 11-13 reuse the mask) or ``dense``
(diffusers' own attention and own context parallelism; ring and unified need an LSE-returning
backend there, ``_native_cudnn`` is set; Wan only).
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

from e2e_models import Case, build_model, model_inputs, timestep_inputs
from report import time_one_backend, versions, write_report
from sparsecore.integrations import diffusers as sc_diffusers
from sparsecore.timing import synchronize

STEPS = {"lvsa": (20, 21, 22, 23),       # the first is the warm-up
         "adaspa": (10, 11, 12, 13),     # 10: the first search (on its own LSE: no step 9 runs here), then reuse
         "pasa": (10, 11, 12, 13),       # sparse steps (layer 0 dense); under a ring only with approximation="drop"
         "dense": (0, 1, 2, 3)}
FULL_DEPTH = {"wan-1.3b": 30, "wan-14b": 40, "hv15": 54}
MODES = ("ulysses", "ring", "unified")


def main() -> int:
    time_one_backend()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--model", choices=sorted(FULL_DEPTH), default="wan-1.3b")
    parser.add_argument("--method", choices=sorted(STEPS), default="lvsa")
    parser.add_argument("--layers", type=int, default=None, help="layers to run (default: all)")
    parser.add_argument("--frames", type=int, default=121, help="latent frames (121: 6x Wan's 21)")
    parser.add_argument("--report", type=Path, default=None, help="write the table from DIR/multigpu-rows.jsonl")
    parser.add_argument("--tiny", action="store_true", help="tiny model and video: a smoke test on any device")
    parser.add_argument("--mode", choices=MODES, default="ulysses", help="context parallelism across the ranks")
    parser.add_argument("--ring-degree", type=int, default=2, help="ring degree of --mode unified")
    parser.add_argument("--sp-world", type=int, default=1, help="LVSA's sp_world: boundary guards at the edges of "
                        "this many sequence shards (the ring degree to reproduce the released code; 1: none)")
    parser.add_argument("--profile", type=Path, default=None,
                        help="after the timed steps, one more step of the last kind under torch.profiler: each rank "
                             "writes DIR/profile-<model>-<method>-<mode>-<N>-rank<r>.txt (kernel and host tables)")
    args = parser.parse_args()
    if args.report is not None:
        return report(args.report)
    if args.method == "dense" and args.model == "hv15" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        parser.error("--method dense --model hv15: diffusers' own HunyuanVideo 1.5 attention has no context-parallel "
                     "path (no plan, and a [B, 1, S, S] padding mask built per rank); run a sparsecore method")
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


def parallel_config(args: argparse.Namespace, world: int) -> "ContextParallelConfig":
    from diffusers import ContextParallelConfig
    if args.mode == "ulysses":
        return ContextParallelConfig(ulysses_degree=world)
    if args.mode == "ring":
        return ContextParallelConfig(ring_degree=world)
    return ContextParallelConfig(ring_degree=args.ring_degree, ulysses_degree=world // args.ring_degree)


def run(args: argparse.Namespace, world: int, rank: int, device: str) -> dict:
    from sparsecore.integrations.diffusers import parallel

    layers = args.layers or FULL_DEPTH[args.model]
    height, width = (8, 8) if args.tiny else ((30, 53) if args.model == "hv15" else (60, 104))
    case = Case(args.model, f"{args.frames / 21:g}x", args.frames, height, width, layers, FULL_DEPTH[args.model])
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = build_model(case, args.tiny, device, dtype)
    inputs = model_inputs(model, case, device, dtype)
    config = parallel_config(args, world) if world > 1 else None
    ring_degree = config.ring_degree if config is not None else 1
    handle = None
    if args.method != "dense":
        params = {"sp_world": args.sp_world} if args.method == "lvsa" and args.sp_world > 1 else {}
        handle = sc_diffusers.apply(model, method=args.method, device=device, num_steps=50, **params)
    if config is not None:
        if device == "cpu":           # --tiny smoke test under gloo: what diffusers lacks there (as in the CPU tests)
            import logging
            torch.accelerator.device_count = lambda: 1
            if not hasattr(logging.Logger, "warning_once"):
                logging.Logger.warning_once = logging.Logger.warning
        if args.method == "dense" and args.mode != "ulysses":
            model.set_attention_backend("_native_cudnn")     # diffusers' ring merges the backend's LSEs
            model.enable_parallelism(config=config)
        elif args.mode == "ulysses" and args.model != "hv15":
            model.enable_parallelism(config=config)
        else:
            parallel.enable_parallelism(model, config)
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
            print(f"{args.model} {args.method} {args.mode} world={world} step {step}: {elapsed:.3f} s", flush=True)
    if args.profile is not None:
        profile_step(model, inputs, handle, steps[-1], device, world, args.profile / (
            f"profile-{args.model}-{args.method}-{args.mode if world > 1 else 'one'}-{world}-rank{rank}.txt"))
    peaks = gather_floats(torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0, world, device)
    stats = handle.stats() if handle is not None else []
    last = [s for s in stats if s["step"] == steps[-1]]
    p_t, p_h, p_w = model.config.patch_size if args.model != "hv15" else (1, 1, 1)
    label = args.method + (f"+guards{args.sp_world}" if args.method == "lvsa" and args.sp_world > 1 else "")
    row = {"model": args.model, "method": label, "world": world,
           "mode": args.mode if world > 1 else "one", "ring_degree": ring_degree,
           "ulysses_degree": world // ring_degree, "latent_frames": args.frames,
           "tokens": case.frames // p_t * (case.height // p_h) * (case.width // p_w), "layers_run": layers,
           "layers_full": FULL_DEPTH[args.model], "first_step_s": seconds[0], "steps_s": seconds[1:],
           "step_s": statistics.median(seconds[1:]) * FULL_DEPTH[args.model] / layers,
           "peak_gib_per_gpu": peaks, "density": statistics.mean(s["density"] for s in last) if last else None,
           "backends": sorted({s["backend"] for s in last}), "heads_rank0": last[0]["heads"] if last else None,
           "ring_pairs": ring_pairs(handle), "ring_load": gather_floats(ring_load(handle), world, device),
           "meta": versions(device) | {"gpus": world, "date": datetime.date.today().isoformat()}}
    suffix = "" if args.mode == "ulysses" or world == 1 else f"-{args.mode}"
    stem = args.out / f"out-{args.model}-{row['method']}-{layers}layers"
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        torch.save(output.float().cpu(), f"{stem}-{world}{suffix}.pt")
        reference = Path(f"{stem}-1.pt")
        if world > 1 and reference.exists():                # the one-GPU run, made first
            row["vs_one_gpu"] = compare(output.float().cpu(), torch.load(reference))
    return row


def profile_step(model: torch.nn.Module, inputs: dict, handle, step: int, device: str, world: int,
                 path: Path) -> None:
    """One more step like ``step`` under torch.profiler: its wall time, the device's busy time (kernels and copies
    summed), and the ops by device time and by host time, written to ``path``."""
    from torch.profiler import ProfilerActivity, profile
    if handle is not None:
        handle.set_step(step)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        elapsed, _ = timed_step(model, inputs, 1000.0 - 20 * step, device, world)
    averages = prof.key_averages()
    busy = sum(e.self_device_time_total for e in averages) / 1e6
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"step {step}: wall {elapsed:.3f} s under the profiler; device busy {busy:.3f} s (kernels and "
                    f"copies summed, overlaps counted twice)\n\n"
                    + averages.table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=70)
                    + "\n\n" + averages.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70))


def ring_works(handle) -> list:
    """The ring cuts the current plans run: a plan's kernel, or the cuts kept with a mask its session holds in host
    memory (AdaSpa's default store="host": ``("ring cut", ...)`` entries of the mask's derived, with its kept pairs)."""
    from sparsecore.integrations.diffusers.ring import RingWork
    works = []
    for plan in [] if handle is None else handle._planner._plans.values():
        if isinstance(plan.kernel, RingWork):
            works.append(plan.kernel)
        elif plan.held and plan.mask is not None:
            works += [cut[0] for key, cut in plan.mask.derived.items()
                      if isinstance(key, tuple) and key[0] == "ring cut"]
    return works


def ring_pairs(handle) -> float | None:
    """Mean fraction of (query shard, key shard) pairs that the current plans' ring steps run (None: no ring)."""
    needs = [work.need for work in ring_works(handle)]
    if not needs or len(needs[0]) == 1:
        return None
    return statistics.mean(sum(map(sum, need)) / len(need) ** 2 for need in needs)


def ring_load(handle) -> float:
    """Token pairs this rank's ring steps compute under the current plans (its load; 0.0 without a ring)."""
    works = ring_works(handle)
    return float(sum(int(kernel.mask.kept_pairs().sum()) for work in works
                     for kernel in [*work.steps, work.text] if kernel is not None))


def timed_step(model: torch.nn.Module, inputs: dict, timestep: float, device: str, world: int) -> tuple:
    synchronize(device)
    if world > 1:
        dist.barrier()
    start = time.perf_counter()
    with torch.no_grad():
        out = model(**timestep_inputs(model, timestep, device, inputs), **inputs)[0]
    synchronize(device)
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
    meta = rows[-1]["meta"] | {"gpus": max(r["world"] for r in rows)}    # the last row may be the one-GPU run
    write_report(folder / f"multigpu-{meta['date']}", meta, rows, markdown(rows, meta))
    print(markdown(rows, meta))
    return 0


def markdown(rows: list[dict], meta: dict) -> str:
    one = {(r["model"], r["method"], r["layers_run"]): r for r in rows if r["world"] == 1}
    lines = [f"# One GPU vs several (context parallelism), transformer step, {meta['date']}", "",
             f"Machine: {meta['gpus']}x {meta['gpu']}; torch {meta['torch']}, diffusers {meta['diffusers']}, triton "
             f"{meta['triton']}, flashinfer {meta['flashinfer']}. bf16, batch 1, random weights, 512 text tokens, "
             "6x length (121 latent frames at 480x832). Step = one transformer forward, median of the timed steps; "
             "rows run on fewer layers are scaled to the full depth. Rate = one-GPU step / this step (same model "
             "and method). First step: the untimed first step (LVSA: first compile; AdaSpa: its search step, "
             "dense output + block-mass search), scaled alike (blank: not recorded by that run). Peak memory "
             "over the timed steps. Output vs one GPU: "
             "relative L2 error and max |difference| of the last step's output. Mode: ulysses (heads split), ring "
             "(sequence split, sparsecore's ring), unified (ring x Ulysses degrees). Ring pairs: fraction of "
             "(query shard, key shard) pairs the masks need (the rest: ring steps skipped, no transfer). Ring load: "
             "the busiest rank's token pairs over the mean rank's (1.00: balanced).", "",
             "| model | method | GPUs | mode | step (s) | rate vs 1 GPU | first step (s) | peak GiB per GPU | "
             "density | ring pairs | ring load | output vs 1 GPU (rel. L2 / max abs) | layers run/full | kernels |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = lambda r: (r["model"], list(STEPS).index(r["method"].split("+")[0]), -r["layers_run"], r["world"],  # noqa
                       r.get("mode", "ulysses"))
    for r in sorted(rows, key=order):
        base = one.get((r["model"], r["method"], r["layers_run"]))
        rate = f"{base['step_s'] / r['step_s']:.2f}x" if base else ""
        vs = r.get("vs_one_gpu")
        vs_text = f"{vs['rel_l2']:.1e} / {vs['max_abs']:.1e}" if vs else ("reference" if r["world"] == 1 else "")
        density = "" if r["density"] is None else f"{r['density']:.3f}"
        peaks = ", ".join(f"{p:.1f}" for p in r["peak_gib_per_gpu"])
        first = f"{r['first_step_s'] * r['layers_full'] / r['layers_run']:.2f}" if "first_step_s" in r else ""
        mode = r.get("mode", "ulysses" if r["world"] > 1 else "one")
        if mode == "unified":
            mode = f"ring {r['ring_degree']} x ulysses {r['ulysses_degree']}"
        pairs = "" if r.get("ring_pairs") is None else f"{r['ring_pairs']:.2f}"
        loads = r.get("ring_load") or [0.0]
        load = f"{max(loads) / (sum(loads) / len(loads)):.2f}" if sum(loads) else ""
        lines.append(f"| {r['model']} | {r['method']} | {r['world']} | {mode} | {r['step_s']:.3f} | {rate} | {first} | "
                     f"{peaks} | {density} | {pairs} | {load} | {vs_text} | {r['layers_run']}/{r['layers_full']} | "
                     f"{', '.join(r['backends']) or 'diffusers SDPA'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
