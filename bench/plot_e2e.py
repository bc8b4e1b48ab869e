"""Plot transformer step time vs video length (dense vs each method) from an e2e-<date>.json.

    python bench/plot_e2e.py bench/results/e2e-2026-11-22.json   # writes the .png beside it
"""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(path: Path, model: str = "wan-1.3b") -> Path:
    data = json.loads(path.read_text())
    rows = [r for r in data["rows"] if r["model"] == model and "step_s" in r and r["method"] != "adaspa search"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method in dict.fromkeys(r["method"] for r in rows):
        points = sorted((int(r["length"].rstrip("x")), r["step_s"]) for r in rows if r["method"] == method)
        ax.plot(*zip(*points), marker="o", label=method)
        for x, y in points:
            ax.annotate(f"{y:.2f}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("video length (x Wan 2.1's 81 frames; latent frames 21, 41, 81, 121)")
    ax.set_ylabel("transformer step (s)")
    ax.set_title(f"Wan 2.1 1.3B, one step, bf16, {data['meta']['gpu']}, {data['meta']['date']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    return out


if __name__ == "__main__":
    print(main(Path(sys.argv[1])))
