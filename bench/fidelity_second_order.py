"""Would a second-order weight for the blocks a row does not compute do better than PASA's first order? (CPU)

    python bench/fidelity_second_order.py          # about 3 minutes on 2 cores; prints a markdown table

Issue 16's expansion weighs an unselected block j by ``|B_j| exp(s q·k̄_j)``, below the block's mass
``Σ_t exp(s q·k_t)`` (Jensen), and on the synthetic workload of docs/fidelity.md it recovers little
(0.92x / 0.89x of drop-only's error). The textbook correction for that gap treats ``s q·k_t`` over a
block's tokens as Gaussian: ``E exp(x) = exp(mean + var / 2)``, with ``var = s² qᵀ Σ_j q`` from the
block's key covariance ``Σ_j`` (full, or its diagonal: one more block-mean-sized product), and the
numerator tilted the same way, ``v̄_j + s qᵀ H_j / |B_j|`` (``H_j`` as in issue 16). This script
measures it beside the paper's zeroth and first order (each block its own ``H_j``), on PASA's
default selection (rho 0.15, block 64, step 10), float64 arithmetic, rel L2 against dense attention
(mean over heads), for the two geometries of docs/fidelity.md and a smoother input (sharpness 0.5).
It is an experiment, not a lowering: nothing in sparsecore computes the second-order weights.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from sparsecore.geometry import VideoGeometry
from sparsecore.methods import pasa
from sparsecore.workloads import video_qkv

HEADS, HEAD_DIM, SEED = 12, 64, 0
CASES = [("33x8x12", VideoGeometry(33, 8, 12), 1.0), ("61x10x16", VideoGeometry(61, 10, 16), 1.0),
         ("33x8x12", VideoGeometry(33, 8, 12), 0.5)]
VARIANTS = ("drop", "zeroth", "first order (own H_j)", "second order, diagonal", "second order, diagonal, tilted",
            "second order, full", "second order, full, tilted")


def head_errors(q, k, v, listed, q_block, k_block, sizes) -> dict[str, float]:
    """Rel L2 of each variant for one head (float64): q, k, v ``[L, D]``, listed ``[MB, NB]``."""
    s = q.shape[-1] ** -0.5
    onehot = torch.nn.functional.one_hot(k_block, len(sizes)).double()             # [T, NB]
    k_mean = onehot.T @ k / sizes[:, None]
    v_mean = onehot.T @ v / sizes[:, None]
    dk = k - k_mean[k_block]
    h = torch.einsum("tn,te,tf->nef", onehot, dk, v)                               # Σ (k_t - k̄_j)ᵀ v_t
    cov = torch.einsum("tn,te,tf->nef", onehot, dk, dk) / sizes[:, None, None]
    var = onehot.T @ dk ** 2 / sizes[:, None]
    scores = q @ k.T * s
    dense = torch.softmax(scores, -1) @ v
    exact = scores.masked_fill(~listed[q_block][:, k_block], -torch.inf)
    top = exact.amax(-1, keepdim=True)
    p = torch.exp(exact - top)
    numerator, denominator = p @ v, p.sum(-1, keepdim=True)
    skipped = ~listed[q_block]                                                     # [L, NB]
    mean_score = s * q @ k_mean.T
    q_h = torch.einsum("ld,nde->lne", q, h)
    quadratic = {"diagonal": 0.5 * s * s * (q ** 2) @ var.T,
                 "full": 0.5 * s * s * torch.einsum("ld,nde,le->ln", q, cov, q)}

    def approximated(extra, first_order: str | None) -> torch.Tensor:
        w = torch.exp((mean_score + extra + torch.log(sizes) - top).masked_fill(~skipped, -torch.inf))
        num = w @ v_mean
        if first_order == "paper":
            w0 = torch.exp((mean_score - top).masked_fill(~skipped, -torch.inf))
            num = num + s * torch.einsum("ln,lne->le", w0, q_h)
        elif first_order == "tilted":
            num = num + s * torch.einsum("ln,lne->le", w / sizes, q_h)
        return (numerator + num) / (denominator + w.sum(-1, keepdim=True))

    outs = {"drop": numerator / denominator, "zeroth": approximated(0.0, None),
            "first order (own H_j)": approximated(0.0, "paper")}
    for kind in ("diagonal", "full"):
        outs[f"second order, {kind}"] = approximated(quadratic[kind], None)
        outs[f"second order, {kind}, tilted"] = approximated(quadratic[kind], "tilted")
    return {name: float((out - dense).norm() / dense.norm()) for name, out in outs.items()}


def main() -> None:
    print("| geometry | sharpness | " + " | ".join(VARIANTS) + " |")
    print("|---|---:|" + "---:|" * len(VARIANTS))
    for name, g, sharpness in CASES:
        q, k, v = video_qkv(g, HEADS, HEAD_DIM, seed=SEED, sharpness=sharpness)
        mask = pasa.plan(g, HEADS, step=10, q=q, k=k, approximation="drop").to_host()
        listed = torch.from_numpy(mask.to_dense())
        q_block = torch.from_numpy(np.repeat(np.arange(mask.num_q_blocks), np.diff(mask.q_offsets)))
        k_block = torch.from_numpy(np.repeat(np.arange(mask.num_kv_blocks), np.diff(mask.kv_offsets)))
        sizes = torch.from_numpy(np.diff(mask.kv_offsets)).double()
        errors = [head_errors(*(t[0, h].double() for t in (q, k, v)), listed[h], q_block, k_block, sizes)
                  for h in range(HEADS)]                      # a head at a time: a bench script's memory bound
        mean = {kind: float(np.mean([e[kind] for e in errors])) for kind in VARIANTS}
        cells = [f"{mean[kind]:.4f} ({mean[kind] / mean['drop']:.2f}x)" for kind in VARIANTS]
        print(f"| {name} | {sharpness} | " + " | ".join(cells) + " |", flush=True)
        print(f"  {name} sharpness {sharpness}: density {mask.density():.3f}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
