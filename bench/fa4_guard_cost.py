"""What the ``fa4`` lowering's non-finite guard costs, and that it holds, at Wan 2.1 6x (GPU only).

The guard (``backends/cuda/fa4_nonfinite.py``) runs on masks with FA4 mask tiles: LVSA's
1560-token frames are the case that runs so end to end. On the frame mask at 188,760 tokens
(12 heads, head dim 128, bf16; ``kernel_timing.median_ms``: medians of at least 10 repeats):

- the lowering as it runs (key gather where the layout reorders keys, guard + FA4 + NaN write), FA4's
  call alone on the same converted tensors (keys and values gathered beforehand), and the guard's tensor
  ops alone;
- a NaN in one value token: rows that do not list its block must equal the clean run's bits,
  the rows that do must be NaN in its dim.

    python bench/fa4_guard_cost.py --out DIR        # writes fa4-guard-<date>.json / .md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from cuda_cases import lvsa_frames  # noqa: E402
from fa4_check_exactness import fa4_kernel  # noqa: E402
from kernel_timing import median_ms  # noqa: E402
from report import run_meta  # noqa: E402
from sparsecore.backends.cuda.fa4_nonfinite import guard_values, poison  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    mask = lvsa_frames(12)
    q, k, v = (torch.randn(1, 12, mask.q_len, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    run, launch = fa4_kernel(mask)

    def kernel(q, k, v):
        return run(q, k, v, 128 ** -0.5, False)[0]

    kernel(q, k, v)
    prepared = launch().converted(q.device)
    if not prepared.layout.needs_mask_mod:
        raise SystemExit("the frame mask has no mask tiles on this machine: nothing to measure")
    from flash_attn.cute import flash_attn_func
    order = prepared.layout.kv_order           # keys the layout reads gathered (fa4_key_order), else None
    ks, vs = (k, v) if order is None else (k.index_select(2, order), v.index_select(2, order))

    def raw() -> object:
        return flash_attn_func(q.transpose(1, 2), ks.transpose(1, 2), vs.transpose(1, 2), softmax_scale=128 ** -0.5,
                               causal=False, pack_gqa=False, mask_mod=prepared.mask_mod,
                               aux_tensors=prepared.ranges[0].aux,
                               block_sparse_tensors=prepared.ranges[0].sparse, return_lse=False)

    out_like = torch.empty(1, mask.q_len, 12, 128, device="cuda", dtype=torch.bfloat16)

    def guard_only() -> object:
        clean, found = guard_values(v, order)
        return poison(out_like, found, prepared.layout, prepared.kv_offsets)

    times = {"lowering (guard + FA4)": median_ms(lambda: kernel(q, k, v)), "FA4 call alone": median_ms(raw),
             "guard ops alone": median_ms(guard_only)}

    def peak_mib(fn) -> float:
        """MiB the call allocates above what was allocated before it (its output included)."""
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2 ** 20

    memory = {"lowering (guard + FA4)": peak_mib(lambda: kernel(q, k, v)), "FA4 call alone": peak_mib(raw)}

    clean = kernel(q, k, v)
    token, dim = 5 * 1560 + 17, 9
    bad_v = v.clone()
    bad_v[0, 3, token, dim] = float("nan")
    out = kernel(q, k, bad_v)
    block = token // 1560
    hit = torch.zeros(12, mask.q_len, dtype=torch.bool, device="cuda")
    for i in range(mask.num_q_blocks):
        if block in set(int(b) for b in mask.row(3, i)):
            hit[3, i * 1560:(i + 1) * 1560] = True
    isolation = {"rows listing the block": int(hit.sum()),
                 "other rows bit-identical": bool(torch.equal(out[0][~hit], clean[0][~hit])),
                 "listing rows NaN in the dim": bool(out[0][hit][:, dim].isnan().all()),
                 "listing rows' other dims finite": bool(out[0][hit][:, :dim].isfinite().all())}

    record = run_meta(case=f"LVSA frames, {mask.q_len} tokens, 12 heads, head dim 128, bf16, "
                      f"density {mask.density():.4f}, {prepared.layout.num_mask_tiles} mask tiles of "
                      f"{prepared.layout.num_mask_tiles + prepared.layout.num_full_tiles}",
                      ms=times, peak_mib_above_inputs=memory, isolation=isolation)
    date, versions = record["date"], record["versions"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"fa4-guard-{date}.json").write_text(json.dumps(record, indent=1) + "\n")
    lines = [f"# fa4's non-finite guard, {date}", "",
             f"{versions['gpu']}; torch {versions['torch']}, triton {versions['triton']}, flash-attn-4 "
             f"{versions['flash_attn_4']}. Versions: {versions}. {record['case']}; `bench/fa4_guard_cost.py`, "
             "do_bench medians.", "",
             "| what | ms | peak MiB above the inputs |", "|---|---:|---:|"]
    lines += [f"| {name} | {ms:.3f} | {memory[name]:.1f} |" if name in memory else f"| {name} | {ms:.3f} | |"
              for name, ms in times.items()]
    lines += ["", "| isolation (NaN in one value token) | |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in isolation.items()]
    (args.out / f"fa4-guard-{date}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
