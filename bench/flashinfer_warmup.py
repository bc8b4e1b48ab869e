"""JIT-compile FlashInfer's block-sparse prefill module for one dtype and head dim (about 95 s on 16 cores).

Run once per fresh GPU machine before timing, e.g. several in parallel:
    python bench/flashinfer_warmup.py bfloat16 128 & python bench/flashinfer_warmup.py float16 64 &
"""

import sys
import time

import numpy as np
import torch

import sparsecore
from sparsecore import BlockMask


def main(dtype: str, head_dim: int) -> None:
    start = time.perf_counter()
    mask = BlockMask.from_dense(np.ones((2, 2, 2), dtype=bool), 256, 256, 128)
    kernel = sparsecore.compile(mask, device="cuda", backend="flashinfer")
    q = torch.randn(1, 2, 256, head_dim, device="cuda", dtype=getattr(torch, dtype))
    kernel(q, q, q)
    torch.cuda.synchronize()
    print(f"flashinfer warm: {dtype} head_dim {head_dim} in {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
