"""Radial Attention's masks: sparsecore's ``method="radial"`` against the released ``gen_log_mask_shrinked``.

The released module (mit-han-lab/radial-attention, ``radial_attn/attn_mask.py``) imports FlashInfer, SageAttention and
matplotlib at its top; its mask functions use none of them, so this loads it with those names stubbed and calls
``gen_log_mask_shrinked`` on the CPU (or ``--device``), then compares its block map with sparsecore's video blocks.
It also times both (the released function loops over frame pairs and builds each pair's token mask).

    git -C <radial-attention checkout> show HEAD:radial_attn/attn_mask.py > /tmp/attn_mask.py
    python bench/radial_released_check.py --attn-mask /tmp/attn_mask.py [--out DIR] [--device cpu]

Cases: small frames (the split rule drops near pairs), frames not a multiple of 128 (blocks straddle frames), video
tokens not a multiple of 128 (the released function is called on the length padded to whole blocks, as its own
example does), Wan 2.1 at 480 x 832 and 768 x 1280 and HunyuanVideo's 1x shape, with and without the sink, several
decay factors.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

from sparsecore.geometry import VideoGeometry
from sparsecore.methods import radial

sys.path.insert(0, str(Path(__file__).parent))
from report import run_meta  # noqa: E402

CASES = [  # (frames, height, width, decay_factor, sink)
    (16, 8, 12, 1.0, True), (16, 8, 12, 0.5, False), (16, 10, 20, 1.0, True), (32, 10, 20, 0.2, True),
    (12, 16, 16, 1.0, False), (8, 30, 64, 0.95, False), (13, 30, 45, 1.0, True), (21, 30, 52, 0.2, True),
    (7, 15, 26, 0.5, False), (18, 48, 80, 0.2, True), (30, 48, 80, 0.95, False),
]


def load_released(path: Path) -> types.ModuleType:
    """The released module, its kernel and plotting imports stubbed where not installed (its mask functions call none
    of them)."""
    stubs = {"flashinfer": [], "matplotlib": [], "matplotlib.pyplot": [], "einops": ["rearrange", "repeat"],
             "sageattention": ["sageattn"], "sparse_sageattn": ["sparse_sageattn"],
             "spas_sage_attn": ["block_sparse_sage2_attn_cuda"]}
    for name, attributes in stubs.items():
        try:
            importlib.import_module(name)                 # installed (FlashInfer on a GPU machine): the real one
            continue
        except ImportError:
            pass
        module = types.ModuleType(name)
        for attribute in attributes:
            setattr(module, attribute, None)
        sys.modules.setdefault(name, module)
    spec = importlib.util.spec_from_file_location("released_attn_mask", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compare(released: types.ModuleType, case: tuple, device: str) -> dict:
    frames, height, width, decay, sink = case
    geometry = VideoGeometry(frames, height, width)
    tokens = geometry.video_tokens
    padded = -(-tokens // 128) * 128
    query = torch.empty(1, device=device)
    start = time.perf_counter()
    theirs = released.gen_log_mask_shrinked(query, padded, tokens, frames, block_size=128, sparse_type="radial",
                                            decay_factor=decay, model_type="wan" if sink else "hunyuan")
    theirs = theirs.cpu().numpy()
    released_s = time.perf_counter() - start
    radial._block_map.cache_clear()
    radial.pair_blocks.cache_clear()
    start = time.perf_counter()
    ours = radial.video_block_map(geometry, radial.RadialParams(decay_factor=decay, sink=sink))
    ours_s = time.perf_counter() - start
    return {"geometry": str(geometry), "decay_factor": decay, "sink": sink, "equal": bool(np.array_equal(theirs, ours)),
            "blocks": int(ours.shape[0]), "density": float(ours.mean()),
            "differing_blocks": int((theirs != ours).sum()),
            "released_s": round(released_s, 4), "sparsecore_s": round(ours_s, 4)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attn-mask", type=Path, required=True, help="the released radial_attn/attn_mask.py")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="write radial-released-check.json here")
    args = parser.parse_args()
    released = load_released(args.attn_mask)
    rows = []
    for case in CASES:
        rows.append(compare(released, case, args.device))
        print(json.dumps(rows[-1]), flush=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "radial-released-check.json").write_text(json.dumps({"meta": run_meta(args.device), "rows": rows},
                                                                               indent=1) + "\n")
    return 0 if all(row["equal"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
