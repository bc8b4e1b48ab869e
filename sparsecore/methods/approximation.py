"""The planners' ``approximation`` parameter: what a sparse mask's rows get from the key blocks they do not keep.

``"drop"``: nothing (softmax over the kept blocks only). ``"zeroth"``, ``"global-first-order"``
(PISA, arXiv 2602.01077) and ``"grouped-first-order"`` (PASA, arXiv 2604.12219; one first-order
statistic per group of ``group_size`` consecutive key blocks, or ``"grouped-first-order:<blocks>"``):
the kernel adds a Taylor approximation of every unkept block around its mean key
(:mod:`sparsecore.ir.unselected`). Dense masks stay ``"drop"``: nothing is left to approximate.
"""

from __future__ import annotations

from typing import Any

from sparsecore.geometry import VideoGeometry
from sparsecore.ir import BlockMask, Unselected
from sparsecore.ir.host_facts import share_host_facts

APPROXIMATIONS = ("drop", "zeroth", "global-first-order", "grouped-first-order")


def check_approximation(value: Any, field: str = "approximation") -> str:
    """A valid ``approximation`` string (one of :data:`APPROXIMATIONS`, or ``"grouped-first-order:<blocks>"``)."""
    if not isinstance(value, str):
        raise TypeError(f"{field}: expected a string such as 'grouped-first-order' or 'drop', got "
                        f"{type(value).__name__} {value!r}")
    kind, colon, group = value.partition(":")
    if kind not in APPROXIMATIONS or (colon and (kind != "grouped-first-order" or not group.isascii()
                                                 or not group.isdigit() or len(group) > 9 or int(group) < 1)):
        raise ValueError(f"{field}: expected one of {list(APPROXIMATIONS)} or 'grouped-first-order:<blocks>' "
                         f"(a positive block count), got {value!r}")
    return value


def unselected_of(approximation: str, group_size: int) -> Unselected:
    """The IR's :class:`~sparsecore.ir.Unselected` for a checked ``approximation`` (groups of ``group_size``
    key blocks unless the string names its own)."""
    kind, _, group = approximation.partition(":")
    if kind == "grouped-first-order":
        return Unselected(kind, int(group) if group else group_size)
    return Unselected(kind)


def check_causal(unselected: Unselected, geometry: VideoGeometry | None) -> None:
    """Refuse an approximation where ``geometry``'s causal frames hide blocks (it has more frames than one causal block,
    as :func:`.causal.restrict` refuses): only ``"drop"`` is exact there, an approximation would add every unlisted
    block, the ones a row may not see included."""
    if geometry is not None and not isinstance(geometry, VideoGeometry):
        raise TypeError(f"geometry: expected a sparsecore.VideoGeometry, got {type(geometry).__name__}")
    if unselected.kind != "drop" and geometry is not None and geometry.frames > geometry.causal_frames > 0:
        raise ValueError(f"approximation: {unselected} would add every block a row does not list to its softmax, "
                         f"the later causal blocks (of {geometry.causal_frames} frames) it may not see included; pass "
                         f"approximation='drop' for a frame-causal geometry of {geometry.frames} frames")


def with_unselected(mask: BlockMask, unselected: Unselected, geometry: VideoGeometry | None = None) -> BlockMask:
    """``mask`` with its unlisted blocks treated as ``unselected`` (the lists are shared, not copied); refused where
    ``geometry`` (the mask's) hides blocks (:func:`check_causal`)."""
    if mask.unselected == unselected:
        return mask
    if geometry is not None:
        check_causal(unselected, geometry)
    return share_host_facts(BlockMask.unchecked(mask.num_heads, mask.q_offsets, mask.kv_offsets, mask.indptr,
                                                mask.indices, mask.budgets, mask.meta, unselected), mask)
