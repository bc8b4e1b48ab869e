"""Hostile arguments to the methods (LVSA, AdaSpa, PASA): their plans, sessions and parameters.

Every parameter of every method gets values that are wrong in type or range; every plan
argument (geometry, heads, step, layer, head shard, q and k) gets wrong types, shapes,
dtypes and non-finite values. Each must raise ValueError/TypeError naming the field (q and
k by name, not "meta"), within :func:`hostile.bounded`.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from hostile import refused

from sparsecore import VideoGeometry
from sparsecore.methods import HeadShard, adaspa, lvsa, pasa
from sparsecore.methods.contract import MAX_STEPS

G = VideoGeometry(6, 4, 4)                     # 96 tokens: blocks of 16 below
HEADS = 2
NAN, INF = math.nan, math.inf

NOT_INT = [True, 1.5, "3", None, [1], 2 + 0j]
NOT_BOOL = [1, 0, "yes", None, 1.0]
NOT_FRACTION = [-0.1, 1.1, NAN, INF, "0.5", True, None, [0.5]]
BAD = {
    "lvsa": {"window": [-1, *NOT_INT], "first_frames": [-1, *NOT_INT], "reference_frames": [0, -2, *NOT_INT],
             "anchor_rule": ["bogus", 3, None, ["auto"]], "anchor_interval": [0, -1, True, 1.5, "2"],
             "rotate": NOT_BOOL, "expand_window": NOT_BOOL, "sparsity_scale": [0.0, -1.0, NAN, INF, "1", True],
             "block_size": [0, -16, 16.0, "16", True], "sp_world": [0, -1, *NOT_INT],
             "approximation": ["bogus", 3, None, "drop:2", "grouped-first-order:0", "grouped-first-order:x",
                               "grouped-first-order:\u00b2", "grouped-first-order:" + "9" * 5000]},
    "adaspa": {"sparsity": NOT_FRACTION, "recall_threshold": NOT_FRACTION, "block_size": [0, *NOT_INT],
               "head_adaptive": NOT_BOOL, "warmup_steps": [-1, *NOT_INT],
               "search_steps": [[-1], [10, 10], "10", 10, [1.5], None, [True]],
               "scale": [0.0, -1.0, NAN, INF, "x", True, 10**400, Fraction(-(10**400), 3)], "impl": [3, None, ["auto"]],
               "approximation": ["bogus", 3], "first_search": ["lazy", 3, None, ["cached"]],
               "store": ["disk", 3, None, ["host"]]},
    "pasa": {"density": [0.0, *NOT_FRACTION], "dense_fraction": NOT_FRACTION, "min_density": [1.5, -0.5, NAN, "x"],
             "noise_scale": [-1.0, NAN, INF, "0.2", True], "seed": [-1, *NOT_INT], "block_size": [0, *NOT_INT],
             "dense_layers": [[-1], "0", [0, 0], 0, [0.5]], "group_size": [0, *NOT_INT],
             "approximation": ["bogus", 3], "scale": [0.0, NAN, "x", 10**400]},
}
MODULES = {"lvsa": lvsa, "adaspa": adaspa, "pasa": pasa}
CASES = [(method, name, value) for method, table in BAD.items() for name, values in table.items() for value in values]


@pytest.mark.parametrize("method, name, value", CASES, ids=[f"{m}-{n}-{v!r}" for m, n, v in CASES])
def test_every_parameter_refuses_wrong_values(method, name, value):
    refused(lambda: MODULES[method].session(num_steps=50, **{name: value}), name)


@given(method=st.sampled_from(sorted(MODULES)), name=st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12))
def test_unknown_parameters_are_named(method, name):
    from dataclasses import fields
    params = {"lvsa": lvsa.LVSAParams, "adaspa": adaspa.AdaSpaParams, "pasa": pasa.PASAParams}[method]
    assume(name not in {f.name for f in fields(params)} | {"profile"})
    refused(lambda: MODULES[method].session(num_steps=50, **{name: 1}), name)


@given(method=st.sampled_from(sorted(MODULES)),
       num_steps=st.sampled_from([0, -1, True, 1.5, "50", None, MAX_STEPS + 1, 10**13]))
def test_session_lengths(method, num_steps):
    """A claimed step count is checked before the session's per-step arrays (PASA's budgets) are built."""
    refused(lambda: MODULES[method].session(num_steps=num_steps), "num_steps")


def test_geometries_past_what_a_mask_describes_are_refused_at_construction():
    """Its offsets and token ids are int64 arrays: 4 x 2**31 x 2**31 wrapped to negative offsets and token id -1."""
    for shape in ((4, 2**31, 2**31), (60, 10**6, 10**6), (1, 1, 1, 2**31)):
        refused(lambda: VideoGeometry(*shape), "frames, height, width, text_tokens", types=(ValueError,))
    assert VideoGeometry(1, 1, 2**31 - 1).tokens == 2**31 - 1


def test_step_counts_past_any_sampler_are_refused_before_per_step_arrays():
    for call in (lambda: pasa.density_schedule(10**13, 0.15), lambda: pasa.CurvatureRecorder(10**13)):
        refused(call, "num_steps")
    assert len(pasa.density_schedule(MAX_STEPS, 0.15)) == MAX_STEPS


def test_values_of_the_right_type_out_of_range_are_value_errors():
    """A non-finite float is a float: ValueError (it was a TypeError 'expected a float, got float inf')."""
    for method, name in (("pasa", "noise_scale"), ("lvsa", "sparsity_scale"), ("adaspa", "recall_threshold")):
        for value in (INF, NAN):
            refused(lambda: MODULES[method].session(num_steps=50, **{name: value}), name, types=(ValueError,))
    refused(lambda: adaspa.session(num_steps=50, approximation="zeroth").plan("x", 2, step=20, layer=0), "geometry",
            types=(TypeError,))
    refused(lambda: lvsa.frame_pattern("x", 0), "geometry", types=(TypeError,))


def test_lvsa_refuses_what_it_cannot_plan_before_a_step_runs():
    causal = VideoGeometry(8, 4, 4, causal_frames=2)
    refused(lambda: lvsa.session(num_steps=50, approximation="zeroth").action(causal, 0), "approximation",
            types=(ValueError,))
    # the paper's anchor rule needs C > 2W + 1 whatever the length: refused at the session, not at a long video's
    # first step (short videos are dense and never asked)
    refused(lambda: lvsa.session(num_steps=50, anchor_rule="paper", window=3, reference_frames=7), "reference_frames",
            types=(ValueError,))
    assert lvsa.session(num_steps=50, anchor_rule="paper", window=3, reference_frames=8).params.window == 3


def test_lvsa_frame_counts_past_any_video_are_refused_at_the_session_naming_the_field():
    """Frame counts larger than any video: they were accepted, and the first step's arithmetic broke with a bare
    OverflowError naming no field ('Python int too large to convert to C long' for anchor_interval=2**63, 'int too
    large to convert to float' for reference_frames=10**400, 'integer division result too large for a float' for
    window=10**400). A scale that makes C cover every video is dense, as under the auto rule (the paper rule's check
    raised 'cannot convert float infinity to integer')."""
    geometry = VideoGeometry(30, 2, 2)
    for name, value in (("window", 10**400), ("reference_frames", 10**400), ("anchor_interval", 2**63),
                        ("anchor_interval", 10**400)):
        refused(lambda: lvsa.session(num_steps=50, **{name: value}).action(geometry, 1), name, types=(ValueError,))
    assert lvsa.session(num_steps=50, anchor_interval=2**31 - 1).plan(geometry, 1, step=1).meta["anchors"] == (0, 1)
    for rule in ("auto", "paper"):
        assert lvsa.session(num_steps=50, anchor_rule=rule, sparsity_scale=1e308).action(geometry, 1).dense


def test_session_relations_and_profiles():
    refused(lambda: adaspa.session(num_steps=20, search_steps=(10, 30)), "search_steps")
    refused(lambda: adaspa.session(num_steps=50, warmup_steps=20, search_steps=(10,)), "search_steps")
    refused(lambda: pasa.session(profile="x"), "profile")                       # the example
    refused(lambda: pasa.session(profile=[0.1, 0.2]), "profile")


def qk(heads=HEADS, tokens=G.tokens, dim=16, batch=1, dtype=torch.float32, kv_heads=HEADS):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(batch, heads, tokens, dim, generator=g).to(dtype),
            torch.randn(batch, kv_heads, tokens, dim, generator=g).to(dtype))


def planners():
    """(name, plan(**arguments)) for each method at a step where it plans with q and k."""
    return {
        "lvsa": lambda **a: lvsa.plan(a.pop("geometry", G), a.pop("num_heads", HEADS), step=a.pop("step", 0),
                                      reference_frames=2, **a),
        "adaspa": lambda **a: adaspa.plan(a.pop("geometry", G), a.pop("num_heads", HEADS), step=a.pop("step", 10),
                                          block_size=16, **a),
        "pasa": lambda **a: pasa.plan(a.pop("geometry", G), a.pop("num_heads", HEADS), step=a.pop("step", 20),
                                      block_size=16, **a),
    }


@given(method=st.sampled_from(sorted(MODULES)), argument=st.sampled_from([
    ("geometry", None), ("geometry", (6, 4, 4)), ("geometry", 96), ("geometry", VideoGeometry(10**9, 1, 1)),
    ("geometry", VideoGeometry(100_000, 2, 2)), ("geometry", VideoGeometry(60, 40_000, 800)),   # ~2**31 tokens
    ("num_heads", 0), ("num_heads", True), ("num_heads", 2.0), ("num_heads", -1),
    ("step", -1), ("step", True), ("step", 1.5), ("step", None), ("step", "3"),
    ("layer", -1), ("layer", 1.5), ("layer", [1]), ("layer", "a"), ("layer", True),
    ("heads", (0, 1, 2)), ("heads", HeadShard(1, 1, 2)), ("heads", HeadShard(0, 3, 3)),
    ("heads", HeadShard(-1, 1, 2))]))
def test_plan_arguments(method, argument):
    name, value = argument
    q, k = qk()
    field = "heads" if name == "heads" else name
    refused(lambda: planners()[method](**{name: value, "q": q, "k": k}), field)


def _bad_qk(kind: str):
    q, k = qk()
    if kind == "missing":
        return None, k, "q"
    if kind == "type":
        return q.tolist(), k, "q"
    if kind == "batch0":
        return (*qk(batch=0), "q")
    if kind == "dim0":
        return (*qk(dim=0), "q")
    if kind == "tokens":
        return (*qk(tokens=G.tokens - 1), "q, k")
    if kind == "heads":
        return (*qk(heads=3, kv_heads=3), "q, k")
    if kind == "gqa":
        return (*qk(kv_heads=3), "k")
    if kind == "dtype":
        return (*qk(dtype=torch.int32), "q, k")
    if kind == "rank":
        return q[0, 0], k, "q"
    if kind == "mismatch":
        return q, k.double(), "q, k"
    value = {"nan": NAN, "inf": INF, "-inf": -INF}[kind]
    q[0, 1, 7, 3] = value
    return q, k, "q, k"


@pytest.mark.parametrize("method", ["adaspa", "pasa"])
@pytest.mark.parametrize("kind", ["missing", "type", "batch0", "dim0", "tokens", "heads", "gqa", "dtype", "rank",
                                  "mismatch", "nan", "inf", "-inf"])
def test_q_and_k(method, kind):
    q, k, field = _bad_qk(kind)
    if method == "pasa" and kind in ("nan", "inf", "-inf"):
        # PASA plans on the device with no host read; checking finiteness would add a sync per layer and step.
        # Its mask is still a valid one, and the non-finite query rows give non-finite output in the kernel.
        assert planners()[method](q=q, k=k).num_heads == HEADS
        return
    refused(lambda: planners()[method](q=q, k=k), field)


def test_adaspa_names_q_and_k_for_non_finite_inputs_not_meta():
    """The issue: NaN in q for AdaSpa raised an error about ``meta``."""
    q, k = qk()
    q[0, 0, 0, 0] = NAN
    message = str(refused(lambda: adaspa.plan(G, HEADS, step=10, q=q, k=k, block_size=16), "q, k"))
    assert "meta" not in message


@pytest.mark.parametrize("method", sorted(MODULES))
def test_geometries_no_mask_can_describe_are_refused_before_planning(method):
    """A geometry claiming 10**9 frames made LVSA loop for minutes and AdaSpa's dense warm-up allocate 931 GiB."""
    for geometry in (VideoGeometry(10**9, 1, 1), VideoGeometry(10**6, 8, 8),
                     VideoGeometry(1, 1, 1, text_tokens=10**6)):       # text in frame-sized blocks: 10**6 + 1 blocks
        session = MODULES[method].session(num_steps=50)
        refused(lambda: session.plan(geometry, HEADS, step=0), "geometry")
    refused(lambda: lvsa.session(num_steps=50).action(VideoGeometry(10**9, 1, 1), 0), "geometry")


