"""sparsecore: compile one block-sparse attention IR for every device.

    import sparsecore
    mask = sparsecore.BlockMask.from_dense(block_map, q_len, kv_len, q_block=128)
    kernel = sparsecore.compile(mask, device="cuda")
    out, lse = kernel(q, k, v, return_lse=True)
"""

from sparsecore.ir import BlockMask

from .capabilities import Capabilities
from .geometry import VideoGeometry
from .kernel import CompiledKernel, clear_cache, compile
from .registry import Backend, UnsupportedError, known_devices, register, registered_backends

__all__ = ["BlockMask", "Backend", "Capabilities", "CompiledKernel", "UnsupportedError", "registered_backends",
           "VideoGeometry", "clear_cache", "compile", "known_devices", "register"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """``sparsecore.integrations`` loads on first use (it imports no model library until asked)."""
    if name == "integrations":
        import importlib
        return importlib.import_module("sparsecore.integrations")
    raise AttributeError(f"module 'sparsecore' has no attribute {name!r}")
