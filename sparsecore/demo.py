"""``sparsecore demo``: build masks for a small video-shaped input, compile, run, check, time.

The default shape (48 latent frames of 6x7 patches, 2 heads, head_dim 64: 2016
tokens; 48 frames is 2.3x Wan 2.1's 21-frame training horizon, so LVSA is sparse)
runs in seconds on a CPU. The inputs are the synthetic video-DiT-like q, k, v of
:func:`sparsecore.workloads.video_qkv`. Each mask row reports its density, the FLOPs
its computed blocks save against dense attention (a mask that approximates the blocks
it skips, PASA's, spends more on that pass: the table marks such rows), the softmax
mass it keeps (recall) and its output's relative L2 error against dense attention
without a mask (:mod:`sparsecore.quality`), the kernel's error against dense attention
under the same mask (float64; PASA's: the reference lowering, its approximation included), and
its time against dense attention without a mask (torch SDPA) on the same device. The paper methods
(LVSA, AdaSpa, PASA) run at their defaults: LVSA at step 0, AdaSpa's first search
(step 10), PASA's first sparse step (step 10 of 50).
"""

from __future__ import annotations

import functools
import json
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from sparsecore.ir import BlockMask
from sparsecore.ir.draw import MatplotlibMissing

from .check import tensor_device_problem
from .dense import masked_dense_attention, relative_error
from .geometry import VideoGeometry
from .kernel import compile
from .methods import adaspa, lvsa, pasa
from .quality import attention_fidelity
from .registry import registered_backends
from .timing import median_seconds
from .workloads import video_qkv

DEVICE_PREFERENCE = ("cuda", "npu", "cpu")
WARMUP, REPEATS = 3, 9          # untimed calls, then timed ones; the median is reported


@dataclass(frozen=True)
class DemoShape:
    frames: int = 48
    height: int = 6
    width: int = 7
    heads: int = 2
    head_dim: int = 64
    seed: int = 0

    @property
    def geometry(self) -> VideoGeometry:
        return VideoGeometry(self.frames, self.height, self.width)


