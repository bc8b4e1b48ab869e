"""AdaSpa's block-mass pass on a GPU: the segmented 64-token kernel against the table-driven kernel.

    python bench/mass_segments.py [--previous MODULE] [--out DIR]

One self-attention layer, bf16, 64-token blocks, the LSE over the keys each row may see, median of 3 after a
warm-up, all rows in one run:

- ``wan-6x``: Wan 2.1 1.3B (12 heads x 128) at 6x (121 x 30 x 52 latent tokens, 188,760), every block visible: one
  segment;
- ``skyreels-5x``: SkyReels-V2 DF 1.3B (12 x 128) at 5x (125 x 34 x 60, 255,000 tokens) with causal blocks of 5
  frames (10,200 tokens: 159 blocks of 64 and one of 24), each query block seeing its own and earlier causal blocks:
  a segment a causal block (before: the table kernel);
- ``hv15-2x``: HunyuanVideo 1.5 (16 x 128) at 2x (65 x 30 x 53 video tokens, a 54-token last video block, then 512
  text tokens): two segments (before: the table kernel);
- ``cogvideox-2x``: CogVideoX 1.5 (48 x 64) at 2x (226 text tokens first: a 34-token block; then 21 x 48 x 85 video
  tokens, a 32-token last block): two segments (before: the table kernel).

Rows: ``sparsecore.backends.cuda.block_mass.run`` as ``compile`` runs it (its kernel named), the table kernel
forced, and with ``--previous`` another module's ``run`` (an earlier version of the file, copied next to it on the
machine) on the same inputs. Masses are compared with the first row's (relative L2). Writes
``mass-segments-<date>.json`` and ``.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import sys
from pathlib import Path
from unittest import mock

import torch

from report import time_one_backend, versions, write_report

from sparsecore import VideoGeometry
from sparsecore.backends.cuda import block_mass as mass_pass
from sparsecore.methods import causal
from sparsecore.timing import median_seconds

CASES = {"wan-6x": (VideoGeometry(121, 30, 52), 12, 128),              # geometry, heads, head dim
         "skyreels-5x": (VideoGeometry(125, 34, 60, causal_frames=5), 12, 128),
         "hv15-2x": (VideoGeometry(65, 30, 53, text_tokens=512), 16, 128),
         "cogvideox-2x": (VideoGeometry(21, 48, 85, text_tokens=226, text_position="start"), 48, 64)}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def run(label: str, previous) -> list[dict]:
    geometry, heads, head_dim = CASES[label]
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k = (torch.randn(1, heads, geometry.tokens, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
            for _ in range(2))
    offsets = geometry.block_offsets(64)
    visible = causal.visible_counts(geometry, offsets) if geometry.causal_frames else None
    scale = head_dim ** -0.5
    lse = causal.visible_lse(q, k, geometry, scale)
    kernel = "segmented" if mass_pass.segments(offsets, offsets, visible) is not None else "table"
    calls = {f"default ({kernel})": lambda: mass_pass.run(q, k, offsets, offsets, lse, scale, visible=visible)}
    if kernel != "table":
        def table():
            with mock.patch.object(mass_pass, "segments", lambda *args: None):
                return mass_pass.run(q, k, offsets, offsets, lse, scale, visible=visible)
        calls["table kernel (forced)"] = table
    if previous is not None:
        calls[f"previous ({previous.__name__})"] = lambda: previous.run(q, k, offsets, offsets, lse, scale,
                                                                         visible=visible)
    rows, first = [], None
    for kind, call in calls.items():
        mass = call()
        first = mass if first is None else first
        seconds = median_seconds(call, "cuda", warmup=1, repeats=3)
        rows.append({"case": label, "tokens": geometry.tokens, "causal_frames": geometry.causal_frames,
                     "heads": heads, "head_dim": head_dim, "kind": kind, "ms": seconds * 1e3, "vs_first": relative(mass, first)})
        print(f"{label} {kind:50s} {seconds * 1e3:9.2f} ms  rel {rows[-1]['vs_first']:.1e}", flush=True)
        del mass
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# AdaSpa's block-mass pass, one layer, {meta['date']}", "",
             f"{meta['device']}; torch {meta['torch']}, triton {meta['triton']}. bf16, 64-token blocks, the LSE over "
             "each row's visible keys; median of 3 after a warm-up, all rows in one run. `bench/mass_segments.py`.",
             "", "| case | tokens | heads x dim | causal frames | kind | ms | masses vs the first row |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['tokens']:,} | {r['heads']} x {r['head_dim']} | {r['causal_frames']} | "
                     f"{r['kind']} | {r['ms']:.1f} | {r['vs_first']:.1e} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    time_one_backend()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="*", default=sorted(CASES), choices=sorted(CASES))
    parser.add_argument("--previous", help="a module with an earlier block-mass run() to time side by side")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("mass_segments: needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    previous = importlib.import_module(args.previous) if args.previous else None
    meta = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(), **versions()}
    rows = [row for label in args.cases for row in run(label, previous)]
    write_report(args.out / f"mass-segments-{meta['date']}", meta, rows, markdown(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
