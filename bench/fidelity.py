"""Fidelity of LVSA, AdaSpa and PASA at their paper defaults on the synthetic video workload (CPU).

    python bench/fidelity.py              # writes docs/fidelity.md and docs/fidelity.json

Two parts:

1. Planning at model shapes (Wan 2.1 1x / 6x, HunyuanVideo 1.5 with text): each
   planner emits an IR; we report its size and the planning time on this CPU. LVSA
   needs no inputs. AdaSpa plans from block masses and PASA from pooled q, k; at these
   lengths they get synthetic inputs (random masses, random q/k with head_dim 8),
   since the search itself is a GPU kernel (dense attention cost).
2. Fidelity at two small geometries on :func:`sparsecore.workloads.video_qkv`
   (synthetic, 12 heads, head_dim 64): recall (softmax mass kept), relative L2 and
   cosine of the output against dense attention, per method at its defaults, plus the
   variants that show each method's knobs (AdaSpa without head-adaptive budgets; AdaSpa's
   session at step 30 on drifted inputs: the reused mask, the LSE-cached search, a fresh
   search; PASA selection noise 0 / 0.2 / 0.5 / 1 with the fraction of selected blocks
   that changes from one step to the next at fixed inputs). These rows measure the selection
   (:mod:`sparsecore.quality`: exact attention over the kept blocks, unselected blocks dropped).
3. The approximation of the unselected blocks (PASA's default, issue 16): drop vs zeroth vs
   global vs grouped first order through the compiled kernel (:mod:`fidelity_unselected`).

Minutes on a 2-core CPU. Numbers are for this synthetic workload only: they compare
the methods' patterns on a controlled input, not their quality on a real model.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sparsecore.geometry import VideoGeometry
from sparsecore.ir import BlockMask
from sparsecore.methods import adaspa, lvsa, pasa
from sparsecore.quality import fidelity_of_masks
from sparsecore.workloads import video_qkv

sys.path.insert(0, str(Path(__file__).parent))
from fidelity_unselected import approximation_rows  # noqa: E402
from fidelity_unselected import markdown as approximation_markdown  # noqa: E402
from report import run_meta  # noqa: E402

MODEL_SHAPES = [
    ("Wan 2.1 1x (21x30x52)", VideoGeometry(21, 30, 52), 12, 21),
    ("Wan 2.1 6x (121x30x52)", VideoGeometry(121, 30, 52), 12, 21),
    ("HunyuanVideo 1.5 1x (33x30x52 + 256 text)", VideoGeometry(33, 30, 52, text_tokens=256), 16, 33),
]
FIDELITY_SHAPES = [
    ("33x8x12 (1.6x Wan horizon)", VideoGeometry(33, 8, 12)),
    ("61x10x16 (2.9x Wan horizon)", VideoGeometry(61, 10, 16)),
]
HEADS, HEAD_DIM, SEED = 12, 64, 0


def timed(fn, repeats: int = 1):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result, statistics.median(times)


def planning_rows() -> list[dict]:
    rows = []
    for name, g, heads, reference in MODEL_SHAPES:
        gen = torch.Generator().manual_seed(SEED)
        offsets = g.block_offsets(64)
        blocks = len(offsets) - 1
        lvsa.plan(g, heads, step=0, reference_frames=reference)                  # warm-up
        cases = [("lvsa", lambda: lvsa.plan(g, heads, step=3, reference_frames=reference), 21)]
        mass = torch.rand(heads, blocks, blocks, generator=gen)
        cases.append(("adaspa", lambda: adaspa.plan(g, heads, step=10, mass=mass), 1))
        q = torch.randn(1, heads, g.tokens, 8, generator=gen)
        k = torch.randn(1, heads, g.tokens, 8, generator=gen)
        cases.append(("pasa", lambda: pasa.plan(g, heads, step=10, q=q, k=k), 1))
        for method, fn, repeats in cases:
            mask, seconds = timed(fn, repeats)
            rows.append({"shape": name, "method": method, "heads": heads, "tokens": g.tokens,
                         "blocks": f"{mask.num_q_blocks}x{mask.num_kv_blocks}", "nnz": mask.nnz,
                         "density": mask.density(), "plan_ms": seconds * 1e3, "repeats": repeats})
            print(f"  plan {method:7s} {name:44s} {rows[-1]['blocks']:>10s} density {mask.density():.3f} "
                  f"{seconds * 1e3:9.1f} ms", file=sys.stderr, flush=True)
    return rows


def lvsa_timing() -> dict:
    g = VideoGeometry(121, 30, 52)
    lvsa.plan(g, 12, step=0)
    times = []
    for step in range(50):
        times.append(timed(lambda: lvsa.plan(g, 12, step=step))[1])
    return {"median_ms": statistics.median(times) * 1e3, "max_ms": max(times) * 1e3, "runs": len(times)}


def fidelity_rows() -> list[dict]:
    rows = []
    for name, g in FIDELITY_SHAPES:
        print(f"fidelity on {name}: {g.tokens} tokens", file=sys.stderr, flush=True)
        q, k, v = video_qkv(g, HEADS, HEAD_DIM, seed=SEED)
        variants: list[tuple[str, str, BlockMask]] = [
            ("dense", "-", BlockMask.full(HEADS, g.tokens, g.tokens, 64)),
            ("lvsa", "defaults: W=3, 1 first frame, C=21, auto anchors, step 0", lvsa.plan(g, HEADS, step=0)),
            ("lvsa", "step 1 (anchors rotated)", lvsa.plan(g, HEADS, step=1)),
            ("adaspa", "defaults: s=0.8, block 64, head-adaptive (search, fresh LSE)",
             adaspa.plan(g, HEADS, step=10, q=q, k=k)),
            ("adaspa", "without head-adaptive budgets", adaspa.plan(g, HEADS, step=10, q=q, k=k, head_adaptive=False)),
        ]
        churn = {}
        for noise in (0.0, 0.2, 0.5, 1.0):
            a = pasa.plan(g, HEADS, step=10, q=q, k=k, noise_scale=noise, approximation="drop")
            b = pasa.plan(g, HEADS, step=11, q=q, k=k, noise_scale=noise, approximation="drop")
            da, db = a.to_dense(), b.to_dense()
            churn[noise] = float((da & ~db).sum() / da.sum())
            label = "defaults: rho=0.15, block 64, Gumbel 0.2, step 10" if noise == 0.2 else f"selection noise {noise}"
            variants.append(("pasa", label, a))
        start = time.perf_counter()
        results = fidelity_of_masks(q, k, v, [m for _, _, m in variants])
        print(f"  fidelity of {len(variants)} masks: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        results += adaspa_across_steps(g, q, k, v, variants)
        for (method, variant, mask), fid in zip(variants, results):
            row = {"shape": name, "tokens": g.tokens, "method": method, "variant": variant,
                   "density": mask.density(), **fid.summary(), "head_recall": fid.recall.tolist(),
                   "head_rel_l2": fid.rel_l2.tolist()}
            row["worst_head_recall"] = float(fid.recall.min())
            if method == "pasa":
                row["churn"] = churn[mask.meta["params"]["noise_scale"]]
            rows.append(row)
    return rows


def adaspa_across_steps(g: VideoGeometry, q, k, v, variants: list) -> list:
    """AdaSpa's session at step 30 on drifted inputs: reuse, LSE-cached search, fresh search (rows appended)."""
    session = adaspa.session(num_steps=50, first_search="fused")
    session.plan(g, HEADS, step=10, layer=0, q=q, k=k)                         # first search, fresh LSE
    reused = session.plan(g, HEADS, step=29, layer=0)
    other = video_qkv(g, HEADS, HEAD_DIM, seed=SEED + 1)
    angle = 0.3                                                                # inputs drift between steps
    q30, k30, v30 = (np.cos(angle) * a + np.sin(angle) * b for a, b in zip((q, k, v), other))
    cached = session.plan(g, HEADS, step=30, layer=0, q=q30, k=k30)
    fresh = adaspa.plan(g, HEADS, step=30, q=q30, k=k30)
    rows = [("adaspa", "step 30, drifted inputs: mask of step 10 reused", reused),
            ("adaspa", "step 30, drifted inputs: LSE-cached search (session)", cached),
            ("adaspa", "step 30, drifted inputs: fresh search", fresh)]
    variants += rows
    return fidelity_of_masks(q30, k30, v30, [m for _, _, m in rows])


