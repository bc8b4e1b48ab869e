"""SkyReels-V2 with diffusion forcing's causal blocks (``num_frame_per_block`` > 1) through sparsecore.

The model's forward masks attention frame-causally with an ``[1, 1, L, L]`` token mask. The oracle is the float64
masked softmax of ``test_integration_diffusers`` (diffusers' own processors, its dispatch replaced), which applies
the model's token mask itself and the plan's mask expanded to tokens; what a token may see is written here from
token positions alone.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from oracle import expand_to_tokens
from test_integration_diffusers import (CASES, FRAMES, HEIGHT, WIDTH, METHODS, forward, oracle_output, random_mask,
                                        tiny_skyreels_v2, wan_inputs)

from sparsecore import BlockMask, VideoGeometry
from sparsecore.integrations import diffusers as sparse
from sparsecore.integrations.diffusers.planner import VISIBLE_BLOCKS

CAUSAL_FRAMES = 2
GEOMETRY = VideoGeometry(FRAMES, HEIGHT, WIDTH, causal_frames=CAUSAL_FRAMES)


def visible_tokens() -> np.ndarray:
    group = np.arange(FRAMES * HEIGHT * WIDTH) // (HEIGHT * WIDTH) // CAUSAL_FRAMES
    return group[None, :] <= group[:, None]


def causal_case():
    case = CASES["skyreels-v2"]
    return case, tiny_skyreels_v2(frames_per_block=CAUSAL_FRAMES), case.inputs(batch=2)


def test_a_callables_mask_runs_as_float64_attention_under_the_models_causal_mask(monkeypatch):
    """A caller's random masks list later causal blocks too: they leave the mask, and the output is the oracle's
    (the model's own causal token mask and the random mask); the same masks without causal blocks give another."""
    case, model, inputs = causal_case()
    expected, _ = oracle_output(case, model, inputs, random_mask, 0, 999.0, monkeypatch)
    handle = sparse.apply(model, method=random_mask, device="cpu", num_steps=1)
    handle.keep_masks(True)
    try:
        got = forward(model, inputs, 999.0)
        masks = [handle.mask(layer) for layer in range(2)]
    finally:
        handle.remove()
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=5e-6)
    assert handle.geometry == GEOMETRY
    for mask in masks:
        tokens = expand_to_tokens(mask)
        assert not (tokens & ~visible_tokens()).any() and mask.meta["causal_frames"] == CAUSAL_FRAMES
    free = tiny_skyreels_v2()
    handle = sparse.apply(free, method=random_mask, device="cpu", num_steps=1)
    try:
        assert (forward(free, inputs, 999.0) - got).abs().max() > 1e-2           # causality changes the output
    finally:
        handle.remove()


def test_dense_steps_run_every_visible_block_as_the_models_own_masked_attention():
    """PASA's dense steps (and its dense first layer) run the kernel of every block a row may see, not the model's
    L x L token mask: the model's own output, and stats say which kernel ran."""
    _, model, inputs = causal_case()
    reference = forward(model, inputs, 999.0)
    handle = sparse.apply(model, method="pasa", device="cpu", num_steps=4, **METHODS["pasa"])
    try:
        got = forward(model, inputs, 999.0)
    finally:
        handle.remove()
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)
    assert {row["dense_kernel"] for row in handle.stats()} == {VISIBLE_BLOCKS}


BIDIRECTIONAL = ("radial", "sta")      # methods whose pattern has no frame-causal form: they refuse such models


