"""The ``flashinfer`` lowering: FlashInfer's ``BlockSparseAttentionWrapper`` with heads folded into rows.

The wrapper takes one block pattern for all heads (it treats each block row as a
request over a paged KV cache with page size C; flashinfer/sparse.py). To give every
head its own pattern, the lowering folds batch and heads into the rows: query head
``h`` of batch ``b`` becomes rows ``(b, h, i)`` of a single-head problem with
``B*H*q_len`` query tokens, and its key blocks are looked up in the block-diagonal
copy of key head ``h // G``: column block ``(b * H_kv + h // G) * NB + j``. This is
the layout measured at 500-515 eff TFLOP/s with per-head masks on an H100
(shared/ANCHORS.md), ahead of the variable-block wrapper.

Takes: uniform query blocks R and key blocks C (the last query block may be short:
queries are then padded per head to whole blocks), ``kv_len % C == 0`` (the wrapper
reshapes keys into pages of C), fp16/bf16, head dims 64/128 (the ones tested on the H100),
``R >= 4``: below that the wrapper switches to its CUDA-core decode kernel, which on an
H100 (2026-11-22, flashinfer 0.6.1) returned wrong outputs for R=2 and faulted for R=3
(bench/results/cuda-2026-11-22-runs/flashinfer-edge-shapes.log). FlashInfer returns
a base-2 LSE; it is converted to natural log. Rows whose list is empty are set to
output 0 and LSE -inf after the call (FlashInfer does not document what it writes
there). Plans are built per (batch, dtype, head dim, scale) on first use and reused.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass

import numpy as np
import torch

from sparsecore.capabilities import Capabilities
from sparsecore.ir import BlockMask
from sparsecore.registry import Backend, Run

WORKSPACE_BYTES = 128 << 20  # FlashInfer's recommended float workspace, shared by all plans on a device
_WORKSPACES: dict[torch.device, torch.Tensor] = {}


@dataclass(frozen=True)
class FlashInferOptions:
    """``variant``: FlashInfer's kernel family, "auto" (fa3 on Hopper), "fa2" or "fa3"."""

    variant: str = "auto"

    def __post_init__(self) -> None:
        if self.variant not in ("auto", "fa2", "fa3"):
            raise ValueError(f"variant: expected 'auto', 'fa2' or 'fa3', got {self.variant!r}")


class FlashInferBackend(Backend):
    name = "flashinfer"
    install_hint = "pip install flashinfer-python>=0.6.1 (JIT-compiles its kernels with nvcc on first use)"
    options_type = FlashInferOptions
    capabilities = Capabilities(devices=("cuda",), array_type="torch", dtypes=frozenset({"float16", "bfloat16"}),
                                head_dims=frozenset({64, 128}), uniform_q_blocks=True, uniform_kv_blocks=True,
                                kv_len_divisible=True, min_q_block=4)

    def unavailable_reason(self, device: str) -> str | None:
        if importlib.util.find_spec("flashinfer") is None:
            return "flashinfer is not installed"
        if not torch.cuda.is_available():
            return f"torch.cuda.is_available() is False in torch {torch.__version__}"
        return None

    def preference(self, mask: BlockMask) -> int:
        from .selection import flashinfer_preference
        return flashinfer_preference(mask)

    def lower(self, mask: BlockMask, device: str, options: FlashInferOptions) -> Run:
        return FoldedHeadsLaunch(mask, options.variant)


