"""Probe (GPU): what a mask held in host memory costs the ``fa4`` lowering per call, beyond its kernel.

AdaSpa keeps its searched masks in pinned host memory between steps (``store="host"``, so the peak stays
dense's); each reuse call copies a layer's lists to the GPU, compiles the copy and calls it, so the
IR -> FA4 conversion (``fa4_layout.to_fa4``) and, with ``key_parts``, the split run at every call. On the
AdaSpa-shaped mask at 6x (188,736 tokens, 64-token blocks, density 0.2, bf16, 12 heads, D = 128) this
times, per variant of the conversion (the general tile-map path, or the lists taken as they are where every
block is one tile) and of ``key_parts`` (1, auto):

- ``kernel``: a prepared kernel called again (``kernel_timing.median_ms``);
- ``per call``: copy + compile + call of the host-held mask, back to back, wall time per call after a
  warm-up, and the difference, the overhead a reuse step pays per layer.

    python bench/fa4_call_overhead.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from kernel_timing import median_ms  # noqa: E402

import sparsecore  # noqa: E402
from sparsecore.backends.cuda import fa4_layout  # noqa: E402
from fa4_check_masks import adaspa_large  # noqa: E402
from report import run_meta, time_one_backend  # noqa: E402

HEADS, DIM, SEQ, CALLS = 12, 128, 188736, 10


def per_call_ms(held: sparsecore.BlockMask, q, k, v, options: dict) -> float:
    def call():
        sparsecore.compile(held.copy_to("cuda"), device="cuda", backend="fa4", cache=False, **options)(q, k, v)

    call()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(CALLS):
        call()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / CALLS * 1e3


def main() -> int:
    time_one_backend()
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    mask = adaspa_large(HEADS, SEQ, 64, (0.1, 0.2, 0.3), seed=0).to("cuda")
    held = mask.copy_to("cpu")                                              # pinned host lists, as AdaSpa holds them
    q, k, v = (torch.randn(1, HEADS, SEQ, DIM, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    on_grid = fa4_layout._on_tile_grid
    rows, lines = [], ["| conversion | key_parts | kernel ms | per call ms | overhead ms |", "|---|---|---|---|---|"]
    try:
        for conversion in ("lists", "general"):
            fa4_layout._on_tile_grid = on_grid if conversion == "lists" else (lambda offsets, side: False)
            for parts in (1, None):
                options = {"key_parts": parts}
                kernel = sparsecore.compile(mask, device="cuda", backend="fa4", cache=False, **options)
                kernel_ms = median_ms(lambda: kernel(q, k, v))
                call_ms = per_call_ms(held, q, k, v, options)
                rows.append({"conversion": conversion, "key_parts": parts, "kernel_ms": kernel_ms,
                             "per_call_ms": call_ms})
                lines.append(f"| {conversion} | {parts} | {kernel_ms:.2f} | {call_ms:.2f} "
                             f"| {call_ms - kernel_ms:.2f} |")
                print(lines[-1], flush=True)
                del kernel
    finally:
        fa4_layout._on_tile_grid = on_grid
    meta = run_meta()
    (args.out / "fa4-call-overhead.md").write_text(f"{meta}\n\n" + "\n".join(lines) + "\n")
    (args.out / "fa4-call-overhead.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