@pytest.mark.parametrize("method", sorted(set(METHODS) - set(BIDIRECTIONAL)))
def test_method_sessions_plan_only_visible_blocks_and_run_them_exactly(method, monkeypatch):
    """Every mask a method plans for the causal model lists only blocks its rows may see (PASA without its
    approximation, which would add the later blocks), and a sparse step's output is the oracle's under those masks."""
    case, model, inputs = causal_case()
    handle = sparse.apply(model, method=method, device="cpu", num_steps=4, **METHODS[method])
    handle.keep_masks(True)
    recorded = {}
    try:
        for timestep in (999.0, 750.0, 500.0):
            out = forward(model, inputs, timestep)
            recorded = {layer: handle.mask(layer) for layer in range(2)}
    finally:
        handle.remove()
    assert any(mask is not None and mask.density() < 0.6 for mask in recorded.values())
    last = [row for row in handle.stats() if row["step"] == 2]
    for row in last:                               # density: a fraction of the pairs the causal model computes
        mask = recorded[row["layer"]]
        kept = 1.0 if mask is None else expand_to_tokens(mask).sum() / (mask.num_heads * visible_tokens().sum())
        assert row["density"] == pytest.approx(kept, rel=1e-12)
    for mask in recorded.values():
        if mask is not None:
            assert not (expand_to_tokens(mask) & ~visible_tokens()).any()
            assert mask.unselected.kind == "drop"

    def provider(geometry, heads, step, layer):
        mask = recorded[layer]
        return BlockMask.full(heads, geometry.tokens, geometry.tokens, 64) if mask is None else mask

    expected, _ = oracle_output(case, model, inputs, provider, 2, 500.0, monkeypatch)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=5e-6)


@pytest.mark.parametrize("method, approximation", [("pasa", "grouped-first-order"), ("adaspa", "zeroth")])
def test_an_explicit_approximation_is_refused_and_the_pipeline_may_switch_causal_blocks_on_after_apply(method,
                                                                                                      approximation):
    """Refused at the first forward, a dense step (it was at the first sparse step, after every dense step ran)."""
    _, model, inputs = causal_case()
    handle = sparse.apply(model, method=method, device="cpu", num_steps=4, approximation=approximation,
                          **METHODS[method])
    try:
        with pytest.raises(ValueError, match="approximation: .*approximation='drop'"):
            forward(model, inputs, 999.0)
        assert handle.stats() == []                              # refused before the layer planned anything
    finally:
        handle.remove()
    free = tiny_skyreels_v2()
    handle = sparse.apply(free, method="lvsa", device="cpu", num_steps=2, **METHODS["lvsa"])
    try:
        forward(free, inputs, 999.0)
        free._set_ar_attention(CAUSAL_FRAMES)                    # as the diffusion-forcing pipelines do
        forward(free, inputs, 500.0)
        assert handle.geometry == GEOMETRY
        assert not (expand_to_tokens(handle.mask(1)) & ~visible_tokens()).any()
    finally:
        handle.remove()


def test_a_callables_blocks_that_cross_a_causal_block_are_refused_naming_the_block():
    """A sparse mask on blocks that cross causal blocks has no exact cut; a full one on any blocks keeps every block
    each row may see (the model's own output)."""
    _, model, inputs = causal_case()
    reference = forward(model, inputs, 999.0)

    def crossing(geometry, heads, step, layer):
        offsets = np.arange(0, geometry.tokens + 1, 96).tolist() + [geometry.tokens]
        return BlockMask.from_dense(np.eye(len(offsets) - 1, dtype=bool)[None].repeat(heads, 0), geometry.tokens,
                                    geometry.tokens, 96)

    handle = sparse.apply(model, method=crossing, device="cpu", num_steps=1)
    try:
        with pytest.raises(ValueError, match=r"offsets: block 1 \(tokens 96\.\.192\) crosses"):
            forward(model, inputs, 999.0)
    finally:
        handle.remove()
    handle = sparse.apply(model, method=lambda g, h, s, layer: BlockMask.full(h, g.tokens, g.tokens, 96),
                          device="cpu", num_steps=1)
    try:
        torch.testing.assert_close(forward(model, inputs, 999.0), reference, rtol=1e-5, atol=1e-5)
    finally:
        handle.remove()
    rows = handle.stats()              # every visible pair kept: the dense path, as a full mask takes without causality
    assert {(row["backend"], row["dense_kernel"], row["density"]) for row in rows} == {("dense", VISIBLE_BLOCKS, 1.0)}


