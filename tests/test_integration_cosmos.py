"""Cosmos (``CosmosTransformer3DModel``, diffusers 0.42, CPU): what its forwards bring beyond the shared cases of
test_integration_diffusers.py (video-to-world's conditioning channel and per-frame timesteps, its processor's use of
diffusers' active attention backend, no context parallelism)."""

from __future__ import annotations

import pytest
import torch
from context_parallel_run import fake_parallel_config
from diffusers import CosmosTransformer3DModel
from diffusers.models import attention_dispatch
from test_integration_diffusers import (CASES, FRAMES, HEIGHT, WIDTH, cosmos_inputs, forward, forward_applied,
                                        oracle_output, random_mask, tiny_cosmos)

from sparsecore import VideoGeometry
from sparsecore.integrations import diffusers as sparse
from sparsecore.integrations.diffusers import processors


def tiny_cosmos_video2world() -> CosmosTransformer3DModel:
    """The tiny Cosmos with one more input channel: video-to-world's conditioning mask (Predict2.5's 16 + 1)."""
    torch.manual_seed(0)
    return CosmosTransformer3DModel(in_channels=5, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                    num_layers=2, mlp_ratio=2.0, text_embed_dim=16, adaln_lora_dim=8,
                                    max_size=(16, 32, 32), concat_padding_mask=False, extra_pos_embed_type=None).eval()


def video2world(batch: int, sigma: float) -> dict:
    """Inputs as ``Cosmos2_5_PredictBasePipeline`` makes them: the first two latent frames conditioning (mask channel
    1, a small timestep), the others at ``sigma``; timesteps ``[B, 1, F, 1, 1]``."""
    inputs = cosmos_inputs(batch=batch)
    condition = torch.zeros(batch, 1, FRAMES, 2 * HEIGHT, 2 * WIDTH)
    condition[:, :, :2] = 1.0
    frames = torch.full((batch, 1, FRAMES, 1, 1), sigma)
    frames[:, :, :2] = 0.0001
    return {**inputs, "condition_mask": condition, "timestep": frames}


def run(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def test_video2world_conditioning_frames_run_the_masks_exactly_and_steps_follow_the_noisiest_frame(monkeypatch):
    """The conditioning frames are latent frames of the grid (a channel marks them): the sparse mask matches the float64
    oracle; the step follows the largest of the per-frame timesteps (the conditioning frames' stay small)."""
    case = CASES["cosmos"]
    model, inputs = tiny_cosmos_video2world(), video2world(batch=2, sigma=0.9)
    dense = run(model, inputs)
    expected, _ = oracle_output(case, model, inputs, random_mask, 0, 0.0, monkeypatch,
                                call=lambda m, data, t: run(m, data))
    handle = sparse.apply(model, method=random_mask, device="cpu", num_steps=3)
    steps = []
    try:
        got = run(model, inputs)
        steps.append(handle.step)
        for sigma in (0.9, 0.6, 0.6, 0.3):                       # the uncond forward of a step repeats its sigma
            run(model, video2world(batch=2, sigma=sigma))
            steps.append(handle.step)
    finally:
        handle.remove()
    assert handle.geometry == VideoGeometry(FRAMES, HEIGHT, WIDTH)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=5e-6)
    assert (got - dense).abs().max() > 5e-3                      # the mask matters
    assert steps == [0, 0, 1, 1, 2]


def test_dense_steps_dispatch_at_the_active_backend_as_the_original_does(monkeypatch):
    """``CosmosAttnProcessor2_0`` passes diffusers' dispatch no backend, so it runs the active one (an
    ``attention_backend`` context, or ``set_attention_backend``'s): sparsecore's dense steps do the same, and a backend
    chosen so is not replaced by a faster dense op (one is looked for only on the default, ``native``)."""
    registry = attention_dispatch._AttentionBackendRegistry
    name = attention_dispatch.AttentionBackendName("_native_math")
    calls, real = [], registry._backends[name]
    monkeypatch.setitem(registry._backends, name, lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    looked = []
    monkeypatch.setattr(processors, "faster_dense", lambda *args: looked.append(1))
    model, inputs = tiny_cosmos(), cosmos_inputs(batch=1)
    with attention_dispatch.attention_backend("_native_math"):
        expected = forward(model, inputs, 999.0)
        original_calls = len(calls)
        got = forward_applied(model, inputs, 999.0)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert original_calls > 0 and len(calls) == 2 * original_calls and looked == []
    forward_applied(model, inputs, 999.0)                       # on the default backend the faster op is sought
    assert len(calls) == 2 * original_calls and len(looked) == len(CASES["cosmos"].attention(model))


def test_lvsa_takes_the_cosmos_horizon_by_default():
    """24 latent frames (Predict2 and 2.5's 93 frames, 4x temporal compression) unless given."""
    handle = sparse.apply(tiny_cosmos(), method="lvsa", device="cpu")
    handle.remove()
    assert handle.params["reference_frames"] == 24


def test_context_parallelism_is_refused_at_apply_and_before_the_forward_runs():
    """diffusers has no plan for Cosmos, and its processor keeps no parallel config: ``enable_parallelism`` with a
    plan of the user's own leaves its config on the transformer, which is refused at ``apply``, or, set after it,
    before any step counts."""
    message = (r"transformer: CosmosTransformer3DModel under context parallelism is not supported by sparsecore "
               r"\(diffusers has no plan for it\)")
    model = tiny_cosmos()
    model._parallel_config = fake_parallel_config(ulysses_degree=2)
    with pytest.raises(ValueError, match=message):
        sparse.apply(model, method="lvsa", device="cpu")
    assert all(type(m.processor).__name__ == "CosmosAttnProcessor2_0" for m in CASES["cosmos"].attention(model))
    model._parallel_config = None
    handle = sparse.apply(model, method="lvsa", device="cpu")
    try:
        model._parallel_config = fake_parallel_config(ulysses_degree=2)
        with pytest.raises(ValueError, match=message):
            forward(model, cosmos_inputs(batch=1), 999.0)
        assert handle.step is None
    finally:
        handle.remove()
