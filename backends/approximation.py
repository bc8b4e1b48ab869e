"""The approximation of the key blocks a row does not list (``mask.unselected``), in torch, on any device.

What is computed (:mod:`sparsecore.ir.unselected`; the executable definition is the reference
lowering): for a query row ``q`` with scale ``s`` and its listed blocks ``S`` (exact), every
unlisted key block ``j`` adds ``|B_j| exp(s q·k̄_j)`` to the softmax denominator and
``exp(s q·k̄_j) (ΣV_j + s qᵀ Ĥ_j)`` to the numerator, with ``Ĥ_j = 0`` (``"zeroth"``) or
``|B_j| H_g / T_g`` over the block's group ``g`` (one group of every block for
``"global-first-order"``, ``group_blocks`` consecutive blocks for ``"grouped-first-order"``),
``H_g = Σ_{t in g} (k_t - k̄_(block of t))ᵀ v_t``. Statistics are per key head (shared by the
query heads of a GQA group) and per batch element; the LSE includes the approximated mass.

Three steps, shared by the lowerings that compute it:

1. :func:`statistics` (once per call: they depend on k and v only): ``k̄_j``, ``v̄_j = ΣV_j / |B_j|`` and the
   per-token group matrices ``H_g / T_g`` as batched gathers and matmuls over fixed-width
   pieces of the key sequence (no atomics, no Python loop over blocks).
2. :func:`approximate_into`: the pass over block summaries. For a chunk of query rows,
   ``s q k̄ᵀ`` is one ``[rows x blocks]`` product; listed blocks are masked out, and the
   row's own maximum makes it stable. The values enter as ``|B_j| exp(.) v̄_j``: means summed from values
   divided by the block's size first stay finite where the values are, and a listed block's zero weight
   times a sum past float32's range (64 values of 1e37) was NaN in rows that approximate another block. A
   group whose blocks the row all lists adds nothing: its ``H_g``, NaN where a key is infinite, is selected out.
3. The merge with the exact part, in place, around ``b = max(lse_S, m)``, written so that neither a
   growing maximum nor an empty side can lose mass: ``w_S = exp(lse_S - b)``, ``w_U = exp(m - b)``,
   ``out = (w_S out_S + w_U N_U) / (w_S + w_U z)``, ``lse = b + log(w_S + w_U z)`` (:func:`sparsecore.partials.merge`;
   the Triton pass divides too). The division keeps ``log z`` out of ``m + log z``, which large scores round away:
   at float32 scores near 1e8 a row of approximated blocks came out scaled by up to a block's token count.

:class:`ApproximatingRun` composes an exact lowering's run (which must give its LSE) with
the three steps: the one place a lowering without a native approximation gets it
(``portable``, ``npu``). The Triton lowering fuses steps 2-3 into a kernel
(``sparsecore.backends.cuda.approximation_kernel``) and uses step 1 from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from sparsecore.ir import BlockMask, Unselected
from sparsecore.ir.memo import LruMemo
from sparsecore.ir.stream_readers import retire
from sparsecore.ir.uploads import queued
from sparsecore.partials import merge

PIECE_TOKENS = 2048          # widest piece of the key sequence one gather takes
CHUNK_ELEMENTS = 1 << 24     # default working set of the pass: query rows x (blocks + group terms) per chunk

ExactRun = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], "tuple[torch.Tensor, torch.Tensor]"]


def group_bounds(num_kv_blocks: int, unselected: Unselected) -> np.ndarray | None:
    """Block ids where each statistic group starts, plus the end (None for kinds without groups)."""
    if unselected.kind in ("drop", "zeroth"):
        return None
    step = num_kv_blocks if unselected.kind == "global-first-order" else min(unselected.group_blocks, num_kv_blocks)
    return np.append(np.arange(0, num_kv_blocks, step), num_kv_blocks)      # a group past the blocks: all of them


@dataclass(frozen=True)
class _Pieces:
    """Segments of the key sequence cut into pieces of at most ``W`` tokens, for gathers of equal width."""

    tokens: torch.Tensor     # int64 [P, W]: token of each slot (0 in padding)
    valid: torch.Tensor      # bool  [P, W]
    members: torch.Tensor    # int64 [S, M]: the pieces of each segment, padded with P (a zero piece)


def _width(sizes: np.ndarray) -> int:
    """The piece width with the least padded work for segments of ``sizes``: the gathered slots (pieces x width)
    plus the slots of the segment sums (segments x most pieces of one segment).

    Tried: the smallest size and the widest (both at most :data:`PIECE_TOKENS`) and the powers of two between; at the
    smallest size the gathered slots stay below twice the tokens, so a wide segment among small ones (a text block
    after frame blocks) is cut into pieces instead of every segment being padded to its width. Ties go to the widest.
    """
    high = int(min(PIECE_TOKENS, sizes.max()))
    low = min(int(sizes.min()), high)                       # at most the cap: a piece is at most PIECE_TOKENS
    powers = 2 ** np.arange(low.bit_length(), high.bit_length())
    widths = np.unique(np.concatenate([[low, high], powers[powers < high]]))[::-1]
    pieces = -(-sizes[None, :] // widths[:, None])              # [widths, S]
    work = pieces.sum(axis=1) * widths + len(sizes) * pieces.max(axis=1)
    return int(widths[np.argmin(work)])


def _pieces(offsets: np.ndarray, device: torch.device) -> _Pieces:
    sizes = np.diff(offsets)
    width = _width(sizes)
    count = -(-sizes // width)                              # pieces per segment
    segment = np.repeat(np.arange(len(sizes)), count)
    first = np.cumsum(count) - count
    start = offsets[:-1][segment] + (np.arange(len(segment)) - first[segment]) * width
    length = np.minimum(width, offsets[1:][segment] - start)
    slot = np.arange(width)
    valid = slot[None, :] < length[:, None]
    step = np.arange(int(count.max()))
    members = np.where(step[None, :] < count[:, None], first[:, None] + step[None, :], len(segment))
    put = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
    return _Pieces(put(np.where(valid, start[:, None] + slot[None, :], 0).astype(np.int64)), put(valid),
                   put(members.astype(np.int64)))


def _segment_sums(per_piece: torch.Tensor, pieces: _Pieces) -> torch.Tensor:
    """``[B, Hk, P, ...]`` piece sums -> ``[B, Hk, S, ...]`` segment sums (a gather, no atomics)."""
    padded = torch.cat([per_piece, torch.zeros_like(per_piece[:, :, :1])], dim=2)
    return padded[:, :, pieces.members].sum(dim=3)


def _gather(x: torch.Tensor, pieces: _Pieces) -> torch.Tensor:
    """Tokens of ``x [B, Hk, T, D]`` laid out as pieces ``[B, Hk, P, W, D]``, zero in the padding."""
    gathered = x[:, :, pieces.tokens]                   # padding slots read token 0: replaced, not multiplied by 0
    return torch.where(pieces.valid[..., None], gathered, gathered.new_zeros(()))     # (an inf there made NaN)


@dataclass(frozen=True)
class StatisticsPlan:
    """Index tensors for the statistics of one (key blocks, kind), on one device (built once per mask)."""

    blocks: _Pieces
    sizes: torch.Tensor                 # float64 [NB]
    block_of_token: torch.Tensor        # int64 [T]
    groups: _Pieces | None              # first-order kinds: the statistic groups as token segments
    group_of_block: torch.Tensor | None   # int64 [NB]
    group_tokens: torch.Tensor | None     # float64 [G]

    @classmethod
    def build(cls, kv_offsets: np.ndarray, unselected: Unselected, device: torch.device) -> "StatisticsPlan":
        """The plan, memoized per (boundaries, kind, device): a host-to-device copy from pageable memory waits
        for the device's queue, so a new mask of a known layout (PASA's every layer and step) uploads nothing."""
        key = (np.asarray(kv_offsets).tobytes(), str(unselected), str(device))
        return _PLANS.get(key, lambda: cls._build(kv_offsets, unselected, device))

    @classmethod
    def _build(cls, kv_offsets: np.ndarray, unselected: Unselected, device: torch.device) -> "StatisticsPlan":
        sizes = np.diff(kv_offsets)
        put = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
        bounds = group_bounds(len(sizes), unselected)
        groups = group_of = group_tokens = None
        if bounds is not None:
            groups = _pieces(kv_offsets[bounds], device)
            group_of = put(np.repeat(np.arange(len(bounds) - 1), np.diff(bounds)).astype(np.int64))
            group_tokens = put(np.diff(kv_offsets[bounds]).astype(np.float64))
        return cls(_pieces(kv_offsets, device), put(sizes.astype(np.float64)),
                   put(np.repeat(np.arange(len(sizes)), sizes).astype(np.int64)), groups, group_of, group_tokens)

    def tensors(self) -> list[torch.Tensor | None]:
        """Every tensor the plan holds (None where a kind has none)."""
        pieces = [p for p in (self.blocks, self.groups) if p is not None]
        return [t for p in pieces for t in (p.tokens, p.valid, p.members)] + [
            self.sizes, self.block_of_token, self.group_of_block, self.group_tokens]


PLAN_ENTRIES = 16
_PLANS = LruMemo(PLAN_ENTRIES, on_drop=lambda plan: retire(plan.tensors()))   # shared by threads and streams


def clear_plans() -> None:
    """Forget the memoized plans (``sparsecore.clear_cache``)."""
    _PLANS.clear()


def query_blocks(mask: BlockMask, device: torch.device) -> torch.Tensor:
    """Each query token's block, int64 ``[L]`` on ``device`` (built there from the uploaded block sizes)."""
    sizes = queued(mask.q_block_sizes.astype(np.int64), device)
    return torch.repeat_interleave(torch.arange(mask.num_q_blocks, device=device), sizes, output_size=mask.q_len)


