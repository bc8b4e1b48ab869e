"""Plot eff TFLOP/s vs density per kernel from a cuda-<date>.json written by cuda_benchmark.py.

    python bench/plot_cuda.py bench/results/cuda-2026-11-22.json   # writes the .png beside it
"""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(path: Path) -> Path:
    data = json.loads(path.read_text())
    rows = [r for r in data["rows"] if r["case"].startswith("random")]
    sizes = sorted({r["seq_len"] for r in rows})
    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4.2), sharey=True, squeeze=False)
    for ax, size in zip(axes[0], sizes):
        dense = next(r for r in data["rows"] if r["case"] == "dense" and r["seq_len"] == size)
        ax.axhline(dense["eff_tflops"], color="black", linestyle="--", label=f"cuDNN dense ({dense['eff_tflops']:.0f})")
        for kernel in sorted({r["kernel"] for r in rows if r["seq_len"] == size}):
            points = sorted((r["density"], r["eff_tflops"]) for r in rows if r["seq_len"] == size and r["kernel"] == kernel)
            ax.plot(*zip(*points), marker="o", label=kernel)
        ax.set_title(f"S = {size}, bf16, H=12, D=128")
        ax.set_xlabel("density (fraction of token pairs kept)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("effective TFLOP/s")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Block-sparse attention on {data['meta']['versions']['gpu']}, {data['meta']['date']}")
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    return out


if __name__ == "__main__":
    print(main(Path(sys.argv[1])))
