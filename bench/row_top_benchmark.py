"""PASA's block selection on the GPU: the Triton row-wise top-k against the torch ops it replaces.

On a GPU machine:

    python bench/row_top_benchmark.py --out bench/results [--sizes 32760 188760]

For Wan 2.1 1.3B layer shapes (12 heads x 128, 64-token blocks: 1x = 512 blocks, 6x = 2,950), pooled
block scores of random q, k, PASA's default noise (Gumbel, scale 0.2) and density (0.15), it times
with ``kernel_timing.median_ms`` (do_bench's median of at least 10 repeats):

- ``torch``: the noise map (:meth:`GumbelNoise.sample`), ``topk``, the sort of the kept ids;
- ``kernel``: :func:`sparsecore.backends.cuda.row_top.run`, the same selection in one kernel;
- ``plan``: ``pasa.plan`` whole (scores, selection, the CSR), through the kernel and through torch;

and counts the rows whose kept set differs between the two (the kernel's ``log`` may round the noise
differently in the last bit: a swap needs two entries within that rounding at the k-th value).
Writes ``row-top-<date>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent.parent))

from kernel_timing import median_ms  # noqa: E402
from report import run_meta, write_report  # noqa: E402

from sparsecore.backends.cuda import row_top  # noqa: E402
from sparsecore.geometry import VideoGeometry  # noqa: E402
from sparsecore.methods import pasa, selection  # noqa: E402
from sparsecore.noise import GumbelNoise, head_keys  # noqa: E402

HEADS, HEAD_DIM, DENSITY, NOISE = 12, 128, 0.15, 0.2
GEOMETRIES = {32760: VideoGeometry(21, 30, 52), 188760: VideoGeometry(121, 30, 52)}


def torch_top(scores: torch.Tensor, k: int, noise: GumbelNoise) -> torch.Tensor:
    noisy = scores + noise.sample(scores.shape[1], scores.shape[2])
    return torch.sort(torch.topk(noisy, k, dim=-1, sorted=False).indices, dim=-1).values.to(torch.int32)


def rows_for(tokens: int) -> list[dict]:
    geometry = GEOMETRIES[tokens]
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    q, k = (torch.randn(1, HEADS, tokens, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
            for _ in range(2))
    offsets = geometry.block_offsets(64)
    scores = pasa.pooled_scores(q, k, offsets, HEAD_DIM ** -0.5)
    keep = selection.keep_count(DENSITY, scores.shape[-1])
    noise = GumbelNoise(head_keys(range(HEADS), 0, 3, 20, "cuda"), NOISE)
    by_kernel, by_torch = row_top.run(scores, keep, noise), torch_top(scores, keep, noise)
    differ = int((by_kernel != by_torch).any(dim=-1).sum())
    kwargs = dict(step=20, layer=3, q=q, k=k)
    plan_kernel = median_ms(lambda: pasa.plan(geometry, HEADS, **kwargs))
    find = selection._row_top
    selection._row_top = lambda scores, keep: None                      # the torch path, for comparison
    try:
        plan_torch = median_ms(lambda: pasa.plan(geometry, HEADS, **kwargs))
    finally:
        selection._row_top = find
    return [{"tokens": tokens, "blocks": scores.shape[-1], "keep": keep, "rows": HEADS * scores.shape[1],
             "torch_ms": median_ms(lambda: torch_top(scores, keep, noise)),
             "kernel_ms": median_ms(lambda: row_top.run(scores, keep, noise)),
             "plan_torch_ms": plan_torch, "plan_kernel_ms": plan_kernel, "rows_differing": differ}]


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"# PASA's selection: Triton row-wise top-k vs torch, {meta['date']}", "",
             f"Machine: {meta['versions']['gpu']}; versions: {meta['versions']}. 12 heads, 64-token blocks, "
             f"density {DENSITY}, Gumbel noise {NOISE}. `bench/row_top_benchmark.py`; `kernel_timing.median_ms`. "
             "Selection = noise + top-k + sorted ids; plan = `pasa.plan` whole (scores, selection, CSR).", "",
             "| tokens | blocks | kept per row | selection torch (ms) | selection kernel (ms) | speedup "
             "| plan torch (ms) | plan kernel (ms) | rows differing |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['tokens']:,} | {r['blocks']} | {r['keep']} | {r['torch_ms']:.3f} | {r['kernel_ms']:.3f} "
                     f"| {r['torch_ms'] / r['kernel_ms']:.1f}x | {r['plan_torch_ms']:.3f} | {r['plan_kernel_ms']:.3f} "
                     f"| {r['rows_differing']} of {r['rows']:,} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--sizes", type=int, nargs="+", default=sorted(GEOMETRIES), choices=sorted(GEOMETRIES))
    args = parser.parse_args(argv)
    rows = [row for tokens in args.sizes for row in rows_for(tokens)]
    meta = run_meta(host=platform.node())
    table = markdown(meta, rows)
    write_report(args.out / f"row-top-{meta['date']}", meta, rows, table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
