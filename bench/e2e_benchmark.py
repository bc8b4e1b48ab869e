"""End-to-end benchmark of issue 6: one transformer forward per denoising step, dense vs sparsecore.

    python bench/e2e_benchmark.py --out bench/results [--models wan-1.3b wan-14b hv15] [--tiny]

Random-weight models with the real configurations (weights do not change timing),
bf16 on one GPU, batch 1 (one CFG branch), 512 text tokens:

- ``wan-1.3b``: Wan 2.1 1.3B (30 layers, 12 heads x 128, ffn 8960) at 480x832 with 21, 41,
  81, 121 latent frames (81/161/321/481 video frames: 1x, 2x, 4x, 6x the training length).
- ``wan-14b``: Wan 2.1 14B-shaped layers (40 heads x 128, ffn 13824) at 6x, run with 2 of
  its 40 layers and reported per layer and scaled to 40 (stated in the table).
- ``hv15``: HunyuanVideo 1.5-shaped (16 heads x 128, 8.3B at 54 layers) at 480p (30x53
  latent) with 33 and 65 latent frames (1x, 2x its horizon), run with 6 of 54 layers, scaled.

Per configuration: step time with dense attention (torch SDPA, default backend: cuDNN on
an H100), with LVSA and with AdaSpa through ``sparsecore.integrations.diffusers``; peak
memory; the share of the step spent in attention. LVSA steps are timed at three
consecutive sparse steps (its anchors rotate, so each step plans and compiles a new
mask); AdaSpa's mask-reuse step is the median of three steps after its search step,
which is reported too. A step that JIT-compiles a kernel config for the first time is
thus outvoted by the two after it.
``--tiny`` runs the same code on tiny configs on any device (a smoke test).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

import sparsecore
from sparsecore.integrations import diffusers as sc_diffusers

TEXT_TOKENS = 512
WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
WAN_14B = dict(WAN_1_3B, num_attention_heads=40, ffn_dim=13824, num_layers=40)
HV15 = dict(num_layers=54)


@dataclass(frozen=True)
class Case:
    model: str
    label: str           # "1x", "2x", ...
    frames: int          # latent frames
    height: int          # latent height (before patchify)
    width: int
    layers_run: int
    layers_full: int


def cases(models: list[str], tiny: bool) -> list[Case]:
    if tiny:
        return [Case("wan-1.3b", "1x", 3, 8, 8, 2, 2), Case("wan-1.3b", "6x", 13, 8, 8, 2, 2),
                Case("hv15", "2x", 9, 6, 6, 2, 2)][: 3 if "hv15" in models else 2]
    out = []
    if "wan-1.3b" in models:
        out += [Case("wan-1.3b", f"{m}x", f, 60, 104, 30, 30) for m, f in ((1, 21), (2, 41), (4, 81), (6, 121))]
    if "hv15" in models:
        out += [Case("hv15", f"{m}x", f, 30, 53, 6, 54) for m, f in ((1, 33), (2, 65))]
    if "wan-14b" in models:
        out += [Case("wan-14b", "6x", 121, 60, 104, 2, 40)]
    return out


def build_model(case: Case, tiny: bool, device: str, dtype: torch.dtype) -> torch.nn.Module:
    from diffusers import HunyuanVideo15Transformer3DModel, WanTransformer3DModel
    torch.manual_seed(0)
    with torch.device(device):
        if case.model.startswith("wan"):
            config = dict(WAN_1_3B if case.model == "wan-1.3b" else WAN_14B, num_layers=case.layers_run)
            if tiny:
                config.update(num_attention_heads=2, attention_head_dim=32, ffn_dim=128, text_dim=64, freq_dim=32)
            model = WanTransformer3DModel(**config)
        else:
            config = dict(HV15, num_layers=case.layers_run)
            if tiny:
                config.update(num_attention_heads=2, attention_head_dim=32, text_embed_dim=64, text_embed_2_dim=32,
                              image_embed_dim=32, num_refiner_layers=1, rope_axes_dim=(8, 12, 12))
            model = HunyuanVideo15Transformer3DModel(**config)
    return model.to(dtype).eval()


def model_inputs(model: torch.nn.Module, case: Case, device: str, dtype: torch.dtype) -> dict:
    """Random latents and conditions; every text/image token valid (no padding mask to honour)."""
    config = model.config
    gen = torch.Generator(device=device).manual_seed(1)
    rand = lambda *shape: torch.randn(*shape, generator=gen, device=device, dtype=dtype)  # noqa: E731
    latents = rand(1, config.in_channels, case.frames, case.height, case.width)
    if case.model.startswith("wan"):
        return dict(hidden_states=latents, encoder_hidden_states=rand(1, TEXT_TOKENS, config.text_dim),
                    return_dict=False)
    ones = lambda n: torch.ones(1, n, device=device, dtype=torch.long)  # noqa: E731
    return dict(hidden_states=latents, encoder_hidden_states=rand(1, TEXT_TOKENS, config.text_embed_dim),
                encoder_attention_mask=ones(TEXT_TOKENS), encoder_hidden_states_2=rand(1, 64, config.text_embed_2_dim),
                encoder_attention_mask_2=ones(64), image_embeds=rand(1, 729, config.image_embed_dim),
                return_dict=False)


def timed_forward(model, inputs: dict, timestep: float, device: str) -> float:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    # HunyuanVideo 1.5 embeds the timestep in the timestep's own dtype: give it the model's
    dtype = model.dtype if type(model).__name__.startswith("HunyuanVideo15") else torch.float32
    sync()
    start = time.perf_counter()
    with torch.no_grad():
        model(timestep=torch.tensor([timestep], device=device, dtype=dtype), **inputs)
    sync()
    return time.perf_counter() - start


def peak_memory_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def run_case(case: Case, tiny: bool, device: str, log: Callable[[str], None]) -> list[dict]:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = build_model(case, tiny, device, dtype)
    inputs = model_inputs(model, case, device, dtype)
    rows = []
    scale = case.layers_full / case.layers_run

    def record(method: str, seconds: list[float], attention_s: float | None, extra: dict) -> None:
        step = statistics.median(seconds)
        rows.append(dict(model=case.model, length=case.label, latent_frames=case.frames,
                         layers_run=case.layers_run, layers_full=case.layers_full, method=method,
                         step_s=step * scale, step_s_measured=step, peak_gib=peak_memory_gib(device),
                         attention_share=None if attention_s is None else attention_s / step, **extra))
        log(f"  {case.model} {case.label} {method:<16} step {step * scale:8.3f} s"
            + (f" (measured {step:.3f} s on {case.layers_run} layers)" if scale != 1 else "")
            + (f", attention {attention_s / step:5.1%}" if attention_s is not None else "")
            + (f", peak {peak_memory_gib(device):.1f} GiB" if device == "cuda" else ""))

    # dense: the model's own attention (SDPA); attention share from a standalone SDPA call at this shape
    reset_peak(device)
    try:
        timed_forward(model, inputs, 999.0, device)
        dense = [timed_forward(model, inputs, 999.0, device) for _ in range(2)]
        record("dense (SDPA)", dense, _dense_attention_seconds(model, case, device, dtype) * case.layers_run,
               {"tokens": _tokens(model, case)})
    except torch.OutOfMemoryError as err:
        rows.append(dict(model=case.model, length=case.label, method="dense (SDPA)", error=f"out of memory: {err}"))
        log(f"  {case.model} {case.label} dense: out of memory")
        torch.cuda.empty_cache()

    for method, steps, params in (("lvsa", (20, 21, 22), {}), ("adaspa", (10, 11, 12, 13), {})):
        handle = sc_diffusers.apply(model, method=method, device=device, num_steps=50, **params)
        handle.timing(True)
        reset_peak(device)
        seconds = []
        for step in steps:
            handle.set_step(step)
            seconds.append(timed_forward(model, inputs, 1000.0 - 20 * step, device))
        stats = [s for s in handle.stats() if s["step"] == steps[-1]]
        attention = sum(s.get("ms") or 0.0 for s in stats) / 1e3 if stats else None
        density = statistics.mean(s["density"] for s in stats) if stats else None
        backends = sorted({s["backend"] for s in stats})
        if method == "adaspa":   # step 10 searches (dense output); 11-13 reuse its mask (median: one may JIT-compile)
            record("adaspa search", seconds[:1], None, {"backends": ["dense output + block-mass search"]})
            record("adaspa", seconds[1:], attention, {"density": density, "backends": backends})
        else:
            record(method, seconds, attention, {"density": density, "backends": backends})
        handle.remove()
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


def _tokens(model, case: Case) -> int:
    patch = model.config.patch_size
    spatial = (patch[1] * patch[2]) if isinstance(patch, (tuple, list)) else patch * patch
    return case.frames * case.height * case.width // spatial


def _dense_attention_seconds(model, case: Case, device: str, dtype: torch.dtype) -> float:
    """Time of one dense self-attention call (SDPA) at the model's token count and heads."""
    heads, dim = model.config.num_attention_heads, model.config.attention_head_dim
    tokens = _tokens(model, case) + (0 if case.model.startswith("wan") else TEXT_TOKENS + 64 + 729)
    q, k, v = (torch.randn(1, heads, tokens, dim, device=device, dtype=dtype) for _ in range(3))
    f = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)  # noqa: E731
    f()
    if device == "cuda":
        import triton.testing
        return triton.testing.do_bench(f, warmup=25, rep=100, return_mode="median") / 1e3
    start = time.perf_counter()
    f()
    return time.perf_counter() - start


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# End-to-end transformer step, dense vs sparsecore, {meta['date']}", "",
             f"Machine: {meta['gpu']}; torch {meta['torch']}, diffusers {meta['diffusers']}, triton {meta['triton']}, "
             f"flashinfer {meta['flashinfer']}. bf16, batch 1, random weights, {TEXT_TOKENS} text tokens. "
             "Step = one transformer forward; rows measured on fewer layers are scaled to the full depth "
             "(layers run / full). Speedup against the dense row of the same model and length.", "",
             "| model | length | latent frames | tokens | method | step (s) | speedup | density | attention share | "
             "peak GiB | layers run/full | kernels |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    dense = {(r["model"], r["length"]): r for r in rows if r["method"] == "dense (SDPA)" and "step_s" in r}
    tokens = {(r["model"], r["length"]): r.get("tokens") for r in dense.values()}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['length']} | | | {r['method']} | {r['error'][:60]} | | | | | | |")
            continue
        base = dense.get((r["model"], r["length"]))
        speedup = f"{base['step_s'] / r['step_s']:.2f}x" if base else ""
        share = "" if r["attention_share"] is None else f"{r['attention_share']:.0%}"
        density = "" if r.get("density") is None else f"{r['density']:.3f}"
        peak = "" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        lines.append(f"| {r['model']} | {r['length']} | {r['latent_frames']} | {tokens.get((r['model'], r['length']), '')}"
                     f" | {r['method']} | {r['step_s']:.3f} | {speedup} | {density} | {share} | {peak} | "
                     f"{r['layers_run']}/{r['layers_full']} | {', '.join(r.get('backends', []))} |")
    return "\n".join(lines) + "\n"