def test_an_audit_measures_against_the_models_causal_attention():
    """The audit's dense side is the causal one: a mask of every visible block but one (head 0's last query block
    drops key block 0) keeps nearly all the mass, where against all L^2 pairs it would keep about 0.75 (two causal
    blocks); the dropped block shows in the worst row. (Every visible block kept runs the dense path: no audit.)"""
    _, model, inputs = causal_case()

    def all_but_one(geometry, heads, step, layer):
        keep = np.ones((heads, geometry.tokens // 64, geometry.tokens // 64), dtype=bool)
        keep[0, -1, 0] = False
        return BlockMask.from_dense(keep, geometry.tokens, geometry.tokens, 64)

    handle = sparse.apply(model, method=all_but_one, device="cpu", num_steps=1)
    handle.audit(True)
    try:
        forward(model, inputs, 999.0)
    finally:
        handle.remove()
    rows = handle.stats()
    assert rows and all(row["recall"] > 0.97 and row["min_recall"] < 0.999 for row in rows)


def test_a_single_latent_frame_model_input_keeps_the_model_path():
    """``num_frame_per_block=1`` is no causal mask in diffusers: the geometry has no causal frames."""
    model = tiny_skyreels_v2()
    handle = sparse.apply(model, method=random_mask, device="cpu", num_steps=1)
    try:
        forward(model, wan_inputs(batch=1), 999.0)
    finally:
        handle.remove()
    assert handle.geometry.causal_frames == 0


def test_the_forward_builds_no_token_mask_and_the_config_is_restored_after_it():
    """While sparsecore runs the forward the model's setting reads 1 (no ``[1, 1, L, L]`` mask is built: its blocks
    get None), and after it (also after a forward that raised) the model's own setting is back."""
    _, model, inputs = causal_case()
    seen = []
    hook = model.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[4]))
    handle = sparse.apply(model, method=random_mask, device="cpu", num_steps=2)
    try:
        forward(model, inputs, 999.0)
        assert seen == [None] and model.config.num_frame_per_block == CAUSAL_FRAMES
        with pytest.raises(RuntimeError):                          # the patch embedding takes 4 channels, not 3
            forward(model, {**inputs, "hidden_states": inputs["hidden_states"][:, :3]}, 999.0)
        assert model.config.num_frame_per_block == CAUSAL_FRAMES and handle.geometry == GEOMETRY
    finally:
        handle.remove()
        seen.clear()
    forward(model, inputs, 999.0)
    hook.remove()
    assert seen[0] is not None and tuple(seen[0].shape) == (1, 1, GEOMETRY.tokens, GEOMETRY.tokens)


def test_latent_frames_that_are_not_whole_causal_blocks_are_refused_as_the_model_would():
    _, model, inputs = causal_case()
    handle = sparse.apply(model, method=random_mask, device="cpu", num_steps=1)
    try:
        with pytest.raises(ValueError, match="7 latent frames are not a multiple .*num_frame_per_block=2"):
            forward(model, {**inputs, "hidden_states": inputs["hidden_states"][:, :, :7]}, 999.0)
        assert model.config.num_frame_per_block == CAUSAL_FRAMES
    finally:
        handle.remove()


def test_pasas_default_under_ring_is_not_refused_for_a_causal_model():
    """PASA drops unkept blocks under causal frames unless told otherwise, so ring attention takes its default (the
    refusal used to read the method's parameter, which approximates): the forward gets past the refusal to the
    shards' check, which this unsharded input fails."""
    from context_parallel_run import fake_parallel_config
    _, model, inputs = causal_case()
    handle = sparse.apply(model, method="pasa", device="cpu", num_steps=5)
    for block in model.blocks:
        block.attn1.processor._parallel_config = fake_parallel_config(ring_degree=2)
    try:
        with pytest.raises(ValueError, match=r"hidden_states: under ring degree 2 x Ulysses degree 1 layer 0"):
            forward(model, inputs, 999.0)
        assert handle._planner.approximation(GEOMETRY) == "drop"
    finally:
        for block in model.blocks:
            block.attn1.processor._parallel_config = None
        handle.remove()


@pytest.mark.parametrize("method", BIDIRECTIONAL)
def test_bidirectional_methods_refuse_a_causal_model_naming_one_that_plans_it(method):
    _, model, inputs = causal_case()
    handle = sparse.apply(model, method=method, device="cpu", num_steps=4, **METHODS[method])
    try:
        with pytest.raises(ValueError, match="causal_frames=.*use 'lvsa'"):
            forward(model, inputs, 500.0)
        assert not [row for row in handle.stats() if row["backend"] != "dense"]      # no sparse layer ran
    finally:
        handle.remove()


