"""A dispatch mode that records the most elements of any tensor an op returns while it is active: how tests hold a
computation to a memory bound (a temporary the size of the whole problem shows as a large result)."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class LargestResult(TorchDispatchMode):
    """The most elements of any tensor an op returns while active (``most``)."""

    def __init__(self):
        super().__init__()
        self.most = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(result):
            if isinstance(tensor, torch.Tensor):
                self.most = max(self.most, tensor.numel())
        return result
