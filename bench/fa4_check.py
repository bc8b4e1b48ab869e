"""GPU check of the ``fa4`` lowering (issue 13): correctness first, then timing against the anchors.

Run on an H100/H200 with flash-attn-4 4.0.0b36 installed (one GPU, under 8 minutes):

    python bench/fa4_check.py --out OUTDIR [--quick] [--no-timing]

1. Environment: GPU, versions, ``Fa4Backend().unavailable_reason("cuda")``, and what raw FA4
   writes for query tiles with no blocks (the 0 / -inf the lowering also forces).
2. Correctness of the lowering (``sparsecore.compile(mask, device=DEVICE, backend="fa4")`` when
   registered, else the backend's ``lower`` directly) against float32 dense attention under the
   IR's token mask on the same bf16/fp16 inputs: relative L2 error of the output, max |LSE
   difference| on rows with keys, and rows with no keys exactly 0 / -inf. Cases: random
   per-head 128x128 masks, 64-token AdaSpa-like masks (head-adaptive row counts + text sink;
   default 64x64 tiles and forced 128x128 tiles, i.e. the mask_mod path), LVSA 1560-token
   frames, odd text blocks and q_len != kv_len, short last blocks, empty rows and an empty
   head, tiny 16-token blocks, GQA 2:1, B=2, D=64/96/128, fp16/bf16, an all-empty mask.
   The first call of each kernel configuration is timed (CuTe DSL compile).
3. Timing (``kernel_timing.median_ms``: ``do_bench``'s median of at least 10 repeats; bf16, B=1, H=12, D=128):
   cuDNN dense SDPA, FA4 dense, FA4 block-sparse called raw with full blocks (the anchor), and the lowering, at
   S=32768/98304 and densities 0.1/0.25/0.5 (per-head random rows, diagonal kept); the LVSA
   frame mask at 188760 tokens; an AdaSpa-shaped mask at 188736 tokens with 64-token blocks
   (~20% density, three row-count levels); conversion (IR -> FA4 tensors) ms per mask.

Every case runs in its own try/except: a failure is printed with ``!!! FAIL`` and recorded,
and the script goes on. Writes ``fa4-check.json`` and ``fa4-check.md`` to ``--out`` and prints
the table last. Exit status 1 if any check failed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

from kernel_timing import median_ms  # noqa: E402

import sparsecore  # noqa: E402
from sparsecore.registry import registered_backends  # noqa: E402
from cuda_cases import lvsa_frames, random_rows  # noqa: E402
from sparsecore import BlockMask  # noqa: E402
from sparsecore.backends.cuda.fa4_backend import Fa4Backend, Fa4Options  # noqa: E402
from sparsecore.backends.cuda.fa4_layout import to_fa4  # noqa: E402
from sparsecore.ir.host_facts import as_new  # noqa: E402
from report import time_one_backend, versions  # noqa: E402

HEADS, HEAD_DIM = 12, 128
TIME_BUDGET_S = 420          # stop starting new timing cases after this (the lead's limit is 8 minutes)
REL_L2_LIMIT = {torch.bfloat16: 1.5e-2, torch.float16: 4e-3}
LSE_LIMIT = 2e-2
START = time.perf_counter()
DEVICE = "cuda"               # the GPU (a module global so the script can be smoke-tested on CPU)
FAILURES: list[str] = []


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - START:6.1f}s] {msg}", flush=True)


SKIP_MASK_MOD = False         # --skip-mask-mod: leave out every case that runs mask tiles
BROKEN: list[str] = []       # set when the CUDA context no longer works (a kernel fault): later cases are skipped


def fail(case: str, error: str) -> None:
    FAILURES.append(f"{case}: {error}")
    print(f"!!! FAIL {case}: {error}", flush=True)
    if DEVICE == "cuda" and not BROKEN:
        try:
            torch.cuda.synchronize()
            torch.ones(1, device=DEVICE).sum().item()
        except Exception as exc:  # noqa: BLE001  (a sticky CUDA error: nothing after this can run)
            BROKEN.append(f"after {case}: {type(exc).__name__}: {exc}")
            print(f"!!! CUDA CONTEXT BROKEN {BROKEN[0]}; the remaining cases are skipped. If a mask_mod case "
                  f"broke it, rerun with --skip-mask-mod to measure the rest.", flush=True)


def mask_mod_case(mask: BlockMask, options: dict) -> bool:
    """Whether the lowering would run mask tiles for this (small) mask: converted on CPU, SM90 tiles."""
    from sparsecore.backends.cuda.fa4_backend import tile_shape
    return to_fa4(mask, *tile_shape(mask, 9, Fa4Options(**options)), "cpu").needs_mask_mod


# ----------------------------------------------------------------------------------------- masks
def from_rows(rows: list[list[list[int]]], q_offsets, kv_offsets, meta: dict | None = None) -> BlockMask:
    return BlockMask.from_lists(rows, np.asarray(q_offsets), np.asarray(kv_offsets), meta=meta or {})


def random_mask(heads: int, q_offsets, kv_offsets, density: float, seed: int, empty_rows: float = 0.0) -> BlockMask:
    rng = np.random.default_rng(seed)
    mb, nb = len(q_offsets) - 1, len(kv_offsets) - 1
    keep = rng.random((heads, mb, nb)) < density
    keep[rng.random((heads, mb)) < empty_rows] = False
    return from_rows([[np.nonzero(keep[h, i])[0].tolist() for i in range(mb)] for h in range(heads)],
                     q_offsets, kv_offsets)


def adaspa_like(heads: int, video: int, text: int, block: int, levels: tuple[float, ...], seed: int) -> BlockMask:
    """64-token blocks over video then text; each head keeps one of ``levels`` fractions of video blocks
    (top-k of random scores, diagonal included), every row keeps all text blocks, text rows keep all."""
    offsets = BlockMask.uniform_offsets(video, block)
    if text:
        offsets = np.concatenate([offsets, video + BlockMask.uniform_offsets(text, block)[1:]])
    nv, nb = len(BlockMask.uniform_offsets(video, block)) - 1, len(offsets) - 1
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    scores = torch.rand(heads, nv, nv, device=DEVICE, generator=gen)
    scores.diagonal(dim1=1, dim2=2).fill_(2.0)
    keep = torch.zeros(heads, nb, nb, dtype=torch.bool, device=DEVICE)
    for h in range(heads):                          # per head: one top-k over all its rows (a few heads)
        k = max(1, round(levels[h * len(levels) // heads] * nv))
        top = scores[h].topk(k, dim=-1).indices
        keep[h, :nv].scatter_(1, top, True)
    keep[:, :, nv:] = True
    keep[:, nv:, :] = True
    q_len = int(offsets[-1])
    block_map = keep.cpu().numpy()
    return BlockMask.from_lists([[np.nonzero(block_map[h, i])[0] for i in range(nb)] for h in range(heads)],
                                offsets, offsets, meta={"method": "adaspa_like", "levels": list(levels),
                                                        "q_len": q_len})


def adaspa_large(heads: int, seq: int, block: int, levels: tuple[float, ...], seed: int) -> BlockMask:
    """The timing mask: S tokens in 64-token blocks, no text, vectorized (top-k per row on the GPU)."""
    n = seq // block
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    keep = torch.zeros(heads, n, n, dtype=torch.bool, device=DEVICE)
    for g, level in enumerate(levels):               # one top-k per row-count level (3 calls)
        hs = [h for h in range(heads) if h * len(levels) // heads == g]
        scores = torch.rand(len(hs), n, n, device=DEVICE, generator=gen)
        scores.diagonal(dim1=1, dim2=2).fill_(2.0)
        keep[hs] = torch.zeros(len(hs), n, n, dtype=torch.bool, device=DEVICE).scatter_(
            2, scores.topk(max(1, round(level * n)), dim=-1).indices, True)
        del scores
    return BlockMask.from_dense(keep.cpu().numpy(), seq, seq, block,
                                meta={"method": "adaspa_large", "levels": list(levels)})


def frame_mask(heads: int, frames: int, frame: int, window: int, anchors: int) -> BlockMask:
    offsets = np.arange(frames + 1, dtype=np.int64) * frame
    rows = [sorted({*range(max(0, t - window), min(frames, t + window + 1)), *range(0, frames, anchors)})
            for t in range(frames)]
    return from_rows([rows] * heads, offsets, offsets)


# ----------------------------------------------------------------------------------------- kernels
def fa4_kernel(mask: BlockMask, **options: Any) -> tuple[Callable, Callable[[], Any]]:
    """((q, k, v, scale, return_lse) -> (out, lse), () -> the Fa4Launch behind it after a call): through
    compile() if 'fa4' is registered (the public path), else the backend's lower()."""
    if "fa4" not in registered_backends():
        launch = Fa4Backend().lower(mask, "cuda", Fa4Options(**options))
        return launch, lambda: launch
    kernel = sparsecore.compile(mask, device="cuda", backend="fa4", **options)

    def run(q, k, v, scale, return_lse):
        return kernel(q, k, v, scale=scale, return_lse=True) if return_lse else (kernel(q, k, v, scale=scale), None)

    def launch():
        assert kernel.backend.name == "fa4", f"compile(backend='fa4') ran {kernel.backend.name!r}"
        runs = list(getattr(kernel, "_runs", {}).values()) + [getattr(kernel, "_run", None)]
        return next((r for r in runs if hasattr(r, "prepare")), None)
    return run, launch


