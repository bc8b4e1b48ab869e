"""Whether FA4's last partial wave of CTAs explains the 32K d=0.1 gap to cuDNN (issue 13).

    python bench/fa4_wave_probe.py --out OUTDIR

At S = 32,768 with 128 x 128 tiles and 12 heads, FA4's forward has 12 x 256 = 3,072 query tiles, one CTA each,
on 132 SMs: 23.3 waves, so the last of 24 runs 27% full and about 3% of the kernel's time is idle SMs (every
row of these masks keeps the same number of blocks, so every CTA takes about as long). Here the per-row work stays
the same and only the head count moves: 12 and 16 heads leave a partial last wave (23.3 and 31.0 waves), 17 and
33 heads fill their waves (33.0 and 64.0). If the tail costs what it seems to, the eff TFLOP/s of FA4's own call
and of the lowering rise by about 3% from 12 to 17 or 33 heads. Masks: ``cuda_cases.random_rows`` (each head its
own random rows, with its diagonal), bf16, D = 128, ``kernel_timing.median_ms``, each kernel timed twice in the
order A B B A (the first run, 2026-12-05 on an H100, timed FA4's own call first: at 98,304 tokens the lowering ran
15-22% slower than the call before it, which at 32,768 tokens it matched).

Writes ``fa4-waves-<date>.json`` and ``.md`` to ``--out`` (``report.probe_main``).
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

HEAD_DIM, TILE = 128, 128
CASES = ((32768, 0.1, (12, 16, 17, 33)), (32768, 0.25, (12, 17)), (98304, 0.1, (12, 17)))
ORDER = ("FA4's own call", "fa4 lowering", "fa4 lowering", "FA4's own call")   # A B B A: an order effect shows


def measure() -> list[dict]:
    from flash_attn.cute import flash_attn_func
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for seq, density, head_counts in CASES:
        for heads in head_counts:
            generator = torch.Generator(device="cuda").manual_seed(seq + heads)
            q, k, v = (torch.randn(1, heads, seq, HEAD_DIM, generator=generator, device="cuda",
                                   dtype=torch.bfloat16) for _ in range(3))
            mask = random_rows(heads, seq, density, seed=heads)
            flops = 4.0 * seq * seq * HEAD_DIM * heads * mask.density()
            run = Fa4Backend().lower(mask, "cuda", Fa4Options())
            sparse = anchor_tensors(mask, TILE)
            views = [t.transpose(1, 2) for t in (q, k, v)]
            kernels = {"FA4's own call": lambda: flash_attn_func(*views, block_sparse_tensors=sparse, pack_gqa=False),
                       "fa4 lowering": lambda: run(q, k, v, HEAD_DIM ** -0.5, False)}
            waves = heads * (seq // TILE) / sms
            for turn, name in enumerate(ORDER):
                ms = median_ms(kernels[name])
                rows.append({"seq": seq, "density": mask.density(), "heads": heads, "waves": waves, "kernel": name,
                             "turn": turn, "ms": ms, "ms_per_head": ms / heads, "eff_tflops": flops / ms / 1e9})
                print(f"{seq} {density} H={heads:2d} waves {waves:6.2f} turn {turn} {name:15s} {ms:8.3f} ms "
                      f"{rows[-1]['eff_tflops']:6.1f} eff TFLOP/s", flush=True)
            torch.cuda.empty_cache()
    return rows


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"# FA4's last wave: eff TFLOP/s by head count ({meta['versions']['gpu']}, {meta['date']})", "",
             "| S | density | heads | waves of CTAs | turn | kernel | ms | ms a head | eff TFLOP/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['seq']} | {r['density']:.4f} | {r['heads']} | {r['waves']:.2f} | {r['turn']} | {r['kernel']} | "
              f"{r['ms']:.3f} | {r['ms_per_head']:.4f} | {r['eff_tflops']:.1f} |" for r in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(probe_main(__doc__, "fa4-waves", measure, markdown))
