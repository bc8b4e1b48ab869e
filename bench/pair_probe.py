"""Probe (GPU): 64-token-block masks with 64x128 key tiles made of two kept 64-token key blocks.

Each program owns one 64-row query block of one head and walks its key-block list two blocks
at a time: the key tile is the two blocks' 128 tokens gathered by pointer (any two blocks, not
neighbours), so QK^T is a 64x128 product instead of 64x64 and the online softmax rescales once
per 128 keys. An odd last block is the same tile with its second half masked. Compared side by
side with the production Triton lowering on the same AdaSpa-shaped mask, and checked against it.

    python bench/pair_probe.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

sys.path.insert(0, str(Path(__file__).parent))
from kernel_timing import median_ms  # noqa: E402

import sparsecore  # noqa: E402
from fa4_check_masks import adaspa_large  # noqa: E402
from report import run_meta, time_one_backend  # noqa: E402

LOG2E = 1.4426950408889634


@triton.jit
def paired_fwd(Q, K, V, Out, Rows, Counts, seq, max_k, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, PAIR: tl.constexpr):
    pid = tl.program_id(0)
    num_q_blocks = seq // BLOCK
    head = pid // num_q_blocks
    qb = pid % num_q_blocks
    base = head.to(tl.int64) * seq * HEAD_DIM
    offs_m = qb * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    TILE: tl.constexpr = BLOCK * PAIR
    offs_n = tl.arange(0, TILE)
    half = offs_n // BLOCK            # which block of the pair a column belongs to
    within = offs_n % BLOCK
    q = tl.load(Q + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :])
    m_i = tl.full([BLOCK], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK], tl.float32)
    acc = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
    count = tl.load(Counts + pid)
    row = Rows + pid.to(tl.int64) * max_k
    for t in range(0, count // PAIR):
        blk = tl.load(row + t * PAIR + half)
        tok = blk * BLOCK + within
        k = tl.load(K + base + tok[None, :] * HEAD_DIM + offs_d[:, None])
        v = tl.load(V + base + tok[:, None] * HEAD_DIM + offs_d[None, :])
        qk = tl.dot(q, k)
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    if PAIR > 1:
        if count % PAIR:                                 # the odd last block: second half masked
            ok = half == 0
            blk = tl.load(row + (count - 1) + half * 0)
            tok = blk * BLOCK + within
            k = tl.load(K + base + tok[None, :] * HEAD_DIM + offs_d[:, None])
            v = tl.load(V + base + tok[:, None] * HEAD_DIM + offs_d[None, :])
            qk = tl.where(ok[None, :], tl.dot(q, k) * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            p = tl.math.exp2(qk - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = tl.dot(p.to(v.dtype), tl.where(ok[:, None], v, 0.0), acc * alpha[:, None])
            m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(Out + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], out.to(Out.dtype.element_ty))


def padded_rows(mask) -> tuple[torch.Tensor, torch.Tensor, int]:
    """[H*MB, max_k] int32 key-block ids (row-major per head) and [H*MB] counts, on the GPU."""
    ptr = torch.as_tensor(mask.indptr).cuda().long()           # [H, MB + 1], global offsets into indices
    indices = torch.as_tensor(mask.indices).cuda().long()
    starts, counts = ptr[:, :-1].reshape(-1), (ptr[:, 1:] - ptr[:, :-1]).reshape(-1)
    max_k = int(counts.max())
    col = torch.arange(max_k, device="cuda")
    gather = (starts[:, None] + col[None, :]).clamp(max=indices.numel() - 1)
    rows = torch.where(col[None, :] < counts[:, None], indices[gather], 0).to(torch.int32).contiguous()
    return rows, counts.to(torch.int32).contiguous(), max_k


def main() -> int:
    time_one_backend()
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seq", type=int, default=188736)
    args = parser.parse_args()
    heads, dim, block = 12, 128, 64
    if args.seq % block:
        parser.error(f"--seq: the probe's kernel reads whole {block}-token blocks, got {args.seq} tokens")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    mask = adaspa_large(heads, args.seq, block, (0.1, 0.2, 0.3), seed=0)
    q, k, v = (torch.randn(1, heads, args.seq, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    scale = dim ** -0.5
    flops = mask.flops(dim)
    kernel = sparsecore.compile(mask, device="cuda", backend="triton")
    reference = kernel(q, k, v)
    results = {"production triton": median_ms(lambda: kernel(q, k, v))}
    rows, counts, max_k = padded_rows(mask)
    out = torch.empty_like(q)
    for pair, warps, stages in [(1, 4, 3), (2, 4, 2), (2, 4, 3), (2, 8, 2), (2, 4, 1), (2, 8, 3)]:
        name = f"pair={pair} warps={warps} stages={stages}"
        try:
            def run():
                paired_fwd[(heads * (args.seq // block),)](q, k, v, out, rows, counts, args.seq, max_k,
                                                           scale * LOG2E, HEAD_DIM=dim, BLOCK=block, PAIR=pair,
                                                           num_warps=warps, num_stages=stages)
            run()
            err = ((out.float() - reference.float()).norm() / reference.float().norm()).item()
            results[name] = median_ms(run)
            results[name + " rel err"] = err
        except OutOfResources as exc:  # a config whose stages do not fit shared memory: recorded, the sweep goes on
            results[name] = repr(exc)[:200]
    lines = ["| kernel | ms | eff TFLOP/s |", "|---|---|---|"]
    for name, value in results.items():
        if isinstance(value, float) and not name.endswith("rel err"):
            lines.append(f"| {name} | {value:.2f} | {flops / value / 1e9:.0f} | rel err "
                         f"{results.get(name + ' rel err', 0):.2e}")
        elif not name.endswith("rel err"):
            lines.append(f"| {name} | {value} | |")
    text, meta = "\n".join(lines), run_meta()
    print(text)
    (args.out / "pair-probe.md").write_text(f"{meta}\n\n{text}\n")
    (args.out / "pair-probe.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
