"""Lowerings of the block-mask IR, one package per device family, found by folder (see sparsecore.registry).

Each package exposes ``BACKENDS`` (instances of ``sparsecore.registry.Backend``). A package may
import ``sparsecore.ir``, ``sparsecore.registry``, ``sparsecore.capabilities`` and
``sparsecore.inputs``, and its device library only inside the functions that run (never at
import); never ``sparsecore.kernel``, the methods or the integrations.
"""
