"""The block masks that ``bench/fa4_check.py`` checks and times, also built by the FA4 probes in ``bench/``.

- ``from_rows``: a mask from explicit per-head lists of kept key blocks;
- ``random_mask``: random per-head blocks over any offsets (odd sizes, q_len != kv_len), optionally with rows
  that keep nothing;
- ``adaspa_like``: AdaSpa-shaped, small: video blocks with head-adaptive row counts, then a text sink;
- ``adaspa_large``: AdaSpa-shaped at timing size (188,736 tokens in the check), built with one top-k per level;
- ``frame_mask``: LVSA-style frames: a window of neighbouring frames plus anchor frames, shared by all heads.

The two AdaSpa-shaped builders draw their random scores with a torch generator on ``device``, so the same seed
can give a different mask on another device; it is the GPU unless a caller says otherwise.
"""

from __future__ import annotations

import numpy as np
import torch

from sparsecore import BlockMask


def from_rows(rows: list[list[list[int]]], q_offsets, kv_offsets, meta: dict | None = None) -> BlockMask:
    """The mask that keeps, for head ``h`` and query block ``i``, the key blocks ``rows[h][i]``."""
    return BlockMask.from_lists(rows, np.asarray(q_offsets), np.asarray(kv_offsets), meta=meta or {})


def random_mask(heads: int, q_offsets, kv_offsets, density: float, seed: int, empty_rows: float = 0.0) -> BlockMask:
    """Each (head, query block, key block) kept with probability ``density``; then about ``empty_rows`` of the
    (head, query block) rows are cleared, so they keep no key at all."""
    rng = np.random.default_rng(seed)
    mb, nb = len(q_offsets) - 1, len(kv_offsets) - 1
    keep = rng.random((heads, mb, nb)) < density
    keep[rng.random((heads, mb)) < empty_rows] = False
    return from_rows([[np.nonzero(keep[h, i])[0].tolist() for i in range(mb)] for h in range(heads)],
                     q_offsets, kv_offsets)


def adaspa_like(heads: int, video: int, text: int, block: int, levels: tuple[float, ...], seed: int, *,
                device: str = "cuda") -> BlockMask:
    """64-token blocks over video then text; each head keeps one of ``levels`` fractions of video blocks
    (top-k of random scores, diagonal included), every row keeps all text blocks, text rows keep all."""
    offsets = BlockMask.uniform_offsets(video, block)
    if text:
        offsets = np.concatenate([offsets, video + BlockMask.uniform_offsets(text, block)[1:]])
    nv, nb = len(BlockMask.uniform_offsets(video, block)) - 1, len(offsets) - 1
    gen = torch.Generator(device=device).manual_seed(seed)
    scores = torch.rand(heads, nv, nv, device=device, generator=gen)
    scores.diagonal(dim1=1, dim2=2).fill_(2.0)
    keep = torch.zeros(heads, nb, nb, dtype=torch.bool, device=device)
    for h in range(heads):                          # per head: one top-k over all its rows (a few heads)
        k = max(1, round(levels[h * len(levels) // heads] * nv))
        top = scores[h].topk(k, dim=-1).indices
        keep[h, :nv].scatter_(1, top, True)
    keep[:, :, nv:] = True
    keep[:, nv:, :] = True
    q_len = int(offsets[-1])
    block_map = keep.cpu().numpy()
    return BlockMask.from_lists([[np.nonzero(block_map[h, i])[0] for i in range(nb)] for h in range(heads)],
                                offsets, offsets, meta={"method": "adaspa_like", "levels": list(levels),
                                                        "q_len": q_len})


def adaspa_large(heads: int, seq: int, block: int, levels: tuple[float, ...], seed: int, *,
                 device: str = "cuda") -> BlockMask:
    """The timing mask: S tokens in 64-token blocks, no text, vectorized (top-k per row on ``device``)."""
    n = seq // block
    gen = torch.Generator(device=device).manual_seed(seed)
    keep = torch.zeros(heads, n, n, dtype=torch.bool, device=device)
    for g, level in enumerate(levels):               # one top-k per row-count level (3 calls)
        hs = [h for h in range(heads) if h * len(levels) // heads == g]
        scores = torch.rand(len(hs), n, n, device=device, generator=gen)
        scores.diagonal(dim1=1, dim2=2).fill_(2.0)
        keep[hs] = torch.zeros(len(hs), n, n, dtype=torch.bool, device=device).scatter_(
            2, scores.topk(max(1, round(level * n)), dim=-1).indices, True)
        del scores
    return BlockMask.from_dense(keep.cpu().numpy(), seq, seq, block,
                                meta={"method": "adaspa_large", "levels": list(levels)})


def frame_mask(heads: int, frames: int, frame: int, window: int, anchors: int) -> BlockMask:
    """``frames`` blocks of ``frame`` tokens; frame ``t`` keeps frames ``t - window .. t + window`` and every
    ``anchors``-th frame from frame 0; the same rows for every head."""
    offsets = np.arange(frames + 1, dtype=np.int64) * frame
    rows = [sorted({*range(max(0, t - window), min(frames, t + window + 1)), *range(0, frames, anchors)})
            for t in range(frames)]
    return from_rows([rows] * heads, offsets, offsets)
