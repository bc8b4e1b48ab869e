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
``bench/key_split_probe.py``; 64-token masks, d = 0.2, D = 128, eff TFLOP/s, FA4's own launch ->
this one): at S = 32K 442-444 -> 544-560, at 98K 543 (Triton 445); at 188,736 tokens 398-405 ->
416-491 on uniform masks and 375-393 -> 419-475 on the AdaSpa-shaped one, runs up to 18% apart
there. One head's K/V (97 MB) is then twice the 50 MB L2, and the faster kernel seems to wait on
memory: its rate falls with length where Triton's does not, and cutting the key range into 4 or 8
parts took its kernels from 92.1 to 86.3 and 83.9 ms (a repeat of the unsplit call in that run took
101.0, so this is a hint, not a measurement). Registers split 216 / 40 (224 / 32 was as fast; 232 / 24
and 208 / 48 were slower at 188,736 tokens in their runs: 411 and 330).
Outputs are the same kernel's; only registers and occupancy change.

How: a subclass overrides ``_setup_attributes`` (which the forward's ``__call__`` runs after it
sets the register split; the kernel wrapper checks that it held) and wraps ``kernel``'s launcher so its
``launch`` gets the bound. ``interface._flash_attn_fwd`` (private: ``(out, lse, ...)``, the function
``flash_attn_func`` calls) builds the kernel object from the module global ``FlashAttentionForwardSm90``
on a compile-cache miss, so :func:`forward` swaps that global for its call, under a lock, and passes
``num_threads=TWO_PER_SM_THREADS`` (the threads such a kernel really has; the SM90 forward computes its
own and ignores the argument, which is part of the compile key). The subclass changes only kernels
built with that value, so an FA4 call from another thread during the swap (``num_threads=384``)
still gets FA4's kernel, and the two never share a cache entry. FA4's on-disk cache (off unless
``FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1``) keys on FA4's sources, not on the split: change
``MMA_REGS`` / ``PRODUCER_REGS`` only with it off. Used for 64 x 64 tiles on SM90 with flash-attn-4
4.0.0b36 (:func:`supported`), the case measured.
"""

from __future__ import annotations

import functools
import threading
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch

MMA_REGS, PRODUCER_REGS = 216, 40       # per thread; two CTAs of 2 x 128 threads fill the 64K-register file
TWO_PER_SM_THREADS = 256                # compile-key value that marks these kernels (FA4's default: 384)
TESTED_VERSION = "4.0.0b36"             # the flash-attn-4 whose SM90 forward this was read from and run with
_SWAP = threading.Lock()


@functools.lru_cache(maxsize=None)
def supported() -> bool:
    """Whether the installed flash-attn-4 is the version this module was read from (else FA4's own launch is kept)."""
    try:
        return version("flash-attn-4") == TESTED_VERSION
    except PackageNotFoundError:
        return False


class _Launcher:
    """A CuTe DSL kernel launcher whose ``launch`` asks for ``ctas`` resident CTAs per SM."""

    def __init__(self, launcher: Any, ctas: int) -> None:
        self._launcher, self._ctas = launcher, ctas

    def launch(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["min_blocks_per_mp"] = max(self._ctas, kwargs.get("min_blocks_per_mp") or 1)
        return self._launcher.launch(*args, **kwargs)


def check_split(mma_regs: Any, producer_regs: Any) -> None:
    """Refuse a register split that two resident CTAs cannot share or that ``setmaxnreg`` cannot take."""
    ints = all(type(x) is int for x in (mma_regs, producer_regs))
    if not (ints and 24 <= producer_regs <= 128 <= mma_regs and mma_regs + producer_regs <= 256
            and mma_regs % 8 == 0 and producer_regs % 8 == 0):
        raise ValueError(f"mma_regs, producer_regs: expected integers, multiples of 8, with 24 <= producer <= 128 <= "
                         f"mma (setmaxnreg lowers the producer's and raises the MMA warps') and mma + producer <= 256 "
                         f"(two CTAs of 2 x 128 threads in 64K registers), got {mma_regs!r} / {producer_regs!r}; "
                         f"the measured split is {MMA_REGS} / {PRODUCER_REGS}")


def forward_class(mma_regs: int, producer_regs: int) -> type:
    """The SM90 forward that, built with ``num_threads=TWO_PER_SM_THREADS``, gives its one-warpgroup kernels the
    register split ``mma_regs / producer_regs`` and two CTAs per SM. Built with any other ``num_threads`` (FA4's
    own calls), or with two or three MMA warpgroups, it is FA4's forward unchanged. Checked on every call (the
    class cache would take 216.0 for the 216 it holds)."""
    check_split(mma_regs, producer_regs)
    return _forward_class(mma_regs, producer_regs)


@functools.lru_cache(maxsize=None)
def _forward_class(mma_regs: int, producer_regs: int) -> type:
    from flash_attn.cute.flash_fwd_sm90 import FlashAttentionForwardSm90

    class TwoPerSmForwardSm90(FlashAttentionForwardSm90):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._asked = kwargs.get("num_threads") == TWO_PER_SM_THREADS   # __call__ overwrites self.num_threads

        def _two_per_sm(self) -> bool:
            return self._asked and self.num_wg_mma == 1

        def _setup_attributes(self) -> None:
            if self._two_per_sm():
                self.num_mma_regs, self.num_producer_regs = mma_regs, producer_regs
            super()._setup_attributes()

        def kernel(self, *args: Any, **kwargs: Any) -> Any:
            launcher = super().kernel(*args, **kwargs)
            if not self._two_per_sm():
                return launcher
            if (self.num_mma_regs, self.num_producer_regs) != (mma_regs, producer_regs):
                raise RuntimeError(f"flash-attn-4's SM90 forward set its register split after _setup_attributes "
                                   f"({self.num_mma_regs} / {self.num_producer_regs}, not {mma_regs} / "
                                   f"{producer_regs}): two CTAs per SM would not fit; use Fa4Options(ctas_per_sm=1)")
            return _Launcher(launcher, 2)

    return TwoPerSmForwardSm90


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: Any) -> tuple[Any, Any]:
    """``flash_attn.cute.interface._flash_attn_fwd(q, k, v, **kwargs)`` with one-warpgroup SM90 kernels at two
    CTAs per SM: returns its ``(out, lse)``. ``q [B, Sq, H, D]``, ``k, v [B, Sk, Hkv, D]`` as for FA4. Forward
    only: the private function records no autograd graph (``flash_attn_func``'s autograd wrapper does)."""
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
