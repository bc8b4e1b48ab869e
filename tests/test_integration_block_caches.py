"""sparsecore under diffusers' block caches: forwards that skip some layers' attention.

diffusers' caches (``transformer.enable_cache(...)``: First Block Cache, Pyramid Attention Broadcast, MagCache) skip
whole blocks, or a block's attention, at some steps. Each layer's call names its layer, so the layers
that run get their own (layer, step) masks. The oracle is the same model in float64 with diffusers' own processors,
the same cache, and its attention replaced by masked softmax written in ``test_integration_diffusers``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import hooks

from test_integration_diffusers import CASES, MaskedSoftmaxOracle, Tagged, forward, random_mask, tiny_wan, wan_inputs

import sparsecore.integrations.diffusers as sparse

TIMESTEPS = (999.0, 800.0, 600.0, 400.0, 200.0)
_NOW = [TIMESTEPS[0]]                                  # Pyramid Attention Broadcast asks for the current timestep


def cache_config(name: str):
    """Caches whose skips do not depend on float rounding (so the float64 oracle skips the same layers)."""
    if name == "first-block":                          # threshold 10: every step after the first reuses blocks 1..
        return hooks.FirstBlockCacheConfig(threshold=10.0)
    if name.startswith("pyramid"):                     # a layer's attention every second step; "pyramid-first":
        blocks = (r"^blocks\.0\.",) if name == "pyramid-first" else (r"blocks",)    # layer 0's alone (1 runs)
        return hooks.PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                                     spatial_attention_timestep_skip_range=(0, 1000),
                                                     spatial_attention_block_identifiers=blocks,
                                                     current_timestep_callback=lambda: _NOW[0])
    return hooks.MagCacheConfig(threshold=10.0, num_inference_steps=len(TIMESTEPS), retention_ratio=0.0,
                                mag_ratios=[1.0] * len(TIMESTEPS))


def run_steps(model, inputs: dict) -> list[torch.Tensor]:
    outputs = []
    for timestep in TIMESTEPS:
        _NOW[0] = timestep
        with model.cache_context("cond"):
            outputs.append(forward(model, inputs, timestep))
    return outputs


class Recording(Tagged):
    """The oracle's processor wrapper, recording which (layer, step) ran."""

    ran: set[tuple[int, int]]

    def __call__(self, *args, **kwargs):
        self.ran.add((self.layer, self.oracle.step))
        return super().__call__(*args, **kwargs)


@pytest.mark.parametrize("cache", ["first-block", "pyramid", "pyramid-first", "mag"])
def test_layers_a_cache_runs_get_their_own_masks(cache, monkeypatch):
    case, inputs = CASES["wan"], wan_inputs(batch=2)
    model = tiny_wan()
    reference = copy.deepcopy(model).double()
    oracle, ran = MaskedSoftmaxOracle(random_mask, 0), set()
    for layer, module in enumerate(case.attention(reference)):
        module.processor = Recording(oracle, layer, module.processor)
        module.processor.ran = ran
    reference.enable_cache(cache_config(cache))
    expected = []
    with monkeypatch.context() as patch:
        case.install(patch, oracle)
        for step, timestep in enumerate(TIMESTEPS):
            oracle.step, _NOW[0] = step, timestep
            with reference.cache_context("cond"):
                expected.append(forward(reference, {k: v.double() for k, v in inputs.items()}, timestep))
    model.enable_cache(cache_config(cache))
    handle = sparse.apply(model, method=random_mask, device="cpu", num_steps=len(TIMESTEPS))
    try:
        got = run_steps(model, inputs)
    finally:
        handle.remove()
    assert len(ran) < 2 * len(TIMESTEPS), f"{cache}: no layer was skipped, the test would not see a skip"
    assert {(s["layer"], s["step"]) for s in handle.stats()} == ran
    for step, (out, want) in enumerate(zip(got, expected)):
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=5e-6, msg=f"{cache}, step {step}")


def test_adaspa_searches_a_layer_late_where_a_cache_skipped_its_search_steps():
    """Pyramid Attention Broadcast runs each layer's attention at steps 0, 2, 4: the cached first search (step 1,
    after the LSE of step 0) and the search at step 3 are skipped; each layer makes each up at its next step."""
    model, inputs = tiny_wan(), wan_inputs(batch=1)
    model.enable_cache(cache_config("pyramid"))
    handle = sparse.apply(model, method="adaspa", device="cpu", num_steps=len(TIMESTEPS), warmup_steps=0,
                          search_steps=(1, 3), sparsity=0.6, block_size=32)
    try:
        outputs = run_steps(model, inputs)
    finally:
        handle.remove()
    actions = sorted((s["layer"], s["step"], s["action"]) for s in handle.stats())
    assert actions == [(layer, step, action) for layer in (0, 1)
                       for step, action in ((0, "dense-lse"), (2, "cached-search"), (4, "cached-search"))], actions
    assert all(torch.isfinite(out).all() for out in outputs)


def test_a_layer_called_twice_in_one_forward_raises():
    model, inputs = tiny_wan(), wan_inputs(batch=1)
    attention = model.blocks[0].attn1
    once = attention.forward
    attention.forward = lambda *args, **kwargs: (once(*args, **kwargs), once(*args, **kwargs))[1]
    handle = sparse.apply(model, method=random_mask, device="cpu")
    try:
        with pytest.raises(RuntimeError, match="layer 0 called twice in one forward"):
            forward(model, inputs, 500.0)
    finally:
        handle.remove()


def test_a_regionally_compiled_model_under_a_block_cache_equals_eager():
    """diffusers' First Block Cache decides on the host between blocks (its hook is ``torch.compiler.disable``d, so
    ``fullgraph=False``): the compiled blocks pass each layer's index to the op as a graph input, as eager does."""
    import torch._dynamo
    outputs, ran = {}, {}
    for mode in ("eager", "compiled"):
        torch._dynamo.reset()
        model, inputs = tiny_wan(), wan_inputs(batch=1)
        handle = sparse.apply(model, method=random_mask, device="cpu", num_steps=len(TIMESTEPS))
        model.enable_cache(cache_config("first-block"))
        if mode == "compiled":
            model.compile_repeated_blocks(fullgraph=False, backend="aot_eager")
        try:
            outputs[mode] = run_steps(model, inputs)
        finally:
            handle.remove()
        ran[mode] = {(s["layer"], s["step"]) for s in handle.stats()}
    assert ran["compiled"] == ran["eager"] and len(ran["eager"]) == len(TIMESTEPS) + 1     # layer 1 at step 0 only
    for step, (got, want) in enumerate(zip(outputs["compiled"], outputs["eager"])):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=f"step {step}")

