"""Probe (GPU): which dense attention kernel is fastest for the dense steps of a video DiT.

The methods' dense steps (AdaSpa's and PASA's warm-up, AdaSpa's LSE pass, PISA's dense first layer)
run dense attention. This probe times, side by side on the same inputs (bf16, B=1, H=12, q, k, v as
``[B, S, H, D]`` views of head-major memory, as the processors hand them over): torch SDPA as it chooses
(what diffusers' default ``"native"`` dispatch runs), SDPA restricted to cuDNN, cuDNN with its LSE,
FlashAttention-4's dense forward (``flash_attn.cute``, without and with the LSE) writing into a head-major
output, and ``sparsecore.search.dense_attention`` (what the methods' LSE passes run). Each output is compared
with cuDNN's. Effective TFLOP/s = 4 * S^2 * D * H / time. The kernels of one (S, D) are timed together in
interleaved rounds (``kernel_timing.interleaved_ms``; a row gives the median round and the rounds' spread): on an
H100 one ``median_ms`` per kernel, one kernel after another, varied by up to 15% between repeats (2026-12-05).

    python bench/dense_kernels.py --out DIR [--lengths 16384,32768] [--dims 128] [--dtype float16]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).parent.parent))
from kernel_timing import interleaved_ms, summary  # noqa: E402
from report import run_meta  # noqa: E402

from sparsecore.search import dense_attention  # noqa: E402

HEADS = 12


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--lengths", default="32768,98304,188760")
    parser.add_argument("--dims", default="128,64")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from flash_attn.cute import interface
    results: list[dict] = []
    lines = ["| S | D | kernel | ms | spread ms | eff TFLOP/s | rel. L2 vs cuDNN |", "|---|---|---|---|---|---|---|"]
    torch.manual_seed(0)
    for dim in (int(d) for d in args.dims.split(",")):
        for seq in (int(s) for s in args.lengths.split(",")):
            q, k, v = (torch.randn(1, HEADS, seq, dim, device="cuda", dtype=getattr(torch, args.dtype))
                       for _ in range(3))
            scale = dim ** -0.5
            out_hm = torch.empty_like(q)

            def sdpa_cudnn():
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)

            def sdpa():                     # torch's own choice among its kernels (what diffusers' "native" runs)
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)

            def cudnn_lse():
                return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False,
                                                                          scale=scale)[0]

            def fa4(return_lse: bool):
                return lambda: interface._flash_attn_fwd(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale, causal=False,
                    return_lse=return_lse, out=out_hm.transpose(1, 2))[0].transpose(1, 2)

            def library():
                return dense_attention(q, k, v, scale)[0]

            reference = sdpa_cudnn().float()
            kernels = {"SDPA, torch's choice": sdpa, "cuDNN SDPA": sdpa_cudnn, "cuDNN + LSE": cudnn_lse,
                       "FA4 dense": fa4(False), "FA4 dense + LSE": fa4(True),
                       "sparsecore.search.dense_attention": library}
            errors = {}
            for name, fn in kernels.items():
                out = fn().float()
                errors[name] = ((out - reference).norm() / reference.norm()).item()
                del out
            for name, rounds in interleaved_ms(kernels).items():
                timing = summary(rounds)
                rate = 4 * seq * seq * dim * HEADS / timing["ms"] / 1e9
                results.append({"seq": seq, "dim": dim, "kernel": name, **timing, "ms_rounds": rounds,
                                "eff_tflops": rate, "rel_l2_vs_cudnn": errors[name]})
                lines.append(f"| {seq} | {dim} | {name} | {timing['ms']:.2f} | {timing['ms_min']:.2f}-"
                             f"{timing['ms_max']:.2f} | {rate:.0f} | {errors[name]:.1e} |")
                print(lines[-1], flush=True)
            del reference, kernels          # q, k, v and out_hm go when the next length rebinds them
    meta = run_meta(dtype=args.dtype)
    stem = f"dense-kernels-{args.dtype}-D{args.dims.replace(',', '_')}-S{args.lengths.replace(',', '_')}"
    (args.out / f"{stem}.md").write_text(f"{meta}\n\n" + "\n".join(lines) + "\n")
    (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
