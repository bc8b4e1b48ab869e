"""sparsecore: compile one block-sparse attention IR for every device.

    import sparsecore
    mask = sparsecore.BlockMask.from_dense(block_map, q_len, kv_len, q_block=128)
    kernel = sparsecore.compile(mask, device="cuda")
    out, lse = kernel(q, k, v, return_lse=True)

This folder holds the compile API (``kernel``), the backend registry and capabilities,
the one attention-input check (``inputs``), the one device timer (``timing``), the block-mass
search (``search``), video geometry, synthetic workloads, fidelity metrics, the CLI and the
demo; ``methods/`` and ``integrations/`` below it. Modules here import ``sparsecore.ir`` and
each other, never an integration; backends are reached only through the registry. The
architecture, with a picture of the data flow: docs/architecture.md.

The package is three folders of the repository (see pyproject.toml): ``sparsecore/``,
``ir/`` (imported as ``sparsecore.ir``) and ``backends/`` (``sparsecore.backends``). An
install maps them into one tree; in a source checkout, the lines below let
``import sparsecore`` find the other two beside this folder, so it works from the
repository root before any install.
"""

from pathlib import Path as _Path

if not (_Path(__file__).parent / "ir").is_dir():                     # a source checkout, not an install
    __path__.append(str(_Path(__file__).resolve().parent.parent))     # sparsecore.ir -> ir/, .backends -> backends/

from sparsecore.ir import BlockMask  # noqa: E402

from .capabilities import Capabilities  # noqa: E402
from .geometry import VideoGeometry  # noqa: E402
from .kernel import CompiledKernel, compile  # noqa: E402
from .kernel_cache import clear_cache  # noqa: E402
from .registry import Backend, UnsupportedError, known_devices, register, registered_backends  # noqa: E402

__all__ = ["BlockMask", "Backend", "Capabilities", "CompiledKernel", "UnsupportedError", "registered_backends",
           "VideoGeometry", "clear_cache", "compile", "known_devices", "register"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """``sparsecore.integrations`` loads on first use (it imports no model library until asked)."""
    if name == "integrations":
        import importlib
        return importlib.import_module("sparsecore.integrations")
    raise AttributeError(f"module 'sparsecore' has no attribute {name!r}")
