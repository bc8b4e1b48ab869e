"""Portable torch lowering: gather each query block's key blocks, attend, scatter back.

Works on any torch device with plain tensor ops, so it is the fallback for devices
without a native lowering and the fast path on CPU.

Schedule (once per mask, with torch ops on the device of the mask's lists): the (head,
query block) rows are sorted by how many key tokens they keep and cut into chunks
whose padded work fits a memory budget (a row whose scores alone exceed it is cut into
pieces of query tokens); the cut reads the row lengths on the host once. Each chunk
stores its rows' head, query tokens and key tokens (the kept blocks' tokens one after
another, padded to the chunk's longest row). Run (per batch element and chunk): gather
the chunk's queries ``[R, QB, D]`` and key/value tokens ``[R, L, D]`` (padding masked to
-inf, and pointing at a token the row attends to), compute exact softmax attention in
float32 (float64 for float64 inputs; torch's fused SDPA when no LSE is asked for), and
write the valid rows back. Empty rows give output 0 and LSE -inf.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sparsecore.capabilities import Capabilities
from sparsecore.ir import BlockMask
from sparsecore.ir.csr import kept_key_tokens
from sparsecore.ir.unselected import KINDS
from sparsecore.registry import Backend, Run

from ..approximation import with_approximation

PORTABLE_DEVICES = ("cpu", "cuda", "mps", "xpu")


@dataclass(frozen=True)
class PortableOptions:
    """``chunk_elements``: padded score elements per chunk (bounds temporary memory, ~4 bytes each; the chunk's
    gathered keys and values take about ``2 D / QB`` times as many again, D the head dim, QB the query block)."""

    chunk_elements: int = 1 << 24

    def __post_init__(self) -> None:
        if isinstance(self.chunk_elements, bool) or not isinstance(self.chunk_elements, int) \
                or self.chunk_elements < 1:
            raise ValueError(f"chunk_elements: expected a positive int, got {self.chunk_elements!r}")


class PortableBackend(Backend):
    name = "portable"
    capabilities = Capabilities(devices=PORTABLE_DEVICES, array_type="torch",
                                dtypes=frozenset({"float32", "float16", "bfloat16", "float64"}),
                                unselected=frozenset(KINDS))
    install_hint = "needs only torch"
    options_type = PortableOptions
    differentiable = True       # drop masks: torch ops, autograd's gradients (tests/test_compile_api.py checks them)
    plan_bytes_per_key_token = 9   # its chunks' gathered key positions (int64) and their validity (bool)

    def unavailable_reason(self, device: str) -> str | None:
        kind = device.split(":")[0]
        if kind == "cpu":
            return None
        module = getattr(torch, kind, None)
        if module is None or not module.is_available():
            return f"torch.{kind}.is_available() is False in torch {torch.__version__}"
        return None

    def preference(self, mask: BlockMask) -> int:
        return -10  # a native lowering, where one exists, is always preferred

    def lower(self, mask: BlockMask, device: str, options: PortableOptions) -> Run:
        where = torch.device(device) if mask.on_host else mask.indptr.device      # a device mask came to q's device
        chunks = schedule_chunks(mask, options.chunk_elements, where)
        if mask.unselected.kind != "drop":   # exact part with its LSE in the compute dtype, then the approximation
            exact = lambda q, k, v, scale: run_chunks(mask, chunks, q, k, v, scale, True, partial=True)  # noqa: E731
            return with_approximation(exact, mask, options.chunk_elements)
        return lambda q, k, v, scale, return_lse: run_chunks(mask, chunks, q, k, v, scale, return_lse)


@dataclass(frozen=True)
class Chunk:
    """Rows processed together; ``R`` rows padded to ``QB`` query tokens and ``L`` key tokens.

    ``L`` is the most key tokens a row of the chunk keeps: a row's key tokens are its kept
    blocks' tokens one after another, so padding never grows with the size of the largest
    block (a frame-sized or text block beside small ones) times the number of blocks.
    """

    heads: torch.Tensor        # int64 [R]
    q_tokens: torch.Tensor     # int64 [R, QB]: query positions (padding repeats a valid one)
    q_rows: torch.Tensor       # int64 [N]: the valid query rows' flat positions in [H * q_len]
    q_slots: torch.Tensor      # int64 [N]: where each of them sits in the flat [R * QB] result
    kv_tokens: torch.Tensor    # int64 [R, L]: key positions (padding repeats the row's first kept token)
    kv_valid: torch.Tensor     # bool  [R, L]
    padded: bool               # whether any kv_valid entry is False


def schedule_chunks(mask: BlockMask, chunk_elements: int, device: torch.device) -> list[Chunk]:
    """Group the mask's rows into padded chunks; sizes from one host read of the row lengths.

    A row whose own scores exceed ``chunk_elements`` (a large query block keeping many keys) is cut
    into pieces of query tokens that share its gathered key positions.
    """
    mask = mask.to(device)
    lengths = mask.row_lengths.reshape(-1)                   # key blocks per row, [H * MB]
    kept = kept_key_tokens(mask.indptr, mask.indices, mask.kv_offsets).reshape(-1)   # key tokens per row
    host_lengths, host_kept = torch.stack([lengths, kept.to(lengths.dtype)]).cpu().numpy()  # the one host read
    order = np.argsort(-host_kept, kind="stable")
    order = order[host_lengths[order] > 0]                   # empty rows stay 0 / -inf
    max_q = int(mask.q_block_sizes.max())
    starts = mask.indptr[:, :-1].reshape(-1).long()
    chunks = []
    position = 0
    while position < len(order):
        end = _chunk_end(order, position, host_kept, max_q, chunk_elements)
        rows = order[position:end]
        keys = _key_tokens(mask, rows, host_lengths, host_kept, starts, device)
        padded = bool((host_kept[rows] != host_kept[rows].max()).any())     # a row keeps fewer key tokens than L
        size, row_kept = int(mask.q_block_sizes[rows[0] % mask.num_q_blocks]), int(host_kept[rows[0]])
        if len(rows) == 1 and size * row_kept > chunk_elements:
            piece = max(1, chunk_elements // row_kept)
            chunks.extend(_chunk(mask, rows, keys, padded, device, (first, min(size, first + piece)))
                          for first in range(0, size, piece))
        else:
            chunks.append(_chunk(mask, rows, keys, padded, device))
        position = end
    return chunks


def _chunk_end(order: np.ndarray, position: int, kept: np.ndarray, max_q: int, chunk_elements: int) -> int:
    """End of the chunk starting at ``position``: rows are sorted by kept key tokens; the first bounds the padding."""
    per_row = max_q * int(kept[order[position]])
    return min(len(order), position + max(1, chunk_elements // per_row))


def _chunk(mask: BlockMask, rows: np.ndarray, keys: tuple[torch.Tensor, torch.Tensor], padded: bool,
           device: torch.device, piece: tuple[int, int] | None = None) -> Chunk:
    """The chunk of ``rows`` (all their query tokens, or the ``piece`` of query tokens of a single row)."""
    heads, blocks = rows // mask.num_q_blocks, rows % mask.num_q_blocks
    first, q_sizes = mask.q_offsets[blocks], mask.q_block_sizes[blocks]
    if piece is not None:
        first, q_sizes = first + piece[0], np.full_like(q_sizes, piece[1] - piece[0])
    offsets = np.arange(int(q_sizes.max()))[None, :]
    q_valid = offsets < q_sizes[:, None]
    q_tokens = first[:, None] + np.where(q_valid, offsets, 0)
    q_slots = np.flatnonzero(q_valid)           # integer positions: a call writes back without a boolean mask's sync
    q_rows = (heads[:, None] * mask.q_len + q_tokens).reshape(-1)[q_slots]
    put = lambda a: torch.from_numpy(np.array(a, dtype=np.int64)).to(device)  # noqa: E731
    kv_tokens, kv_valid = keys
    return Chunk(put(heads), put(q_tokens), put(q_rows), put(q_slots), kv_tokens, kv_valid, padded)


def _key_tokens(mask: BlockMask, rows: np.ndarray, lengths: np.ndarray, kept: np.ndarray, starts: torch.Tensor,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Key positions ``[R, L]`` of ``rows`` (their kept blocks' tokens one after another) and which are real."""
    put = lambda a: torch.from_numpy(np.array(a)).to(device)  # noqa: E731
    nb = int(lengths[rows].max())
    slot = torch.arange(nb, device=device)[None, :]
    block_valid = slot < put(lengths[rows].astype(np.int64))[:, None]
    entry = torch.where(block_valid, starts[put(rows.astype(np.int64))][:, None] + slot, 0)
    block_ids = mask.indices[entry].long()                                       # [R, nb]
    kv_offsets = put(mask.kv_offsets)
    sizes = torch.where(block_valid, kv_offsets[block_ids + 1] - kv_offsets[block_ids], 0)
    ends = torch.cumsum(sizes, dim=1)                                            # [R, nb]: end of each kept block
    position = torch.arange(int(kept[rows].max()), device=device)[None, :].expand(len(rows), -1).contiguous()
    which = torch.searchsorted(ends, position, right=True).clamp(max=nb - 1)     # the kept block holding a position
    kv_valid = position < ends[:, -1:]
    within = position - (ends.gather(1, which) - sizes.gather(1, which))
    # Padding points at the row's first kept token, never at a token the row does not attend to:
    # a non-finite value there must not reach the row even through a zero weight.
    kv_tokens = torch.where(kv_valid, kv_offsets[block_ids.gather(1, which)] + within, kv_offsets[block_ids[:, :1]])
    return kv_tokens, kv_valid


