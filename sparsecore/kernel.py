"""``sparsecore.compile``: lower a mask once, cache the result, check every call's inputs.

Calling convention (all backends): ``out = kernel(q, k, v, scale=None)`` or
``out, lse = kernel(q, k, v, return_lse=True)`` with q ``[B, H, q_len, D]`` and
k, v ``[B, H_kv, kv_len, D]``, ``H % H_kv == 0``; query head ``h`` reads key head
``h // (H // H_kv)``. ``scale`` defaults to ``1/sqrt(D)``. A query row whose list is
empty gives output 0 and LSE -inf; LSE is natural-log float32 ``[B, H, q_len]``.
"""

from __future__ import annotations

import math
import numbers
from collections import OrderedDict
from typing import Any, Hashable

from sparsecore.ir import BlockMask

from .registry import Backend, Run, UnsupportedError, select

CACHE_SIZE = 64  # compiled kernels kept; masks change per layer and step, so the cache is bounded
_CACHE: "OrderedDict[tuple, CompiledKernel]" = OrderedDict()


class CompiledKernel:
    """A mask lowered for one device by one backend; call it like attention."""

    def __init__(self, mask: BlockMask, device: str, backend: Backend, options: Hashable, run: Run) -> None:
        self.mask = mask
        self.device = device
        self.backend = backend
        self.options = options
        self._run = run

    def __call__(self, q: Any, k: Any, v: Any, scale: float | None = None, return_lse: bool = False) -> Any:
        head_dim = check_inputs(self, q, k, v, return_lse)
        scale = check_scale(scale, head_dim)
        out, lse = self._run(q, k, v, scale, return_lse)
        return (out, lse) if return_lse else out

    def __repr__(self) -> str:
        return f"CompiledKernel(backend={self.backend.name!r}, device={self.device!r}, mask={self.mask!r})"


def compile(mask: BlockMask, device: str = "cpu", backend: str | None = None, **options: Any) -> CompiledKernel:
    """Lower ``mask`` for ``device`` and return a callable kernel.

    Args:
        mask: the block-mask IR.
        device: ``"reference"`` (NumPy float64 spec), ``"cpu"``, ``"cuda"`` (or ``"cuda:N"``), ``"npu"``.
        backend: a registered backend name, or None for the preferred one that can take ``mask``.
        **options: backend-specific options (see each backend's options dataclass).

    Kernels are cached by ``mask.fingerprint()`` and the arguments, so compiling the
    same pattern again (next layer, next step) costs a dict lookup and no backend probing.

    Raises:
        ValueError: unknown device or backend name.
        UnsupportedError: the named backend (or every available one) cannot take this mask.
        RuntimeError: the device is known but no backend for it can run here (says why).
        TypeError: ``mask`` is not a BlockMask, or an unknown option.
    """
    if not isinstance(mask, BlockMask):
        raise TypeError(f"mask: expected a sparsecore.ir.BlockMask, got {type(mask).__name__}")
    request = (mask.fingerprint(), device, backend, tuple(sorted(options.items())))
    try:
        cached = _CACHE.get(request)
    except TypeError:  # an unhashable option value
        raise TypeError(f"compile(): options must be plain values (int, float, str, bool, None), got "
                        f"{ {k: type(v).__name__ for k, v in options.items()} }") from None
    if cached is not None:  # the per-layer, per-step path: no backend probing
        _CACHE.move_to_end(request)
        return cached
    chosen = select(mask, device, backend)
    parsed = chosen.parse_options(options)
    kernel = CompiledKernel(mask, device, chosen, parsed, chosen.lower(mask, device, parsed))
    _CACHE[request] = kernel
    if len(_CACHE) > CACHE_SIZE:
        _CACHE.popitem(last=False)
    return kernel


def clear_cache() -> None:
    """Forget every compiled kernel (frees plans and device buffers they hold)."""
    _CACHE.clear()


def check_scale(scale: Any, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale: expected a float or None (for 1/sqrt(D)), got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite float, got {scale}")
    return float(scale)


def check_inputs(kernel: CompiledKernel, q: Any, k: Any, v: Any, return_lse: bool) -> int:
    """Validate q, k, v against the mask and the backend's capabilities; returns the head dim."""
    caps = kernel.backend.capabilities
    mask = kernel.mask
    for name, t in (("q", q), ("k", k), ("v", v)):
        if _array_type(t) != caps.array_type:
            hint = " (convert with .numpy())" if caps.array_type == "numpy" else " (convert with torch.from_numpy)"
            raise TypeError(f"{name}: backend {kernel.backend.name!r} takes {caps.array_type} arrays, "
                            f"got {type(t).__name__}{hint}")
        if len(t.shape) != 4:
            raise ValueError(f"{name}: expected 4 dimensions [B, heads, length, head_dim], got shape {list(t.shape)}")
    batch, num_heads, q_len, head_dim = q.shape
    if num_heads != mask.num_heads or q_len != mask.q_len:
        raise ValueError(f"q: expected [B, {mask.num_heads}, {mask.q_len}, D] to match the mask "
                         f"(num_heads={mask.num_heads}, q_len={mask.q_len}), got {list(q.shape)}")
    if tuple(k.shape) != tuple(v.shape):
        raise ValueError(f"k, v: expected the same shape, got k {list(k.shape)} and v {list(v.shape)}")
    if k.shape[0] != batch or k.shape[2] != mask.kv_len or k.shape[3] != head_dim:
        raise ValueError(f"k: expected [{batch}, H_kv, {mask.kv_len}, {head_dim}] (batch and head_dim of q, "
                         f"kv_len={mask.kv_len} of the mask), got {list(k.shape)}")
    num_kv_heads = k.shape[1]
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"k: the number of key heads must divide the query heads ({num_heads}), got {num_kv_heads}")
    if batch < 1 or head_dim < 1:
        raise ValueError(f"q: expected batch >= 1 and head_dim >= 1, got shape {list(q.shape)}")
    dtypes = {_dtype_name(t) for t in (q, k, v)}
    if len(dtypes) != 1:
        raise TypeError(f"q, k, v: expected one dtype, got {_dtype_name(q)}, {_dtype_name(k)}, {_dtype_name(v)}")
    if caps.array_type == "torch":
        devices = {t.device for t in (q, k, v)}
        if len(devices) != 1:
            raise ValueError(f"q, k, v: expected one device, got {[str(t.device) for t in (q, k, v)]}")
        problem = kernel.backend.tensor_device_problem(kernel.device, q.device.type)
        if problem:
            raise ValueError(f"q: {problem}; move them with .to({kernel.device!r}) or compile for their device")
    problems = caps.tensor_problems(dtypes.pop(), head_dim, num_heads, num_kv_heads, return_lse)
    if problems:
        raise UnsupportedError(f"backend {kernel.backend.name!r} cannot run these inputs: {'; '.join(problems)}")
    return head_dim


def _array_type(t: Any) -> str:
    module = type(t).__module__.split(".")[0]
    return {"numpy": "numpy", "torch": "torch"}.get(module, module)


def _dtype_name(t: Any) -> str:
    return str(t.dtype).removeprefix("torch.")
