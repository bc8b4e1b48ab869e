"""Probe (GPU): is the last wave what keeps short rows below cuDNN, and does filling it with split tiles pay?

At S = 32K, d = 0.1 (issue 13's one point below its goal) FA4's SM90 forward launches one CTA per (query tile,
head) and one CTA fits an SM: 12 heads x 256 tiles = 3,072 CTAs make 23.27 waves on 132 SMs, so the last wave
runs 36 CTAs while 96 SMs wait (up to 3% of the call). Two measurements:

- **head scan**: FA4's own block-sparse call at 11, 12 and 33 heads (33 x 256 = 64 full waves). If the rate per
  useful FLOP rises at 33 heads, the partial wave is a cost here.
- **tail fill**: the last ``t`` query tiles of every head leave the main launch; a second FA4 launch on a side
  stream runs them with each tile's key list cut into ``p`` parts, as ``p`` query heads per key head (GQA), and
  merges the parts by LSE into the same output. Its CTAs are ``p`` times shorter, so they fill the SMs the main
  launch's last wave leaves idle. The same split on one stream (serial) is the control.

Side by side in one run with cuDNN dense; medians of at least 10 repeats (``kernel_timing.median_ms``); eff
TFLOP/s = 4 S^2 D H density / time. Every variant's output is compared with FA4's own call.

    python bench/tail_probe.py --out DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from report import probe_main  # noqa: E402

HEAD_DIM, TILE = 128, 128
POINTS = ((32768, 0.1), (32768, 0.25), (98304, 0.1))
HEAD_SCAN = (11, 12, 33)
TAIL_SPLITS = ((11, 2), (11, 4), (22, 2), (6, 4))   # (tail tiles per head, key parts)


def sparse(cnt, idx):
    """FA4's block-sparse tensors with only full tiles: ``cnt [1, H, M]``, ``idx [1, H, M, W]``."""
    import torch
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch
    zero = torch.zeros_like(cnt)
    return BlockSparseTensorsTorch(mask_block_cnt=zero, mask_block_idx=idx[..., :1].contiguous(),
                                   full_block_cnt=cnt.contiguous(), full_block_idx=idx.contiguous(),
                                   block_size=(TILE, TILE))


