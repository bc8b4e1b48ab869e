"""Pictures of a :class:`BlockMask` for a person: a text map and a PNG.

The PNG needs matplotlib, an optional dependency (``pip install matplotlib``): without
it :func:`render_png` raises :class:`MatplotlibMissing` (an ``ImportError``) saying so, and
the command line skips pictures with a one-line note. At most :data:`MAX_HEADS` heads are
drawn. Each head's map is reduced to its panel's screen pixels (at most :data:`PIXELS` a side),
never drawn block by block (a block narrower than a pixel would vanish): each pixel covers a
range of query and key tokens, and its shade is the share of that range's token pairs kept (every
kept block counts, however narrow); a pixel that keeps any pair is drawn at least at
:data:`MIN_SHADE`, so a lone kept block stays visible. Work follows the lists and the picture.
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
PIXELS = 512            # most pixels per side of a panel's map
DPI = 110               # the PNG's pixels per inch
MIN_SHADE = 0.3         # least shade of a pixel that keeps anything (the colour scale runs 0 to 1.25)
CHUNK = 1 << 16         # list entries reduced at once (16 terms each)
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


def _pixel_edges(length: int, pixels: int) -> np.ndarray:
    """Token edges of ``min(pixels, length)`` pixels over ``length`` tokens: pixel p covers [p*L//n, (p+1)*L//n)."""
    n = min(pixels, length)
    return np.arange(n + 1, dtype=np.int64) * length // n


def _spans(offsets: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where each block falls on the pixels, as 4 (pixel, weight) terms per block: its tokens in the first and the
    last pixel it touches, then +1 and -1 marking (as differences, summed later) the pixels it covers whole."""
    start, end = offsets[:-1].astype(np.int64), offsets[1:].astype(np.int64)
    first = np.searchsorted(edges, start, side="right") - 1
    last = np.searchsorted(edges, end - 1, side="right") - 1
    one = first == last
    whole = (~one).astype(np.float64)
    at = np.stack([first, last, first + 1, last], axis=1)
    weight = np.stack([np.where(one, end - start, edges[first + 1] - start), np.where(one, 0, end - edges[last]),
                       whole, -whole], axis=1).astype(np.float64)
    return at, weight


def _pixel_maps(mask: "BlockMask", heads: Sequence[int], pixels: tuple[int, int]):
    """For each head, the share of kept token pairs under each pixel of a map of at most ``pixels`` (rows, columns).

    Exact (integer token counts in float64): each pixel's kept area is summed from the CSR lists in chunks of
    :data:`CHUNK` entries (16 terms each: a block's partial first and last pixels, and difference marks for the
    pixels it covers whole), so work and memory follow the lists and the picture, never the dense block map.
    """
    rows, cols = _pixel_edges(mask.q_len, pixels[0]), _pixel_edges(mask.kv_len, pixels[1])
    height, width = np.diff(rows).astype(np.float64), np.diff(cols).astype(np.float64)
    q_at, q_weight = _spans(np.asarray(mask.q_offsets), rows)
    kv_at, kv_weight = _spans(np.asarray(mask.kv_offsets), cols)
    r1, c1 = len(rows), len(cols)                       # one spare row and column for the difference marks
    kind = ((np.arange(4) >= 2)[:, None] * 2 + (np.arange(4) >= 2)[None, :]) * (r1 * c1)
    indptr, indices = np.asarray(mask.indptr), np.asarray(mask.indices)
    for h in heads:
        terms = np.zeros(4 * r1 * c1)                   # part x part, part x whole, whole x part, whole x whole
        for lo in range(int(indptr[h, 0]), int(indptr[h, -1]), CHUNK):
            at = np.arange(lo, min(lo + CHUNK, int(indptr[h, -1])))
            i = np.searchsorted(indptr[h], at, side="right") - 1
            j = indices[at]
            flat = kind + q_at[i][:, :, None] * c1 + kv_at[j][:, None, :]
            terms += np.bincount(flat.ravel(), (q_weight[i][:, :, None] * kv_weight[j][:, None, :]).ravel(),
                                 minlength=terms.size)
        pp, pw, wp, ww = terms.reshape(4, r1, c1)
        area = (pp + pw.cumsum(1) * np.append(width, 0) + wp.cumsum(0) * np.append(height, 0)[:, None]
                + ww.cumsum(0).cumsum(1) * np.outer(np.append(height, 0), np.append(width, 0)))[:-1, :-1]
        yield area / np.outer(height, width)


def png_path(path: Any) -> Path:
    """``path`` as a Path, checked to name a PNG file (``ValueError`` naming it otherwise)."""
    path = as_path(path)
    if path.suffix.lower() != ".png" or path.is_dir():
        folder = path.is_dir() or not path.name                 # a file inside it, not the folder's own name again
        raise ValueError(f"path: expected a file name ending in .png (the picture is a PNG), got {str(path)[:200]!r}"
                         f"{' (a folder)' if path.is_dir() else ''}; pass e.g. "
                         f"{str(path / 'mask.png' if folder else path.with_suffix('.png'))[:200]!r}")
    return path


def render_png(mask: "BlockMask", path: Any, heads: Sequence[int] | None) -> Path:
    """Draw each selected head's block map in a grid, drawn to token scale (stretched where one side is more than
    :data:`MAX_ASPECT` times the other, e.g. a ring shard's few queries against every key)."""
    path = png_path(path)
    heads = _heads(mask, heads)
    plt = matplotlib_pyplot()
    cols = min(len(heads), 4)
    rows = -(-len(heads) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False, dpi=DPI)
    try:                       # pyplot keeps every figure until it is closed: a failed save must not leave one open
        _draw_heads(fig, axes, mask, heads)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=DPI, format="png")
    finally:
        plt.close(fig)
    return path


def _draw_heads(fig: Any, axes: np.ndarray, mask: "BlockMask", heads: list[int]) -> None:
    """Each head's block map on its axes (to token scale), and the figure's titles."""
    density = mask.density(per_head=True)
    # to token scale, unless one side is so much longer that the map would be a line no block shows on
    aspect = "equal" if max(mask.q_len, mask.kv_len) <= MAX_ASPECT * min(mask.q_len, mask.kv_len) else "auto"
    for ax in axes.ravel():
        ax.axis("off")
    for ax, h in zip(axes.ravel(), heads):
        ax.set_xlim(0, mask.kv_len)
        ax.set_ylim(mask.q_len, 0)
        ax.set_aspect(aspect)
        ax.set_title(f"head {h}: density {density[h]:.3f}", fontsize=9)
        ax.axis("on")
        ax.tick_params(labelsize=7)
    method = mask.meta.get("method", "mask")
    title = (f"{str(method)[:40]}: {mask.num_q_blocks}x{mask.num_kv_blocks} blocks, q_len {mask.q_len}, "
             f"kv_len {mask.kv_len}, density {mask.density():.3f} (shade: share kept)")
    _fitted_title(fig, title)
    fig.supxlabel("key token")
    fig.supylabel("query token")
    fig.tight_layout()
    for ax, h in zip(axes.ravel(), heads):      # sized to the panels as laid out
        _draw_map(ax, mask, h, aspect)


def _draw_map(ax: Any, mask: "BlockMask", head: int, aspect: str) -> None:
    """The head's map reduced to no more pixels than its panel has on screen, so that drawing it nearest-neighbour
    drops none; a pixel that keeps anything shows at least :data:`MIN_SHADE`."""
    ax.apply_aspect()
    box = ax.get_window_extent()
    pixels = tuple(max(1, min(PIXELS, int(side))) for side in (box.height, box.width))
    share = next(_pixel_maps(mask, [head], pixels))
    ax.imshow(np.where(share > 0, np.maximum(share, MIN_SHADE), 0), cmap="Blues", vmin=0, vmax=1.25,
              interpolation="nearest", extent=(0, mask.kv_len, mask.q_len, 0), aspect=aspect)


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
