"""Generation loops that change between calls: CFG as two calls, guidance that stops, masks kept for inspection.

Each test failed before its fix (a review's reproducers, 2026-12-02):

- ``keep_masks(True)`` made PASA's second call of a step (CFG's other branch) reuse the first call's mask, where
  PASA plans from each call's own q, k: the switch meant for inspection changed the output.
- AdaSpa's cached search took the LSE kept at an earlier step whatever its batch: when guidance stopped (batch 2,
  then 1) the search raised.
- ``handle.mask(layer)`` returned the plan first inserted last, not the newest: an older step's mask of another
  text length on HunyuanVideo 1.5.
- A model with sparsecore applied was freed only by a garbage collection; a deep copy of it ran dense attention.
- A request whose first float32 timestep equalled the last forward's (after a 1-step warm-up or a cancelled
  request) continued that run: AdaSpa planned its sparse steps from the other request's search (6e-2 off).
"""

from __future__ import annotations

import copy
import gc
import io
import pickle
import weakref

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers", reason="the diffusers integration needs diffusers 0.42 (pip install '.[diffusers]')")
from test_integration_diffusers import (forward, hunyuan_inputs, random_mask, tiny_hunyuan,  # noqa: E402
                                        tiny_wan, wan_inputs)

from sparsecore import VideoGeometry  # noqa: E402
from sparsecore.integrations import diffusers as sparse  # noqa: E402


def pasa_generation(keep: bool) -> list[torch.Tensor]:
    model = tiny_wan()
    cond = wan_inputs(batch=1, seed=1)
    uncond = {**wan_inputs(batch=1, seed=5), "hidden_states": cond["hidden_states"]}
    handle = sparse.apply(model, method="pasa", device="cpu", num_steps=2, dense_fraction=0.5, density=0.3,
                          block_size=32)
    handle.keep_masks(keep)
    try:
        return [forward(model, inputs, t) for t in (999.0, 500.0) for inputs in (cond, uncond)]
    finally:
        handle.remove()


def test_keeping_pasa_masks_does_not_change_the_generation():
    for kept, plain in zip(pasa_generation(True), pasa_generation(False)):
        assert torch.equal(kept, plain)


def test_adaspa_cached_search_after_guidance_stops():
    model = tiny_wan()
    both = wan_inputs(batch=2)                                        # CFG batched: one call of batch 2
    handle = sparse.apply(model, method="adaspa", device="cpu", num_steps=3, warmup_steps=1, search_steps=(1,),
                          sparsity=0.6, block_size=32)
    try:
        forward(model, both, 999.0)                                   # step 0: dense, its LSE kept (batch 2)
        out = forward(model, {name: t[:1] for name, t in both.items()}, 800.0)   # step 1: cached search, batch 1
        assert torch.isfinite(out).all()
        assert [s["action"] for s in handle.stats() if s["layer"] == 0] == ["dense-lse", "cached-search"]
    finally:
        handle.remove()


def test_mask_of_a_layer_is_the_newest_plan():
    model = tiny_hunyuan()
    cond = hunyuan_inputs(batch=1, text="same", seed=1)               # 4 valid text tokens
    uncond = {**hunyuan_inputs(batch=1, text="ragged", seed=2), "hidden_states": cond["hidden_states"]}  # 6
    handle = sparse.apply(model, method=random_mask, device="cpu", num_steps=3)
    try:
        forward(model, cond, 999.0)
        forward(model, uncond, 999.0)                                 # step 0 with guidance: two text lengths
        forward(model, cond, 800.0)                                   # step 1: guidance stopped
        newest = random_mask(VideoGeometry(8, 8, 8, text_tokens=4, text_position="end"), 2, 1, 0)
        found = handle.mask(0)
        assert found.q_len == newest.q_len and np.array_equal(found.to_dense(), newest.to_dense())
    finally:
        handle.remove()


