"""A mask extended over padding tokens: blocks no row lists, whose own rows list nothing (output 0, LSE -inf).

A batch's texts padded to one length (HunyuanVideo 1.5's 1,985 text slots, most of them padding for a short
prompt) put padding tokens after a mask's valid ones. The padding is cut into blocks no larger than the mask's
largest on each side, so a kernel tiles the padded mask as it tiles the mask itself: one block over the padding
(1,800 tokens after 64-token blocks) made Triton choose 128-wide tiles, on which 64-token blocks take twice the
work, and made ``compile`` class the mask as mixed sizes.
"""

from __future__ import annotations

import numbers
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from . import validation as v
from .host_facts import blocks_before_padding, note_padding

if TYPE_CHECKING:
    from .block_mask import BlockMask

PADDING_BLOCKS = 1 << 20        # padding blocks a side (checked before any is made): text padding needs tens


def padded_offsets(offsets: np.ndarray, length: int) -> np.ndarray:
    """``offsets`` extended to ``length`` by blocks of the largest block's size, the last one possibly shorter."""
    offsets = np.asarray(offsets, dtype=np.int64)
    block = int(np.diff(offsets).max())
    return np.concatenate([offsets, np.append(np.arange(int(offsets[-1]) + block, length, block), length)])


def with_padding(mask: "BlockMask", length: int, meta: Mapping[str, Any] | None = None) -> "BlockMask":
    """``mask`` extended to ``length`` tokens on both sides by padding blocks (see the module docstring); ``meta``
    replaces the mask's if given. The lists are shared, the row pointers extended by the padding's empty rows."""
    from .block_mask import BlockMask
    if mask.unselected.kind != "drop":
        raise ValueError(f"unselected: with_padding expected a mask that drops unlisted blocks, got "
                         f"{str(mask.unselected)!r} (the padding would enter every row's approximation); run the "
                         f"mask on its {mask.q_len} tokens and write 0 to the rest")
    longest = max(mask.q_len, mask.kv_len)
    if isinstance(length, numbers.Integral) and not isinstance(length, bool) and length <= longest:
        raise ValueError(f"length: expected an int > {longest:,} (both sides are padded to one length, longer than "
                         f"q_len={mask.q_len:,} and kv_len={mask.kv_len:,}), got {length:,}; pass the padded length "
                         f"of the sequence the mask runs on")
    length = v.check_int(length, "length", longest + 1)
    v.check_pairs(mask.num_heads, length, length, "length",
                  "no attention input has that many; pass the length of the sequence the mask runs on")
    meta = mask.meta if meta is None else v.freeze_meta(meta)         # checked before the padding is built
    rows, columns = (-(-(length - size) // mask.largest_block_size(side))
                     for side, size in (("q", mask.q_len), ("kv", mask.kv_len)))
    if max(rows, columns) > PADDING_BLOCKS or mask.num_heads * (mask.num_q_blocks + rows + 1) > v.INDEX_LIMIT:
        largest = f"{mask.largest_block_size('q')} and {mask.largest_block_size('kv')} tokens"
        raise ValueError(f"length: padding {mask.q_len} query and {mask.kv_len} key tokens to {length:,} adds "
                         f"{rows:,} query and {columns:,} key blocks (the mask's largest: {largest}), expected at most "
                         f"{PADDING_BLOCKS:,} a side and row pointers int32 can index for {mask.num_heads} heads; "
                         f"pass the padded length of a batch's inputs")
    if mask.on_host:
        indptr = v.frozen(np.concatenate([mask.indptr, np.repeat(mask.indptr[:, -1:], rows, axis=1)], axis=1))
    else:
        import torch
        indptr = torch.cat([mask.indptr, mask.indptr[:, -1:].expand(-1, rows)], dim=1)
    padded = BlockMask.unchecked(mask.num_heads, padded_offsets(mask.q_offsets, length),
                                 padded_offsets(mask.kv_offsets, length), indptr, mask.indices, mask.budgets,
                                 meta, mask.unselected)
    source = unpadded(mask)                                      # a padded mask padded again: its source's
    return note_padding(padded, source.num_q_blocks, source.num_kv_blocks)


def unpadded(mask: "BlockMask") -> "BlockMask":
    """``mask`` without the padding blocks :func:`with_padding` added (``mask`` itself where it added none): the
    blocks rows may list, whose layout is what a kernel's speed depends on. Its lists are views of ``mask``'s."""
    from .block_mask import BlockMask
    q_blocks, kv_blocks = blocks_before_padding(mask) or (mask.num_q_blocks, mask.num_kv_blocks)
    if (q_blocks, kv_blocks) == (mask.num_q_blocks, mask.num_kv_blocks):
        return mask
    return BlockMask.unchecked(mask.num_heads, mask.q_offsets[:q_blocks + 1], mask.kv_offsets[:kv_blocks + 1],
                               mask.indptr[:, :q_blocks + 1], mask.indices, mask.budgets, mask.meta, mask.unselected)
