"""Probe (GPU): are 64-token-block masks at 6x bound by L2 capacity, and does splitting the key range help?

At 188,736 tokens one head's keys and values are 97 MB, twice an H200's 50 MB L2. The block-sparse
kernels walk each row's key list in ascending order, and the rows running at one time are spread over
their walks, so together they touch all of a head's K/V at once.

The probe measures, side by side on the same inputs (bf16, B=1, H=12, D=128):
1. the default lowering of each backend on a uniform random 64-token mask (density 0.2) at 32,768,
   98,304 and 188,736 tokens: if the rate falls with length, the working set is the limit;
2. at 188,736 tokens, the AdaSpa-shaped mask (``fa4_check_masks.adaspa_large``, row counts 0.1/0.2/0.3 by
   head) through the ``fa4`` lowering with ``key_parts`` = 1, 2, 4, 8: that many launches over consecutive key
   ranges, merged in place by LSE (``backends/cuda/lse_merge.py``), against the Triton lowering; the output is
   checked against the unsplit one and the call's peak memory above its inputs is reported.
The kernels of each sequence length are timed together in interleaved rounds (``kernel_timing.interleaved_ms``:
each round every kernel's ``median_ms``, starting one kernel later each round); a row gives the median of its
rounds and their spread. Before 2026-12-05 each kernel was timed once, one after another, and part 2 repeated
``key_parts=1`` to show the spread.
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
from kernel_timing import ROUNDS, interleaved_ms, summary  # noqa: E402

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
    lines = [f"Each row: the median of {ROUNDS} interleaved rounds; spread: their least and most.", "",
             "| case | backend | ms | spread ms | eff TFLOP/s | note |", "|---|---|---|---|---|---|"]
    torch.manual_seed(0)
    scale = DIM ** -0.5

    for seq in (32768, 98304, 188736):
        mask = adaspa_large(HEADS, seq, BLOCK, (0.2,), seed=1)
        q, k, v = (torch.randn(1, HEADS, seq, DIM, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        kernels = {backend: sparsecore.compile(mask, device="cuda", backend=backend) for backend in backends}
        samples = interleaved_ms({backend: lambda kernel=kernel: kernel(q, k, v, scale=scale)
                                  for backend, kernel in kernels.items()})
        for backend, rounds in samples.items():
            timing = summary(rounds)
            results[f"uniform d=0.2 S={seq} {backend}"] = {**timing, "ms_rounds": rounds}
            lines.append(f"| uniform 0.2, S={seq} | {backend} | {timing['ms']:.2f} | {timing['ms_min']:.2f}-"
                         f"{timing['ms_max']:.2f} | {rate(mask.flops(DIM), timing['ms']):.0f} | |")
            print(lines[-1], flush=True)
        del q, k, v, kernels

    seq = 188736
    mask = adaspa_large(HEADS, seq, BLOCK, (0.1, 0.2, 0.3), seed=0).to("cuda")
    flops = mask.flops(DIM)
    q, k, v = (torch.randn(1, HEADS, seq, DIM, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    kernels, notes = {}, {}
    if "triton" in backends:
        kernels["triton"] = sparsecore.compile(mask, device="cuda", backend="triton")
        notes["triton"] = {}
    if "fa4" in backends:
        reference = sparsecore.compile(mask, device="cuda", backend="fa4", key_parts=1, cache=False)(q, k, v,
                                                                                                       scale=scale)
        for parts in (None, 1, 2, 4, 8):             # None: the default, parts chosen from the L2 (auto_key_parts)
            name = "fa4 default" if parts is None else f"fa4 key_parts={parts}"
            kernel = sparsecore.compile(mask, device="cuda", backend="fa4", key_parts=parts, cache=False)
            out = kernel(q, k, v, scale=scale)
            err = ((out.float() - reference.float()).norm() / reference.float().norm()).item()
            del out
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            kernel(q, k, v, scale=scale)
            torch.cuda.synchronize()
            kernels[name] = kernel
            notes[name] = {"rel_err_vs_unsplit": err,
                           "peak_mib_above_inputs": (torch.cuda.max_memory_allocated() - before) / 2 ** 20}
        del reference
    samples = interleaved_ms({name: lambda kernel=kernel: kernel(q, k, v, scale=scale)
                              for name, kernel in kernels.items()})
    for name, rounds in samples.items():
        timing = summary(rounds)
        results[f"adaspa {name}"] = {**timing, "ms_rounds": rounds, **notes[name]}
        note = "" if not notes[name] else (f"rel err vs unsplit {notes[name]['rel_err_vs_unsplit']:.1e}; peak "
                                           f"{notes[name]['peak_mib_above_inputs']:.0f} MiB above the inputs")
        lines.append(f"| AdaSpa-shaped, S={seq} | {name} | {timing['ms']:.2f} | {timing['ms_min']:.2f}-"
                     f"{timing['ms_max']:.2f} | {rate(flops, timing['ms']):.0f} | {note} |")
        print(lines[-1], flush=True)
    if "triton" in samples and "fa4 default" in samples:
        ratio = results["adaspa triton"]["ms"] / results["adaspa fa4 default"]["ms"]
        results["adaspa triton / fa4 default"] = ratio
        lines += ["", f"AdaSpa-shaped mask: triton / fa4 default = {ratio:.3f} (issue 13 asks 1.3)"]
        print(lines[-1], flush=True)
    meta = run_meta()
    (args.out / "key-split-probe.md").write_text(f"{meta}\n\n" + "\n".join(lines) + "\n")
    (args.out / "key-split-probe.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
