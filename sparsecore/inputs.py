"""The one check of attention inputs, shared by kernels, methods, the block-mass search and fidelity.

Layout everywhere: q ``[B, H, L_q, D]``, k and v ``[B, H_kv, L_kv, D]`` with ``H % H_kv == 0``;
query head ``h`` reads key head ``h // (H // H_kv)``. Every failure names the argument,
what was expected and what was got. Only shapes, dtypes and devices are read: no values.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sparsecore.ir.validation import check_bool


@dataclass(frozen=True)
class AttentionShape:
    """What a call's q, k (and v) are: sizes, dtype name (``"bfloat16"``) and device type (``"cuda"``)."""

    batch: int
    num_heads: int
    num_kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    dtype: str
    device: str          # torch device type, or "host" for NumPy arrays

    @property
    def group(self) -> int:
        """Query heads per key head."""
        return self.num_heads // self.num_kv_heads


def array_kind(t: Any) -> str:
    """``"torch"`` for a torch tensor (of a subclass defined anywhere too), ``"numpy"`` for a NumPy array (likewise),
    else the top-level module of whatever ``t`` is."""
    if isinstance(t, torch.Tensor):
        return "torch"
    if isinstance(t, np.ndarray):
        return "numpy"
    return type(t).__module__.split(".")[0]


def dtype_name(t: Any) -> str:
    """``"float32"`` for a torch float32 tensor and for a NumPy float32 array in either byte order."""
    return t.dtype.name if isinstance(t.dtype, np.dtype) else str(t.dtype).removeprefix("torch.")


NO_VALUES = object()   # attention_shape's default: only q and k are checked (v=None is checked, and refused)


def attention_shape(q: Any, k: Any, v: Any = NO_VALUES, *, kind: str = "torch",
                    kv_len: int | None = None) -> AttentionShape:
    """Check q, k (and v if given) against the layout above; returns their :class:`AttentionShape`.

    ``kind``: ``"torch"`` or ``"numpy"``, what the arrays must be. ``kv_len``: the key length
    required (e.g. a mask's), if any. Floating point is not required here (a kernel's
    capabilities say which dtypes it takes, naming them).
    """
    with_values = v is not NO_VALUES
    named = [("q", q), ("k", k)] + ([("v", v)] if with_values else [])
    for name, t in named:
        if array_kind(t) != kind:
            hint = " (convert with .numpy())" if kind == "numpy" else " (convert with torch.from_numpy)"
            raise TypeError(f"{name}: expected a {kind} array [B, heads, length, head_dim], got "
                            f"{type(t).__name__}{hint}")
        if kind == "torch" and t.is_nested:       # before its shape: a strided nested tensor has none to read
            raise TypeError(f"{name}: expected dense values, got a nested tensor (torch.nested); call the kernel once "
                            f"per sequence of {name}.unbind(), each as a [1, heads, length, head_dim] tensor")
        if isinstance(t, np.ma.MaskedArray) or (kind == "torch" and t.layout != torch.strided):
            what = "a masked array" if kind == "numpy" else f"a {t.layout} tensor"
            raise TypeError(f"{name}: expected dense values, got {what}; pass "
                            f"{'np.ma.getdata(' + name + ')' if kind == 'numpy' else name + '.to_dense()'}")
        if len(t.shape) != 4:
            raise ValueError(f"{name}: expected 4 dimensions [B, heads, length, head_dim], got shape {list(t.shape)}")
    batch, num_heads, q_len, head_dim = (int(s) for s in q.shape)
    if with_values and tuple(k.shape) != tuple(v.shape):
        raise ValueError(f"k, v: expected the same shape, got k {list(k.shape)} and v {list(v.shape)}")
    if batch < 1 or head_dim < 1 or num_heads < 1:
        raise ValueError(f"q: expected batch >= 1, heads >= 1 and head_dim >= 1, got shape {list(q.shape)}")
    if k.shape[0] != batch or k.shape[3] != head_dim or (kv_len is not None and k.shape[2] != kv_len):
        length, why = ("L_kv", "batch and head_dim of q") if kv_len is None else \
            (kv_len, f"batch and head_dim of q, kv_len={kv_len} of the mask")
        raise ValueError(f"k: expected [{batch}, H_kv, {length}, {head_dim}] ({why}), got {list(k.shape)}; pass "
                         f"keys and values of that shape (B, length, D as the expected one)")
    num_kv_heads = int(k.shape[1])
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"k: the number of key heads must divide the query heads ({num_heads}), got {num_kv_heads}; "
                         f"pass k and v with a divisor of {num_heads} heads (repeat_interleave the key heads)")
    dtypes = [dtype_name(t) for _, t in named]
    if len(set(dtypes)) != 1:
        cast = "k.to(q.dtype)" if kind == "torch" else "k.astype(q.dtype)"
        raise TypeError(f"{', '.join(n for n, _ in named)}: expected one dtype, got {', '.join(dtypes)}; cast them "
                        f"to one (e.g. {cast})")
    device = "host"
    if kind == "torch":
        devices = [t.device for _, t in named]
        if len(set(devices)) != 1:
            raise ValueError(f"{', '.join(n for n, _ in named)}: expected one device, got {[str(d) for d in devices]}; "
                             f"move them to one (e.g. k.to(q.device))")
        device = devices[0].type
    return AttentionShape(batch, num_heads, num_kv_heads, q_len, int(k.shape[2]), head_dim, dtypes[0], device)


