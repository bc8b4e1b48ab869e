"""The correctness half of ``bench/fa4_check.py``, and the record of the run that its timing half shares.

The record: the clock ``log`` stamps lines with (``START``), the device (``DEVICE``, a module global so the
helpers can be smoke-tested on CPU), the failures (``FAILURES``, filled by ``fail``), whether a kernel fault
left the CUDA context unusable (``BROKEN``, after which every later case is skipped), and ``--skip-mask-mod``
(``SKIP_MASK_MOD``, set by the driver). Other modules read ``DEVICE`` and ``SKIP_MASK_MOD`` as attributes of
this module (``exactness.DEVICE``), never through ``from ... import``, so a value set here later reaches them.

The checks: ``check_case`` runs the ``fa4`` lowering on one mask and holds its output and LSE to float64 dense
attention under a token mask expanded here from the mask's CSR lists (``token_mask``, ``reference``, ``compare``);
``run_checks`` is the list of cases the check runs; ``raw_empty_tiles`` records what FA4 itself writes for query
tiles that keep no block.
"""

from __future__ import annotations

import math
import time
import traceback
from typing import Any, Callable

import numpy as np
import torch

import sparsecore
from fa4_check_masks import adaspa_like, frame_mask, from_rows, random_mask
from sparsecore import BlockMask
from sparsecore.backends.cuda.fa4_backend import Fa4Backend, Fa4Options, tile_shape
from sparsecore.backends.cuda.fa4_layout import to_fa4
from sparsecore.registry import registered_backends

REL_L2_LIMIT = {torch.bfloat16: 1.5e-2, torch.float16: 4e-3}
LSE_LIMIT = 2e-2
START = time.perf_counter()
DEVICE = "cuda"               # the GPU (a module global so the script can be smoke-tested on CPU)
FAILURES: list[str] = []
SKIP_MASK_MOD = False         # --skip-mask-mod: leave out every case that runs mask tiles
BROKEN: list[str] = []       # set when the CUDA context no longer works (a kernel fault): later cases are skipped


def log(msg: str) -> None:
    """Print ``msg`` stamped with the seconds since this module was imported (the start of the run)."""
    print(f"[{time.perf_counter() - START:6.1f}s] {msg}", flush=True)


def fail(case: str, error: str) -> None:
    """Record and print a failure; on the GPU, also find out whether it left the CUDA context unusable."""
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
    return to_fa4(mask, *tile_shape(mask, 9, Fa4Options(**options)), "cpu").needs_mask_mod


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


def token_mask(mask: BlockMask, device: Any) -> torch.Tensor:
    """bool ``[H, Lq, Lk]`` expanded here from the mask's raw CSR lists and offsets (not the IR's own
    ``token_mask``): listed (head, query block, key block) cells of a block map, indexed by each token's block."""
    host = mask.to_host()
    indptr, indices = np.asarray(host.indptr, dtype=np.int64), np.asarray(host.indices, dtype=np.int64)
    heads, num_q_blocks = indptr.shape[0], indptr.shape[1] - 1
    counts = np.diff(indptr, axis=1).reshape(-1)                                   # per (head, query block)
    cells = np.repeat(np.arange(heads * num_q_blocks), counts)
    ids = indices[:indptr[-1, -1]]                           # heads stored in order: the lists end to end
    block_map = torch.zeros(heads * num_q_blocks, host.num_kv_blocks, dtype=torch.bool, device=device)
    block_map[torch.from_numpy(cells).to(device), torch.from_numpy(ids).to(device)] = True
    q_block = torch.from_numpy(np.repeat(np.arange(num_q_blocks), np.diff(np.asarray(host.q_offsets)))).to(device)
    kv_block = torch.from_numpy(np.repeat(np.arange(host.num_kv_blocks),
                                          np.diff(np.asarray(host.kv_offsets)))).to(device)
    block_map = block_map.reshape(heads, num_q_blocks, host.num_kv_blocks)
    return block_map[:, q_block][:, :, kv_block]


