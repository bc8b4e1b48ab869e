"""LTX-2 (``LTX2VideoTransformer3DModel``) with sparsecore: what its video self-attention adds to the shared cases.

The oracle, remove(), steps and methods run in tests/test_integration_diffusers.py's "ltx2" case (its plain processor,
interleaved RoPE, no gates). Here: the per-head gates, split RoPE and spatio-temporal guidance's perturbed processor
against the float64 oracle, a layer that guidance perturbs in every sample, the grid (patches, ``video_coords``) and
the refusals.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from context_parallel_run import fake_parallel_config
from test_integration_ltx import refused_before_any_step, taken_as_the_grid
from test_integration_diffusers import (CASES, FRAMES, HEIGHT, WIDTH, forward, ltx2_inputs, oracle_output, random_mask,
                                        tiny_ltx2)

from sparsecore import BlockMask
from sparsecore.integrations import diffusers as sparse

GUIDED = {"gated_attn": True, "rope_type": "split", "perturbed_attn": True}


@pytest.mark.parametrize("stg", [None, [0.0, 1.0], [0.0, 0.0]], ids=["no-guidance", "one-sample", "every-sample"])
def test_gates_split_rope_and_guidance_match_float64_masked_attention(stg, monkeypatch):
    """Spatio-temporal guidance on layer 1: ``perturbation_mask`` 0 takes the values for that sample, 1 the attention;
    with every sample perturbed the layer runs no attention (the op is not called; the next forward runs as this
    one)."""
    case = CASES["ltx2"]
    model = tiny_ltx2(**GUIDED)
    inputs = ltx2_inputs(batch=2, model=model)
    if stg is not None:
        inputs.update(spatio_temporal_guidance_blocks=[1], perturbation_mask=torch.tensor(stg))
    dense = forward(model, inputs, 500.0)
    expected, _ = oracle_output(case, model, inputs, random_mask, 0, 500.0, monkeypatch)
    handle = sparse.apply(model, method=random_mask, device="cpu")
    try:
        got = forward(model, inputs, 500.0)
        again = forward(model, inputs, 500.0)                     # the next forward: the same layers, the same masks
    finally:
        handle.remove()
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=5e-6)
    torch.testing.assert_close(again, got)
    assert (got - dense).abs().max() > 5e-3
    layers = [row["layer"] for row in handle.stats()]
    assert sorted(set(layers)) == ([0] if stg == [0.0, 0.0] else [0, 1])


@pytest.mark.parametrize("height", [2 * HEIGHT, 2 * HEIGHT - 1], ids=["whole-patches", "a-part-patch"])
def test_the_geometry_is_the_forwards_grid_cut_by_the_patches(height):
    """Patches of 2 cut a latent height of 15 into 8 rows of tokens, as its coordinates (``arange(0, 15, 2)``)."""
    model = tiny_ltx2(in_channels=16, out_channels=16, patch_size=2)
    coords = model.rope.prepare_video_coords(1, FRAMES, height, 2 * WIDTH, torch.device("cpu"))
    inputs = {**ltx2_inputs(batch=1, model=model), "height": height, "width": 2 * WIDTH, "video_coords": coords,
              "hidden_states": torch.randn(1, FRAMES * HEIGHT * WIDTH, 16, generator=torch.Generator().manual_seed(2))}
    seen = []

    def full(geometry, heads, step, layer):
        seen.append(geometry)
        return BlockMask.full(heads, geometry.tokens, geometry.tokens, 64)
    expected = forward(model, inputs, 999.0)
    handle = sparse.apply(model, method=full, device="cpu")
    try:
        got = forward(model, inputs, 999.0)
        without_coords = forward(model, {**inputs, "video_coords": None}, 999.0)     # its forward makes the same
    finally:
        handle.remove()
    assert {(g.frames, g.height, g.width, g.text_tokens) for g in seen} == {(FRAMES, HEIGHT, WIDTH, 0)}
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(without_coords, got)


def positional(inputs: dict) -> tuple:
    """The forward's arguments by position up to ``video_coords`` (the 16th), as a caller may pass them."""
    names = ("hidden_states", "audio_hidden_states", "encoder_hidden_states", "audio_encoder_hidden_states",
             "timestep", "audio_timestep", "sigma", "audio_sigma", "encoder_attention_mask",
             "audio_encoder_attention_mask", "num_frames", "height", "width", "fps", "audio_num_frames",
             "video_coords")
    return tuple(inputs.get(name) for name in names)


@pytest.mark.parametrize("change", [
    lambda model, inputs: {"fps": 25.0},                          # the coordinates' 24 fps: the forward reads none
    lambda model, inputs: {"fps": None},
    lambda model, inputs: {"video_coords": model.rope.prepare_video_coords(1, FRAMES, HEIGHT, WIDTH,
                                                                           torch.device("cpu"), fps=30.0)},
    lambda model, inputs: {"video_coords": inputs["video_coords"].double()},
    lambda model, inputs: {"hidden_states": inputs["hidden_states"].expand(2, -1, -1)},   # coordinates of batch 1
], ids=["another-fps-argument", "no-fps", "coordinates-at-30-fps", "float64-coordinates", "batch-1-coordinates"])
def test_the_grids_coordinates_at_any_fps_are_taken(change):
    model = tiny_ltx2()
    inputs = ltx2_inputs(batch=1, model=model)
    inputs.update(change(model, inputs))
    if inputs["hidden_states"].shape[0] == 2:
        inputs.update(audio_hidden_states=inputs["audio_hidden_states"].expand(2, -1, -1),
                      encoder_hidden_states=inputs["encoder_hidden_states"].expand(2, -1, -1),
                      audio_encoder_hidden_states=inputs["audio_encoder_hidden_states"].expand(2, -1, -1))
    taken_as_the_grid(model, inputs)


