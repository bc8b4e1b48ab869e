"""Ring attention over a block-sparse mask: each rank's query shard against every key shard it needs.

Layout (after the Ulysses exchange, if any): the ``R`` ranks of the ring group hold video tokens
``[r V/R, (r+1) V/R)`` of ``h`` heads, and the text tokens (HunyuanVideo 1.5; after the video on
the sequence axis) are the same on every rank. The mask covers the whole sequence; a rank runs
the :func:`~sparsecore.ir.slicing.slices` of it for its rows:

- ring step ``i`` (``0 <= i < R``): its video rows against the video keys of rank ``s = (r - i) mod R``
  (step 0: its own keys, plus the text keys, which are local);
- its share of the text rows: the text rows against its own video keys (rank 0 also the text keys).
  The text partials are all-gathered over the ring and merged in rank order, so every rank gets
  the same text output bit for bit (the text stream stays identical on every rank).

Partial outputs merge through their LSEs (natural log, float32): ``lse = log(e^a + e^b)``, ``out =
(e^(a-lse) out_a + e^(b-lse) out_b)``, with rows that saw no key (output 0, LSE -inf) on either side
handled exactly (both empty: 0 and -inf). The merge runs in float32, the LSEs' type: float64 inputs come
back with float32's accuracy (about 1e-7 relative), where the whole mask's kernel is exact in float64.

Transfers are direct and skipped where the mask allows: at step ``i`` rank ``r`` sends its key/value
shard to rank ``(r + i) mod R`` only if that rank's rows list a block of it, and receives from
``(r - i) mod R`` only if its own rows do (``P2P`` ``isend``/``irecv`` on the ring group). Every
rank publishes which key shards its rows need (one all-gather of ``R`` flags per new mask), so
both ends of every transfer agree without assuming the masks are bit-identical across ranks. Step
``i + 1``'s transfer is posted before step ``i`` computes (communication overlaps computation),
holding at most two received shards at a time; an empty step launches no kernel. The sparser the
mask, the more steps are skipped altogether, and the less there is to hide a transfer behind: a
step whose slice is small computes for less time than its shard takes to arrive.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

import sparsecore
from sparsecore.ir import BlockMask
from sparsecore.ir.slicing import slices
from sparsecore.partials import merge

__all__ = ["RingGroup", "RingWork", "merge", "plan_work", "run"]


@dataclass(frozen=True)
class RingGroup:
    """The ring group of this rank: its size, this rank's index in it, the process group."""

    world: int
    rank: int
    group: Any

    def peer(self, index: int) -> int:
        """The global rank of ring index ``index`` (what point-to-point calls take)."""
        return dist.get_global_rank(self.group, index)


@dataclass
class RingWork:
    """What one rank runs for one mask: a kernel per ring step and for its text rows (None: empty, skipped).

    ``need[r][s]``: rank ``r``'s video rows list a key block of rank ``s``'s shard (every rank's view).
    """

    steps: list[Any]
    text: Any
    need: list[list[bool]]
    video: int                     # video tokens per rank (V / R)
    text_tokens: int               # text tokens (replicated), padding included


def plan_work(mask: BlockMask, ring: RingGroup, video: int, device: str, backend: str | None,
              like: torch.Tensor, options: dict[str, Any] | None = None, cache: bool = True) -> RingWork:
    """Cut ``mask`` (the whole sequence: ``R * video`` video tokens, then text) for this rank and compile the pieces
    (``cache``: through sparsecore's module cache of kernels, as :func:`sparsecore.compile`'s).

    Collective over the ring group (one all-gather of ``R`` flags): every rank must call it for the same masks.
    """
    world, rank = ring.world, ring.rank
    total_video = world * video
    text = mask.q_len - total_video
    shard = lambda s: (s * video, (s + 1) * video)                        # noqa: E731
    text_range = [(total_video, mask.q_len)] if text else []
    key_sets = [[shard((rank - i) % world)] + (text_range if i == 0 else []) for i in range(world)]
    pieces = slices(mask, [shard(rank)], key_sets)
    text_piece = slices(mask, text_range, [[shard(rank)] + (text_range if rank == 0 else [])])[0] if text else None
    options = options or {}
    steps = [None if p.nnz == 0 else sparsecore.compile(p, device=device, backend=backend, cache=cache, **options)
             for p in pieces]
    text_kernel = None if text_piece is None or text_piece.nnz == 0 else sparsecore.compile(
        text_piece, device=device, backend=backend, cache=cache, **options)
    mine = [False] * world
    for i, piece in enumerate(pieces):
        mine[(rank - i) % world] = piece.nnz > 0
    need = [mine]
    if world > 1:
        local = torch.tensor(mine, dtype=torch.int32, device=like.device)
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local, group=ring.group)
        need = [[bool(x) for x in row] for row in torch.stack(parts).tolist()]
    return RingWork(steps, text_kernel, need, video, text)


