"""Portable torch lowering: gather each query block's key blocks, attend, scatter back.

Works on any torch device with plain tensor ops, so it is the fallback for devices
without a native lowering and the fast path on CPU.

Plan (once per mask, with torch ops on the device of the mask's lists): the (head,
query block) rows are sorted by how many key blocks they keep and cut into chunks
whose padded work fits a memory budget; the cut reads the row lengths on the host
once. Each chunk stores its rows' head, query-token range and padded list of key
block ids. Run (per batch element and chunk): gather the chunk's queries
``[R, QB, D]`` and key/value tokens ``[R, NB * KB, D]`` (padding masked to -inf),
compute exact softmax attention in float32 (float64 for float64 inputs; torch's
fused SDPA when no LSE is asked for), and write the valid rows back. Empty rows give output 0 and LSE -inf.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sparsecore.capabilities import Capabilities
from sparsecore.ir import BlockMask
from sparsecore.registry import Backend, Run

PORTABLE_DEVICES = ("cpu", "cuda", "mps", "xpu")


@dataclass(frozen=True)
class PortableOptions:
    """``chunk_elements``: padded score elements per chunk (bounds temporary memory, ~4 bytes each)."""

    chunk_elements: int = 1 << 24

    def __post_init__(self) -> None:
        if isinstance(self.chunk_elements, bool) or not isinstance(self.chunk_elements, int) \
                or self.chunk_elements < 1:
            raise ValueError(f"chunk_elements: expected a positive int, got {self.chunk_elements!r}")


class PortableBackend(Backend):
    name = "portable"
    capabilities = Capabilities(devices=PORTABLE_DEVICES, array_type="torch",
                                dtypes=frozenset({"float32", "float16", "bfloat16", "float64"}))
    install_hint = "needs only torch"
    options_type = PortableOptions

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
        chunks = plan_chunks(mask, options.chunk_elements, torch.device(device))
        return lambda q, k, v, scale, return_lse: run_chunks(mask, chunks, q, k, v, scale, return_lse)


@dataclass(frozen=True)
class Chunk:
    """Rows processed together; ``R`` rows padded to ``QB`` query tokens and ``NB`` key blocks of ``KB``."""

    heads: torch.Tensor        # int64 [R]
    q_tokens: torch.Tensor     # int64 [R, QB]: query positions (padding repeats a valid one)
    q_valid: torch.Tensor      # bool  [R, QB]
    kv_tokens: torch.Tensor    # int64 [R, NB * KB]: key positions (padding points at 0)
    kv_valid: torch.Tensor     # bool  [R, NB * KB]
    padded: bool               # whether any kv_valid entry is False


def plan_chunks(mask: BlockMask, chunk_elements: int, device: torch.device) -> list[Chunk]:
    """Group the mask's rows into padded chunks; sizes from one host read of the row lengths."""
    mask = mask.to(device)
    lengths = mask.row_lengths.reshape(-1)                   # key blocks per row, [H * MB]
    host_lengths = lengths.cpu().numpy()                     # the one host read: chunk sizes depend on it
    order = np.argsort(-host_lengths, kind="stable")
    order = order[host_lengths[order] > 0]                   # empty rows stay 0 / -inf
    max_q, max_kv = int(mask.q_block_sizes.max()), int(mask.kv_block_sizes.max())
    starts = mask.indptr[:, :-1].reshape(-1).long()
    chunks = []
    position = 0
    while position < len(order):
        end = _chunk_end(order, position, host_lengths, max_q, max_kv, chunk_elements)
        chunks.append(_make_chunk(mask, order[position:end], host_lengths, starts, device))
        position = end
    return chunks


def _chunk_end(order: np.ndarray, position: int, lengths: np.ndarray, max_q: int, max_kv: int,
               chunk_elements: int) -> int:
    """End of the chunk starting at ``position``: rows are sorted longest first, so the first bounds the padding."""
    per_row = max_q * int(lengths[order[position]]) * max_kv
    return min(len(order), position + max(1, chunk_elements // per_row))


def _make_chunk(mask: BlockMask, rows: np.ndarray, lengths: np.ndarray, starts: torch.Tensor,
                device: torch.device) -> Chunk:
    num_q_blocks = mask.num_q_blocks
    heads, blocks = rows // num_q_blocks, rows % num_q_blocks
    q_sizes = mask.q_block_sizes[blocks]
    qb = int(q_sizes.max())
    q_offsets = np.arange(qb)[None, :]
    q_valid = q_offsets < q_sizes[:, None]
    q_tokens = mask.q_offsets[blocks][:, None] + np.where(q_valid, q_offsets, 0)

    put = lambda a: torch.from_numpy(np.array(a)).to(device)  # noqa: E731
    nb = int(lengths[rows].max())
    row_lengths = put(lengths[rows].astype(np.int64))
    slot = torch.arange(nb, device=device)[None, :]
    block_valid = slot < row_lengths[:, None]
    entry = torch.where(block_valid, starts[put(rows.astype(np.int64))][:, None] + slot, 0)
    block_ids = mask.indices[entry].long()
    kv_sizes, kv_offsets = put(mask.kv_block_sizes), put(mask.kv_offsets)
    kb = int(mask.kv_block_sizes.max())
    within = torch.arange(kb, device=device)[None, None, :]
    kv_valid = block_valid[:, :, None] & (within < kv_sizes[block_ids][:, :, None])
    # Padding points at the row's first kept token, never at a token the row does not attend to:
    # a non-finite value there must not reach the row even through a zero weight.
    first = kv_offsets[block_ids[:, :1]][:, :, None]
    kv_tokens = torch.where(kv_valid, kv_offsets[block_ids][:, :, None] + within, first)
    return Chunk(put(heads.astype(np.int64)), put(q_tokens.astype(np.int64)), put(q_valid),
                 kv_tokens.reshape(len(rows), -1), kv_valid.reshape(len(rows), -1), not bool(kv_valid.all()))


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


def run_chunks(mask: BlockMask, chunks: list[Chunk], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               scale: float, return_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    batch, num_heads, q_len, head_dim = q.shape
    num_kv_heads, kv_len = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.zeros(batch, num_heads * q_len, head_dim, dtype=q.dtype, device=q.device)
    lse = torch.full((batch, num_heads * q_len), -torch.inf, dtype=torch.float32, device=q.device)
    q_flat = q.reshape(batch, num_heads * q_len, head_dim)
    k_flat = k.reshape(batch, num_kv_heads * kv_len, head_dim)
    v_flat = v.reshape(batch, num_kv_heads * kv_len, head_dim)
    for chunk in chunks:
        q_index = chunk.heads[:, None] * q_len + chunk.q_tokens                # [R, QB]
        kv_index = (chunk.heads // group)[:, None] * kv_len + chunk.kv_tokens  # [R, L]
        valid_rows = q_index[chunk.q_valid]
        for b in range(batch):
            queries = q_flat[b, q_index].to(compute)                            # [R, QB, D]
            keys = k_flat[b, kv_index].to(compute)                              # [R, L, D]
            values = v_flat[b, kv_index].to(compute)
            result, row_lse = _attend(queries, keys, values, chunk.kv_valid, chunk.padded, scale, return_lse)
            out[b, valid_rows] = result[chunk.q_valid].to(q.dtype)
            if return_lse:
                lse[b, valid_rows] = row_lse[chunk.q_valid].float()
    return out.reshape(q.shape), (lse.reshape(batch, num_heads, q_len) if return_lse else None)
