"""Does the memory order of q, k, v change FA4's block-sparse rate? (issue 13's 128 x 128 table, one GPU)

    python bench/fa4_layout_probe.py --out OUTDIR

sparsecore takes ``[B, H, S, D]`` tensors and hands FA4 transposed views (``[B, S, H, D]`` shape); what memory lies
under them is the caller's. ``bench/fa4_check.py`` times the lowering on head-major memory (``torch.randn(B, H, S,
D)``) and FA4's own call (the anchor) on sequence-major memory (``[B, S, H, D]`` contiguous), which is what a
diffusers processor's projections give in eager mode. On an H100 (2026-12-05) the lowering ran 7% under the anchor
at 98,304 tokens and density 0.1 with the same tiles. This probe times both on both memory orders, same masks
(``cuda_cases.random_rows``, as fa4_check), bf16, B=1, H=12, D=128, ``kernel_timing.median_ms``.

What it found on 2026-12-05: bench/results/gpu-2026-12-05-runs/forty-third-session/notes.md.

Writes ``fa4-layout-<date>.json`` and ``.md`` to ``--out`` (``report.probe_main``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from cuda_cases import random_rows  # noqa: E402
from fa4_check import anchor_tensors  # noqa: E402
from kernel_timing import median_ms  # noqa: E402
from report import probe_main  # noqa: E402
from sparsecore.backends.cuda.fa4_backend import Fa4Backend, Fa4Options  # noqa: E402

HEADS, HEAD_DIM = 12, 128


def inputs(seq: int, order: str) -> list[torch.Tensor]:
    """q, k, v as ``[1, H, S, D]`` tensors over head-major or sequence-major memory (seeded)."""
    generator = torch.Generator(device="cuda").manual_seed(seq)
    shape = (1, HEADS, seq, HEAD_DIM) if order == "head-major" else (1, seq, HEADS, HEAD_DIM)
    made = [torch.randn(shape, generator=generator, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    return made if order == "head-major" else [t.transpose(1, 2) for t in made]


def measure() -> list[dict]:
    from flash_attn.cute import flash_attn_func
    rows = []
    for seq in (32768, 98304):
        layouts = {order: inputs(seq, order) for order in ("head-major", "sequence-major")}
        for density in (0.1, 0.25, 0.5):
            mask = random_rows(HEADS, seq, density, seed=int(density * 100))
            flops = 4.0 * seq * seq * HEAD_DIM * HEADS * mask.density()
            sparse = anchor_tensors(mask, 128)
            run = Fa4Backend().lower(mask, "cuda", Fa4Options())
            for order, (q, k, v) in layouts.items():
                views = [t.transpose(1, 2) for t in (q, k, v)]            # [B, S, H, D] shape, this memory
                kernels = {"FA4 block-sparse raw": lambda: flash_attn_func(*views, block_sparse_tensors=sparse,
                                                                           pack_gqa=False),
                           "sparsecore fa4 default": lambda: run(q, k, v, HEAD_DIM ** -0.5, False)}
                for name, fn in kernels.items():
                    ms = median_ms(fn)                     # do_bench's first call, which may compile, is not timed
                    rows.append({"seq": seq, "density": mask.density(), "memory": order, "kernel": name, "ms": ms,
                                 "eff_tflops": flops / ms / 1e9})
                    print(f"{seq} {mask.density():.4f} {order:15s} {name:24s} {ms:8.3f} ms "
                          f"{rows[-1]['eff_tflops']:6.1f} eff TFLOP/s", flush=True)
        del layouts
        torch.cuda.empty_cache()
    return rows


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"# FA4 block-sparse by memory order of q, k, v ({meta['versions']['gpu']}, {meta['date']})", "",
             "| S | density | memory | kernel | ms | eff TFLOP/s |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['seq']} | {r['density']:.4f} | {r['memory']} | {r['kernel']} | {r['ms']:.3f} | "
              f"{r['eff_tflops']:.1f} |" for r in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(probe_main(__doc__, "fa4-layout", measure, markdown))
