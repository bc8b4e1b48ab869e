"""Auditing a run: the masks of chosen layers and steps measured against dense attention on the model's own q, k, v.

:meth:`.handle.SparseAttentionHandle.audit` turns it on. Every sparse call of a chosen (layer, step) is measured by
:func:`sparsecore.quality.attention_fidelity` on that call's q, k, v over its valid tokens (float32, query chunks of
``max_elements`` scores): per head, the softmax mass the mask keeps (``recall``, AdaSpa's Recall), the relative L2
and cosine of the masked output against dense attention (for a mask that approximates its unlisted blocks, PASA's
default, with the approximation) and the worst query's recall. :func:`summary` pools a stats record's calls (both
guidance branches of a step) into its row. What is measured is the mask, exactly, not the kernel's rounding (the
property suites hold the kernels to float64 attention).

Cost: a dense attention in float32 per audited call on the call's device, the mask expanded to a per-head block
map, and one host read per call: a diagnostic for a few layers and steps, not for serving. It runs where a
process holds whole sequences (one GPU, or Wan under diffusers' Ulysses: its heads); sparsecore's own sequence
split (ring, unified, a joint video + text model under context parallelism) has no whole sequence to measure, and
an audited call there raises.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from sparsecore.ir import BlockMask
from sparsecore.ir.validation import check_index, check_int
from sparsecore.quality import Fidelity, attention_fidelity

if TYPE_CHECKING:
    from .stats import Record

NO_SEQUENCE_SPLIT = ("handle.audit: this call runs under sparsecore's sequence split (ring or unified context "
                     "parallelism, or a joint video + text model under context parallelism), where no process holds "
                     "the whole sequence to measure; audit on one GPU or under Ulysses, or call handle.audit(False)")


@dataclass(frozen=True)
class Audit:
    """Which sparse calls are measured (None: every layer, every step) and the measurement's score budget."""

    layers: frozenset[int] | None
    steps: frozenset[int] | None
    max_elements: int

    def wants(self, layer: int, step: int) -> bool:
        return (self.layers is None or layer in self.layers) and (self.steps is None or step in self.steps)

    def measure(self, record: "Record", q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockMask) -> None:
        """Add one call's fidelity to ``record``: q, k, v ``[B, H, L, D]`` over the mask's tokens."""
        record.audit.append(attention_fidelity(q, k, v, mask, max_elements=self.max_elements))


def make_audit(layers: Iterable[int] | None, steps: Iterable[int] | None, max_elements: int, num_layers: int,
               num_steps: int) -> Audit:
    """An :class:`Audit`, its arguments checked (layer and step indices in range, a positive score budget)."""
    def indices(values: Iterable[int] | None, field: str, count: int) -> frozenset[int] | None:
        if values is None:
            return None
        if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
            raise TypeError(f"{field}: expected None (all) or an iterable of ints, got {type(values).__name__}")
        return frozenset(check_index(value, field, count) for value in values)

    return Audit(indices(layers, "layers", num_layers), indices(steps, "steps", num_steps),
                 check_int(max_elements, "max_elements", 1))


def summary(fidelities: list[Fidelity]) -> dict[str, float]:
    """A stats row's audit fields: means over the record's calls and heads, the worst query's recall of them all."""
    return {"recall": float(np.mean([f.recall.mean() for f in fidelities])),
            "min_recall": float(min(f.min_recall.min() for f in fidelities)),
            "rel_l2": float(np.mean([f.rel_l2.mean() for f in fidelities])),
            "cosine": float(np.mean([f.cosine.mean() for f in fidelities]))}
