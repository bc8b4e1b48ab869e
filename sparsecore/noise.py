"""Reproducible Gumbel noise for PASA's stochastic selection, computed from counters on any device.

PASA (arXiv 2604.12219) adds independent random bias to the block scores before top-k,
drawn afresh per layer and step. Here every entry's noise is a pure function of
``(seed, layer, step, head, row, column)``: the entry's counter XOR a 32-bit key per head,
mixed by Chris Wellons' ``lowbias32`` integer hash (github.com/skeeto/hash-prospector), mapped
to a uniform ``(0, 1)`` with 23 bits (exact in float32) and then to ``Gumbel(0, scale)``. The per-head
keys come from a SplitMix64 chain (Steele, Lea and Flood, "Fast splittable pseudorandom number
generators", OOPSLA 2014) over ``(seed, layer, step, head)``. So the noise of a head
is the same whether it is drawn alone (a Ulysses rank's shard) or with every head, on a
CPU or a GPU, with no generator state and no Python loop over heads.

Wrapping arithmetic is done in torch int64 / int32 (two's complement); logical right shifts
are arithmetic shifts with the sign bits masked off. The per-entry work is 32-bit and in place
(a 12-head 2950 x 2950 map at Wan 6x is 104 M entries).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GOLDEN = -7046029254386353131        # 0x9E3779B97F4A7C15 as int64
MIX_1 = -4658895280553007687         # 0xBF58476D1CE4E5B9
MIX_2 = -7723592293110705685         # 0x94D049BB133111EB


LOWBIAS_1 = 0x7FEB352D
LOWBIAS_2 = -2073254261              # 0x846CA68B as int32
MAX_ENTRIES = 1 << 31                # counters are int32
SEED_LIMIT = 1 << 64                 # a key takes a seed's low 64 bits: a larger seed repeats a smaller one's noise


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (as uint64)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix32_(x: torch.Tensor) -> torch.Tensor:
    """``lowbias32`` on int32 in place: x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16."""
    for shift, factor in ((16, LOWBIAS_1), (15, LOWBIAS_2), (16, None)):
        x.bitwise_xor_((x >> shift) & ((1 << (32 - shift)) - 1))
        if factor is not None:
            x.mul_(factor)
    return x


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """The SplitMix64 output function of ``x + GOLDEN`` (int64 in, int64 out, bitwise as uint64)."""
    x = x + GOLDEN
    x = (x ^ _shift_right(x, 30)) * MIX_1
    x = (x ^ _shift_right(x, 27)) * MIX_2
    return x ^ _shift_right(x, 31)


def entry_key(seed: int, layer: int | None, step: int) -> int:
    """The key of one (seed, layer, step), as a Python int in int64 range (Python ints: no tensor to read back)."""
    mask = (1 << 64) - 1
    key = 0
    for part in (seed, -1 if layer is None else layer, step):
        x = ((key ^ (int(part) & mask)) + GOLDEN) & mask               # SplitMix64 as in splitmix64, on uint64
        x = ((x ^ (x >> 30)) * (MIX_1 & mask)) & mask
        x = ((x ^ (x >> 27)) * (MIX_2 & mask)) & mask
        key = x ^ (x >> 31)
    return key - (1 << 64) if key >> 63 else key


def head_keys(heads: range, seed: int, layer: int | None, step: int, device: torch.device | str) -> torch.Tensor:
    """The 32-bit key of each head of ``heads`` (global indices, any step): the high half of its SplitMix64 output,
    as int32 ``[len(heads)]``."""
    key = entry_key(seed, layer, step)
    indices = torch.arange(heads.start, heads.stop, heads.step, dtype=torch.int64, device=device)
    high = _shift_right(splitmix64(indices ^ key), 32)
    return torch.where(high >= 1 << 31, high - (1 << 32), high).to(torch.int32)


@dataclass(frozen=True)
class GumbelNoise:
    """The noise of one ``(seed, layer, step)`` for some heads: entry ``(h, r, c)`` of a ``rows x cols`` map is
    Gumbel(0, ``scale``) of the counter ``r * cols + c`` XOR ``keys[h]`` (int32 ``[H]``, :func:`head_keys`).

    :meth:`sample` writes the map; a backend may compute the same values where it reads the scores
    (``sparsecore.registry.RowTopOp``): every step is 32-bit integer arithmetic and one float32
    conversion, exact everywhere, then two float32 ``log``, which libraries may round differently
    in the last bit (as torch's CPU and CUDA ``log`` may).
    """

    keys: torch.Tensor
    scale: float

    def sample(self, rows: int, cols: int) -> torch.Tensor:
        """The noise map, float32 ``[H, rows, cols]``."""
        if rows * cols >= MAX_ENTRIES:
            raise ValueError(f"rows, cols: the noise counter is 32-bit, got {rows} x {cols} entries per head")
        bits = torch.arange(rows * cols, device=self.keys.device, dtype=torch.int32).view(1, rows, cols) \
            ^ self.keys.view(-1, 1, 1)
        uniform = _mix32_(bits).bitwise_right_shift_(9).bitwise_and_((1 << 23) - 1).float().add_(0.5).mul_(2.0 ** -23)
        return uniform.log_().neg_().log_().mul_(-self.scale)


def gumbel(heads: range, rows: int, cols: int, *, seed: int, layer: int | None, step: int, scale: float,
           device: torch.device | str) -> torch.Tensor:
    """Gumbel(0, ``scale``) noise, float32 ``[len(heads), rows, cols]`` for the given global head indices."""
    return GumbelNoise(head_keys(heads, seed, layer, step, device), scale).sample(rows, cols)
