"""Radial Attention on sparsecore against Radial Attention's released path, one attention layer on the GPU.

Radial Attention's released code (mit-han-lab/radial-attention, ``radial_attn/attn_mask.py``) builds its mask with
``gen_log_mask_shrinked`` (once a run) and runs the video's self-attention through FlashInfer's
``BlockSparseAttentionWrapper`` with ``backend="fa2"``, 128 x 128 blocks, one mask for every head (or sparse
SageAttention, not measured here). Per case, on the synthetic video workload (``sparsecore.workloads.video_qkv``, bf16):

- planning, wall time once from cold caches: ``radial.plan`` plus ``sparsecore.compile`` (upload and conversion), and
  the released ``gen_log_mask_shrinked`` on the GPU (``--attn-mask``: its file; loaded as
  ``bench/radial_released_check.py`` loads it), with a check that the two masks are equal;
- attention, every kernel of a case timed together in interleaved rounds (``kernel_timing.time_rows``: 3 rounds of
  ``do_bench`` medians; a row gives the median round and the rounds' spread): sparsecore's default lowering; the
  released FlashInfer call (``fa2``) and the same wrapper with FlashInfer's own choice of backend (``auto``: FA3 on
  Hopper); cuDNN dense. The released path needs the video's tokens to be a multiple of 128; where they are not, its
  rows say so.

Cases: the released scripts' settings (Wan 2.1 14B at 768 x 1280, 69 frames: decay 0.2 with the sink; HunyuanVideo
at 768 x 1280, 117 frames: decay 0.95, video part), and Wan 2.1 1.3B at 480 x 832 (81 frames and 6x length).

    python bench/radial_benchmark.py --attn-mask /tmp/attn_mask.py --out DIR
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from kernel_timing import cudnn_dense, rel_l2, run_cases, time_rows, wall_seconds, write_rows  # noqa: E402
from radial_released_check import load_released  # noqa: E402
from report import versions  # noqa: E402

import sparsecore  # noqa: E402
from sparsecore import VideoGeometry  # noqa: E402
from sparsecore.methods import radial  # noqa: E402
from sparsecore.workloads import video_qkv  # noqa: E402

CASES = [  # (name, frames, height, width, heads, head_dim, decay_factor, sink)
    ("wan-14b 1x 768x1280", 18, 48, 80, 40, 128, 0.2, True),
    ("hunyuanvideo 1x 768x1280 (video)", 30, 48, 80, 24, 128, 0.95, False),
    ("wan-1.3b 1x 480x832", 21, 30, 52, 12, 128, 0.2, True),
    ("wan-1.3b 6x 480x832", 121, 30, 52, 12, 128, 0.2, True),
]
BLOCK = 128
DEVICE = "cuda"                            # the tests run the case loop on "cpu", its peers faked
WORKSPACE_BYTES = 128 * 1024 * 1024        # the released code's FlashInfer workspace


def flashinfer_call(block_map: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str):
    """The released ``RadialAttention``'s FlashInfer path: one CSR of 128 x 128 blocks for every head, q, k, v as
    ``[tokens, heads, dim]``; returns the call."""
    import flashinfer
    tokens, heads, dim = q.shape
    wrapper = flashinfer.BlockSparseAttentionWrapper(torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=DEVICE),
                                                     backend=backend)
    indptr = torch.zeros(block_map.shape[0] + 1, dtype=torch.int32, device=DEVICE)
    indptr[1:] = block_map.sum(dim=1).cumsum(0)
    indices = block_map.nonzero()[:, 1].to(torch.int32)
    wrapper.plan(indptr=indptr, indices=indices, M=tokens, N=tokens, R=BLOCK, C=BLOCK, num_qo_heads=heads,
                 num_kv_heads=heads, head_dim=dim, q_data_type=q.dtype, kv_data_type=k.dtype, o_data_type=q.dtype)
    return lambda: wrapper.run(q, k, v)


def case_rows(released, name: str, frames: int, height: int, width: int, heads: int, dim: int, decay: float,
              sink: bool) -> list[dict]:
    geometry = VideoGeometry(frames, height, width)
    tokens = geometry.video_tokens
    params = {"decay_factor": decay, "sink": sink}
    radial._block_map.cache_clear()
    radial.pair_blocks.cache_clear()
    q, k, v = video_qkv(geometry, heads, dim, seed=0, dtype=torch.bfloat16, device=DEVICE)
    plan_s, mask = wall_seconds(lambda: radial.plan(geometry, heads, **params))
    compile_s, kernel = wall_seconds(lambda: sparsecore.compile(mask, DEVICE))
    ours = kernel(q, k, v)
    common = {"case": name, "geometry": str(geometry), "heads": heads, "head_dim": dim, "decay_factor": decay,
              "sink": sink, "density": float(mask.density())}
    dense, distance = cudnn_dense(q, k, v, ours)
    rows = [{**common, "row": "sparsecore plan (radial.plan)", "s": plan_s},
            {**common, "row": "sparsecore compile (upload, conversion)", "s": compile_s},
            {**common, "row": f"sparsecore kernel ({kernel.backend.name})", "rel_l2_vs_dense": distance},
            {**common, "row": "cuDNN dense"}]
    timed = [(rows[2], lambda: kernel(q, k, v)), (rows[3], dense)]          # timed together at the end
    if tokens % BLOCK:
        rows.append({**common, "row": "released path", "error": f"{tokens} video tokens: not a multiple of {BLOCK} "
                                                                 f"(its FlashInfer plan needs whole blocks)"})
        time_rows(timed)
        return rows
    query = torch.empty(1, device=DEVICE)
    released_s, theirs = wall_seconds(lambda: released.gen_log_mask_shrinked(
        query, tokens, tokens, frames, block_size=BLOCK, sparse_type="radial", decay_factor=decay,
        model_type="wan" if sink else "hunyuan"))
    equal = torch.equal(theirs, torch.as_tensor(mask.to_dense()[0], device=DEVICE))
    rows.append({**common, "row": "released plan (gen_log_mask_shrinked)", "s": released_s, "masks_equal": equal})
    q_nhd, k_nhd, v_nhd = (t[0].transpose(0, 1).contiguous() for t in (q, k, v))
    for backend in ("fa2", "auto"):
        call = flashinfer_call(theirs, q_nhd, k_nhd, v_nhd, backend)
        out = call().transpose(0, 1)[None]
        label = "released FlashInfer call (fa2)" if backend == "fa2" else "same FlashInfer wrapper, backend auto"
        rows.append({**common, "row": label, "rel_l2_vs_sparsecore": rel_l2(out, ours)})
        timed.append((rows[-1], call))
    time_rows(timed)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attn-mask", type=Path, required=True, help="the released radial_attn/attn_mask.py")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cases", nargs="*", default=None, help="case names (default: all)")
    args = parser.parse_args()
    released = load_released(args.attn_mask)
    meta = {"machine": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "versions": versions()}
    run_cases(CASES, args.cases, partial(case_rows, released),
              lambda rows: write_rows(args.out, "radial-kernels", "Radial Attention kernels", rows, meta,
                                      ("rel_l2_vs_dense", "rel_l2_vs_sparsecore", "masks_equal", "error")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