def test_a_request_after_a_cancelled_one_at_the_same_timestep_plans_from_its_own_state():
    params = dict(warmup_steps=0, search_steps=[0, 2])
    timesteps = (999.0, 750.0, 500.0, 250.0)
    first, second = wan_inputs(batch=1, seed=1), wan_inputs(batch=1, seed=2)

    def generation(cancelled_before: bool) -> list[torch.Tensor]:
        model = tiny_wan()
        handle = sparse.apply(model, method="adaspa", device="cpu", num_steps=4, **params)
        try:
            if not cancelled_before:
                return [forward(model, second, t) for t in timesteps]
            forward(model, first, timesteps[0])                       # a request cancelled after its first step
            with pytest.warns(UserWarning, match="a run ended before num_steps=4"):
                outs = [forward(model, second, timesteps[0])]           # fresh latents: a new run
            assert (handle.run, handle.step) == (1, 0)
            return outs + [forward(model, second, t) for t in timesteps[1:]]
        finally:
            handle.remove()

    for after, alone in zip(generation(True), generation(False), strict=True):
        torch.testing.assert_close(after, alone, rtol=0, atol=0)



def test_a_request_on_the_same_latents_after_a_cancelled_one_needs_set_step_none():
    """A fixed seed gives the next request the cancelled one's latents: at its timestep the tracker cannot tell it from
    another guidance call of that step, so it continued that run (AdaSpa's step-0 search made on the other prompt's
    q, k). The docs claimed such a request planned from its own state; ``handle.set_step(None)`` before it does."""
    params = dict(warmup_steps=0, search_steps=[0, 2])
    timesteps = (999.0, 750.0, 500.0, 250.0)
    first = wan_inputs(batch=1, seed=1)
    second = {**wan_inputs(batch=1, seed=2), "hidden_states": first["hidden_states"]}    # another prompt, one seed

    def generation(cancelled_before: bool, new_run: bool = False) -> list[torch.Tensor]:
        model = tiny_wan()
        handle = sparse.apply(model, method="adaspa", device="cpu", num_steps=4, **params)
        try:
            if cancelled_before:
                forward(model, first, timesteps[0])                   # a request cancelled after its first step
                if new_run:
                    with pytest.warns(UserWarning, match="a run ended before num_steps=4"):
                        handle.set_step(None)
            outs = [forward(model, second, timesteps[0])]
            assert (handle.run, handle.step) == (int(new_run), 0)     # without set_step(None): the old run
            return outs + [forward(model, second, t) for t in timesteps[1:]]
        finally:
            handle.remove()

    alone = generation(False)
    assert not torch.equal(generation(True)[0], alone[0])            # planned from the cancelled request's search
    for after, own in zip(generation(True, new_run=True), alone, strict=True):
        torch.testing.assert_close(after, own, rtol=0, atol=0)

def test_stats_keep_the_current_and_the_previous_run_only():
    """A process serving many generations kept every record of every run (1,500 a Wan generation, with timing
    events): now the current run's and the one before."""
    model, inputs = tiny_wan(), wan_inputs(batch=1)
    handle = sparse.apply(model, method=random_mask, device="cpu", num_steps=2)
    try:
        for _ in range(4):
            for t in (999.0, 500.0):
                forward(model, inputs, t)
        rows = handle.stats()
        assert sorted({row["run"] for row in rows}) == [2, 3]
        assert len(rows) == 2 * 2 * 2                        # two runs of two steps of two layers
    finally:
        handle.remove()


@pytest.mark.parametrize("removed", [False, True])
def test_a_model_with_sparsecore_applied_is_freed_when_its_last_reference_goes(removed):
    """The handle held the model and its attention modules, which hold the handle: a server's `del pipe` kept the
    weights until a garbage collection ran."""
    gc.collect()
    gc.disable()
    try:
        model = tiny_wan()
        handle = sparse.apply(model, method="lvsa", device="cpu", num_steps=2)
        for t in (999.0, 500.0):
            forward(model, wan_inputs(batch=1), t)
        if removed:
            handle.remove()
        freed, attention = weakref.ref(model), weakref.ref(model.blocks[0].attn1)
        del model
        assert freed() is None and attention() is None and handle.model is None
        handle.remove()                                       # the model is gone: nothing to put back, no error
    finally:
        gc.enable()


