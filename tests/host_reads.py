"""Count the tensor operations that would read a device tensor back to the host, on any machine.

On a GPU each of these waits for the device's queue (torch's CUDA sync debug mode flags them);
on CPU tensors they are free, so CPU CI counts them through a ``TorchFunctionMode`` instead:
``.item()``, ``.tolist()``, ``bool()/int()/float()`` of a tensor, ``.cpu()``, ``.numpy()`` and the
ops whose output size depends on values (``nonzero``, ``unique``, ``masked_select``, and indexing with a
boolean tensor, ``x[mask]`` or ``x[mask] = y``, which runs a ``nonzero``).
"""

from __future__ import annotations

import traceback

import torch
from torch.overrides import TorchFunctionMode

READS = frozenset({"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero",
                   "unique", "masked_select"})


class HostReads(TorchFunctionMode):
    """Inside ``with HostReads() as reads:``, ``reads.calls`` lists (op, caller file:line) of every read."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in READS or name in ("__getitem__", "__setitem__") and _boolean_index(args[1]):
            caller = next((f for f in reversed(traceback.extract_stack()[:-1]) if "sparsecore" in f.filename
                           or "/backends/" in f.filename or "/ir/" in f.filename), None)
            self.calls.append((name, f"{caller.filename}:{caller.lineno}" if caller else "?"))
        return func(*args, **(kwargs or {}))


def _boolean_index(index) -> bool:
    """Whether an index holds a boolean tensor (its positions are read on the host)."""
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
               for i in (index if isinstance(index, tuple) else (index,)))
