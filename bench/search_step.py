"""AdaSpa's search step on a GPU: the fused one-pass search against the dense pass plus the block-mass pass.

    python bench/search_step.py [--lengths 1x 6x] [--out DIR]

One Wan 2.1 1.3B self-attention layer (12 heads x 128, bf16, 480x832 video, 64-token blocks),
all rows in one run, median of 3 after a warm-up:

- ``dense``: ``sparsecore.search.dense_attention`` with its LSE (cuDNN's; FA4's dense forward on an H200 with
  flash-attn-4 installed since 2026-12-01's sixth session; what a dense step's layer costs);
- ``two passes``: that, then the Triton block-mass pass on its LSE (the first search step before);
- ``fused (...)``: :func:`sparsecore.backends.cuda.search_attention.run`, output + LSE + masses
  from one pass, for several tile configs and scratch limits of its partial sums (the default first);
- ``cached search pass``: the block-mass pass alone on a cached LSE (a later search step's extra
  work; 64-token blocks take its segmented kernel, one segment), for several launch configs (the default first).

Each row also reports the memory its call allocates beyond its inputs at its peak. Also checked, per length: the fused pass's masses against the two-pass masses and its output against
cuDNN's (relative L2), and whether AdaSpa selects the same blocks from either. Writes
``search-step-<date>.json`` and ``.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

from report import time_one_backend, versions, write_report

import sparsecore
from sparsecore import BlockMask, VideoGeometry
from sparsecore.backends.cuda import block_mass as mass_pass
from sparsecore.backends.cuda import search_attention
from sparsecore.backends.cuda.search_attention import SearchConfig
from sparsecore.methods import adaspa
from sparsecore.search import dense_attention, dense_impl
from sparsecore.timing import median_seconds

LENGTHS = {"1x": VideoGeometry(21, 30, 52), "2x": VideoGeometry(41, 30, 52), "6x": VideoGeometry(121, 30, 52)}
HEADS, HEAD_DIM = 12, 128
FUSED = [(None, search_attention.SCRATCH_BYTES), (None, 8 << 30), (None, 4 << 30), (None, 2 << 30),
         (SearchConfig(128, 2, 8, 3, True), search_attention.SCRATCH_BYTES)]     # 4 stages: over shared memory
CACHED = [None, mass_pass.SegmentedConfig(64, 4, 3, True), mass_pass.SegmentedConfig(64, 4, 3, False),
          mass_pass.SegmentedConfig(128, 8, 2, False)]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def run(label: str) -> list[dict]:
    geometry = LENGTHS[label]
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, geometry.tokens, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
               for _ in range(3))
    offsets = geometry.block_offsets(64)
    scale = HEAD_DIM ** -0.5
    rows = []

    def add(kind: str, fn, **extra) -> None:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        seconds = median_seconds(fn, "cuda", warmup=1, repeats=3)
        extra_gib = (torch.cuda.max_memory_allocated() - before) / 2**30
        rows.append({"length": label, "tokens": geometry.tokens, "kind": kind, "ms": seconds * 1e3,
                     "extra_gib": extra_gib, **extra})
        print(f"{label} {kind:60s} {seconds * 1e3:9.2f} ms", flush=True)

    dense_out, lse = dense_attention(q, k, v)
    two_pass = mass_pass.run(q, k, offsets, offsets, lse, scale)
    add(f"dense ({dense_impl(q, k, v)}, with LSE)", lambda: dense_attention(q, k, v))
    full = sparsecore.compile(BlockMask.full(HEADS, geometry.tokens, geometry.tokens, 128), device="cuda",
                              backend="triton")
    add("dense (sparsecore's Triton kernel, full mask, with LSE)", lambda: full(q, k, v, return_lse=True))
    add(f"two passes ({dense_impl(q, k, v)} dense + block-mass pass)",
        lambda: mass_pass.run(q, k, offsets, offsets, dense_attention(q, k, v)[1], scale))
    for config, scratch in FUSED:
        name = "default" if config is None else (f"block_m {config.block_m}, {config.pieces * 64} keys, "
                                                 f"{config.num_warps} warps, {config.num_stages} stages, "
                                                 f"{'TMA' if config.use_tma else 'pointers'}")
        name += f", scratch {scratch / 2**30:g} GiB"
        out, fused_lse, mass = search_attention.run(q, k, v, offsets, offsets, scale, config=config,
                                                    scratch_bytes=scratch)
        checks = {"mass_vs_two_pass": relative(mass, two_pass), "out_vs_cudnn": relative(out, dense_out),
                  "lse_max_abs_diff": float((fused_lse - lse).abs().max())}
        if config is None and scratch == search_attention.SCRATCH_BYTES:
            checks["same_adaspa_mask"] = same_mask(geometry, mass, two_pass, fused_lse)
        del out, fused_lse, mass
        add(f"fused ({name})", lambda c=config, b=scratch: search_attention.run(q, k, v, offsets, offsets, scale,
                                                                                config=c, scratch_bytes=b), **checks)
    for config in CACHED:
        name = "default" if config is None else (f"{config.block_n} keys, {config.num_warps} warps, "
                                                 f"{config.num_stages} stages, {'TMA' if config.use_tma else 'pointers'}")
        add(f"cached search pass ({name})",
            lambda c=config: mass_pass.run(q, k, offsets, offsets, lse, scale, config=c))
    dense_ms = rows[0]["ms"]
    for row in rows:
        row["vs_dense"] = row["ms"] / dense_ms
    return rows


def same_mask(geometry: VideoGeometry, fused: torch.Tensor, two_pass: torch.Tensor, lse: torch.Tensor) -> float:
    """Fraction of (head, query block) rows whose AdaSpa selection is the same from either set of masses."""
    masks = [adaspa.session(num_steps=50, first_search="fused").plan(geometry, HEADS, step=10, layer=0, lse=lse,
                                                                     mass=m.sum(0))
             for m in (fused, two_pass)]
    a, b = (m.to_dense() for m in masks)
    return float((a == b).all(-1).double().mean())


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# AdaSpa's search step, one layer, {meta['date']}", "",
             f"{meta['device']}; torch {meta['torch']}, triton {meta['triton']}. Wan 2.1 1.3B layer: {HEADS} heads x "
             f"{HEAD_DIM}, bf16, 480x832, 64-token blocks; median of 3 after a warm-up, all rows in one run. "
             "`bench/search_step.py`.", "",
             "| length | tokens | kind | ms | x dense | GiB allocated | masses vs two passes | out vs dense | "
             "same AdaSpa rows |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{r[key]:.1e}" if key in r else "" for key in ("mass_vs_two_pass", "out_vs_cudnn")]
        same = f"{r['same_adaspa_mask']:.4f}" if "same_adaspa_mask" in r else ""
        lines.append(f"| {r['length']} | {r['tokens']:,} | {r['kind']} | {r['ms']:.1f} | {r['vs_dense']:.2f} | "
                     f"{r['extra_gib']:.2f} | {cells[0]} | {cells[1]} | {same} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    time_one_backend()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", nargs="*", default=["1x", "6x"], choices=sorted(LENGTHS))
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("search_step: needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    meta = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(), **versions()}
    rows = [row for label in args.lengths for row in run(label)]
    write_report(args.out / f"search-step-{meta['date']}", meta, rows, markdown(rows, meta))
    print(markdown(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
