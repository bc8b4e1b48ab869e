"""Probe (GPU): what converting a mask off FA4's tile grid costs (``fa4_layout.to_fa4``), and where it goes.

``compile`` ranked Triton first for masks whose blocks sit off FA4's tiles (joint video + text masks of 64-token
blocks, PASA's approximating masks on them, STA's short edge tiles) although FA4's kernel runs them faster once
converted: those masks are new at every call, and the conversion (:func:`.fa4_layout.to_fa4`, the general path)
cost more than the kernel saved (``backends/cuda/selection.py``; joint masks that drop unlisted blocks rank fa4
first since 2026-12-04). This probe builds such masks on the GPU with the
lists on the device (as the methods do), and times the conversion (wall seconds, synchronized, median of 5 after
one warm call) with a profiler table of one call, for the conversion in this checkout and, with ``--baseline
FILE``, for another version of ``fa4_layout.py`` (loaded from FILE in this package, so it must call the helpers
of this checkout's modules as they are: a version from before the thirty-second session does not) side by side.
Each timed conversion is of a mask nothing is known of (:func:`sparsecore.ir.host_facts.as_new`), as a mask new at
each call is. With
``--kernels``, the joint masks' calls as a reuse step makes them, each compiled and converted anew (``cache=False``),
on ``fa4`` and on Triton, and each kernel compiled once, on random bf16 q, k, v (head dim 128 for HunyuanVideo
1.5's shape, 64 for CogVideoX's): medians of ``kernel_timing.median_ms``.

    python bench/fa4_conversion_probe.py --out DIR [--baseline PATH_TO_OLD_fa4_layout.py] [--kernels]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from report import run_meta  # noqa: E402

from sparsecore import BlockMask, VideoGeometry  # noqa: E402
from sparsecore.ir.host_facts import as_new  # noqa: E402
from sparsecore.backends.cuda import fa4_layout  # noqa: E402
from sparsecore.methods import sta  # noqa: E402

LEVELS = (0.1, 0.2, 0.3)
DEVICE = "cuda"


def joint_mask(heads: int, video: int, text: int, block: int, seed: int) -> BlockMask:
    """AdaSpa-shaped joint mask: video in ``block``-token blocks (a short last one), then one text block; rows keep
    a head-adaptive share of the video blocks (top-k of random scores, the diagonal kept) and the text block; the
    text row keeps everything. Lists built on the GPU."""
    offsets = np.append(np.arange(0, video, block), [video, video + text]).astype(np.int64)
    n = len(offsets) - 1
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    keep = torch.zeros(heads, n, n, dtype=torch.bool, device=DEVICE)
    for h in range(heads):
        scores = torch.rand(n - 1, n - 1, device=DEVICE, generator=gen)
        scores.diagonal().fill_(2.0)
        top = scores.topk(max(1, round(LEVELS[h % len(LEVELS)] * (n - 1))), dim=-1).indices
        keep[h, :n - 1].scatter_(1, top, True)
    keep[:, :, n - 1] = True
    keep[:, n - 1, :] = True
    counts = keep.sum(-1, dtype=torch.int32)
    indptr = torch.cat([torch.zeros(heads, 1, dtype=torch.int32, device=DEVICE), counts.cumsum(-1, dtype=torch.int32)],
                       dim=1)
    # CSR over all heads: row h's entries follow head h-1's
    starts = torch.cat([torch.zeros(1, dtype=torch.int64, device=DEVICE), counts.sum(-1).cumsum(0)[:-1].long()])
    indptr = (indptr.long() + starts[:, None]).to(torch.int32)
    indices = keep.nonzero()[:, 2].to(torch.int32)
    budgets = torch.tensor([LEVELS[h % len(LEVELS)] for h in range(heads)], dtype=torch.float64, device=DEVICE)
    return BlockMask.unchecked(heads, offsets, offsets, indptr, indices, budgets, meta={"method": "probe"})


def sta_mask() -> BlockMask:
    windows = [(4, 4, 1), (1, 3, 5), (3, 1, 5)]
    rng = np.random.default_rng(0)
    strategy = {f"0_0_{h}": windows[rng.integers(len(windows))] for h in range(12)}
    return sta.session(1, mask_strategy=strategy).plan(VideoGeometry(21, 30, 52), 12, step=0, layer=0)


def timed(convert, mask, tiles) -> dict:
    def once():
        fresh = as_new(mask)                    # nothing read of it known: a mask new at this call
        torch.cuda.synchronize()
        start = time.perf_counter()
        layout = convert(fresh, *tiles, DEVICE)
        torch.cuda.synchronize()
        return time.perf_counter() - start, layout
    once()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    seconds = [once()[0] for _ in range(5)]
    peak = torch.cuda.max_memory_allocated() - base
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        layout = once()[1]
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=15)
    return {"ms": 1e3 * statistics.median(seconds), "peak_mib": peak / 2**20, "full_tiles": layout.num_full_tiles,
            "mask_tiles": layout.num_mask_tiles, "reordered": layout.kv_order is not None, "profile": table}


def kernel_rows(name: str, mask: BlockMask, head_dim: int) -> list[dict]:
    """Per call on ``fa4`` and Triton: compiled anew (a reuse step's held mask: what its first conversion read is
    known) and compiled once."""
    import sparsecore
    from kernel_timing import median_ms
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v = (torch.randn(1, mask.num_heads, mask.q_len, head_dim, device=DEVICE, dtype=torch.bfloat16,
                           generator=gen) for _ in range(3))
    rows = []
    for backend in ("fa4", "triton"):
        once = sparsecore.compile(mask, device=DEVICE, backend=backend)
        reference = once(q, k, v)
        reference = reference[0] if isinstance(reference, tuple) else reference
        anew = median_ms(lambda: sparsecore.compile(mask, device=DEVICE, backend=backend, cache=False)(q, k, v))
        rows.append({"case": name, "backend": backend, "compiled_anew_ms": anew, "compiled_once_ms": median_ms(
            lambda: once(q, k, v)), "out_norm": float(reference.float().norm())})
        print(rows[-1], flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--baseline", type=Path)
    parser.add_argument("--kernels", action="store_true")
    args = parser.parse_args()
    converters = {"this checkout": fa4_layout.to_fa4}
    if args.baseline:
        spec = importlib.util.spec_from_file_location("sparsecore.backends.cuda.fa4_layout_baseline", args.baseline)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module                                   # its dataclass looks itself up there
        spec.loader.exec_module(module)
        converters = {"baseline": module.to_fa4, **converters}
    cases = [("HunyuanVideo 1.5 2x joint, 16 heads, 64-token blocks", lambda: joint_mask(16, 103350, 256, 64, 0),
              (64, 64), 128),
             ("CogVideoX 1.5 2x joint, 48 heads, 64-token blocks", lambda: joint_mask(48, 85680, 226, 64, 1), (64, 64),
              64),
             ("STA strategy, Wan 1.3B 480x832, 12 heads", sta_mask, (128, 128), None)]
    rows, kernels = [], []
    for name, build, tiles, head_dim in cases:
        mask = build()
        for label, convert in converters.items():
            row = {"case": name, "conversion": label, "tiles": tiles, **timed(convert, mask, tiles)}
            print(row.pop("profile"), flush=True)
            rows.append(row)
            print(row, flush=True)
        if args.kernels and head_dim is not None:
            kernels += kernel_rows(name, mask, head_dim)
        del mask
        torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    meta = run_meta()
    (args.out / "fa4-conversion-probe.json").write_text(json.dumps({"meta": meta, "rows": rows, "kernels": kernels},
                                                                   indent=1))
    lines = ["| case | conversion | ms | peak MiB | full tiles | mask tiles | keys reordered |",
             "|---|---|---:|---:|---:|---:|---|"]
    lines += [f"| {r['case']} | {r['conversion']} | {r['ms']:.2f} | {r['peak_mib']:.0f} | {r['full_tiles']} | "
              f"{r['mask_tiles']} | {r['reordered']} |" for r in rows]
    if kernels:
        lines += ["", "| case | backend | per call, compiled anew (ms) | compiled once (ms) |", "|---|---|---:|---:|"]
        lines += [f"| {r['case']} | {r['backend']} | {r['compiled_anew_ms']:.2f} | {r['compiled_once_ms']:.2f} |"
                  for r in kernels]
    (args.out / "fa4-conversion-probe.md").write_text(f"# FA4 conversion probe\n\n{meta}\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
