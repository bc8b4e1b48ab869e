"""CUDA benchmark: sparsecore's lowerings against cuDNN and FA4 dense, FA4's own block sparsity,
FlexAttention and FlashInfer.

Run on a GPU machine (the device tool):

    python bench/cuda_benchmark.py --out bench/results [--sizes 32768 98304] [--frames] [--adaspa] [--selection]

All kernels run in one process on the same q, k, v (bf16, B=1, H=12, D=128). The kernels of one case (and of
one selection point) are timed together in interleaved rounds (``kernel_timing.interleaved_ms``: 3 rounds, each
round every kernel's ``median_ms``, ``triton.testing.do_bench``'s median over at least 10 repeats after a 50 ms
warm-up, starting one kernel later each round); a kernel's time is the median of its rounds, with their spread in
``extra``. (Before 2026-12-05 each kernel was timed once, one after another: on an H100 the same kernel so timed twice
in a row differed by up to 15%.)
Effective TFLOP/s = 4 * S^2 * D * H * density / time. Every sparse output is also
compared with FlexAttention's (an independent implementation), or with the Triton
lowering's where FlexAttention's 128-token tiles cannot take the mask, as a sanity check.
``--selection`` times each CUDA lowering over block size x density x length x head dim and
writes the fastest per point: the table behind ``backends/cuda/selection.py``.
Writes ``cuda-<date>.json`` and ``cuda-<date>.md`` and prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

from kernel_timing import interleaved_ms, summary  # noqa: E402

import sparsecore  # noqa: E402
from cuda_cases import FRAME_TOKENS, lvsa_frames, random_rows  # noqa: E402
from sparsecore import BlockMask  # noqa: E402
from report import time_one_backend, versions  # noqa: E402

HEADS, HEAD_DIM, DTYPE = 12, 128, torch.bfloat16
TRITON_SWEEP = [  # (block_m, block_n, num_warps, num_stages, use_tma)
    (128, 128, 8, 2, True), (128, 128, 8, 3, True), (128, 64, 4, 3, True), (128, 64, 8, 3, True),
    (128, 128, 8, 3, False), (128, 64, 4, 3, False), (64, 128, 4, 3, True), (128, 128, 4, 2, True),
]


@dataclass
class Row:
    case: str
    seq_len: int
    density: float
    kernel: str
    ms: float | None = None
    eff_tflops: float | None = None
    rel_diff_vs_flex: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


# ---------------------------------------------------------------- baselines
def flex_attention_fn(mask: BlockMask, q, k, v) -> Callable[[], torch.Tensor]:
    """FlexAttention with the same mask: 128-token blocks; blocks fully inside the mask skip the mask_mod."""
    from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask
    from torch.nn.attention.flex_attention import flex_attention
    tile = 128
    token_block_q = torch.from_numpy(_token_to_block(mask.q_offsets)).to(q.device)
    token_block_kv = torch.from_numpy(_token_to_block(mask.kv_offsets)).to(q.device)
    block_map = torch.from_numpy(mask.to_dense()).to(q.device)                         # [H, MB, NB]

    def mask_mod(b, h, q_idx, kv_idx):
        return block_map[h, token_block_q[q_idx], token_block_kv[kv_idx]]

    partial, full = _flex_tiles(mask, tile)
    def as_lists(tiles):
        counts = tiles.sum(-1).to(torch.int32)[None]
        order = torch.argsort(tiles.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)[None]
        return counts.contiguous(), order.contiguous()
    kv_num, kv_idx = as_lists(partial.to(q.device))
    full_num, full_idx = as_lists(full.to(q.device))
    block_mask = FlexBlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=tile,
                                              mask_mod=mask_mod, seq_lengths=(mask.q_len, mask.kv_len),
                                              compute_q_blocks=False)
    compiled = torch.compile(flex_attention)
    return lambda: compiled(q, k, v, block_mask=block_mask)


def _token_to_block(offsets) -> np.ndarray:
    return np.repeat(np.arange(len(offsets) - 1), np.diff(offsets)).astype(np.int64)


def _flex_tiles(mask: BlockMask, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head, which 128x128 token tiles are partly / fully kept (bool [H, Mt, Nt])."""
    dense = mask.to_dense()
    mt, nt = -(-mask.q_len // tile), -(-mask.kv_len // tile)
    q_first = _token_to_block(mask.q_offsets)[np.minimum(np.arange(mt) * tile, mask.q_len - 1)]
    q_last = _token_to_block(mask.q_offsets)[np.minimum(np.arange(mt) * tile + tile - 1, mask.q_len - 1)]
    k_first = _token_to_block(mask.kv_offsets)[np.minimum(np.arange(nt) * tile, mask.kv_len - 1)]
    k_last = _token_to_block(mask.kv_offsets)[np.minimum(np.arange(nt) * tile + tile - 1, mask.kv_len - 1)]
    any_kept = np.zeros((mask.num_heads, mt, nt), dtype=bool)
    all_kept = np.ones((mask.num_heads, mt, nt), dtype=bool)
    # a tile spans blocks q_first..q_last x k_first..k_last; with blocks >= the tile that is at most 2 x 2
    if (q_last - q_first).max() > 1 or (k_last - k_first).max() > 1:
        raise ValueError("the FlexAttention baseline supports IR blocks of at least 128 tokens")
    for qs in (q_first, q_last):
        for ks in (k_first, k_last):
            kept = dense[:, qs][:, :, ks]
            any_kept |= kept
            all_kept &= kept
    partial = any_kept & ~all_kept
    if mask.q_len % tile or mask.kv_len % tile:   # ragged last tiles always need the mask_mod
        edge = np.zeros((mt, nt), dtype=bool)
        edge[-1, :] = bool(mask.q_len % tile)
        edge[:, -1] |= bool(mask.kv_len % tile)
        partial |= all_kept & edge
        all_kept &= ~edge
    return torch.from_numpy(partial), torch.from_numpy(all_kept)


def flashinfer_variable_fn(mask: BlockMask, q, k, v) -> Callable[[], torch.Tensor]:
    """FlashInfer's own per-head wrapper (VariableBlockSparseAttentionWrapper), HND layout."""
    import flashinfer
    device = q.device
    workspace = torch.empty(128 << 20, dtype=torch.uint8, device=device)
    wrapper = flashinfer.VariableBlockSparseAttentionWrapper(workspace, backend="auto")
    heads = mask.num_heads
    row_sz = torch.from_numpy(mask.q_block_sizes).to(torch.int32)[None].repeat(heads, 1).to(device)
    col_sz = torch.from_numpy(mask.kv_block_sizes).to(torch.int32)[None].repeat(heads, 1).to(device)
    wrapper.plan(torch.from_numpy(mask.to_dense()).to(device), row_sz, col_sz, num_qo_heads=heads,
                 num_kv_heads=heads, head_dim=q.shape[-1], q_data_type=q.dtype, kv_data_type=q.dtype)
    q3, k3, v3 = q[0], k[0], v[0]
    return lambda: wrapper.run(q3, k3, v3)


def fa4_raw_fn(mask: BlockMask, q, k, v) -> Callable[[], torch.Tensor]:
    """FA4's block sparsity called directly with full blocks on the mask's own (tile-sized) blocks: the anchor."""
    from fa4_check import anchor_tensors
    from flash_attn.cute import flash_attn_func
    sparse = anchor_tensors(mask, mask.uniform_block_size("kv"))
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    return lambda: flash_attn_func(qt, kt, vt, block_sparse_tensors=sparse)[0]


def available(name: str, mask: BlockMask) -> bool:
    backend = sparsecore.registered_backends()[name]
    return backend.unavailable_reason("cuda") is None and not backend.capabilities.mask_problems(mask)


# -------------------------------------------------------------------- cases
def sparse_kernels(mask: BlockMask, q, k, v, sweep: bool, flashinfer: bool) -> dict[str, Callable[[], torch.Tensor]]:
    kernels: dict[str, Callable[[], torch.Tensor]] = {}
    default = sparsecore.compile(mask, device="cuda")
    default(q, k, v)
    kernels[f"sparsecore default ({default.backend.name})"] = lambda: default(q, k, v)
    for name in ("triton", "fa4") + (("flashinfer",) if flashinfer else ()):
        if available(name, mask):
            kern = sparsecore.compile(mask, device="cuda", backend=name)
            kernels[f"sparsecore {name}"] = lambda kern=kern: kern(q, k, v)
    if sweep:
        kernels |= _sweep(mask, q, k, v)
    block = mask.uniform_block_size("kv")
    if available("fa4", mask) and block in (64, 128) and mask.uniform_block_size("q") == block \
            and mask.kv_len % block == 0:
        kernels["FA4 block-sparse, raw (full blocks)"] = fa4_raw_fn(mask, q, k, v)
    if flashinfer and block is not None:
        kernels["FlashInfer VariableBlockSparse (per-head)"] = flashinfer_variable_fn(mask, q, k, v)
    return kernels


def _sweep(mask: BlockMask, q, k, v) -> dict[str, Callable[[], torch.Tensor]]:
    kernels = {}
    for bm, bn, warps, stages, tma in TRITON_SWEEP:
        kern = sparsecore.compile(mask, device="cuda", backend="triton", block_m=bm, block_n=bn,
                                  num_warps=warps, num_stages=stages, use_tma=tma)
        kernels[f"triton {bm}x{bn} w{warps} s{stages}{' tma' if tma else ''}"] = (lambda kern=kern: kern(q, k, v))
    return kernels


def run_case(case: str, mask: BlockMask, rows: list[Row], sweep: bool, flashinfer: bool, log) -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, mask.q_len, HEAD_DIM, device="cuda", dtype=DTYPE, generator=gen)
               for _ in range(3))
    density = mask.density()
    useful = 4.0 * mask.q_len * mask.kv_len * HEAD_DIM * HEADS * density
    kernels = sparse_kernels(mask, q, k, v, sweep, flashinfer)
    outputs = {}
    try:
        log(f"  {case}: compiling FlexAttention")
        reference_fn = flex_attention_fn(mask, q, k, v)
        outputs["FlexAttention (compiled)"] = (reference_fn, reference_fn())
        reference_name = "FlexAttention (compiled)"
    except ValueError as err:                  # blocks under 128 tokens: Flex's baseline here cannot take them
        log(f"  {case}: no FlexAttention baseline ({err}); outputs compared with the Triton lowering")
        reference_name = "sparsecore triton"
    for name, fn in kernels.items():
        log(f"  {case}: {name}")
        outputs[name] = (fn, fn())
    reference_out = outputs[reference_name][1]
    rounds = interleaved_ms({name: fn for name, (fn, _) in outputs.items()})
    for name, (fn, out) in outputs.items():
        timing = summary(rounds[name])
        ms = timing["ms"]
        rows.append(Row(case, mask.q_len, density, name, ms, useful / ms / 1e9,
                        None if name == reference_name else rel_diff(out, reference_out),
                        note=f"vs {reference_name}", extra={**timing, "ms_rounds": rounds[name]}))
        log(f"    {name:<45} {ms:9.3f} ms {useful / ms / 1e9:7.1f} eff TFLOP/s")


