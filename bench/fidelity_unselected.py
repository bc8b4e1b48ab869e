"""Fidelity of PASA's approximation of the blocks a row does not compute (issue 16), on the synthetic workload (CPU).

Run by ``bench/fidelity.py`` (rows in docs/fidelity.md, section "Approximating the unselected
blocks"). For each geometry, PASA at its defaults (rho 0.15, step 10) with the same selection
under ``approximation`` = drop / zeroth / global-first-order / grouped-first-order, and AdaSpa and
LVSA with and without ``grouped-first-order``; every output comes from the compiled kernel
(``portable`` on the CPU, float32) and is compared with dense attention:

- ``rel_l2``, ``cosine``: as in the other tables (per head, mean over heads).
- ``recall``: softmax mass of the computed blocks (what drop keeps).
- ``mass``: the recall-equivalent mass, ``mean_q exp(lse_kernel - lse_dense)``: the share of the
  dense softmax normalizer the kernel's denominator accounts for (exact plus approximated; equals
  the recall for drop; below 1 since ``|B| exp(s q·k̄) <= Σ_t exp(s q·k_t)``, Jensen).
- ``captured``: the share of the missing mass the approximation puts back, ``(mass - recall) / (1 - recall)``.
- ``drop_density``: the density at which drop-only PASA (same planner, more blocks) reaches the
  same ``rel_l2``, interpolated on a density sweep (``>`` the largest swept when none does, ``<`` the
  smallest when drop-only there already does better).

PASA also runs with smaller statistic groups (8 blocks, and 1: every block its own ``H_j``, the
first-order expansion without sharing) to separate the cost of sharing a statistic from that of
the expansion itself.

A diagnostic explains the numbers: the mass-weighted spread of ``s q·(k_t - k̄_j)`` over the
tokens of unselected blocks (the first-order expansion assumes it is small next to 1). A
sharpness sweep (``video_qkv(sharpness=...)``, smaller = smoother attention) on the first
geometry shows the approximation where that assumption holds better.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch

import sparsecore
from sparsecore.geometry import VideoGeometry
from sparsecore.ir import BlockMask
from sparsecore.methods import adaspa, lvsa, pasa
from sparsecore.workloads import video_qkv

KINDS = ("drop", "zeroth", "global-first-order", "grouped-first-order")
GROUP_SIZES = ("grouped-first-order:8", "grouped-first-order:1")      # smaller groups; 1: each block's own H_j
SWEEP = (0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.8)
SHARPNESS = (0.5, 0.25)
ORDERS_NOTE = ("Other token orders inside a block (8 x 8 frame tiles; 2 x 4 x 8 and 4 x 4 x 4 space-time tiles), the "
               "same selection rule on each: [fidelity-block-order.md](fidelity-block-order.md) "
               "(`bench/fidelity_block_order.py`; 4 x 4 x 4 tiles: spread 7.2 / 6.4, grouped first order 0.80x / "
               "0.73x of drop-only).")


def dense_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int = 256):
    """Dense attention of one batch element: out ``[H, L, D]`` float64, lse ``[H, L]`` float64 (float32 math)."""
    scale = q.shape[-1] ** -0.5
    outs, lses = [], []
    for start in range(0, q.shape[2], chunk):
        scores = q[0, :, start:start + chunk] @ k[0].transpose(1, 2) * scale
        lse = torch.logsumexp(scores, dim=-1)
        outs.append(torch.exp(scores - lse[..., None]) @ v[0])
        lses.append(lse)
    return torch.cat(outs, 1).double(), torch.cat(lses, 1).double()


def logit_spread(q: torch.Tensor, k: torch.Tensor, mask: BlockMask, chunk: int = 256) -> float:
    """Mass-weighted RMS of ``s q·(k_t - k̄_j)`` over the tokens of blocks a row does not compute."""
    scale = q.shape[-1] ** -0.5
    sizes = np.diff(mask.kv_offsets)
    block_of = torch.from_numpy(np.repeat(np.arange(len(sizes)), sizes))
    means = torch.zeros(k.shape[1], len(sizes), k.shape[-1]).index_add_(1, block_of, k[0]) / torch.from_numpy(
        sizes).float()[None, :, None]
    listed = mask.to_host().to_dense()
    q_block = np.repeat(np.arange(mask.num_q_blocks), mask.q_block_sizes)
    weighted, total = 0.0, 0.0
    for start in range(0, q.shape[2], chunk):
        rows = q[0, :, start:start + chunk]
        scores = rows @ k[0].transpose(1, 2) * scale
        probs = torch.softmax(scores, dim=-1)
        deviation = scores - (rows @ means.transpose(1, 2) * scale)[:, :, block_of]
        unlisted = torch.from_numpy(~listed[:, q_block[start:start + chunk]])[:, :, block_of]
        weighted += float((probs * deviation ** 2 * unlisted).sum())
        total += float((probs * unlisted).sum())
    return float(np.sqrt(weighted / total))


def measure(q, k, v, mask: BlockMask, dense_out, dense_lse) -> dict:
    out, lse = sparsecore.compile(mask, device="cpu")(q, k, v, return_lse=True)
    out, lse = out[0].double(), lse[0].double()
    diff = ((out - dense_out) ** 2).sum((1, 2)).sqrt() / (dense_out ** 2).sum((1, 2)).sqrt()
    cosine = (out * dense_out).sum((1, 2)) / ((out ** 2).sum((1, 2)) * (dense_out ** 2).sum((1, 2))).sqrt()
    drop = mask if mask.unselected.kind == "drop" else BlockMask.unchecked(
        mask.num_heads, mask.q_offsets, mask.kv_offsets, mask.indptr, mask.indices, mask.budgets, mask.meta)
    exact_lse = sparsecore.compile(drop, device="cpu")(q, k, v, return_lse=True)[1][0].double()
    recall = float(torch.exp(exact_lse - dense_lse).mean())
    mass = float(torch.exp(lse - dense_lse).mean())
    return {"density": mask.density(), "unselected": str(mask.unselected), "rel_l2": float(diff.mean()),
            "cosine": float(cosine.mean()), "recall": recall, "mass": mass,
            "captured": (mass - recall) / (1 - recall) if recall < 1 else 0.0, "head_rel_l2": diff.tolist()}


def drop_equivalent(rel_l2: float, sweep: list[tuple[float, float, float]]) -> tuple[float | None, float | None]:
    """(density, recall) at which the drop-only sweep [(density, rel_l2, recall)] reaches ``rel_l2`` (interpolated);
    (None, None) where no swept density does: see :func:`beyond_sweep` for which side."""
    for (d0, e0, r0), (d1, e1, r1) in zip(sweep, sweep[1:]):
        if e0 >= rel_l2 >= e1:
            t = 0.0 if e0 == e1 else (e0 - rel_l2) / (e0 - e1)
            return d0 + t * (d1 - d0), r0 + t * (r1 - r0)
    return None, None


def beyond_sweep(rel_l2: float, sweep: list[tuple[float, float, float]]) -> str:
    """For a ``rel_l2`` no swept density reaches: ``"< d"`` where drop-only at the lowest density ``d`` already
    does better (the approximation is worse than dropping), else ``"> d"`` for the highest."""
    return f"< {sweep[0][0]:.3g}" if rel_l2 > sweep[0][1] else f"> {sweep[-1][0]:.3g}"


def geometry_rows(name: str, g: VideoGeometry, heads: int, head_dim: int, seed: int, *, sharpness: float = 1.0,
                  others: bool = True) -> list[dict]:
    start = time.perf_counter()
    q, k, v = video_qkv(g, heads, head_dim, seed=seed, sharpness=sharpness)
    dense_out, dense_lse = dense_reference(q, k, v)
    sweep = []
    for density in SWEEP:
        mask = pasa.plan(g, heads, step=10, q=q, k=k, density=density, approximation="drop")
        m = measure(q, k, v, mask, dense_out, dense_lse)
        sweep.append((m["density"], m["rel_l2"], m["recall"]))
    rows = []
    cases = [("pasa", kind, pasa.plan(g, heads, step=10, q=q, k=k, approximation=kind))
             for kind in KINDS + GROUP_SIZES]
    if others:
        for kind in ("drop", "grouped-first-order"):
            cases.append(("adaspa", kind, adaspa.plan(g, heads, step=10, q=q, k=k, approximation=kind)))
        for kind in ("drop", "grouped-first-order"):
            cases.append(("lvsa", kind, lvsa.plan(g, heads, step=0, approximation=kind)))
    for method, kind, mask in cases:
        row = {"shape": name, "tokens": g.tokens, "sharpness": sharpness, "method": method, "approximation": kind,
               **measure(q, k, v, mask, dense_out, dense_lse)}
        if method == "pasa":
            row["drop_density"], row["drop_recall"] = drop_equivalent(row["rel_l2"], sweep)
            if row["drop_density"] is None:
                row["drop_beyond"] = beyond_sweep(row["rel_l2"], sweep)
        rows.append(row)
    base = {r["method"]: r["rel_l2"] for r in rows if r["approximation"] == "drop"}
    for r in rows:
        r["vs_drop"] = r["rel_l2"] / base[r["method"]]
    rows[0]["logit_spread"] = logit_spread(q, k, cases[0][2])
    rows[0]["drop_sweep"] = sweep
    print(f"  approximation rows of {name} (sharpness {sharpness}): {time.perf_counter() - start:.1f} s",
          file=sys.stderr, flush=True)
    return rows


def approximation_rows(shapes: list[tuple[str, VideoGeometry]], heads: int, head_dim: int, seed: int) -> list[dict]:
    rows = []
    for name, g in shapes:
        rows += geometry_rows(name, g, heads, head_dim, seed)
    name, g = shapes[0]
    for sharpness in SHARPNESS:
        rows += geometry_rows(name, g, heads, head_dim, seed, sharpness=sharpness, others=False)
    return rows


def markdown(rows: list[dict]) -> list[str]:
    def fmt(x, spec):
        return "" if x is None else format(x, spec)
    lines = ["## Approximating the unselected blocks (issue 16)", "",
             "PASA at its defaults (rho = 0.15, block 64, Gumbel 0.2, step 10): the same selection with "
             "`approximation` = drop / zeroth / global-first-order (PISA) / grouped-first-order (PASA, 32 blocks per "
             "statistic; `:8` and `:1` smaller groups, `:1` = each block's own H_j), run through the compiled "
             "kernel (`portable`, float32) and compared with dense attention; "
             "AdaSpa and LVSA at their defaults with and without `grouped-first-order`. "
             "*recall*: softmax mass of the computed blocks. *mass* (recall-equivalent mass): "
             "mean over queries of exp(lse_kernel - lse_dense), the share of the dense normalizer the kernel's "
             "denominator accounts for (= recall for drop). *captured*: (mass - recall) / (1 - recall), the share of "
             "the missing mass the approximation puts back. *vs drop*: rel L2 over the same method's drop-only rel L2. "
             "*drop density*: the density at which drop-only PASA reaches the same rel L2 (interpolated over "
             f"densities {', '.join(str(d) for d in SWEEP)}; its recall in brackets). *spread*: the mass-weighted RMS "
             "of s q·(k_t - k̄_j) over tokens of unselected blocks, at PASA's selection: the first-order expansion "
             "assumes it is small next to 1.", ""]
    for (shape, sharpness) in dict.fromkeys((r["shape"], r["sharpness"]) for r in rows):
        group = [r for r in rows if r["shape"] == shape and r["sharpness"] == sharpness]
        label = "" if sharpness == 1.0 else f", `video_qkv(sharpness={sharpness})` (smoother attention)"
        if sharpness == SHARPNESS[0]:                                   # before the smoother workloads' tables
            lines += [ORDERS_NOTE, ""]
        lines += [f"### {shape}: {group[0]['tokens']} tokens{label}; spread {group[0]['logit_spread']:.2f}", "",
                  "| method | approximation | density | recall | mass | captured | rel L2 | vs drop | cosine "
                  "| drop density |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in group:
            equivalent = "" if "drop_density" not in r or r["approximation"] == "drop" else (
                r.get("drop_beyond", f"> {SWEEP[-1]}") if r["drop_density"] is None
                else f"{r['drop_density']:.3f} ({r['drop_recall']:.3f})")
            lines.append(f"| {r['method']} | {r['approximation']} | {r['density']:.3f} | {r['recall']:.4f} | "
                         f"{r['mass']:.4f} | {fmt(r['captured'], '.3f')} | {r['rel_l2']:.4f} | {r['vs_drop']:.3f} | "
                         f"{r['cosine']:.4f} | {equivalent} |")
        lines.append("")
    return lines
