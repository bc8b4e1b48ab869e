"""The two torch_npu calls, with every argument the lowering depends on written out.

Each function takes the ``torch_npu`` module of the current call (real or emulated) and
tensors already in the op's layout. Argument choices and their sources
(Ascend/op-plugin ``docs/zh/custom_APIs/torch_npu/``):

``npu_block_sparse_attention`` (torch_npu-npu_block_sparse_attention.md)
    BNSD for query and key/value (the layouts must match); ``block_sparse_mask`` int8
    ``[B, N1, ceil(Sq/bx), ceil(Skv/by)]`` with **1 = compute**; ``block_shape=[bx, 128]``;
    ``num_key_value_heads`` = key heads (GQA; query head n reads key head n // G);
    ``scale_value`` passed explicitly (its default is 0.0); ``inner_precise=0`` (float32
    softmax: the only value bf16 accepts, and the accurate one for fp16);
    ``softmax_lse_flag=1`` only when the LSE is needed (it "may cost performance").
    ``actual_seq_lengths`` / ``_kv`` given as the shapes' lengths, one per batch element: BNSD would take
    them from the shapes, but the wrapper turns omitted lengths into an empty list, not a null one, and
    every BNSD test of the op passes them.

``npu_fusion_attention`` (torch_npu-npu_fusion_attention.md)
    BNSD, ``head_num`` = query heads; ``atten_mask`` bool with **True = masked out** (the
    opposite of the IR), shape BNSS; ``sparse_mode=0`` with the default
    ``pre_tockens``/``next_tockens`` (the band is everything, so it agrees with any mask);
    ``scale`` passed explicitly (its default is **1.0**); ``inner_precise=0``. The LSE is
    ``softmax_max + log(softmax_sum)`` from outputs 2 and 3 (float32 ``[B, N1, Sq, 8]``,
    the value repeated 8 times).
"""

from __future__ import annotations

import types

import torch

from .schedule import BLOCK_Y


def block_sparse_attention(torch_npu: types.ModuleType, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           compute: torch.Tensor, block_x: int, scale: float,
                           want_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the block-sparse op; ``compute`` is int8 ``[B, N1, MBq, NBk]``, 1 = compute. Returns out, lse [B, N1, Sq]."""
    batch = query.shape[0]
    out, softmax_lse = torch_npu.npu_block_sparse_attention(
        query, key, value, compute, [block_x, BLOCK_Y],
        q_input_layout="BNSD", kv_input_layout="BNSD",
        num_key_value_heads=key.shape[1], scale_value=scale, inner_precise=0,
        actual_seq_lengths=[query.shape[2]] * batch, actual_seq_lengths_kv=[key.shape[2]] * batch,
        softmax_lse_flag=1 if want_lse else 0)
    return out, (softmax_lse[..., 0] if want_lse else None)


def fusion_attention(torch_npu: types.ModuleType, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     masked_out: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the fused op; ``masked_out`` is bool ``[B, N1, Sq, Skv]`` in the op's polarity (True = masked out: the
    IR's token mask inverted).

    Returns out ``[B, N1, Sq, D]`` and the natural-log LSE ``[B, N1, Sq]`` (float32).
    """
    result = torch_npu.npu_fusion_attention(
        query, key, value, query.shape[1], "BNSD",
        atten_mask=masked_out, scale=scale, sparse_mode=0, inner_precise=0)
    out, softmax_max, softmax_sum = result[0], result[1], result[2]
    return out, softmax_max[..., 0] + torch.log(softmax_sum[..., 0])
