"""Sliding Tile Attention on sparsecore against FastVideo's STA kernel, FlexAttention and cuDNN dense, one layer on
the GPU.

FastVideo's released STA (hao-ai-lab/FastVideo 37cab18) runs a ThunderKittens kernel built for the H100 (three fixed
grids) or, where that is not built, its Triton kernel ``fastvideo-kernel/python/fastvideo_kernel/triton_kernels/
st_attn_triton.py`` (``sliding_tile_attention_triton``: the same three grids, autotuned over 72 tile and stage
choices, one launch per head). This bench loads that Triton file (``--st-attn``; it needs only torch and triton) and
times it where it takes the grid. Per case, on the synthetic video workload (``sparsecore.workloads.video_qkv``,
bf16, q, k, v in STA's tile order):

- planning, wall time from cold caches: ``sta`` session plan plus ``sparsecore.compile`` (upload and conversion);
- every kernel of a case timed together in interleaved rounds (``kernel_timing.time_rows``: 3 rounds of ``do_bench``
  medians; a row gives the median round and the rounds' spread): sparsecore's default lowering on the tile-ordered
  tokens; the token order's gathers of q, k, v and scatter of the output, which the diffusers integration adds around
  it; FlexAttention compiled, 128-token blocks, its block mask from a ``mask_mod`` reading each head's tile map (as
  FastVideo's FlexAttention reference); FastVideo's Triton kernel (after its autotuning, whose time is reported);
  cuDNN dense on the same tokens.
- relative L2 distances of the outputs to sparsecore's (the same mask: rounding only) and to dense.

Cases: Wan 2.1 14B at 768 x 1280 (FastVideo's Wan grid, 18 x 48 x 80) with one window and with its search's six
candidates across heads; HunyuanVideo at 768 x 1280 (30 x 48 x 80 + 256 text tokens) with the five windows of its
shipped strategy across heads; Wan 2.1 1.3B at 480 x 832 (21 x 30 x 52: short edge tiles) at 1x and 6x length.

    python bench/sta_benchmark.py --st-attn /tmp/st_attn_triton.py --out DIR
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from kernel_timing import cudnn_dense, rel_l2, run_cases, time_rows, wall_seconds, write_rows  # noqa: E402
from report import versions  # noqa: E402

import sparsecore  # noqa: E402
from sparsecore import VideoGeometry  # noqa: E402
from sparsecore.methods import sta  # noqa: E402
from sparsecore.workloads import video_qkv  # noqa: E402

WAN_SEARCH = [(3, 1, 10), (1, 5, 7), (3, 3, 3), (1, 6, 5), (1, 3, 10), (3, 6, 1)]   # FastVideo's Wan candidates
HUNYUAN_FILE = [(5, 3, 3), (1, 6, 10), (3, 3, 5), (5, 1, 10), (5, 6, 1)]         # its Hunyuan file's sparse windows
CASES = [  # (name, frames, height, width, text, heads, windows cycled over heads, FastVideo grid or None)
    ("wan-14b 1x 768x1280, window 3x3x3", 18, 48, 80, 0, 40, [(3, 3, 3)], "18x48x80"),
    ("wan-14b 1x 768x1280, search candidates", 18, 48, 80, 0, 40, WAN_SEARCH, "18x48x80"),
    ("hunyuanvideo 1x 768x1280 + 256 text, file windows", 30, 48, 80, 256, 24, HUNYUAN_FILE, "30x48x80"),
    ("wan-1.3b 1x 480x832, window 3x3x3", 21, 30, 52, 0, 12, [(3, 3, 3)], None),
    ("wan-1.3b 6x 480x832, window 3x3x3", 121, 30, 52, 0, 12, [(3, 3, 3)], None),
]
HEAD_DIM = 128
DEVICE = "cuda"                            # the tests run the case loop on "cpu", its peers faked


def load_fastvideo(path: Path):
    spec = importlib.util.spec_from_file_location("fastvideo_st_attn_triton", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def strategy(windows: list[tuple[int, int, int]], heads: int) -> dict[str, list[int]]:
    """One step and layer of FastVideo's format, the windows cycled over the heads."""
    return {f"0_0_{h}": list(windows[h % len(windows)]) for h in range(heads)}


