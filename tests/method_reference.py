"""Host (NumPy, float64) statements of the methods' selection rules, written independently of the library.

The library plans on the device with batched torch ops; these loop over heads and rows with
NumPy, the way the papers state the rules, so a property test can hold the device planners
to them: AdaSpa's row-wise top-k with a text sink and head-adaptive budgets (arXiv
2502.21079 Sec. 4.2-4.3), PASA's pooled scores with Gumbel noise from SplitMix64 counters
(arXiv 2604.12219; noise as sparsecore documents it).
"""

from __future__ import annotations

import numpy as np

GOLDEN, MIX_1, MIX_2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = np.asarray(x, dtype=np.uint64) + GOLDEN
        x = (x ^ (x >> np.uint64(30))) * MIX_1
        x = (x ^ (x >> np.uint64(27))) * MIX_2
        return x ^ (x >> np.uint64(31))


def lowbias32(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = np.asarray(x, dtype=np.uint32)
        x = (x ^ (x >> np.uint32(16))) * np.uint32(0x7FEB352D)
        x = (x ^ (x >> np.uint32(15))) * np.uint32(0x846CA68B)
        return x ^ (x >> np.uint32(16))


def gumbel(heads: range, rows: int, cols: int, seed: int, layer: int | None, step: int, scale: float) -> np.ndarray:
    key = np.uint64(0)
    for part in (seed, -1 if layer is None else layer, step):
        key = splitmix64(key ^ np.uint64(part & 0xFFFFFFFFFFFFFFFF))
    head_key = (splitmix64(np.arange(heads.start, heads.stop, dtype=np.uint64) ^ key) >> np.uint64(32))
    cell = np.arange(rows * cols, dtype=np.uint32).reshape(1, rows, cols)
    bits = lowbias32(cell ^ head_key.astype(np.uint32)[:, None, None])
    uniform = ((bits >> np.uint32(9)).astype(np.float64) + 0.5) * 2.0 ** -23
    return -np.log(-np.log(uniform)) * scale


def sink_map(scores: np.ndarray, text: np.ndarray, keep: list[int]) -> np.ndarray:
    """bool ``[H, MB, NB]``: each video row keeps its ``keep[h]`` best video blocks and every text block;
    text rows keep everything."""
    heads, rows, cols = scores.shape
    video = np.flatnonzero(~text)
    out = np.zeros((heads, rows, cols), dtype=bool)
    for h in range(heads):
        for i in range(rows):
            if text[i]:
                out[h, i] = True
                continue
            order = video[np.argsort(-scores[h, i, video], kind="stable")]
            out[h, i, order[:keep[h]]] = True
            out[h, i, text] = True
    return out


def keep_count(density: float, video_blocks: int) -> int:
    return int(min(video_blocks, max(1, round(density * video_blocks))))


def head_sparsities(recalls: np.ndarray, sparsity: float, threshold: float) -> np.ndarray:
    heads = len(recalls)
    n = min(int((recalls > threshold).sum()), heads // 2)
    delta = min((1 - sparsity) / 2, sparsity)
    out = np.full(heads, sparsity)
    order = np.argsort(-recalls, kind="stable")
    if n:
        out[order[:n]] += delta
        out[order[heads - n:]] -= delta
    return out


def adaspa(mass: np.ndarray, text: np.ndarray, sparsity: float, threshold: float,
           head_adaptive: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(block map, head sparsities, recalls at the base sparsity) from block masses ``[H, MB, NB]``."""
    video = np.flatnonzero(~text)
    base = keep_count(1 - sparsity, len(video))
    heads = mass.shape[0]
    base_map = sink_map(mass, text, [base] * heads)
    recalls = np.array([mass[h][base_map[h]].sum() / mass[h].sum() for h in range(heads)])
    sparsities = head_sparsities(recalls, sparsity, threshold) if head_adaptive else np.full(heads, sparsity)
    keep = [keep_count(1 - s, len(video)) for s in sparsities]
    return sink_map(mass, text, keep), sparsities, recalls


def block_means(x: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """``[B, H, blocks, D]`` means of ``x [B, H, L, D]`` over each block's tokens."""
    return np.stack([x[:, :, a:b].mean(axis=2) for a, b in zip(offsets[:-1], offsets[1:])], axis=2)


def pasa_scores(q: np.ndarray, k: np.ndarray, offsets: np.ndarray, scale: float) -> np.ndarray:
    """Pooled block scores ``[H, MB, NB]`` averaged over the batch (GQA: query head h reads key head h // G)."""
    qm, km = block_means(q, offsets), block_means(k, offsets)
    km = np.repeat(km, q.shape[1] // k.shape[1], axis=1)
    return (qm @ np.swapaxes(km, -1, -2)).mean(axis=0) * scale


def cut_gaps(scores: np.ndarray, text: np.ndarray, keep: list[int]) -> np.ndarray:
    """Per (head, video row): the score gap between the last kept and the first dropped video block."""
    video = np.flatnonzero(~text)
    ordered = -np.sort(-scores[:, :, video], axis=2)
    gaps = np.full(scores.shape[:2], np.inf)
    for h, k in enumerate(keep):
        if k < len(video):
            gaps[h] = ordered[h, :, k - 1] - ordered[h, :, k]
    gaps[:, text] = np.inf
    return gaps
