"""Probe (no GPU needed): compile FA4's SM90 forward variants on the CPU and time each compile.

flash-attn-4 compiles without a GPU when told the target (``interface._get_device_arch``):
``FLASH_ATTENTION_ARCH=sm_90`` picks the SM90 kernel, ``CUTE_DSL_ARCH=sm_90a`` is the compile target,
and tensors are torch fake tensors on ``cuda`` (``FakeTensorMode``), so ``_flash_attn_fwd`` compiles
and does not launch. This times the variants the ``fa4`` lowering builds, on block-sparse 128 x 128
tiles: no mask_mod; FA4's per-element masking with a mask_mod that keeps everything (its scaffolding
alone); sparsecore's lookup mask_mod (:func:`sparsecore.backends.cuda.fa4_mask_mods.lookup_mask_mod`).
A kernel change can be checked to compile, and its first-call compile cost compared (issue 13 asks for
a first call within 5 s), before device time is spent; whether it runs correctly is for the GPU.

Setup on a CPU machine: Python 3.12 (the CuTe DSL wheels are cp312), torch, einops, the wheels of
``.whl/`` installed with ``pip install --no-deps --target SITE`` and FA4's CuTe DSL libraries unpacked
there (``cat .fa4/1/cu13.xz.part1 .fa4/2/cu13.xz.part2 | xz -d | tar x -C SITE``), then

    PYTHONPATH=SITE:SITE/nvidia_cutlass_dsl/dsl_packages:. python bench/fa4_compile_probe.py [--repeat 2]

Exit status 1 when a variant fails to compile (its last error line is printed).

Compile times here are the CPU's. On the 2-core development machine (2026-12-01, one process per compile, two
each): plain 2.59 / 2.64 s, keep-all mask_mod 3.37 / 3.37, sparsecore's mask_mod 3.71 / 3.78; first calls of mask_mod kernels on the H200 host took 3.8-6.1 s (fa4_check, seventh session), so
part of a first call there is not FA4's compile.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("FLASH_ATTENTION_ARCH", "sm_90")
os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")
os.environ.setdefault("FLASH_ATTENTION_NUM_SMS", "132")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

VARIANTS = ("plain", "keep-all mask_mod", "sparsecore mask_mod")
TIMEOUT_S = 600                   # one compile


def keep_all_mask_mod():
    import cutlass
    import cutlass.cute as cute

    @cute.jit
    def keep_all(batch, head, m_idx, n_idx, seqlen_info, aux_tensors):
        return n_idx >= cutlass.Int32(0)

    return keep_all


def compile_seconds(variant: str, seq: int = 4096, heads: int = 2, dim: int = 128) -> float:
    """One compile of ``variant`` (a fresh process's FA4 cache: each variant has its own compile key)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from flash_attn.cute import interface
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch
    from sparsecore.backends.cuda.fa4_mask_mods import lookup_mask_mod
    with FakeTensorMode(allow_non_fake_inputs=True):
        q = torch.empty(1, seq, heads, dim, dtype=torch.bfloat16, device="cuda")
        blocks = seq // 128
        count = torch.empty(1, heads, blocks, dtype=torch.int32, device="cuda")
        index = torch.empty(1, heads, blocks, blocks, dtype=torch.int32, device="cuda")
        sparse = BlockSparseTensorsTorch(mask_block_cnt=count, mask_block_idx=index, full_block_cnt=count,
                                         full_block_idx=index, block_size=(128, 128))
        aux = [torch.empty(seq, dtype=torch.int32, device="cuda"), torch.empty(seq, dtype=torch.int32, device="cuda"),
               torch.empty(heads, blocks, 2, dtype=torch.uint32, device="cuda")]
        kwargs = dict(block_sparse_tensors=sparse, return_lse=True)
        if variant == "keep-all mask_mod":
            kwargs.update(mask_mod=keep_all_mask_mod(), aux_tensors=aux)
        elif variant == "sparsecore mask_mod":
            kwargs.update(mask_mod=lookup_mask_mod(), aux_tensors=aux)
        start = time.perf_counter()
        interface._flash_attn_fwd(q, q, q, **kwargs)
        return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=VARIANTS, help="compile this one in this process (the driver runs each "
                        "variant in its own process)")
    parser.add_argument("--repeat", type=int, default=1, help="processes per variant")
    args = parser.parse_args()
    if args.variant:
        print(f"{compile_seconds(args.variant):.2f}")
        return 0
    import subprocess
    print("| variant | compile seconds (one per process) |\n|---|---|")
    failed = False
    for variant in VARIANTS:
        seconds = []
        for _ in range(args.repeat):
            try:
                done = subprocess.run([sys.executable, __file__, "--variant", variant], capture_output=True,
                                      text=True, timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                seconds.append(f"failed: no compile within {TIMEOUT_S} s")
                failed = True
                continue
            if done.returncode == 0:
                seconds.append(done.stdout.strip().splitlines()[-1])
            else:
                error = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
                seconds.append(f"failed: {error}")
                failed = True
        print(f"| {variant} | {', '.join(seconds)} |", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
