"""LTX-2 (``LTX2VideoTransformer3DModel``) with sparsecore: what its video self-attention adds to the shared cases.

The oracle, remove(), steps and methods run in tests/test_integration_diffusers.py's "ltx2" case (its plain processor,
interleaved RoPE, no gates). Here: the per-head gates, split RoPE and spatio-temporal guidance's perturbed processor
against the float64 oracle, a layer that guidance perturbs in every sample, the grid (patches, ``video_coords``) and
the refusals.
"""

from __future__ import annotations

import pytest
import torch
from context_parallel_run import fake_parallel_config
from test_integration_diffusers import (CASES, FRAMES, HEIGHT, WIDTH, forward, ltx2_inputs, oracle_output, random_mask,
                                        tiny_ltx2)

from sparsecore import BlockMask
from sparsecore.integrations import diffusers as sparse

GUIDED = {"gated_attn": True, "rope_type": "split", "perturbed_attn": True}


@pytest.mark.parametrize("stg", [None, [0.0, 1.0], [0.0, 0.0]], ids=["no-guidance", "one-sample", "every-sample"])
def test_gates_split_rope_and_guidance_match_float64_masked_attention(stg, monkeypatch):
    """Spatio-temporal guidance on layer 1: ``perturbation_mask`` 0 takes the values for that sample, 1 the attention;
    with every sample perturbed the layer runs no attention (the handle still counts it, so layer 0 of the next
    forward is layer 0)."""
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
        again = forward(model, inputs, 500.0)                     # the layer count starts over at the next forward
    finally:
        handle.remove()
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=5e-6)
    torch.testing.assert_close(again, got)
    assert (got - dense).abs().max() > 5e-3
    layers = [row["layer"] for row in handle.stats()]
    assert sorted(set(layers)) == ([0] if stg == [0.0, 0.0] else [0, 1])


def test_the_geometry_is_the_forwards_grid_cut_by_the_patches():
    model = tiny_ltx2(in_channels=16, out_channels=16, patch_size=2)
    coords = model.rope.prepare_video_coords(1, FRAMES, 2 * HEIGHT, 2 * WIDTH, torch.device("cpu"))
    inputs = {**ltx2_inputs(batch=1, model=model), "height": 2 * HEIGHT, "width": 2 * WIDTH, "video_coords": coords,
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


def shifted_coords(inputs: dict) -> torch.Tensor:
    coords = inputs["video_coords"].clone()
    coords[:, 0] += 1.0                     # every token a second later: a conditioning layout, off the grid
    return coords


@pytest.mark.parametrize("change, message", [
    (lambda inputs: {"fps": 25.0}, r"video_coords: expected the coordinates of the num_frames x height x width grid "
                                   r"for LTX2VideoTransformer3DModel .* got other coordinates \(\[1, 3, 512, 2\]\)"),
    (lambda inputs: {"video_coords": shifted_coords(inputs)}, r"video_coords: expected the coordinates"),
    (lambda inputs: {"video_coords": inputs["video_coords"][:, :, :-1]}, r"got other coordinates \(\[1, 3, 511, 2\]\)"),
    (lambda inputs: {"num_frames": FRAMES - 1}, r"hidden_states: expected num_frames x height x width = 448 tokens for "
                                                r"LTX2VideoTransformer3DModel, got 512"),
    (lambda inputs: {"width": 8.0}, r"num_frames, height, width: expected the forward's token grid as positive "
                                    r"integers for LTX2VideoTransformer3DModel, got \(8, 8, 8.0\)"),
])
def test_a_forward_off_its_grid_is_refused_before_it_runs(change, message):
    model = tiny_ltx2()
    inputs = ltx2_inputs(batch=1, model=model)
    inputs.update(change(inputs))
    handle = sparse.apply(model, method="lvsa", device="cpu")
    try:
        with pytest.raises(ValueError, match=message):
            forward(model, inputs, 999.0)
        assert handle.step is None
    finally:
        handle.remove()


def test_a_video_self_attention_mask_is_refused_naming_the_remedy():
    model = tiny_ltx2()
    inputs = {**ltx2_inputs(batch=1, model=model), "video_self_attention_mask": torch.ones(1, 512, 512)}
    handle = sparse.apply(model, method="lvsa", device="cpu")
    try:
        with pytest.raises(ValueError, match=r"attention_mask: LTX2VideoTransformer3DModel video self-attention "
                                             r"\(layer 0\) expected None, got a \[1, 512, 512\] mask"):
            forward(model, inputs, 999.0)
    finally:
        handle.remove()


def test_context_parallelism_is_refused_naming_the_remedy():
    model = tiny_ltx2()
    modules = CASES["ltx2"].attention(model)
    handle = sparse.apply(model, method="lvsa", device="cpu")
    try:
        for module in modules:
            module.processor._parallel_config = fake_parallel_config(ulysses_degree=2)
        with pytest.raises(ValueError, match=r"LTX2VideoTransformer3DModel under context parallelism is not supported"):
            forward(model, ltx2_inputs(batch=1, model=model), 999.0)
    finally:
        for module in modules:
            module.processor._parallel_config = None
        handle.remove()


def test_another_processor_is_refused_naming_both_of_diffusers():
    model = tiny_ltx2()
    model.transformer_blocks[1].attn1.set_processor(torch.nn.Identity())
    with pytest.raises(TypeError, match=r"transformer_blocks\[1\]\.attn1\.processor: expected diffusers' "
                                        r"LTX2AudioVideoAttnProcessor or LTX2PerturbedAttnProcessor, got Identity"):
        sparse.apply(model, method="lvsa", device="cpu")