class FoldedHeadsLaunch:
    """Run function of one mask: plans per (batch, dtype, head dim, scale), then launches."""

    def __init__(self, mask: BlockMask, variant: str) -> None:
        self.mask = mask
        self.variant = variant
        self.q_block = mask.uniform_block_size("q")
        self.kv_block = mask.uniform_block_size("kv")
        self.padded_q_len = mask.num_q_blocks * self.q_block
        self._empty_rows = np.repeat(mask.row_lengths == 0, self.q_block, axis=1)  # [H, padded_q_len]
        self._empty_rows_on: dict[torch.device, torch.Tensor] = {}
        self._wrappers: dict[tuple, object] = {}

    def _folded_csr(self, batch: int, num_kv_heads: int) -> tuple[np.ndarray, np.ndarray]:
        """indptr over rows (b, h, i) and indices into the block-diagonal key-block space."""
        mask = self.mask
        group = mask.num_heads // num_kv_heads
        lengths = np.tile(mask.row_lengths.ravel(), batch)
        indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        head_of_entry = np.repeat(np.arange(mask.num_heads), np.diff(mask.indptr[:, [0, -1]], axis=1).ravel())
        per_batch = [(b * num_kv_heads + head_of_entry // group) * mask.num_kv_blocks + mask.indices
                     for b in range(batch)]
        return indptr, np.concatenate(per_batch).astype(np.int32)

    def _wrapper(self, q: torch.Tensor, num_kv_heads: int, scale: float):
        batch, num_heads, _, head_dim = q.shape
        key = (batch, num_kv_heads, q.dtype, head_dim, scale, q.device)
        if key not in self._wrappers:
            import flashinfer
            if q.device not in _WORKSPACES:
                _WORKSPACES[q.device] = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=q.device)
            wrapper = flashinfer.BlockSparseAttentionWrapper(_WORKSPACES[q.device], backend=self.variant)
            indptr, indices = self._folded_csr(batch, num_kv_heads)
            wrapper.plan(torch.from_numpy(indptr).to(q.device), torch.from_numpy(indices).to(q.device),
                         M=batch * num_heads * self.padded_q_len, N=batch * num_kv_heads * self.mask.kv_len,
                         R=self.q_block, C=self.kv_block, num_qo_heads=1, num_kv_heads=1, head_dim=head_dim,
                         sm_scale=scale, q_data_type=q.dtype, kv_data_type=q.dtype, o_data_type=q.dtype)
            self._wrappers[key] = wrapper
        return self._wrappers[key]

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                 return_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, num_heads, q_len, head_dim = q.shape
        num_kv_heads = k.shape[1]
        if self.mask.nnz == 0:  # nothing to attend to anywhere (FlashInfer's plan needs one block)
            lse = torch.full((batch, num_heads, q_len), -math.inf, device=q.device) if return_lse else None
            return torch.zeros_like(q), lse
        padded = self.padded_q_len
        q_rows = q.contiguous()
        if padded != q_len:  # whole query blocks per head keep the folded block grid aligned
            q_rows = torch.zeros(batch, num_heads, padded, head_dim, dtype=q.dtype, device=q.device)
            q_rows[:, :, :q_len] = q
        out = torch.empty_like(q_rows)
        lse = torch.empty(batch, num_heads, padded, dtype=torch.float32, device=q.device) if return_lse else None
        wrapper = self._wrapper(q, num_kv_heads, scale)
        wrapper.run(q_rows.view(-1, 1, head_dim), k.contiguous().view(-1, 1, head_dim),
                    v.contiguous().view(-1, 1, head_dim), out=out.view(-1, 1, head_dim),
                    lse=None if lse is None else lse.view(-1, 1), return_lse=return_lse)
        if lse is not None:
            lse.mul_(math.log(2.0))                       # FlashInfer's LSE is base 2
        if self._empty_rows.any():
            if q.device not in self._empty_rows_on:
                self._empty_rows_on[q.device] = torch.from_numpy(self._empty_rows).to(q.device)
            empty = self._empty_rows_on[q.device]
            out.masked_fill_(empty[None, :, :, None], 0.0)
            if lse is not None:
                lse.masked_fill_(empty[None], -math.inf)
        if padded != q_len:
            out = out[:, :, :q_len].contiguous()
            lse = None if lse is None else lse[:, :, :q_len].contiguous()
        return out, lse
