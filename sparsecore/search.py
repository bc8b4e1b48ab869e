"""Block attention mass, the search kernel of AdaSpa's Fused LSE-Cached Search.

Paper: AdaSpa, arXiv 2502.21079, Sec. 4.2, Alg. 1-2 (no official code is public).
For query block ``p`` and key block ``q`` of each head::

    mass[b, h, p, q] = sum_{i in Q_p, j in K_q} exp(scale * q_i . k_j - lse_i)

With the current row log-sum-exp (``lse=None``: computed here, "pass 1") the masses
are exact softmax masses and each row ``mass[b, h, p, :]`` sums to the number of query
tokens in block ``p``. With an LSE cached from an earlier step ("LSE-cached search",
only pass 2 runs) they are approximate. The papers' ``Log(qk - LSE)`` in Alg. 1 line
18 / Alg. 2 line 7 is read as ``exp(qk * scale - LSE)`` (Eqs. 3-5).

One function, :func:`block_mass`, runs the pass of the first backend whose
:class:`~sparsecore.registry.BlockMassOp` takes the inputs (the Triton kernel on CUDA),
else ``torch_block_mass`` on any torch device, in steps of keys x query rows: memory is the
``[B, H, MB, NB]`` result plus a step's ``max_elements`` converted keys and scores. A fresh LSE ("pass 1") comes from
:func:`dense_attention`. AdaSpa's first search step as the paper runs it (``first_search="fused"``)
needs the dense output as well:
:func:`dense_attention_with_mass` gives output, LSE and exact masses from a backend's
single pass where one takes the inputs (Triton on CUDA: the online softmax's per-block
sums kept until the LSE is known), else from the two passes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sparsecore.ir import BlockMask
from sparsecore.ir.uploads import queued
from sparsecore.ir.validation import check_int

from .inputs import attention_shape, check_scale
from .launch_device import on_device_of, without_autocast
from .no_backward import inference_only
from .registry import BlockMassOp, DenseOp, registered_backends


_FASTER: ContextVar[bool] = ContextVar("sparsecore_faster_dense", default=True)


@contextlib.contextmanager
def faster_dense_allowed(allowed: bool) -> Iterator[None]:
    """Within the block, :func:`dense_attention` (a method's own LSE passes too, :func:`dense_lse`) takes the
    backends' faster dense ops only if ``allowed`` (``apply(..., dense_attention=...)``); outside, it takes them."""
    token = _FASTER.set(bool(allowed))
    try:
        yield
    finally:
        _FASTER.reset(token)


@dataclass(frozen=True)
class BlockMass:
    """``mass`` float32 ``[B, H, MB, NB]``, ``lse`` float32 ``[B, H, L_q]``, and which implementation ran."""

    mass: torch.Tensor
    lse: torch.Tensor
    impl: str


def block_mass_ops() -> dict[str, BlockMassOp]:
    """Every registered backend's block-mass operation, by backend name."""
    return {name: b.block_mass for name, b in registered_backends().items() if b.block_mass is not None}


def block_mass(q: torch.Tensor, k: torch.Tensor, q_offsets: Any, kv_offsets: Any, lse: torch.Tensor | None = None,
               scale: float | None = None, *, visible: Any = None, impl: str = "auto",
               max_elements: int = 1 << 24) -> BlockMass:
    """Softmax attention mass per (query block, key block) of each head.

    Args:
        q: ``[B, H, L_q, D]``; k: ``[B, H_kv, L_kv, D]`` with ``H % H_kv == 0``; one device.
        q_offsets, kv_offsets: block boundaries (IR offset arrays) ending at L_q and L_kv.
        lse: natural-log float32 ``[B, H, L_q]`` as returned by ``kernel(q, k, v, return_lse=True)``
            of a dense mask; None computes it (exact masses). A cached older LSE gives
            AdaSpa's approximate cached-search masses.
        scale: softmax scale, default ``1 / sqrt(D)``.
        visible: None (every key block), or int ``[MB]`` on the host: query block i sees the first
            ``visible[i]`` key blocks (frame-causal attention, :mod:`sparsecore.methods.causal`); the
            masses of the others are 0, and a backend skips their scores. Give ``lse`` over the same keys
            (all of them where every count is NB: the plain pass).
        impl: ``"auto"`` (the implementation registered for q's device type if it takes
            the inputs, else torch), ``"torch"``, or a registered implementation's name.
        max_elements: converted keys, and scores, held at once by the torch implementation.

    Returns:
        :class:`BlockMass` with ``mass`` float32 ``[B, H, MB, NB]`` and the ``lse`` used.
    """
    q_offsets, kv_offsets = _offsets(q_offsets, "q_offsets"), _offsets(kv_offsets, "kv_offsets")
    _check_inputs(q, k, q_offsets, kv_offsets, lse)
    visible = _visible(visible, len(q_offsets) - 1, len(kv_offsets) - 1)
    check_int(max_elements, "max_elements", 1)
    scale = q.shape[-1] ** -0.5 if scale is None else check_scale(scale, q.shape[-1])
    if visible is not None and lse is None:
        raise ValueError("lse: expected the LSE over the keys each row sees when visible is given, got None; pass "
                         "the LSE of attention under the same visibility")
    name = _choose(q, k, q_offsets, kv_offsets, impl)
    if lse is None:
        lse = dense_lse(q, k, scale)                                # pass 1
    op = None if name == "torch" else block_mass_ops()[name]
    takes_visible = visible is not None and op is not None and op.takes_visible
    if op is None:
        with without_autocast(q):        # float32 scores, whatever autocast the caller runs under
            mass = torch_block_mass(q, k, q_offsets, kv_offsets, lse, scale, max_elements=max_elements)
    else:
        extra = {"visible": visible} if takes_visible else {}
        with on_device_of(q):            # the kernels record no gradient: a backward through them raises
            mass = inference_only(f"{name}'s block-mass pass",
                                  lambda: op.run(q, k, q_offsets, kv_offsets, lse, scale, **extra), q, k, lse)
    if visible is not None and not takes_visible:            # every block scored: the later ones zeroed
        hidden = np.arange(len(kv_offsets) - 1)[None, :] >= visible[:, None]
        mass = mass.masked_fill(queued(hidden, mass.device), 0.0)
    return BlockMass(mass, lse, name)


def _visible(value: Any, num_q_blocks: int, num_kv_blocks: int) -> np.ndarray | None:
    """``visible`` checked, int64 on the host; None where every count is NB (the plain pass). A device tensor is
    refused, not read back: the counts build host tables (the kernels' segments or tiles)."""
    if value is None:
        return None
    remedy = "pass sparsecore.methods.causal.visible_counts(geometry, offsets)"
    if isinstance(value, torch.Tensor) and value.device.type != "cpu":
        raise TypeError(f"visible: expected host integers (NumPy, a list or a CPU tensor), got a tensor on "
                        f"{value.device}; {remedy}")
    arr = np.asarray(value)
    values = f" holding {arr.min()}..{arr.max()}" if arr.size and np.issubdtype(arr.dtype, np.integer) else ""
    if arr.shape != (num_q_blocks,) or not np.issubdtype(arr.dtype, np.integer) or \
            (arr.size and (arr.min() < 0 or arr.max() > num_kv_blocks)):
        raise ValueError(f"visible: expected None or integers in [0, {num_kv_blocks}] per query block "
                         f"[{num_q_blocks}], got {arr.dtype} {list(arr.shape)}{values}; {remedy}")
    return None if (arr == num_kv_blocks).all() else arr.astype(np.int64)        # every block: the plain pass


def dense_attention_with_mass(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offsets: Any, kv_offsets: Any,
                              scale: float | None = None, *, impl: str = "auto") -> tuple[torch.Tensor, BlockMass]:
    """Dense attention ``[B, H, L_q, D]`` and the exact block masses of the same scores (AdaSpa's fused first search).

    Arguments as :func:`block_mass` plus ``v [B, H_kv, L_kv, D]``. With ``impl="auto"`` a registered
    backend's fused pass (``BlockMassOp.with_output``) where it takes the inputs; otherwise
    :func:`dense_attention` for the output and LSE, then :func:`block_mass` on that LSE.
    ``BlockMass.impl`` names what ran (``"<backend> fused"`` for the one-pass path).
    """
    q_offsets, kv_offsets = _offsets(q_offsets, "q_offsets"), _offsets(kv_offsets, "kv_offsets")
    _check_inputs(q, k, q_offsets, kv_offsets, None)
    attention_shape(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else check_scale(scale, q.shape[-1])
    name = _choose(q, k, q_offsets, kv_offsets, impl)
    op = block_mass_ops().get(name)
    if op is not None and op.with_output is not None and op.with_output_supports(q, k, v, q_offsets,
                                                                                  kv_offsets) is None:
        with on_device_of(q):
            out, lse, mass = inference_only(f"{name}'s fused search pass",
                                            lambda: op.with_output(q, k, v, q_offsets, kv_offsets, scale), q, k, v)
        return out, BlockMass(mass, lse, f"{name} fused")
    out, lse = dense_attention(q, k, v, scale)
    return out, block_mass(q, k, q_offsets, kv_offsets, lse, scale, impl=name)


def _choose(q: torch.Tensor, k: torch.Tensor, q_offsets: np.ndarray, kv_offsets: np.ndarray, impl: str) -> str:
    """The implementation's name: a backend's whose operation takes the inputs, or ``"torch"``."""
    if impl == "torch":
        return impl
    ops = block_mass_ops()
    if impl == "auto":
        return next((name for name, op in ops.items() if op.supports(q, k, q_offsets, kv_offsets) is None), "torch")
    if impl not in ops:
        raise ValueError(f"impl={impl!r} is not registered; choose 'auto', 'torch' or one of {sorted(ops)}")
    reason = ops[impl].supports(q, k, q_offsets, kv_offsets)
    if reason:
        raise ValueError(f"impl={impl!r} cannot take these inputs: {reason}; use impl='torch' or 'auto'")
    return impl


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention and its natural-log float32 LSE ``[B, H, L_q]``, on q's device.

    The first that takes the inputs: a registered backend's :class:`~sparsecore.registry.DenseOp`
    (on an H200, FlashAttention-4's dense forward, measured 1.09-1.30x cuDNN's: ``backends/cuda/fa4_dense.py``);
    on CUDA, where its cuDNN kernel takes the inputs (fp16/bf16, head dim a multiple of 8 up to 128, and torch's
    ``can_use_cudnn_attention`` on the call's tensors: :func:`cudnn_or_full_mask`), torch's
    ``_scaled_dot_product_cudnn_attention`` with ``compute_log_sumexp`` (the kernel the model's own SDPA runs, the
    LSE at no extra cost); elsewhere sparsecore's kernel for a full mask (one block per side). :func:`dense_impl`
    names which; inside ``faster_dense_allowed(False)`` the backends' dense ops are skipped (cuDNN first).
    """
    shape = attention_shape(q, k, v)
    scale = check_scale(scale, shape.head_dim)
    impl = dense_impl(q, k, v)
    if impl == "cudnn":
        if shape.group > 1:
            k, v = (t.repeat_interleave(shape.group, dim=1) for t in (k, v))
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False,
                                                                      scale=scale)[:2]
        return out, lse.reshape(shape.batch, shape.num_heads, shape.q_len).float()
    if impl == "full mask":
        from .kernel import compile
        full = BlockMask.full(shape.num_heads, shape.q_len, shape.kv_len, shape.q_len, shape.kv_len)
        return compile(full, device=q.device.type)(q, k, v, scale=scale, return_lse=True)
    op = registered_backends()[impl].dense
    return inference_only(f"{impl}'s dense attention", lambda: op.run(q, k, v, scale, True), q, k, v)


def dense_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """What :func:`dense_attention` runs for these inputs: a backend's name (its faster dense op, unless inside
    ``faster_dense_allowed(False)``), ``"cudnn"`` or ``"full mask"``."""
    found = faster_dense(q, k, v) if _FASTER.get() else None
    if found is not None:
        return found[0]
    return cudnn_or_full_mask(q.is_cuda, q.dtype, q.shape[-1], torch.backends.cuda.cudnn_sdp_enabled(),
                              lambda: cudnn_takes(q, k, v))


def cudnn_or_full_mask(is_cuda: bool, dtype: torch.dtype, head_dim: int, enabled: bool,
                       torch_takes: Callable[[], bool]) -> str:
    """``"cudnn"`` where torch's cuDNN attention runs the dense pass, else ``"full mask"``: CUDA, fp16/bf16, a head
    dim that is a multiple of 8 up to 128 (the range tested here), cuDNN SDPA enabled, and torch's own verdict
    (``torch_takes``, asked last: it sees the GPU, the cuDNN version, strides). Each fact alone can refuse."""
    if is_cuda and dtype in (torch.float16, torch.bfloat16) and head_dim % 8 == 0 and head_dim <= 128 and enabled:
        return "cudnn" if torch_takes() else "full mask"
    return "full mask"


def cudnn_takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """torch's ``can_use_cudnn_attention`` on what :func:`dense_attention` hands
    ``_scaled_dot_product_cudnn_attention``: no mask, no dropout, not causal, and for GQA keys and values repeated to
    every query head (contiguous, as ``repeat_interleave`` gives them). The check reads shapes, strides, dtype and
    device only, so a GQA call asks on a stand-in of the repeated shape: q itself where it has that shape, dtype and
    contiguous strides (self-attention: nothing allocated, where an uninitialised stand-in took as much memory as
    the repeated keys), else an uninitialised tensor freed before the repeat."""
    verdict = getattr(torch.backends.cuda, "can_use_cudnn_attention", None)
    if verdict is None:                   # a torch without it (pyproject allows 2.4): the facts checked stand
        return True
    if k.shape[1] != q.shape[1]:
        shape = (k.shape[0], q.shape[1], *k.shape[2:])
        same = q.shape == shape and q.dtype == k.dtype and q.is_contiguous()
        k = v = q if same else torch.empty(shape, dtype=k.dtype, device=k.device)
    try:
        params = torch.backends.cuda.SDPAParams(q, k, v, None, 0.0, False, False)     # enable_gqa False: repeated
    except TypeError:                     # torch 2.4's SDPAParams has no enable_gqa
        params = torch.backends.cuda.SDPAParams(q, k, v, None, 0.0, False)
    return bool(verdict(params, False))


def faster_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[str, DenseOp] | None:
    """``(backend name, op)`` of the first registered :class:`~sparsecore.registry.DenseOp` that takes these
    ``[B, H, L, D]`` inputs on their device (measured faster than cuDNN there), or None."""
    for name, backend in registered_backends().items():
        if backend.dense is not None and q.device.type in backend.capabilities.devices \
                and backend.dense.supports(q, k, v) is None:
            return name, backend.dense
    return None


def dense_lse(q: torch.Tensor, k: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """The natural-log float32 LSE ``[B, H, L_q]`` of dense attention of q over k (one dense pass, its output
    dropped: the keys stand in for the values, which the LSE does not read)."""
    return dense_attention(q, k, k, scale)[1]


def torch_block_mass(q: torch.Tensor, k: torch.Tensor, q_offsets: np.ndarray, kv_offsets: np.ndarray,
                     lse: torch.Tensor, scale: float, *, max_elements: int = 1 << 24) -> torch.Tensor:
    """The portable pass: steps of keys x query rows through all heads, fp32 (fp64 for fp64 inputs);
    ``mass [B, H, MB, NB]``.

    ``max_elements`` bounds a step's converted keys and its scores (:func:`mass_steps`): at Wan 6x a batch element's
    keys whole in float32 were 1.16 GB, a step's are at most 64 MiB. A GQA group's query heads read their key
    head's keys, not a copy each."""
    batch, heads, q_len, head_dim = q.shape
    num_kv_heads, kv_len = k.shape[1], k.shape[2]
    group, device = heads // num_kv_heads, q.device
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    num_q_blocks, num_kv_blocks = len(q_offsets) - 1, len(kv_offsets) - 1
    q_block = queued(np.repeat(np.arange(num_q_blocks), np.diff(q_offsets)), device)
    kv_sizes = np.diff(kv_offsets)
    uniform = int(kv_sizes[0]) if (kv_sizes[:-1] == kv_sizes[0]).all() and kv_sizes[-1] <= kv_sizes[0] else None
    kv_block_of = np.repeat(np.arange(num_kv_blocks), kv_sizes)
    kv_block = queued(kv_block_of, device)
    rows_per_step, keys_per_step = mass_steps(heads, num_kv_heads, kv_len, head_dim, max_elements, uniform)
    if uniform is not None and keys_per_step < kv_len and keys_per_step % uniform:
        uniform = None                                  # a block wider than a step's keys: summed by block index
    mass = torch.zeros(batch, heads, num_q_blocks, num_kv_blocks, dtype=compute, device=device)
    for b in range(batch):
        for key_start in range(0, kv_len, keys_per_step):
            cols = slice(key_start, min(kv_len, key_start + keys_per_step))
            keys = k[b, :, cols].to(compute).transpose(1, 2)                             # [H_kv, D, c_kv]
            first, last = int(kv_block_of[cols.start]), int(kv_block_of[cols.stop - 1]) + 1     # blocks it touches
            for start in range(0, q_len, rows_per_step):
                rows = slice(start, min(q_len, start + rows_per_step))
                queries = q[b, :, rows].to(compute).unflatten(0, (num_kv_heads, group))      # [H_kv, G, c, D]
                scores = (torch.matmul(queries.flatten(1, 2), keys) * scale).unflatten(1, queries.shape[1:3]) \
                    .flatten(0, 1)                                                   # [H, c, c_kv]
                row_lse = lse[b, :, rows].to(compute)
                infinite = torch.isinf(row_lse)                      # such rows add nothing; NaN rows stay NaN
                probs = torch.exp(scores - torch.where(infinite, float("inf"), row_lse)[..., None])
                if uniform is not None:                      # steps start on a block: pad keys to whole blocks
                    pad = (last - first) * uniform - probs.shape[-1]
                    probs = torch.nn.functional.pad(probs, (0, pad)).unflatten(-1, (last - first, uniform)).sum(-1)
                else:
                    probs = torch.zeros(*probs.shape[:2], last - first, dtype=compute, device=device).index_add_(
                        2, kv_block[cols] - first, probs)
                mass[b, :, :, first:last].index_add_(1, q_block[rows], probs)
    return mass.float()


def mass_steps(heads: int, num_kv_heads: int, kv_len: int, head_dim: int, max_elements: int,
               block: int | None) -> tuple[int, int]:
    """(query rows, keys) a step of :func:`torch_block_mass` takes: its converted keys ``num_kv_heads x keys x
    head_dim`` and its scores ``heads x rows x keys`` each within ``max_elements`` (their exponentials and block sums
    as many again), keys in whole ``block``s where one fits; at least one row and one key (or block)."""
    keys = min(kv_len, max(1, max_elements // max(num_kv_heads * head_dim, heads)))     # a row's scores fit too
    if block is not None and block <= keys < kv_len:
        keys -= keys % block
    return max(1, max_elements // (heads * keys)), keys


def _offsets(value: Any, field: str) -> np.ndarray:
    arr = np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value)
    if arr.ndim != 1 or arr.size < 2 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{field}: expected integer block boundaries [0, ..., length], got {arr!r}")
    arr = arr.astype(np.int64)
    if arr[0] != 0 or (np.diff(arr) <= 0).any():
        raise ValueError(f"{field}: expected strictly increasing boundaries starting at 0, got {arr.tolist()[:8]}...")
    return arr


def _check_inputs(q: Any, k: Any, q_offsets: np.ndarray, kv_offsets: np.ndarray, lse: Any) -> None:
    shape = attention_shape(q, k)
    if not q.is_floating_point():
        raise TypeError(f"q, k: expected float tensors, got {q.dtype}")
    if q_offsets[-1] != shape.q_len or kv_offsets[-1] != shape.kv_len:
        raise ValueError(f"q_offsets / kv_offsets: expected to end at L_q={shape.q_len} and L_kv={shape.kv_len}, "
                         f"got {q_offsets[-1]} and {kv_offsets[-1]}")
    if lse is not None:
        if not isinstance(lse, torch.Tensor) or tuple(lse.shape) != tuple(q.shape[:3]) or lse.device != q.device:
            raise ValueError(f"lse: expected a float32 tensor [B, H, L_q] = {list(q.shape[:3])} on {q.device} "
                             f"(kernel(q, k, v, return_lse=True)), got {getattr(lse, 'shape', type(lse).__name__)}")
        if lse.dtype != torch.float32:
            raise TypeError(f"lse: expected float32 natural-log LSE, got {lse.dtype} (use lse.float())")
