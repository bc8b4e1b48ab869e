"""Probe (GPU): are 64-token-block masks at 6x bound by L2 capacity, and does splitting the key range help?

At 188,736 tokens one head's keys and values are 97 MB, twice an H200's 50 MB L2. The block-sparse
kernels walk each row's key list in ascending order, and the rows running at one time are spread over
their walks, so together they touch all of a head's K/V at once: most 64-token tiles would then come
from HBM, 32 KB per 2.1 MFLOP tile (twice the bytes per FLOP of 128-token tiles).

The probe measures, side by side on the same inputs (bf16, B=1, H=12, D=128):
1. the production lowering on a uniform random 64-token mask (density 0.2) at 32,768, 98,304 and
   188,736 tokens: if the rate falls with length, the working set is the limit;
2. at 188,736 tokens, the AdaSpa-shaped mask (``fa4_check.adaspa_large``, row counts 0.1/0.2/0.3 by head)
   cut into P key ranges (``ir.slicing.slices``), each part's kernel over its contiguous K/V slice (copied
   before timing), then the parts merged by LSE with torch ops: P = 1, 2, 4, 8. The kernel-only time and
   the time with the merge are both reported, and the merged output is checked against the unsplit one.

    python bench/key_split_probe.py --out DIR [--backends triton,fa4]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).parent))

import sparsecore  # noqa: E402
from sparsecore.ir.slicing import slices  # noqa: E402
from sparsecore.registry import registered_backends  # noqa: E402
from fa4_check import adaspa_large  # noqa: E402

HEADS, DIM, BLOCK = 12, 128, 64


def merge(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Outputs of disjoint key ranges merged by their natural-log LSEs (rows without keys stay 0)."""
    lses = torch.stack([lse for _, lse in parts])                    # [P, B, H, S]
    total = torch.logsumexp(lses, 0)
    weights = torch.exp(lses - torch.where(torch.isfinite(total), total, 0.0)).nan_to_num_(0.0)
    out = sum(w[..., None] * o.float() for w, (o, _) in zip(weights, parts))
    return out.to(parts[0][0].dtype)


def rate(flops: float, ms: float) -> float:
    return flops / ms / 1e9


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--backends", default="triton")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    backends = [b for b in args.backends.split(",") if b in registered_backends()]
    results: dict[str, float] = {}
    lines = ["| case | backend | ms | eff TFLOP/s | note |", "|---|---|---|---|---|"]
    torch.manual_seed(0)
    scale = DIM ** -0.5

    for seq in (32768, 98304, 188736):
        mask = adaspa_large(HEADS, seq, BLOCK, (0.2,), seed=1)
        q, k, v = (torch.randn(1, HEADS, seq, DIM, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        for backend in backends:
            kernel = sparsecore.compile(mask, device="cuda", backend=backend)
            ms = triton.testing.do_bench(lambda: kernel(q, k, v, scale=scale))
            results[f"uniform d=0.2 S={seq} {backend}"] = ms
            lines.append(f"| uniform 0.2, S={seq} | {backend} | {ms:.2f} | {rate(mask.flops(DIM), ms):.0f} | |")
            print(lines[-1], flush=True)
        del q, k, v

    seq = 188736
    mask = adaspa_large(HEADS, seq, BLOCK, (0.1, 0.2, 0.3), seed=0).to("cuda")
    flops = mask.flops(DIM)
    q, k, v = (torch.randn(1, HEADS, seq, DIM, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    for backend in backends:
        whole = sparsecore.compile(mask, device="cuda", backend=backend)
        reference, _ = whole(q, k, v, scale=scale, return_lse=True)
        for parts in (1, 2, 4, 8, 1):                 # 1 again: the run-to-run spread
            blocks = mask.num_kv_blocks
            edges = [int(mask.kv_offsets[blocks * p // parts]) for p in range(parts)] + [seq]
            ranges = list(zip(edges[:-1], edges[1:]))
            subs = slices(mask, (0, seq), [r for r in ranges])
            kernels = [sparsecore.compile(sub, device="cuda", backend=backend) for sub in subs]
            ks = [k[:, :, a:b].contiguous() for a, b in ranges]
            vs = [v[:, :, a:b].contiguous() for a, b in ranges]

            def kernels_only():
                return [kern(q, kp, vp, scale=scale, return_lse=True) for kern, kp, vp in zip(kernels, ks, vs)]

            merged = merge(kernels_only())
            err = ((merged.float() - reference.float()).norm() / reference.float().norm()).item()
            ms_kernels = triton.testing.do_bench(kernels_only)
            ms_merged = triton.testing.do_bench(lambda: merge(kernels_only()))
            key = f"adaspa split={parts} {backend}" + (" (again)" if f"adaspa split={parts} {backend} kernels" in results else "")
            results[f"{key} kernels"] = ms_kernels
            results[f"{key} merged"] = ms_merged
            results[f"{key} rel err"] = err
            lines.append(f"| AdaSpa-shaped, S={seq}, {parts} key ranges | {backend} | {ms_kernels:.2f} "
                         f"(+merge {ms_merged:.2f}) | {rate(flops, ms_kernels):.0f} ({rate(flops, ms_merged):.0f}) "
                         f"| rel err vs unsplit {err:.1e} |")
            print(lines[-1], flush=True)
            del ks, vs, kernels, subs
    text = "\n".join(lines)
    (args.out / "key-split-probe.md").write_text(text + "\n")
    (args.out / "key-split-probe.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
