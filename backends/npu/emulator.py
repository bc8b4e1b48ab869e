"""A CPU emulator of the two torch_npu ops the npu lowering calls, written from their docs.

``with sparsecore.backends.npu.emulate() as torch_npu: ...`` places a module at
``sys.modules["torch_npu"]`` whose ``npu_block_sparse_attention`` and
``npu_fusion_attention`` take CPU tensors and compute what the documentation says the
real ops compute, with the documented argument names and defaults, mask polarity,
layouts, return tuples, LSE conventions and constraint checks (raised as
``RuntimeError``, as torch_npu's ``TORCH_CHECK`` does). On exit the previous entry (or
its absence) is restored.

This file is written from the op documents, not from the lowering, so that a wrong
lowering cannot pass by sharing a mistake with it; ``tests/test_npu_emulator.py`` checks
it against hand-computed cases. Sources (Ascend/op-plugin, master, 2026):

- ``docs/zh/custom_APIs/torch_npu/torch_npu-npu_block_sparse_attention.md``
- ``docs/zh/custom_APIs/torch_npu/torch_npu-npu_fusion_attention.md``
- ``test/test_custom_ops/test_npu_block_sparse_attention.py`` (CPU golden, GQA constraint)
- hicann/ops-transformer ``attention/block_sparse_attention/docs/aclnnBlockSparseAttention.md``
  (head dim 64/128, inner_precise values on A2/A3, both-or-neither actual lengths, no
  non-contiguous query/key/value/mask) and its
  ``op_host`` tiling code (``block_shape`` of exactly two elements, TND lengths that add up to T)
- the CANN ATK test golden of FlashAttentionScore, the kernel behind npu_fusion_attention
  (softmax_max/sum are the row max of ``scale * QK^T`` after the mask and the sum of
  ``exp(s - max)``; query head ``n`` reads key head ``n // (N1 / N2)``), and
  ``docs/FlashAttentionScore.md`` of the CANN ops (``atten_mask`` True positions are
  selected to a large negative value before the softmax)

Behaviour the documents leave undefined is poisoned with NaN, so a caller that depends
on it fails loudly instead of matching by luck:

- a query row of ``npu_block_sparse_attention`` whose block-mask row is all 0 (the op's
  own test builds masks that "ensure each row has at least one valid block"): output
  and LSE NaN;
- ``softmax_lse`` when ``softmax_lse_flag=0`` ("valid only when softmax_lse_flag=1");
- a fully masked row of ``npu_fusion_attention``: output, softmax_max and softmax_sum NaN,
  whatever ``inner_precise`` says (the doc says 2 computes such "invalid rows" without
  precision loss, but not what it writes there);
- a row of ``npu_fusion_attention`` that computes a score from a key holding an infinity or NaN
  (not masked out): output, softmax_max and softmax_sum NaN (the doc says nothing of such scores;
  dense attention would give a -inf score weight 0).

Inputs whose meaning the documents and the device disagree on are refused: a block-mask
value other than 0 or 1 (the doc: 1 computes, 0 skips; the CPU golden computes where the
value is not 0, the A2 kernel where it is at least 1), and a ``sparse_mode=0`` ``atten_mask`` that keeps
positions outside the ``pre_tockens``/``next_tockens`` band (the doc: the two must agree, else the result is
wrong).

GQA (N1 query heads, N2 key heads, G = N1 / N2): query head ``n`` reads key head
``n // G`` in both ops. For ``npu_block_sparse_attention`` this is an assumption: its
public golden uses ``n % N2`` but only tests G = 1 and N2 = 1, where the two agree;
``tests/test_npu_hardware.py`` checks it on a device.

Not modelled (raises ``NotImplementedError``): dropout, ``pse``, ``sink``, ``prefix``,
``npu_fusion_attention`` sparse modes 2-8 and its TND layout. Precision is not
modelled either: both ops compute in float32 and round the output to the input dtype,
whatever ``inner_precise`` says.
"""

from __future__ import annotations

import math
import sys
import types
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch

MODULE_NAME = "torch_npu"
EMULATOR_FLAG = "__sparsecore_emulator__"
VERSION = "2.14.0+sparsecore.emulator"

