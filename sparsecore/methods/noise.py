"""Reproducible Gumbel noise for PASA's stochastic selection, computed from counters on any device.

PASA (arXiv 2604.12219) adds independent random bias to the block scores before top-k,
drawn afresh per layer and step. Here every entry's noise is a pure function of
``(seed, layer, step, head, row, column)``: a SplitMix64 hash (Steele, Lea and Flood,
"Fast splittable pseudorandom number generators", OOPSLA 2014; the finalizer of Java's
``SplittableRandom``) of the entry's counter under a per-head key mixed from the other four,
mapped to a uniform ``(0, 1)`` with 24 bits (float32) and then to ``Gumbel(0, scale)``. So the noise of a head
is the same whether it is drawn alone (a Ulysses rank's shard) or with every head, on a
CPU or a GPU, with no generator state and no Python loop over heads.

Wrapping 64-bit arithmetic is done in torch int64 (two's complement); logical right
shifts are arithmetic shifts with the sign bits masked off.
"""

from __future__ import annotations

import torch

GOLDEN = -7046029254386353131        # 0x9E3779B97F4A7C15 as int64
MIX_1 = -4658895280553007687         # 0xBF58476D1CE4E5B9
MIX_2 = -7723592293110705685         # 0x94D049BB133111EB


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (as uint64)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """The SplitMix64 output function of ``x + GOLDEN`` (int64 in, int64 out, bitwise as uint64)."""
    x = x + GOLDEN
    x = (x ^ _shift_right(x, 30)) * MIX_1
    x = (x ^ _shift_right(x, 27)) * MIX_2
    return x ^ _shift_right(x, 31)


def entry_key(seed: int, layer: int | None, step: int) -> int:
    """The key of one (seed, layer, step), as a Python int in int64 range."""
    key = torch.tensor(0, dtype=torch.int64)
    for part in (seed, -1 if layer is None else layer, step):
        key = splitmix64(key ^ int(part))
    return int(key)


def gumbel(heads: range, rows: int, cols: int, *, seed: int, layer: int | None, step: int, scale: float,
           device: torch.device | str) -> torch.Tensor:
    """Gumbel(0, ``scale``) noise, float32 ``[len(heads), rows, cols]`` for the given global head indices."""
    key = entry_key(seed, layer, step)
    head_key = splitmix64(torch.arange(heads.start, heads.stop, device=device, dtype=torch.int64) ^ key)
    cell = torch.arange(rows * cols, device=device, dtype=torch.int64).view(1, rows, cols)
    bits = splitmix64(head_key.view(-1, 1, 1) ^ cell)
    uniform = (_shift_right(bits, 40).float() + 0.5) * 2.0 ** -24                       # in (0, 1)
    return uniform.log_().neg_().log_().mul_(-scale)
