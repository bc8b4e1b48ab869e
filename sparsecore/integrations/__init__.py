"""Integrations of sparsecore into model libraries; each subpackage imports its library only when used.

    import sparsecore.integrations.diffusers as sparse
    handle = sparse.apply(pipe.transformer, method="lvsa", device="cuda")

``sparsecore.integrations.diffusers`` needs diffusers 0.42 (``pip install ".[diffusers]"`` from a
checkout). Importing this package imports no model library. An integration may import everything
in sparsecore; nothing in sparsecore imports an integration.
"""

from __future__ import annotations

import importlib
from typing import Any

SUBMODULES = ("diffusers",)

__all__ = list(SUBMODULES)


def __getattr__(name: str) -> Any:
    """``sparsecore.integrations.diffusers`` loads on first access (it imports diffusers)."""
    if name in SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}; integrations: {', '.join(SUBMODULES)}")
