"""What a call of the ``fa4`` lowering holds on the GPU, in units of ``q``'s size, and who holds it afterwards.

The twenty-fifth session's allocator trace of a compiled Cosmos step found three key-range partial outputs of
``Fa4Launch._forward`` alive at PASA's peak where the loop keeps two. Per configuration (64-token blocks at PASA's
density, two CTAs per SM; key ranges 1 and 4; PASA's grouped first-order approximation on and off), after a warm-up
call:

- ``peak``: the call's peak above what was allocated before it;
- ``held with out``: allocated after it while the caller holds the output (1 is the output itself);
- ``held after``: allocated once the output is dropped (0 expected), and every live CUDA tensor of ``q``'s size
  other than q, k, v with the types of the objects that refer to it.

    python bench/fa4_memory_probe.py --out DIR [--tokens 98304] [--heads 16]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from report import run_meta  # noqa: E402

import sparsecore  # noqa: E402
from sparsecore.ir import BlockMask, csr  # noqa: E402
from sparsecore.methods.approximation import unselected_of, with_unselected  # noqa: E402

BLOCK = 64
DENSITY = 0.15


def pasa_shaped(heads: int, tokens: int, seed: int = 0) -> BlockMask:
    """Every row keeps the same number of random 64-token key blocks and its diagonal (PASA's shape)."""
    rng = np.random.default_rng(seed)
    blocks = -(-tokens // BLOCK)
    keep = max(1, int(DENSITY * blocks))
    scores = rng.random((heads, blocks, blocks))
    scores[:, np.arange(blocks), np.arange(blocks)] = 2.0
    kept = np.zeros((heads, blocks, blocks), dtype=bool)
    np.put_along_axis(kept, np.argsort(-scores, axis=-1)[..., :keep], True, axis=-1)
    offsets = np.minimum(np.arange(blocks + 1) * BLOCK, tokens)
    indptr, indices = csr.from_block_map(kept)
    return BlockMask(heads, offsets, offsets, indptr, indices, None, {"method": "probe"})


def holders(q: torch.Tensor, inputs: tuple[torch.Tensor, ...]) -> list[dict]:
    """Live CUDA tensors of q's size other than ``inputs``, with the types of their referrers."""
    gc.collect()
    found = []
    known = {id(t) for t in inputs}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.is_cuda and id(obj) not in known \
                and obj.untyped_storage().nbytes() >= q.numel() * q.element_size():
            referrers = sorted({type(r).__qualname__ for r in gc.get_referrers(obj) if r is not None})[:8]
            found.append({"shape": list(obj.shape), "dtype": str(obj.dtype), "referrers": referrers})
    return found


def probe(q, k, v, mask: BlockMask, key_parts: int, approximate: bool) -> dict:
    if approximate:
        mask = with_unselected(mask, unselected_of("grouped-first-order", 32))
    kernel = sparsecore.compile(mask, "cuda", backend="fa4", key_parts=key_parts)
    size = q.numel() * q.element_size()
    out = kernel(q, k, v)
    del out
    torch.cuda.synchronize()
    gc.collect()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = kernel(q, k, v)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    held_with_out = torch.cuda.memory_allocated() - base
    del out
    torch.cuda.synchronize()
    gc.collect()
    held_after = torch.cuda.memory_allocated() - base
    row = {"key_parts": key_parts, "approximation": approximate, "q_mib": size / 2**20, "peak_q": peak / size,
           "held_with_out_q": held_with_out / size, "held_after_q": held_after / size,
           "q_sized_tensors_after": holders(q, (q, k, v))}
    print(json.dumps(row), flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokens", type=int, default=98304)
    parser.add_argument("--heads", type=int, default=16)
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, args.heads, args.tokens, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
               for _ in range(3))
    mask = pasa_shaped(args.heads, args.tokens)
    rows = [probe(q, k, v, mask, parts, approximate) for approximate in (False, True) for parts in (1, 4)]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fa4-memory-probe.json").write_text(json.dumps({"meta": run_meta(tokens=args.tokens, heads=args.heads),
                                                                 "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