def markdown(report: dict) -> str:
    lines = ["# Fidelity and planning of the seed methods (CPU, synthetic workload)", "",
             f"Generated by `python bench/fidelity.py` on {report['machine']} "
             f"({report['date']}, torch {report['torch']}, {report['seconds']:.0f} s). "
             "Inputs are `sparsecore.workloads.video_qkv`: **synthetic** video-DiT-like q, k, v "
             f"({HEADS} heads, head_dim {HEAD_DIM}, seed {SEED}; 3D RoPE, smooth content, sink tokens, "
             "heads of kinds local / spatial / temporal / global / sink). The numbers compare the methods' "
             "patterns on a controlled input; they are not model quality.", "",
             "Recall: softmax mass kept (mean over heads; worst head and worst query also shown). "
             "Rel L2 / cosine: the masked output against dense attention, mean over heads. "
             "These rows measure the selection: exact attention over the kept blocks, the others dropped "
             "(PASA's rows are planned with `approximation=\"drop\"`; its default first-order approximation of the "
             "dropped blocks is measured in \"Approximating the unselected blocks\" below). Churn: fraction of PASA's "
             "selected blocks that change "
             "between two adjacent steps at the same inputs (only the selection noise differs). "
             "Drifted inputs: q, k, v of step 30 are cos(0.3) x (step-10 inputs) + sin(0.3) x (another seed's), "
             "to exercise AdaSpa's reuse and LSE-cached search.", ""]
    for shape in dict.fromkeys(r["shape"] for r in report["fidelity"]):
        order = ["dense", "lvsa", "adaspa", "pasa"]
        rows = sorted((r for r in report["fidelity"] if r["shape"] == shape), key=lambda r: order.index(r["method"]))
        lines += [f"## {shape}: {rows[0]['tokens']} tokens", "",
                  "| method | variant | density | recall | worst head | worst query | rel L2 | cosine | churn |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            churn = f"{r['churn']:.3f}" if "churn" in r else ""
            lines.append(f"| {r['method']} | {r['variant']} | {r['density']:.3f} | {r['recall']:.4f} | "
                         f"{r['worst_head_recall']:.4f} | {r['min_recall']:.4f} | {r['rel_l2']:.4f} | "
                         f"{r['cosine']:.4f} | {churn} |")
        lines.append("")
    lines += approximation_markdown(report["approximation"])
    t = report["lvsa_121_frames"]
    source = report.get("planning_from")
    lines += ["## Planning at model shapes", ""]
    if source:
        lines += [f"Planning timings from an earlier run on an idle CPU ({source['machine']}, {source['date']}, torch "
                  f"{source['torch']}; `--keep-planning`).", ""]
    lines += [f"LVSA at Wan 2.1 6x (121 latent frames, 12 heads, frame blocks): median "
              f"**{t['median_ms']:.2f} ms** per plan over {t['runs']} steps (max {t['max_ms']:.2f} ms).", "",
              "AdaSpa plans here from random block masses and PASA from random q, k with head_dim 8: "
              "the times are the planners' own work (top-k, CSR building, IR validation) on this CPU; "
              "the block-mass search is a GPU kernel at these lengths.", "",
              "| shape | method | heads | tokens | blocks | nnz | density | plan ms |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["planning"]:
        lines.append(f"| {r['shape']} | {r['method']} | {r['heads']} | {r['tokens']} | {r['blocks']} | {r['nnz']} | "
                     f"{r['density']:.3f} | {r['plan_ms']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent.parent / "docs")
    parser.add_argument("--keep-planning", action="store_true",
                        help="reuse the planning timings of the fidelity.json in --out (timings need an idle CPU; "
                             "the fidelity numbers do not)")
    args = parser.parse_args(argv)
    torch.manual_seed(SEED)
    start = time.perf_counter()
    if args.keep_planning:
        kept = json.loads((args.out / "fidelity.json").read_text())
        report = {name: kept[name] for name in ("lvsa_121_frames", "planning")}
        report["planning_from"] = kept.get("planning_from") or {key: kept[key] for key in ("machine", "date", "torch")}
    else:
        print("planning LVSA at 121 frames", file=sys.stderr, flush=True)
        report = {"lvsa_121_frames": lvsa_timing()}
        report["planning"] = planning_rows()
    report["fidelity"] = fidelity_rows()
    report["approximation"] = approximation_rows(FIDELITY_SHAPES, HEADS, HEAD_DIM, SEED)
    report.update(run_meta("cpu", machine=f"{platform.processor() or platform.machine()}, "
                                          f"{torch.get_num_threads()} threads", torch=torch.__version__,
                           seconds=time.perf_counter() - start))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fidelity.json").write_text(json.dumps(report, indent=1))
    (args.out / "fidelity.md").write_text(markdown(report))
    print(f"wrote {args.out / 'fidelity.md'} and fidelity.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
