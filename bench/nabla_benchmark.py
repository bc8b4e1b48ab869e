"""NABLA on Kandinsky 5: sparsecore's ``method="nabla"`` against diffusers' own NABLA (FlexAttention).

Kandinsky 5's NABLA configurations (``attention_type="nabla"``) run their visual self-attention through diffusers'
FlexAttention backend with a block mask from ``nablaT_v2`` (64-token blocks, no ``mask_mod``). Two parts:

``--part kernels``: one attention layer of Kandinsky 5.0 Video Lite's shape (28 heads x 64, bf16) on the synthetic
video workload (``sparsecore.workloads.video_qkv``, tokens put in NABLA's tile order), timed together in interleaved
rounds (``kernel_timing.time_rows``: 3 rounds of ``do_bench`` medians; a row gives the median round and the rounds'
spread): sparsecore's planning (``nabla.plan``) and kernel (``sparsecore.compile``'s default); diffusers' planning
(``nablaT_v2``) and FlexAttention compiled on its block mask with 64 x 64 kernel tiles (``kernel_options``: its
default tiles do not divide 64-token blocks on the H200); cuDNN dense. It checks the two masks are equal on the GPU and
reports the outputs' distance.

``--part model``: Kandinsky 5.0 Video Lite-shaped blocks (random bf16 weights, ``--blocks`` of them) with a NABLA
configuration, one forward each (one denoising step: NABLA runs at every step and layer, so the step ratio is the
generation's): ``dense`` (raster order, no ``sparse_params``), ``diffusers-nabla compiled`` (FlexAttention,
``compile_repeated_blocks(fullgraph=True)``; its error is recorded if it fails), ``sparsecore-nabla`` eager and compiled.
Random weights give nearly flat pooled maps, so the masks keep most blocks there: the density column says how many.
Eager FlexAttention has no row: unfused, it ignores a block mask's lists when the mask has no ``mask_mod`` (torch
2.13 on the CPU: dense attention) and holds every score (28 x S^2 floats).

    python bench/nabla_benchmark.py --out DIR [--part kernels model] [--frames 61] [--threshold 0.9] [--window 11 3 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from e2e_models import KANDINSKY5_LITE, Case, keep_in_float32, model_inputs  # noqa: E402
from kernel_timing import time_rows  # noqa: E402
from report import run_meta  # noqa: E402

import sparsecore  # noqa: E402
from sparsecore import VideoGeometry  # noqa: E402
from sparsecore.integrations import diffusers as sc_diffusers  # noqa: E402
from sparsecore.methods import nabla  # noqa: E402

HEIGHT, WIDTH = 64, 96          # latents of 768 x 512 (VAE 8x): 32 x 48 tokens a frame after the 2 x 2 patch, 24 tiles
HEADS, HEAD_DIM = 28, 64        # Kandinsky 5.0 Video Lite
DEVICE = "cuda"                 # the tests run kernel_rows on "cpu", FlexAttention uncompiled


def build(blocks: int, threshold: float, window: tuple[int, int, int], device: str, tiny: bool):
    from diffusers import Kandinsky5Transformer3DModel
    config = dict(KANDINSKY5_LITE, num_visual_blocks=blocks, attention_type="nabla", attention_P=threshold,
                  attention_wT=window[0], attention_wH=window[1], attention_wW=window[2])
    if tiny:
        config.update(model_dim=64, ff_dim=128, in_text_dim=64, in_text_dim2=32, time_dim=32, axes_dims=(8, 12, 12))
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return keep_in_float32(Kandinsky5Transformer3DModel(**config).to(device, dtype).eval())


def inputs_for(model, frames: int, window: tuple[int, int, int], device: str, tiled: bool) -> dict:
    """The e2e benchmark's Kandinsky 5 inputs (as its pipelines pass them) at timestep 500; ``tiled``: with NABLA's
    ``sparse_params``."""
    case = Case("kandinsky5", "nabla", frames, HEIGHT, WIDTH, model.config.num_visual_blocks, 32)
    inputs = model_inputs(model, case, device, model.visual_embeddings.in_layer.weight.dtype)
    inputs["timestep"] = torch.tensor([500.0], device=device)
    if tiled:
        sta = nabla.window_map(VideoGeometry(frames, HEIGHT // 2, WIDTH // 2), window, device)[None, None]
        inputs["sparse_params"] = {"to_fractal": True, "sta_mask": sta, "P": model.config.attention_P}
    return inputs


def timed(model, inputs: dict, device: str, repeats: int) -> tuple[float, torch.Tensor]:
    """Median seconds of ``repeats`` forwards after two warm-up ones, and the last output."""
    seconds = []
    with torch.no_grad():
        for i in range(repeats + 2):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = model(**inputs)[0]
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= 2:
                seconds.append(time.perf_counter() - start)
    return sorted(seconds)[len(seconds) // 2], out


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def tile_order(frames: int, height: int, width: int) -> torch.Tensor:
    """The raster token at each position of NABLA's tile order (each frame's 8 x 8 tiles row by row, a tile's tokens
    row by row), as Kandinsky 5's ``fractal_flatten`` lays them out."""
    t, ty, tx, y, x = np.meshgrid(np.arange(frames), np.arange(height // nabla.TILE), np.arange(width // nabla.TILE),
                                  np.arange(nabla.TILE), np.arange(nabla.TILE), indexing="ij")
    return torch.from_numpy((t * height * width + (ty * nabla.TILE + y) * width + tx * nabla.TILE + x).reshape(-1))


def kernel_rows(frames: int, threshold: float, window: tuple[int, int, int]) -> list[dict]:
    """One layer's planning and attention, sparsecore's against diffusers' NABLA and cuDNN dense (module docstring)."""
    from diffusers.models.transformers.transformer_kandinsky import nablaT_v2
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import flex_attention

    from sparsecore.workloads import video_qkv
    geometry = VideoGeometry(frames, HEIGHT // 2, WIDTH // 2)
    order = tile_order(frames, HEIGHT // 2, WIDTH // 2).to(DEVICE)
    q, k, v = (t.index_select(2, order) for t in video_qkv(geometry, HEADS, HEAD_DIM, seed=0, dtype=torch.bfloat16,
                                                            device=DEVICE))
    plan = lambda: nabla.plan(geometry, HEADS, q=q, k=k, threshold=threshold, window=window)  # noqa: E731
    mask = plan()
    kernel = sparsecore.compile(mask, DEVICE)
    ours = kernel(q, k, v)
    sta = nabla.window_map(geometry, window, DEVICE)[None, None]
    theirs_plan = lambda: nablaT_v2(q.transpose(1, 2), k.transpose(1, 2), sta, thr=threshold)  # noqa: E731
    block_mask = theirs_plan()
    same = torch.equal(block_mask.to_dense()[0].bool(), torch.as_tensor(mask.to_dense(), device=DEVICE))
    flex = torch.compile(flex_attention)
    theirs = lambda: flex(q, k, v, block_mask=block_mask, kernel_options={"BLOCK_M": 64, "BLOCK_N": 64})  # noqa: E731

    def dense() -> torch.Tensor:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)
    dense_out, flex_out = dense(), theirs()
    density = float(torch.as_tensor(mask.budgets).double().mean())
    common = {"density": density, "masks_equal": bool(same)}
    rows = [{"row": "sparsecore plan (nabla.plan)", **common},
            {"row": f"sparsecore kernel ({kernel.backend.name})", "rel_l2_vs_dense": rel_l2(ours, dense_out),
             "rel_l2_vs_flex": rel_l2(ours, flex_out), **common},
            {"row": "diffusers plan (nablaT_v2)", **common},
            {"row": "FlexAttention compiled, 64 x 64 tiles", "rel_l2_vs_dense": rel_l2(flex_out, dense_out), **common},
            {"row": "cuDNN dense", **common}]
    time_rows(list(zip(rows, (plan, lambda: kernel(q, k, v), theirs_plan, theirs, dense))))
    return rows


def kernel_lines(rows: list[dict]) -> list[str]:
    """The markdown rows of ``--part kernels``."""
    return [f"| {r['row']} | {r['ms']:.3f} | {r['ms_min']:.3f}-{r['ms_max']:.3f} | {r['density']:.3f} | "
            f"{r['masks_equal']} | {r.get('rel_l2_vs_dense', '')} | {r.get('rel_l2_vs_flex', '')} |" for r in rows]


def model_rows(frames: int, blocks: int, threshold: float, window: tuple[int, int, int], repeats: int,
               device: str, tiny: bool) -> list[dict]:
    """One forward of each row of ``--part model`` (module docstring), eager then compiled."""
    rows, outputs = [], {}

    def record(name: str, model, inputs: dict) -> None:
        """Time a row; its peak is over its own forwards (compiles included), from a reset at its start."""
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        try:
            seconds, outputs[name] = timed(model, inputs, device, repeats)
        except (RuntimeError, torch.OutOfMemoryError) as err:      # a compile failure or OOM: the row says which
            rows.append({"row": name, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"})
            print(f"{name}: {rows[-1]['error']}", flush=True)
            return
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
        rows.append({"row": name, "seconds": seconds, "peak_gib": peak})
        print(f"{name}: {seconds:.3f} s, peak {peak} GiB", flush=True)

    for compiled in (False, True):
        mode = "compiled" if compiled else "eager"
        torch._dynamo.reset()
        model = build(blocks, threshold, window, device, tiny)
        if compiled:
            model.compile_repeated_blocks(fullgraph=True)
        record(f"dense {mode}", model, inputs_for(model, frames, window, device, tiled=False))
        tiled = inputs_for(model, frames, window, device, tiled=True)
        if compiled and device == "cuda":    # torch 2.13's CPU inductor fails to build FlexAttention's block-sparse kernel
            model.set_attention_backend("flex")
            record("diffusers-nabla compiled", model, tiled)
            model.reset_attention_backend()
            torch._dynamo.reset()
        handle = sc_diffusers.apply(model, "nabla", device=device, num_steps=1)     # one timestep throughout
        record(f"sparsecore-nabla {mode}", model, tiled)
        if "error" not in rows[-1]:
            handle._planner.keep_masks = True     # after the timed forwards: kept masks would add to their peak
            with torch.no_grad():
                model(**tiled)
            rows[-1]["density"] = float(torch.as_tensor(handle._planner.last_mask(0).budgets).double().mean())
        handle.remove()
        del model
    dense = {row["row"].split()[-1]: row.get("seconds") for row in rows if row["row"].startswith("dense")}
    for row in rows:
        if row.get("seconds") and dense.get(row["row"].split()[-1]):
            row["speedup_vs_dense"] = dense[row["row"].split()[-1]] / row["seconds"]
    if "diffusers-nabla compiled" in outputs:
        for name in ("sparsecore-nabla eager", "sparsecore-nabla compiled"):
            if name in outputs:
                row = rows[[r["row"] for r in rows].index(name)]
                row["rel_l2_vs_diffusers_nabla"] = rel_l2(outputs[name], outputs["diffusers-nabla compiled"])
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--part", nargs="+", choices=("kernels", "model"), default=["kernels", "model"])
    parser.add_argument("--frames", type=int, default=61)
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--window", type=int, nargs=3, default=(11, 3, 3))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="--part model with a small model on the CPU (a smoke run)")
    args = parser.parse_args()
    device = "cpu" if args.tiny else "cuda"
    window = tuple(args.window)
    tokens = args.frames * HEIGHT * WIDTH // 4
    meta = run_meta(device, frames=args.frames, tokens=tokens, blocks_run=args.blocks, threshold=args.threshold,
                    window=list(window), tiny=args.tiny)
    result = {"meta": meta}
    lines = [f"# NABLA on Kandinsky 5 Video Lite's shape ({tokens:,} tokens, P = {args.threshold}, window {window})",
             "", json.dumps(meta), ""]
    if "kernels" in args.part and not args.tiny:
        result["kernels"] = kernel_rows(args.frames, args.threshold, window)
        lines += ["One layer, synthetic workload in tile order (ms: the median of 3 interleaved rounds of `do_bench` "
                  "medians, and the rounds' spread):", "",
                  "| row | ms | min-max | density | masks equal | rel L2 vs dense | rel L2 vs FlexAttention |",
                  "|---|---|---|---|---|---|---|"]
        lines += kernel_lines(result["kernels"])
        lines.append("")
    if "model" in args.part:
        result["model"] = model_rows(args.frames, args.blocks, args.threshold, window, args.repeats, device, args.tiny)
        lines += [f"{args.blocks} blocks, random weights, one forward (s):", "",
                  "| row | s | x dense | density | rel L2 vs diffusers NABLA | peak GiB | error |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['row']} | {r.get('seconds', float('nan')):.3f} | {r.get('speedup_vs_dense', float('nan')):.2f} | "
                  f"{r.get('density', '')} | {r.get('rel_l2_vs_diffusers_nabla', '')} | {r.get('peak_gib', '')} | "
                  f"{r.get('error', '')} |" for r in result["model"]]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "nabla.json").write_text(json.dumps(result, indent=1))
    (args.out / "nabla.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
