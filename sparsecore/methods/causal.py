"""Frame-causal attention for the planners: what a block may see, and budgets relative to it.

A geometry with ``causal_frames`` (:class:`~sparsecore.geometry.VideoGeometry`) lets a token see only the
frames of its own and earlier causal blocks (SkyReels-V2's diffusion forcing with causal blocks: diffusers'
``SkyReelsV2Transformer3DModel`` with ``num_frame_per_block`` > 1 masks attention so). Its blocks never cross a
causal-block boundary, so block ``i`` may see block ``j`` exactly where ``groups[j] <= groups[i]``
(:meth:`VideoGeometry.causal_groups`), and a mask that lists nothing else is exact.

The planners keep their meaning under causality: a density or sparsity is a fraction of the key blocks a row
*may see* (``max(1, round(density * visible))`` of them), and blocks a row may not see are never scored as
candidates: their scores rank below every visible block's before the row-wise top-k. Such geometries have no
text (checked by the geometry), so every block is a video block.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sparsecore.geometry import VideoGeometry
from sparsecore.ir import BlockMask, csr
from sparsecore.ir.uploads import queued
from sparsecore.kernel import compile as compile_mask
from sparsecore.search import dense_lse


def visible_counts(geometry: VideoGeometry, offsets: np.ndarray) -> np.ndarray:
    """Key blocks each query block may see, int64 ``[blocks]`` (all of them without ``causal_frames``)."""
    groups = geometry.causal_groups(offsets)
    return np.searchsorted(groups, groups, side="right").astype(np.int64)


def visible_map(geometry: VideoGeometry, offsets: np.ndarray) -> np.ndarray:
    """bool ``[blocks, blocks]`` (host): query block i may see key block j."""
    groups = geometry.causal_groups(offsets)
    return groups[None, :] <= groups[:, None]


def future(geometry: VideoGeometry, offsets: np.ndarray, device: torch.device) -> torch.Tensor:
    """bool ``[blocks, blocks]`` on ``device``: key block j is in a later causal block than query block i (from the
    two group vectors: the map is built on the device, not uploaded)."""
    groups = queued(geometry.causal_groups(offsets), device)
    return groups[None, :] > groups[:, None]


def visible_lse(q: torch.Tensor, k: torch.Tensor, geometry: VideoGeometry, scale: float | None) -> torch.Tensor:
    """The natural-log float32 LSE ``[B, H, L]`` of attention over the keys each query may see: dense attention's
    (:func:`sparsecore.search.dense_lse`), or under causal frames the kernel of the geometry's dense mask on frame
    blocks (every visible block; the keys stand in for the values)."""
    if not geometry.causal_frames:
        return dense_lse(q, k, scale)
    from .selection import dense_mask
    mask = dense_mask(geometry, q.shape[1], {"method": "causal", "action": "visible-lse"})
    return compile_mask(mask, device=q.device.type)(q, k, k, scale=scale, return_lse=True)[1]


def restrict(mask: BlockMask, geometry: VideoGeometry) -> BlockMask:
    """``mask`` without the blocks a row may not see under ``geometry``'s causal frames (the mask itself where it
    lists none, or the geometry has none); for masks no method planned under the geometry (a caller's). Its blocks
    must not cross a causal-block boundary (``ValueError`` naming the block otherwise), and it must drop the blocks
    it does not list where the geometry hides any (an approximation would add them all, the hidden ones included).

    On the host by NumPy; on a device by torch, with one host read (whether anything goes)."""
    if not geometry.causal_frames:
        return mask
    if mask.q_len != geometry.tokens or mask.kv_len != geometry.tokens:
        raise ValueError(f"mask: expected q_len = kv_len = {geometry.tokens} (geometry {geometry}), got {mask!r}")
    q_groups, kv_groups = geometry.causal_groups(mask.q_offsets), geometry.causal_groups(mask.kv_offsets)
    if mask.unselected.kind != "drop" and geometry.frames > geometry.causal_frames:   # whatever it lists
        raise ValueError(f"mask: it approximates the blocks a row does not list ({mask.unselected}), the later causal "
                         f"blocks (of {geometry.causal_frames} frames) included; plan it with unselected 'drop'")
    heads, rows, on_host = mask.num_heads, mask.num_q_blocks, mask.on_host
    indices = mask.indices if on_host else mask.indices.long()
    if not on_host:
        q_groups, kv_groups = queued(q_groups, mask.device), queued(kv_groups, mask.device)
    flat_row = csr.row_of_entry(mask.indptr, indices.shape[0])            # h * rows + i of every entry
    seen = kv_groups[indices] <= q_groups[flat_row % rows]
    if bool(seen.all()):
        return mask
    if on_host:
        counts = np.bincount(flat_row[seen], minlength=heads * rows)
        indptr = csr.indptr_from_counts(counts.reshape(heads, rows)).astype(np.int32)
    else:
        counts = torch.bincount(flat_row[seen], minlength=heads * rows)
        indptr = csr.indptr_from_counts(counts.reshape(heads, rows)).to(torch.int32)
    return BlockMask.unchecked(heads, mask.q_offsets, mask.kv_offsets, indptr, mask.indices[seen], mask.budgets,
                               {**mask.meta, "causal_frames": geometry.causal_frames})


def check_masses(mass: torch.Tensor, geometry: VideoGeometry) -> None:
    """Refuse a caller's negative block masses under causal frames (one host read): :meth:`Visibility.hide` ranks a
    block a row may not see as -1, so a visible block's mass below that would rank it after the hidden ones."""
    if geometry.causal_frames and bool((mass < 0).any()):
        raise ValueError(f"mass: expected block masses >= 0 (softmax mass), got a negative one; under causal blocks of "
                         f"{geometry.causal_frames} frames a block a row may not see ranks as -1, below every mass; "
                         f"pass block_mass()'s masses, or q and k")


def keep_per_row(density: float, visible: np.ndarray) -> np.ndarray:
    """Blocks each row keeps at ``density`` of what it may see: ``round(density * visible)``, 1 to ``visible``."""
    return np.clip(np.round(density * visible), 1, visible).astype(np.int64)


def rank_visible_first(scores: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """``scores`` (float32 ``[H, R, C]``, in place) where every visible entry ranks above every hidden one in a
    top-k: hidden entries -inf, visible ones at least the lowest finite float (NaN stays NaN, which top-k ranks
    first). Selection noise goes in before, not after: noise that overflows to +-inf would make a hidden -inf NaN
    or a visible entry -inf."""
    return scores.clamp_(min=-torch.finfo(scores.dtype).max).masked_fill_(hidden, float("-inf"))


@dataclass(frozen=True)
class Visibility:
    """What the rows of a search may see (AdaSpa's masses); without causal frames everything, and each method is
    the identity of the plain search.

    ``hidden``: bool ``[R, C]`` on the device; ``visible``: int64 ``[R]`` there; ``hidden_pairs``: hidden
    (query block, key block) pairs of one head.
    """

    causal: bool
    hidden: torch.Tensor | None = None
    visible: torch.Tensor | None = None
    hidden_pairs: int = 0

    @classmethod
    def of(cls, geometry: VideoGeometry, offsets: np.ndarray, device: torch.device) -> "Visibility":
        if not geometry.causal_frames:
            return cls(False)
        counts = visible_counts(geometry, offsets)
        return cls(True, future(geometry, offsets, device), queued(counts, device),
                   len(counts) ** 2 - int(counts.sum()))

    def hide(self, mass: torch.Tensor) -> torch.Tensor:
        """Block masses ``[H, R, C]`` (>= 0) with the hidden ones -1, a copy: they rank below every visible block,
        and a sum over a head is short of the visible masses' by exactly ``hidden_pairs``."""
        return mass.masked_fill(self.hidden, -1.0) if self.causal else mass

    def prefix_sums(self, ranked: torch.Tensor, keep: int, density: float) -> torch.Tensor:
        """float64 ``[H]``: the sum of each row's first ``keep`` ranked values ``[H, R, K]`` (under causal frames:
        its first ``round(density * visible)``, all of them visible blocks)."""
        if not self.causal:
            return ranked[..., :keep].sum(dim=(1, 2), dtype=torch.float64)
        counts = _kept(torch.tensor(density, dtype=torch.float64, device=ranked.device), self.visible)
        slot = torch.arange(ranked.shape[-1], device=ranked.device)
        return torch.where(slot < counts[:, None], ranked, 0.0).sum(dim=(1, 2), dtype=torch.float64)

    def keep_counts(self, densities: torch.Tensor, video_blocks: int) -> torch.Tensor:
        """Blocks each head's rows keep at ``densities`` ``[H]``: int64 ``[H]`` of ``video_blocks`` (as
        :func:`.selection.keep_count`), or under causal frames ``[H, R]`` of what each row may see (as
        :func:`keep_per_row`)."""
        if not self.causal:
            return _kept(densities, torch.tensor(video_blocks, device=densities.device))
        return _kept(densities[:, None], self.visible)


def _kept(densities: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """``round(densities * visible)`` clamped to 1..visible, int64 (``torch.round`` rounds halves to even, as
    ``round`` and ``np.round``)."""
    visible = visible.double()
    return torch.minimum(torch.round(densities.double() * visible).clamp(min=1), visible).to(torch.int64)
