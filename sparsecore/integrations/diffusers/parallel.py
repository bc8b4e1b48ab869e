"""sparsecore attention inside diffusers 0.42's Ulysses context parallelism.

Under ``transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=N))`` every
rank holds ``S / N`` tokens of the sequence for all ``H`` heads. diffusers' attention backends
that support context parallelism (``_native_attention``, ``_flash_attention``, ...) do not
communicate themselves: they pass their single-device kernel as ``forward_op`` to
``attention_dispatch._templated_context_parallel_attention``, whose Ulysses template
(``TemplatedUlyssesAttention``) all-to-alls q, k, v so that the rank of index ``r`` in the
Ulysses group holds the whole sequence for heads ``[r H/N, (r+1) H/N)``, calls ``forward_op``
there, and all-to-alls the output back to ``S / N`` tokens. :func:`attention` plugs in at that
point, the same way: its ``forward_op`` runs sparsecore on the rank's heads (the mask planned
for those heads, :class:`~sparsecore.methods.HeadShard`), so the communication is diffusers'
own and works with whatever process group the mesh was built on (NCCL, HCCL, gloo).

Supported: Ulysses (``ulysses_degree = N > 1``, ``ring_degree = 1``, ``ulysses_anything=False``,
``H`` divisible by ``N``). Ring attention splits the keys across ranks (each rank would run a
slice of the mask per ring step and merge by LSE); it is rejected with a ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from diffusers.models.attention_dispatch import _templated_context_parallel_attention

from sparsecore.methods import HeadShard

LocalAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

__all__ = ["UlyssesGroup", "attention", "ulysses_group"]


@dataclass(frozen=True)
class UlyssesGroup:
    """The Ulysses group of this rank: its size, this rank's index in it, the process group, the config."""

    world: int
    rank: int
    group: Any
    config: Any

    def shard(self, num_heads: int, device: torch.device) -> HeadShard:
        """This rank's heads after the all-to-all, with an all-gather over the group for per-head values."""
        size = num_heads // self.world
        return HeadShard(self.rank * size, (self.rank + 1) * size, num_heads,
                         partial(_all_gather, world=self.world, group=self.group, device=device))


def ulysses_group(parallel_config: Any) -> UlyssesGroup | None:
    """The Ulysses group of a processor's ``_parallel_config``; None without context parallelism.

    Raises ``ValueError`` for configurations the sparse path does not run: ring attention
    (``ring_degree > 1``, alone or with Ulysses) and ``ulysses_anything``.
    """
    cp = getattr(parallel_config, "context_parallel_config", None)
    if cp is None or cp.ring_degree * cp.ulysses_degree == 1:
        return None
    remedy = ("use ContextParallelConfig(ulysses_degree=N) with ring_degree=1, or call handle.remove() to run the "
              "model densely")
    if cp.ring_degree > 1:
        raise ValueError(f"parallel_config.context_parallel_config.ring_degree: sparsecore's sparse attention runs "
                         f"under Ulysses only (ring_degree=1, ulysses_degree=N), got ring_degree={cp.ring_degree}, "
                         f"ulysses_degree={cp.ulysses_degree}; ring attention splits the keys across ranks, which "
                         f"the sparse path does not do; {remedy}")
    if cp.ulysses_anything:
        raise ValueError(f"parallel_config.context_parallel_config.ulysses_anything: expected False (every rank holds "
                         f"H / N heads of the whole sequence), got True; {remedy}")
    mesh = cp._ulysses_mesh
    return UlyssesGroup(cp.ulysses_degree, cp._ulysses_local_rank, mesh.get_group(), parallel_config)


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, ulysses: UlyssesGroup,
              local: LocalAttention) -> torch.Tensor:
    """``[B, S/N, H, D]`` in and out: diffusers' Ulysses all-to-alls around ``local`` (``[B, S, H/N, D]``)."""

    def forward_op(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Any, dropout_p: float,
                   is_causal: bool, scale: Any, enable_gqa: bool, return_lse: bool, _save_ctx: bool = True,
                   _parallel_config: Any = None) -> torch.Tensor:
        return local(q, k, v)

    return _templated_context_parallel_attention(query, key, value, None, 0.0, False, None, False, False,
                                                 forward_op=forward_op, backward_op=_no_backward,
                                                 _parallel_config=ulysses.config)


def _no_backward(ctx: Any, grad_out: torch.Tensor, *args: Any) -> Any:
    raise NotImplementedError("sparsecore's attention kernels are inference-only (no backward); run the forward under "
                              "torch.no_grad(), or call handle.remove() to train with diffusers' attention")


def _all_gather(values: torch.Tensor, *, world: int, group: Any, device: torch.device) -> torch.Tensor:
    """Per-head float64 values of every rank of ``group``, in rank (= head) order, on ``device``."""
    local = values.to(device=device, dtype=torch.float64).contiguous()
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local, group=group)
    return torch.cat(parts)