def _attend(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, kv_valid: torch.Tensor, padded: bool,
            scale: float, return_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Exact attention of each row's queries over its gathered keys; every row keeps at least one key.

    Without LSE, torch's fused SDPA does it (no score matrix in memory); with LSE the
    scores are formed explicitly, since SDPA does not return the log-sum-exp.
    """
    attn_mask = kv_valid[:, None, :] if padded else None
    if not return_lse:  # 4-D [R, 1, ., D] inputs: torch's fused CPU/GPU kernels need a heads axis
        fused = torch.nn.functional.scaled_dot_product_attention(
            queries[:, None], keys[:, None], values[:, None], scale=scale,
            attn_mask=None if attn_mask is None else attn_mask[:, None])
        return fused[:, 0], None
    scores = torch.matmul(queries, keys.transpose(1, 2)) * scale
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, -torch.inf)
    row_lse = torch.logsumexp(scores, dim=-1)
    return torch.matmul(torch.exp(scores - row_lse[..., None]), values), row_lse


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[index]`` for a 2-D ``x`` and any ``index`` shape, through ``index_select`` (on CPU about 1.7x faster than
    advanced indexing at the chunks' shapes)."""
    return x.index_select(0, index.reshape(-1)).view(*index.shape, x.shape[-1])


def run_chunks(mask: BlockMask, chunks: list[Chunk], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               scale: float, return_lse: bool, partial: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Exact attention over the listed blocks; ``partial``: output and LSE in the compute dtype (float32, float64
    for float64 inputs), a partial result to merge with the approximation of unlisted blocks."""
    batch, num_heads, q_len, head_dim = q.shape
    num_kv_heads, kv_len = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    out_dtype, lse_dtype = (compute, compute) if partial else (q.dtype, torch.float32)
    out = torch.zeros(batch, num_heads * q_len, head_dim, dtype=out_dtype, device=q.device)
    lse = torch.full((batch, num_heads * q_len), -torch.inf, dtype=lse_dtype, device=q.device)
    q_flat = q.reshape(batch, num_heads * q_len, head_dim)
    k_flat = k.reshape(batch, num_kv_heads * kv_len, head_dim)
    v_flat = v.reshape(batch, num_kv_heads * kv_len, head_dim)
    for chunk in chunks:
        q_index = chunk.heads[:, None] * q_len + chunk.q_tokens                # [R, QB]
        kv_index = (chunk.heads // group)[:, None] * kv_len + chunk.kv_tokens  # [R, L]
        for b in range(batch):
            queries = _gather_rows(q_flat[b], q_index).to(compute)              # [R, QB, D]
            keys = _gather_rows(k_flat[b], kv_index).to(compute)                # [R, L, D]
            values = _gather_rows(v_flat[b], kv_index).to(compute)
            if chunk.padded:            # a padding slot's weight is 0, and 0 * inf is NaN: zero its value too
                values = values.masked_fill(~chunk.kv_valid[..., None], 0)
            result, row_lse = _attend(queries, keys, values, chunk.kv_valid, chunk.padded, scale, return_lse)
            out[b, chunk.q_rows] = result.reshape(-1, head_dim)[chunk.q_slots].to(out_dtype)
            if return_lse:
                lse[b, chunk.q_rows] = row_lse.reshape(-1)[chunk.q_slots].to(lse_dtype)
    if not chunks and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        # no row lists a block: zeros, still a function of q, k, v for autograd (gradient 0); sums over an empty
        # slice, so a NaN input does not reach them
        zero = sum(t.narrow(-1, 0, 0).sum() for t in (q, k, v))
        out, lse = out + zero.to(out_dtype), lse + zero.to(lse_dtype)
    return out.reshape(q.shape), (lse.reshape(batch, num_heads, q_len) if return_lse else None)
