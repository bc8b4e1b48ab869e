"""Probe (GPU): FA4's SM90 forward with a persistent tile scheduler on block-sparse 128 x 128 masks.

flash-attn-4 4.0.0b36's SM90 forward (``flash_fwd_sm90.FlashAttentionForwardSm90``) is written as a
loop over work tiles (its producer and MMA warpgroups each run ``while work_tile.is_valid_tile`` and
``advance_to_next_work``), but its host side picks ``SingleTileScheduler`` for non-causal calls: one
CTA per (query tile, head, batch element), each with its prologue (Q and first K/V loads) and epilogue
(O and LSE stores) exposed. At S = 32K and d = 0.1 a CTA runs 26 key tiles, and there sparsecore's
default (597 eff TFLOP/s) and FA4's own call (602) stay below cuDNN dense (609; issue 13, seventh
session). FA4 ships ``StaticPersistentTileScheduler`` (its SM100 forward uses it): one CTA per SM,
walking tiles ``i, i + grid, ...`` in the same order, so a CTA's producer can load the next tile's Q
and K while its MMA warpgroups finish the current one.

This probe builds the SM90 forward with that scheduler: during FA4's compile it swaps the module
global ``SingleTileScheduler`` that the forward's ``__call__`` reads (under a lock), and passes
``num_threads=PERSISTENT_THREADS`` as the compile-key marker (the SM90 forward computes its own thread
count and ignores the argument, as :mod:`sparsecore.backends.cuda.fa4_occupancy` does for its
kernels), so FA4's own kernels keep their cache entries. It times FA4's own block-sparse call with and
without it, next to sparsecore's default and cuDNN dense, on per-head random 128 x 128 masks (every
row the same number of blocks and its diagonal, as the README's table), and checks that the two FA4
calls' outputs and LSEs are equal: the same tiles are computed the same way, only their order on the
SMs changes.

    python bench/fa4_persistent_probe.py --out DIR
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import threading
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import sparsecore  # noqa: E402
from cuda_cases import random_rows  # noqa: E402
from fa4_check import anchor_tensors, bench  # noqa: E402

HEADS, DIM = 12, 128
CASES = [(32768, 0.1), (32768, 0.25), (32768, 0.5), (98304, 0.1)]
PERSISTENT_THREADS = 383          # compile-key marker of the persistent build (FA4's default: 384)
_SWAP = threading.Lock()


def persistent_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """``interface._flash_attn_fwd`` with the SM90 forward built on ``StaticPersistentTileScheduler``: ``(out, lse)``."""
    from flash_attn.cute import flash_fwd_sm90, interface
    from flash_attn.cute.tile_scheduler import StaticPersistentTileScheduler
    with _SWAP:
        original = flash_fwd_sm90.SingleTileScheduler
        flash_fwd_sm90.SingleTileScheduler = StaticPersistentTileScheduler
        try:
            out, lse, *_ = interface._flash_attn_fwd(q, k, v, num_threads=PERSISTENT_THREADS, **kwargs)
        finally:
            flash_fwd_sm90.SingleTileScheduler = original
    return out, lse


def own_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    from flash_attn.cute import interface
    out, lse, *_ = interface._flash_attn_fwd(q, k, v, **kwargs)
    return out, lse


def cudnn_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device (an SM90 GPU with flash-attn-4)")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seq, density in CASES:
        mask = random_rows(HEADS, seq, density)
        gen = torch.Generator(device="cuda").manual_seed(seq + int(density * 100))
        q, k, v = (torch.randn(1, HEADS, seq, DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
                   for _ in range(3))
        sparse = anchor_tensors(mask, 128)
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        options = dict(block_sparse_tensors=sparse, return_lse=True)
        own_out, own_lse = own_forward(qt, kt, vt, **options)
        per_out, per_lse = persistent_forward(qt, kt, vt, **options)
        kernel = sparsecore.compile(mask, device="cuda")
        flops = 4.0 * seq * seq * DIM * HEADS * mask.density()
        times = {"fa4 own": bench(lambda: own_forward(qt, kt, vt, **options)),
                 "fa4 persistent": bench(lambda: persistent_forward(qt, kt, vt, **options)),
                 f"sparsecore default ({kernel.backend.name})": bench(lambda: kernel(q, k, v)),
                 "cudnn dense": bench(lambda: cudnn_dense(q, k, v))}
        row = {"seq": seq, "density": mask.density(),
               "persistent equals own": bool(torch.equal(per_out, own_out) and torch.equal(per_lse, own_lse)),
               "max abs difference": float((per_out.float() - own_out.float()).abs().max()),
               "ms": times,
               "eff TFLOP/s": {name: flops / ms / 1e9 if "dense" not in name else 4.0 * seq * seq * DIM * HEADS
                               / ms / 1e9 for name, ms in times.items()}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    meta = {"date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(),
            "torch": torch.__version__, "sm_count": torch.cuda.get_device_properties(0).multi_processor_count}
    (args.out / "fa4-persistent-probe.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    names = list(rows[0]["ms"])
    lines = [f"# FA4's SM90 forward, persistent tile scheduler ({meta['date']}, {meta['gpu']})", "",
             "Eff TFLOP/s (cuDNN dense: its own rate on all pairs); per-head random 128 x 128 masks, bf16, "
             f"{HEADS} heads, head dim {DIM}.", "",
             "| S | density | " + " | ".join(names) + " | persistent equals own |",
             "|---|---|" + "---|" * len(names) + "---|"]
    for row in rows:
        lines.append(f"| {row['seq']} | {row['density']:.3f} | "
                     + " | ".join(f"{row['eff TFLOP/s'][n]:.0f}" for n in names)
                     + f" | {row['persistent equals own']} (max diff {row['max abs difference']:.1e}) |")
    (args.out / "fa4-persistent-probe.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
