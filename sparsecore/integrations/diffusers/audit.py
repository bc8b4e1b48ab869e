"""Auditing a run: the masks of chosen layers and steps measured against dense attention on the model's own q, k, v.

:meth:`.handle.SparseAttentionHandle.audit` turns it on. Every sparse call of a chosen (layer, step) is measured on
that call's q, k, v over its valid tokens, per head (:func:`fidelity`):

- ``recall``: the softmax mass the mask keeps (AdaSpa's Recall, arXiv 2502.21079 Eq. 9), per query
  ``exp(LSE_kept - LSE_dense)``: the LSE of the mask's kernel with its unlisted blocks dropped against dense
  attention's; ``min_recall``: the worst query's;
- ``rel_l2`` and ``cosine`` of the mask's output (for a mask that approximates its unlisted blocks, PASA's default,
  with the approximation) against dense attention's.

Both sides run the kernels a step runs: dense attention with its LSE (:func:`sparsecore.search.dense_attention`:
FlashAttention-4's or cuDNN's on an H200) and the mask's compiled kernel, once more (twice for an approximating
mask), so an audited call costs about a dense step's attention more, and one host read. In bf16 the outputs' own
rounding puts ``rel_l2`` near 0.003 for a mask that keeps everything: below that, the mask costs nothing measurable.
:func:`summary` pools a stats record's calls (both guidance branches of a step) into its row.

It runs where a process holds whole sequences (one GPU, or Wan under diffusers' Ulysses: its heads); sparsecore's
own sequence split (ring, unified, a joint video + text model under context parallelism) has no whole sequence to
measure, and an audited call there raises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch

from sparsecore.ir import BlockMask, Unselected
from sparsecore.ir.validation import check_index
from sparsecore.methods.approximation import with_unselected
from sparsecore.quality import Fidelity
from sparsecore.search import dense_attention

NO_SEQUENCE_SPLIT = ("handle.audit: this call runs under sparsecore's sequence split (ring or unified context "
                     "parallelism, or a joint video + text model under context parallelism), where no process holds "
                     "the whole sequence to measure; audit on one GPU or under Ulysses, or call handle.audit(False)")


@dataclass(frozen=True)
class Audit:
    """Which sparse calls are measured (None: every layer, every step)."""

    layers: frozenset[int] | None
    steps: frozenset[int] | None

    def wants(self, layer: int, step: int) -> bool:
        return (self.layers is None or layer in self.layers) and (self.steps is None or step in self.steps)


def make_audit(layers: Iterable[int] | None, steps: Iterable[int] | None, num_layers: int, num_steps: int) -> Audit:
    """An :class:`Audit`, its layer and step indices checked."""
    def indices(values: Iterable[int] | None, field: str, count: int) -> frozenset[int] | None:
        if values is None:
            return None
        if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
            raise TypeError(f"{field}: expected None (all) or an iterable of ints, got {type(values).__name__}")
        return frozenset(check_index(value, field, count) for value in values)

    return Audit(indices(layers, "layers", num_layers), indices(steps, "steps", num_steps))


def fidelity(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockMask,
             compiled: Callable[[BlockMask], Any], dense: Callable[..., tuple] = dense_attention) -> Fidelity:
    """Per-head recall, worst-query recall, relative L2 and cosine of ``mask`` (its kernel from ``compiled``) against
    dense attention, on q, k, v ``[B, H, L, D]`` (module docstring). ``dense``: dense attention with its LSE (for a
    frame-causal model, over the keys each query may see: :meth:`.planner.Planner.dense_with_lse`)."""
    dense_out, dense_lse = dense(q, k, v)
    drop = with_unselected(mask, Unselected("drop"))
    out, kept_lse = compiled(drop)(q, k, v, return_lse=True)
    if drop is not mask:
        out = compiled(mask)(q, k, v)
    recall = torch.exp(kept_lse.float() - dense_lse.float())                        # [B, H, L]; no key kept: 0
    norm = partial(torch.linalg.vector_norm, dim=(0, 2, 3),                  # per head, no float32 copy; a float64
                   dtype=torch.promote_types(out.dtype, torch.float32))       # model's in float64 (it cannot narrow)
    diff2, ref2, out2 = (norm(x) ** 2 for x in (out - dense_out, dense_out, out))
    dot = (out2 + ref2 - diff2) / 2
    tiny = torch.finfo(torch.float32).tiny
    found = torch.stack([recall.mean((0, 2)), recall.amin((0, 2)), (diff2 / ref2.clamp_min(tiny)).sqrt(),
                         dot / (out2 * ref2).sqrt().clamp_min(tiny)]).double().cpu().numpy()   # the one host read
    return Fidelity(recall=found[0], min_recall=found[1], rel_l2=found[2], cosine=found[3])


def summary(fidelities: list[Fidelity]) -> dict[str, float]:
    """A stats row's audit fields: means over the record's calls and heads, the worst query's recall of them all."""
    return {"recall": float(np.mean([f.recall.mean() for f in fidelities])),
            "min_recall": float(min(f.min_recall.min() for f in fidelities)),
            "rel_l2": float(np.mean([f.rel_l2.mean() for f in fidelities])),
            "cosine": float(np.mean([f.cosine.mean() for f in fidelities]))}
