"""What every method is to the rest of sparsecore: a frozen parameter set and a :class:`Session`.

A session carries one run (one sampling loop) of a method. The integration, the CLI and
the demo drive every method the same way:

1. ``session.action(geometry, step, layer)`` says, before any attention runs, what the
   (layer, step) does: dense attention (the model's own path) or a sparse mask, and
   whether :meth:`Session.plan` must run there (and needs ``q`` / ``k``, or can use the
   LSE of the step's dense output).
2. ``session.plan(geometry, num_heads, step=, layer=, q=, k=, lse=, mass=, heads=)`` returns the
   mask: the one to run at a sparse step, or (AdaSpa's first search) the mask searched
   for the steps after it.

Parameters are validated once, when the session is made; plan() checks only its inputs.
Nothing here imports a device library.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Mapping, Protocol, TypeVar, runtime_checkable

import numpy as np

from sparsecore.geometry import MAX_TOKENS, VideoGeometry
from sparsecore.inputs import SCALE_MAX
from sparsecore.ordering import TokenOrder
from sparsecore.ir import BlockMask
from sparsecore.ir.validation import INDEX_LIMIT, PAIR_LIMIT, check_int

P = TypeVar("P")


@dataclass(frozen=True)
class StepAction:
    """What one (layer, step) of a method does.

    ``label`` is the method's word for it (stats show it): ``"dense"``, ``"search"``,
    ``"cached-search"``, ``"reuse"``, ``"select"``, ``"plan"``. ``dense``: the
    output is dense attention. ``plans``: :meth:`Session.plan` must run. ``needs_qk``:
    that call needs this step's q and k. ``wants_lse``: it can reuse the LSE of this
    step's dense output (at the default scale 1/sqrt(D)) instead of computing one (AdaSpa's step
    before its first search, or with ``first_search="fused"`` the first search's Fused Online Search).
    ``mass_block_size``: it can also take the block masses ``[H, MB, NB]`` of this step's q, k on
    ``geometry.block_offsets(mass_block_size)`` blocks, which the dense output's pass can give
    (:func:`sparsecore.search.dense_attention_with_mass`); None: it computes them itself.
    ``per_call``: the mask is the call's own (made from its q, k, or one of many per-layer masks: STA's
    strategies), kept by nobody after it: the integrations plan it at every call of the step and hold no
    layer's lists or kernel while others run.
    ``held``: the session keeps the mask it returns in host memory (AdaSpa's ``store="host"``): the
    integrations copy it to the call's device and compile it at every call, and keep no device copy.
    ``shared``: every layer of the step gets the same mask (LVSA's): its kernel runs in turn with every
    layer's other work, so the integrations ask it to keep its plans in host memory between calls
    (:meth:`sparsecore.CompiledKernel.keep_plans_on_host`: one copy a call instead of device memory).
    ``per_sample``: the mask is one sample's (NABLA's, as the model it reproduces plans them): the integrations plan
    and run each sample of a batch apart.
    ``token_order``: the mask's blocks are over the tokens in this order (STA's tiles,
    :class:`sparsecore.ordering.TokenOrder`): the integrations gather q, k, v into it and the output back.
    ``head_groups``: the mask's heads take a few distinct patterns, which the session gives as one-head masks
    (``session.head_groups(geometry, mask)`` of the mask its ``plan`` returned: ``[(one-head mask, head indices),
    ...]``, the same mask objects while it keeps them; STA's strategies): the integrations may run one kernel per
    pattern on the heads that have it, each compiled once, instead of compiling every call's mask.
    """

    label: str
    dense: bool
    plans: bool
    needs_qk: bool = False
    wants_lse: bool = False
    mass_block_size: int | None = None
    per_call: bool = False
    held: bool = False
    shared: bool = False
    per_sample: bool = False
    token_order: TokenOrder | None = None
    head_groups: bool = False


@runtime_checkable
class Session(Protocol):
    """One run of a method; see the module docstring."""

    method: str
    num_steps: int
    params: Any

    def action(self, geometry: VideoGeometry, step: int, layer: int | None = None) -> StepAction:
        ...

    def plan(self, geometry: VideoGeometry, num_heads: int, *, step: int, layer: int | None = None, q: Any = None,
             k: Any = None, lse: Any = None, mass: Any = None, heads: "HeadShard | None" = None) -> BlockMask:
        ...


# ------------------------------------------------------------------ parameter checks
def params_from(params_type: type[P], method: str, params: Mapping[str, Any]) -> P:
    """``params_type(**params)``; an unknown name raises TypeError listing the accepted ones."""
    accepted = [f.name for f in fields(params_type)]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise TypeError(f"{method}: unknown parameter(s) {unknown}; accepted: {', '.join(sorted(accepted))}")
    return params_type(**params)


def check_fraction(value: Any, field: str, low: float = 0.0, high: float = 1.0, *, open_low: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{field}: expected a float, got {type(value).__name__} {value!r}")
    # ints and Fractions are finite (math.isfinite overflows on those past a float's range)
    if not (isinstance(value, numbers.Rational) or math.isfinite(value)):
        raise ValueError(f"{field}: expected a finite value in [{low}, {high}], got {value!r}")
    if value > high or value < low or (open_low and value == low):
        bracket = "(" if open_low else "["
        raise ValueError(f"{field}: expected a value in {bracket}{low}, {high}], got {str(value)[:40]}")
    return float(value)


def check_scale(value: Any) -> float | None:
    """A softmax scale override: None (``1/sqrt(D)``) or a positive float the kernels can use (``SCALE_MAX``)."""
    if value is None:
        return None
    return check_fraction(value, "scale", 0.0, SCALE_MAX, open_low=True)


def check_int_tuple(values: Any, field: str, limit: int, unit: str, minimum: int = 0) -> tuple[int, ...]:
    """A sequence of at most ``limit`` ints (``unit``: what they are) as a sorted tuple of distinct values; at most
    ``limit + 1`` of them are read."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(f"{field}: expected a sequence of ints, got {type(values).__name__}")
    read = list(itertools.islice(values, limit + 1))
    if len(read) > limit:
        raise ValueError(f"{field}: expected at most {limit:,} distinct {unit}, got more; pass the {unit} meant, "
                         f"each once")
    checked = [check_int(x, f"{field}[{i}]", minimum) for i, x in enumerate(read)]
    if len(set(checked)) != len(checked):
        raise ValueError(f"{field}: expected distinct values, got {shown(checked)}")
    return tuple(sorted(checked))


def shown(values: Any, head: int = 6) -> str:
    """A list of ints for a message: its first ``head`` values, then its length where longer."""
    values = [v if abs(v) < 10 ** 12 else f"<an int of {v.bit_length()} bits>" for v in values]
    return str(values) if len(values) <= head else f"[{', '.join(map(str, values[:head]))}, ... ({len(values):,})]"


def check_geometry(geometry: Any, num_heads: Any) -> int:
    """The geometry's type, and a size one mask can describe (checked before any plan is built in proportion)."""
    if not isinstance(geometry, VideoGeometry):
        raise TypeError(f"geometry: expected a sparsecore.VideoGeometry, got {type(geometry).__name__}")
    num_heads = check_int(num_heads, "num_heads", 1)
    frame_blocks = geometry.frames + -(-geometry.text_tokens // geometry.frame_tokens)   # block_offsets(None)'s
    if num_heads * frame_blocks ** 2 > INDEX_LIMIT or num_heads * geometry.tokens ** 2 >= PAIR_LIMIT:
        raise ValueError(f"geometry: {geometry} with num_heads={num_heads} is larger than one mask can describe "
                         f"(heads x frame blocks^2 must be at most {INDEX_LIMIT:,} and heads x tokens^2 below 2**62); "
                         f"plan fewer heads at a time (heads=HeadShard(...)) or check the geometry")
    return num_heads


def fixed_block_offsets(geometry: VideoGeometry, num_heads: int, block_size: int) -> np.ndarray:
    """``geometry.block_offsets(block_size)``, once the blocks are few enough for one mask of ``num_heads`` heads:
    planners build scores or maps of ``heads x blocks^2`` (and a list can hold that many entries), so that must stay
    within the int32 index limit. Checked before anything in proportion is built."""
    blocks = geometry.video_block_count(block_size) + -(-geometry.text_tokens // block_size)
    if num_heads * blocks ** 2 > INDEX_LIMIT:
        raise ValueError(f"block_size: {block_size}-token blocks cut {geometry} into {blocks:,} blocks, and "
                         f"{num_heads} heads x {blocks:,}^2 block pairs exceed the int32 index limit {INDEX_LIMIT:,}; "
                         f"use larger blocks or plan fewer heads at a time (heads=HeadShard(...))")
    return geometry.block_offsets(block_size)


COUNT_LIMIT = MAX_TOKENS     # frames or blocks a geometry has at most: a count past it covers any video


def check_video_count(value: Any, field: str, minimum: int = 1, unit: str = "latent frames") -> int:
    """A count of a video's ``unit`` (a window, a budget, an interval), at least ``minimum`` and at most
    :data:`COUNT_LIMIT`: past any video it means the whole video, and past int64 or a float's range the plan's
    arithmetic overflowed at the first step with a bare OverflowError naming no field."""
    value = check_int(value, field, minimum)
    if value > COUNT_LIMIT:
        raise ValueError(f"{field}: expected at most {COUNT_LIMIT:,} {unit} (more than a video can have; past a "
                         f"video's {unit} any value acts as the whole video), got an int of {value.bit_length()} bits")
    return value


def check_layer(layer: Any) -> int | None:
    """A layer index (an int >= 0) or None: methods record it and key their per-layer state by it."""
    return None if layer is None else check_int(layer, "layer", 0)


MAX_STEPS = 100_000   # denoising steps a session takes: more than any sampler's, checked before per-step arrays
MAX_LAYERS = 10_000   # a model's layers at most: more than any model's, checked before a list of layers is read


def check_num_steps(num_steps: Any, minimum: int = 1) -> int:
    """A run's step count, at least ``minimum`` and at most :data:`MAX_STEPS` (sessions keep per-step arrays)."""
    num_steps = check_int(num_steps, "num_steps", minimum)
    if num_steps > MAX_STEPS:
        raise ValueError(f"num_steps: expected at most {MAX_STEPS:,} denoising steps, got {num_steps:,}; pass the "
                         f"sampler's step count")
    return num_steps


def check_search_steps(method: str, warmup: int, searches: tuple[int, ...], num_steps: int,
                       given: Mapping[str, Any]) -> None:
    """A search schedule: at least one search step, all in ``[warmup, num_steps)``. ``given``: the caller's
    parameters, so that the message says which values are defaults and gives a schedule that fits ``num_steps``
    (the paper's fractions: the first 20% of the steps dense, searches at 20% and 60%)."""
    if searches and all(warmup <= s < num_steps for s in searches):
        return
    first = min(round(0.2 * num_steps), num_steps - 1)
    example = (f"warmup_steps={first}, search_steps="
               f"{tuple(sorted({first, min(max(round(0.6 * num_steps), first), num_steps - 1)}))}")
    if "warmup_steps" not in given and "search_steps" not in given:
        raise ValueError(f"num_steps: {method}'s default warmup_steps={warmup}, search_steps={searches} are the "
                         f"paper's schedule for 50 steps and need num_steps >= {searches[-1] + 1}, got {num_steps}; "
                         f"pass a schedule for {num_steps} steps, e.g. {example} (the paper's fractions of a run)")
    defaults = {name: "" if name in given else " (the default)" for name in ("warmup_steps", "search_steps")}
    raise ValueError(f"search_steps: expected steps in [warmup_steps={warmup}{defaults['warmup_steps']}, num_steps="
                     f"{num_steps}), got {shown(searches)}{defaults['search_steps']}; pass warmup_steps and "
                     f"search_steps that fit, e.g. {example}")


def check_sparse_steps(field: str, value: Any, given: Mapping[str, Any], dense: int, num_steps: int,
                       largest: Any) -> None:
    """Leading dense steps (``dense``, from ``field``'s ``value``) that leave a sparse step of the run: a method that
    would never run sparse is refused, as the integration refuses dense layers covering the model. ``given``: the
    caller's parameters (a default is named as one); ``largest``: the largest ``value`` that leaves one."""
    if dense < num_steps:
        return
    shown_value = value if not isinstance(value, int) or value < 10 ** 12 else f"an int of {value.bit_length()} bits"
    default = "" if field in given else " (the default)"
    raise ValueError(f"{field}: expected fewer than num_steps={num_steps} leading dense steps (the method would never "
                     f"run sparse), got {shown_value}{default}, which makes all {num_steps} steps dense; pass "
                     f"{field} <= {largest!r}, or run dense attention without a sparse method")


def check_step(step: Any, num_steps: int | None = None) -> int:
    step = check_int(step, "step", 0)
    if num_steps is not None and step >= num_steps:
        raise ValueError(f"step: expected 0 <= step < num_steps={num_steps}, got {step}")
    return step


def check_one_off_step(step: Any) -> int:
    """The step of a one-off ``plan()`` that runs a session of ``step + 1`` steps: below :data:`MAX_STEPS`, refused
    naming the step (the session's own check would name ``num_steps``, which its caller never passed)."""
    step = check_int(step, "step", 0)
    if step >= MAX_STEPS:
        got = f"{step:,}" if step < 10 ** 30 else f"an int of {step.bit_length()} bits"
        raise ValueError(f"step: expected 0 <= step < {MAX_STEPS:,} (the denoising steps a run may have), got {got}")
    return step


# ------------------------------------------------------------------ head shards
@dataclass(frozen=True)
class HeadShard:
    """Heads ``[start, stop)`` of ``total``: what one rank holds under head-parallel attention.

    Under Ulysses sequence parallelism (diffusers' ``ContextParallelConfig(ulysses_degree=N)``)
    the all-to-all leaves each rank the whole sequence for ``total / N`` consecutive heads. A
    session's ``plan(..., heads=shard)`` then gets ``q`` / ``k`` of those heads only and returns
    their mask: equal to ``plan(...)`` over all heads with the full ``q`` / ``k``, followed by
    ``select_heads(range(start, stop))``. ``gather`` maps a float64 tensor of per-head values of
    this shard (``[stop - start]``, on the compute device) to the values of all ``total`` heads in
    head order: an all-gather over the ranks holding the other shards, which methods whose
    choices couple heads call (AdaSpa ranks every head's recall). None means this shard is all
    there is (one process). ``num_kv_heads``: the model's key heads under grouped-query attention
    (query head ``h`` reads key head ``h // (total // num_kv_heads)``); the shard must hold whole
    groups and k its key heads only. None: a partial shard takes k of one key head per query head.
    """

    start: int
    stop: int
    total: int
    gather: Callable[[Any], Any] | None = None
    num_kv_heads: int | None = None

    @property
    def size(self) -> int:
        return self.stop - self.start

    @property
    def heads(self) -> range:
        return range(self.start, self.stop)

    def all_heads(self, values: Any) -> Any:
        """Per-head ``values`` (a torch tensor ``[size]``) of this shard extended to every head (``gather``)."""
        if self.size == self.total:
            return values
        if self.gather is None:
            raise ValueError(f"heads.gather: a shard of heads [{self.start}, {self.stop}) of {self.total} needs a "
                             f"gather over the other shards for this method, got None")
        gathered = self.gather(values)
        shape = tuple(getattr(gathered, "shape", ()))
        if shape != (self.total,) or not bool((gathered[self.start:self.stop] == values).all()):
            raise ValueError(f"heads.gather: expected the {self.total} heads' values with this shard's at "
                             f"[{self.start}, {self.stop}), got shape {shape}")
        return gathered


def check_shard(heads: Any, num_heads: int) -> HeadShard:
    """``heads`` (a :class:`HeadShard` or None for all heads) checked against ``num_heads``."""
    if heads is None:
        return HeadShard(0, num_heads, num_heads)
    if not isinstance(heads, HeadShard):
        raise TypeError(f"heads: expected a sparsecore.methods.HeadShard or None, got {type(heads).__name__}")
    start, stop = check_int(heads.start, "heads.start", 0), check_int(heads.stop, "heads.stop", 1)
    total = check_int(heads.total, "heads.total", 1)
    if heads.gather is not None and not callable(heads.gather):
        raise TypeError(f"heads.gather: expected None or a callable (per-head values of this shard -> every head's, "
                        f"an all-gather over the ranks), got {type(heads.gather).__name__}")
    if total != num_heads or not start < stop <= num_heads:
        raise ValueError(f"heads: expected 0 <= start < stop <= total == num_heads={num_heads}, got {heads}")
    if heads.num_kv_heads is not None:
        kv_heads = check_int(heads.num_kv_heads, "heads.num_kv_heads", 1)
        if total % kv_heads:
            raise ValueError(f"heads.num_kv_heads: expected the model's key heads, a divisor of total={total} query "
                             f"heads, got {kv_heads}; pass the key-head count of the whole model's k")
        group = total // kv_heads
        if start % group or stop % group:
            raise ValueError(f"heads: a shard of query heads [{start}, {stop}) splits a key-head group: "
                             f"num_kv_heads={kv_heads} of total={total} gives each key head {group} query heads, so "
                             f"expected start and stop multiples of {group}; shard whole groups (a Ulysses degree "
                             f"that divides the key heads)")
    return heads


def check_shard_keys(heads: HeadShard, num_kv_heads: int) -> None:
    """k of ``num_kv_heads`` key heads is the one a checked shard reads: those of its own query heads' groups."""
    if heads.num_kv_heads is None:
        if heads.size != heads.total and num_kv_heads != heads.size:
            raise ValueError(f"heads.num_kv_heads: k holds {num_kv_heads} key heads for the shard's {heads.size} query "
                             f"heads [{heads.start}, {heads.stop}) of {heads.total} (grouped-query attention), and "
                             f"the shard does not say the model's key heads; pass HeadShard(..., num_kv_heads=<the "
                             f"model's key heads>) so that it can be checked to hold whole groups")
        return
    expected = heads.size * heads.num_kv_heads // heads.total
    if num_kv_heads != expected:
        raise ValueError(f"k: expected the shard's {expected} key heads (query heads [{heads.start}, {heads.stop}) of "
                         f"{heads.total} on num_kv_heads={heads.num_kv_heads}), got {num_kv_heads}; pass k of this "
                         f"shard's key heads only")


def check_bidirectional(geometry: VideoGeometry, pattern: str) -> None:
    """Refuse a frame-causal geometry for a method whose ``pattern`` (said in the message) looks both ways."""
    if geometry.causal_frames:
        raise ValueError(f"geometry: {pattern}, got causal_frames={geometry.causal_frames}; use 'lvsa' for "
                         f"frame-causal attention")


def geometry_meta(geometry: VideoGeometry) -> dict[str, Any]:
    causal = {"causal_frames": geometry.causal_frames} if geometry.causal_frames else {}
    return {"frames": geometry.frames, "height": geometry.height, "width": geometry.width,
            "text_tokens": geometry.text_tokens, "text_position": geometry.text_position, **causal}


def check_qk(q: Any, k: Any, geometry: VideoGeometry, heads: HeadShard) -> tuple[Any, Any]:
    """q ``[B, heads.size, L, D]`` and k ``[B, H_kv, L, D]`` (a missing batch axis is added) over the geometry's tokens,
    k of the shard's key heads (:func:`check_shard_keys`)."""
    from sparsecore.inputs import as_batched, attention_shape
    num_heads = heads.size
    q, k = as_batched(q, "q"), as_batched(k, "k")
    shape = attention_shape(q, k)
    if not q.is_floating_point():
        raise TypeError(f"q, k: expected float tensors, got {q.dtype}")
    if shape.q_len != geometry.tokens or shape.kv_len != geometry.tokens or shape.num_heads != num_heads:
        raise ValueError(f"q, k: expected [B, {num_heads}, {geometry.tokens}, D] and [B, H_kv, {geometry.tokens}, D] "
                         f"for geometry {geometry}, got q {list(q.shape)} and k {list(k.shape)}")
    check_shard_keys(heads, shape.num_kv_heads)
    return q, k


def check_lse(lse: Any, q: Any, geometry: VideoGeometry, num_heads: int) -> Any:
    """A handed-in LSE as searches take it: None, or float32 ``[B, num_heads, L]`` with the batch of q
    (``[B, num_heads, L, D]``) on its device, or ``[num_heads, L]`` (given a batch axis) where q has none or is None.

    Returns a copy: a session keeps it for later searches, and the caller may reuse its buffer (a CUDA graph's
    static output, a workspace)."""
    import torch
    if lse is None:
        return None
    unbatched = q is None or len(q.shape) == 3
    batch = None if q is None else 1 if unbatched else q.shape[0]
    want = f"[{batch or 'B'}, {num_heads}, {geometry.tokens}]" + (f" or [{num_heads}, {geometry.tokens}]" * unbatched)
    if not isinstance(lse, torch.Tensor):
        raise TypeError(f"lse: expected a float32 torch tensor {want} (kernel(q, k, v, return_lse=True)), got "
                        f"{type(lse).__name__}")
    if lse.dtype != torch.float32:
        raise TypeError(f"lse: expected float32 natural-log LSE, got {lse.dtype} (use lse.float())")
    lse = lse[None] if unbatched and lse.dim() == 2 else lse
    device = q.device if isinstance(q, torch.Tensor) else lse.device
    if tuple(lse.shape[1:]) != (num_heads, geometry.tokens) or lse.dim() != 3 or batch not in (None, lse.shape[0]) \
            or lse.device != device:
        raise ValueError(f"lse: expected {want} on {device}, the LSE over the geometry's tokens of a dense pass over "
                         f"this q (kernel(q, k, v, return_lse=True)), got {list(lse.shape)} on {lse.device}")
    return lse.detach().clone()