def run_dense(seq_len: int, rows: list[Row], log) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, seq_len, HEAD_DIM, device="cuda", dtype=DTYPE, generator=gen) for _ in range(3))

    def cudnn() -> torch.Tensor:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)
    calls = {"torch SDPA cuDNN (dense)": cudnn}
    if sparsecore.registered_backends()["fa4"].unavailable_reason("cuda") is None:
        from flash_attn.cute import flash_attn_func
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        calls["FA4 (dense)"] = lambda: flash_attn_func(qt, kt, vt)[0]
    flops = 4.0 * seq_len * seq_len * HEAD_DIM * HEADS
    for name, rounds in interleaved_ms(calls).items():
        timing = summary(rounds)
        rows.append(Row("dense", seq_len, 1.0, name, timing["ms"], flops / timing["ms"] / 1e9,
                        extra={**timing, "ms_rounds": rounds}))
        log(f"  dense S={seq_len}: {name} {timing['ms']:.3f} ms, {flops / timing['ms'] / 1e9:.1f} TFLOP/s")


def scheduling_ms(mask: BlockMask) -> dict[str, float]:
    """IR -> launch metadata time for the Triton lowering: the tile schedule, and a cached compile() after it."""
    from sparsecore.backends.cuda.tiling import schedule_tiles
    mask = mask.to("cuda")
    schedule_tiles(mask, 128, 128)                              # warm the CUDA ops
    torch.cuda.synchronize()
    start = time.perf_counter()
    schedule_tiles(mask, 128, 128)
    torch.cuda.synchronize()
    first = (time.perf_counter() - start) * 1e3
    sparsecore.compile(mask, device="cuda", backend="triton")
    start = time.perf_counter()
    sparsecore.compile(mask, device="cuda", backend="triton")
    cached = (time.perf_counter() - start) * 1e3
    return {"schedule_on_gpu_ms": first, "compile_cached_ms": cached}


