"""Where a mask's lists live: conversions between NumPy lists and torch tensors on a device.

:func:`uploaded` and :func:`downloaded` are memoized in the mask's ``derived`` (a host mask used on a
GPU uploads once; a device mask read on the host downloads once). :func:`copied` is not: it gives a
copy the caller owns, for sessions that keep masks in host memory between steps and bring each
back for one call (AdaSpa's ``store="host"``), through :func:`.uploads.moved`. Such a copy shares
its source's :func:`.host_facts.host_reads`, so a lowering that converts it at every call reads its
sizes once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from . import validation as v
from .host_facts import carry_padding, share_host_facts

if TYPE_CHECKING:
    import torch

    from .block_mask import BlockMask


def uploaded(mask: "BlockMask", device: Any) -> "BlockMask":
    """``mask`` with its lists as torch tensors on ``device`` (int32 lists, float64 budgets), memoized."""
    import torch
    device = run_device(device)
    if mask.device == device:
        return mask
    key = str(device)
    if key not in mask.derived:
        # a host array is cast before its upload, a pageable copy that returns once it has landed: nothing of the
        # memoized mask is left queued on this caller's stream for a kernel on another stream to read early
        def put(a: Any, dtype: "torch.dtype") -> "torch.Tensor":
            return (torch.from_numpy(np.array(a)).to(dtype) if mask.on_host else a).to(device, dtype)
        mask.derived[key] = carry_padding(type(mask).unchecked(
            mask.num_heads, mask.q_offsets, mask.kv_offsets, put(mask.indptr, torch.int32),
            put(mask.indices, torch.int32), put(mask.budgets, torch.float64), mask.meta, mask.unselected), mask)
    return mask.derived[key]


def copied(mask: "BlockMask", device: Any) -> "BlockMask":
    """A copy of a device mask's lists on ``device`` (``mask`` itself if already there), not memoized: to the
    host into pinned memory, from pinned memory to an accelerator asynchronously."""
    if mask.on_host:
        raise ValueError("mask: copy_to moves the torch lists of a device mask; a host (NumPy) mask uploads with "
                         ".to(device)")
    from .uploads import moved
    device = run_device(device)
    if mask.device == device:
        return mask
    copy = type(mask).unchecked(mask.num_heads, mask.q_offsets, mask.kv_offsets, moved(mask.indptr, device),
                                moved(mask.indices, device), moved(mask.budgets, device), mask.meta, mask.unselected)
    return share_host_facts(copy, mask)


def downloaded(mask: "BlockMask") -> "BlockMask":
    """``mask`` with NumPy lists (read-only; one device-to-host copy for a device mask), memoized."""
    if mask.on_host:
        return mask
    if "host" not in mask.derived:
        host = lambda t: v.frozen(t.detach().cpu().numpy())  # noqa: E731
        mask.derived["host"] = carry_padding(type(mask).unchecked(mask.num_heads, mask.q_offsets, mask.kv_offsets,
                                                                  host(mask.indptr), host(mask.indices),
                                                                  host(mask.budgets), mask.meta, mask.unselected), mask)
    return mask.derived["host"]


def run_device(device: Any) -> "torch.device":
    """``device`` as a ``torch.device`` with an index on accelerators (``"cuda"`` is the current one)."""
    import torch
    device = v.torch_device(device)
    if device.type == "cpu":
        return device
    module = getattr(torch, device.type, None)          # torch.cuda, torch.xpu, torch.npu, torch.mps; "meta": none
    if not getattr(module, "is_available", lambda: False)():
        raise ValueError(f"device: expected a device this machine has, got {str(device)!r} (torch {torch.__version__}: "
                         f"torch.{device.type}.is_available() is not True); pass 'cpu' or a device listed there")
    if device.index is None:                            # the current one (MPS has one device and no current_device)
        device = torch.device(device.type, getattr(module, "current_device", lambda: 0)())
    elif hasattr(module, "device_count") and device.index >= module.device_count():
        raise ValueError(f"device: expected one of this machine's {module.device_count()} {device.type} device(s), "
                         f"numbered from 0, got {str(device)!r}")
    return device
