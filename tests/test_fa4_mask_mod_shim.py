"""The CuTe DSL lookup mask_mod run in plain Python, through a stand-in for the few cutlass names it uses, against the
IR's token mask. The other CPU tests of fa4 re-implement the lookup (the FA4 stand-in, ``fa4_replay``), so without this
a wrong word index in ``fa4_mask_mods`` showed on an H200 only."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from oracle import expand_to_tokens

from sparsecore import BlockMask
from sparsecore.backends.cuda import fa4_mask_mods
from sparsecore.backends.cuda.fa4_layout import to_fa4


class _Frag:
    def __init__(self, value):
        self.value, self.shape = value, (1,)

    def __getitem__(self, i):
        return self.value


class _Rmem(list):
    def load(self):
        return list(self)


@pytest.fixture
def shimmed(monkeypatch):
    cutlass = types.ModuleType("cutlass")
    cutlass.Int32 = int
    cutlass.Uint32 = lambda x: int(x) & 0xFFFFFFFF
    cutlass.Boolean = bool
    cutlass.range_constexpr = range
    cute = types.ModuleType("cutlass.cute")
    cute.jit = lambda f: f
    cute.size = lambda shape: int(np.prod(shape))
    cute.make_rmem_tensor = lambda shape, dtype: _Rmem([None] * int(np.prod(shape)))
    cutlass.cute = cute
    utils = types.ModuleType("flash_attn.cute.utils")
    utils.shr_u32 = lambda w, s: (int(w) & 0xFFFFFFFF) >> int(s)
    fa, fa_cute = types.ModuleType("flash_attn"), types.ModuleType("flash_attn.cute")
    fa.cute, fa_cute.utils = fa_cute, utils
    for name, mod in (("cutlass", cutlass), ("cutlass.cute", cute), ("flash_attn", fa),
                      ("flash_attn.cute", fa_cute), ("flash_attn.cute.utils", utils)):
        monkeypatch.setitem(sys.modules, name, mod)
    for name in ("cutlass", "cute", "fa_utils"):         # the module's globals the factory sets: restored after
        monkeypatch.setattr(fa4_mask_mods, name, getattr(fa4_mask_mods, name, None), raising=False)
    return fa4_mask_mods.lookup_mask_mod.__wrapped__()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lookup_mask_mod_keeps_exactly_the_irs_pairs(shimmed, seed):
    rng = np.random.default_rng(seed)
    # 70 key blocks of 3 tokens: block ids past 32 and 64 exercise the word index and the shift
    q_off, kv_off = np.array([0, 5, 11, 16]), np.arange(0, 3 * 70 + 1, 3)
    keep = rng.random((2, 3, 70)) < 0.4
    mask = BlockMask.from_lists([[np.flatnonzero(r).tolist() for r in h] for h in keep], q_off, kv_off)
    layout = to_fa4(mask, 16, 16, reorder_keys=False)
    assert layout.needs_mask_mod
    aux = [layout.q_block_of_token.numpy(), layout.kv_block_of_token.numpy(),
           layout.keep_bits.numpy().astype(np.int64) & 0xFFFFFFFF]
    want = expand_to_tokens(mask)
    for h in range(2):
        for q in range(mask.q_len):
            for k in range(mask.kv_len):
                got = shimmed(_Frag(0), _Frag(h), _Frag(q), _Frag(k), None, aux)
                assert got == [bool(want[h, q, k])], (h, q, k)
