"""Run function of the ``fa4`` lowering: the mask converted once per device, then FA4 called per key range.

Per call (:class:`Fa4Launch`): keys and values gathered in the layout's key order where it has one
(:mod:`.fa4_key_order`), values copied with non-finite elements zeroed where there are mask tiles
(:mod:`.fa4_nonfinite`), one FA4 launch per key-tile range (:mod:`.fa4_key_ranges`) merged by LSE
(:mod:`.lse_merge`), rows attending a non-finite value set to NaN, rows whose IR list is empty set to
0 / -inf. For masks that approximate the key blocks a row does not list (PASA), FA4 computes the listed
blocks exactly and Triton's approximation pass (:mod:`.approximation_launch`) merges the rest into its
output and LSE in place, as the Triton lowering does after its own exact kernel.

Plans: the layout and each range's lists are built on the first call on a device (one host read per layout
built, which also sizes the ranges' lists; two layouts where a key order is tried, plus its read of per-block
row counts; none where the mask, or the mask it was copied from, was converted before: a held mask brought back
for each call) and reused for every batch size (FA4 broadcasts the batch dimension). With several ranges the
plan keeps their lists only (the layout's own list fields are None there); a range no list reaches is not
launched.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sparsecore.ir import BlockMask
from sparsecore.ir.uploads import HostPack, queued

from .fa4_dense import require_written
from .fa4_key_ranges import RangeLists, split_lists
from .fa4_layout import Fa4Layout, to_fa4
from .fa4_mask_mods import lookup_mask_mod
from .positive_scale import positive_scale

MAX_KEY_PARTS = 16


def auto_key_parts(kv_bytes_per_head: int, l2_bytes: int, num_kv_tiles: int) -> int:
    """Key ranges for ``key_parts=None``: 1 when one KV head's keys plus values (``kv_bytes_per_head``) fit the L2
    (``l2_bytes``), else ``ceil(kv_bytes_per_head / (l2_bytes / 2))`` (each range's K+V about half the L2 at most),
    capped at ``MAX_KEY_PARTS`` and at ``num_kv_tiles`` (ranges are cut at key-tile boundaries).

    Fit to the H200 measurement in :class:`.fa4_backend.Fa4Options` (50 MiB L2, head dim 128, bf16): 98,304 tokens
    (50,331,648 bytes) give 1, the unsplit kernel at 532 eff TFLOP/s; 188,736 tokens (96.6 MB) give 4, the
    fastest of the 1, 2, 4 and 8 measured.
    """
    if kv_bytes_per_head <= l2_bytes:
        return 1
    return min(-(-2 * kv_bytes_per_head // l2_bytes), MAX_KEY_PARTS, num_kv_tiles)


@functools.lru_cache(maxsize=None)
def l2_bytes(device: torch.device) -> int:
    """The L2 cache size of CUDA ``device`` (a tensor's device, with its index): queried once per device."""
    return torch.cuda.get_device_properties(device).L2_cache_size


def nan_score_lse(out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """``lse`` with NaN where FA4 wrote -inf for a row whose output is NaN. Its softmax finalize gives LSE -inf to a
    row whose sum is 0 *or NaN* (a NaN score: a NaN query, or a NaN key the row attends) and leaves the NaN in the
    output; dense attention's LSE is NaN there, and a -inf would tell a merge by LSE (key ranges, the approximation
    pass) that the row has no keys, dropping its NaN. ``out [B, q_len, H, D]`` as FA4 returns it, ``lse [B, H, q_len]``.
    """
    # amax carries a row's NaN without a bool the size of ``out`` (an -inf LSE row holds 0 or NaN, never an inf)
    return lse.masked_fill(out.amax(dim=-1).isnan().transpose(1, 2) & (lse == -math.inf), math.nan)


@dataclass(frozen=True)
class _Range:
    first: int                        # key tiles [first, stop)
    stop: int
    sparse: Any                       # BlockSparseTensorsTorch of the range's lists
    aux: list[torch.Tensor] | None    # the lookup mask_mod's tables, the key table from the range's first key


@dataclass(frozen=True)
class _Prepared:
    layout: Fa4Layout
    ranges: tuple[_Range, ...]
    mask_mod: Any
    kv_offsets: torch.Tensor | None   # int64 key block offsets, for the non-finite guard (plans with mask tiles)
    lists: tuple[RangeLists, ...]     # each range's lists (those of the layout itself for one range)


def _assembled(layout: Fa4Layout, lists: list[RangeLists], kv_offsets: torch.Tensor | None) -> _Prepared:
    """What FA4's calls take for ``layout`` cut into ``lists``: per range its lists as ``BlockSparseTensorsTorch``
    and the lookup mask_mod's tables, the key table read from the range's first key (a view)."""
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch
    tile_n = layout.tile_n
    ranges = []
    for part in lists:
        if part.empty:                   # no list reaches these key tiles: no launch
            continue
        sparse = BlockSparseTensorsTorch(mask_block_cnt=part.mask_block_cnt, mask_block_idx=part.mask_block_idx,
                                         full_block_cnt=part.full_block_cnt, full_block_idx=part.full_block_idx,
                                         block_size=(layout.tile_m, tile_n))
        aux = None
        if layout.needs_mask_mod:
            aux = [layout.q_block_of_token, layout.kv_block_of_token[part.first * tile_n:],
                   layout.keep_bits.view(torch.uint32)]
            for tensor in aux:
                tensor.__leading_dim__ = tensor.ndim - 1
        ranges.append(_Range(part.first, part.stop, sparse, aux))
    mask_mod = lookup_mask_mod() if layout.needs_mask_mod else None
    return _Prepared(layout, tuple(ranges), mask_mod, kv_offsets, tuple(lists))


class _HostPlan:
    """A :class:`_Prepared` whose tensors wait in pinned host memory (:class:`sparsecore.ir.uploads.HostPack`);
    :meth:`on` assembles it anew on the device for one call."""

    LISTS = ("mask_block_cnt", "mask_block_idx", "full_block_cnt", "full_block_idx")

    def __init__(self, prepared: _Prepared) -> None:
        layout = prepared.layout
        self.layout_fields = [f.name for f in dataclasses.fields(layout) if isinstance(getattr(layout, f.name),
                                                                                        torch.Tensor)]
        tensors = {f"layout.{name}": getattr(layout, name) for name in self.layout_fields}
        self.own_lists = prepared.lists[0].full_block_idx is not layout.full_block_idx   # one range: the layout's
        if self.own_lists:
            tensors.update({f"{p}.{name}": getattr(part, name) for p, part in enumerate(prepared.lists)
                            for name in self.LISTS})
        if prepared.kv_offsets is not None:
            tensors["kv_offsets"] = prepared.kv_offsets
        self.pack = HostPack({name: t.contiguous() for name, t in tensors.items()})
        self.layout = dataclasses.replace(layout, **{name: None for name in self.layout_fields})
        self.device = prepared.lists[0].full_block_cnt.device
        self.edges = [(part.first, part.stop, part.empty) for part in prepared.lists]

    def on(self, device: torch.device) -> _Prepared:
        """The plan on ``device`` for one call (its own tensors)."""
        tensors = self.pack.to(device)
        layout = dataclasses.replace(self.layout, **{name: tensors[f"layout.{name}"] for name in self.layout_fields})
        if self.own_lists:
            lists = [RangeLists(first, stop, *(tensors[f"{p}.{name}"] for name in self.LISTS), empty=empty)
                     for p, (first, stop, empty) in enumerate(self.edges)]
        else:
            lists = [RangeLists(0, layout.num_kv_tiles, *(getattr(layout, name) for name in self.LISTS))]
        return _assembled(layout, lists, tensors.get("kv_offsets"))


class Fa4Launch:
    """Run function of one mask: ``(q, k, v, scale, return_lse) -> (out, lse)``.

    ``key_parts``: key-tile ranges a call runs as (None: :meth:`key_parts_for` decides per call);
    ``reorder_keys`` as :class:`.fa4_backend.Fa4Options`; ``two_per_sm``: the one-warpgroup SM90 kernel at two
    CTAs per SM (:mod:`.fa4_occupancy`)."""

    def __init__(self, mask: BlockMask, tile_m: int, tile_n: int, two_per_sm: bool = False,
                 key_parts: int | None = None, reorder_keys: bool = True) -> None:
        self.mask = mask
        self.reorder_keys = reorder_keys
        self.tile_m, self.tile_n = tile_m, tile_n
        self.two_per_sm = two_per_sm
        self.num_kv_tiles = -(-mask.kv_len // tile_n)
        self.key_parts = key_parts if key_parts is None else min(key_parts, self.num_kv_tiles)
        self.approximation = None    # masks that approximate unlisted blocks: Triton's pass merges it in place
        if mask.unselected.kind != "drop":
            from .approximation_launch import ApproximationLaunch
            self.approximation = ApproximationLaunch(mask)
        self.plans_on_host = False        # keep_plans_on_host()
        self._prepared: dict[tuple[torch.device, int], _Prepared | _HostPlan] = {}

    def key_parts_for(self, k: torch.Tensor, v: torch.Tensor) -> int:
        """Key ranges a call with ``k, v`` runs as: ``key_parts`` when set, else :func:`auto_key_parts` on the
        two-CTA kernel (from the mask's key length, so a shorter ``k`` given to :meth:`prepare` decides alike)
        and 1 elsewhere."""
        if self.key_parts is not None:
            return self.key_parts
        if not self.two_per_sm:
            return 1
        kv_bytes = self.mask.kv_len * (k.shape[-1] * k.element_size() + v.shape[-1] * v.element_size())
        return auto_key_parts(kv_bytes, l2_bytes(k.device), self.num_kv_tiles)

    def prepare(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> None:
        """Convert the mask for a call with ``q, k, v`` (what the first call would do before launching; the scale
        changes nothing of it)."""
        self._plan(q.device, self.key_parts_for(k, v))
        if self.approximation is not None:
            self.approximation.plan(q.device)

    def keep_plans_on_host(self) -> None:
        """From now on, keep the converted tensors in pinned host memory between calls and copy them to the GPU at
        each call (one copy that does not wait): no device memory between calls, for a mask that many layers call
        in turn (LVSA's per-step mask: 4.6 MiB at Wan 2.1 6x). A mask that approximates unlisted blocks still gets
        a device copy of its lists, kept with the mask, for Triton's pass (:meth:`.ApproximationLaunch.__call__`)."""
        self.plans_on_host = True
        for key, prepared in self._prepared.items():
            if not isinstance(prepared, _HostPlan):
                self._prepared[key] = _HostPlan(prepared)

    def converted(self, device: torch.device | str, key_parts: int = 1) -> _Prepared:
        """The layout on ``device`` and its lists cut into ``key_parts`` key ranges (built on first use, cached;
        with :meth:`keep_plans_on_host`, copied from host memory at each use)."""
        found = self._plan(device, key_parts)
        return found.on(found.device) if isinstance(found, _HostPlan) else found

    def _plan(self, device: torch.device | str, key_parts: int) -> _Prepared | _HostPlan:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        key = (device, key_parts)
        if key not in self._prepared:
            layout = to_fa4(self.mask, self.tile_m, self.tile_n, device, self.reorder_keys, key_parts)
            kv_offsets = None
            if layout.needs_mask_mod:
                kv_offsets = queued(np.asarray(self.mask.kv_offsets, dtype=np.int64), device)
            lists = split_lists(layout, list(layout.key_edges))           # the edges to_fa4 sized the lists for
            if len(lists) > 1:                        # the ranges' lists replace the whole mask's
                layout = dataclasses.replace(layout, **{name: None for name in _HostPlan.LISTS})
            prepared = _assembled(layout, lists, kv_offsets)
            self._prepared[key] = _HostPlan(prepared) if self.plans_on_host else prepared
        return self._prepared[key]

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                 return_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        want_lse = return_lse or self.approximation is not None
        # Nothing listed anywhere: no kernel (and no compile) needed. Otherwise some key range runs: a listed
        # block covers at least one key tile.
        if len(self.mask.indices) == 0:        # as _exact gives them: contiguous, v's head dim, float32 LSE
            out = torch.zeros(*q.shape[:3], v.shape[-1], dtype=q.dtype, device=q.device)
            lse = torch.full(q.shape[:3], -math.inf, dtype=torch.float32, device=q.device) if want_lse else None
        else:
            out, lse = self._exact(q, k, v, scale, want_lse)
        if self.approximation is not None:
            self.approximation(q, k, v, out, lse, scale)
        return out, (lse if return_lse else None)

    def _exact(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
               return_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention over the listed blocks: out ``[B, H, q_len, D]`` (contiguous: FA4 writes it head-major), on the
        current CUDA device (``CompiledKernel`` makes it q's: :mod:`sparsecore.launch_device`)."""
        prepared = self.converted(q.device, self.key_parts_for(k, v))
        q, scale = positive_scale(q, scale)
        order = prepared.layout.kv_order                 # keys gathered in this order (None: as they are)
        found = None
        if order is not None:
            k = k.index_select(2, order)
        if prepared.kv_offsets is not None:    # mask tiles multiply masked-out values by 0: keep them finite
            from .fa4_nonfinite import guard_values
            v, found = guard_values(v, order)
        elif order is not None:
            v = v.index_select(2, order)
        merged = len(prepared.ranges) > 1
        out = lse = None
        for part in prepared.ranges:
            keys = slice(part.first * self.tile_n, part.stop * self.tile_n)
            part_out, part_lse = self._forward(q, k[:, :, keys], v[:, :, keys], part, prepared.mask_mod, scale,
                                               return_lse or merged)
            if part_lse is not None:
                part_lse = nan_score_lse(part_out, part_lse)
            if out is None:
                out, lse = part_out, part_lse
            else:
                from .lse_merge import merge_into
                merge_into(out.transpose(1, 2), lse, part_out.transpose(1, 2), part_lse)
            del part_out, part_lse                  # one partial output alive at a time
        if found is not None:
            from .fa4_nonfinite import poison
            del v                                                      # the zeroed (and gathered) copy
            out = poison(out, found, prepared.layout, prepared.kv_offsets)
        empty = prepared.layout.empty_tokens                                    # [q_len, H] or None
        if empty is not None:
            out.masked_fill_(empty[None, :, :, None], 0.0)
            if return_lse:
                lse = lse.masked_fill(empty.t()[None], -math.inf)
        return out.transpose(1, 2), (lse if return_lse else None)

    def _forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, part: _Range, mask_mod: Any,
                 scale: float, return_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One FA4 launch over ``part``'s key tiles (``k, v``: their slice): out ``[B, q_len, H, D]`` as a view of
        head-major ``[B, H, q_len, D]`` memory, which the diffusers op returns as it is (FA4's own ``[B, q_len, H,
        D]`` output cost that op a copy the size of ``q``, one more such tensor at the compiled peak), and lse."""
        arguments = dict(softmax_scale=scale, causal=False, pack_gqa=False, mask_mod=mask_mod, aux_tensors=part.aux,
                         block_sparse_tensors=part.sparse, return_lse=return_lse)
        if self.two_per_sm:
            from .fa4_occupancy import forward
        else:
            from .fa4_dense import private_forward as forward
        batch, heads, q_len, _ = q.shape
        out = torch.empty(batch, heads, q_len, v.shape[-1], dtype=q.dtype, device=q.device).transpose(1, 2)
        written, lse = forward(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), out=out, **arguments)
        require_written(written, out, "pass backend='triton' to sparsecore.compile, or apply(..., backend='triton')")
        return out, lse
