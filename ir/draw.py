"""Pictures of a :class:`BlockMask` for a person: a text map and a PNG.

The PNG needs matplotlib, an optional dependency (``pip install matplotlib``): without
it :func:`render_png` raises :class:`MatplotlibMissing` (an ``ImportError``) saying so, and
the command line skips pictures with a one-line note. Work is bounded whatever the file
claims: at most :data:`MAX_HEADS` heads are drawn, and a block map with more than
:data:`MAX_CELLS` blocks is sampled on a grid of :data:`PIXELS` token-scaled pixels per
side instead of drawn block by block.
"""

from __future__ import annotations

import numbers
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .validation import as_path

if TYPE_CHECKING:
    from .block_mask import BlockMask

MAX_HEADS = 64          # panels in one picture
MAX_CELLS = 1 << 16     # blocks per head drawn as quads (token-scaled); larger maps are sampled
PIXELS = 512            # pixels per side of a sampled map
TITLE_POINTS = 10       # font size of the figure's title
MAX_ASPECT = 4          # a map whose one side is longer than this many times the other is stretched, not to scale
INSTALL_MATPLOTLIB = "pip install matplotlib (or, in a sparsecore checkout, pip install '.[viz]')"


class MatplotlibMissing(ImportError):
    """``render()`` was asked for a picture and matplotlib is not installed."""


def block_map_text(mask: "BlockMask", max_blocks: int) -> str:
    """One block map per head, ``#`` for a kept block and ``.`` for a skipped one."""
    if max(mask.num_q_blocks, mask.num_kv_blocks) > max_blocks:
        return (f"{mask!r}\n(block map {mask.num_q_blocks}x{mask.num_kv_blocks} is larger than "
                f"max_blocks={max_blocks}; use render() for a picture)")
    dense, density = mask.to_dense(), mask.density(per_head=True)
    lines = [repr(mask)]
    for h in range(mask.num_heads):
        lines.append(f"head {h}  (budget {mask.budgets[h]:.3f}, density {density[h]:.3f})")
        lines.extend("  " + "".join("#" if kept else "." for kept in row) for row in dense[h])
    return "\n".join(lines)


def matplotlib_pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend, or :class:`MatplotlibMissing` saying what to install."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise MatplotlibMissing(f"render() needs matplotlib ({err}); install it with: {INSTALL_MATPLOTLIB}") from None
    return plt


def _heads(mask: "BlockMask", heads: Sequence[int] | None) -> list[int]:
    if heads is None:
        return list(range(min(mask.num_heads, 16)))
    if isinstance(heads, np.ndarray) and heads.ndim == 1:
        heads = heads.tolist()
    if isinstance(heads, (str, bytes)) or not isinstance(heads, Sequence):
        raise TypeError(f"heads: expected a sequence of head indices or None, got {type(heads).__name__}")
    if not 1 <= len(heads) <= MAX_HEADS:
        raise ValueError(f"heads: expected 1 to {MAX_HEADS} heads to draw, got {len(heads)}")
    chosen = list(heads)
    for h in chosen:
        if isinstance(h, bool) or not isinstance(h, numbers.Integral):
            raise TypeError(f"heads: expected int head indices, got {type(h).__name__} {h!r}")
        if not 0 <= h < mask.num_heads:
            raise ValueError(f"heads: expected indices in 0..{mask.num_heads - 1}, got {h}")
    return [int(h) for h in chosen]


def _sampled_map(mask: "BlockMask", head: int) -> np.ndarray:
    """Kept (1) or not (0) at ``PIXELS`` x ``PIXELS`` token positions spread over the map (bounded work)."""
    q_tokens = np.linspace(0, mask.q_len - 1, min(PIXELS, mask.q_len)).astype(np.int64)
    kv_tokens = np.linspace(0, mask.kv_len - 1, min(PIXELS, mask.kv_len)).astype(np.int64)
    rows = np.searchsorted(mask.q_offsets, q_tokens, side="right") - 1
    cols = np.searchsorted(mask.kv_offsets, kv_tokens, side="right") - 1
    image = np.zeros((len(rows), len(cols)), dtype=np.float32)
    for r, i in enumerate(rows):
        row = np.asarray(mask.row(head, int(i)))
        if row.size:
            found = np.searchsorted(row, cols).clip(max=row.size - 1)
            image[r] = row[found] == cols
    return image


