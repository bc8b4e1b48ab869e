"""Pictures of a :class:`BlockMask` for a person: a text map and a PNG."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    from .block_mask import BlockMask


def block_map_text(mask: "BlockMask", max_blocks: int) -> str:
    """One block map per head, ``#`` for a kept block and ``.`` for a skipped one."""
    if max(mask.num_q_blocks, mask.num_kv_blocks) > max_blocks:
        return (f"{mask!r}\n(block map {mask.num_q_blocks}x{mask.num_kv_blocks} is larger than "
                f"max_blocks={max_blocks}; use render() for a picture)")
    dense = mask.to_dense()
    lines = [repr(mask)]
    for h in range(mask.num_heads):
        lines.append(f"head {h}  (budget {mask.budgets[h]:.3f}, density {mask.density(per_head=True)[h]:.3f})")
        lines.extend("  " + "".join("#" if kept else "." for kept in row) for row in dense[h])
    return "\n".join(lines)


def render_png(mask: "BlockMask", path: Path, heads: Sequence[int] | None) -> Path:
    """Draw each selected head's block map in a grid, drawn to token scale."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise RuntimeError(f"render() needs matplotlib ({err}); install it with: pip install 'sparsecore[viz]'") from None
    heads = list(range(min(mask.num_heads, 16))) if heads is None else list(heads)
    cols = min(len(heads), 4)
    rows = -(-len(heads) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    dense = mask.to_dense()
    density = mask.density(per_head=True)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, h in zip(axes.ravel(), heads):
        # pcolormesh on the offsets draws each block at its token extent (frame or text blocks differ in size).
        ax.pcolormesh(mask.kv_offsets, mask.q_offsets, dense[h].astype(np.float32), cmap="Blues", vmin=0, vmax=1.25)
        ax.set_xlim(0, mask.kv_len)
        ax.set_ylim(mask.q_len, 0)
        ax.set_aspect("equal")
        ax.set_title(f"head {h}: density {density[h]:.3f}", fontsize=9)
        ax.axis("on")
        ax.tick_params(labelsize=7)
    method = mask.meta.get("method", "mask")
    fig.suptitle(f"{method}: {mask.num_q_blocks}x{mask.num_kv_blocks} blocks, q_len {mask.q_len}, "
                 f"kv_len {mask.kv_len}, density {mask.density():.3f}", fontsize=10)
    fig.supxlabel("key token")
    fig.supylabel("query token")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
