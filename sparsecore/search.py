"""Block attention mass, the search kernel of AdaSpa's Fused LSE-Cached Search.

Paper: AdaSpa, arXiv 2502.21079, Sec. 4.2, Alg. 1-2 (no official code is public).
For query block ``p`` and key block ``q`` of each head::

    mass[b, h, p, q] = sum_{i in Q_p, j in K_q} exp(scale * q_i . k_j - lse_i)

With the current row log-sum-exp (``lse=None``: computed here, "pass 1") the masses
are exact softmax masses and each row ``mass[b, h, p, :]`` sums to the number of query
tokens in block ``p``. With an LSE cached from an earlier step ("LSE-cached search",
only pass 2 runs) they are approximate. The papers' ``Log(qk - LSE)`` in Alg. 1 line
18 / Alg. 2 line 7 is read as ``exp(qk * scale - LSE)`` (Eqs. 3-5).

One function, :func:`block_mass`, dispatches to an implementation per device type.
``torch_block_mass`` runs on any torch device in query chunks: memory is the
``[B, H, MB, NB]`` result plus ``max_elements`` scores. A device lowering plugs a
faster one in with :func:`register_block_mass` when its backend package is imported
(this module never imports a device library; :func:`block_mass` imports the built-in
backend packages through ``sparsecore.registry`` first, so a registration in
``backends/cuda/__init__.py`` is found without the caller importing it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

# run(q, k, q_offsets, kv_offsets, lse, scale) -> (mass float32 [B, H, MB, NB], lse float32 [B, H, L_q])
#   q [B, H, L_q, D], k [B, H_kv, L_kv, D] on one device; q_offsets / kv_offsets: numpy int64 block
#   boundaries; lse: natural-log float32 [B, H, L_q] on q's device, or None to compute it (pass 1).
BlockMassRun = Callable[[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray, "torch.Tensor | None", float],
                        "tuple[torch.Tensor, torch.Tensor]"]
# supports(q, k, q_offsets, kv_offsets) -> None if the implementation takes these inputs, else why not.
BlockMassSupports = Callable[[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray], "str | None"]


@dataclass(frozen=True)
class BlockMassImpl:
    """A registered block-mass implementation for one device type (``"cuda"``, ``"npu"``...)."""

    name: str
    device_type: str
    run: BlockMassRun
    supports: BlockMassSupports | None = None


@dataclass(frozen=True)
class BlockMass:
    """``mass`` float32 ``[B, H, MB, NB]``, ``lse`` float32 ``[B, H, L_q]``, and which implementation ran."""

    mass: torch.Tensor
    lse: torch.Tensor
    impl: str


_IMPLS: dict[str, BlockMassImpl] = {}


def register_block_mass(device_type: str, run: BlockMassRun, *, name: str,
                        supports: BlockMassSupports | None = None) -> BlockMassImpl:
    """Register the block-mass implementation used for tensors on ``device_type`` (one per type).

    Call it from a backend package's ``__init__`` without importing the device library
    there (import it inside ``run``). ``supports`` lets :func:`block_mass` fall back to
    the torch implementation, naming the reason, for inputs the kernel cannot take.
    """
    if not isinstance(device_type, str) or not device_type or ":" in device_type:
        raise ValueError(f"device_type: expected a torch device type such as 'cuda', got {device_type!r}")
    if not callable(run) or (supports is not None and not callable(supports)):
        raise TypeError("register_block_mass: run (and supports, if given) must be callable")
    if not isinstance(name, str) or not name or name == "torch":
        raise ValueError(f"name: expected a non-empty name other than 'torch' (the built-in), got {name!r}")
    existing = _IMPLS.get(device_type)
    if existing is not None and existing.name != name:
        raise ValueError(f"register_block_mass: {device_type!r} already has implementation {existing.name!r}")
    impl = BlockMassImpl(name, device_type, run, supports)
    _IMPLS[device_type] = impl
    return impl


def block_mass_impls() -> dict[str, BlockMassImpl]:
    """Registered implementations by device type (after loading the built-in backend packages)."""
    from .registry import registered_backends
    registered_backends()  # imports sparsecore.backends.*, which register theirs
    return dict(_IMPLS)


def block_mass(q: torch.Tensor, k: torch.Tensor, q_offsets: Any, kv_offsets: Any, lse: torch.Tensor | None = None,
               scale: float | None = None, *, impl: str = "auto", max_elements: int = 1 << 24) -> BlockMass:
    """Softmax attention mass per (query block, key block) of each head.

    Args:
        q: ``[B, H, L_q, D]``; k: ``[B, H_kv, L_kv, D]`` with ``H % H_kv == 0``; one device.
        q_offsets, kv_offsets: block boundaries (IR offset arrays) ending at L_q and L_kv.
        lse: natural-log float32 ``[B, H, L_q]`` as returned by ``kernel(q, k, v, return_lse=True)``
            of a dense mask; None computes it (exact masses). A cached older LSE gives
            AdaSpa's approximate cached-search masses.
        scale: softmax scale, default ``1 / sqrt(D)``.
        impl: ``"auto"`` (the implementation registered for q's device type if it takes
            the inputs, else torch), ``"torch"``, or a registered implementation's name.
        max_elements: scores held at once by the torch implementation.

    Returns:
        :class:`BlockMass` with ``mass`` float32 ``[B, H, MB, NB]`` and the ``lse`` used.
    """
    q_offsets, kv_offsets = _offsets(q_offsets, "q_offsets"), _offsets(kv_offsets, "kv_offsets")
    _check_inputs(q, k, q_offsets, kv_offsets, lse)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite float, got {scale}")
    chosen = _choose(q, k, q_offsets, kv_offsets, impl)
    if chosen is None:
        mass, lse = torch_block_mass(q, k, q_offsets, kv_offsets, lse, scale, max_elements=max_elements)
        return BlockMass(mass, lse, "torch")
    mass, lse = chosen.run(q, k, q_offsets, kv_offsets, lse, scale)
    return BlockMass(mass, lse, chosen.name)


def _choose(q: torch.Tensor, k: torch.Tensor, q_offsets: np.ndarray, kv_offsets: np.ndarray,
            impl: str) -> BlockMassImpl | None:
    if impl == "torch":
        return None
    impls = block_mass_impls()
    if impl == "auto":
        chosen = impls.get(q.device.type)
        if chosen is None or (chosen.supports is not None and chosen.supports(q, k, q_offsets, kv_offsets)):
            return None
        return chosen
    by_name = {i.name: i for i in impls.values()}
    if impl not in by_name:
        raise ValueError(f"impl={impl!r} is not registered; choose 'auto', 'torch' or one of {sorted(by_name)}")
    chosen = by_name[impl]
    if chosen.device_type != q.device.type:
        raise ValueError(f"impl={impl!r} runs on {chosen.device_type!r} tensors, got tensors on {q.device.type!r}")
    reason = chosen.supports(q, k, q_offsets, kv_offsets) if chosen.supports is not None else None
    if reason:
        raise ValueError(f"impl={impl!r} cannot take these inputs: {reason}; use impl='torch' or 'auto'")
    return chosen


def torch_block_mass(q: torch.Tensor, k: torch.Tensor, q_offsets: np.ndarray, kv_offsets: np.ndarray,
                     lse: torch.Tensor | None, scale: float, *,
                     max_elements: int = 1 << 24) -> tuple[torch.Tensor, torch.Tensor]:
    """The portable implementation: query chunks through all heads, fp32 (fp64 for fp64 inputs)."""
    batch, heads, q_len, _ = q.shape
    kv_len, group = k.shape[2], heads // k.shape[1]
    device = q.device
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    num_q_blocks, num_kv_blocks = len(q_offsets) - 1, len(kv_offsets) - 1
    q_block = torch.from_numpy(np.repeat(np.arange(num_q_blocks), np.diff(q_offsets))).to(device)
    kv_sizes = np.diff(kv_offsets)
    uniform = int(kv_sizes[0]) if (kv_sizes[:-1] == kv_sizes[0]).all() and kv_sizes[-1] <= kv_sizes[0] else None
    kv_block = torch.from_numpy(np.repeat(np.arange(num_kv_blocks), kv_sizes)).to(device)
    mass = torch.zeros(batch, heads, num_q_blocks, num_kv_blocks, dtype=compute, device=device)
    fresh = lse is None
    out_lse = torch.empty(batch, heads, q_len, dtype=torch.float32, device=device) if fresh else lse
    chunk = max(1, max_elements // (heads * kv_len))
    for b in range(batch):
        keys = k[b].to(compute).repeat_interleave(group, dim=0).transpose(1, 2)     # [H, D, L_kv]
        for start in range(0, q_len, chunk):
            rows = slice(start, min(q_len, start + chunk))
            scores = torch.matmul(q[b, :, rows].to(compute), keys) * scale           # [H, c, L_kv]
            if fresh:
                row_lse = torch.logsumexp(scores, dim=-1)
                out_lse[b, :, rows] = row_lse.float()
            else:
                row_lse = lse[b, :, rows].to(compute)
            finite = torch.isfinite(row_lse)
            probs = torch.exp(scores - torch.where(finite, row_lse, 0.0)[..., None]) * finite[..., None]
            if uniform is not None:                                                  # pad keys to NB * block
                pad = num_kv_blocks * uniform - kv_len
                probs = torch.nn.functional.pad(probs, (0, pad)).unflatten(-1, (num_kv_blocks, uniform)).sum(-1)
            else:
                probs = torch.zeros(*probs.shape[:2], num_kv_blocks, dtype=compute, device=device).index_add_(
                    2, kv_block, probs)
            mass[b].index_add_(1, q_block[rows], probs)
    return mass.float(), out_lse


def _offsets(value: Any, field: str) -> np.ndarray:
    arr = np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value)
    if arr.ndim != 1 or arr.size < 2 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{field}: expected integer block boundaries [0, ..., length], got {arr!r}")
    arr = arr.astype(np.int64)
    if arr[0] != 0 or (np.diff(arr) <= 0).any():
        raise ValueError(f"{field}: expected strictly increasing boundaries starting at 0, got {arr.tolist()[:8]}...")
    return arr


def _check_inputs(q: Any, k: Any, q_offsets: np.ndarray, kv_offsets: np.ndarray, lse: Any) -> None:
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor) or t.ndim != 4 or not t.is_floating_point():
            raise TypeError(f"{name}: expected a float torch tensor [B, heads, length, D], got "
                            f"{type(t).__name__} {getattr(t, 'shape', '')}")
    if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3] or q.shape[1] % k.shape[1] or k.device != q.device:
        raise ValueError(f"k: expected [{q.shape[0]}, H_kv, L_kv, {q.shape[3]}] on {q.device} with H_kv dividing "
                         f"{q.shape[1]}, got {list(k.shape)} on {k.device}")
    if q_offsets[-1] != q.shape[2] or kv_offsets[-1] != k.shape[2]:
        raise ValueError(f"q_offsets / kv_offsets: expected to end at L_q={q.shape[2]} and L_kv={k.shape[2]}, "
                         f"got {q_offsets[-1]} and {kv_offsets[-1]}")
    if lse is not None:
        if not isinstance(lse, torch.Tensor) or tuple(lse.shape) != tuple(q.shape[:3]) or lse.device != q.device:
            raise ValueError(f"lse: expected a float32 tensor [B, H, L_q] = {list(q.shape[:3])} on {q.device} "
                             f"(kernel(q, k, v, return_lse=True)), got {getattr(lse, 'shape', type(lse).__name__)}")
        if lse.dtype != torch.float32:
            raise TypeError(f"lse: expected float32 natural-log LSE, got {lse.dtype} (use lse.float())")
