"""GPU diagnostics behind the CUDA results: FlashInfer edge shapes, Triton resources and variants.

    python bench/gpu_diagnostics.py flashinfer   # small blocks, empty rows, GQA vs the float64 oracle
    python bench/gpu_diagnostics.py triton       # registers/spills/shared memory, warp specialization, full mask

Prints one line per case; used to decide capabilities and defaults (see bench/results/).
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).parent))

import sparsecore  # noqa: E402
from oracle import dense_attention, expand_to_tokens  # noqa: E402
from sparsecore import BlockMask  # noqa: E402


def flashinfer_edges() -> None:
    rng = np.random.default_rng(0)
    for r, c, dim, dtype, empty, group in itertools.product([1, 2, 3, 4, 16, 128], [1, 16, 128], [64, 128],
                                                           ["float16", "bfloat16"], [False, True], [1, 2]):
        q_len, kv_len = 3 * r + (1 if r > 1 else 0), 4 * c
        keep = rng.random((2 * group, -(-q_len // r), kv_len // c)) < 0.5
        keep[:, :, 0] |= not empty
        if empty:
            keep[:, 0] = False
        mask = BlockMask.from_dense(keep, q_len, kv_len, r, c)
        q = rng.standard_normal((1, 2 * group, q_len, dim))
        k, v = (rng.standard_normal((1, 2, kv_len, dim)) for _ in range(2))
        tq, tk, tv = (torch.from_numpy(x).to("cuda", getattr(torch, dtype)) for x in (q, k, v))
        out, lse = sparsecore.compile(mask, device="cuda", backend="flashinfer")(tq, tk, tv, return_lse=True)
        ref, ref_lse = dense_attention(tq.double().cpu().numpy(), tk.double().cpu().numpy(),
                                       tv.double().cpu().numpy(), expand_to_tokens(mask), dim ** -0.5)
        out = out.double().cpu().numpy()
        nan = int(np.isnan(out).sum())
        rel = float(np.linalg.norm(np.nan_to_num(out) - ref) / max(np.linalg.norm(ref), 1e-30))
        status = "ok " if nan == 0 and rel < 2e-2 else "BAD"
        print(f"{status} R={r:<3} C={c:<3} D={dim} {dtype:<8} empty_row={empty!s:<5} G={group} nan={nan} rel={rel:.1e}",
              flush=True)


def triton_report() -> None:
    from cuda_cases import random_rows
    import triton.testing
    for seq_len, density in ((32768, 0.25), (32768, 1.0)):
        mask = random_rows(12, seq_len, density) if density < 1 else BlockMask.full(12, seq_len, seq_len, 128)
        q, k, v = (torch.randn(1, 12, seq_len, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        useful = 4.0 * seq_len * seq_len * 128 * 12 * mask.density()
        for ws in (False, True):
            kernel = sparsecore.compile(mask, device="cuda", backend="triton", warp_specialize=ws)
            try:
                kernel(q, k, v)
            except (RuntimeError, triton.CompilationError) as err:  # the compiler may refuse the loop on Hopper
                print(f"S={seq_len} d={density} warp_specialize={ws}: does not compile: {str(err)[:200]}")
                continue
            compiled = kernel._run.last_compiled
            ms = triton.testing.do_bench(lambda: kernel(q, k, v), warmup=50, rep=300, return_mode="median")
            print(f"S={seq_len} d={density} warp_specialize={ws}: {ms:.3f} ms {useful / ms / 1e9:.1f} eff TFLOP/s; "
                  f"regs {compiled.n_regs}, spills {compiled.n_spills}, shared {compiled.metadata.shared} B",
                  flush=True)


if __name__ == "__main__":
    {"flashinfer": flashinfer_edges, "triton": triton_report}[sys.argv[1]]()
