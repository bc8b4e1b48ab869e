"""The CuTe DSL ``mask_mod`` of the ``fa4`` lowering: which pairs of a mask tile are kept.

FA4's SM90 forward calls ``mask_mod(batch, head, q_idx, kv_idx, seqlen_info, aux_tensors)`` once per
element of a *mask* tile (``flash_attn/cute/mask.py``, unrolled over the thread's accumulator
fragment; full tiles skip it). :func:`lookup_mask_mod` reads a token's block from a table
(``q_block_of_token``, ``kv_block_of_token``) and the IR's block map bit-packed (``keep_bits``
uint32 ``[H, MB, NW]``, bit ``j % 32`` of word ``j // 32`` set when row ``(h, i)`` keeps key block
``j``, :class:`.fa4_layout.Fa4Layout`). Where it costs: on LVSA's frame mask at 6x (H200, 2026-12-01,
bench/fa4_mask_mod_probe.py) this lookup and a form computing the blocks by division by constant
sizes (one load an element instead of three) both ran at 557-558 eff TFLOP/s, a mask_mod keeping
every pair at 623: a mask tile's cost is FA4's per-element masking, not the lookup, so the lowering
makes fewer mask tiles (:func:`.fa4_key_order.key_order`) rather than cheaper ones.

Built on first use: importing cutlass is slow and must not happen at ``import sparsecore``. The
names it uses are module globals, as in FA4's own mask_mods, so its compile-cache hash
(``flash_attn.cute.utils.hash_callable``: source and closure values) is its source.
"""

from __future__ import annotations

import functools
from typing import Any


@functools.lru_cache(maxsize=None)
def lookup_mask_mod() -> Any:
    """Keep (q, k) iff row (head, q_block[q]) keeps key block kv_block[k].

    ``aux_tensors``: ``[q_block_of_token int32, kv_block_of_token int32, keep_bits uint32 [H, MB, NW]]`` (NW even).
    """
    global cutlass, cute, fa_utils
    import cutlass
    import cutlass.cute as cute
    from flash_attn.cute import utils as fa_utils

    @cute.jit
    def sparsecore_block_lookup(batch, head, m_idx, n_idx, seqlen_info, aux_tensors):
        q_block = aux_tensors[0]
        kv_block = aux_tensors[1]
        keep_bits = aux_tensors[2]
        qb = q_block[m_idx[0]]
        kb = kv_block[n_idx[0]]
        word = keep_bits[head[0], qb, kb // cutlass.Int32(32)]
        shift = cutlass.Uint32(kb % cutlass.Int32(32))
        bit_set = cutlass.Boolean(fa_utils.shr_u32(word, shift) & cutlass.Uint32(1))
        result = cute.make_rmem_tensor(n_idx.shape, dtype=cutlass.Boolean)
        for j in cutlass.range_constexpr(cute.size(n_idx.shape)):
            result[j] = bit_set
        return result.load()

    return sparsecore_block_lookup
