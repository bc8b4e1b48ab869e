"""Does STA's per-head window search pay on the synthetic workload? CPU, no model: one attention layer.

FastVideo's search (``sparsecore.methods.sta_search``) keeps, per head, the candidate window whose output is nearest
to dense attention. Here it chooses on one draw of the synthetic video q, k, v (``sparsecore.workloads.video_qkv``,
whose heads are of kinds: 3D-local, same-frame, same-position-in-time, content-driven, sink) and is scored on another
draw (another seed: the same head kinds, other content), against each candidate used for every head. The grid is
FastVideo's Wan grid in tiles (3 x 6 x 10) with small tiles, and the candidates are FastVideo's six for it.

    python bench/sta_search_fidelity.py --out bench/results/DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from report import versions  # noqa: E402

import sparsecore  # noqa: E402
from sparsecore import VideoGeometry  # noqa: E402
from sparsecore.methods import sta  # noqa: E402
from sparsecore.methods.sta_search import choose_windows  # noqa: E402
from sparsecore.workloads import video_qkv  # noqa: E402

WAN_SEARCH = [(3, 1, 10), (1, 5, 7), (3, 3, 3), (1, 6, 5), (1, 3, 10), (3, 6, 1)]   # FastVideo's Wan candidates
TILE = (2, 4, 4)
GEOMETRY = VideoGeometry(frames=6, height=24, width=40)          # 3 x 6 x 10 tiles, 5,760 tokens
HEADS, HEAD_DIM = 10, 64


def attention_outputs(seed: int, masks: list[sparsecore.BlockMask]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Dense attention and each mask's output, ``[B, H, L, D]`` float32, on ``seed``'s q, k, v in tile order."""
    q, k, v = video_qkv(GEOMETRY, HEADS, HEAD_DIM, seed)
    order = sta.token_order(GEOMETRY, TILE)
    q, k, v = (order.gather(t, 2) for t in (q, k, v))
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return dense, [sparsecore.compile(mask, device="cpu")(q, k, v) for mask in masks]


def per_head_mse(out: torch.Tensor, dense: torch.Tensor) -> np.ndarray:
    return ((out.double() - dense.double()) ** 2).mean(dim=(0, 2, 3)).numpy()


def rel_l2(out: torch.Tensor, dense: torch.Tensor) -> float:
    return float((out.double() - dense.double()).norm() / dense.double().norm())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--search-seed", type=int, default=0)
    parser.add_argument("--score-seed", type=int, default=1)
    args = parser.parse_args()
    uniform = [sta.plan(GEOMETRY, HEADS, window=w, tile=TILE) for w in WAN_SEARCH]
    dense, outs = attention_outputs(args.search_seed, uniform)
    errors = np.stack([per_head_mse(out, dense) for out in outs])[None, None]        # [1, 1, C, H]
    grid = sta.tile_grid(GEOMETRY, TILE)
    chosen = choose_windows(errors, WAN_SEARCH, grid, dense_steps=0)[(0, 0)]
    searched = sta.plan(GEOMETRY, HEADS, mask_strategy={f"0_0_{h}": w for h, w in enumerate(chosen)}, tile=TILE,
                        layer=0)
    dense, outs = attention_outputs(args.score_seed, uniform + [searched])
    rows = [{"windows": f"{w[0]}x{w[1]}x{w[2]} every head", "density": m.density(), "rel_l2": rel_l2(out, dense)}
            for w, m, out in zip(WAN_SEARCH, uniform, outs)]
    rows.append({"windows": "searched per head: " + ", ".join("x".join(map(str, w)) for w in chosen),
                 "density": searched.density(), "rel_l2": rel_l2(outs[-1], dense)})
    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "machine": "CPU", "versions": versions(),
            "geometry": str(GEOMETRY), "tile": TILE, "grid": grid, "heads": HEADS, "head_dim": HEAD_DIM,
            "kinds": "video_qkv defaults, cycled over heads", "search_seed": args.search_seed,
            "score_seed": args.score_seed}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sta-search-fidelity.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# STA window search on the synthetic workload ({meta['date']}, CPU)", "",
             f"{GEOMETRY}, tiles {TILE} ({grid[0]} x {grid[1]} x {grid[2]}), {HEADS} heads x {HEAD_DIM}; chosen on "
             f"seed {args.search_seed}, scored on seed {args.score_seed} (rel L2 of the output against dense "
             f"attention, all heads). Versions: {meta['versions']}.", "",
             "| windows | density | rel L2 |", "|---|---:|---:|"]
    lines += [f"| {r['windows']} | {r['density']:.3f} | {r['rel_l2']:.4f} |" for r in rows]
    (args.out / "sta-search-fidelity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