def reference(q, k, v, tokens: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 dense attention under ``tokens`` [H, Lq, Lk]; rows with no key: out 0, LSE -inf."""
    group = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    scores = (q.float() @ kf.transpose(-1, -2)) * scale
    scores.masked_fill_(~tokens[None], -math.inf)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.softmax(scores, dim=-1).nan_to_num_(0.0)
    return probs @ vf, lse


def compare(out, lse, ref_out, ref_lse, tokens, dtype) -> dict:
    has_keys = tokens.any(-1)                                                  # [H, Lq]
    rows = has_keys[None].expand(out.shape[0], -1, -1)
    o, r = out.float()[rows], ref_out[rows]
    rel = float((o - r).norm() / r.norm().clamp_min(1e-30)) if r.numel() else 0.0
    lse_diff = float((lse[rows] - ref_lse[rows]).abs().max()) if r.numel() else 0.0
    empty = ~rows
    empty_out_zero = bool((out[empty] == 0).all()) if empty.any() else True
    empty_lse_inf = bool(torch.isneginf(lse[empty]).all()) if empty.any() else True
    finite_ok = bool(torch.isfinite(lse[rows]).all() and torch.isfinite(out.float()).all())
    ok = (rel < REL_L2_LIMIT[dtype] and lse_diff < LSE_LIMIT and empty_out_zero and empty_lse_inf and finite_ok)
    return {"rel_l2": rel, "max_lse_diff": lse_diff, "empty_rows": int(empty[0].sum()),
            "empty_out_zero": empty_out_zero, "empty_lse_inf": empty_lse_inf, "finite": finite_ok, "ok": ok}


def check_case(name: str, mask: BlockMask, *, dtype=torch.bfloat16, head_dim=128, batch=1, kv_heads=None,
               scale=None, **options) -> dict:
    if BROKEN or (SKIP_MASK_MOD and mask_mod_case(mask, options)):
        log(f"check {name}: skipped ({'CUDA context broken' if BROKEN else '--skip-mask-mod'})")
        return {"case": name, "ok": True, "skipped": True}
    record: dict[str, Any] = {"case": name, "dtype": str(dtype).removeprefix("torch."), "head_dim": head_dim,
                              "batch": batch, "heads": mask.num_heads, "kv_heads": kv_heads or mask.num_heads,
                              "q_len": mask.q_len, "kv_len": mask.kv_len, "density": mask.density(),
                              "options": options}
    try:
        gen = torch.Generator(device=DEVICE).manual_seed(len(name))
        q = torch.randn(batch, mask.num_heads, mask.q_len, head_dim, device=DEVICE, dtype=dtype, generator=gen)
        k = torch.randn(batch, kv_heads or mask.num_heads, mask.kv_len, head_dim, device=DEVICE, dtype=dtype,
                        generator=gen)
        v = torch.randn_like(k)
        scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
        start = time.perf_counter()
        run, get_launch = fa4_kernel(mask, **options)
        out, lse = run(q, k, v, scale, True)
        torch.cuda.synchronize()
        record["first_call_s"] = time.perf_counter() - start
        launch = get_launch()
        record["path"] = "compile()" if run is not launch else "Fa4Backend.lower()"
        if launch is not None:
            layout = launch.converted(q.device).layout
            record.update(tile=[layout.tile_m, layout.tile_n], full_tiles=layout.num_full_tiles,
                          mask_tiles=layout.num_mask_tiles, mask_mod=layout.needs_mask_mod,
                          computed_over_kept=layout.computed_pairs() / max(1.0, mask.density() * mask.num_heads
                                                                           * mask.q_len * mask.kv_len))
        tokens = torch.from_numpy(mask.token_mask(limit=1 << 31)).to(DEVICE)
        ref_out, ref_lse = reference(q, k, v, tokens, scale)
        assert out.shape == q.shape and lse.shape == (batch, mask.num_heads, mask.q_len), \
            f"shapes: out {list(out.shape)}, lse {list(lse.shape)}"
        record.update(compare(out, lse, ref_out, ref_lse, tokens, dtype))
        out2, none = run(q, k, v, scale, False)
        record["no_lse_matches"] = bool(torch.equal(out2, out)) and none is None
        record["ok"] = record["ok"] and record["no_lse_matches"]
        del ref_out, ref_lse, tokens
    except Exception as exc:  # noqa: BLE001
        record.update(ok=False, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-2000:])
    status = "ok" if record["ok"] else "FAIL"
    log(f"check {name}: {status} rel_l2={record.get('rel_l2', float('nan')):.2e} "
        f"lse={record.get('max_lse_diff', float('nan')):.2e} tile={record.get('tile')} "
        f"mask_tiles={record.get('mask_tiles')} first_call={record.get('first_call_s', float('nan')):.2f}s")
    if not record["ok"]:
        fail(f"check {name}", record.get("error") or {k: record.get(k) for k in (
            "rel_l2", "max_lse_diff", "empty_out_zero", "empty_lse_inf", "finite", "no_lse_matches")})
    torch.cuda.empty_cache()
    return record


def raw_empty_tiles() -> dict:
    """What raw FA4 writes for query tiles whose lists are empty (no forcing by us)."""
    from flash_attn.cute import flash_attn_func
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch
    q = torch.randn(1, 256, 2, 128, device=DEVICE, dtype=torch.bfloat16)
    k = torch.randn(1, 256, 2, 128, device=DEVICE, dtype=torch.bfloat16)
    cnt = torch.tensor([[[1, 0], [0, 0]]], dtype=torch.int32, device=DEVICE)    # head 0 tile 0 has one block
    idx = torch.zeros(1, 2, 2, 1, dtype=torch.int32, device=DEVICE)
    zero = torch.zeros_like(cnt)
    sparse = BlockSparseTensorsTorch(mask_block_cnt=zero, mask_block_idx=idx, full_block_cnt=cnt,
                                     full_block_idx=idx, block_size=(128, 128))
    out, lse = flash_attn_func(q, k, k, block_sparse_tensors=sparse, return_lse=True, pack_gqa=False)
    return {"out_zero_on_empty_tiles": bool((out[0, 128:, 0] == 0).all() and (out[0, :, 1] == 0).all()),
            "lse_neg_inf_on_empty_tiles": bool(torch.isneginf(lse[0, 1]).all() and torch.isneginf(lse[0, 0, 128:]).all()),
            "lse_finite_on_kept": bool(torch.isfinite(lse[0, 0, :128]).all())}


def run_checks(quick: bool) -> list[dict]:
    """Full-tile cases first, then the mask_mod cases (a fault there must not hide the rest)."""
    out = []
    r128 = BlockMask.uniform_offsets(2048, 128)
    out.append(check_case("random128 bf16 D128", random_mask(4, r128, r128, 0.3, 0)))
    out.append(check_case("random128 fp16 D64", random_mask(4, r128, r128, 0.3, 1), dtype=torch.float16, head_dim=64))
    out.append(check_case("random128 GQA2:1 B=2 scale0.5", random_mask(4, r128, r128, 0.3, 2), batch=2, kv_heads=2,
                          scale=0.5))
    out.append(check_case("random128 bf16 D96", random_mask(2, r128, r128, 0.3, 3), head_dim=96))
    aligned = adaspa_like(6, 64 * 32, 0, 64, (0.1, 0.25, 0.5), seed=1)
    out.append(check_case("adaspa64 aligned, 64x64 full tiles bf16", aligned))
    out.append(check_case("adaspa64 aligned, 64x64 fp16 D64 GQA2:1", aligned, dtype=torch.float16, head_dim=64,
                          kv_heads=3))
    short = BlockMask.uniform_offsets(2000, 128)
    out.append(check_case("short last blocks 2000/128", random_mask(4, short, short, 0.4, 5)))
    empty = random_mask(4, r128, r128, 0.3, 6, empty_rows=0.25)
    rows = [[list(map(int, empty.row(h, i))) for i in range(empty.num_q_blocks)] for h in range(4)]
    rows[3] = [[] for _ in range(empty.num_q_blocks)]                           # a head that keeps nothing
    out.append(check_case("empty rows + empty head", from_rows(rows, r128, r128)))
    out.append(check_case("all empty", from_rows([[[]] * 16] * 2, r128, r128)))
    if not quick:
        big = BlockMask.uniform_offsets(8192, 128)
        out.append(check_case("random128 S8192 bf16 H8", random_mask(8, big, big, 0.1, 8)))
    # mask tiles (the CuTe DSL mask_mod with aux tensors)
    ada = adaspa_like(6, 64 * 30 + 24, 77, 64, (0.1, 0.25, 0.5), seed=0)
    out.append(check_case("adaspa64 + text, default tiles bf16", ada))
    out.append(check_case("adaspa64 + text, tiles 128x128 bf16", ada, tile_m=128, tile_n=128))
    out.append(check_case("adaspa64 + text, tiles 128x64 fp16 GQA2:1", ada, dtype=torch.float16, kv_heads=3,
                          tile_m=128, tile_n=64))
    out.append(check_case("adaspa64 + text, tiles 64x128 D64", ada, head_dim=64, tile_m=64, tile_n=128))
    out.append(check_case("lvsa 6x1560 frames bf16", frame_mask(2, 6, 1560, 1, 4)))
    out.append(check_case("lvsa 6x1560 frames fp16 D64 GQA", frame_mask(4, 6, 1560, 1, 4), dtype=torch.float16,
                          head_dim=64, kv_heads=2))
    q_off = np.array([0, 300, 301, 777, 1000])                                  # odd text blocks, q_len != kv_len
    kv_off = np.array([0, 64, 128, 200, 1111, 1500])
    out.append(check_case("odd blocks q1000 kv1500", random_mask(3, q_off, kv_off, 0.6, 4)))
    tiny = BlockMask.uniform_offsets(1024, 16)
    out.append(check_case("tiny 16-token blocks", random_mask(2, tiny, tiny, 0.2, 7)))
    out.append(check_case("odd blocks D96 empty rows, tiles 64x128", random_mask(2, q_off, kv_off, 0.5, 9,
                                                                                 empty_rows=0.3),
                          head_dim=96, tile_m=64))
    return out


# ----------------------------------------------------------------------------------------- timing
def bench(fn: Callable[[], object]) -> float:
    return median_ms(fn)


def anchor_tensors(mask: BlockMask, block: int):
    """FA4 full-block tensors straight from the block map (independent of fa4_layout): the anchor."""
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch
    dense = torch.from_numpy(mask.to_dense()).to(DEVICE)                       # [H, MB, NB]
    cnt = dense.sum(-1, dtype=torch.int32)
    width = int(cnt.max())
    order = torch.sort((~dense).to(torch.int8), dim=-1, stable=True).indices[..., :width].to(torch.int32)
    zero = torch.zeros_like(cnt)
    return BlockSparseTensorsTorch(mask_block_cnt=zero[None], mask_block_idx=order[None, :, :, :1].contiguous(),
                                   full_block_cnt=cnt[None], full_block_idx=order[None].contiguous(),
                                   block_size=(block, block))


def conversion_ms(mask: BlockMask, tile_m: int, tile_n: int) -> dict:
    to_fa4(mask, tile_m, tile_n, DEVICE)                                        # warm the ops
    times = []
    for _ in range(3):
        torch.cuda.synchronize()
        fresh = as_new(mask) if isinstance(mask, BlockMask) else mask      # a mask new at this call
        start = time.perf_counter()
        to_fa4(fresh, tile_m, tile_n, DEVICE)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    result = {"host_lists_ms": float(np.median(times))}
    if hasattr(mask, "to"):                                                    # lists already on the GPU
        try:
            on_gpu = mask.to(DEVICE)
            times = []
            for _ in range(3):
                torch.cuda.synchronize()
                fresh = as_new(on_gpu)
                start = time.perf_counter()
                to_fa4(fresh, tile_m, tile_n, DEVICE)
                torch.cuda.synchronize()
                times.append((time.perf_counter() - start) * 1e3)
            result["device_lists_ms"] = float(np.median(times))
        except Exception as exc:  # noqa: BLE001
            result["device_lists_error"] = f"{type(exc).__name__}: {exc}"
    return result


class Timer:
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def add(self, case: str, seq: int, density: float, kernel: str, fn: Callable[[], object], flops: float,
            **extra: Any) -> float | None:
        if BROKEN:
            self.rows.append({"case": case, "seq": seq, "density": density, "kernel": kernel, "skipped": True})
            return None
        if time.perf_counter() - START > TIME_BUDGET_S:
            log(f"  skip {case} / {kernel}: over the time budget of {TIME_BUDGET_S} s")
            self.rows.append({"case": case, "seq": seq, "density": density, "kernel": kernel, "skipped": True})
            return None
        try:
            ms = bench(fn)
            row = {"case": case, "seq": seq, "density": density, "kernel": kernel, "ms": ms,
                   "eff_tflops": flops / ms / 1e9, **extra}
            log(f"  {case} S={seq} d={density:.4f} {kernel}: {ms:.3f} ms, {flops / ms / 1e9:.1f} eff TFLOP/s")
        except Exception as exc:  # noqa: BLE001
            row = {"case": case, "seq": seq, "density": density, "kernel": kernel, "error": f"{type(exc).__name__}: {exc}"}
            fail(f"time {case} {kernel}", row["error"])
            ms = None
        self.rows.append(row)
        torch.cuda.empty_cache()
        return ms


def qkv(seq: int, dtype=torch.bfloat16):
    gen = torch.Generator(device=DEVICE).manual_seed(seq)
    return tuple(torch.randn(1, HEADS, seq, HEAD_DIM, device=DEVICE, dtype=dtype, generator=gen) for _ in range(3))


def time_dense(timer: Timer, case: str, seq: int, q, k, v) -> None:
    from flash_attn.cute import flash_attn_func
    from torch.nn.attention import SDPBackend, sdpa_kernel
    flops = 4.0 * seq * seq * HEAD_DIM * HEADS

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)
    timer.add(case, seq, 1.0, "cuDNN SDPA dense", cudnn, flops)
    qs, ks, vs = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    timer.add(case, seq, 1.0, "FA4 dense", lambda: flash_attn_func(qs, ks, vs), flops)


def time_sparse(timer: Timer, case: str, mask: BlockMask, q, k, v, anchor_block: int | None,
                variants: dict[str, dict]) -> list[dict]:
    from flash_attn.cute import flash_attn_func
    seq, density = mask.q_len, mask.density()
    flops = 4.0 * seq * seq * HEAD_DIM * HEADS * density
    conversions = []
    scale = 1.0 / math.sqrt(HEAD_DIM)
    anchor_out = None
    if anchor_block is not None:
        try:
            sparse = anchor_tensors(mask, anchor_block)
            qs, ks, vs = (t.transpose(1, 2).contiguous() for t in (q, k, v))
            fn = lambda: flash_attn_func(qs, ks, vs, block_sparse_tensors=sparse, pack_gqa=False)  # noqa: E731
            timer.add(case, seq, density, f"FA4 block-sparse raw, full {anchor_block}x{anchor_block} (anchor)", fn, flops)
            anchor_out = fn()[0].transpose(1, 2)
            del qs, ks, vs
        except Exception as exc:  # noqa: BLE001
            fail(f"anchor {case}", f"{type(exc).__name__}: {exc}")
    for label, options in variants.items():
        if BROKEN or (SKIP_MASK_MOD and label != "default") or (SKIP_MASK_MOD and case.startswith("lvsa")):
            log(f"  skip {case} / {label}")
            continue
        try:
            run = Fa4Backend().lower(mask, "cuda", Fa4Options(**options))
            start = time.perf_counter()
            out, _ = run(q, k, v, scale, False)
            torch.cuda.synchronize()
            first = time.perf_counter() - start
            layout = run.converted(q.device).layout
            extra = {"tile": [layout.tile_m, layout.tile_n], "mask_tiles": layout.num_mask_tiles,
                     "full_tiles": layout.num_full_tiles, "first_call_s": first}
            if anchor_out is not None:
                extra["rel_diff_vs_anchor"] = float((out.float() - anchor_out.float()).norm()
                                                    / anchor_out.float().norm())
            timer.add(case, seq, density, f"sparsecore fa4 {label}", lambda run=run: run(q, k, v, scale, False), flops,
                      **extra)
            conv = {"case": case, "tiles": [layout.tile_m, layout.tile_n], **conversion_ms(mask, layout.tile_m,
                                                                                        layout.tile_n)}
            log(f"  conversion {case} {label}: {conv}")
            conversions.append(conv)
            del run, out
        except Exception as exc:  # noqa: BLE001
            fail(f"time {case} {label}", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-1500:]}")
    torch.cuda.empty_cache()
    return conversions


def run_timing(quick: bool) -> tuple[list[dict], list[dict]]:
    timer, conversions = Timer(), []
    for seq in ((32768,) if quick else (32768, 98304)):
        q, k, v = qkv(seq)
        time_dense(timer, "dense", seq, q, k, v)
        for density in (0.1, 0.25, 0.5):
            try:
                mask = random_rows(HEADS, seq, density, seed=int(density * 100))
            except Exception as exc:  # noqa: BLE001
                fail(f"mask random {seq} {density}", repr(exc))
                continue
            conversions += time_sparse(timer, "random128", mask, q, k, v, 128, {"default": {}})
        del q, k, v
        torch.cuda.empty_cache()
    if quick:
        return timer.rows, conversions
    try:
        mask = lvsa_frames(HEADS)                                               # 188760 tokens, density 0.1736
        q, k, v = qkv(mask.q_len)
        time_dense(timer, "dense", mask.q_len, q, k, v)
        conversions += time_sparse(timer, "lvsa 121x1560", mask, q, k, v, None,
                                   {"default": {}, "keys in their order": {"reorder_keys": False}})
        del q, k, v
    except Exception as exc:  # noqa: BLE001
        fail("lvsa timing", f"{type(exc).__name__}: {exc}")
    try:
        mask = adaspa_large(HEADS, 188736, 64, (0.1, 0.2, 0.3), seed=0)
        q, k, v = qkv(mask.q_len)
        conversions += time_sparse(timer, "adaspa 188736/64", mask, q, k, v, 64,
                                   {"default": {}, "tiles 128x64": {"tile_m": 128, "tile_n": 64},
                                    "tiles 128x128": {"tile_m": 128, "tile_n": 128}})
        del q, k, v
    except Exception as exc:  # noqa: BLE001
        fail("adaspa timing", f"{type(exc).__name__}: {exc}")
    return timer.rows, conversions


# ----------------------------------------------------------------------------------------- report
def fa4_versions() -> dict:
    """:func:`report.versions` plus the GPU's compute capability and quack-kernels (FA4's dependency)."""
    from importlib import metadata
    info = {**versions(), "capability": list(torch.cuda.get_device_capability())}
    try:
        info["quack-kernels"] = metadata.version("quack-kernels")
    except metadata.PackageNotFoundError:
        info["quack-kernels"] = "not installed"
    return info


def markdown(meta: dict, checks: list[dict], rows: list[dict], conversions: list[dict]) -> str:
    lines = [f"# fa4 lowering check, {meta['date']}", "", f"{meta['versions']}", "",
             f"Raw FA4 on empty tiles: {meta.get('raw_empty_tiles')}", "",
             "| check | ok | rel L2 | max dLSE | tile | mask tiles | empty rows 0/-inf | first call s |",
             "|---|---|---|---|---|---|---|---|"]
    for c in checks:
        if c.get("skipped"):
            lines.append(f"| {c['case']} | skipped | | | | | | |")
            continue
        lines.append(f"| {c['case']} | {'ok' if c['ok'] else '**FAIL**'} | {c.get('rel_l2', float('nan')):.2e} | "
                     f"{c.get('max_lse_diff', float('nan')):.2e} | {c.get('tile')} | {c.get('mask_tiles')} | "
                     f"{c.get('empty_out_zero')}/{c.get('empty_lse_inf')} | {c.get('first_call_s', float('nan')):.2f} |")
    lines += ["", "| case | S | density | kernel | ms | eff TFLOP/s | tile | mask tiles | vs anchor |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "ms" not in r:
            lines.append(f"| {r['case']} | {r['seq']} | {r['density']:.4f} | {r['kernel']} | "
                         f"{'skipped' if r.get('skipped') else '**' + r.get('error', 'error') + '**'} | | | | |")
            continue
        diff = f"{r['rel_diff_vs_anchor']:.1e}" if "rel_diff_vs_anchor" in r else ""
        lines.append(f"| {r['case']} | {r['seq']} | {r['density']:.4f} | {r['kernel']} | {r['ms']:.3f} | "
                     f"{r['eff_tflops']:.1f} | {r.get('tile', '')} | {r.get('mask_tiles', '')} | {diff} |")
    lines += ["", "Conversion (IR -> FA4 tensors, ms, GPU):"]
    lines += [f"- {c}" for c in conversions]
    lines += ["", f"Failures: {len(FAILURES)}"] + [f"- {f}" for f in FAILURES]
    if BROKEN:
        lines += [f"**CUDA context broken {BROKEN[0]}: later cases skipped; rerun with --skip-mask-mod**"]
    return "\n".join(lines) + "\n"


def main() -> int:
    time_one_backend()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for fa4-check.json / .md")
    parser.add_argument("--quick", action="store_true", help="checks only at small sizes; timing at S=32768 only")
    parser.add_argument("--no-timing", action="store_true", help="correctness checks only")
    parser.add_argument("--skip-mask-mod", action="store_true",
                        help="leave out the cases that run mask tiles (the CuTe DSL mask_mod path)")
    args = parser.parse_args()
    global SKIP_MASK_MOD
    SKIP_MASK_MOD = args.skip_mask_mod
    args.out.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"date": datetime.date.today().isoformat(), "versions": fa4_versions()}
    reason = Fa4Backend().unavailable_reason("cuda")
    meta["unavailable_reason"] = reason
    log(f"{meta['versions']}; fa4 unavailable_reason: {reason}")
    checks, rows, conversions = [], [], []
    if reason is not None:
        fail("environment", f"fa4 is unavailable: {reason}")
    else:
        try:
            meta["raw_empty_tiles"] = raw_empty_tiles()
            log(f"raw FA4 on empty tiles: {meta['raw_empty_tiles']}")
        except Exception as exc:  # noqa: BLE001
            fail("raw empty tiles", f"{type(exc).__name__}: {exc}")
        checks = run_checks(args.quick)
        if not args.no_timing:
            rows, conversions = run_timing(args.quick)
    meta["failures"] = FAILURES
    meta["cuda_context_broken"] = BROKEN
    meta["skip_mask_mod"] = SKIP_MASK_MOD
    meta["elapsed_s"] = time.perf_counter() - START
    (args.out / "fa4-check.json").write_text(json.dumps({"meta": meta, "checks": checks, "timing": rows,
                                                         "conversion": conversions}, indent=1, default=str))
    text = markdown(meta, checks, rows, conversions)
    (args.out / "fa4-check.md").write_text(text)
    print(text)
    if FAILURES:
        print(f"!!! {len(FAILURES)} FAILURE(S): see above and fa4-check.json", flush=True)
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
