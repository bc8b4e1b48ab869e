"""The ``triton`` lowering: any BlockMask on NVIDIA GPUs through one Triton kernel.

Compile builds nothing device-side; the first call for a (tile config) plans the
mask's tiles (:mod:`.tiling`) and uploads them; later calls only launch. Under
``TRITON_INTERPRET=1`` Triton runs kernels on CPU tensors; the backend then offers
that as its :meth:`emulator` (:mod:`.interpreter`), which is how CPU CI runs the
property suite on it (fp16/fp32 only: the interpreter's bf16 dot is wrong). It also
offers AdaSpa's block-mass pass (:mod:`.block_mass`), its first search step in one dense
pass (:mod:`.search_attention`) and the planners' row-wise top-k (:mod:`.row_top`). Masks
that approximate the blocks a row does not list (PASA) get a second Triton pass that merges the approximation into the
exact kernel's output through its LSE (:mod:`.approximation_launch`).
"""

from __future__ import annotations

import contextlib
import importlib.util

import torch

from sparsecore.capabilities import Capabilities
from sparsecore.ir import BlockMask
from sparsecore.ir.unselected import KINDS
from sparsecore.registry import Backend, BlockMassOp, RowTopOp, Run

from . import block_mass, interpreter, row_top, search_attention, shared_memory
from .triton_config import TritonOptions, below_ampere


class TritonBackend(Backend):
    name = "triton"
    install_hint = "pip install triton (an NVIDIA GPU, or TRITON_INTERPRET=1 for the CPU interpreter)"
    options_type = TritonOptions
    block_mass = BlockMassOp(run=block_mass.run, supports=block_mass.supports, with_output=search_attention.run,
                             with_output_supports=search_attention.supports, takes_visible=True)
    row_top = RowTopOp(run=row_top.run, supports=row_top.supports)

    def __init__(self) -> None:
        dtypes = {name for name in ("float16", "bfloat16", "float32")
                  if interpreter.dtype_problem(getattr(torch, name)) is None}
        self.capabilities = Capabilities(devices=("cuda",), array_type="torch", dtypes=frozenset(dtypes),
                                         head_dims=frozenset({16, 32, 64, 128}), unselected=frozenset(KINDS),
                                         unselected_shared_memory=shared_memory.APPROXIMATION_SHARED_MEMORY)

    def unavailable_reason(self, device: str) -> str | None:
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
        if interpreter.active():
            return None
        if interpreter.interpreting():
            return "TRITON_INTERPRET=1: kernels run in Triton's CPU interpreter, not on the GPU"
        if not torch.cuda.is_available():
            return f"torch.cuda.is_available() is False in torch {torch.__version__}"
        return below_ampere(torch.device(device))

    def shared_memory(self, device: str) -> int | None:
        return shared_memory.device_shared_memory(device)

    def emulator(self) -> contextlib.AbstractContextManager[None] | None:
        return interpreter.emulating() if interpreter.interpreting() and importlib.util.find_spec("triton") else None

    def tensor_device_problem(self, device: str, tensor_device: str) -> str | None:
        return interpreter.tensor_device_problem(device, tensor_device)

    def preference(self, mask: BlockMask) -> int:
        from .selection import preference
        return preference(self.name, mask)

    def lower(self, mask: BlockMask, device: str, options: TritonOptions) -> Run:
        from .triton_launch import TritonLaunch
        return TritonLaunch(mask, options)
