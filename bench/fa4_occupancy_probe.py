"""Probe (GPU): FA4's SM90 forward on 64-token blocks with two CTAs per SM instead of one.

With 64-row query tiles FA4's SM90 kernel has one MMA warpgroup and a producer warpgroup, raises
the MMA warps to 256 registers and lowers the producer's to 56 (``flash_fwd_sm90``: 128 x 312
registers a CTA) and launches with ``min_blocks_per_mp=1``: one CTA, so one warpgroup issuing
tensor-core work, per SM. Its 64x64 tiles then run at the Triton lowering's rate (about 440 eff
TFLOP/s on the H200) where its 128x128 tiles reach 640. This probe asks whether two co-resident
CTAs (each 256 threads at 128 registers at launch, so the MMA warps get at most 256 - producer's)
close that gap: the ``fa4`` lowering's ``ctas_per_sm=2`` (:mod:`sparsecore.backends.cuda.fa4_occupancy`)
against ``ctas_per_sm=1`` (FA4's own launch) and the Triton lowering, on uniform 64-token masks, the
AdaSpa-shaped mask and a PASA-shaped one (density 0.15, grouped first-order approximation of the rest).
``--mma-regs R --producer-regs P`` try another register split (a process each: FA4's compile cache
does not key on it), timing only the two-CTA kernels. eff TFLOP/s counts the kept blocks' FLOPs: on the PASA-shaped
mask (marked *) the approximation pass's work is timed but not counted (``report.eff_tflops``). The kernels of a
mask are timed together in interleaved rounds (``kernel_timing.interleaved_ms``: the median round, and the spread).

    python bench/fa4_occupancy_probe.py --out DIR [--mma-regs 208 --producer-regs 48]
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from kernel_timing import interleaved_ms, summary  # noqa: E402

import sparsecore  # noqa: E402
from sparsecore import BlockMask  # noqa: E402
from sparsecore.backends.cuda import fa4_occupancy  # noqa: E402
from sparsecore.ir import Unselected  # noqa: E402
from fa4_check_masks import adaspa_large  # noqa: E402
from report import KEPT_BLOCKS_ONLY, eff_tflops, run_meta, time_one_backend  # noqa: E402

HEADS, DIM, BLOCK = 12, 128, 64


def main() -> int:
    time_one_backend()
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--mma-regs", type=int)
    parser.add_argument("--producer-regs", type=int)
    args = parser.parse_args()
    if (args.mma_regs is None) != (args.producer_regs is None):
        parser.error("--mma-regs and --producer-regs: give both (a register split) or neither")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.mma_regs is not None:
        fa4_occupancy.MMA_REGS, fa4_occupancy.PRODUCER_REGS = args.mma_regs, args.producer_regs
    variant = f"regs {fa4_occupancy.MMA_REGS}/{fa4_occupancy.PRODUCER_REGS}"
    torch.manual_seed(0)
    scale = DIM ** -0.5
    rows, results = [], {}
    cases = [("uniform 0.2", 32768, (0.2,), "drop"), ("uniform 0.2", 188736, (0.2,), "drop"),
             ("AdaSpa-shaped 0.1/0.2/0.3", 188736, (0.1, 0.2, 0.3), "drop"),
             ("PASA-shaped 0.15 + grouped-first-order:32", 188736, (0.15,), "grouped-first-order:32")]
    for name, seq, levels, unselected in cases:
        lists = adaspa_large(HEADS, seq, BLOCK, levels, seed=0)
        mask = BlockMask(lists.num_heads, lists.q_offsets, lists.kv_offsets, lists.indptr, lists.indices,
                         lists.budgets, lists.meta, Unselected.parse(unselected))
        q, k, v = (torch.randn(1, HEADS, seq, DIM, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        reference = sparsecore.compile(mask, device="cuda", backend="triton")
        expected = reference(q, k, v, scale=scale)
        variants = [("triton", {}), ("fa4", {"ctas_per_sm": 2})]
        if args.mma_regs is None:
            variants.append(("fa4", {"ctas_per_sm": 1}))
        calls, labels, errors = {}, {}, {}
        for backend, options in variants:
            kernel = reference if (backend, options) == ("triton", {}) else \
                sparsecore.compile(mask, device="cuda", backend=backend, **options)
            backend = backend + "".join(f" {key}={value}" for key, value in options.items())
            labels[backend] = variant if options.get("ctas_per_sm") == 2 else "as launched by FA4 / Triton"
            got = kernel(q, k, v, scale=scale)
            errors[backend] = ((got.float() - expected.float()).norm() / expected.float().norm()).item()
            calls[backend] = functools.partial(kernel, q, k, v, scale=scale)
        for backend, samples in interleaved_ms(calls).items():
            timing = summary(samples)
            rate = eff_tflops(mask, DIM, timing["ms"])
            results[f"{name} S={seq} {backend}"] = {**timing, "ms_rounds": samples, **rate,
                                                    "rel_err_vs_triton": errors[backend]}
            mark = " *" if "eff_tflops_counts" in rate else ""
            rows.append(f"| {labels[backend]} | {name}, S={seq} | {backend} | {timing['ms']:.2f} | "
                        f"{timing['ms_min']:.2f}-{timing['ms_max']:.2f} | {rate['eff_tflops']:.0f}{mark} | "
                        f"{errors[backend]:.1e} |")
            print(rows[-1], flush=True)
        del q, k, v, expected, calls
    slug, meta = f"r{fa4_occupancy.MMA_REGS}-{fa4_occupancy.PRODUCER_REGS}", run_meta(variant=variant)
    (args.out / f"fa4-occupancy-{slug}.md").write_text(
        f"{meta}\n\n| register split | mask | backend | ms | spread ms | eff TFLOP/s | rel err vs triton |\n"
        "|---|---|---|---|---|---|---|\n" + "\n".join(rows)
        + f"\n\n\\* eff TFLOP/s of {KEPT_BLOCKS_ONLY}: not comparable with the drop-only rows.\n")
    (args.out / f"fa4-occupancy-{slug}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