INT_MAX = 2147483647
BLOCK_SPARSE_DTYPES = (torch.float16, torch.bfloat16)
BLOCK_SPARSE_HEAD_DIMS = (64, 128)
BLOCK_SPARSE_LAYOUTS = ("TND", "BNSD")
BLOCK_Y_MULTIPLE = 128          # Atlas A2/A3 (16 on Ascend 950, which this emulator does not model)
A2_INNER_PRECISE = (0, 1)       # 4 exists only on Ascend 950
FUSION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FUSION_LAYOUTS = ("BSH", "SBH", "BSND", "BNSD", "TND")
FUSION_MAX_HEADS = 256
FUSION_MAX_HEAD_DIM = 768
FUSION_MAX_SEQ = 1 << 20       # "S: sequence length, 1~1M"


def _check(condition: bool, op: str, message: str) -> None:
    if not condition:
        raise RuntimeError(f"{op}: {message} [sparsecore torch_npu emulator]")


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float,
            skips: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masked softmax attention in float32 over heads already paired with their key heads.

    q [N, Sq, D], k/v [N, Skv, D], allowed [N, Sq, Skv] (True = attend). Returns
    (out [N, Sq, Dv], row max [N, Sq], row sum [N, Sq], empty rows [N, Sq]); rows with
    no allowed key have out NaN (0/0), max -inf and sum 0. A masked key gets weight 0;
    ``skips``: the op never reads masked keys (the block-sparse op skips blocks), so a
    non-finite masked value does not reach the row; otherwise it does (``0 * NaN``), as
    in a kernel that computes every tile and masks the scores.
    """
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, -math.inf)
    empty = ~allowed.any(dim=-1)
    row_max = scores.amax(dim=-1)
    weights = torch.exp(scores - torch.where(empty, 0.0, row_max)[..., None])
    row_sum = weights.sum(dim=-1)
    v = v.float()
    bad = ~torch.isfinite(v).all(dim=-1)                            # [N, Skv]: tokens with a non-finite value
    if not skips or not bool(bad.any()):
        return torch.matmul(weights, v) / row_sum[..., None], row_max, row_sum, empty
    tokens = bad.any(dim=0).nonzero()[:, 0]
    out = torch.matmul(weights, v.masked_fill(bad[..., None], 0.0))
    part = weights[:, :, tokens, None] * v[:, None, tokens]         # [N, Sq, J, Dv]: only the few bad tokens
    read = allowed[:, :, tokens] & bad[:, None, tokens]
    out = out + torch.where(read[..., None], part, 0.0).sum(dim=2)
    return out / row_sum[..., None], row_max, row_sum, empty


def _kv_heads(num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """Key head read by each query head: n // G."""
    return torch.arange(num_heads) // (num_heads // num_kv_heads)


# --------------------------------------------------------------------------------------------------
# npu_block_sparse_attention
# --------------------------------------------------------------------------------------------------