@functools.lru_cache(maxsize=4)
def demo_inputs(shape: DemoShape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The demo's q, k, v: synthetic video-DiT-like float32 CPU tensors ``[1, heads, tokens, head_dim]``."""
    return video_qkv(shape.geometry, shape.heads, shape.head_dim, seed=shape.seed)


def dense_mask(shape: DemoShape) -> BlockMask:
    g = shape.geometry
    return BlockMask.full(shape.heads, g.tokens, g.tokens, g.frame_tokens, meta={"method": "dense"})


def local_frame_window(shape: DemoShape, width: int = 1) -> BlockMask:
    """Each frame attends to the frames within ``width`` of it (one block per frame)."""
    offsets = shape.geometry.frame_offsets()
    n = shape.frames
    rows = [[range(max(0, i - width), min(n, i + width + 1)) for i in range(n)]] * shape.heads
    return BlockMask.from_lists(rows, offsets, offsets, meta={"method": "local_frame_window", "width": width})


def random_blocks(shape: DemoShape, block: int = 64, density: float = 0.25) -> BlockMask:
    """Seeded random 64-token blocks, a different pattern per head, diagonal always kept."""
    rng = np.random.default_rng(shape.seed)
    tokens = shape.geometry.tokens
    n = -(-tokens // block)
    dense = rng.random((shape.heads, n, n)) < density
    dense[:, np.arange(n), np.arange(n)] = True
    return BlockMask.from_dense(dense, tokens, tokens, block,
                                meta={"method": "random_blocks", "density": density, "seed": shape.seed})


def lvsa_mask(shape: DemoShape) -> BlockMask:
    """LVSA at its defaults (W=3, 1 first frame, C=21, auto anchors) at step 0."""
    return lvsa.plan(shape.geometry, shape.heads, step=0)


def adaspa_mask(shape: DemoShape) -> BlockMask:
    """AdaSpa at its defaults (sparsity 0.8, blocks of 64, head-adaptive): the first search, step 10."""
    q, k, _ = demo_inputs(shape)
    return adaspa.plan(shape.geometry, shape.heads, step=10, q=q, k=k)


def pasa_mask(shape: DemoShape) -> BlockMask:
    """PASA at its defaults (density 0.15, blocks of 64, Gumbel bias 0.2, no profile): step 10 of 50."""
    q, k, _ = demo_inputs(shape)
    return pasa.plan(shape.geometry, shape.heads, step=10, q=q, k=k)


# name -> mask builder.
DEMO_MASKS: dict[str, Callable[[DemoShape], BlockMask]] = {
    "dense": dense_mask,
    "local-frame-window": local_frame_window,
    "random-blocks": random_blocks,
    "lvsa": lvsa_mask,
    "adaspa": adaspa_mask,
    "pasa": pasa_mask,
}


def best_device() -> str:
    """The first of cuda, npu, cpu on which some registered backend runs here."""
    for device in DEVICE_PREFERENCE:
        if any(device in b.capabilities.devices and b.unavailable_reason(device) is None
               for b in registered_backends().values()):
            return device
    raise RuntimeError("no backend runs on this machine (not even cpu); reinstall sparsecore")


def _seconds(fn: Callable[[], object], device: str) -> float:
    """Median wall time of ``fn()`` over :data:`REPEATS` calls after :data:`WARMUP` untimed ones."""
    return median_seconds(fn, device, warmup=WARMUP, repeats=REPEATS)


def _picture(mask: BlockMask, path: Path, log: Callable[[str], None], noted: list[str]) -> str | None:
    """``mask.render(path)``, or None with a one-line note (the first time) when matplotlib is missing."""
    try:
        return str(mask.render(path))
    except MatplotlibMissing as err:
        if not noted:
            noted.append(str(err))
            log(f"mask pictures skipped: {err}")
        return None


def run_demo(out_dir: Path, device: str | None = None, shape: DemoShape = DemoShape(),
             log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> list[dict]:
    """Build, compile, run, check and time every mask of :data:`DEMO_MASKS`; writes ``demo.json`` (and PNGs).

    Raises ``RuntimeError`` (one line, from :func:`sparsecore.check.tensor_device_problem`) when ``device``
    cannot run here. Times: the median of :data:`REPEATS` calls after :data:`WARMUP` untimed ones, the
    kernel's first call (choice of backend, planning; a backend slow to load is loaded in place, ``warmup="wait"``,
    not in the background while the table is timed) done before; dense SDPA is timed right after each
    kernel on the same inputs, so the ratio compares times taken under the same load.
    """
    if device is not None:
        problem = tensor_device_problem(device)
        if problem:
            raise RuntimeError(problem)
    device = device or best_device()
    dtype = torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16        # "cpu:0" too
    cpu_inputs = demo_inputs(shape)
    q, k, v = (t.to(device, dtype) for t in cpu_inputs)
    scale = shape.head_dim ** -0.5
    log(f"sparsecore demo: {shape.frames} frames x {shape.height}x{shape.width} patches = {shape.geometry.tokens} tokens, "
        f"{shape.heads} heads, head_dim {shape.head_dim}, synthetic video q/k/v, {dtype} on {device}")
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)  # noqa: E731
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, noted = [], []
    for step, (name, build) in enumerate(DEMO_MASKS.items(), 1):
        log(f"[{step}/{len(DEMO_MASKS)}] {name}: building mask")
        mask = build(shape)
        kernel = compile(mask, device=device, warmup="wait")     # the backend timed is the one the row names
        log(f"[{step}/{len(DEMO_MASKS)}] {name}: compiled with backend {kernel.backend.name}; running and checking")
        out = kernel(q, k, v, scale=scale)
        ref, _ = masked_dense_attention(mask, q, k, v, scale)
        max_err, rel_err = relative_error(out, ref)
        fidelity = attention_fidelity(*cpu_inputs, mask, scale=scale).summary()
        seconds = _seconds(lambda: kernel(q, k, v, scale=scale), device)
        dense_seconds = _seconds(sdpa, device)
        png = _picture(mask, out_dir / f"{name}.png", log, noted)
        rows.append({"mask": name, "backend": kernel.backend.name,
                     "blocks": f"{mask.num_q_blocks}x{mask.num_kv_blocks}", "density": mask.density(),
                     "flops_saved": 1 - mask.flops(shape.head_dim) / mask.dense_flops(shape.head_dim),
                     "unselected": str(mask.unselected), "recall": fidelity["recall"],
                     "dense_rel_err": fidelity["rel_l2"], "max_err": max_err, "rel_err": rel_err,
                     "ms": seconds * 1e3, "dense_sdpa_ms": dense_seconds * 1e3, "png": png})
    (out_dir / "demo.json").write_text(json.dumps({"device": device, "dtype": str(dtype), "shape": vars(shape),
                                                   "timing": {"warmup": WARMUP, "repeats": REPEATS,
                                                              "statistic": "median"},
                                                   "rows": rows}, indent=2))
    return rows


def format_table(rows: list[dict]) -> str:
    """The rows as a table, then a legend of what each column counts, wrapped to the table's width."""
    header = f"{'mask':<20}{'backend':<11}{'blocks':>8}{'density':>9}{'FLOPs saved':>13}{'recall':>8}" \
             f"{'out err':>9}{'max err':>10}{'rel err':>10}{'ms':>9}{'vs dense':>10}"
    lines = [header, "-" * len(header)]
    for r in rows:
        approximated = "*" if r["unselected"] != "drop" else " "
        lines.append(f"{r['mask']:<20}{r['backend']:<11}{r['blocks']:>8}{r['density']:>9.3f}{r['flops_saved']:>12.1%}"
                     f"{approximated}{r['recall']:>7.3f}{r['dense_rel_err']:>9.3f}{r['max_err']:>10.1e}"
                     f"{r['rel_err']:>10.1e}{r['ms']:>9.2f}{r['dense_sdpa_ms'] / r['ms']:>9.2f}x")
    legend = [
        "FLOPs saved: 1 - the computed blocks' FLOPs (4 x kept pairs x head_dim) / dense attention's. * a mask that "
        "approximates the blocks it skips (PASA's): that pass costs FLOPs not counted here.",
        "recall: dense attention's softmax mass on the computed blocks (a mask that approximates the blocks it "
        "skips adds an estimate of the rest, which recall does not count: its out err says how well it does). out "
        "err: relative L2 of the output vs dense attention without a mask (head means).",
        "max/rel err: the kernel against float64 dense attention under the same mask; * rows: against the reference "
        "lowering (float64), which approximates the skipped blocks too.",
        f"ms: the sparse kernel's call, median of {REPEATS} after {WARMUP} warm-up calls (planning excluded). "
        "vs dense: torch SDPA without a mask, timed the same way right after, / the kernel's time; at this small "
        "size fixed per-call costs weigh more than at video lengths.",
    ]
    return "\n".join(lines + [textwrap.fill(entry, len(header), subsequent_indent="  ") for entry in legend])