def selection_table(log, flashinfer: bool, blocks: tuple[int, ...] = (64, 128, FRAME_TOKENS)) -> list[dict]:
    """Each lowering's time per (block size, density, S, head dim): which one ``compile`` should prefer."""
    points = []
    names = ("triton", "fa4") + (("flashinfer",) if flashinfer else ())
    for block in blocks:
        for seq_len in (32760, 98280) if block == FRAME_TOKENS else (32768, 98304):
            for density in (0.1, 0.25):
                for head_dim in (64, 128):
                    mask = random_rows(HEADS, seq_len, density, block=block)
                    gen = torch.Generator(device="cuda").manual_seed(0)
                    q, k, v = (torch.randn(1, HEADS, seq_len, head_dim, device="cuda", dtype=DTYPE, generator=gen)
                               for _ in range(3))
                    calls = {}
                    for name in names:
                        if available(name, mask):
                            kern = sparsecore.compile(mask, device="cuda", backend=name)
                            kern(q, k, v)
                            calls[name] = lambda kern=kern: kern(q, k, v)
                    ms = {name: summary(rounds)["ms"] for name, rounds in interleaved_ms(calls).items()}
                    points.append(selection_point(mask, density, head_dim, ms))
                    log(f"  selection block {block} d={points[-1]['density']:.4f} (nominal {density}) S={seq_len} "
                        f"D={head_dim}: " + ", ".join(f"{n} {t:.2f} ms" for n, t in ms.items())
                        + f" -> {points[-1]['fastest']}")
    return points