def npu_block_sparse_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               block_sparse_mask: torch.Tensor, block_shape: Sequence[int], *,
                               q_input_layout: str = "TND", kv_input_layout: str = "TND",
                               num_key_value_heads: int = 1, scale_value: float = 0.0, inner_precise: int = 1,
                               actual_seq_lengths: Sequence[int] | None = None,
                               actual_seq_lengths_kv: Sequence[int] | None = None,
                               softmax_lse_flag: int | None = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention: ``Softmax(scale_value * query @ key_sparse^T) @ value_sparse``.

    Follows torch_npu-npu_block_sparse_attention.md: ``block_sparse_mask`` int8
    ``[B, N1, ceil(Sq/bx), ceil(Skv/by)]`` with 1 = compute the block, ``block_shape = [bx, by]``
    with ``by % 128 == 0`` (A2/A3), layouts TND or BNSD (q and kv the same), fp16/bf16,
    head dim 64 or 128, ``scale_value`` default 0.0, ``inner_precise`` default 1 (bf16
    needs 0). Returns ``(attention_out, softmax_lse)``: out in the query's layout and
    dtype, LSE float32 natural log ``[B, N1, S, 1]`` (BNSD) or ``[T, N1, 1]`` (TND), valid only
    with ``softmax_lse_flag=1``. In TND, ``actual_seq_lengths`` are per-batch lengths.
    """
    op = "npu_block_sparse_attention"
    for name, t in (("query", query), ("key", key), ("value", value), ("block_sparse_mask", block_sparse_mask)):
        _check(isinstance(t, torch.Tensor), op, f"{name} must be a Tensor, got {type(t).__name__}")
        _check(t.is_contiguous(), op, f"{name} must be contiguous (aclnnBlockSparseAttention lists non-contiguous "
                                      f"tensors as unsupported), got strides {t.stride()} for shape "
                                      f"{list(t.shape)}; pass {name}.contiguous()")
    _check(query.dtype in BLOCK_SPARSE_DTYPES, op, f"query dtype must be float16 or bfloat16, got {query.dtype}")
    _check(key.dtype == query.dtype and value.dtype == query.dtype, op,
           f"query, key, value must have one dtype, got {query.dtype}, {key.dtype}, {value.dtype}")
    _check(q_input_layout in BLOCK_SPARSE_LAYOUTS, op, f"q_input_layout must be TND or BNSD, got {q_input_layout!r}")
    _check(kv_input_layout == q_input_layout, op,
           f"kv_input_layout must equal q_input_layout ({q_input_layout!r}), got {kv_input_layout!r}")
    _check(inner_precise in A2_INNER_PRECISE, op, f"inner_precise must be 0 or 1 on Atlas A2/A3, got {inner_precise}")
    _check(not (query.dtype == torch.bfloat16 and inner_precise != 0), op,
           f"bfloat16 inputs support only inner_precise=0, got {inner_precise}")
    _check(softmax_lse_flag in (0, 1), op, f"softmax_lse_flag must be 0 or 1, got {softmax_lse_flag}")
    shape = list(block_shape)
    _check(len(shape) == 2 and all(isinstance(x, int) and x > 0 for x in shape), op,
           f"block_shape must be [blockShapeX, blockShapeY], both > 0, got {shape}")
    block_x, block_y = shape[0], shape[1]
    _check(block_y % BLOCK_Y_MULTIPLE == 0, op, f"block_shape[1] must be a multiple of 128, got {block_y}")
    _check((actual_seq_lengths is None) == (actual_seq_lengths_kv is None), op,
           "actual_seq_lengths and actual_seq_lengths_kv must be given together or not at all")
    _check(block_sparse_mask.dtype == torch.int8, op, f"block_sparse_mask must be int8, got {block_sparse_mask.dtype}")
    _check(bool(((block_sparse_mask == 0) | (block_sparse_mask == 1)).all()), op,
           "block_sparse_mask values must be 0 (skip) or 1 (compute): the device computes where a value is >= 1, "
           f"the CPU golden where it is != 0; got values {sorted(set(block_sparse_mask.unique().tolist()) - {0, 1})}")

    if q_input_layout == "TND":
        return _block_sparse_tnd(query, key, value, block_sparse_mask, block_x, block_y, num_key_value_heads,
                                 scale_value, actual_seq_lengths, actual_seq_lengths_kv, softmax_lse_flag)
    _check(query.dim() == 4 and key.dim() == 4 and value.dim() == 4, op,
           f"BNSD needs 4-D query/key/value, got {query.dim()}-D, {key.dim()}-D, {value.dim()}-D")
    batch, heads, q_len, head_dim = query.shape
    _check_heads_and_dims(op, heads, key.shape[1], num_key_value_heads, head_dim, key.shape[3], value.shape[3])
    _check(key.shape == value.shape and key.shape[0] == batch, op,
           f"key and value must be [B={batch}, N2, Skv, D] alike, got {list(key.shape)} and {list(value.shape)}")
    kv_len = key.shape[2]
    if actual_seq_lengths is None:
        q_lens, kv_lens = [q_len] * batch, [kv_len] * batch
        grid_q, grid_kv = q_len, kv_len
    else:
        q_lens, kv_lens = list(actual_seq_lengths), list(actual_seq_lengths_kv)
        _check(len(q_lens) == batch and len(kv_lens) == batch, op,
               f"actual_seq_lengths/_kv need one length per batch ({batch}), got {len(q_lens)} and {len(kv_lens)}")
        _check(all(0 <= a <= q_len for a in q_lens) and all(0 <= a <= kv_len for a in kv_lens), op,
               f"actual lengths must fit the shapes (Sq={q_len}, Skv={kv_len}), got {q_lens} and {kv_lens}")
        grid_q, grid_kv = q_len, kv_len
        if tuple(block_sparse_mask.shape[2:]) != (_ceil_div(q_len, block_x), _ceil_div(kv_len, block_y)):
            grid_q, grid_kv = max(q_lens), max(kv_lens)  # the doc allows block counts from the actual lengths
    expected = [batch, heads, _ceil_div(grid_q, block_x), _ceil_div(grid_kv, block_y)]
    _check(list(block_sparse_mask.shape) == expected, op,
           f"block_sparse_mask shape must be [B, N1, ceil(Sq/bx), ceil(Skv/by)] = {expected}, "
           f"got {list(block_sparse_mask.shape)}")

    out = torch.full(query.shape, math.nan, dtype=torch.float32)
    lse = torch.full((batch, heads, q_len, 1), math.nan, dtype=torch.float32)
    kv_of = _kv_heads(heads, key.shape[1])
    for b in range(batch):
        rows, cols = q_lens[b], kv_lens[b]
        if rows == 0:
            continue
        o, lse_b = _block_sparse_one(query[b, :, :rows], key[b, kv_of, :cols], value[b, kv_of, :cols],
                                     block_sparse_mask[b], block_x, block_y, scale_value)
        out[b, :, :rows] = o
        lse[b, :, :rows, 0] = lse_b
    if softmax_lse_flag != 1:
        lse = torch.full_like(lse, math.nan)
    return out.to(query.dtype), lse


def _check_heads_and_dims(op: str, heads: int, kv_heads: int, num_key_value_heads: int, head_dim: int,
                          key_dim: int, value_dim: int) -> None:
    _check(num_key_value_heads == kv_heads, op,
           f"num_key_value_heads ({num_key_value_heads}) must equal the key's head count ({kv_heads})")
    _check(kv_heads >= 1 and heads >= kv_heads and heads % kv_heads == 0, op,
           f"query heads N1={heads} and key heads N2={kv_heads} need N1 >= N2 and N1 % N2 == 0")
    group = heads // kv_heads
    _check(group < 128 and 128 % group == 0, op, f"GQA group G = N1/N2 needs G < 128 and 128 % G == 0, got {group}")
    _check(head_dim in BLOCK_SPARSE_HEAD_DIMS and key_dim == head_dim and value_dim == head_dim, op,
           f"head dim must be 64 or 128 for query, key and value, got {head_dim}, {key_dim}, {value_dim}")


def _block_sparse_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: torch.Tensor, block_x: int,
                      block_y: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch element: q [N, Sq, D], k/v [N, Skv, D] (per query head), block_mask [N, MBq, NBk]."""
    q_len, kv_len = q.shape[1], k.shape[1]
    row_block = torch.arange(q_len) // block_x
    col_block = torch.arange(kv_len) // block_y
    compute = block_mask == 1                                       # values are 0 or 1 (checked)
    allowed = compute[:, row_block][:, :, col_block]
    out, row_max, row_sum, empty = _attend(q, k, v, allowed, scale, skips=True)
    lse = row_max + torch.log(row_sum)
    empty_rows = ~compute[:, row_block].any(dim=-1)                 # no block at all: undefined
    out = out.masked_fill(empty_rows[..., None], math.nan)
    return out, lse.masked_fill(empty_rows | empty, math.nan)


