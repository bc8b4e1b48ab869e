"""Where a per-head STA strategy's step time goes, one layer on the GPU (Wan 2.1 1.3B at 480 x 832, 81 frames).

A strategy gives each (step, layer) its own per-head windows; until the twenty-eighth session the diffusers
integration planned and compiled each call's mask. Per layer, wall seconds (synchronized) of: the session's plan
(host), ``sparsecore.compile`` of it, its first call, and ``do_bench`` medians of a later call, of one window's
mask on every head, of the mask with the token order's gathers and scatter (the integration's path until then), and
of the same heads run as one kernel per distinct window on the heads that have it, from and to the model's layout
(``HeadGroupKernel.attend``: each window's one-head mask compiled once, the heads sorted by window in the order's
gather; the integration's path since the twenty-eighth session).

    python bench/sta_strategy_probe.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from kernel_timing import median_ms, rel_l2, wall_seconds  # noqa: E402
from report import run_meta  # noqa: E402

import sparsecore  # noqa: E402
from sparsecore import VideoGeometry  # noqa: E402
from sparsecore.integrations.diffusers.head_groups import HeadGroupKernel  # noqa: E402
from sparsecore.methods import sta  # noqa: E402

GEOMETRY = VideoGeometry(21, 30, 52)
HEADS, HEAD_DIM, LAYERS = 12, 128, 6
WINDOWS = [(4, 4, 1), (1, 3, 5), (3, 1, 5)]           # the search's candidates on this grid (4 x 4 x 7 tiles)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    strategy = {f"0_{layer}_{h}": WINDOWS[rng.integers(len(WINDOWS))] for layer in range(LAYERS)
                for h in range(HEADS)}
    session = sta.session(1, mask_strategy=strategy)
    model = [torch.randn(1, GEOMETRY.tokens, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16,
                         generator=torch.Generator("cuda").manual_seed(i)) for i in range(3)]     # [B, S, H, D]
    order = sta.token_order(GEOMETRY)
    q, k, v = (order.gather(t.transpose(1, 2), 2) for t in model)                  # [B, H, L, D] in tile order
    uniform = sparsecore.compile(sta.plan(GEOMETRY, HEADS, window=WINDOWS[1]), device="cuda")
    uniform(q, k, v)
    rows = []
    for layer in range(LAYERS):
        plan_s, mask = wall_seconds(lambda: session.plan(GEOMETRY, HEADS, step=0, layer=layer))
        compile_s, kernel = wall_seconds(lambda: sparsecore.compile(mask, device="cuda", cache=False))
        first_s, out = wall_seconds(lambda: kernel(q, k, v))
        grouped = grouped_runner(session, layer)

        def whole():        # the multi-head kernel as the integration ran it: gathers into the order, scatter back
            return order.scatter(kernel(*(order.gather(t.transpose(1, 2), 2) for t in model)), 2).transpose(1, 2)

        rows.append({"layer": layer, "plan_ms": plan_s * 1e3, "compile_ms": compile_s * 1e3,
                     "first_call_ms": first_s * 1e3, "call_ms": median_ms(lambda: kernel(q, k, v)),
                     "uniform_ms": median_ms(lambda: uniform(q, k, v)), "whole_with_order_ms": median_ms(whole),
                     "grouped_with_order_ms": median_ms(lambda: grouped.attend(*model, order)),
                     "grouped_rel_l2": rel_l2(grouped.attend(*model, order), whole())})
        print(json.dumps(rows[-1]), flush=True)
    summary = {key: statistics.median(r[key] for r in rows[1:]) for key in rows[0] if key != "layer"}
    summary["grouped_rel_l2"] = max(r["grouped_rel_l2"] for r in rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sta-strategy-probe.json").write_text(json.dumps({"meta": run_meta(), "rows": rows,
                                                                  "median_after_first": summary}, indent=1))
    print(json.dumps(summary))
    return 0


KERNELS: dict = {}


def grouped_runner(session, layer: int) -> HeadGroupKernel:
    """The diffusers integration's run of a strategy: one kernel per window on its heads, each compiled once."""
    parts = []
    whole = session.plan(GEOMETRY, HEADS, step=0, layer=layer)
    for mask, members in session.head_groups(GEOMETRY, whole):
        if id(mask) not in KERNELS:
            KERNELS[id(mask)] = (mask, sparsecore.compile(mask, device="cuda"))
        parts.append((KERNELS[id(mask)][1], members))
    return HeadGroupKernel(whole, parts)


if __name__ == "__main__":
    raise SystemExit(main())
