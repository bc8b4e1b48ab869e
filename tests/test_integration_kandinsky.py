"""Kandinsky 5 (``Kandinsky5Transformer3DModel``, diffusers 0.42, CPU): what its forward brings beyond the shared cases
of test_integration_diffusers.py (latents ``[B, F, H, W, C]``; NABLA's token order in 8 x 8 tiles of each frame; no
context parallelism)."""

from __future__ import annotations

import pytest
import torch
from context_parallel_run import fake_parallel_config
from test_integration_diffusers import (CASES, forward, full_mask, kandinsky_inputs, oracle_output, random_mask,
                                        tiny_kandinsky)
from test_integration_ltx import refused_before_any_step

from sparsecore import VideoGeometry
from sparsecore.integrations import diffusers as sparse

TILED = (4, 8, 16)      # frames, height, width of the token grid: two 8 x 8 tiles side by side a frame, 512 tokens


def tiled_inputs(batch: int, **nabla) -> dict:
    """Latents of the :data:`TILED` grid with NABLA's ``sparse_params`` (``to_fractal``: the forward puts each frame's
    tokens in 8 x 8 tiles) and ``nabla`` added to them."""
    frames, height, width = TILED
    gen = torch.Generator().manual_seed(5)
    inputs = kandinsky_inputs(batch=batch, fractal=True)
    inputs["hidden_states"] = torch.randn(batch, frames, 2 * height, 2 * width, 4, generator=gen)
    inputs["visual_rope_pos"] = [torch.arange(n) for n in TILED]
    inputs["sparse_params"].update(nabla)
    return inputs


def test_nabla_token_order_runs_the_masks_exactly(monkeypatch):
    """With NABLA's parameters the forward orders each frame's tokens in 8 x 8 tiles; frames stay together, so the
    masks apply as they come: the float64 oracle on the same order. NABLA's own mask is not built (its threshold and
    STA mask are ignored: a mask built from them would need FlexAttention and a ``sta_mask`` of the tiles)."""
    case = CASES["kandinsky-5"]
    model, inputs = case.build(), tiled_inputs(batch=2)
    raster = {**inputs, "sparse_params": None}
    dense, _ = oracle_output(case, model, inputs, full_mask, 0, 500.0, monkeypatch)     # NABLA's own needs its STA
    expected, _ = oracle_output(case, model, inputs, random_mask, 0, 500.0, monkeypatch)
    handle = sparse.apply(model, method=random_mask, device="cpu")
    try:
        got = forward(model, {**inputs, "sparse_params": {**inputs["sparse_params"], "P": 0.9, "sta_mask": None}},
                      500.0)
        in_raster = forward(model, raster, 500.0)
    finally:
        handle.remove()
    assert handle.geometry == VideoGeometry(*TILED)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=case.atol)
    assert (got.double() - dense).abs().max() > 5e-3           # the mask matters
    assert (got - in_raster).abs().max() > 5e-3                # and so does the order it meets the tokens in


def test_latents_lay_frames_height_width_then_channels():
    """The grid is read from ``[B, F, H, W, C]`` (patch 1 x 2 x 2); flattened latents name that layout in the error."""
    model, inputs = tiny_kandinsky(), kandinsky_inputs(batch=1)
    handle = sparse.apply(model, method="lvsa", device="cpu")
    try:
        forward(model, inputs, 999.0)
        assert handle.geometry == VideoGeometry(8, 8, 8)
        with pytest.raises(ValueError, match=r"hidden_states: expected a latent video \[B, F, H, W, C\] for "
                                             r"Kandinsky5Transformer3DModel, got \[1, 2048, 4\]"):
            forward(model, {**inputs, "hidden_states": inputs["hidden_states"].flatten(1, 3)}, 999.0)
    finally:
        handle.remove()


def test_lvsa_takes_the_kandinsky_horizon_by_default():
    """31 latent frames (its pipelines' 121 frames, 4x temporal compression), 61 for a NABLA configuration (its 10 s
    checkpoints, 241 frames), unless given."""
    for config, frames in (({}, 31), ({"attention_type": "nabla"}, 61)):
        model = tiny_kandinsky()
        model.register_to_config(**config)
        handle = sparse.apply(model, method="lvsa", device="cpu")
        handle.remove()
        assert handle.params["reference_frames"] == frames
    handle = sparse.apply(model, method="lvsa", device="cpu", reference_frames=40)
    handle.remove()
    assert handle.params["reference_frames"] == 40


def test_context_parallelism_is_refused_before_the_forward_runs():
    """diffusers has no plan for Kandinsky 5; a config of the user's own reaching its processors is refused."""
    model = tiny_kandinsky()
    handle = sparse.apply(model, method="lvsa", device="cpu")
    handle.remove()
    config = fake_parallel_config(ulysses_degree=2)
    for module in model.modules():
        if hasattr(getattr(module, "processor", None), "_parallel_config"):
            module.processor._parallel_config = config
    refused_before_any_step(model, kandinsky_inputs(batch=1),
                            r"transformer: Kandinsky5Transformer3DModel under context parallelism is not supported by "
                            r"sparsecore \(diffusers has no plan for it\); run it on one GPU")
