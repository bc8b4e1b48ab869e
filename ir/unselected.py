"""What a query row gets from the key blocks its list leaves out.

Most methods drop them (``"drop"``: softmax over the listed blocks only, the IR's
original meaning). PASA (arXiv 2604.12219, building on PISA, arXiv 2602.01077) instead
approximates every unlisted key block ``j`` of a row around its mean key ``k̄_j``:

- ``"zeroth"``: adds ``|B_j| exp(s q·k̄_j)`` to the softmax denominator and
  ``exp(s q·k̄_j) ΣV_j`` to the numerator;
- ``"global-first-order"`` (PISA): also adds ``exp(s q·k̄_j) s qᵀ Ĥ_j`` to the numerator
  with ``Ĥ_j = |B_j| H / T``, ``H = Σ_t (k_t − k̄_(block of t))ᵀ v_t`` over all keys;
- ``"grouped-first-order"`` (PASA): the same with one statistic per group of
  ``group_blocks`` consecutive key blocks, ``Ĥ_j = |B_j| H_g / T_g``.

The LSE a kernel returns includes the approximated mass. The reference lowering is the
executable definition.
"""

from __future__ import annotations

from dataclasses import dataclass

from .validation import check_int

KINDS = ("drop", "zeroth", "global-first-order", "grouped-first-order")
GROUP_DIGITS = 4000        # a group size's digits in a file (Python's int() takes up to 4300)
GROUP_LIMIT = 10 ** GROUP_DIGITS


@dataclass(frozen=True)
class Unselected:
    """The treatment of unlisted key blocks: ``kind`` in :data:`KINDS`; ``group_blocks`` for the grouped kind."""

    kind: str = "drop"
    group_blocks: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unselected.kind: expected one of {list(KINDS)}, got {self.kind!r}")
        if self.kind == "grouped-first-order":
            group = check_int(self.group_blocks, "unselected.group_blocks", 1)
            if group >= GROUP_LIMIT:                                   # compared as ints: str() of it would fail
                raise ValueError(f"unselected.group_blocks: expected fewer than {GROUP_DIGITS + 1} digits (what a "
                                 f"mask file holds), got {group.bit_length()} bits; any group past the key blocks is "
                                 f"one group of all of them: pass 2**31 - 1, or kind 'global-first-order'")
            object.__setattr__(self, "group_blocks", group)
        elif self.group_blocks is not None:
            raise ValueError(f"unselected.group_blocks: only the 'grouped-first-order' kind takes a group size, got "
                             f"{self.group_blocks} with kind {self.kind!r}")

    def __str__(self) -> str:
        return self.kind if self.group_blocks is None else f"{self.kind}:{self.group_blocks}"

    @classmethod
    def parse(cls, text: str) -> "Unselected":
        """Inverse of ``str()``: ``"drop"``, ``"zeroth"``, ``"global-first-order"``, ``"grouped-first-order:32"``."""
        if not isinstance(text, str):
            raise TypeError(f"unselected: expected a string such as 'drop' or 'grouped-first-order:32', got "
                            f"{type(text).__name__}")
        kind, colon, group = text.partition(":")
        if not colon:
            return cls(kind)
        if not (group.isascii() and group.isdigit() and len(group) <= GROUP_DIGITS):
            raise ValueError(f"unselected: expected '<kind>:<group blocks>' with a positive integer, got {text!r}")
        return cls(kind, int(group))


DROP = Unselected()


def check_unselected(unselected: object) -> None:
    """A mask's ``unselected`` is an :class:`Unselected` (a string such as ``"drop"`` is not)."""
    if not isinstance(unselected, Unselected):
        raise TypeError(f"unselected: expected a sparsecore.ir.Unselected, got {type(unselected).__name__}")
