"""A method given as a callable ``(geometry, num_heads, step, layer) -> BlockMask``, run as a :class:`Session`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sparsecore.geometry import VideoGeometry
from sparsecore.ir import BlockMask
from sparsecore.methods import HeadShard, StepAction
from sparsecore.methods.causal import restrict
from sparsecore.methods.selection import dense_mask

MethodProvider = Callable[[VideoGeometry, int, int, int], BlockMask]


class CallableSession:
    """A method given as a callable ``(geometry, num_heads, step, layer) -> BlockMask``, as a :class:`Session`.

    Every step plans; a full mask on the host runs the dense path (the processors' dense attention). Under a head
    shard the callable is asked for all heads and the shard's heads are taken (memoized per mask). Under causal frames
    the blocks a row may not see leave the mask (:func:`sparsecore.methods.causal.restrict`; a full mask becomes every
    block each row may see, on frame blocks).
    """

    method = "callable"
    params = None

    def __init__(self, provider: MethodProvider, num_steps: int) -> None:
        self.provider = provider
        self.num_steps = num_steps

    def action(self, geometry: VideoGeometry, step: int, layer: int | None = None) -> StepAction:
        return StepAction("plan", dense=False, plans=True)

    def plan(self, geometry: VideoGeometry, num_heads: int, *, step: int, layer: int | None = None, q: Any = None,
             k: Any = None, lse: Any = None, mass: Any = None, heads: HeadShard | None = None) -> BlockMask:
        mask = self.provider(geometry, num_heads, step, layer)
        source = f"method callable {getattr(self.provider, '__name__', self.provider)!r}"
        if not isinstance(mask, BlockMask):
            raise TypeError(f"mask: {source} must return a sparsecore BlockMask, got {type(mask).__name__}")
        if mask.num_heads != num_heads or mask.q_len != geometry.tokens or mask.kv_len != geometry.tokens:
            raise ValueError(f"mask: {source} returned {mask!r} for layer {layer} step {step}; expected {num_heads} "
                             f"heads and q_len = kv_len = {geometry.tokens} (geometry {geometry})")
        if geometry.causal_frames:          # a frame-causal model's attention: no later causal block, whatever it lists
            full = mask.on_host and mask.density() >= 1.0                 # on any blocks: every block a row may see
            mask = dense_mask(geometry, num_heads, mask.meta) if full else restrict(mask, geometry)
        if heads is None or heads.size == heads.total:
            return mask
        key = ("heads", heads.start, heads.stop)                      # kept with the mask, freed with it
        if key not in mask.derived:
            mask.derived[key] = mask.select_heads(range(heads.start, heads.stop))
        return mask.derived[key]
