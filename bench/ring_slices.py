"""Do a rank's ring slices of a 64-token-block mask cost half the whole mask? (one GPU, Triton)

    python3 bench/ring_slices.py      # on a CUDA machine; prints one line per rank

A random per-head mask (12 heads, density 0.20, diagonal kept) over Wan 2.1's 6x length (188,760
tokens, head dim 128, bf16) is cut as ring degree 2 cuts it (``ir.slicing.slices``: each rank's
query half against its own key half, then the other's; the edge at token 94,380 cuts a block) and
each slice's kernel, the LSE merge and the whole mask's kernel are timed with ``kernel_timing.median_ms`` (do_bench's
median of at least 10 repeats; the measurement below took do_bench's mean of 2-3 calls).
Measured 2026-11-30 on an H200: bench/results/multigpu-2026-11-30-runs/ring-pieces.log.
"""

import numpy as np
import torch

import sparsecore
from sparsecore import BlockMask
from sparsecore.integrations.diffusers.ring import merge
from sparsecore.ir.slicing import slices
from kernel_timing import median_ms
from report import time_one_backend

TOKENS, HEADS, HEAD_DIM, BLOCK = 188760, 12, 128, 64


def main() -> None:
    time_one_backend()
    blocks = -(-TOKENS // BLOCK)
    keep = np.random.default_rng(0).random((HEADS, blocks, blocks)) < 0.2
    keep[:, np.arange(blocks), np.arange(blocks)] = True
    mask = BlockMask.from_dense(keep, TOKENS, TOKENS, BLOCK).to("cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, TOKENS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
               for _ in range(3))
    whole = sparsecore.compile(mask, device="cuda", backend="triton")
    whole_ms = median_ms(lambda: whole(q, k, v))
    print(f"whole: {whole_ms:.2f} ms, density {mask.density():.3f}")
    half = TOKENS // 2
    shard = lambda s: (s * half, (s + 1) * half)  # noqa: E731
    for rank in (0, 1):
        pieces = slices(mask, [shard(rank)], [[shard(rank)], [shard(1 - rank)]])
        kernels = [sparsecore.compile(p, device="cuda", backend="triton") for p in pieces]
        rows = q[:, :, slice(*shard(rank))].contiguous()
        keys = [(k[:, :, slice(*shard(s))].contiguous(), v[:, :, slice(*shard(s))].contiguous())
                for s in (rank, 1 - rank)]
        times = [median_ms(lambda kernel=kernel, kv=kv: kernel(rows, *kv, return_lse=True))
                 for kernel, kv in zip(kernels, keys)]
        (out_a, lse_a), (out_b, lse_b) = (kernel(rows, *kv, return_lse=True) for kernel, kv in zip(kernels, keys))
        merge_ms = median_ms(lambda: merge(out_a.float(), lse_a, out_b.float(), lse_b))
        print(f"rank {rank}: slices {times[0]:.2f} + {times[1]:.2f} ms, merge {merge_ms:.2f} ms; "
              f"sum {sum(times) + merge_ms:.2f} ms vs half the whole {whole_ms / 2:.2f} ms; "
              f"first query blocks {pieces[0].q_block_sizes[:2].tolist()}")


if __name__ == "__main__":
    main()