def test_a_forward_called_by_position_reads_its_grid_and_coordinates():
    model = tiny_ltx2()
    inputs = ltx2_inputs(batch=1, model=model)
    inputs["timestep"] = torch.full((1,), 999.0)
    off = {**inputs, "video_coords": shifted_coords(inputs)}
    handle = sparse.apply(model, method="lvsa", device="cpu")
    try:
        with torch.no_grad():
            model(*positional(inputs), return_dict=False)
            assert handle.geometry.tokens == FRAMES * HEIGHT * WIDTH
            with pytest.raises(ValueError, match=r"video_coords: expected the coordinates"):
                model(*positional(off), return_dict=False)
    finally:
        handle.remove()


def shifted_coords(inputs: dict) -> torch.Tensor:
    coords = inputs["video_coords"].clone()
    coords[:, 0] += 1.0                     # every token a second later: a conditioning layout, off the grid
    return coords


def late_frame(inputs: dict) -> torch.Tensor:
    coords = inputs["video_coords"].clone()
    coords[:, 0, -64:] = coords[:, 0, -128:-64]          # the last frame's 64 tokens at the frame before's time
    return coords


def moved_coords(inputs: dict, axis: int, end: int) -> torch.Tensor:
    coords = inputs["video_coords"].clone()
    coords[:, axis, 5, end] += 32.0         # one token's start (or end) a patch further: off the grid
    return coords


GRID = r"video_coords: expected the coordinates of the num_frames x height x width grid \(8, 8, 8\) for " \
       r"LTX2VideoTransformer3DModel .* got "


@pytest.mark.parametrize("change, message", [
    (lambda inputs: {"video_coords": shifted_coords(inputs)},
     GRID + r"time coordinates that are not the grid's frames over one fps"),
    (lambda inputs: {"video_coords": moved_coords(inputs, 0, 1)}, GRID + r"time coordinates"),
    (lambda inputs: {"video_coords": late_frame(inputs)}, GRID + r"time coordinates"),
    (lambda inputs: {"video_coords": inputs["video_coords"].expand(3, -1, -1, -1)},
     GRID + r"a tensor of shape \[3, 3, 512, 2\] \(expected \[1 or 1, 3, tokens, 2\]\)"),
    (lambda inputs: {"video_coords": moved_coords(inputs, 1, 0)}, GRID + r"height or width coordinates off the grid"),
    (lambda inputs: {"video_coords": moved_coords(inputs, 2, 1)}, GRID + r"height or width coordinates off the grid"),
    (lambda inputs: {"video_coords": -inputs["video_coords"]}, GRID + r"(time|height or width) coordinates"),
    (lambda inputs: {"video_coords": inputs["video_coords"][:, :, :-1]},
     GRID + r"a tensor of shape \[1, 3, 511, 2\] \(the grid's: \[1, 3, 512, 2\]\)"),
    (lambda inputs: {"video_coords": inputs["video_coords"].tolist()}, GRID + r"a list"),
    (lambda inputs: {"num_frames": FRAMES - 1}, r"hidden_states: expected num_frames x height x width = 448 tokens for "
                                                r"LTX2VideoTransformer3DModel, got 512"),
    (lambda inputs: {"width": 8.0}, r"num_frames, height, width: expected the forward's token grid as positive "
                                    r"integers for LTX2VideoTransformer3DModel \(the masks follow it\), got "
                                    r"\(8, 8, 8.0\)"),
    (lambda inputs: {"num_frames": None, "height": None, "width": None}, r"got \(None, None, None\); pass them"),
    (lambda inputs: {"video_self_attention_mask": torch.ones(1, 512, 512)},
     r"video_self_attention_mask: expected None for LTX2VideoTransformer3DModel with sparsecore applied \(the "
     r"block-mask IR cannot add a token mask\), got \[1, 512, 512\]; call handle.remove\(\)"),
])
def test_a_forward_off_its_grid_is_refused_before_it_runs(change, message):
    model = tiny_ltx2()
    inputs = ltx2_inputs(batch=1, model=model)
    refused_before_any_step(model, {**inputs, **change(inputs)}, message)


def test_context_parallelism_is_refused_before_the_forward_runs_naming_the_remedy():
    """diffusers' ``enable_parallelism`` (LTX-2 has a plan there) sets the config on the model and its processors."""
    model = tiny_ltx2()
    config = fake_parallel_config(ulysses_degree=2)
    model._parallel_config = config
    for module in model.modules():
        if hasattr(getattr(module, "processor", None), "_parallel_config"):
            module.processor._parallel_config = config
    refused_before_any_step(model, ltx2_inputs(batch=1, model=model),
                            r"transformer: LTX2VideoTransformer3DModel under context parallelism is not supported by "
                            r"sparsecore \(its video-to-audio attention reads every video token\); run it on one GPU")


