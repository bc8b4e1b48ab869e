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
at most ``MAX_ROWS`` block rows (batch x heads x query blocks) per plan, and
``R >= 4``: below that the wrapper switches to its CUDA-core decode kernel, which on an
H100 (2026-11-22, flashinfer 0.6.1) returned wrong outputs for R=2 and faulted for R=3
(bench/results/cuda-2026-11-22-runs/flashinfer-edge-shapes.log). FlashInfer returns
a base-2 LSE; it is converted to natural log. Rows whose list is empty are set to
output 0 and LSE -inf after the call (FlashInfer does not document what it writes
there). Plans are built per (batch, dtype, head dim, scale, stream) on first use and reused, the
``PLANS_KEPT`` most recently used of them kept (a caller varying the scale must not pile them up).
Each CUDA stream gets its own plans and float workspace: where the prefill kernels behind the wrapper split
a row's keys, their partial outputs and LSEs live there (``batch_prefill_tmp_v`` / ``tmp_s``, FlashInfer's
``PrefillPlan`` in include/flashinfer/attention/scheduler.cuh), so calls on two streams must not share one;
the folded lists are built with torch ops on the device of the mask's lists
(FlashInfer's ``plan()`` then reads its row pointers on the host, as its API requires).
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass

import torch

from sparsecore.capabilities import Capabilities
from sparsecore.inputs import check_scale
from sparsecore.ir import BlockMask
from sparsecore.ir.memo import LruMemo
from sparsecore.launch_device import caller_stream
from sparsecore.registry import Backend, Run, UnsupportedError

from .positive_scale import positive_scale, run_scale

MAX_ROWS = 32768  # block rows of one plan: 12 heads x 2,949 64-token blocks failed on an H200 (issue 13)
PLANS_KEPT = 4   # planned wrappers a launch keeps: a pipeline's calls vary the batch (CFG on and off), rarely more;
#                  each holds an 8 MiB int workspace on the device, its pinned host copy and the folded lists
#                  (BlockSparseAttentionWrapper.__init__ and plan() in flashinfer/sparse.py)
WORKSPACE_BYTES = 128 << 20  # FlashInfer's recommended float workspace, shared by the plans of a device and stream
WORKSPACES_KEPT = 4          # (device, stream) workspaces kept for new plans (a plan holds its own)
_WORKSPACES = LruMemo(WORKSPACES_KEPT)


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
    slow_to_load = True     # its first run JIT-compiles its modules with nvcc: 84 s on a fresh H200 host (issue 13)
    capabilities = Capabilities(devices=("cuda",), array_type="torch", dtypes=frozenset({"float16", "bfloat16"}),
                                head_dims=frozenset({64, 128}), uniform_q_blocks=True, uniform_kv_blocks=True,
                                kv_len_divisible=True, min_q_block=4, max_rows=MAX_ROWS,
                                max_call_rows=MAX_ROWS)

    def unavailable_reason(self, device: str) -> str | None:
        if importlib.util.find_spec("flashinfer") is None:
            return "flashinfer is not installed"
        if not torch.cuda.is_available():
            return f"torch.cuda.is_available() is False in torch {torch.__version__}"
        major, minor = torch.cuda.get_device_capability(torch.device(device))
        if major < 8:
            return (f"compute capability {major}.{minor}: FlashInfer supports 7.5 and later without bfloat16 below 8.0, "
                    f"and this lowering was run on 8.0 and later only; the portable backend runs on this GPU")
        return None

    def preference(self, mask: BlockMask) -> int:
        from .selection import preference
        return preference(self.name, mask)

    def lower(self, mask: BlockMask, device: str, options: FlashInferOptions) -> Run:
        return FoldedHeadsLaunch(mask, options.variant)


class FoldedHeadsLaunch:
    """Run function of one mask: plans per (batch, dtype, head dim, scale, stream), then launches."""

    def __init__(self, mask: BlockMask, variant: str) -> None:
        self.mask = mask
        self.variant = variant
        self.q_block = mask.uniform_block_size("q")
        self.kv_block = mask.uniform_block_size("kv")
        self.padded_q_len = mask.num_q_blocks * self.q_block
        empty = mask.row_lengths == 0
        self._empty_rows = empty.repeat_interleave(self.q_block, dim=1) if bool(empty.any()) else None
        self._wrappers = LruMemo(PLANS_KEPT)                           # shared by threads sharing the launch

    def _folded_csr(self, batch: int, num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """indptr over rows (b, h, i) and indices into the block-diagonal key-block space (int32, on the device)."""
        mask = self.mask
        group = mask.num_heads // num_kv_heads
        device = mask.indptr.device
        lengths = mask.row_lengths.reshape(-1).repeat(batch)
        indptr = torch.zeros(len(lengths) + 1, dtype=torch.int64, device=device)
        torch.cumsum(lengths, 0, out=indptr[1:])
        per_head = (mask.indptr[:, -1] - mask.indptr[:, 0]).long()
        head_of_entry = torch.repeat_interleave(torch.arange(mask.num_heads, device=device), per_head,
                                                output_size=mask.nnz)
        batches = torch.arange(batch, device=device)[:, None]
        folded = (batches * num_kv_heads + head_of_entry // group) * mask.num_kv_blocks + mask.indices.long()
        return indptr.to(torch.int32), folded.reshape(-1).to(torch.int32)

    def _wrapper(self, q: torch.Tensor, num_kv_heads: int, scale: float):
        """The planned wrapper of calls like this one: kept from an earlier call (now the most recently used), or
        planned here, evicting the least recently used past ``PLANS_KEPT``."""
        stream = caller_stream(q)                   # None off CUDA
        key = (q.shape[0], num_kv_heads, q.dtype, q.shape[-1], scale, q.device, stream)
        return self._wrappers.get(key, lambda: self._planned(q, num_kv_heads, scale, stream))

    def _planned(self, q: torch.Tensor, num_kv_heads: int, scale: float, stream: torch.cuda.Stream | None):
        """A new wrapper planned for calls like this one on ``stream`` (heads folded into rows: the module
        docstring), over that stream's float workspace."""
        import flashinfer
        batch, num_heads, _, head_dim = q.shape
        workspace = _WORKSPACES.get((q.device, stream),
                                    lambda: torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=q.device))
        wrapper = flashinfer.BlockSparseAttentionWrapper(workspace, backend=self.variant)
        indptr, indices = self._folded_csr(batch, num_kv_heads)
        wrapper.plan(indptr, indices,
                     M=batch * num_heads * self.padded_q_len, N=batch * num_kv_heads * self.mask.kv_len,
                     R=self.q_block, C=self.kv_block, num_qo_heads=1, num_kv_heads=1, head_dim=head_dim,
                     sm_scale=scale, q_data_type=q.dtype, kv_data_type=q.dtype, o_data_type=q.dtype)
        return wrapper

    def prepare(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> None:
        """Plan the wrapper a call with these inputs and ``scale`` (None: the default, as a call computes it) would
        use."""
        if self.mask.nnz:
            self._wrapper(q, k.shape[1], run_scale(check_scale(scale, q.shape[-1])))

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                 return_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, num_heads, q_len, head_dim = q.shape
        num_kv_heads = k.shape[1]
        if batch * num_heads * self.mask.num_q_blocks > MAX_ROWS:
            raise UnsupportedError(f"flashinfer: batch x heads x query blocks = {batch} x {num_heads} x "
                                   f"{self.mask.num_q_blocks} exceeds the {MAX_ROWS:,} block rows one plan takes; "
                                   f"split the batch, or compile with backend=None or 'triton'")
        if self.mask.nnz == 0:  # nothing to attend to anywhere (FlashInfer's plan needs one block)
            lse = torch.full((batch, num_heads, q_len), -math.inf, dtype=torch.float32, device=q.device) \
                if return_lse else None
            return torch.zeros(*q.shape[:3], v.shape[-1], dtype=q.dtype, device=q.device), lse
        q, scale = positive_scale(q, scale)              # FlashInfer gave NaN at -20, a wrong output at 0 (H200)
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
        if self._empty_rows is not None:
            empty = self._empty_rows
            out.masked_fill_(empty[None, :, :, None], 0.0)
            if lse is not None:
                lse.masked_fill_(empty[None], -math.inf)
        if padded != q_len:
            out = out[:, :, :q_len].contiguous()
            lse = None if lse is None else lse[:, :, :q_len].contiguous()
        return out, lse