@dataclass(frozen=True)
class BlockStatistics:
    """Block summaries of one call, per batch element and key head, in the compute dtype."""

    key_means: torch.Tensor             # [B, Hk, NB, D]: k̄_j
    value_means: torch.Tensor           # [B, Hk, NB, D]: v̄_j = ΣV_j / |B_j|
    sizes: torch.Tensor                 # [NB]: |B_j|
    group_matrices: torch.Tensor | None   # [B, Hk, G, D, D]: H_g / T_g (first-order kinds)
    group_of_block: torch.Tensor | None   # int64 [NB]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def statistics(k: torch.Tensor, v: torch.Tensor, plan: StatisticsPlan) -> BlockStatistics:
    """k̄_j, v̄_j and (first-order kinds) ``H_g / T_g`` of ``k, v [B, Hk, T, D]``, on their device.

    ``H_g`` is summed from centred keys, ``(k_t - k̄_j)ᵀ v_t``, one ``[D, W] x [W, D]`` product
    per piece of at most :data:`PIECE_TOKENS` tokens of a group: O(T D²) per key head.
    """
    dtype = compute_dtype(k.dtype)
    keys, values = k.to(dtype), v.to(dtype)
    sizes = plan.sizes.to(dtype)
    key_means = _segment_sums(_gather(keys, plan.blocks).sum(dim=3), plan.blocks) / sizes[:, None]
    shares = _gather(values, plan.blocks)                # a new tensor: scaled in place to v_t / |B_j| (the sums stay
    shares *= (1 / sizes)[plan.block_of_token][plan.blocks.tokens][..., None]     # finite; no second copy of v)
    value_means = _segment_sums(shares.sum(dim=3), plan.blocks)
    matrices = None
    if plan.groups is not None:
        centred = _gather(keys - key_means[:, :, plan.block_of_token], plan.groups)
        per_piece = centred.transpose(-1, -2) @ _gather(values, plan.groups)           # [B, Hk, P, D, D]
        matrices = _segment_sums(per_piece, plan.groups) / plan.group_tokens.to(dtype)[:, None, None]
    return BlockStatistics(key_means, value_means, sizes, matrices, plan.group_of_block)


