"""Probe (GPU): the masks AdaSpa (or PASA) plans in a model's step (Wan 2.1 1.3B at 6x by default), their shape and
their kernels' times.

``bench/key_split_probe.py`` times synthetic AdaSpa-shaped masks (random top-k rows: every row's keys
spread over the whole sequence). This probe takes the masks the method itself planned (random-weight Wan
2.1 1.3B at 6x, eager; AdaSpa: its dense step that keeps the LSE, then its first search; PASA: its first
sparse step), and reports per layer what decides their kernels' speed:

- density and, per head, the fraction of key blocks any row keeps (a head's K/V working set) and of
  those kept by 256 consecutive query blocks (about what the GPU runs at once: 132 SMs x 2 CTAs);
- the median distance |key block - query block| of kept blocks, as a fraction of the blocks (0.33:
  spread as random picks are; small: a band around the diagonal);
- the ``fa4`` lowering's time with ``key_parts`` None (auto), 1, 2, 4 and 8, and Triton's, on random
  bf16 q, k, v of the same shape (a kernel's time does not depend on the values); PASA's masks also
  approximate the blocks a row does not list: their lists are timed as drop-only masks on both (the
  exact part), and the approximating masks as PASA runs them (compiled and converted anew at each call,
  its masks being new at each call) on Triton and on fa4 (FA4's exact part, then Triton's approximation
  pass merged into it), with the largest difference between their outputs,

and the synthetic mask of the same density next to them.

    python bench/method_mask_probe.py --out DIR [--method adaspa|pasa] [--layers 0 14 29]
                                      [--model cogvideox-1.5 --length 2x] [--key-parts 1 2 4]

``--model`` / ``--length`` take another case of ``bench/e2e_benchmark.py`` (its random-weight model, its layers):
joint video + text models give masks of 64-token blocks with a short video block inside and a short text block
last (``compile`` ranks them fa4 first since 2026-12-04, PASA's approximating ones Triton first:
``backends/cuda/selection.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from kernel_timing import median_ms  # noqa: E402

import sparsecore  # noqa: E402
from sparsecore.integrations import diffusers as sc_diffusers  # noqa: E402
from e2e_models import build_model, cases, model_inputs  # noqa: E402
from e2e_timing import timed_forward  # noqa: E402
from fa4_check_masks import adaspa_large  # noqa: E402
from sparsecore.ir.host_facts import as_new  # noqa: E402
from sparsecore.ir.unselected import DROP  # noqa: E402
from sparsecore.methods.approximation import with_unselected  # noqa: E402
from report import run_meta, time_one_backend  # noqa: E402

# the steps run before the masks are taken: AdaSpa's dense step keeping its LSE, then its first search; PASA's first
# sparse step
STEPS = {"adaspa": (9, 10), "pasa": (10,)}

WINDOW = 256


def shape_stats(mask: sparsecore.BlockMask) -> dict:
    """Density, per-head working sets and locality of a host mask's lists."""
    indptr, indices = np.asarray(mask.indptr), np.asarray(mask.indices)
    blocks = mask.num_kv_blocks
    used, windowed, distance = [], [], []
    for h in range(mask.num_heads):
        rows = np.repeat(np.arange(mask.num_q_blocks), np.diff(indptr[h]))
        cols = indices[indptr[h, 0]:indptr[h, -1]]
        used.append(np.unique(cols).size / blocks)
        starts = range(0, mask.num_q_blocks, WINDOW)
        windowed.append(float(np.mean([np.unique(cols[(rows >= s) & (rows < s + WINDOW)]).size / blocks
                                       for s in starts])))
        distance.append(float(np.median(np.abs(cols - rows))) / blocks)
    return {"density": float(mask.density()), "density_per_head": [round(float(d), 3) for d in
                                                                    mask.density(per_head=True)],
            "kv_blocks_used": [round(u, 3) for u in used],
            "kv_blocks_used_by_256_rows": [round(w, 3) for w in windowed],
            "median_distance": [round(d, 3) for d in distance]}