def test_block_sizes_too_small_for_one_mask_are_refused_before_planning():
    """Fixed blocks whose heads x blocks^2 exceeds the int32 index limit: LVSA retiled into a 133 GiB map, PASA
    pooled 107 GB of scores, and a selection of more than 2**31 - 1 entries wrapped its int32 row pointers."""
    wan6x = VideoGeometry(121, 30, 52)
    refused(lambda: lvsa.plan(wan6x, 12, step=0, block_size=1), "block_size")
    refused(lambda: pasa.plan(wan6x, 12, step=20, layer=1, block_size=4), "block_size")
    refused(lambda: adaspa.plan(wan6x, 12, step=20, layer=1, block_size=4), "block_size")
    text_heavy = VideoGeometry(1, 1, 2, text_tokens=16400)          # 16,402 one-token blocks: 8 x 16402^2 > 2**31
    refused(lambda: pasa.plan(text_heavy, 8, step=20, layer=1, block_size=1), "block_size")


def test_session_steps_beyond_the_run():
    for method in MODULES:
        session = MODULES[method].session(num_steps=12, **({"search_steps": (10,)} if method == "adaspa" else {}))
        refused(lambda: session.plan(G, HEADS, step=12), "step")
        refused(lambda: session.action(G, -1), "step")


def test_one_off_plans_at_a_step_past_any_run_name_the_step():
    """Radial's, STA's and NABLA's one-off plan() make a session of step + 1 steps: a step of 100,000 or more was
    refused as 'num_steps: expected at most 100,000 denoising steps, got 100,001', a field the caller never passed."""
    from sparsecore.methods import nabla, radial, sta
    geometry = VideoGeometry(2, 8, 8)
    q = k = torch.zeros(1, HEADS, geometry.tokens, 8)
    plans = {"radial": lambda step: radial.plan(geometry, HEADS, step=step, block_size=16),
             "sta": lambda step: sta.plan(geometry, HEADS, step=step, tile=(1, 4, 4), window=(1, 1, 1)),
             "nabla": lambda step: nabla.plan(geometry, HEADS, step=step, q=q, k=k)}
    for name, plan in plans.items():
        assert plan(MAX_STEPS - 1).num_heads == HEADS
        for step in (MAX_STEPS, 10**400):
            error = refused(lambda: plan(step), "step", types=(ValueError,))
            assert "num_steps" not in str(error), (name, str(error))


