"""The Ascend NPU lowering through torch_npu, and a CPU emulator of the ops it calls.

``sparsecore.compile(mask, device="npu")`` lowers to ``torch_npu.npu_block_sparse_attention``
where the mask fits its block grid and ``torch_npu.npu_fusion_attention`` for the rest
(see :mod:`.schedule`). Importing this package never imports torch_npu. On a machine without
an NPU, ``with sparsecore.backends.npu.emulate(): ...`` runs the same lowering on CPU
tensors against :mod:`.emulator`.
"""

from .emulator import emulate
from .lowering import NpuBackend, NpuOptions

BACKENDS = (NpuBackend(),)

__all__ = ["BACKENDS", "NpuBackend", "NpuOptions", "emulate"]