def per_call_times(mask: sparsecore.BlockMask, q, k, v) -> dict:
    """Per call, compiled and converted anew each time (as PASA's masks are): an approximating ``mask`` on Triton
    and on ``fa4`` (FA4's exact part in its auto key ranges, then Triton's approximation pass merged in), and the
    largest difference between their outputs."""
    approximating = mask.to("cuda")
    runs = {name: (lambda name=name: sparsecore.compile(as_new(approximating), device="cuda", backend=name,
                                                        cache=False)(q, k, v)) for name in ("triton", "fa4")}
    times = {f"per call: {name} with the approximation": median_ms(run) for name, run in runs.items()}
    times["per call: max abs difference"] = float((runs["fa4"]().float() - runs["triton"]().float()).abs().max())
    return times


def kernel_times(mask: sparsecore.BlockMask, q, k, v, key_parts: list[int]) -> dict:
    times = {}
    if mask.unselected != DROP:
        kernel = sparsecore.compile(mask, device="cuda", backend="triton", cache=False)
        times[f"triton with {mask.unselected}"] = median_ms(lambda: kernel(q, k, v))
        times.update(per_call_times(mask, q, k, v))
        mask = with_unselected(mask, DROP)                         # the exact part, as a drop-only mask
    for parts in (None, *key_parts):
        kernel = sparsecore.compile(mask, device="cuda", backend="fa4", key_parts=parts, cache=False)
        times[f"fa4 key_parts={parts}"] = median_ms(lambda: kernel(q, k, v))
    kernel = sparsecore.compile(mask, device="cuda", backend="triton", cache=False)
    times["triton"] = median_ms(lambda: kernel(q, k, v))
    return {name: round(ms, 2) if "difference" not in name else ms for name, ms in times.items()}


def main() -> int:
    time_one_backend()
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layers", nargs="*", type=int, default=[0, 14, 29])
    parser.add_argument("--method", default="adaspa", choices=sorted(STEPS))
    parser.add_argument("--model", default="wan-1.3b", help="a bench/e2e_benchmark.py model")
    parser.add_argument("--length", default="6x", help="one of that model's lengths")
    parser.add_argument("--key-parts", nargs="*", type=int, default=[1, 2, 4, 8], help="fa4 key_parts beside auto")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    case = next(c for c in cases([args.model], tiny=False) if c.label == args.length)
    model = build_model(case, False, "cuda", torch.bfloat16)
    inputs = model_inputs(model, case, "cuda", torch.bfloat16)
    handle = sc_diffusers.apply(model, method=args.method, device="cuda", num_steps=50)
    handle.keep_masks(True)                          # PASA plans at every call and keeps none otherwise
    masks = {}
    try:
        for step in STEPS[args.method]:
            handle.set_step(step)
            print(f"step {step}: {timed_forward(model, inputs, 1000.0 - 19 * step, 'cuda'):.1f} s", flush=True)
        masks = {layer: handle.mask(layer).to_host() for layer in args.layers}
    finally:
        handle.remove()
    config = model.config
    del model, inputs
    torch.cuda.empty_cache()
    results = {}
    heads, tokens, dim = config.num_attention_heads, next(iter(masks.values())).q_len, config.attention_head_dim
    q, k, v = (torch.randn(1, heads, tokens, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    for layer, mask in masks.items():
        results[f"layer {layer}"] = {**shape_stats(mask), **kernel_times(mask, q, k, v, args.key_parts)}
        print(f"layer {layer}: {json.dumps(results[f'layer {layer}'])}", flush=True)
    stem = args.method if args.model == "wan-1.3b" else f"{args.model}-{args.length}-{args.method}"
    if args.method != "adaspa" or args.model != "wan-1.3b":
        (args.out / f"{stem}-mask-probe.json").write_text(json.dumps({"meta": run_meta(), **results}, indent=1))
        return 0
    synthetic = adaspa_large(heads, tokens - tokens % 64, 64, (0.1, 0.2, 0.3), seed=0)
    q, k, v = (t[:, :, :synthetic.q_len] for t in (q, k, v))
    results["synthetic AdaSpa-shaped"] = {**shape_stats(synthetic), **kernel_times(synthetic, q, k, v, args.key_parts)}
    print(f"synthetic: {json.dumps(results['synthetic AdaSpa-shaped'])}", flush=True)
    (args.out / "adaspa-mask-probe.json").write_text(json.dumps({"meta": run_meta(), **results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