def reference(q, k, v, tokens: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 dense attention under ``tokens`` [H, Lq, Lk], one head at a time (a head's scores at S = 8192 are
    512 MiB); rows with no key: out 0, LSE -inf."""
    group = q.shape[1] // k.shape[1]
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    lse = torch.empty(q.shape[:3], dtype=torch.float64, device=q.device)
    for h in range(q.shape[1]):
        scores = (q[:, h].double() @ k[:, h // group].double().transpose(-1, -2)) * scale
        scores.masked_fill_(~tokens[h][None], -math.inf)
        lse[:, h] = torch.logsumexp(scores, dim=-1)
        out[:, h] = torch.softmax(scores, dim=-1).nan_to_num_(0.0) @ v[:, h // group].double()
        del scores
    return out, lse


def compare(out, lse, ref_out, ref_lse, tokens, dtype) -> dict:
    """The measures of one case: relative L2 error of the output and max |LSE difference| over rows with keys
    (limits ``REL_L2_LIMIT[dtype]`` and ``LSE_LIMIT``), rows with no key exactly 0 / -inf, all finite."""
    has_keys = tokens.any(-1)                                                  # [H, Lq]
    rows = has_keys[None].expand(out.shape[0], -1, -1)
    o, r = out.double()[rows], ref_out[rows]
    rel = float((o - r).norm() / r.norm().clamp_min(1e-30)) if r.numel() else 0.0
    lse_diff = float((lse.double()[rows] - ref_lse[rows]).abs().max()) if r.numel() else 0.0
    empty = ~rows
    empty_out_zero = bool((out[empty] == 0).all()) if empty.any() else True
    empty_lse_inf = bool(torch.isneginf(lse[empty]).all()) if empty.any() else True
    finite_ok = bool(torch.isfinite(lse[rows]).all() and torch.isfinite(out.float()).all())
    ok = (rel < REL_L2_LIMIT[dtype] and lse_diff < LSE_LIMIT and empty_out_zero and empty_lse_inf and finite_ok)
    return {"rel_l2": rel, "max_lse_diff": lse_diff, "empty_rows": int(empty[0].sum()),
            "empty_out_zero": empty_out_zero, "empty_lse_inf": empty_lse_inf, "finite": finite_ok, "ok": ok}


def check_case(name: str, mask: BlockMask, *, dtype=torch.bfloat16, head_dim=128, batch=1, kv_heads=None,
               scale=None, **options) -> dict:
    """One correctness case: random inputs seeded by the name, the lowering's first call timed, its tiles
    recorded, output and LSE compared to ``reference`` (float64), and the call without LSE required to give the same
    output. Returns the case's record; a failure is recorded with ``fail`` and does not raise."""
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
        tokens = token_mask(mask, DEVICE)
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
            "lse_neg_inf_on_empty_tiles": bool(torch.isneginf(lse[0, 1]).all()
                                               and torch.isneginf(lse[0, 0, 128:]).all()),
            "lse_finite_on_kept": bool(torch.isfinite(lse[0, 0, :128]).all())}


def run_checks(quick: bool) -> list[dict]:
    """Full-tile cases first, then the mask_mod cases (a fault there must not hide the rest)."""
    out = []
    r128 = BlockMask.uniform_offsets(2048, 128)
    out.append(check_case("random128 bf16 D128", random_mask(4, r128, r128, 0.3, 0)))
    out.append(check_case("random128 fp16 D64", random_mask(4, r128, r128, 0.3, 1), dtype=torch.float16,
                          head_dim=64))
    out.append(check_case("random128 GQA2:1 B=2 scale0.5", random_mask(4, r128, r128, 0.3, 2), batch=2, kv_heads=2,
                          scale=0.5))
    out.append(check_case("random128 bf16 D96", random_mask(2, r128, r128, 0.3, 3), head_dim=96))
    aligned = adaspa_like(6, 64 * 32, 0, 64, (0.1, 0.25, 0.5), seed=1, device=DEVICE)
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
    ada = adaspa_like(6, 64 * 30 + 24, 77, 64, (0.1, 0.25, 0.5), seed=0, device=DEVICE)
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