def versions(device: str) -> dict:
    import diffusers
    info = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "python": platform.python_version(), "sparsecore": sparsecore.__version__,
            "gpu": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"}
    for name in ("triton", "flashinfer"):
        try:
            info[name] = __import__(name).__version__
        except ImportError as err:
            info[name] = f"not importable: {err}"
    return info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--models", nargs="*", default=["wan-1.3b", "wan-14b", "hv15"])
    parser.add_argument("--tiny", action="store_true", help="tiny configs: a smoke test on any device")
    parser.add_argument("--lengths", nargs="*", default=None, help="only these lengths, e.g. 1x 6x")
    parser.add_argument("--budget-s", type=float, default=540, help="skip remaining cases after this many seconds")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    log = lambda s: print(s, flush=True)  # noqa: E731
    meta = versions(device)
    log(json.dumps(meta))
    start, rows = time.perf_counter(), []
    for case in cases(args.models, args.tiny):
        if args.lengths and case.label not in args.lengths:
            continue
        if time.perf_counter() - start > args.budget_s:
            log(f"  skipped {case.model} {case.label}: time budget of {args.budget_s:.0f} s spent")
            continue
        log(f"{case.model} {case.label}: {case.frames} latent frames, {case.layers_run} layers")
        rows += run_case(case, args.tiny, device, log)
        args.out.mkdir(parents=True, exist_ok=True)
        stem = args.out / ("e2e-tiny" if args.tiny else f"e2e-{meta['date']}")
        stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        stem.with_suffix(".md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