def as_batched(t: Any, name: str) -> Any:
    """A ``[heads, L, D]`` tensor as ``[1, heads, L, D]``; None raises naming ``name``; others pass through."""
    if t is None:
        raise ValueError(f"{name}: this method needs {name} (a [B, heads, L, D] tensor) at this step, got None")
    if array_kind(t) not in ("torch", "numpy"):
        raise TypeError(f"{name}: expected a tensor [B, heads, L, D], got {type(t).__name__}")
    return t[None] if len(t.shape) == 3 else t


# The kernels compute float32 scores and scale them by ``scale * log2(e)`` (Triton's exp2): a larger scale overflows.
SCALE_MAX = 3.4028234663852886e38 / 1.4426950408889634


def check_return_lse(return_lse: Any) -> bool:
    return check_bool(return_lse, "return_lse")


def check_scale_type(scale: Any, symbolic: tuple[type, ...] = ()) -> None:
    """``scale`` is None or a real number (or one of the ``symbolic`` types: torch.compile's traced numbers); not a
    NumPy timedelta (registered as an integer)."""
    if scale is not None and (isinstance(scale, (bool, np.timedelta64))
                              or not isinstance(scale, (numbers.Real, *symbolic))):
        raise TypeError(f"scale: expected a float or None (for 1/sqrt(D)), got {type(scale).__name__}; pass a "
                        f"Python float (float(scale))")


def check_scale(scale: Any, head_dim: int) -> float:
    """The softmax scale: ``1/sqrt(head_dim)`` for None, else a real number of magnitude at most :data:`SCALE_MAX`
    (float32's largest over log2(e): the kernels' scaled-score factor stays finite; scores themselves may still
    overflow for huge scales) (``TypeError``/``ValueError``)."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    check_scale_type(scale)
    # |scale| first: an int may not fit a float; an int is finite (and math.isfinite cannot trace torch.compile's
    # symbolic int). A NumPy float is compared as a Python float: SCALE_MAX overflows float16.
    magnitude = abs(float(scale)) if isinstance(scale, np.floating) else abs(scale)
    if magnitude > SCALE_MAX or (not isinstance(scale, int) and not math.isfinite(scale)):
        raise ValueError(f"scale: expected a finite float with |scale| <= {SCALE_MAX:.4g} (float32's largest over "
                         f"log2(e), the kernels' score factor), got {str(scale)[:40]}")
    return float(scale)