def flex_call(mask, geometry: VideoGeometry, q, k, v):
    """FlexAttention over the tile order: a ``mask_mod`` reading each head's tile map (text: a last 'tile' that sees
    and is seen by all). Returns the compiled call and its block mask's build seconds."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    offsets = np.asarray(mask.q_offsets)
    tile_of = torch.as_tensor(np.repeat(np.arange(len(offsets) - 1), np.diff(offsets)), device=DEVICE)
    allowed = torch.as_tensor(mask.to_dense(), device=DEVICE)                        # [H, blocks, blocks]

    def mask_mod(b, h, q_idx, kv_idx):
        return allowed[h, tile_of[q_idx], tile_of[kv_idx]]

    build_s, block_mask = wall_seconds(lambda: create_block_mask(mask_mod, None, mask.num_heads, geometry.tokens,
                                                                 geometry.tokens, device=DEVICE, BLOCK_SIZE=128,
                                                                 _compile=True))      # not L x L at once
    flex = torch.compile(flex_attention)
    return (lambda: flex(q, k, v, block_mask=block_mask)), build_s


def case_rows(fastvideo, name, frames, height, width, text, heads, windows, grid) -> list[dict]:
    geometry = VideoGeometry(frames, height, width, text_tokens=text)
    sta._token_order.cache_clear()
    sta.tile_offsets.cache_clear()
    sta.video_block_map.cache_clear()
    model_order = video_qkv(geometry, heads, HEAD_DIM, seed=0, dtype=torch.bfloat16, device=DEVICE)
    session = sta.session(1, mask_strategy=strategy(windows, heads))
    plan_s, mask = wall_seconds(lambda: session.plan(geometry, heads, step=0, layer=0))
    order = sta.token_order(geometry)
    q, k, v = (order.gather(t, 2) for t in model_order)
    compile_s, kernel = wall_seconds(lambda: sparsecore.compile(mask, DEVICE))
    ours = kernel(q, k, v)
    common = {"case": name, "geometry": str(geometry), "heads": heads, "head_dim": HEAD_DIM,
              "windows": sorted(set(windows)), "density": float(mask.density())}
    permute = lambda: (order.gather(model_order[0], 2), order.gather(model_order[1], 2),  # noqa: E731
                       order.gather(model_order[2], 2), order.scatter(ours, 2))
    dense, distance = cudnn_dense(q, k, v, ours)
    rows = [{**common, "row": "sparsecore plan (sta session)", "s": plan_s},
            {**common, "row": "sparsecore compile (upload, conversion)", "s": compile_s},
            {**common, "row": f"sparsecore kernel ({kernel.backend.name})", "rel_l2_vs_dense": distance},
            {**common, "row": "token order: gather q, k, v + scatter out"},
            {**common, "row": "cuDNN dense"}]
    timed = [(rows[2], lambda: kernel(q, k, v)), (rows[3], permute), (rows[4], dense)]   # timed together at the end
    try:                                            # a peer that fails its first call is reported; the others run
        flex, build_s = flex_call(mask, geometry, q, k, v)
        compile_flex_s, theirs = wall_seconds(flex)
        rows.append({**common, "row": "FlexAttention compiled, 128-token blocks", "block_mask_s": build_s,
                     "first_call_s": compile_flex_s, "rel_l2_vs_sparsecore": rel_l2(theirs, ours)})
        timed.append((rows[-1], flex))
        del theirs
    except (RuntimeError, torch.OutOfMemoryError) as err:
        rows.append({**common, "row": "FlexAttention compiled, 128-token blocks", "error": str(err)[:300]})
    if fastvideo is not None and grid is not None:
        head_windows = [windows[h % len(windows)] for h in range(heads)]
        call = lambda: fastvideo.sliding_tile_attention_triton(q, k, v, head_windows, text,  # noqa: E731
                                                               has_text=text > 0, dit_seq_shape=grid)
        tune_s, theirs = wall_seconds(call)
        rows.append({**common, "row": "FastVideo STA Triton kernel (autotuned)", "autotune_s": tune_s,
                     "rel_l2_vs_sparsecore": rel_l2(theirs, ours)})
        timed.append((rows[-1], call))
        del theirs
    time_rows(timed)
    return rows


def write(rows: list[dict], out: Path) -> None:
    meta = {"machine": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "versions": versions()}
    write_rows(out, "sta-kernels", "Sliding Tile Attention kernels", rows, meta,
               ("rel_l2_vs_dense", "rel_l2_vs_sparsecore", "autotune_s", "first_call_s", "block_mask_s", "error"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--st-attn", type=Path, default=None, help="FastVideo's st_attn_triton.py (optional)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cases", nargs="*", default=None, help="case names (default: all)")
    args = parser.parse_args()
    fastvideo = None if args.st_attn is None else load_fastvideo(args.st_attn)
    run_cases(CASES, args.cases, partial(case_rows, fastvideo), lambda rows: write(rows, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
