"""Probe (GPU): text padding as kernels see it, on the masks AdaSpa plans for HunyuanVideo 1.5 with a short prompt.

``hv15-t2v`` at 2x (``bench/e2e_benchmark.py``'s case: 1,835 of its 1,985 text slots are padding): AdaSpa runs its dense
step that keeps the LSE and its first search, then each kept layer's mask (its valid tokens) is padded to the
sequence two ways and timed on ``fa4`` and ``triton`` (compiled once, ``kernel_timing.median_ms``, random bf16 q, k, v):

- ``one block``: one unlisted block over the padding, as the planner padded masks before 2026-12-04 (``compile``
  classed such masks as mixed sizes, and Triton tiled them 128 wide, the padding block being over 64 tokens);
- ``padding blocks``: :meth:`sparsecore.BlockMask.with_padding`, blocks of 64 like the mask's.

    python bench/padding_probe.py --out DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from kernel_timing import median_ms  # noqa: E402

import sparsecore  # noqa: E402
from sparsecore.backends.cuda.selection import block_class  # noqa: E402
from sparsecore.integrations import diffusers as sc_diffusers  # noqa: E402
from e2e_models import build_model, cases, model_inputs  # noqa: E402
from e2e_timing import timed_forward  # noqa: E402
from report import probe_main  # noqa: E402

LAYERS = (0, 3, 5)
STEPS = (9, 10)                    # AdaSpa's dense step that keeps its LSE, then its first search
ORDER = [("one block", "fa4"), ("padding blocks", "fa4"), ("padding blocks", "fa4"), ("one block", "fa4"),
         ("padding blocks", "triton"), ("one block", "triton")]


def one_block(mask: sparsecore.BlockMask, length: int) -> sparsecore.BlockMask:
    """``mask`` extended to ``length`` by one unlisted block (the padding as it was before ``with_padding``)."""
    indptr = np.concatenate([mask.indptr, mask.indptr[:, -1:]], axis=1)
    return sparsecore.BlockMask(mask.num_heads, np.append(mask.q_offsets, length), np.append(mask.kv_offsets, length),
                                indptr, mask.indices, mask.budgets, mask.meta)


def measure() -> list[dict]:
    case = next(c for c in cases(["hv15-t2v"], tiny=False) if c.label == "2x")
    model = build_model(case, False, "cuda", torch.bfloat16)
    inputs = model_inputs(model, case, "cuda", torch.bfloat16)
    handle = sc_diffusers.apply(model, method="adaspa", device="cuda", num_steps=50)
    try:
        for step in STEPS:
            handle.set_step(step)
            print(f"step {step}: {timed_forward(model, inputs, 1000.0 - 19 * step, 'cuda'):.1f} s", flush=True)
        masks = {layer: handle.mask(layer).to_host() for layer in LAYERS}
        length = handle.stats()[0]["tokens"] + handle.stats()[0]["padding"]
    finally:
        handle.remove()
    heads, dim = model.config.num_attention_heads, model.config.attention_head_dim
    del model, inputs
    torch.cuda.empty_cache()
    q, k, v = (torch.randn(1, heads, length, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    rows = []
    for layer, mask in masks.items():
        padded = {"one block": one_block(mask, length), "padding blocks": mask.with_padding(length)}
        kernels = {(padding, backend): sparsecore.compile(m, device="cuda", backend=backend, cache=False)
                   for padding, m in padded.items() for backend in ("fa4", "triton")}
        times = {key: [] for key in kernels}
        for key in ORDER:                            # alternating, fa4 before Triton's long calls heat the GPU
            times[key].append(median_ms(lambda kernel=kernels[key]: kernel(q, k, v)))
        for (padding, backend), ms in times.items():
            rows.append({"layer": layer, "padding": padding, "backend": backend,
                         "class": block_class(padded[padding]),
                         "default": sparsecore.compile(padded[padding], device="cuda", cache=False).backend.name,
                         "tokens": length, "valid": mask.q_len, "density": round(float(mask.density()), 3),
                         "ms": [round(t, 2) for t in ms]})
            print(rows[-1], flush=True)
    return rows


def markdown(meta: dict, rows: list[dict]) -> str:
    versions = ", ".join(f"{name} {value}" for name, value in meta["versions"].items())
    lines = [f"# Text padding on the kernels: AdaSpa's masks, HunyuanVideo 1.5 t2v at 2x, {meta['date']}", "",
             f"{versions}. `bench/padding_probe.py`: bf16, {rows[0]['tokens']:,} tokens of which {rows[0]['valid']:,} "
             f"valid, median_ms (ms; fa4 twice each, alternating, in the order one block, padding blocks, "
             f"padding blocks, one block; then Triton).", "",
             "| layer | density | padding | class | default | fa4 | triton |", "|---|---|---|---|---|---|---|"]
    for fa4 in rows:
        tri = next(r for r in rows if r["backend"] == "triton" and (r["layer"], r["padding"]) ==
                   (fa4["layer"], fa4["padding"]))
        if fa4["backend"] == "fa4":
            lines.append(f"| {fa4['layer']} | {fa4['density']} | {fa4['padding']} | {fa4['class']} | "
                         f"{fa4['default']} | {' / '.join(map(str, fa4['ms']))} | {' / '.join(map(str, tri['ms']))} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(probe_main(__doc__, "padding-probe", measure, markdown))
