"""Portable torch lowering: gather each span of query blocks' key blocks, attend, scatter back.

Works on any torch device with plain tensor ops, so it is the fallback for devices
without a native lowering and the fast path on CPU.

Schedule (once per mask, with torch ops on the device of the mask's lists): a row is a span of
consecutive query blocks of one head that keep the same key blocks (a dense layer, a joint
mask's text rows: one row of all their query tokens, whose keys are gathered once), found on the
device and read to the host with the row lengths in one read. The rows are sorted by query
tokens and kept key tokens and cut into chunks whose padded work (rows x most query tokens x
most key tokens) fits a memory budget, with little query padding (a row whose scores alone
exceed the budget is cut into pieces of query tokens). Each chunk stores its rows' head, query
tokens and key tokens (the kept blocks' tokens one after another, padded to the chunk's longest
row). Run (per batch element and chunk): gather the chunk's queries ``[R, QB, D]`` and key/value
tokens ``[R, L, D]`` (padding masked to -inf, and pointing at a token the row attends to),
compute exact softmax attention in float32 (float64 for float64 inputs; torch's fused SDPA when
no LSE is asked for), and write the valid rows back. Empty rows give output 0 and LSE -inf.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sparsecore.capabilities import Capabilities
from sparsecore.ir import BlockMask
from sparsecore.ir.csr import kept_key_tokens
from sparsecore.ir.unselected import KINDS
from sparsecore.ir.uploads import queued
from sparsecore.registry import Backend, Run

from ..approximation import ApproximatingRun

PORTABLE_DEVICES = ("cpu", "cuda", "mps", "xpu")


@dataclass(frozen=True)
class PortableOptions:
    """``chunk_elements``: padded score elements per chunk (bounds temporary memory, ~4 bytes each; the chunk's
    gathered keys and values take about ``2 D / QB`` times as many again, D the head dim, QB its rows' query tokens)."""

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
            return PortableRun(ApproximatingRun(exact, mask, options.chunk_elements, where), chunks)
        return PortableRun(lambda q, k, v, scale, return_lse: run_chunks(mask, chunks, q, k, v, scale, return_lse),
                           chunks)


@dataclass(frozen=True)
class Chunk:
    """Rows (spans of query blocks) processed together; ``R`` rows padded to ``QB`` query and ``L`` key tokens.

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


class PortableRun:
    """A lowered run and the chunks it holds: ``plan_bytes``, what they take in memory (with an approximating run's
    row plans), is what the kernel cache counts for it (:func:`sparsecore.kernel_cache.lowered`): they grow with the
    query and key tokens the spans list. Each tensor's storage counts once: the pieces of a span cut up for
    ``chunk_elements`` share its key positions."""

    def __init__(self, call: Run, chunks: list[Chunk]) -> None:
        self._call, self.chunks = call, chunks
        held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for c in chunks
                for t in (c.heads, c.q_tokens, c.q_rows, c.q_slots, c.kv_tokens, c.kv_valid)}
        self.plan_bytes = sum(held.values()) + getattr(call, "plan_bytes", 0)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                 return_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._call(q, k, v, scale, return_lse)


def schedule_chunks(mask: BlockMask, chunk_elements: int, device: torch.device) -> list[Chunk]:
    """Group the mask's spans into padded chunks; sizes from one host read of the row lengths (with whether each row
    keeps what the one before it keeps).

    A span is a run of consecutive query blocks of one head that keep the same key blocks: it gathers
    them once for all its query tokens. A span whose own scores exceed ``chunk_elements`` (many query
    tokens keeping many keys) is cut into pieces of query tokens that share its gathered key positions.
    """
    chunk_elements = min(chunk_elements, 1 << 60)     # for NumPy's int64 products below; larger bounds nothing more
    mask = mask.to(device)
    lengths = mask.row_lengths.reshape(-1)                   # key blocks per row, [H * MB]
    kept = kept_key_tokens(mask.indptr, mask.indices, mask.kv_offsets).reshape(-1)   # key tokens per row
    same = _same_as_previous(mask, lengths)
    host_lengths, host_kept, host_same = torch.stack([lengths, kept.long(), same.long()]).cpu().numpy()  # one read
    first, q_starts, q_sizes = _spans(mask, host_lengths, host_same)    # empty rows stay 0 / -inf
    span_kept = host_kept[first]
    # A chunk pads its spans to its most query tokens and most key tokens, so similar spans sit together: by query
    # tokens, then kept key tokens, descending. Spans of uniform blocks then come in groups of equal query tokens
    # (one block, two, ...), each by kept key tokens descending as single-block rows are: a chunk's first span is
    # its widest, and in a group it keeps the most key tokens. A chunk takes a narrower group only while its query
    # padding stays within a quarter of its query tokens, and any span only while its padded work stays within 1.5
    # times its spans' own (see _chunk_end).
    order = np.lexsort((-span_kept, -q_sizes))
    sorted_sizes, sorted_kept = q_sizes[order], span_kept[order]
    starts = mask.indptr[:, :-1].reshape(-1).long()
    kv_offsets = _upload(np.asarray(mask.kv_offsets, dtype=np.int64), device)
    chunks = []
    position = 0
    while position < len(order):
        end = _chunk_end(sorted_sizes, sorted_kept, position, chunk_elements)
        spans = order[position:end]
        keys = _key_tokens(mask, first[spans], host_lengths, host_kept, starts, kv_offsets, device)
        padded = bool((span_kept[spans] != span_kept[spans].max()).any())     # a span keeps fewer key tokens than L
        heads = first[spans] // mask.num_q_blocks
        size, row_kept = int(q_sizes[spans[0]]), int(span_kept[spans[0]])
        if len(spans) == 1 and size * row_kept > chunk_elements:
            piece = max(1, chunk_elements // row_kept)
            chunks.extend(_chunk(mask, heads, q_starts[spans] + low, np.minimum(q_sizes[spans] - low, piece), keys,
                                 padded, device) for low in range(0, size, piece))
        else:
            chunks.append(_chunk(mask, heads, q_starts[spans], q_sizes[spans], keys, padded, device))
        position = end
    return chunks


SPAN_WINDOW = 1 << 22    # list entries compared at a time in _same_as_previous (its temporaries: 225 MB on CPU)


def _same_as_previous(mask: BlockMask, lengths: torch.Tensor) -> torch.Tensor:
    """Whether each row keeps the same key blocks as the row before it in its head, bool ``[H * MB]`` on the lists'
    device, without a host read. Rows are stored one after another, so where two consecutive rows keep as many
    blocks, the earlier one's entry at an entry's offset sits ``lengths[row]`` entries before it; each row counts its
    entries that differ there. The entries are compared ``SPAN_WINDOW`` at a time, so the temporaries stay bounded: on
    a dense 24-head mask of 2,949 blocks a side (209 M entries) the CPU's peak rose 225 MB in 1.1 s, against 4.8 GB
    in 3.3 s comparing all at once."""
    nnz, device = mask.indices.shape[0], lengths.device
    starts = mask.indptr[:, :-1].reshape(-1)                  # each row's first entry; an empty row's is the next's
    row_lengths = lengths.int()
    mismatches = torch.zeros(lengths.shape[0], dtype=torch.int32, device=device)
    ones = torch.ones_like(starts)
    for low in range(0, nnz, SPAN_WINDOW):                    # nnz is the lists' shape: known without a read
        size = min(SPAN_WINDOW, nnz - low)
        # the row holding each entry: one less than the rows starting at or before it (rows before the window
        # count at its first entry, rows after it past its end), index_select and no binary search (3x on CPU)
        starting = torch.zeros(size + 1, dtype=torch.int32, device=device)
        starting.index_add_(0, (starts - low).clamp_(0, size), ones)
        row = torch.cumsum(starting[:size], 0, dtype=torch.int32) - 1
        entry = torch.arange(low, low + size, dtype=torch.int32, device=device)
        earlier = (entry - row_lengths.index_select(0, row)).clamp_(min=0)
        differs = mask.indices[low:low + size] != mask.indices.index_select(0, earlier)
        mismatches.index_add_(0, row, differs.int())
    row = torch.arange(lengths.shape[0], device=device)
    return (row % mask.num_q_blocks != 0) & (lengths == lengths.roll(1)) & (mismatches == 0)


def _spans(mask: BlockMask, lengths: np.ndarray, same: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The non-empty spans: each one's first flat row ``h * MB + i``, first query token and query tokens."""
    begins = np.flatnonzero(same == 0)              # a head's first row always begins one: a span never crosses heads
    ends = np.append(begins[1:], len(same))
    begins, ends = begins[lengths[begins] > 0], ends[lengths[begins] > 0]
    blocks = begins % mask.num_q_blocks
    q_starts = mask.q_offsets[blocks].astype(np.int64)
    return begins, q_starts, mask.q_offsets[blocks + (ends - begins)] - q_starts