def _block_sparse_tnd(query, key, value, block_sparse_mask, block_x, block_y, num_key_value_heads, scale_value,
                      actual_seq_lengths, actual_seq_lengths_kv, softmax_lse_flag):
    op = "npu_block_sparse_attention"
    _check(actual_seq_lengths is not None, op, "TND layout needs actual_seq_lengths and actual_seq_lengths_kv")
    _check(query.dim() == 3 and key.dim() == 3 and value.dim() == 3, op,
           f"TND needs 3-D query/key/value, got {query.dim()}-D, {key.dim()}-D, {value.dim()}-D")
    total_q, heads, head_dim = query.shape
    _check_heads_and_dims(op, heads, key.shape[1], num_key_value_heads, head_dim, key.shape[2], value.shape[2])
    q_lens, kv_lens = list(actual_seq_lengths), list(actual_seq_lengths_kv)
    _check(len(q_lens) == len(kv_lens) and len(q_lens) >= 1, op,
           f"actual_seq_lengths and actual_seq_lengths_kv need one length per batch, got {q_lens} and {kv_lens}")
    _check(sum(q_lens) == total_q and sum(kv_lens) == key.shape[0], op,
           f"per-batch lengths must add up to T (query {total_q}, key {key.shape[0]}), got {q_lens} and {kv_lens}")
    expected = [len(q_lens), heads, _ceil_div(max(q_lens), block_x), _ceil_div(max(kv_lens), block_y)]
    _check(list(block_sparse_mask.shape) == expected, op,
           f"block_sparse_mask shape must be [B, N1, ceil(max Sq/bx), ceil(max Skv/by)] = {expected}, "
           f"got {list(block_sparse_mask.shape)}")
    out = torch.full(query.shape, math.nan, dtype=torch.float32)
    lse = torch.full((total_q, heads, 1), math.nan, dtype=torch.float32)
    kv_of = _kv_heads(heads, key.shape[1])
    q_start = kv_start = 0
    for b, (rows, cols) in enumerate(zip(q_lens, kv_lens)):
        if rows:
            q_b = query[q_start:q_start + rows].transpose(0, 1)
            k_b = key[kv_start:kv_start + cols].transpose(0, 1)[kv_of]
            v_b = value[kv_start:kv_start + cols].transpose(0, 1)[kv_of]
            mask_b = block_sparse_mask[b, :, :_ceil_div(rows, block_x), :_ceil_div(cols, block_y)]
            o, lse_b = _block_sparse_one(q_b, k_b, v_b, mask_b, block_x, block_y, scale_value)
            out[q_start:q_start + rows] = o.transpose(0, 1)
            lse[q_start:q_start + rows, :, 0] = lse_b.transpose(0, 1)
        q_start += rows
        kv_start += cols
    if softmax_lse_flag != 1:
        lse = torch.full_like(lse, math.nan)
    return out.to(query.dtype), lse


