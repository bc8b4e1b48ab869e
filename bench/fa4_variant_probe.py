"""Probe (GPU): variants of FA4's SM90 forward where issue 13's points stay below their goals.

Two points stay below the goals on the ``fa4`` lowering, and both look like latency the kernel does not hide:

- 128-token blocks at S = 32K, d = 0.1: each (query tile, head) CTA walks only 26 key tiles, and one CTA is
  resident per SM (128 x 128 tiles: 160 KB of shared memory, 384 threads), so each CTA's Q load, pipeline fill
  and output store stand alone (598-610 eff TFLOP/s against cuDNN's 609-615 and the goal 620; cutting the keys
  into ranges made it slower, ``short_rows_probe.py``).
- AdaSpa-shaped 64-token blocks at 188,736 tokens: the 64 x 64 two-CTA kernel (:mod:`backends.cuda.fa4_occupancy`)
  waits on memory (one head's K/V is twice the L2); 1.17-1.20x Triton against the goal 1.3x.

Variants (``--set``):

- ``stages``: 64 x 128 tiles with **one** K/V stage (80 KB a CTA), so two CTAs share an SM and each hides the
  other's prologue and epilogue; and the 64 x 64 two-CTA kernel with **three** stages (more loads in flight).
- ``persistent``: FA4's 128 x 128 kernel with its static persistent tile scheduler (``StaticPersistentTileScheduler``,
  one CTA per SM walking tiles) in place of one CTA per tile, to bound what persistence would give. **Not safe
  as a lowering**: in flash-attn-4 4.0.0b36 the SM90 forward frees its Q buffer before the epilogue writes O
  through the same shared memory, so a persistent CTA's next Q load may race the store; its output is compared
  with the default's to see whether it did here. And the 64 x 64 two-CTA kernel without intra-warpgroup overlap
  and with P through shared memory (``intra_wg_overlap``, ``mma_pv_is_rs``: FA4's own arguments).

Everything else is the lowering's (``Fa4Launch``: the same lists, key ranges, merge), with FA4's compile cache
cleared around each variant (neither the stages nor the scheduler are in its compile key). Side by side in one
run with cuDNN dense, FA4's own block-sparse call and Triton; medians of at least 10 repeats
(``kernel_timing.median_ms``); eff TFLOP/s = 4 S^2 D H density / time.

    python bench/fa4_variant_probe.py --out DIR --set stages|persistent
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from report import run_meta, time_one_backend, write_report  # noqa: E402

HEADS, HEAD_DIM = 12, 128
ROW_POINTS = ((32768, 0.1), (32768, 0.25), (98304, 0.1))
ADASPA_SEQ = 188736


def staged_forward(stages: int):
    """``fa4_occupancy.forward`` whose two-CTA kernels use ``stages`` K/V pipeline stages."""
    from flash_attn.cute import interface

    from backends.cuda import fa4_occupancy as occ
    base = occ.forward_class(occ.MMA_REGS, occ.PRODUCER_REGS)

    class Staged(base):
        def __init__(self, *args, **kwargs):
            if kwargs.get("num_threads") == occ.TWO_PER_SM_THREADS and kwargs.get("tile_m") == 64:
                kwargs["num_stages"] = stages
            super().__init__(*args, **kwargs)

    def forward(q, k, v, **kwargs):
        with occ._SWAP:
            original = interface.FlashAttentionForwardSm90
            interface.FlashAttentionForwardSm90 = Staged
            try:
                out, lse, *_ = interface._flash_attn_fwd(q, k, v, num_threads=occ.TWO_PER_SM_THREADS, **kwargs)
            finally:
                interface.FlashAttentionForwardSm90 = original
        return out, lse
    return forward


@contextlib.contextmanager
def variant_forward(kind: str, value):
    """While open, the lowering's FA4 launches run the variant ``kind`` (FA4's compile cache cleared around it)."""
    from flash_attn.cute import flash_fwd_sm90, interface, tile_scheduler

    from backends.cuda import fa4_occupancy as occ
    cache = interface._flash_attn_fwd.compile_cache
    cache.clear()
    original_forward, original_scheduler = occ.forward, flash_fwd_sm90.SingleTileScheduler
    if kind == "stages":
        occ.forward = staged_forward(value)
    elif kind == "persistent":
        flash_fwd_sm90.SingleTileScheduler = tile_scheduler.StaticPersistentTileScheduler
    elif kind == "arguments":                     # FA4's own keyword arguments on the two-CTA launch
        occ.forward = lambda q, k, v, **kwargs: original_forward(q, k, v, **kwargs, **value)
    try:
        yield
    finally:
        occ.forward, flash_fwd_sm90.SingleTileScheduler = original_forward, original_scheduler
        cache.clear()


def measure(which: str) -> list[dict]:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from backends.cuda.fa4_backend import Fa4Backend, Fa4Options
    from backends.cuda.fa4_launch import Fa4Launch
    from backends.cuda.triton_backend import TritonBackend
    from backends.cuda.triton_config import TritonOptions
    from cuda_cases import random_rows
    from fa4_check import anchor_tensors
    from fa4_check_masks import adaspa_large
    from flash_attn.cute import flash_attn_func
    from kernel_timing import median_ms
    rows, scale = [], 1 / math.sqrt(HEAD_DIM)

    def add(case, kernel, fn, flops, reference=None, out=None):
        fn()                                      # compiles outside the timing
        ms = median_ms(fn)
        diff = None if reference is None else float((out.float() - reference).norm() / reference.norm())
        rows.append({"case": case, "kernel": kernel, "ms": ms, "eff_tflops": flops / ms / 1e9,
                     "rel_l2_vs_default": diff})
        print(rows[-1], flush=True)

    def variant(case, name, mask, tiles, two_per_sm, kind, value, q, k, v, flops, reference):
        launch = Fa4Launch(mask, *tiles, two_per_sm=two_per_sm)
        try:
            with variant_forward(kind, value):
                out = launch(q, k, v, scale, False)[0]
                add(case, name, lambda: launch(q, k, v, scale, False), flops, reference, out)
        except Exception as error:                # a variant that does not compile or launch is a finding
            rows.append({"case": case, "kernel": name, "error": f"{type(error).__name__}: {error}"[:400]})
            print(rows[-1], traceback.format_exc(limit=3), flush=True)

    for seq, density in ROW_POINTS:
        case = f"128-token random rows, S={seq}, d={density}"
        gen = torch.Generator(device="cuda").manual_seed(seq)
        q, k, v = (torch.randn(1, HEADS, seq, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
                   for _ in range(3))
        mask = random_rows(HEADS, seq, density)
        flops = 4.0 * seq * seq * HEAD_DIM * HEADS * mask.density()

        def cudnn():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v)
        add(case, "cuDNN dense", cudnn, flops / mask.density())
        sparse = anchor_tensors(mask, 128)
        qs, ks, vs = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        add(case, "FA4 block-sparse, its own call",
            functools.partial(flash_attn_func, qs, ks, vs, block_sparse_tensors=sparse, pack_gqa=False), flops)
        default = Fa4Backend().lower(mask, "cuda", Fa4Options())
        reference = default(q, k, v, scale, False)[0].float()
        add(case, "fa4 default (128 x 128, one CTA)", lambda: default(q, k, v, scale, False), flops)
        if which == "stages":
            for stages in (1, 2):
                variant(case, f"fa4 64 x 128, two CTAs, {stages} stage(s)", mask, (64, 128), True, "stages", stages,
                        q, k, v, flops, reference)
        else:
            variant(case, "fa4 128 x 128, persistent scheduler (racy, probe only)", mask, (128, 128), False,
                    "persistent", None, q, k, v, flops, reference)
        add(case, "fa4 default again", lambda: default(q, k, v, scale, False), flops)
        del q, k, v, qs, ks, vs, reference, default
        torch.cuda.empty_cache()

    case = f"AdaSpa-shaped 64-token, S={ADASPA_SEQ}"
    gen = torch.Generator(device="cuda").manual_seed(7)
    q, k, v = (torch.randn(1, HEADS, ADASPA_SEQ, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
               for _ in range(3))
    mask = adaspa_large(HEADS, ADASPA_SEQ, 64, (0.1, 0.2, 0.3), seed=0)
    flops = 4.0 * ADASPA_SEQ * ADASPA_SEQ * HEAD_DIM * HEADS * mask.density()
    triton = TritonBackend().lower(mask.to("cuda"), "cuda", TritonOptions())
    add(case, "triton", lambda: triton(q, k, v, scale, False), flops)
    default = Fa4Backend().lower(mask, "cuda", Fa4Options())
    reference = default(q, k, v, scale, False)[0].float()
    add(case, "fa4 default (64 x 64, two CTAs, 2 stages)", lambda: default(q, k, v, scale, False), flops)
    if which == "stages":
        variant(case, "fa4 64 x 64, two CTAs, 3 stages", mask, (64, 64), True, "stages", 3, q, k, v, flops,
                reference)
    else:
        for name, arguments in (("no intra-warpgroup overlap", {"intra_wg_overlap": False}),
                                ("P through shared memory", {"mma_pv_is_rs": False})):
            variant(case, f"fa4 64 x 64, two CTAs, {name}", mask, (64, 64), True, "arguments", arguments, q, k, v,
                    flops, reference)
    add(case, "triton again", lambda: triton(q, k, v, scale, False), flops)
    add(case, "fa4 default again", lambda: default(q, k, v, scale, False), flops)
    return rows


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"# FA4 SM90 kernel variants ({meta['set']}), {meta['date']}", "", str(meta["versions"]), "",
             "| case | kernel | ms | eff TFLOP/s | rel L2 vs default |", "|---|---|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['kernel']} | failed: {r['error']} | | |")
            continue
        diff = "" if r["rel_l2_vs_default"] is None else f"{r['rel_l2_vs_default']:.1e}"
        lines.append(f"| {r['case']} | {r['kernel']} | {r['ms']:.3f} | {r['eff_tflops']:.0f} | {diff} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    time_one_backend()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--set", choices=("stages", "persistent"), default="persistent")
    args = parser.parse_args()
    meta = run_meta(set=args.set)
    rows = measure(args.set)
    write_report(args.out / f"fa4-variants-{args.set}-{meta['date']}", meta, rows, markdown(meta, rows))
    print(markdown(meta, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