def test_a_deep_copy_of_a_model_with_sparsecore_applied_is_refused_with_the_remedy():
    """The copy kept the original handle's hooks and op slot: it ran dense attention and advanced the original's
    steps, silently."""
    model = tiny_wan()
    handle = sparse.apply(model, method=random_mask, device="cpu", num_steps=2)
    with pytest.raises(TypeError, match=r"copy.deepcopy of a model with sparsecore applied: call handle.remove\(\)"):
        copy.deepcopy(model)
    for pickled in (pickle.dumps, lambda m: torch.save(m, io.BytesIO())):     # the hooks first: their own message
        with pytest.raises(TypeError, match=r"pickling a model with sparsecore applied: call handle.remove\(\)"):
            pickled(model)
    handle.remove()
    copied = copy.deepcopy(model)
    other = sparse.apply(copied, method=random_mask, device="cpu", num_steps=2)
    forward(copied, wan_inputs(batch=1), 999.0)
    assert other.step == 0 and handle.step is None
    other.remove()


def test_set_step_none_between_requests_drops_the_last_runs_state():
    """What docs/diffusers.md tells servers to call between requests: nothing of the finished run stays."""
    model, inputs = tiny_wan(), wan_inputs(batch=2)
    handle = sparse.apply(model, method="adaspa", device="cpu", num_steps=4, warmup_steps=1, search_steps=[1])
    try:
        for t in (999.0, 750.0, 500.0, 250.0):
            forward(model, inputs, t)
        assert handle._planner._plans and handle._planner._sessions
        handle.set_step(None)
        assert not handle._planner._plans and not handle._planner._sessions
    finally:
        handle.remove()


def test_fresh_noise_behind_a_fixed_first_frame_starts_a_new_run():
    """The latents are compared on a strided sample: a request whose first latent frame is a fixed image (image to
    video) differs from the last only after it, which a sample of the first elements would miss."""
    from sparsecore.integrations.diffusers.steps import SAMPLE, StepTracker
    gen = torch.Generator().manual_seed(3)
    image = torch.randn(1, 16, 1, 30, 52, generator=gen)

    def request() -> torch.Tensor:
        return torch.cat([image, torch.randn(1, 16, 12, 30, 52, generator=gen)], dim=2)
    assert image.numel() > SAMPLE
    tracker, t = StepTracker(50, lambda: None), torch.tensor([1000.0])
    tracker.observe(t, request())
    tracker.completed()
    tracker.observe(t, request())                                # fresh noise after the same image
    assert (tracker.run, tracker.step) == (1, 0)


@pytest.mark.parametrize("first, second, same", [
    ([0, 1, 0, 1], [0, 1], True),         # LTX-2's step: guidance on its B latents twice, then on the B
    ([0, 1], [0, 1, 0, 1], True),
    ([0], [0, 1], False),                 # a request for two videos whose first is the last request's video
    ([0, 1], [0, 2], False),              # per-sample seeds: the second sample is fresh noise
    ([0, 1], [0, 1, 2], False),           # a batch size that does not divide the other
])
def test_a_batch_of_another_size_stays_on_the_step_only_where_it_repeats_the_other(first, second, same):
    """At the same timestep, after a completed forward: latents of another batch size are the same step only where
    the larger batch repeats the smaller one sample for sample; otherwise they are a new request."""
    from sparsecore.integrations.diffusers.steps import StepTracker
    videos = torch.randn(3, 16, 13, 30, 52, generator=torch.Generator().manual_seed(4))
    tracker, t = StepTracker(50, lambda: None), torch.tensor([1000.0])
    tracker.observe(t, videos[first])
    tracker.completed()
    tracker.observe(t, videos[second])
    assert (tracker.run, tracker.step) == ((0, 0) if same else (1, 0))


def test_explicit_steps_start_a_new_run_below_the_current_step_or_after_none():
    """Explicit steps: the same step again stays in the run (several calls at one step), a lower step starts the next
    run, and after a one-step run ``set_step(None)`` then ``set_step(0)`` does, as the handle's docstring says."""
    from sparsecore.integrations.diffusers.steps import StepTracker
    runs = []
    tracker = StepTracker(2, lambda: runs.append(tracker.run))
    tracker.set_step(0)
    tracker.set_step(1)
    tracker.set_step(1)
    assert (tracker.run, tracker.step, runs) == (0, 1, [])
    tracker.set_step(0)
    assert (tracker.run, tracker.step, runs) == (1, 0, [0])
    tracker.set_step(0)
    assert (tracker.run, tracker.step, runs) == (1, 0, [0])
    tracker.set_step(None)
    tracker.set_step(0)
    assert (tracker.run, tracker.step, runs) == (2, 0, [0, 1])
