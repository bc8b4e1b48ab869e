"""Planning and running attention on a sequence shard (ring and unified context parallelism; HunyuanVideo 1.5).

What each rank plans: the mask of its heads over the *whole* sequence, as one process plans it
(``Session.plan`` with the rank's :class:`~sparsecore.methods.HeadShard` under Ulysses, all heads
under ring only). Methods that need q and k (AdaSpa's searches, PASA's pooled scores) get the whole
sequence's q and k of the rank's heads, all-gathered over the ring group at the steps that plan
(AdaSpa's first search also gathers v: its dense output and LSE come from one dense pass over the
whole sequence, whose rows of this rank are the step's output). Every rank of a ring group plans
from the same tensors, so its mask is the one-process mask's slice of its heads; the planning work
of those steps is repeated on every rank of the ring (not split): simple and exact, at the cost of
no speed-up on planning steps (LVSA and reuse steps plan without q and k).

What each rank runs: :mod:`.ring` on the mask (a sparse step), or on the full mask of the valid
tokens (a dense step: there is no model attention to fall back to under ring, since diffusers'
ring template would need an LSE-returning backend and HunyuanVideo 1.5's processor has no
context-parallel mask). The cut of a mask for a rank (its slices, their kernels, and which
transfers are needed) hangs off the mask, like its compiled kernels: a mask reused across layers
(LVSA) or steps (AdaSpa) is cut once, and dropping it frees the pieces.
"""

from __future__ import annotations

from typing import Callable

import torch

from sparsecore.geometry import VideoGeometry
from sparsecore.ir import BlockMask
from sparsecore.methods import HeadShard

from . import ring as ring_attention
from .parallel import gather_sequence
from .planner import LayerPlan, PlanInputs, Planner
from .ring import RingGroup, RingWork

class ShardedAttention:
    """The ring path of one handle: plans through the handle's :class:`.planner.Planner`, runs :mod:`.ring`."""

    def __init__(self, planner: Planner) -> None:
        self.planner = planner

    def attend(self, layer: int, geometry: VideoGeometry, step: int, run: int, query: torch.Tensor,
               key: torch.Tensor, value: torch.Tensor, shard: HeadShard | None, dense: Callable | None, *,
               ring: RingGroup, video: int) -> torch.Tensor:
        """Attention ``[B, V/R + T, h, D]`` of this rank's tokens (``video`` = V/R video tokens, then all T text).

        Without a ring (HunyuanVideo 1.5 under Ulysses) each rank holds whole sequences: the planner's
        own path runs them (the dense path as the full mask, through the ring's one step).
        """
        planner = self.planner
        if ring.world == 1:
            def full() -> torch.Tensor:
                work = self._work(self.planner.full_mask(geometry, query.shape[2], query.shape[1]), ring, video, query)
                planner.stats.dense_kernel = "sparsecore full mask (ring)"
                return ring_attention.run(work, ring, query, key, value)
            return planner.attend(layer, geometry, step, run, query, key, value, shard, full)
        seq_len = ring.world * video + query.shape[1] - video

        def sequence(with_values: bool) -> tuple[torch.Tensor, ...]:
            whole = (query, key, value) if with_values else (query, key)
            return tuple(gather_sequence(t, ring, video).transpose(1, 2)[:, :, :geometry.tokens] for t in whole)

        def runner(mask: BlockMask) -> RingWork:
            if mask.unselected.kind != "drop":
                raise ValueError(f"unselected: under ring attention (ring degree {ring.world}) expected masks that "
                                 f"drop the blocks a row does not keep, got {str(mask.unselected)!r} at layer {layer}: "
                                 f"its approximation uses statistics of whole key blocks and groups of blocks, which "
                                 f"the ring's key shards cut; pass approximation='drop', or run under Ulysses only "
                                 f"(ring_degree=1: each rank holds whole sequences)")
            return self._work(mask, ring, video, query)

        io = PlanInputs(sequence, rows=lambda out: _rows(out, ring, video), runner=runner,
                        prepare=lambda work: None)                   # cutting a mask is all a ring step prepares
        plan, fresh = planner.plan_for(layer, geometry, step, run, seq_len, query.shape[2], shard, query, io)
        if plan.dense_out is not None:
            out, plan.dense_out = plan.dense_out, None
            return out
        work, held_kept = self._held_work(plan, runner, query.device, seq_len, ring, video) if plan.held else \
            (plan.kernel, None)
        sparse = work
        if work is None:                                                  # dense: the full mask, through the ring
            work = self._work(self.planner.full_mask(geometry, query.shape[2], seq_len), ring, video, query)
            plan.record.dense_kernels.add("sparsecore full mask (ring)")
        out = planner.stats.time(plan.record, query, lambda: ring_attention.run(work, ring, query, key, value))
        if fresh and sparse is not None:
            ran = [k for k in [*work.steps, work.text] if k is not None]
            if ran:
                plan.record.ran(plan.mask, ran[0], planner.stats.counts, kept=held_kept)
        return out

    def _held_work(self, plan: LayerPlan, runner: Callable[[BlockMask], RingWork], device: torch.device,
                   seq_len: int, ring: RingGroup, video: int) -> tuple[RingWork, int]:
        """The cut of a mask its session keeps in host memory, made from a device copy once per mask and layout and
        kept with it: a cut reads the ring's need flags on the host, which every call would repeat (a rank's cut
        holds its 1/R of the lists on the device, as for masks kept there); with it the copy's kept pairs, counted
        on the device and read once (on the host lists a count walks every entry: 85 ms at CogVideoX 1.5 2x)."""
        key = ("ring cut", seq_len, str(device), *self._cut_key(ring, video))
        found = plan.mask.derived.get(key)
        if found is None:
            copy = self.planner.padded_mask(plan.mask.copy_to(device), seq_len)
            found = plan.mask.derived[key] = (runner(copy), int(copy.kept_pairs().sum()))
        return found

    def _work(self, mask: BlockMask, ring: RingGroup, video: int, like: torch.Tensor) -> RingWork:
        """The cut of ``mask`` for this rank, made once per mask (collective: every rank asks for the same masks)."""
        planner = self.planner
        key = ("ring", *self._cut_key(ring, video))
        found = mask.derived.get(key)
        if found is None:
            found = mask.derived[key] = ring_attention.plan_work(mask, ring, video, planner.device, planner.backend,
                                                                 like, planner.backend_options, planner.cache_kernels)
        return found

    def _cut_key(self, ring: RingGroup, video: int) -> tuple:
        """What a rank's cut of a mask depends on besides the mask: its place in the ring, the kernel it runs."""
        planner = self.planner
        return (ring.world, ring.rank, video, planner.device, planner.backend,
                tuple(sorted(planner.backend_options.items())))


def _rows(full: torch.Tensor, ring: RingGroup, video: int) -> torch.Tensor:
    """This rank's rows ``[B, V/R + T, h, D]`` of a whole-sequence tensor ``[B, V + T, h, D]``."""
    start, total_video = ring.rank * video, ring.world * video
    return torch.cat([full[:, start:start + video], full[:, total_video:]], dim=1)