def test_guidance_forwards_of_one_step_stay_on_it():
    """``LTX2Pipeline``'s step: classifier-free guidance on 2B samples, then spatio-temporal guidance (layer 1
    perturbed in every sample) and modality isolation on B, all at the step's timestep: one step each, one run."""
    model = tiny_ltx2(perturbed_attn=True)
    cfg, single = ltx2_inputs(batch=2, model=model), ltx2_inputs(batch=1, model=model)
    cfg["hidden_states"] = torch.cat([single["hidden_states"]] * 2)          # the latents twice, as the pipeline
    steps = []
    handle = sparse.apply(model, method="lvsa", device="cpu", num_steps=4)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")                                    # no "run ended before num_steps"
            for t in (1000.0, 750.0, 500.0, 250.0):
                forward(model, cfg, t)
                steps.append((handle._steps.run, handle.step))
                forward(model, {**single, "spatio_temporal_guidance_blocks": [1]}, t)
                steps.append((handle._steps.run, handle.step))
                forward(model, {**single, "isolate_modalities": True}, t)
                steps.append((handle._steps.run, handle.step))
    finally:
        handle.remove()
    assert steps == [(0, step) for step in range(4) for _ in range(3)]


def test_the_plain_processor_on_a_guided_model_gets_no_guidance_as_in_diffusers():
    """A perturbed-attention model whose ``attn1`` holds the plain processor: ``LTX2Attention`` drops the guidance
    arguments for it, so guidance changes nothing there; sparsecore's processor in its place does the same."""
    from diffusers.models.transformers.transformer_ltx2 import LTX2AudioVideoAttnProcessor
    model = tiny_ltx2(perturbed_attn=True)
    for block in model.transformer_blocks:
        block.attn1.set_processor(LTX2AudioVideoAttnProcessor())
    inputs = ltx2_inputs(batch=2, model=model)
    for stg in ([0.0, 1.0], [0.0, 0.0]):
        guided = {**inputs, "spatio_temporal_guidance_blocks": [1], "perturbation_mask": torch.tensor(stg)}
        expected = forward(model, guided, 999.0)
        handle = sparse.apply(model, method=lambda g, h, step, layer: BlockMask.full(h, g.tokens, g.tokens, 64),
                              device="cpu")
        try:
            got = forward(model, guided, 999.0)
        finally:
            handle.remove()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_another_processor_is_refused_naming_both_of_diffusers():
    model = tiny_ltx2()
    model.transformer_blocks[1].attn1.set_processor(torch.nn.Identity())
    with pytest.raises(TypeError, match=r"transformer_blocks\[1\]\.attn1\.processor: expected diffusers' "
                                        r"LTX2AudioVideoAttnProcessor or LTX2PerturbedAttnProcessor, got Identity"):
        sparse.apply(model, method="lvsa", device="cpu")


def test_the_same_coordinates_are_read_once_until_they_change(monkeypatch):
    """A pipeline passes one coordinates tensor to every forward: checked once (one host read), again after an
    in-place change, and refused once off the grid."""
    from sparsecore.integrations.diffusers import ltx
    checks, off_grid = [], ltx.off_grid
    monkeypatch.setattr(ltx, "off_grid", lambda *args: checks.append(1) or off_grid(*args))
    model = tiny_ltx2()
    inputs = ltx2_inputs(batch=1, model=model)
    handle = sparse.apply(model, method="lvsa", device="cpu")
    try:
        forward(model, inputs, 999.0)
        forward(model, inputs, 800.0)
        assert len(checks) == 1
        inputs["video_coords"][:, 0] += 1.0                 # in place: its version changes, and it is off the grid
        with pytest.raises(ValueError, match=r"video_coords: expected the coordinates"):
            forward(model, inputs, 600.0)
        assert len(checks) == 2
    finally:
        handle.remove()


def test_a_generation_under_inference_mode_reads_its_coordinates_at_every_forward():
    """Serving code runs the pipeline under ``torch.inference_mode()``: its coordinates are inference tensors, which
    have no version counter, and every forward raised reading it. They are now checked at each forward (an in-place
    change cannot be told), and the forwards match the model's own."""
    model = tiny_ltx2()
    with torch.inference_mode():
        inputs = ltx2_inputs(batch=1, model=model)
        expected = forward(model, inputs, 999.0)
        handle = sparse.apply(model, method="lvsa", device="cpu", num_steps=3)
        try:
            torch.testing.assert_close(forward(model, inputs, 999.0), expected)      # the tiny video: dense
            forward(model, inputs, 800.0)
            inputs["video_coords"][:, 0] += 1.0                 # in place, unseen by a version: read again, refused
            with pytest.raises(ValueError, match=r"video_coords: expected the coordinates"):
                forward(model, inputs, 600.0)
        finally:
            handle.remove()