def png_path(path: Any) -> Path:
    """``path`` as a Path, checked to name a PNG file (``ValueError`` naming it otherwise)."""
    path = as_path(path)
    if path.suffix.lower() != ".png" or path.is_dir():
        raise ValueError(f"path: expected a file name ending in .png (the picture is a PNG), got {str(path)[:200]!r}"
                         f"{' (a folder)' if path.is_dir() else ''}; pass e.g. "
                         f"{str(path.with_suffix('.png') if path.name else path / 'mask.png')[:200]!r}")
    return path


def render_png(mask: "BlockMask", path: Any, heads: Sequence[int] | None) -> Path:
    """Draw each selected head's block map in a grid, drawn to token scale (stretched where one side is more than
    :data:`MAX_ASPECT` times the other, e.g. a ring shard's few queries against every key)."""
    path = png_path(path)
    heads = _heads(mask, heads)
    plt = matplotlib_pyplot()
    cols = min(len(heads), 4)
    rows = -(-len(heads) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    try:                       # pyplot keeps every figure until it is closed: a failed save must not leave one open
        _draw_heads(fig, axes, mask, heads)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110, format="png")
    finally:
        plt.close(fig)
    return path


def _draw_heads(fig: Any, axes: np.ndarray, mask: "BlockMask", heads: list[int]) -> None:
    """Each head's block map on its axes (to token scale), and the figure's titles."""
    sampled = mask.num_q_blocks * mask.num_kv_blocks > MAX_CELLS
    shown = None if sampled else mask.select_heads(heads)
    dense = None if sampled else shown.to_dense()
    density = mask.density(per_head=True)
    for ax in axes.ravel():
        ax.axis("off")
    for n, (ax, h) in enumerate(zip(axes.ravel(), heads)):
        if sampled:
            ax.imshow(_sampled_map(mask, h), cmap="Blues", vmin=0, vmax=1.25, interpolation="nearest",
                      extent=(0, mask.kv_len, mask.q_len, 0))
        else:
            # pcolormesh on the offsets draws each block at its token extent (frame or text blocks differ in size).
            ax.pcolormesh(mask.kv_offsets, mask.q_offsets, dense[n].astype(np.float32), cmap="Blues", vmin=0,
                          vmax=1.25)
        ax.set_xlim(0, mask.kv_len)
        ax.set_ylim(mask.q_len, 0)
        # to token scale, unless one side is so much longer that the map would be a line no block shows on
        ax.set_aspect("equal" if max(mask.q_len, mask.kv_len) <= MAX_ASPECT * min(mask.q_len, mask.kv_len) else "auto")
        ax.set_title(f"head {h}: density {density[h]:.3f}", fontsize=9)
        ax.axis("on")
        ax.tick_params(labelsize=7)
    method = mask.meta.get("method", "mask")
    note = f" (sampled on {PIXELS}x{PIXELS} tokens)" if sampled else ""
    title = (f"{str(method)[:40]}: {mask.num_q_blocks}x{mask.num_kv_blocks} blocks, q_len {mask.q_len}, "
             f"kv_len {mask.kv_len}, density {mask.density():.3f}{note}")
    _fitted_title(fig, title)
    fig.supxlabel("key token")
    fig.supylabel("query token")
    fig.tight_layout()


def _fitted_title(fig: Any, title: str) -> None:
    """Set the figure's title, broken into lines no wider than the figure, as measured in its font.

    One or two panels (3.2 inches each) are narrower than the title, which matplotlib would cut at both
    edges; the caller's ``tight_layout`` then makes room for every line.
    """
    text = fig.suptitle(title, fontsize=TITLE_POINTS)
    renderer = fig.canvas.get_renderer()
    room, per_line = 0.96 * fig.bbox.width, len(title)
    while per_line > 8:              # 8 of the widest characters fit one panel: at most len(title) rounds
        drawn = text.get_window_extent(renderer).width
        if drawn <= room:
            return
        per_line = min(per_line - 1, int(per_line * room / drawn))      # characters per line, scaled to the room
        text.set_text(textwrap.fill(title, per_line))