def selection_point(mask: BlockMask, nominal_density: float, head_dim: int, ms: dict[str, float]) -> dict:
    """One point of the selection table: the mask's actual density and each lowering's eff TFLOP/s from the mask's
    kept FLOPs (:meth:`BlockMask.flops`), not from ``nominal_density``. ``random_rows`` keeps a whole number of key
    blocks per row, so with 1560-token frame blocks (21 or 63 per row) 0.1 comes out as 0.095 and 0.25 as 0.238 or
    0.254."""
    flops = mask.flops(head_dim)
    fastest = min(ms, key=ms.get)
    return {"block": mask.uniform_block_size("kv"), "nominal_density": nominal_density, "density": mask.density(),
            "seq_len": mask.q_len, "head_dim": head_dim, "ms": ms,
            "eff_tflops": {name: flops / t / 1e9 for name, t in ms.items()}, "fastest": fastest}


def markdown(rows: list[Row], meta: dict) -> str:
    lines = [f"# CUDA block-sparse attention benchmark, {meta['date']}", "",
             f"Machine: {meta['versions']['gpu']}; torch {meta['versions']['torch']}, triton "
             f"{meta['versions']['triton']}, flashinfer {meta['versions']['flashinfer']}, flash-attn-4 "
             f"{meta['versions']['flash_attn_4']} (CuTe DSL {meta['versions']['cutlass_dsl']}), CUDA "
             f"{meta['versions']['cuda']}, cuDNN {meta['versions']['cudnn']}.",
             f"bf16, B=1, H={HEADS}, D={HEAD_DIM}; a case's kernels timed together in 3 interleaved rounds (each "
             "round a `do_bench` median of at least 10 repeats after a 50 ms warm-up): the median round, and the "
             "rounds' spread. "
             "eff TFLOP/s = 4*S^2*D*H*density / time. rel diff: relative L2 distance to FlexAttention's output "
             "(or the Triton lowering's where Flex's 128-token tiles cannot take the mask).", "",
             "| case | S | density | kernel | ms | spread ms | eff TFLOP/s | rel diff |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        diff = "" if r.rel_diff_vs_flex is None else f"{r.rel_diff_vs_flex:.1e}"
        spread = f"{r.extra['ms_min']:.3f}-{r.extra['ms_max']:.3f}" if "ms_min" in r.extra else ""
        lines.append(f"| {r.case} | {r.seq_len} | {r.density:.4f} | {r.kernel} | {r.ms:.3f} | {spread} | "
                     f"{r.eff_tflops:.1f} | {diff} |")
    if meta.get("selection"):
        lines += selection_markdown(meta["selection"])
    if meta.get("scheduling"):
        lines += ["", "Scheduling (IR -> Triton launch metadata), 98304 tokens, 12 heads, d=0.25: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in meta["scheduling"].items())]
    return "\n".join(lines) + "\n"


def selection_markdown(points: list[dict]) -> list[str]:
    """The selection table's lines: each point's actual density (its nominal one beside it) and the fastest
    lowering's eff TFLOP/s from the mask's kept FLOPs."""
    lines = ["", "## Fastest lowering per point (drives `backends/cuda/selection.py`)", "",
             "density: the mask's actual kept fraction (`mask.density()`), nominal in brackets; eff TFLOP/s: the "
             "fastest lowering's, from the mask's kept FLOPs (`mask.flops(D)`).", "",
             "| block | density | S | head dim | triton ms | fa4 ms | flashinfer ms | fastest | eff TFLOP/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        ms = [("" if p["ms"].get(n) is None else f"{p['ms'][n]:.3f}") for n in ("triton", "fa4", "flashinfer")]
        lines.append(f"| {p['block']} | {p['density']:.4f} ({p['nominal_density']}) | {p['seq_len']} | "
                     f"{p['head_dim']} | {' | '.join(ms)} | {p['fastest']} | {p['eff_tflops'][p['fastest']]:.1f} |")
    return lines


def main() -> int:
    time_one_backend()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--sizes", type=int, nargs="*", default=[32768, 98304])
    parser.add_argument("--densities", type=float, nargs="*", default=[0.1, 0.25, 0.5])
    parser.add_argument("--frames", action="store_true", help="also the LVSA frame mask at 188,760 tokens")
    parser.add_argument("--sweep", action="store_true", help="time every Triton config of TRITON_SWEEP too")
    parser.add_argument("--no-flashinfer", action="store_true", help="skip FlashInfer kernels (no JIT wait)")
    parser.add_argument("--adaspa", action="store_true", help="also an AdaSpa-shaped mask: 64-token blocks at 6x")
    parser.add_argument("--selection", action="store_true", help="time every lowering per (block, density, S, D)")
    parser.add_argument("--selection-blocks", type=int, nargs="*", default=[64, 128, FRAME_TOKENS],
                        help="the block sizes of the selection sweep")
    args = parser.parse_args()
    log = lambda s: print(s, flush=True)  # noqa: E731
    if not torch.cuda.is_available():
        print("cuda_benchmark.py needs a CUDA GPU", file=sys.stderr)
        return 2
    rows: list[Row] = []
    meta = {"date": datetime.date.today().isoformat(), "versions": versions()}
    log(json.dumps(meta))
    args.out.mkdir(parents=True, exist_ok=True)
    table = bool(args.sizes or args.frames or args.adaspa)
    stem = args.out / f"cuda-{'' if table or not args.selection else 'selection-'}{meta['date']}"   # not the table's

    def save() -> None:            # after every case: a call its time limit cuts keeps the rows timed so far
        stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": [vars(r) for r in rows]}, indent=1))
        stem.with_suffix(".md").write_text(markdown(rows, meta))

    for seq_len in args.sizes:
        run_dense(seq_len, rows, log)
        for density in args.densities:
            run_case(f"random 128-blocks d={density}", random_rows(HEADS, seq_len, density), rows,
                     args.sweep and seq_len == args.sizes[0], not args.no_flashinfer, log)
            save()
    if 98304 in args.sizes:
        meta["scheduling"] = scheduling_ms(random_rows(HEADS, 98304, 0.25))
    if args.frames:
        frames = lvsa_frames(HEADS)
        run_dense(frames.q_len, rows, log)
        run_case(f"LVSA frames ({FRAME_TOKENS}-token blocks, 21 of 121)", frames, rows, args.sweep,
                 not args.no_flashinfer, log)
        save()
    if args.adaspa:
        from fa4_check_masks import adaspa_large
        mask = adaspa_large(HEADS, 188736, 64, (0.1, 0.2, 0.3), seed=0)
        run_dense(mask.q_len, rows, log)
        run_case("AdaSpa-shaped (64-token blocks, 3 row-count levels)", mask, rows, False, not args.no_flashinfer, log)
    if args.selection:
        meta["selection"] = selection_table(log, not args.no_flashinfer, tuple(args.selection_blocks))
    save()
    print(markdown(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
