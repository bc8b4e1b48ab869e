"""Probe (GPU): are 64-token-block masks at 6x bound by L2 capacity, and does splitting the key range help?

At 188,736 tokens one head's keys and values are 97 MB, twice an H200's 50 MB L2. The block-sparse
kernels walk each row's key list in ascending order, and the rows running at one time are spread over
their walks, so together they touch all of a head's K/V at once.

The probe measures, side by side on the same inputs (bf16, B=1, H=12, D=128):
1. the default lowering of each backend on a uniform random 64-token mask (density 0.2) at 32,768,
   98,304 and 188,736 tokens: if the rate falls with length, the working set is the limit;
2. at 188,736 tokens, the AdaSpa-shaped mask (``fa4_check_masks.adaspa_large``, row counts 0.1/0.2/0.3 by
   head) through the ``fa4`` lowering with ``key_parts`` = 1, 2, 4, 8 and 1 again (the run-to-run spread):
   that many launches over consecutive key ranges, merged in place by LSE (``backends/cuda/lse_merge.py``),
   against the Triton lowering; the output is checked against the unsplit one and the call's peak memory
   above its inputs is reported.
(Files from before 2026-12-01's mends split the mask by hand and merged with torch ops: commit 14871d3.)

    python bench/key_split_probe.py --out DIR [--backends triton,fa4]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from kernel_timing import median_ms  # noqa: E402

import sparsecore  # noqa: E402
from sparsecore.registry import registered_backends  # noqa: E402
from fa4_check_masks import adaspa_large  # noqa: E402
from report import run_meta, time_one_backend  # noqa: E402

HEADS, DIM, BLOCK = 12, 128, 64


def rate(flops: float, ms: float) -> float:
    return flops / ms / 1e9


def main() -> int:
    time_one_backend()
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--backends", default="triton")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    backends = [b for b in args.backends.split(",") if b in registered_backends()]
    results: dict[str, object] = {}
    lines = ["| case | backend | ms | eff TFLOP/s | note |", "|---|---|---|---|---|"]
    torch.manual_seed(0)
    scale = DIM ** -0.5

    for seq in (32768, 98304, 188736):
        mask = adaspa_large(HEADS, seq, BLOCK, (0.2,), seed=1)
        q, k, v = (torch.randn(1, HEADS, seq, DIM, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        for backend in backends:
            kernel = sparsecore.compile(mask, device="cuda", backend=backend)
            ms = median_ms(lambda: kernel(q, k, v, scale=scale))
            results[f"uniform d=0.2 S={seq} {backend}"] = ms
            lines.append(f"| uniform 0.2, S={seq} | {backend} | {ms:.2f} | {rate(mask.flops(DIM), ms):.0f} | |")
            print(lines[-1], flush=True)
        del q, k, v

    seq = 188736
    mask = adaspa_large(HEADS, seq, BLOCK, (0.1, 0.2, 0.3), seed=0).to("cuda")
    flops = mask.flops(DIM)
    q, k, v = (torch.randn(1, HEADS, seq, DIM, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    if "triton" in backends:
        kernel = sparsecore.compile(mask, device="cuda", backend="triton")
        ms = median_ms(lambda: kernel(q, k, v, scale=scale))
        results["adaspa triton"] = ms
        lines.append(f"| AdaSpa-shaped, S={seq} | triton | {ms:.2f} | {rate(flops, ms):.0f} | |")
        print(lines[-1], flush=True)
    if "fa4" in backends:
        reference = sparsecore.compile(mask, device="cuda", backend="fa4")(q, k, v, scale=scale)
        for parts in (1, 2, 4, 8, 1):                 # 1 again: the run-to-run spread
            kernel = sparsecore.compile(mask, device="cuda", backend="fa4", key_parts=parts, cache=False)
            out = kernel(q, k, v, scale=scale)
            err = ((out.float() - reference.float()).norm() / reference.float().norm()).item()
            del out
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            kernel(q, k, v, scale=scale)
            torch.cuda.synchronize()
            peak_mib = (torch.cuda.max_memory_allocated() - before) / 2 ** 20
            ms = median_ms(lambda: kernel(q, k, v, scale=scale))
            key = f"adaspa fa4 key_parts={parts}" + (" (again)" if f"adaspa fa4 key_parts={parts}" in results else "")
            results[key] = {"ms": ms, "rel_err_vs_unsplit": err, "peak_mib_above_inputs": peak_mib}
            lines.append(f"| AdaSpa-shaped, S={seq}, key_parts={parts} | fa4 | {ms:.2f} | {rate(flops, ms):.0f} "
                         f"| rel err vs unsplit {err:.1e}; peak {peak_mib:.0f} MiB above the inputs |")
            print(lines[-1], flush=True)
    meta = run_meta()
    (args.out / "key-split-probe.md").write_text(f"{meta}\n\n" + "\n".join(lines) + "\n")
    (args.out / "key-split-probe.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