def split_tail(cnt, idx, tail: int, parts: int):
    """The lists of the main launch (query tiles before the last ``tail``) and of the tail launch: each tail tile's
    list cut into ``parts`` consecutive pieces, the piece ``p`` of head ``h`` as query head ``h * parts + p``."""
    import torch
    heads, tiles, width = idx.shape[1:]
    first = tiles - tail
    tail_cnt, tail_idx = cnt[..., first:], idx[..., first:, :]                          # [1, H, t], [1, H, t, W]
    cuts = torch.arange(parts + 1, device=cnt.device)
    bounds = tail_cnt[..., None] * cuts // parts                                        # [1, H, t, P + 1]
    starts, part_cnt = bounds[..., :-1], (bounds[..., 1:] - bounds[..., :-1]).to(torch.int32)
    piece = -(-width // parts)
    where = (starts[..., None] + torch.arange(piece, device=cnt.device)).clamp(max=width - 1)   # [1, H, t, P, w]
    part_idx = torch.gather(tail_idx[..., None, :].expand(-1, -1, -1, parts, -1), -1, where)
    part_cnt = part_cnt.permute(0, 1, 3, 2).reshape(1, heads * parts, tail)
    part_idx = part_idx.permute(0, 1, 3, 2, 4).reshape(1, heads * parts, tail, piece)
    return sparse(cnt[..., :first], idx[..., :first, :]), sparse(part_cnt, part_idx.to(torch.int32)), first


def tail_call(q, k, v, main_lists, tail_lists, first: int, parts: int, side):
    """``out [1, S, H, D]``: the main launch on the current stream, the tail launch and its merge on ``side``
    (``side=None``: all on the current stream, one after the other)."""
    import torch
    from flash_attn.cute.interface import _flash_attn_fwd
    seq, heads = q.shape[1], q.shape[2]
    rows = first * TILE
    out = torch.empty_like(q)
    main = torch.cuda.current_stream()
    stream = side if side is not None else main
    stream.wait_stream(main)
    _flash_attn_fwd(q[:, :rows], k, v, causal=False, pack_gqa=False, block_sparse_tensors=main_lists,
                    out=out[:, :rows])
    with torch.cuda.stream(stream):
        q_tail = q[:, rows:].repeat_interleave(parts, dim=2)                    # [1, L, H * P, D]
        part_out, part_lse = _flash_attn_fwd(q_tail, k, v, causal=False, pack_gqa=False,
                                             block_sparse_tensors=tail_lists, return_lse=True)[:2]
        lse = part_lse.view(heads, parts, seq - rows)                             # [H, P, L]
        top = lse.amax(1, keepdim=True)
        weight = torch.exp(lse - top)
        weight = (weight / weight.sum(1, keepdim=True)).permute(2, 0, 1)[..., None]  # [L, H, P, 1]
        merged = (part_out.view(seq - rows, heads, parts, -1).float() * weight).sum(2)
        out[0, rows:] = merged.to(out.dtype)
    if side is not None:
        main.wait_stream(side)
    return out


def measure() -> list[dict]:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from cuda_cases import random_rows
    from fa4_check import anchor_tensors
    from flash_attn.cute.interface import _flash_attn_fwd
    from kernel_timing import median_ms
    rows, side = [], torch.cuda.Stream()

    def add(case, kernel, fn, flops, reference=None, **extra):
        out = fn()                                # compiles outside the timing
        ms = median_ms(fn)
        diff = None if reference is None else float((out.float() - reference).norm() / reference.norm())
        rows.append({"case": case, "kernel": kernel, "ms": ms, "eff_tflops": flops / ms / 1e9,
                     "rel_l2_vs_fa4": diff, **extra})
        print(rows[-1], flush=True)

    for seq, density in POINTS:
        scan = HEAD_SCAN if (seq, density) == POINTS[0] else (12,)
        for heads in scan:
            case = f"128-token random rows, S={seq}, d={density}, H={heads}"
            gen = torch.Generator(device="cuda").manual_seed(seq + heads)
            q, k, v = (torch.randn(1, seq, heads, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
                       for _ in range(3))
            mask = random_rows(heads, seq, density)
            flops = 4.0 * seq * seq * HEAD_DIM * heads * mask.density()
            waves = heads * seq / TILE / torch.cuda.get_device_properties(0).multi_processor_count

            def cudnn():
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    return torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
            add(case, "cuDNN dense", cudnn, flops / mask.density(), waves=waves)
            lists = anchor_tensors(mask, TILE)

            def own():
                return _flash_attn_fwd(q, k, v, causal=False, pack_gqa=False, block_sparse_tensors=lists)[0]
            reference = own().float()
            add(case, "FA4 block-sparse, one launch", own, flops, waves=waves)
            if heads != 12:
                continue
            cnt, idx = lists.full_block_cnt, lists.full_block_idx
            for tail, parts in TAIL_SPLITS:
                main_lists, tail_lists, first = split_tail(cnt, idx, tail, parts)
                for name, stream in (("side stream", side), ("one stream (control)", None)):
                    add(case, f"tail fill: last {tail} tiles x {parts} key parts, {name}",
                        lambda: tail_call(q, k, v, main_lists, tail_lists, first, parts, stream), flops, reference)
            add(case, "FA4 block-sparse, one launch, again", own, flops, waves=waves)
            del q, k, v, reference
            torch.cuda.empty_cache()
    return rows


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"# Last-wave probe, {meta['date']}", "", str(meta["versions"]), "",
             "| case | kernel | ms | eff TFLOP/s | waves | rel L2 vs FA4 |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        diff = "" if r["rel_l2_vs_fa4"] is None else f"{r['rel_l2_vs_fa4']:.1e}"
        waves = f"{r['waves']:.2f}" if "waves" in r else ""
        lines.append(f"| {r['case']} | {r['kernel']} | {r['ms']:.4f} | {r['eff_tflops']:.0f} | {waves} | {diff} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(probe_main(__doc__, "tail-probe", measure, markdown))
