"""A whole 50-step search generation for STA's windows, and the strategy file it writes. Random-weight Wan 2.1 1.3B.

One transformer forward per step (bf16, batch 1, 480 x 832, 81 frames: 4 x 4 x 7 tiles of 6 x 8 x 8 tokens), 50
steps with decreasing timesteps, as a pipeline runs them: a dense generation (the model's own attention), then one
with ``handle.search_windows`` measuring every layer at steps ``--dense-steps`` .. 49 (``candidate_windows(grid,
0.15)``), whose strategy (full windows before ``--dense-steps``) is written to ``--strategy-out`` for
``bench/e2e_benchmark.py --methods sta-file --sta-strategy FILE`` (its schedule: 15 dense steps, then the file's
windows). Wall seconds of each generation, synchronized at the end.

    python bench/sta_search_generation.py --strategy-out DIR/strategy.json --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from e2e_models import Case, build_model, model_inputs, timestep_inputs, token_grid  # noqa: E402
from e2e_report import environment  # noqa: E402

from sparsecore import VideoGeometry  # noqa: E402
from sparsecore.integrations import diffusers as sparse  # noqa: E402
from sparsecore.methods import sta  # noqa: E402
from sparsecore.methods.sta_search import candidate_windows, window_density  # noqa: E402
from sparsecore.timing import synchronize  # noqa: E402

CASE = Case("wan-1.3b", "1x", 21, 60, 104, 30, 30)
NUM_STEPS = 50


def generation(model, inputs: dict) -> float:
    """Wall seconds of 50 forwards at decreasing timesteps."""
    synchronize("cuda")
    start = time.perf_counter()
    with torch.no_grad():
        for step in range(NUM_STEPS):
            model(**timestep_inputs(model, 999.0 - 999.0 * step / NUM_STEPS, "cuda", inputs), **inputs)
    synchronize("cuda")
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--strategy-out", type=Path, required=True)
    parser.add_argument("--dense-steps", type=int, default=15)
    args = parser.parse_args()
    model = build_model(CASE, False, "cuda", torch.bfloat16)
    inputs = model_inputs(model, CASE, "cuda", torch.bfloat16)
    grid = sta.tile_grid(VideoGeometry(*token_grid(model, inputs)), (6, 8, 8))
    candidates = list(candidate_windows(grid, 0.15, limit=6))
    generation(model, inputs)                                                   # warm-up: cuDNN, allocator
    row = {"case": f"{CASE.model} {CASE.label}", "grid_tiles": grid, "candidates": candidates,
           "dense_steps": args.dense_steps, "dense_generation_s": generation(model, inputs)}
    handle = sparse.apply(model, "sta", device="cuda", num_steps=NUM_STEPS)
    try:
        search = handle.search_windows(candidates, steps=range(args.dense_steps, NUM_STEPS))
        row["search_generation_s"] = generation(model, inputs)
    finally:
        handle.remove()
    args.strategy_out.parent.mkdir(parents=True, exist_ok=True)
    strategy = search.save(args.strategy_out, dense_steps=args.dense_steps)
    chosen = [w for (step, _), windows in strategy.items() if step >= args.dense_steps for w in windows]
    row["strategy_density"] = sum(window_density(grid, w) for w in chosen) / len(chosen)
    row["search_over_dense"] = row["search_generation_s"] / row["dense_generation_s"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sta-search-generation.json").write_text(json.dumps({"meta": environment("cuda"), "row": row},
                                                                    indent=1))
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
