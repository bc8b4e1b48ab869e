"""Sparsity methods: planners that emit BlockMask IRs; none imports a device library.

Each method module has a frozen parameter dataclass, ``plan(geometry, num_heads, *, step,
layer=None, q=None, k=None, **params) -> BlockMask`` for one call, and ``session(num_steps,
**params)`` returning a :class:`Session` for a run across denoising steps (the contract the
integration, CLI and demo use: :mod:`.contract`). Sessions' ``plan`` also takes
``heads=HeadShard(...)`` to plan one rank's heads under head-parallel (Ulysses) attention.

May import: ``sparsecore.ir``, ``sparsecore.geometry``, ``sparsecore.inputs``,
``sparsecore.search`` (the block-mass operation, found through the backend registry),
``sparsecore.ordering`` (a mask over the tokens in another order).
"""

from . import adaspa, lvsa, nabla, pasa, radial, sta, sta_search
from .contract import HeadShard, Session, StepAction

SESSIONS = {"lvsa": lvsa.session, "adaspa": adaspa.session, "pasa": pasa.session, "nabla": nabla.session,
            "radial": radial.session, "sta": sta.session}

__all__ = ["SESSIONS", "HeadShard", "Session", "StepAction", "adaspa", "lvsa", "nabla", "pasa", "radial", "sta",
           "sta_search"]
