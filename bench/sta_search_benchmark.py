"""What STA's window search costs on the GPU, and a step with the strategy it finds. Random-weight transformers.

Per case, one transformer forward per step (bf16, batch 1, the model's real configuration; see ``e2e_models``):

1. ``dense``: the model's own attention (diffusers' dispatch, cuDNN SDPA), no sparsecore;
2. ``search``: ``apply(method="sta")`` and ``handle.search_windows(candidates)`` at every layer and step: the model's
   dense attention plus each candidate's STA kernel on q, k, v in tile order (the first step compiles the kernels and
   is not timed);
3. ``strategy``: the strategy the search chose over those steps (``search.save``), applied with ``mask_strategy``
   (its masks planned and compiled per call, as for FastVideo's files).

Each kind is the median of the timed steps after one warm-up step. Random weights choose windows that mean nothing for
a picture; the times and the chosen windows' density are what this measures.

Cases: Wan 2.1 14B-shaped layers at FastVideo's Wan grid (69 frames at 768 x 1280: 18 x 48 x 80 tokens, 3 x 6 x 10
tiles) with FastVideo's six Wan candidates, 2 of 40 layers run; Wan 2.1 1.3B at 480 x 832, 81 frames (21 x 30 x 52
tokens: 4 x 4 x 7 tiles, short at the far edges), all 30 layers, with ``candidate_windows(grid, 0.15)``.

    python bench/sta_search_benchmark.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from e2e_models import Case, build_model, model_inputs, token_grid  # noqa: E402
from e2e_report import environment  # noqa: E402
from e2e_timing import peak_gib, reset_peak, timed_forward  # noqa: E402

import sparsecore  # noqa: E402
from sparsecore import VideoGeometry  # noqa: E402
from sparsecore.integrations import diffusers as sparse  # noqa: E402
from sparsecore.methods import sta  # noqa: E402
from sparsecore.methods.sta_search import candidate_windows, window_density  # noqa: E402

WAN_SEARCH = [(3, 1, 10), (1, 5, 7), (3, 3, 3), (1, 6, 5), (1, 3, 10), (3, 6, 1)]   # FastVideo's Wan candidates
TILE = (6, 8, 8)
CASES = [(Case("wan-14b", "768p", 18, 96, 160, 2, 40), WAN_SEARCH),
         (Case("wan-1.3b", "1x", 21, 60, 104, 30, 30), None)]
STEPS = 4                  # forwards per kind: one warm-up, three timed


def timesteps() -> list[float]:
    return [999.0 - 250.0 * i for i in range(STEPS)]


def run_steps(model, inputs: dict) -> list[float]:
    return [timed_forward(model, inputs, t, "cuda") for t in timesteps()]


def run_case(case: Case, candidates, out: Path) -> dict:
    model = build_model(case, False, "cuda", torch.bfloat16)
    inputs = model_inputs(model, case, "cuda", torch.bfloat16)
    grid = sta.tile_grid(VideoGeometry(*token_grid(model, inputs)), TILE)
    candidates = candidates or list(candidate_windows(grid, 0.15, limit=6))
    row = {"case": f"{case.model} {case.label}", "layers_run": case.layers_run, "layers_full": case.layers_full,
           "grid_tiles": grid, "candidates": candidates,
           "candidate_density": [window_density(grid, w) for w in candidates]}
    reset_peak("cuda")
    row["dense_s"] = run_steps(model, inputs)
    row["dense_peak_gib"] = peak_gib("cuda")
    handle = sparse.apply(model, "sta", device="cuda", num_steps=STEPS, tile=TILE)
    try:
        search = handle.search_windows(candidates)
        reset_peak("cuda")
        row["search_s"] = run_steps(model, inputs)
        row["search_peak_gib"] = peak_gib("cuda")
    finally:
        handle.remove()
    path = out / f"sta-search-strategy-{case.model}.json"
    strategy = search.save(path, dense_steps=0)
    chosen = [w for windows in strategy.values() for w in windows]
    row["strategy_density"] = statistics.fmean(window_density(grid, w) for w in chosen)
    row["strategy_counts"] = {"x".join(map(str, w)): chosen.count(w) for w in sorted(set(chosen))}
    handle = sparse.apply(model, "sta", device="cuda", num_steps=STEPS, tile=TILE, mask_strategy=strategy)
    try:
        reset_peak("cuda")
        row["strategy_s"] = run_steps(model, inputs)
        row["strategy_peak_gib"] = peak_gib("cuda")
    finally:
        handle.remove()
    for kind in ("dense", "search", "strategy"):
        row[f"{kind}_median_s"] = statistics.median(row[f"{kind}_s"][1:])
    row["search_over_dense"] = row["search_median_s"] / row["dense_median_s"]
    row["dense_over_strategy"] = row["dense_median_s"] / row["strategy_median_s"]
    del model
    sparsecore.clear_cache()
    torch.cuda.empty_cache()
    return row


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# STA window search on the H200 ({meta['date']})", "", f"Versions: {meta}", "",
             "Per step (one transformer forward, median of 3 after a warm-up), layers run / in the model; random "
             "weights.", "",
             "| case | tiles | candidates | dense | search (x dense) | strategy (dense / it) | strategy density | "
             "peaks dense / search / strategy GiB |", "|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['case']} ({r['layers_run']}/{r['layers_full']} layers) | {r['grid_tiles']} | "
                     f"{len(r['candidates'])} | {r['dense_median_s']:.3f} s | {r['search_median_s']:.3f} s "
                     f"({r['search_over_dense']:.2f}x) | {r['strategy_median_s']:.3f} s "
                     f"({r['dense_over_strategy']:.2f}x) | {r['strategy_density']:.3f} | {r['dense_peak_gib']:.2f} / "
                     f"{r['search_peak_gib']:.2f} / {r['strategy_peak_gib']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp()))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    meta, rows = environment("cuda"), []
    for case, candidates in CASES:
        rows.append(run_case(case, candidates, args.out))
        print(json.dumps(rows[-1]), flush=True)
        (args.out / "sta-search.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        (args.out / "sta-search.md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
