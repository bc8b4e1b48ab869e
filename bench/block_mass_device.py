"""AdaSpa's block-mass search and the method planners on an accelerator (or the CPU).

    python bench/block_mass_device.py --out DIR [--device cuda]

1. Accuracy: ``sparsecore.search.block_mass`` (whatever ``impl="auto"`` picks for the
   device, and ``impl="torch"``) against block masses from float64 dense attention on
   the CPU, fp32 inputs: relative Frobenius error and the fresh-LSE row-sum identity.
2. Time at the Wan 2.1 1x shape (21x30x52 = 32760 tokens, 12 heads, head_dim 128,
   bf16 inputs, blocks of 64): the fused search (LSE computed, both passes), the
   LSE-cached search (pass 2 only), and torch SDPA dense attention for scale.
3. The planners on device tensors at that shape: AdaSpa (search + selection) and PASA
   (bench/planning_benchmark.py times them per layer, with the kernels' preparation).

Writes ``block_mass_<device>.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from sparsecore.geometry import VideoGeometry
from sparsecore.methods import adaspa, pasa
from sparsecore.search import block_mass, block_mass_ops
from sparsecore.timing import median_seconds

from report import run_meta


def timed(fn, device: str, repeats: int = 3) -> tuple[object, float]:
    """(the result of one call, the median seconds of ``repeats`` more after it)."""
    result = fn()
    return result, median_seconds(fn, device, warmup=0, repeats=repeats)


def reference_mass(q: torch.Tensor, k: torch.Tensor, q_offsets: np.ndarray, kv_offsets: np.ndarray) -> np.ndarray:
    q64, k64 = q.double().cpu(), k.double().cpu()
    k64 = k64.repeat_interleave(q64.shape[1] // k64.shape[1], dim=1)
    probs = torch.softmax(q64 @ k64.transpose(-1, -2) / q64.shape[-1] ** 0.5, dim=-1).numpy()
    rows = np.add.reduceat(probs, q_offsets[:-1], axis=2)
    return np.add.reduceat(rows, kv_offsets[:-1], axis=3)


def accuracy(device: str) -> list[dict]:
    cases = [  # batch, q heads, kv heads, L_q, L_kv, D, q offsets, kv offsets
        (1, 4, 4, 1000, 1000, 64, np.append(np.arange(0, 1000, 64), 1000), np.append(np.arange(0, 1000, 64), 1000)),
        (2, 4, 2, 777, 901, 128, np.array([0, 5, 100, 333, 640, 777]), np.array([0, 64, 128, 500, 901])),
        (1, 2, 2, 4096, 4096, 128, np.arange(0, 4097, 64), np.arange(0, 4097, 128)),
    ]
    rows = []
    for batch, hq, hk, lq, lk, d, qo, ko in cases:
        gen = torch.Generator().manual_seed(lq)
        q = torch.randn(batch, hq, lq, d, generator=gen)
        k = torch.randn(batch, hk, lk, d, generator=gen)
        want = reference_mass(q, k, qo, ko)
        for impl in dict.fromkeys(["auto", "torch"]):
            result = block_mass(q.to(device), k.to(device), qo, ko, impl=impl)
            got = result.mass.double().cpu().numpy()
            rows.append({"shape": f"B{batch} H{hq}/{hk} Lq{lq} Lkv{lk} D{d}", "impl": result.impl,
                         "rel_err": float(np.linalg.norm(got - want) / np.linalg.norm(want)),
                         "row_sum_err": float(np.abs(got.sum(3) / np.diff(qo) - 1).max())})
            print(f"  accuracy {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def timing(device: str) -> dict:
    g = VideoGeometry(21, 30, 52)
    heads, d = 12, 128
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, heads, g.tokens, d, generator=gen, device=device, dtype=torch.bfloat16)
               for _ in range(3))
    offsets = g.block_offsets(64)
    out: dict = {"shape": "Wan 2.1 1x: 32760 tokens, 12 heads, head_dim 128, bf16, blocks of 64"}
    for elements in (1 << 24, 1 << 28):
        fused, seconds = timed(lambda: block_mass(q, k, offsets, offsets, max_elements=elements), device)
        out[f"fused_search_s@{elements}"] = seconds
        _, seconds = timed(lambda: block_mass(q, k, offsets, offsets, lse=fused.lse, max_elements=elements), device)
        out[f"cached_search_s@{elements}"] = seconds
        out["impl"] = fused.impl
        print(f"  timing max_elements={elements}: {out}", file=sys.stderr, flush=True)
    _, out["dense_sdpa_s"] = timed(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), device)
    _, out["adaspa_plan_s"] = timed(lambda: adaspa.plan(g, heads, step=10, q=q, k=k), device, repeats=1)
    mask, out["pasa_plan_s"] = timed(lambda: pasa.plan(g, heads, step=10, layer=1, q=q, k=k), device, repeats=1)
    out["pasa_density"] = mask.density()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip-timing", action="store_true")
    args = parser.parse_args(argv)
    device = args.device
    report = run_meta(device, impls=sorted(block_mass_ops()), tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    report["accuracy"] = accuracy(device)
    if not args.skip_timing:
        report["timing"] = timing(device)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"block_mass_{device.split(':')[0]}.json"
    path.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