class Counted:
    """An iterable of ``n`` ints (no length) that counts the ones read."""

    def __init__(self, n: int) -> None:
        self.n, self.read = n, 0

    def __iter__(self):
        for i in range(self.n):
            self.read += 1
            yield i


def test_step_and_layer_lists_are_read_up_to_a_bound_and_shown_short():
    """``search_steps=range(10**6)`` (or PASA's ``dense_layers``) was checked item by item (0.8 s, linear in the
    claim) and AdaSpa's error printed every value (a 7.9 MB message); a list is now read up to what a run's steps or a
    model's layers can hold, and messages show a few values."""
    from sparsecore.methods.contract import MAX_LAYERS
    steps, layers = Counted(10**6), Counted(10**6)
    refused(lambda: adaspa.session(num_steps=50, search_steps=steps), "search_steps")
    refused(lambda: pasa.session(num_steps=50, dense_layers=layers), "dense_layers")
    assert steps.read <= MAX_STEPS + 1 and layers.read <= MAX_LAYERS + 1, (steps.read, layers.read)
    for call, field in ((lambda: adaspa.session(num_steps=50, search_steps=range(40, 5000)), "search_steps"),
                        (lambda: adaspa.session(num_steps=50, search_steps=[12] * 5000), "search_steps"),
                        (lambda: pasa.session(num_steps=50, dense_layers=[0] * 5000), "dense_layers"),
                        (lambda: adaspa.session(num_steps=50, search_steps=range(10**19)), "search_steps")):
        error = refused(call, field)
        assert len(str(error)) < 400, f"{len(str(error))} characters: {str(error)[:400]}"
