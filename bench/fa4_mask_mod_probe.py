"""Probe (GPU): what the ``fa4`` lowering's mask tiles cost on LVSA's frame mask, and what the key order saves.

LVSA's frame blocks (1,560 tokens at Wan 2.1) do not fall on FA4's 128-token tiles: with the keys in their
order, 10% of the listed tiles are mask tiles, where FA4 calls a ``mask_mod`` per element. On the frame
mask at 6x (188,760 tokens, 12 heads, head dim 128, bf16; ``cuda_cases.lvsa_frames``) this times, side by
side (``triton.testing.do_bench`` median):

- with the keys in their order (``reorder_keys=False``), the same FA4 call and tile lists under two
  mask_mods: ``lookup`` (:func:`fa4_mask_mods.lookup_mask_mod`: a token's block from two tables) and
  ``always true``, which keeps every pair: a *timing floor* of the mask-tile path (its output is not
  the mask's, and is only compared to say so). A third form, computing the blocks by division by the
  constant frame size (one load an element instead of three), ran as fast as the lookup (68.11 against
  68.19 ms, then 67.98 against 67.51; 2026-12-01, seventh-session/fa4-mask-mod-probe*.md); its code is
  this file at commit 5cf82f5;
- the whole ``fa4`` call, keys in their order and in :func:`fa4_key_order.key_order` (the default), and
  the default's FA4 call alone on keys and values gathered beforehand;
- the non-finite guard alone, with the keys in their order and gathering in the default's order, and cuDNN /
  FA4 dense on the same q, k, v.

Outputs are compared with the lookup's.

    python bench/fa4_mask_mod_probe.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).parent))

import sparsecore  # noqa: E402
from sparsecore.backends.cuda import fa4_mask_mods  # noqa: E402
from sparsecore.backends.cuda.fa4_launch import Fa4Launch  # noqa: E402
from sparsecore.backends.cuda.fa4_nonfinite import guard_values  # noqa: E402
from cuda_cases import lvsa_frames  # noqa: E402
from report import run_meta, time_one_backend  # noqa: E402

HEADS, DIM = 12, 128


def launch_of(kernel) -> Fa4Launch:
    return next(r for r in list(getattr(kernel, "_runs", {}).values()) + [getattr(kernel, "_run", None)]
                if isinstance(r, Fa4Launch))


def always_true_mask_mod():
    import cutlass
    import cutlass.cute as cute

    @cute.jit
    def sparsecore_probe_keep_all(batch, head, m_idx, n_idx, seqlen_info, aux_tensors):
        result = cute.make_rmem_tensor(n_idx.shape, dtype=cutlass.Boolean)
        for j in cutlass.range_constexpr(cute.size(n_idx.shape)):
            result[j] = cutlass.Boolean(True)
        return result.load()
    return sparsecore_probe_keep_all


def bench(fn) -> float:
    return float(triton.testing.do_bench(fn, warmup=50, rep=400, return_mode="median"))


def main() -> int:
    time_one_backend()
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from flash_attn.cute import flash_attn_func
    from torch.nn.attention import SDPBackend, sdpa_kernel

    mask = lvsa_frames(HEADS)
    seq, density = mask.q_len, mask.density()
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, seq, DIM, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    scale = 1.0 / math.sqrt(DIM)
    kernel = sparsecore.compile(mask, device="cuda", backend="fa4", reorder_keys=False)
    kernel(q, k, v)                                                   # converts the mask, compiles
    prepared = launch_of(kernel).converted(q.device)
    layout = prepared.layout
    keep_bits = layout.keep_bits.view(torch.uint32)
    keep_bits.__leading_dim__ = keep_bits.ndim - 1
    lookup_aux = [layout.q_block_of_token, layout.kv_block_of_token, keep_bits]
    for tensor in lookup_aux:
        tensor.__leading_dim__ = tensor.ndim - 1
    forms = {
        "lookup": (fa4_mask_mods.lookup_mask_mod(), lookup_aux),
        "always true (timing floor, not the mask)": (always_true_mask_mod(), [keep_bits]),
    }
    qs, ks, vs = (t.transpose(1, 2) for t in (q, k, v))
    flops = 4.0 * seq * seq * DIM * HEADS * density
    rows, outputs = [], {}

    def add(name: str, fn, work: float = flops, **extra) -> None:
        ms = bench(fn)
        rows.append({"kernel": name, "ms": ms, "eff_tflops": work / ms / 1e9, **extra})
        print(rows[-1], flush=True)

    for name, (mask_mod, aux) in forms.items():
        def call(mask_mod=mask_mod, aux=aux):
            return flash_attn_func(qs, ks, vs, softmax_scale=scale, causal=False, pack_gqa=False, mask_mod=mask_mod,
                                   aux_tensors=aux, block_sparse_tensors=prepared.ranges[0].sparse, return_lse=False)
        outputs[name] = call()[0].float()
        add(f"keys in their order: FA4, {name} mask_mod", call, mask_tiles=layout.num_mask_tiles)
    reference = outputs["lookup"]
    for row, name in zip(rows, forms):
        row["max_abs_diff_vs_lookup"] = float((outputs[name] - reference).abs().max())
    add("keys in their order: sparsecore fa4 call (lookup, non-finite guard)", lambda: kernel(q, k, v),
        mask_tiles=layout.num_mask_tiles)
    ordered = sparsecore.compile(mask, device="cuda", backend="fa4")
    outputs["key order"] = ordered(q, k, v).transpose(1, 2).float()        # FA4's [B, S, H, D], as the others
    ordered_layout = launch_of(ordered).converted(q.device).layout
    add("key order (default): sparsecore fa4 call (gather, lookup, non-finite guard)", lambda: ordered(q, k, v),
        mask_tiles=ordered_layout.num_mask_tiles,
        max_abs_diff_vs_lookup=float((outputs["key order"] - reference).abs().max()))
    sparse = launch_of(ordered).converted(q.device).ranges[0].sparse
    aux = [ordered_layout.q_block_of_token, ordered_layout.kv_block_of_token,
           ordered_layout.keep_bits.view(torch.uint32)]
    for tensor in aux:
        tensor.__leading_dim__ = tensor.ndim - 1
    ks_ordered, vs_ordered = (t.index_select(2, ordered_layout.kv_order).transpose(1, 2) for t in (k, v))
    add("key order: FA4 call alone (keys and values gathered beforehand)",
        lambda: flash_attn_func(qs, ks_ordered, vs_ordered, softmax_scale=scale, causal=False, pack_gqa=False,
                                mask_mod=fa4_mask_mods.lookup_mask_mod(), aux_tensors=aux,
                                block_sparse_tensors=sparse, return_lse=False),
        mask_tiles=ordered_layout.num_mask_tiles)
    add("gather of k and v (index_select)", lambda: (k.index_select(2, ordered_layout.kv_order),
                                                     v.index_select(2, ordered_layout.kv_order)), work=0.0)
    add("non-finite guard alone (guard_values)", lambda: guard_values(v), work=0.0)
    add("non-finite guard alone, gathering (guard_values with the key order)",
        lambda: guard_values(v, ordered_layout.kv_order), work=0.0)
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        add("cuDNN SDPA dense", lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v),
            work=flops / density)
    add("FA4 dense", lambda: flash_attn_func(qs, ks, vs, softmax_scale=scale), work=flops / density)

    meta = run_meta() | {"seq": seq, "density": density, "heads": HEADS, "head_dim": DIM, "dtype": "bfloat16",
                         "tile": [layout.tile_m, layout.tile_n], "full_tiles": layout.num_full_tiles,
                         "mask_tiles": layout.num_mask_tiles}
    lines = [f"{meta}", "", "| kernel | ms | eff TFLOP/s | mask tiles | max abs diff vs lookup |",
             "|---|---|---|---|---|"]
    for row in rows:
        diff = row.get("max_abs_diff_vs_lookup")
        lines.append(f"| {row['kernel']} | {row['ms']:.3f} | {row['eff_tflops']:.1f} | {row.get('mask_tiles', '')} | "
                     f"{'' if diff is None else f'{diff:.2e}'} |")
    (args.out / "fa4-mask-mod-probe.md").write_text("\n".join(lines) + "\n")
    (args.out / "fa4-mask-mod-probe.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