# --------------------------------------------------------------------------------------------------
# npu_fusion_attention
# --------------------------------------------------------------------------------------------------

def npu_fusion_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, head_num: int,
                         input_layout: str, pse: torch.Tensor | None = None, padding_mask: torch.Tensor | None = None,
                         atten_mask: torch.Tensor | None = None, scale: float = 1.0, keep_prob: float = 1.0,
                         pre_tockens: int = INT_MAX, next_tockens: int = INT_MAX, inner_precise: int = 0,
                         prefix: Sequence[int] | None = None, actual_seq_qlen: Sequence[int] | None = None,
                         actual_seq_kvlen: Sequence[int] | None = None, sparse_mode: int = 0,
                         gen_mask_parallel: bool = True, sync: bool = False, softmax_layout: str = "",
                         sink: torch.Tensor | None = None, dropout_mask: torch.Tensor | None = None, seed: int = 0,
                         offset: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                   int, int, int]:
    """Fused attention ``Softmax(scale * QK^T, masked) @ V`` (torch_npu-npu_fusion_attention.md).

    ``atten_mask`` bool/uint8, **1/True = not computed**, shapes BNSS, B1SS, 11SS or SS;
    ``scale`` defaults to **1.0**; with ``sparse_mode=0`` the mask must mask out everything
    outside the ``pre_tockens``/``next_tockens`` band (left-up origin; the doc: they must agree,
    refused otherwise), with ``sparse_mode=1`` it is used alone; without a mask everything is
    computed. Returns the 7-tuple
    ``(attention_out, softmax_max, softmax_sum, reserved, seed, offset, mask_len)`` with
    softmax_max/softmax_sum float32 ``[B, N1, Sq, 8]`` (the value repeated 8 times):
    ``softmax_max`` is the row max of ``scale * QK^T``, ``softmax_sum`` is
    ``sum(exp(s - softmax_max))``, so the natural-log LSE is ``max + log(sum)``.
    """
    op = "npu_fusion_attention"
    for name, t in (("query", query), ("key", key), ("value", value)):
        _check(isinstance(t, torch.Tensor), op, f"{name} must be a Tensor, got {type(t).__name__}")
    _check(query.dtype in FUSION_DTYPES, op, f"query dtype must be float16, bfloat16 or float32, got {query.dtype}")
    _check(key.dtype == query.dtype and value.dtype == query.dtype, op,
           f"query, key, value must have one dtype, got {query.dtype}, {key.dtype}, {value.dtype}")
    _check(input_layout in FUSION_LAYOUTS, op, f"input_layout must be one of {FUSION_LAYOUTS}, got {input_layout!r}")
    _check(padding_mask is None, op, "padding_mask is not supported yet (doc: 暂不支持该传参)")
    _check(0.0 < keep_prob <= 1.0, op, f"keep_prob must be in (0, 1], got {keep_prob}")
    _check(inner_precise in (0, 1, 2), op, f"inner_precise must be 0, 1 (reserved) or 2 (invalid rows), "
                                          f"got {inner_precise}")
    _check(sparse_mode in range(9), op, f"sparse_mode must be 0..8, got {sparse_mode}")
    _check(softmax_layout in ("", "TND") and (softmax_layout == "" or input_layout == "TND"), op,
           f"softmax_layout may only be 'TND' with input_layout='TND', got {softmax_layout!r} with {input_layout!r}")
    if input_layout == "TND":
        _check(actual_seq_qlen is not None and actual_seq_kvlen is not None, op,
               "TND (varlen) needs actual_seq_qlen and actual_seq_kvlen (cumulative lengths)")
        raise NotImplementedError(f"{op}: the sparsecore emulator does not model the TND (varlen) layout")
    for name, unsupported in (("pse", pse), ("sink", sink), ("dropout_mask", dropout_mask), ("prefix", prefix)):
        if unsupported is not None:
            raise NotImplementedError(f"{op}: the sparsecore emulator does not model {name}")
    if keep_prob != 1.0:
        raise NotImplementedError(f"{op}: the sparsecore emulator does not model dropout (keep_prob < 1)")
    if atten_mask is not None and sparse_mode not in (0, 1):
        raise NotImplementedError(f"{op}: the sparsecore emulator models sparse_mode 0 and 1, got {sparse_mode}")

    q, k, v = _to_bnsd(op, query, key, value, head_num, input_layout)
    batch, heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    _check(tuple(key.shape) == tuple(value.shape), op,
           f"key and value must have the same shape, got {list(key.shape)} and {list(value.shape)}")
    _check(k.shape[0] == batch, op, f"key batch ({k.shape[0]}) must equal the query's ({batch})")
    _check(kv_heads >= 1 and heads % kv_heads == 0 and 1 <= heads <= FUSION_MAX_HEADS, op,
           f"Nq ({heads}) must be 1..256 and a multiple of Nkv ({kv_heads})")
    _check(1 <= q_len <= FUSION_MAX_SEQ and 1 <= kv_len <= FUSION_MAX_SEQ, op,
           f"sequence lengths must be 1..{FUSION_MAX_SEQ} (the doc: S 1~1M), got Sq={q_len}, Skv={kv_len}")
    _check(1 <= head_dim <= FUSION_MAX_HEAD_DIM and k.shape[3] == head_dim and v.shape[3] <= head_dim, op,
           f"head dims need Dq == Dk >= Dv in 1..768, got Dq={head_dim}, Dk={k.shape[3]}, Dv={v.shape[3]}")

    allowed = torch.ones(batch, heads, q_len, kv_len, dtype=torch.bool)
    if atten_mask is not None:
        allowed = ~_broadcast_mask(op, atten_mask, batch, heads, q_len, kv_len)
        if sparse_mode == 0:   # the doc: the mask must agree with the band (else "precision problems"): refused
            rows = torch.arange(q_len)[:, None]
            cols = torch.arange(kv_len)[None, :]
            outside = (cols - rows > next_tockens) | (rows - cols > pre_tockens)
            _check(not bool((allowed & outside).any()), op,
                   f"with sparse_mode=0 the atten_mask must mask out every position outside the pre_tockens/"
                   f"next_tockens band (pre_tockens={pre_tockens}, next_tockens={next_tockens}); it keeps "
                   f"{int((allowed & outside).sum())} of them: mask them (True) or widen the band")

    kv_of = _kv_heads(heads, kv_heads)
    out = torch.empty(batch, heads, q_len, v.shape[3], dtype=torch.float32)
    row_max = torch.empty(batch, heads, q_len, dtype=torch.float32)
    row_sum = torch.empty(batch, heads, q_len, dtype=torch.float32)
    for b in range(batch):
        o, m, s, empty = _attend(q[b], k[b, kv_of], v[b, kv_of], allowed[b], scale)
        undefined = empty | (allowed[b] & ~torch.isfinite(k[b, kv_of]).all(dim=-1)[:, None, :]).any(dim=-1)
        out[b] = o.masked_fill(undefined[..., None], math.nan)
        row_max[b] = m.masked_fill(undefined, math.nan)
        row_sum[b] = s.masked_fill(undefined, math.nan)
    attention_out = _from_bnsd(out.to(query.dtype), input_layout)
    softmax_max = row_max[..., None].expand(batch, heads, q_len, 8).contiguous()
    softmax_sum = row_sum[..., None].expand(batch, heads, q_len, 8).contiguous()
    reserved = torch.empty(0, dtype=query.dtype)
    return attention_out, softmax_max, softmax_sum, reserved, seed, offset, 0