def test_remove_drops_the_full_masks_of_dense_steps_and_their_kernels():
    """A frame-causal dense step runs the kernel of the planner's full mask, which stays for the next run; remove()
    drops it with the plans (the handle, kept to read stats(), held it)."""
    import gc
    import weakref
    import warnings
    model, inputs = tiny_skyreels_v2(frames_per_block=2), wan_inputs(batch=1)
    handle = sparse.apply(model, method="adaspa", device="cpu", num_steps=3, warmup_steps=1, search_steps=(1, 2),
                          sparsity=0.6, block_size=32)
    forward(model, inputs, 999.0)                                    # AdaSpa's dense step 0 on causal frames
    assert handle.stats()[0]["dense_kernel"] == VISIBLE_BLOCKS
    kernels = [weakref.ref(mask.derived["full kernel"]) for mask in handle._planner._full.values()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                              # the run stopped short of num_steps
        handle.set_step(None)                                        # a new run keeps them
        alive = sum(kernel() is not None for kernel in kernels)
        assert kernels and alive == len(kernels)
        handle.remove()
    gc.collect()
    assert [kernel() for kernel in kernels] == [None] * len(kernels)


def test_an_interrupted_forward_leaves_the_models_causal_setting_to_the_next_forward_or_remove():
    """The handle suspends SkyReels-V2's ``num_frame_per_block`` during a forward; torch runs the post-forward hook
    on an ``Exception`` only, so after a ``KeyboardInterrupt`` (Ctrl-C in a notebook) the next forward, or remove(),
    puts it back: that forward is frame-causal, the model after remove() too."""
    import warnings
    model, inputs = tiny_skyreels_v2(frames_per_block=2), wan_inputs(batch=1)
    alone = forward(model, inputs, 999.0)
    handle = sparse.apply(model, method=random_mask, device="cpu", num_steps=3)
    block, original = model.blocks[1], model.blocks[1].forward

    def interrupted_forward(*args, **kwargs):
        raise KeyboardInterrupt
    for then_remove in (False, True):
        block.forward = interrupted_forward
        with pytest.raises(KeyboardInterrupt):
            forward(model, inputs, 999.0)
        block.forward = original
        if then_remove:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")                      # the run stopped short of num_steps
                handle.remove()
            assert model.config.num_frame_per_block == 2
            torch.testing.assert_close(forward(model, inputs, 999.0), alone)
        else:
            forward(model, inputs, 999.0)
            assert handle.geometry.causal_frames == 2 and model.config.num_frame_per_block == 2


def test_a_causal_block_size_the_pipeline_sets_after_an_interrupted_forward_stands():
    """After a Ctrl-C, the next generation's pipeline set its causal block size (``_set_ar_attention(4)``) before
    the first forward, whose hook then wrote the interrupted forward's 2 back over it: that run attended in blocks of
    2 against the 4 asked, and the model kept 2 after remove()."""
    model = tiny_skyreels_v2(frames_per_block=2)
    inputs = wan_inputs(batch=1)                                       # 8 latent frames
    handle = sparse.apply(model, method=random_mask, device="cpu", num_steps=3)
    block, original = model.blocks[1], model.blocks[1].forward

    def interrupted_forward(*args, **kwargs):
        raise KeyboardInterrupt
    block.forward = interrupted_forward
    with pytest.raises(KeyboardInterrupt):
        forward(model, inputs, 999.0)
    block.forward = original
    model._set_ar_attention(4)
    forward(model, inputs, 999.0)
    assert handle.geometry.causal_frames == 4 and model.config.num_frame_per_block == 4


@pytest.mark.parametrize("causal_frames, kept", [(1, False), (2, True), (4, True)])
def test_pasas_default_approximation_is_dropped_only_where_causal_frames_hide_blocks(causal_frames, kept):
    """The integration plans PASA with 'drop' on a frame-causal geometry only where a causal block hides later frames
    (more frames than one block, as methods.approximation.check_causal refuses); otherwise its default stays."""
    from sparsecore.integrations.diffusers.planner import Planner
    from sparsecore.integrations.diffusers.stats import Stats
    planner = Planner("pasa", {}, "cpu", None, 4, Stats())
    approximation = planner.approximation(VideoGeometry(2, 8, 8, causal_frames=causal_frames))
    assert approximation.startswith("grouped-first-order") if kept else approximation == "drop"
