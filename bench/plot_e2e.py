"""Plot transformer step time vs video length (dense vs each method) from an e2e-<date>.json.

    python bench/plot_e2e.py bench/results/e2e-2026-12-01_ninth.json [model] [mode]   # writes the .png beside it
"""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def step_seconds(row: dict) -> float:
    """A row's step as the e2e table's speedup reads it: the sparse step, else the reuse step, else the dense one."""
    steps = row["steps"]
    return steps.get("sparse", steps.get("reuse", steps["dense"]))


def main(path: Path, model: str = "wan-1.3b", mode: str = "compiled") -> Path:
    data = json.loads(path.read_text())
    rows = [r for r in data["rows"] if r["model"] == model and r.get("mode") == mode and "steps" in r]
    if not rows:
        found = sorted({(r["model"], r.get("mode")) for r in data["rows"] if "steps" in r})
        raise SystemExit(f"{path}: no timed rows of model {model!r} in mode {mode!r}; it has {found}")
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method in dict.fromkeys(r["method"] for r in rows):
        points = sorted((int(r["length"].rstrip("x")), step_seconds(r)) for r in rows if r["method"] == method)
        ax.plot(*zip(*points), marker="o", label=method)
        for x, y in points:
            ax.annotate(f"{y:.2f}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("video length (x Wan 2.1's 81 frames; latent frames 21, 41, 81, 121)")
    ax.set_ylabel("transformer step (s)")
    ax.set_title(f"{model}, one step ({mode}), bf16, {data['meta']['gpu']}, {data['meta']['date']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    return out


if __name__ == "__main__":
    print(main(Path(sys.argv[1]), *sys.argv[2:4]))