class _Partial:
    """A running merge of partial attentions (float32), empty until the first one."""

    def __init__(self) -> None:
        self.out: torch.Tensor | None = None
        self.lse: torch.Tensor | None = None

    def add(self, out: torch.Tensor, lse: torch.Tensor) -> None:
        out, lse = out.float(), lse.float()
        if self.out is None:
            self.out, self.lse = out, lse
        else:
            self.out, self.lse = merge(self.out, self.lse, out, lse)

    def result(self, like: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.out is None:                                   # no key anywhere: output 0, LSE -inf
            shape = like.shape[:2] + (rows,)
            return (like.new_zeros(shape + (like.shape[3],), dtype=torch.float32),
                    like.new_full(shape, float("-inf"), dtype=torch.float32))
        return self.out, self.lse


class _Exchange:
    """Direct key/value transfers of the ring steps, posted ahead and skipped where no row needs them."""

    def __init__(self, work: RingWork, ring: RingGroup, own: torch.Tensor | None) -> None:
        self.work, self.ring, self.own = work, ring, own
        self.posted: dict[int, tuple[torch.Tensor | None, list]] = {}

    def post(self, step: int) -> None:
        """Start step ``step``'s send (to ``r + step``) and receive (from ``r - step``), those that are needed."""
        ring, need = self.ring, self.work.need
        if not 0 < step < ring.world or step in self.posted:
            return
        target, source = (ring.rank + step) % ring.world, (ring.rank - step) % ring.world
        ops, buffer = [], None
        if need[target][ring.rank]:
            ops.append(dist.P2POp(dist.isend, self.own, ring.peer(target), ring.group, tag=step))
        if need[ring.rank][source]:
            buffer = torch.empty_like(self.own)
            ops.append(dist.P2POp(dist.irecv, buffer, ring.peer(source), ring.group, tag=step))
        self.posted[step] = (buffer, dist.batch_isend_irecv(ops) if ops else [])

    def take(self, step: int) -> torch.Tensor | None:
        """Wait for step ``step``'s transfers; the received shard (None if this rank needs none)."""
        buffer, works = self.posted.pop(step)
        for work in works:
            work.wait()
        return buffer


def run(work: RingWork, ring: RingGroup, query: torch.Tensor, key: torch.Tensor,
        value: torch.Tensor) -> torch.Tensor:
    """Attention ``[B, V/R + T, h, D]`` of this rank's tokens (video shard, then the text) in and out."""
    video, text = work.video, work.text_tokens
    qt, kt, vt = (t.transpose(1, 2) for t in (query, key, value))          # [B, h, L, D] views
    q_video, k_video, v_video = (t[:, :, :video].contiguous() for t in (qt, kt, vt))
    k_local, v_local = (kt.contiguous(), vt.contiguous()) if text else (k_video, v_video)
    sends = any(work.need[(ring.rank + i) % ring.world][ring.rank] for i in range(1, ring.world))
    receives = any(work.need[ring.rank][s] for s in range(ring.world) if s != ring.rank)
    own = torch.cat([k_video.reshape(-1), v_video.reshape(-1)]) if sends or receives else None
    exchange = _Exchange(work, ring, own)
    exchange.post(1)
    partial = _Partial()
    for step, kernel in enumerate(work.steps):
        exchange.post(step + 1)
        keys = (k_local, v_local)
        if step:
            buffer = exchange.take(step)
            if buffer is not None:
                keys = (buffer[:k_video.numel()].view_as(k_video), buffer[k_video.numel():].view_as(v_video))
        if kernel is not None:
            partial.add(*kernel(q_video, *keys, return_lse=True))
        keys = buffer = None            # this step's shard goes before the next is posted: two held at most
    out = partial.result(q_video, video)[0]
    if text:
        out = torch.cat([out, _text_rows(work, ring, qt[:, :, video:].contiguous(),
                                         (k_local, v_local) if ring.rank == 0 else (k_video, v_video))], dim=2)
    return out.to(query.dtype).transpose(1, 2)


def _text_rows(work: RingWork, ring: RingGroup, q_text: torch.Tensor, keys: tuple) -> torch.Tensor:
    """The text rows: this rank's partial, all-gathered over the ring and merged in rank order (same on every rank)."""
    partial = _Partial()
    if work.text is not None:
        partial.add(*work.text(q_text, *keys, return_lse=True))
    out, lse = partial.result(q_text, q_text.shape[2])
    if ring.world == 1:
        return out
    packed = torch.cat([out.reshape(-1), lse.reshape(-1)])
    parts = [torch.empty_like(packed) for _ in range(ring.world)]
    dist.all_gather(parts, packed, group=ring.group)
    merged = _Partial()
    for part in parts:
        merged.add(part[:out.numel()].view_as(out), part[out.numel():].view_as(lse))
    return merged.out
