"""Where the fa4 lowering loses to FA4's own call on the same 128 x 128 mask (H100, 98,304 tokens, density 0.1).

    python bench/fa4_gap_probe.py --out OUTDIR

On an H100 (2026-12-05) the lowering took 9.6-10.3 ms where FA4's block-sparse call on the same full tiles took
8.9-9.2 (bench/fa4_layout_probe.py: not the inputs' memory order). The two differ in three things, crossed here
on one mask and one set of inputs (bf16, B=1, H=12, D=128, ``kernel_timing.median_ms``):
- the lists: the anchor's (``fa4_check.anchor_tensors``: width = the most kept blocks of a row) or the lowering's
  (``Fa4Launch.converted(...).ranges[0].sparse``);
- the output: FA4's own ``[B, S, H, D]`` tensor or the lowering's head-major ``out=``;
- the entry: ``flash_attn_func`` or ``interface._flash_attn_fwd``.

What it found on 2026-12-05: bench/results/gpu-2026-12-05-runs/forty-third-session/notes.md.

Writes ``fa4-gap-<date>.json`` and ``.md`` to ``--out`` (``report.probe_main``).
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


def describe(sparse) -> str:
    """Shapes and dtypes of a BlockSparseTensorsTorch's tensors."""
    return ", ".join(f"{name} {list(t.shape)} {str(t.dtype).replace('torch.', '')}"
                     for name in ("mask_block_cnt", "mask_block_idx", "full_block_cnt", "full_block_idx")
                     if (t := getattr(sparse, name, None)) is not None)


def measure() -> list[dict]:
    from flash_attn.cute import flash_attn_func
    from flash_attn.cute import interface
    rows = []
    for seq, density in ((98304, 0.1), (32768, 0.1)):
        generator = torch.Generator(device="cuda").manual_seed(seq)
        q, k, v = (torch.randn(1, HEADS, seq, HEAD_DIM, generator=generator, device="cuda", dtype=torch.bfloat16)
                   for _ in range(3))
        views = [t.transpose(1, 2) for t in (q, k, v)]                       # [B, S, H, D] over head-major memory
        mask = random_rows(HEADS, seq, density, seed=int(density * 100))
        flops = 4.0 * seq * seq * HEAD_DIM * HEADS * mask.density()
        run = Fa4Backend().lower(mask, "cuda", Fa4Options())
        run(q, k, v, HEAD_DIM ** -0.5, False)                                # converts the lists read below
        lists = {"anchor lists": anchor_tensors(mask, 128), "lowering lists": run.converted(q.device).ranges[0].sparse}
        head_major_out = torch.empty_like(q).transpose(1, 2)
        kernels = {"lowering as called": (None, lambda: run(q, k, v, HEAD_DIM ** -0.5, False))}
        for name, sparse in lists.items():
            kernels[f"flash_attn_func, {name}, own out"] = (sparse, lambda s=sparse: flash_attn_func(
                *views, block_sparse_tensors=s, pack_gqa=False))
            kernels[f"_flash_attn_fwd, {name}, own out"] = (sparse, lambda s=sparse: interface._flash_attn_fwd(
                *views, softmax_scale=HEAD_DIM ** -0.5, causal=False, pack_gqa=False, block_sparse_tensors=s))
            kernels[f"_flash_attn_fwd, {name}, head-major out="] = (sparse, lambda s=sparse: interface._flash_attn_fwd(
                *views, softmax_scale=HEAD_DIM ** -0.5, causal=False, pack_gqa=False, block_sparse_tensors=s,
                out=head_major_out))
        for name, (sparse, fn) in kernels.items():
            ms = median_ms(fn)                             # do_bench's first call, which may compile, is not timed
            rows.append({"seq": seq, "density": mask.density(), "kernel": name, "ms": ms,
                         "eff_tflops": flops / ms / 1e9, "lists": None if sparse is None else describe(sparse)})
            print(f"{seq} {mask.density():.4f} {name:55s} {ms:8.3f} ms {rows[-1]['eff_tflops']:6.1f} eff TFLOP/s",
                  flush=True)
        torch.cuda.empty_cache()
    return rows


def markdown(meta: dict, rows: list[dict]) -> str:
    lists = dict.fromkeys(f"{r['seq']} {r['kernel'].split(', ')[1]}: {r['lists']}" for r in rows if r["lists"])
    lines = [f"# The fa4 lowering against FA4's own call ({meta['versions']['gpu']}, {meta['date']})", "",
             *[f"- {n}" for n in lists], "", "| S | density | kernel | ms | eff TFLOP/s |", "|---|---|---|---|---|"]
    lines += [f"| {r['seq']} | {r['density']:.4f} | {r['kernel']} | {r['ms']:.3f} | {r['eff_tflops']:.1f} |"
              for r in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(probe_main(__doc__, "fa4-gap", measure, markdown))
