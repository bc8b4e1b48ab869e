"""PASA's block selection on the GPU: the Triton row-wise top-k against the torch ops it replaces.

On a GPU machine:

    python bench/row_top_benchmark.py --out bench/results [--sizes 32760 188760]

For Wan 2.1 1.3B layer shapes (12 heads x 128, 64-token blocks: 1x = 512 blocks, 6x = 2,950), pooled
block scores of random q, k, PASA's default noise (Gumbel, scale 0.2) and density (0.15), it times
these calls together in interleaved rounds (``kernel_timing.interleaved_ms``: 3 rounds, each round every call once,
do_bench's median of at least 10 repeats, starting one call later each round; since 2026-12-06: one median each, one
after another, put the run-to-run spread of up to 15% into the speedup), each the median of its rounds, every round
in the json (``ms_rounds``):

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

from kernel_timing import ROUNDS, interleaved_ms, summary  # noqa: E402
from report import run_meta, write_report  # noqa: E402

from sparsecore.backends.cuda import row_top  # noqa: E402
from sparsecore.geometry import VideoGeometry  # noqa: E402
from sparsecore.methods import pasa, selection  # noqa: E402
from sparsecore.noise import GumbelNoise, head_keys  # noqa: E402

HEADS, HEAD_DIM, DENSITY, NOISE = 12, 128, 0.15, 0.2
DEVICE = "cuda"                            # the tests run the loop on CPU through Triton's interpreter
GEOMETRIES = {32760: VideoGeometry(21, 30, 52), 188760: VideoGeometry(121, 30, 52)}


def torch_top(scores: torch.Tensor, k: int, noise: GumbelNoise) -> torch.Tensor:
    noisy = scores + noise.sample(scores.shape[1], scores.shape[2])
    return torch.sort(torch.topk(noisy, k, dim=-1, sorted=False).indices, dim=-1).values.to(torch.int32)


def rows_for(tokens: int) -> list[dict]:
    geometry = GEOMETRIES[tokens]
    gen = torch.Generator(device=DEVICE).manual_seed(tokens)
    q, k = (torch.randn(1, HEADS, tokens, HEAD_DIM, device=DEVICE, dtype=torch.bfloat16, generator=gen)
            for _ in range(2))
    offsets = geometry.block_offsets(64)
    scores = pasa.pooled_scores(q, k, offsets, HEAD_DIM ** -0.5)
    keep = selection.keep_count(DENSITY, scores.shape[-1])
    noise = GumbelNoise(head_keys(range(HEADS), 0, 3, 20, DEVICE), NOISE)
    by_kernel, by_torch = row_top.run(scores, keep, noise), torch_top(scores, keep, noise)
    differ = int((by_kernel != by_torch).any(dim=-1).sum())
    kwargs = dict(step=20, layer=3, q=q, k=k)

    def plan_torch() -> object:
        find = selection._row_top
        selection._row_top = lambda scores, keep: None                  # the torch path, for comparison
        try:
            return pasa.plan(geometry, HEADS, **kwargs)
        finally:
            selection._row_top = find
    rounds = interleaved_ms({"torch": lambda: torch_top(scores, keep, noise),
                             "kernel": lambda: row_top.run(scores, keep, noise), "plan_torch": plan_torch,
                             "plan_kernel": lambda: pasa.plan(geometry, HEADS, **kwargs)})
    return [{"tokens": tokens, "blocks": scores.shape[-1], "keep": keep, "rows": HEADS * scores.shape[1],
             **{f"{name}_ms": summary(samples)["ms"] for name, samples in rounds.items()},
             "ms_rounds": rounds, "rows_differing": differ}]


def spread(rounds: list[float]) -> str:
    """A call's median round and, in brackets, the range of its rounds."""
    timed = summary(rounds)
    return f"{timed['ms']:.3f} ({timed['ms_min']:.3f}-{timed['ms_max']:.3f})"


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"# PASA's selection: Triton row-wise top-k vs torch, {meta['date']}", "",
             f"Machine: {meta['versions']['gpu']}; versions: {meta['versions']}. {HEADS} heads, 64-token blocks, "
             f"density {DENSITY}, Gumbel noise {NOISE}. `bench/row_top_benchmark.py`: the four calls of a length "
             f"timed together in {ROUNDS} interleaved rounds (`kernel_timing.interleaved_ms`); each ms the median "
             "round, in brackets the rounds' range; speedup = torch / kernel, of the medians. "
             "Selection = noise + top-k + sorted ids; plan = `pasa.plan` whole (scores, selection, CSR).", "",
             "| tokens | blocks | kept per row | selection torch (ms) | selection kernel (ms) | speedup "
             "| plan torch (ms) | plan kernel (ms) | rows differing |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rounds = r["ms_rounds"]
        lines.append(f"| {r['tokens']:,} | {r['blocks']} | {r['keep']} | {spread(rounds['torch'])} | "
                     f"{spread(rounds['kernel'])} | {r['torch_ms'] / r['kernel_ms']:.1f}x | "
                     f"{spread(rounds['plan_torch'])} | {spread(rounds['plan_kernel'])} | "
                     f"{r['rows_differing']} of {r['rows']:,} |")
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