def _to_bnsd(op: str, query, key, value, head_num: int, layout: str):
    """The inputs as [B, N, S, D] views (BSH/SBH split H into head_num heads of D)."""
    dims = {"BSH": 3, "SBH": 3, "BSND": 4, "BNSD": 4}[layout]
    _check(query.dim() == dims and key.dim() == dims and value.dim() == dims, op,
           f"{layout} needs {dims}-D query/key/value, got {query.dim()}-D, {key.dim()}-D, {value.dim()}-D")
    if layout == "BNSD":
        _check(head_num == query.shape[1], op, f"head_num ({head_num}) must equal query.shape[1] ({query.shape[1]})")
        return query, key, value
    if layout == "BSND":
        _check(head_num == query.shape[2], op, f"head_num ({head_num}) must equal query.shape[2] ({query.shape[2]})")
        return query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    _check(head_num >= 1 and query.shape[2] % head_num == 0, op,
           f"H ({query.shape[2]}) must be a multiple of head_num ({head_num})")
    head_dim = query.shape[2] // head_num
    _check(key.shape[2] % head_dim == 0 and value.shape[2] % head_dim == 0, op,
           f"key/value H must be multiples of D={head_dim}, got {key.shape[2]} and {value.shape[2]}")
    if layout == "SBH":
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    return tuple(t.reshape(t.shape[0], t.shape[1], -1, head_dim).transpose(1, 2) for t in (query, key, value))


