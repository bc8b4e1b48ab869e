"""FA4's SM90 forward on 64-row query tiles at two CTAs per SM.

flash-attn-4 4.0.0b36's SM90 forward (``flash_fwd_sm90.FlashAttentionForwardSm90``) has one MMA
warpgroup per 64 query rows. With 64-row tiles (64-token query blocks: AdaSpa, PASA) that is one
MMA warpgroup next to the producer warpgroup; the kernel raises the MMA warps to 256 registers,
lowers the producer's to 56 and launches with ``min_blocks_per_mp=1``: 128 x 312 registers a CTA,
so one CTA, and one warpgroup issuing tensor-core work, per SM. Its 64 x 64 tiles then ran at the
Triton lowering's rate (444 eff TFLOP/s, S = 32K, d = 0.2) where its 128 x 128 tiles reach 640.

Here the same kernel is built with a register split that two CTAs share (each CTA 256 threads x
128 registers at launch: ``mma + producer <= 256``) and launched with ``min_blocks_per_mp=2``, so
two independent MMA warpgroups run on each SM (shared memory: about 90 KB a CTA at tile 64 x 64,
two stages). Measured on the H200 (2026-12-01, ``bench/fa4_occupancy_probe.py`` and
``bench/key_split_probe.py``; uniform 64-token masks, d = 0.2, D = 128, eff TFLOP/s): at S = 32K
442-444 -> 544-560, at 98K 543 (Triton 445); at 188,736 tokens 398-405 -> 416-491 and on the
AdaSpa-shaped mask 375-393 -> 419-475, varying by run. There one head's K/V (97 MB) exceeds the
50 MB L2: cutting the key range into 4 or 8 parts (one launch each) took the kernels from 92 to 86
and 84 ms, so the faster kernel waits on memory (Triton's rate does not fall with length). Registers split 216 / 40; 232 / 24 starves the producer
(411 at 188,736 tokens), 208 / 48 the MMA warps (330).
Outputs are the same kernel's; only registers and occupancy change.

How: a subclass overrides ``_setup_attributes`` (which the forward's ``__call__`` runs after it
sets the register split) and wraps ``kernel``'s launcher so its ``launch`` gets the bound.
``interface._flash_attn_fwd`` builds the kernel object from the module global
``FlashAttentionForwardSm90`` on a compile-cache miss, so :func:`forward` swaps that global for the
duration of its call, under a lock, and passes ``num_threads=TWO_PER_SM_THREADS`` (the threads such a
kernel really has; the SM90 forward computes its own and ignores the argument, which is part of
the compile key). FA4's own calls keep ``num_threads=384`` and so never share a compiled kernel
with these. Used for one-warpgroup tiles only (``tile_m == 64`` on SM90).
"""

from __future__ import annotations

import functools
import threading
from typing import Any

import torch

MMA_REGS, PRODUCER_REGS = 216, 40       # per thread; two CTAs of 2 x 128 threads fill the 64K-register file
TWO_PER_SM_THREADS = 256                # compile-key value that marks these kernels (FA4's default: 384)
_SWAP = threading.Lock()


class _Launcher:
    """A CuTe DSL kernel launcher whose ``launch`` asks for ``ctas`` resident CTAs per SM."""

    def __init__(self, launcher: Any, ctas: int) -> None:
        self._launcher, self._ctas = launcher, ctas

    def launch(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["min_blocks_per_mp"] = max(self._ctas, kwargs.get("min_blocks_per_mp") or 1)
        return self._launcher.launch(*args, **kwargs)


@functools.lru_cache(maxsize=None)
def forward_class(mma_regs: int = MMA_REGS, producer_regs: int = PRODUCER_REGS) -> type:
    """The SM90 forward whose one-warpgroup kernels split registers ``mma_regs / producer_regs`` and run two CTAs
    per SM (kernels of two or three MMA warpgroups are unchanged)."""
    if mma_regs + producer_regs > 256 or mma_regs % 8 or producer_regs % 8 or producer_regs < 24:
        raise ValueError(f"mma_regs, producer_regs: two CTAs of 2 x 128 threads need mma + producer <= 256, "
                         f"multiples of 8, producer >= 24 (setmaxnreg), got {mma_regs} / {producer_regs}")
    from flash_attn.cute.flash_fwd_sm90 import FlashAttentionForwardSm90

    class TwoPerSmForwardSm90(FlashAttentionForwardSm90):
        def _setup_attributes(self) -> None:
            if self.num_wg_mma == 1:
                self.num_mma_regs, self.num_producer_regs = mma_regs, producer_regs
            super()._setup_attributes()

        def kernel(self, *args: Any, **kwargs: Any) -> Any:
            launcher = super().kernel(*args, **kwargs)
            return _Launcher(launcher, 2) if self.num_wg_mma == 1 else launcher

    return TwoPerSmForwardSm90


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: Any) -> tuple[Any, Any]:
    """``flash_attn.cute.interface._flash_attn_fwd(q, k, v, **kwargs)`` with one-warpgroup SM90 kernels at two
    CTAs per SM: returns its ``(out, lse)``. ``q [B, Sq, H, D]``, ``k, v [B, Sk, Hkv, D]`` as for FA4."""
    from flash_attn.cute import interface
    cls = forward_class(MMA_REGS, PRODUCER_REGS)
    with _SWAP:
        original = interface.FlashAttentionForwardSm90
        interface.FlashAttentionForwardSm90 = cls
        try:
            out, lse, *_ = interface._flash_attn_fwd(q, k, v, num_threads=TWO_PER_SM_THREADS, **kwargs)
        finally:
            interface.FlashAttentionForwardSm90 = original
    return out, lse