@dataclass(frozen=True)
class RowPlan:
    """Which key blocks each query row lists: the block map ``[H, MB, NB]`` and each query token's block."""

    listed: torch.Tensor        # bool [H, MB, NB]
    q_block: torch.Tensor       # int64 [L]

    @classmethod
    def build(cls, mask: BlockMask, device: torch.device) -> "RowPlan":
        return cls(mask.to(device).to_dense(), query_blocks(mask, device))


def approximate_into(out: torch.Tensor, lse: torch.Tensor, q: torch.Tensor, stats: BlockStatistics,
                     rows: RowPlan, scale: float, chunk_elements: int = CHUNK_ELEMENTS) -> None:
    """Merge the approximation of every unlisted block into the exact ``out [B, H, L, D]`` and ``lse [B, H, L]``.

    ``out``/``lse`` hold the exact part over the listed blocks (0 / -inf on empty rows) and are
    overwritten with the result. Chunks of query rows bound the working set to about
    ``chunk_elements`` values.
    """
    batch, heads, q_len, dim = q.shape
    kv_heads, num_blocks = stats.key_means.shape[1], stats.key_means.shape[2]
    group = heads // kv_heads
    dtype = stats.key_means.dtype
    matrices = stats.group_matrices
    groups = 0 if matrices is None else matrices.shape[2]
    # a row's values held at once: scores and weights (and the listed flags) per block, and with groups the
    # projections, their weighted copy and the selected terms per group
    per_row = batch * heads * (3 * num_blocks + (3 * groups * dim if groups > 1 else dim))
    step = max(1, chunk_elements // per_row)
    key_means_t = stats.key_means.transpose(-1, -2)
    if groups > 1:
        membership = torch.nn.functional.one_hot(stats.group_of_block, groups).to(dtype)     # [NB, G]
    for start in range(0, q_len, step):
        span = slice(start, min(q_len, start + step))
        n = span.stop - span.start
        queries = q[:, :, span].to(dtype).reshape(batch, kv_heads, group * n, dim)
        scores = queries @ key_means_t * scale                                                  # [B, Hk, G n, NB]
        listed = rows.listed[:, rows.q_block[span]].reshape(kv_heads, group * n, num_blocks)
        scores.masked_fill_(listed, -torch.inf)
        top = scores.amax(dim=-1)
        shift = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        weights = torch.exp(scores - shift[..., None])                  # 0 on listed blocks
        mass = weights * stats.sizes
        numerator = mass @ stats.value_means                                                    # zeroth order
        if groups == 1:
            numerator += (scale * mass.sum(dim=-1, keepdim=True)) * (queries @ matrices[:, :, 0])
        elif groups > 1:
            per_group = mass @ membership                                                       # [B, Hk, G n, G]
            # a group of listed blocks only adds no term: selected out, as 0 x a NaN H_g (an infinite key) is NaN
            approximated = ((~listed).to(dtype) @ membership) > 0                              # [Hk, G n, G]
            projected = (queries[:, :, None] @ matrices).transpose(2, 3)                        # [B, Hk, G n, G, D]
            terms = torch.where(approximated[..., None], per_group[..., None] * projected, 0.0)
            numerator += scale * terms.sum(dim=-2)
        _merge(out, lse, span, top.reshape(batch, heads, n), mass.sum(dim=-1).reshape(batch, heads, n),
               numerator.reshape(batch, heads, n, dim))


def _merge(out: torch.Tensor, lse: torch.Tensor, span: slice, top: torch.Tensor, total: torch.Tensor,
           numerator: torch.Tensor) -> None:
    """Rows ``span``: exact ``(out_S, lse_S)`` plus the approximation ``(exp(top) numerator, exp(top) total)``,
    normalised by division (the module docstring's step 3, :func:`sparsecore.partials.merge`)."""
    merged, merged_lse = merge(out[:, :, span].to(top.dtype), lse[:, :, span].to(top.dtype), numerator, top, total)
    out[:, :, span] = merged.to(out.dtype)
    lse[:, :, span] = merged_lse.to(lse.dtype)


class ApproximatingRun:
    """A lowering's run for an approximating mask: ``exact(q, k, v, scale) -> (out, lse)`` over the listed
    blocks, then :func:`statistics` and :func:`approximate_into`; the output is returned in q's dtype.

    ``exact`` may return its output in q's dtype or wider and its LSE in float32 or wider (float64
    for float64 inputs keeps the float64 result exact to float64). Plans are built once per device, for ``device``
    at once where one is given (the lowering's), so that ``plan_bytes`` (what the row plans hold: the block map,
    ``H x MB x NB`` bytes, and each query token's block) counts them when the kernel cache asks.
    """

    def __init__(self, exact: ExactRun, mask: BlockMask, chunk_elements: int = CHUNK_ELEMENTS,
                 device: torch.device | None = None) -> None:
        self._exact, self._mask, self._chunk_elements = exact, mask, chunk_elements
        self._plans: dict[str, tuple[StatisticsPlan, RowPlan]] = {}
        if device is not None:
            self._plan(device)

    @property
    def plan_bytes(self) -> int:
        return sum(rows.listed.nbytes + rows.q_block.nbytes for _, rows in self._plans.values())

    def _plan(self, device: torch.device) -> tuple[StatisticsPlan, RowPlan]:
        if device.type == "cuda" and device.index is None:       # as q.device names it
            device = torch.device("cuda", torch.cuda.current_device())
        key = str(device)
        if key not in self._plans:
            self._plans[key] = (StatisticsPlan.build(self._mask.kv_offsets, self._mask.unselected, device),
                                RowPlan.build(self._mask, device))
        return self._plans[key]

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                 return_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        stats_plan, row_plan = self._plan(q.device)
        out, lse = self._exact(q, k, v, scale)
        approximate_into(out, lse, q, statistics(k, v, stats_plan), row_plan, scale, self._chunk_elements)
        return out.to(q.dtype), (lse.float() if return_lse else None)