def _from_bnsd(out: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "BNSD":
        return out
    if layout == "BSND":
        return out.transpose(1, 2).contiguous()
    bsh = out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)
    return bsh.contiguous() if layout == "BSH" else bsh.transpose(0, 1).contiguous()


def _broadcast_mask(op: str, mask: torch.Tensor, batch: int, heads: int, q_len: int, kv_len: int) -> torch.Tensor:
    """atten_mask as bool [B, N, Sq, Skv], True = masked out; accepts BNSS, B1SS, 11SS, SS."""
    _check(isinstance(mask, torch.Tensor), op, f"atten_mask must be a Tensor, got {type(mask).__name__}")
    _check(mask.dtype in (torch.bool, torch.uint8), op, f"atten_mask dtype must be bool or uint8, got {mask.dtype}")
    allowed_shapes = ([batch, heads, q_len, kv_len], [batch, 1, q_len, kv_len], [1, 1, q_len, kv_len],
                      [q_len, kv_len])
    _check(list(mask.shape) in allowed_shapes, op,
           f"atten_mask shape must be BNSS, B1SS, 11SS or SS = one of {allowed_shapes}, got {list(mask.shape)}")
    return (mask != 0).expand(batch, heads, q_len, kv_len)


# --------------------------------------------------------------------------------------------------
# installing it
# --------------------------------------------------------------------------------------------------

def make_module() -> types.ModuleType:
    """A fresh module object named ``torch_npu`` holding the emulated ops."""
    module = types.ModuleType(MODULE_NAME, "sparsecore's CPU emulator of torch_npu's attention ops")
    module.__version__ = VERSION
    setattr(module, EMULATOR_FLAG, True)
    module.npu_block_sparse_attention = npu_block_sparse_attention
    module.npu_fusion_attention = npu_fusion_attention
    return module


_ABSENT = object()


@contextmanager
def emulate() -> Iterator[types.ModuleType]:
    """Install the emulator at ``sys.modules["torch_npu"]`` for the block; restore what was there after.

    Nothing happens until the block is entered, so creating the context manager is free.
    """
    previous = sys.modules.get(MODULE_NAME, _ABSENT)
    module = make_module()
    sys.modules[MODULE_NAME] = module
    try:
        yield module
    finally:
        if previous is _ABSENT:
            sys.modules.pop(MODULE_NAME, None)
        else:
            sys.modules[MODULE_NAME] = previous
