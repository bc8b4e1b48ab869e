"""What the host knows of a mask's lists without reading them from their device.

A read of a device tensor waits for the device's queue. Lowerings that size their plans from a mask's lists (the
longest row, whether a row is empty) keep what they read in :func:`host_reads`, shared by the mask and the copies
:meth:`.BlockMask.copy_to` makes of it; builders that know bounds on the row lengths (a top-k of a known ``k``)
note them with :func:`note_row_lengths`, so that a lowering can size its plan without any read; and
:func:`.padding.with_padding` notes which blocks are padding (:func:`note_padding`), which no row lists. All assume what
:attr:`.BlockMask.compiled_kernels` assumes: a mask's lists are not changed in place.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import validation as v

if TYPE_CHECKING:
    from .block_mask import BlockMask

ROW_LENGTHS = "row lengths"
PADDING = "padding"


def host_reads(mask: "BlockMask") -> dict:
    """What lowerings read from ``mask``'s lists to the host while converting it (the sizes of their plans: longest
    lists, counts), by a key of their own, and the row-length bounds its builder noted: shared by the mask and the
    copies :func:`.placement.copied` makes of it, whose lists are the same (a session that brings a held mask back
    for each call would otherwise wait once per call for the same values)."""
    return mask.derived.setdefault("host_reads", {})


def share_host_facts(mask: "BlockMask", source: "BlockMask", derivation: tuple | None = None) -> "BlockMask":
    """Give ``mask`` what is known of ``source``'s lists: the same :func:`host_reads` where its lists are
    ``source``'s (a copy on another device, another treatment of unlisted blocks), or, for lists made from
    ``source``'s by ``derivation`` (a key: the same derivation gives the same lists), one kept with ``source`` for
    every mask so made; returns ``mask``."""
    facts = host_reads(source)
    shared = facts if derivation is None else facts.setdefault(derivation, {})
    shared.update(mask.derived.get("host_reads", {}))              # what ``mask`` itself was built knowing
    mask.derived["host_reads"] = shared
    return mask


def note_row_lengths(mask: "BlockMask", shortest: int, longest: int) -> "BlockMask":
    """Record that every row of ``mask`` keeps at least ``shortest`` and at most ``longest`` key blocks (bounds its
    builder knows on the host: a top-k's ``k``, a full text row); returns ``mask``. Checked against the block count
    only: reading the lists is what this saves. A lowering sizes buffers from ``longest``, so it must hold."""
    shortest = v.check_int(shortest, "shortest", minimum=0)
    longest = v.check_int(longest, "longest", minimum=shortest)
    if longest > mask.num_kv_blocks:
        raise ValueError(f"longest: expected at most the mask's {mask.num_kv_blocks} key blocks, got {longest}; pass "
                         f"the most blocks a row of this mask keeps")
    host_reads(mask)[ROW_LENGTHS] = (shortest, longest)
    return mask


def row_lengths(mask: "BlockMask") -> tuple[int, int] | None:
    """The ``(shortest, longest)`` bounds :func:`note_row_lengths` recorded for ``mask`` (or a mask it was copied
    from), or None."""
    return host_reads(mask).get(ROW_LENGTHS)


def note_padding(mask: "BlockMask", q_blocks: int, kv_blocks: int) -> "BlockMask":
    """Record that ``mask``'s query blocks from ``q_blocks`` on and key blocks from ``kv_blocks`` on are padding
    (:func:`.padding.with_padding`): no row lists those key blocks, and those query blocks' rows list nothing.
    Returns ``mask``."""
    host_reads(mask)[PADDING] = (v.check_int(q_blocks, "q_blocks"), v.check_int(kv_blocks, "kv_blocks"))
    return mask


def blocks_before_padding(mask: "BlockMask") -> tuple[int, int] | None:
    """The query and key blocks of ``mask`` before its padding (:func:`note_padding`), or None where none is known."""
    return host_reads(mask).get(PADDING)


def carry_padding(mask: "BlockMask", source: "BlockMask") -> "BlockMask":
    """Give ``mask`` (``source``'s lists moved, or some of its heads: the same blocks) what is known of
    ``source``'s padding; returns ``mask``."""
    found = blocks_before_padding(source)
    return mask if found is None else note_padding(mask, *found)


def as_new(mask: "BlockMask") -> "BlockMask":
    """``mask``'s lists as a mask nothing is known of: a lowering converts it as it converts a mask its method built
    for this call (for benchmarks and tests of that per-call work). The lists are shared, not copied."""
    return type(mask).unchecked(mask.num_heads, mask.q_offsets, mask.kv_offsets, mask.indptr, mask.indices,
                                mask.budgets, mask.meta, mask.unselected)
