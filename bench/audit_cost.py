"""Probe (GPU): what an audited call costs (``handle.audit``: ``sparsecore.integrations.diffusers.audit.fidelity``).

Wan 2.1 1.3B's attention shape (12 heads x 128, bf16, batch 1) at 2x and 6x its 81 frames (41 and 121 latent
frames of 1,560 tokens), two masks each: LVSA's frame pattern (1,560-token blocks) and a random 64-token one at
density 0.2 (AdaSpa's block size) on the whole 64-token blocks' prefix. Per row: the seconds of one audit
measurement (wall time with the device synchronized, the second of two calls, the mask's kernel compiled by the first),
the device memory it takes above the inputs, the mask's kernel alone and cuDNN's dense attention on the same inputs
(``kernel_timing.median_ms``), and the recall measured (random data: a check that the call ran, not a quality
figure).

    python bench/audit_cost.py --out DIR
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from report import probe_main  # noqa: E402

HEADS, HEAD_DIM, FRAME_TOKENS = 12, 128, 1560
LENGTHS = (("2x", 41), ("6x", 121))


def measure() -> list[dict]:
    import torch
    from cuda_cases import lvsa_frames, random_rows
    from kernel_timing import median_ms

    import sparsecore
    from sparsecore.integrations.diffusers.audit import fidelity

    def compiled(mask):
        return sparsecore.compile(mask, device="cuda")

    rows = []
    for label, frames in LENGTHS:
        tokens = frames * FRAME_TOKENS
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(1, HEADS, tokens, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
                   for _ in range(3))
        dense_ms = median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
        whole = tokens - tokens % 64                  # the random mask's whole 64-token blocks: a prefix
        masks = {"lvsa frames": lvsa_frames(HEADS, frames=frames).to("cuda"),
                 "random 64-token, d 0.2": random_rows(HEADS, whole, 0.2, block=64).to("cuda")}
        for name, mask in masks.items():
            inputs = [t[:, :, :mask.q_len] for t in (q, k, v)]
            fidelity(*inputs, mask, compiled)                                     # first call: compiles the kernel
            kernel_ms = median_ms(lambda: compiled(mask)(*inputs))
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            began = time.perf_counter()
            found = fidelity(*inputs, mask, compiled)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - began
            rows.append({"length": label, "tokens": mask.q_len, "mask": name, "density": round(mask.density(), 4),
                         "audit_s": seconds, "audit_extra_gib": (torch.cuda.max_memory_allocated() - before) / 2**30,
                         "kernel_ms": kernel_ms, "dense_cudnn_ms": dense_ms, "recall": float(found.recall.mean())})
            print(rows[-1], flush=True)
    return rows


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"# What an audited call costs ({meta['date']})", "",
             f"Machine: {meta['versions']['gpu']}; torch {meta['versions']['torch']}. Wan 2.1 1.3B attention shape "
             f"(12 heads x 128, bf16), one audit measurement (`audit.fidelity`).", "",
             "| length | tokens | mask | density | audit (s) | extra memory (GiB) | mask's kernel (ms) "
             "| cuDNN dense (ms) | recall |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['length']} | {r['tokens']:,} | {r['mask']} | {r['density']} | {r['audit_s']:.3f} | "
              f"{r['audit_extra_gib']:.2f} | {r['kernel_ms']:.1f} | {r['dense_cudnn_ms']:.1f} | {r['recall']:.3f} |"
              for r in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(probe_main(__doc__, "audit-cost", measure, markdown))
