"""Finding the ``torch_npu`` module, lazily and without letting a broken install crash anything.

Nothing here runs at import. ``import torch_npu`` is only attempted when a kernel is
selected for or run on ``"npu"``, and it is guarded: on a CUDA build of torch it raises
``RuntimeError: Two accelerators cannot be used at the same time``, without CANN an
``ImportError`` for ``libhccl.so``, and other missing shared libraries an ``OSError``
(BACKENDS.md section 3e; huggingface/accelerate#3754). Whatever module sits at
``sys.modules["torch_npu"]`` is used as is: the real one, or the emulator of
:mod:`sparsecore.backends.npu.emulator`. The lowering looks the module up on every call,
so a kernel compiled under the emulator never holds on to it.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import torch

from .emulator import EMULATOR_FLAG, MODULE_NAME

BLOCK_SPARSE_OP = "npu_block_sparse_attention"
FUSION_OP = "npu_fusion_attention"
INSTALL_HINT = ("pip install torch-npu==2.14.* torch==2.14.* on an Ascend Atlas A2/A3 host with the CANN toolkit "
                ">= 9.0 installed and its set_env.sh sourced; on CPU, run under sparsecore.backends.npu.emulate()")


def is_emulator(module: object) -> bool:
    return getattr(module, EMULATOR_FLAG, False) is True


def emulator_active() -> bool:
    return is_emulator(sys.modules.get(MODULE_NAME))


def find_torch_npu() -> tuple[types.ModuleType | None, str | None]:
    """``(module, None)`` if torch_npu is (or can be) imported, else ``(None, why not)``."""
    if MODULE_NAME in sys.modules:
        module = sys.modules[MODULE_NAME]
        if module is None:
            return None, "sys.modules['torch_npu'] is None (its import is blocked in this process)"
        return module, None
    if importlib.util.find_spec(MODULE_NAME) is None:
        return None, "torch_npu is not installed"
    try:
        return importlib.import_module(MODULE_NAME), None
    except ImportError as error:   # no CANN: "libhccl.so: cannot open shared object file"
        return None, f"import torch_npu failed with ImportError: {error} (is CANN installed and set_env.sh sourced?)"
    except OSError as error:       # another shared library of CANN or the driver is missing
        return None, f"import torch_npu failed with OSError: {error} (a CANN or driver library is missing)"
    except RuntimeError as error:  # e.g. a CUDA build of torch: "Two accelerators cannot be used at the same time"
        return None, (f"import torch_npu failed with RuntimeError: {error} (torch_npu needs a CPU build of torch "
                      f"{torch.__version__.split('+')[0]} without CUDA)")


def unavailable_reason() -> str | None:
    """None when the npu lowering can run here (a real NPU, or the emulator), else why not."""
    module, problem = find_torch_npu()
    if problem is not None:
        return problem
    if is_emulator(module):
        return None
    npu = getattr(torch, "npu", None)
    if npu is None or not npu.is_available():
        version = getattr(module, "__version__", "unknown version")
        return (f"torch_npu {version} imported but torch.npu.is_available() is False "
                f"(no Ascend device visible: check npu-smi info and ASCEND_RT_VISIBLE_DEVICES)")
    if not hasattr(module, FUSION_OP):
        return f"torch_npu {getattr(module, '__version__', '?')} has no {FUSION_OP}"
    return None


def hardware_problem() -> str | None:
    """None only with a real torch_npu and a visible NPU (the emulator does not count)."""
    if emulator_active():
        return "the sparsecore emulator is installed at sys.modules['torch_npu'], not the real torch_npu"
    return unavailable_reason()


def require_torch_npu() -> types.ModuleType:
    """The torch_npu module for this call; raises RuntimeError saying what is missing."""
    module, problem = find_torch_npu()
    if problem is not None:
        raise RuntimeError(f"npu kernel: {problem}; it needs torch_npu at call time ({INSTALL_HINT}). A kernel "
                           f"compiled under emulate() runs only while the emulator is installed")
    return module
