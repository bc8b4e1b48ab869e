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


@pytest.mark.parametrize("name", ["cosmos", "kandinsky-5", "cogvideox", "cogvideox-1.5", "wan-animate", "hunyuan-1.0"])
def test_context_parallelism_of_a_model_without_a_plan_is_refused_at_apply_and_before_the_forward_runs(name):
    """diffusers has no context-parallel plan for these models (nor sparsecore: ``ModelSpec.context_parallel``);
    ``enable_parallelism`` with a plan of the user's own leaves its config on the transformer (Cosmos's and CogVideoX's
    processors keep none), which is refused at ``apply``, or, set after it, before any step counts."""
    case = CASES[name]
    model = case.build()
    message = (rf"transformer: {type(model).__name__} under context parallelism is not supported by sparsecore "
               r"\(diffusers has no plan for it\)")
    model._parallel_config = fake_parallel_config(ulysses_degree=2)
    processors_before = [m.processor for m in case.attention(model)]
    with pytest.raises(ValueError, match=message):
        sparse.apply(model, method="lvsa", device="cpu")
    assert [m.processor for m in case.attention(model)] == processors_before          # untouched
    model._parallel_config = None
    handle = sparse.apply(model, method="lvsa", device="cpu")
    try:
        model._parallel_config = fake_parallel_config(ulysses_degree=2)
        with pytest.raises(ValueError, match=message):
            forward(model, case.inputs(batch=1), 999.0)
        assert handle.step is None
    finally:
        handle.remove()


def test_guidance_forwards_with_their_own_conditioning_noise_stay_on_one_step_in_bfloat16():
    """Cosmos 1.0's video-to-world draws the conditioning frames' noise apart for its two guidance forwards, which get
    one bfloat16 timestep: the forwards differ only on those leading frames and stay on one step (read on the last
    frame, the step does not take the second forward for the next step's colliding timestep)."""
    model = tiny_cosmos_video2world().to(torch.bfloat16)
    gen = torch.Generator().manual_seed(3)
    latents = torch.randn(1, 4, FRAMES, 2 * HEIGHT, 2 * WIDTH, generator=gen)
    condition = torch.zeros(1, 1, FRAMES, 2 * HEIGHT, 2 * WIDTH)
    condition[:, :, :1] = 1.0
    inputs = cosmos_inputs(batch=1)
    handle = sparse.apply(model, method="lvsa", device="cpu", num_steps=3)
    steps = []
    try:
        for sigma in (80.0, 20.0, 2.0):
            for _ in ("cond", "uncond"):
                noisy = latents.clone()
                noisy[:, :, :1] += 1e-3 * torch.randn(1, 4, 1, 2 * HEIGHT, 2 * WIDTH, generator=gen)
                run(model, {**inputs, "hidden_states": noisy.to(torch.bfloat16), "condition_mask": condition.bfloat16(),
                            "encoder_hidden_states": inputs["encoder_hidden_states"].bfloat16(),
                            "timestep": torch.tensor([sigma], dtype=torch.bfloat16)})
                steps.append(handle.step)
            latents = latents * 0.98 + 0.02 * torch.randn(latents.shape, generator=gen)     # the scheduler's step
    finally:
        handle.remove()
    assert steps == [0, 0, 1, 1, 2, 2]


def test_transfer_timesteps_follow_the_generated_frames_through_bfloat16_repeats():
    """Cosmos-Transfer2.5's timesteps ``[B, 1, F, 1, 1]``: its conditioning frame at 0.1, the others at sigmas rounded
    to bfloat16 in a float32 tensor (0.99502 and 0.99421 both read 0.99609) and, at the end, below 0.1. One step per
    sigma, each run twice (guidance), the latents moving between steps."""
    model = tiny_cosmos_video2world()
    gen = torch.Generator().manual_seed(4)
    latents = torch.randn(1, 4, FRAMES, 2 * HEIGHT, 2 * WIDTH, generator=gen)
    condition = torch.zeros(1, 1, FRAMES, 2 * HEIGHT, 2 * WIDTH)
    condition[:, :, :1] = 1.0
    sigmas = (0.99502, 0.99421, 0.5, 0.09, 0.05)
    handle = sparse.apply(model, method="lvsa", device="cpu", num_steps=len(sigmas))
    steps = []
    try:
        for sigma in sigmas:
            frames = torch.full((1, 1, FRAMES, 1, 1), torch.tensor(sigma).bfloat16().item())
            frames[:, :, :1] = 0.1
            for _ in ("cond", "uncond"):
                run(model, {**cosmos_inputs(batch=1), "hidden_states": latents, "condition_mask": condition,
                            "timestep": frames})
                steps.append(handle.step)
            latents = latents * 0.98 + 0.02 * torch.randn(latents.shape, generator=gen)
    finally:
        handle.remove()
    assert steps == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
