"""Sparsity methods: planners that emit BlockMask IRs (none imports a device library).

Each module has ``plan(geometry, num_heads, *, step, layer=None, q=None, k=None, **params)
-> BlockMask`` and ``session(num_steps=..., **params)`` for runs across denoising steps.
Sessions' ``plan`` also takes ``heads=HeadShard(...)`` to plan one rank's heads under
head-parallel (Ulysses) attention.
"""

from . import adaspa, lvsa, pasa
from .common import HeadShard

PLANNERS = {"lvsa": lvsa.plan, "adaspa": adaspa.plan, "pasa": pasa.plan}
SESSIONS = {"lvsa": lvsa.session, "adaspa": adaspa.session, "pasa": pasa.session}

__all__ = ["PLANNERS", "SESSIONS", "HeadShard", "adaspa", "lvsa", "pasa"]
