"""A permutation of a sequence's tokens, for masks whose blocks are not runs of the model's token order.

Sliding Tile Attention (:mod:`sparsecore.methods.sta`) cuts the video into 3D tiles of several frames: in the
model's frame-major raster order a tile's tokens are scattered, in tile order they are one block. Such a method
plans its mask over the tokens in its order and names that order (:class:`TokenOrder`); whoever runs the mask
gathers q, k, v into the order and the output back (the diffusers integration does, for every step that runs
the mask). Both are one ``index_select`` on the device with an index uploaded once per device and length; an order
keeps the :data:`DEVICE_COPIES_KEPT` indices last used (a server's sequence lengths vary with its prompts' text).
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import numpy as np

from sparsecore.geometry import MAX_TOKENS
from sparsecore.ir.memo import LruMemo
from sparsecore.ir.stream_readers import retire
from sparsecore.ir.validation import check_int, frozen

DEVICE_COPIES_KEPT = 16      # device indices an order keeps, by (direction, device, length): 8 bytes a token each

_LIVE: "weakref.WeakSet[TokenOrder]" = weakref.WeakSet()
_LIVE_LOCK = threading.Lock()      # a set that another thread adds to while it is read raises (clear_cache's thread)


def forget_device_copies() -> None:
    """Drop every live order's device indices (:func:`sparsecore.clear_cache` calls it), retired for the streams
    that may still read them (:func:`sparsecore.ir.stream_readers.retire`); the next gather uploads again."""
    with _LIVE_LOCK:
        orders = list(_LIVE)
    for order in orders:
        order._on_device.clear()            # each dropped copy retired (the memo's on_drop)


class TokenOrder:
    """Position ``p`` of the ordered sequence holds token ``index[p]`` of the model's sequence.

    ``name`` says which order it is (shown by ``repr``). Sequences longer than the order (text padding after the
    valid tokens) keep their extra tokens in place. Read-only; one object per geometry is meant to be shared.
    """

    def __init__(self, index: np.ndarray, name: str) -> None:
        index = np.asarray(index)
        if index.ndim != 1 or index.dtype.kind not in "iu":
            raise TypeError(f"index: expected a 1-D integer array, got {index.dtype} of shape {index.shape}")
        length = len(index)
        if length == 0 or index.min() < 0 or index.max() >= length or \
                np.bincount(index, minlength=length).max() != 1:
            raise ValueError(f"index: expected a permutation of range({length}), got {index[:8].tolist()}...")
        self.index = frozen(index.astype(np.int64))
        self.inverse = frozen(np.argsort(self.index))
        self.name = name
        self._on_device = LruMemo(DEVICE_COPIES_KEPT, on_drop=lambda copy: retire([copy]))  # (inverse, device, len)
        with _LIVE_LOCK:
            _LIVE.add(self)

    def __len__(self) -> int:
        return len(self.index)

    def __repr__(self) -> str:
        return f"TokenOrder({self.name}, {len(self)} tokens)"

    def gather(self, tensor: Any, dim: int) -> Any:
        """``tensor``'s tokens along ``dim`` in this order (a new tensor)."""
        return tensor.index_select(dim, self._index(False, tensor.device, self._length(tensor, dim)))

    def scatter(self, tensor: Any, dim: int) -> Any:
        """The inverse of :meth:`gather`: tokens in this order back in the model's."""
        return tensor.index_select(dim, self._index(True, tensor.device, self._length(tensor, dim)))

    def device_index(self, device: Any, length: int | None = None) -> Any:
        """:attr:`index` as an int64 tensor on ``device``, extended to ``length`` tokens (the extra ones in place),
        uploaded once (for gathers that fold it into another)."""
        length = len(self) if length is None else check_int(length, "length", 0)
        if length < len(self):
            raise ValueError(f"length: expected at least the order's {len(self)} tokens, got {length}; pass the "
                             f"length of the sequence the order was made for (or longer, padding after it)")
        if length > MAX_TOKENS:                             # checked before an index of that many tokens is built
            raise ValueError(f"length: expected at most {MAX_TOKENS:,} tokens (the longest sequence a mask "
                             f"describes), got {length:,}; pass the length of the sequence the order gathers")
        return self._index(False, device, length)

    def _length(self, tensor: Any, dim: int) -> int:
        length = tensor.shape[dim]
        if length < len(self):
            raise ValueError(f"tensor: expected at least {len(self)} tokens along dim {dim} for {self!r}, got "
                             f"{length}; gather the sequence the order was made for")
        return length

    def _index(self, inverse: bool, device: Any, length: int) -> Any:
        import torch

        def upload() -> Any:
            order = self.inverse if inverse else self.index
            full = np.concatenate([order, np.arange(len(self), length)])        # padding stays in place
            return torch.from_numpy(full).to(device)
        return self._on_device.get((inverse, str(device), length), upload)
