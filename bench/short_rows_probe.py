"""Probe (GPU): do more, shorter CTAs lift ``fa4`` where rows are short (issue 13's S = 32K, d = 0.1 point)?

At S = 32,768 and density 0.1 with 128-token blocks every query tile walks 26 key tiles, and FA4's SM90 forward
launches one CTA per (query tile, head): 3,072 CTAs, one resident per SM on 132 SMs, so 23.3 waves of which the
last is a quarter full, and each CTA's Q load, pipeline fill and output store are its own. ``Fa4Options.key_parts``
cuts the keys into that many launches of shorter CTAs merged by LSE (``backends/cuda/lse_merge.py``). Side by side
on the same inputs (bf16, B = 1, H = 12, D = 128, per-head random rows as ``bench/cuda_cases.random_rows``): cuDNN
dense, FA4's own block-sparse call (full 128 x 128 tiles from the block map, ``fa4_check.anchor_tensors``) and the
``fa4`` lowering at key_parts 1-4, with each split's output against the unsplit one. Medians of at least 10
repeats (``kernel_timing.median_ms``). Effective TFLOP/s = 4 S^2 D H density / time (dense: density 1).

    python bench/short_rows_probe.py --out DIR
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from report import probe_main  # noqa: E402

HEADS, HEAD_DIM = 12, 128
POINTS = ((32768, 0.1), (32768, 0.25), (32768, 0.5), (98304, 0.1))
PARTS = (1, 2, 3, 4)


def measure() -> list[dict]:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from backends.cuda.fa4_backend import Fa4Backend, Fa4Options
    from cuda_cases import random_rows
    from fa4_check import anchor_tensors
    from flash_attn.cute import flash_attn_func
    from kernel_timing import median_ms
    rows, scale = [], 1 / math.sqrt(HEAD_DIM)
    for seq, density in POINTS:
        gen = torch.Generator(device="cuda").manual_seed(seq)
        q, k, v = (torch.randn(1, HEADS, seq, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
                   for _ in range(3))
        mask = random_rows(HEADS, seq, density)
        kept = mask.density()
        flops = 4.0 * seq * seq * HEAD_DIM * HEADS

        def add(kernel: str, fn, fraction: float, **extra) -> None:
            ms = median_ms(fn)
            rows.append({"seq": seq, "density": kept, "kernel": kernel, "ms": ms,
                         "eff_tflops": flops * fraction / ms / 1e9, **extra})
            print(rows[-1], flush=True)

        def cudnn():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v)
        add("cuDNN dense", cudnn, 1.0)
        sparse = anchor_tensors(mask, 128)
        qs, ks, vs = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        add("FA4 block-sparse, its own call", lambda: flash_attn_func(qs, ks, vs, block_sparse_tensors=sparse,
                                                                      pack_gqa=False), kept)
        del qs, ks, vs
        unsplit = None
        for parts in PARTS:
            run = Fa4Backend().lower(mask, "cuda", Fa4Options(key_parts=parts))
            out = run(q, k, v, scale, False)[0].float()
            unsplit = out if unsplit is None else unsplit
            add(f"fa4, key_parts={parts}", lambda run=run: run(q, k, v, scale, False), kept,
                rel_l2_vs_unsplit=float((out - unsplit).norm() / unsplit.norm()))
        del q, k, v, out, unsplit
        torch.cuda.empty_cache()
    return rows


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"# Short rows on fa4: key ranges, {meta['date']}", "", str(meta["versions"]), "",
             "| S | density | kernel | ms | eff TFLOP/s | rel L2 vs key_parts=1 |", "|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        diff = f"{r['rel_l2_vs_unsplit']:.1e}" if "rel_l2_vs_unsplit" in r else ""
        lines.append(f"| {r['seq']} | {r['density']:.4f} | {r['kernel']} | {r['ms']:.3f} | {r['eff_tflops']:.0f} "
                     f"| {diff} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(probe_main(__doc__, "short-rows", measure, markdown))