def _chunk_end(q_sizes: np.ndarray, kept: np.ndarray, position: int, chunk_elements: int) -> int:
    """End of the chunk of sorted spans (query tokens descending) starting at ``position``: the longest run of spans
    whose padded work (spans x most query tokens x most key tokens) fits ``chunk_elements``, whose padded query tokens
    exceed theirs by at most a quarter, and whose padded work exceeds their own (query x key tokens) by at most a
    half (spans of one width but very different kept key tokens, where a mask has many block sizes); at least one
    span (one alone over ``chunk_elements`` is cut into pieces later).

    The run is checked over a window that doubles while every span in it fits, up to the most spans the first one
    allows: O(max(64, spans taken)) per chunk, never O(spans^2)."""
    widest = int(q_sizes[position])
    limit = min(len(q_sizes) - position, max(1, chunk_elements // (widest * int(kept[position]))))
    width = min(limit, 64)
    while True:
        count = np.arange(1, width + 1)
        sizes, most_kept = q_sizes[position:position + width], np.maximum.accumulate(kept[position:position + width])
        fits = (count <= chunk_elements // (widest * most_kept)) & (4 * widest * count <= 5 * np.cumsum(sizes)) \
            & (2 * widest * count * most_kept <= 3 * np.cumsum(sizes * kept[position:position + width]))
        taken = int(np.logical_and.accumulate(fits).sum())        # the third bound may fail, then hold again
        if taken < width or width == limit:
            return position + max(1, taken)
        width = min(limit, 2 * width)


def _chunk(mask: BlockMask, heads: np.ndarray, q_starts: np.ndarray, q_sizes: np.ndarray,
           keys: tuple[torch.Tensor, torch.Tensor], padded: bool, device: torch.device) -> Chunk:
    """The chunk of spans of ``heads`` with ``q_sizes`` query tokens from ``q_starts`` (all of them, or a piece of
    a single span)."""
    offsets = np.arange(int(q_sizes.max()))[None, :]
    q_valid = offsets < q_sizes[:, None]
    q_tokens = q_starts[:, None] + np.where(q_valid, offsets, 0)
    q_slots = np.flatnonzero(q_valid)           # integer positions: a call writes back without a boolean mask's sync
    q_rows = (heads[:, None] * mask.q_len + q_tokens).reshape(-1)[q_slots]
    kv_tokens, kv_valid = keys
    return Chunk(*(_upload(np.asarray(a, dtype=np.int64), device) for a in (heads, q_tokens, q_rows, q_slots)),
                 kv_tokens, kv_valid, padded)


def _upload(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A chunk's host array on ``device``: on CUDA a copy from pinned memory queued without waiting
    (:func:`sparsecore.ir.uploads.queued`: a pageable copy would wait for the GPU's queue, at every chunk of every new
    mask); elsewhere a plain copy."""
    if device.type == "cuda":
        return queued(array, device)
    return torch.from_numpy(np.array(array)).to(device)


def _key_tokens(mask: BlockMask, rows: np.ndarray, lengths: np.ndarray, kept: np.ndarray, starts: torch.Tensor,
                kv_offsets: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Key positions ``[R, L]`` of ``rows`` (their kept blocks' tokens one after another) and which are real;
    ``kv_offsets``: the mask's key block boundaries on ``device``."""
    nb = int(lengths[rows].max())
    slot = torch.arange(nb, device=device)[None, :]
    block_valid = slot < _upload(lengths[rows].astype(np.int64), device)[:, None]
    entry = torch.where(block_valid, starts[_upload(rows.astype(np.int64), device)][:, None] + slot, 0)
    block_ids = mask.indices[entry].long()                                       # [R, nb]
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
