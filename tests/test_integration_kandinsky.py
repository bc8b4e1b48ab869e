"""Kandinsky 5 (``Kandinsky5Transformer3DModel``, diffusers 0.42, CPU): what its forward brings beyond the shared cases
of test_integration_diffusers.py (latents ``[B, F, H, W, C]``; NABLA's token order in 8 x 8 tiles of each frame; no
context parallelism)."""

from __future__ import annotations

import pytest
import torch
from context_parallel_run import fake_parallel_config
from test_integration_diffusers import (CASES, forward, forward_applied, full_mask, kandinsky_inputs, oracle_output,
                                        random_mask, tiny_kandinsky)

from sparsecore import VideoGeometry
from sparsecore.integrations import diffusers as sparse
from sparsecore.integrations.diffusers import processors

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
    dense, _ = oracle_output(case, model, inputs, full_mask, 0, 500.0, monkeypatch, grid=TILED)   # NABLA's needs STA
    expected, _ = oracle_output(case, model, inputs, random_mask, 0, 500.0, monkeypatch, grid=TILED)
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
    """31 latent frames (its pipelines' 121 frames, 4x temporal compression) unless given: its 10 s checkpoints need
    ``reference_frames=61`` (their configurations do not tell them from the 5 s ones: Pro's 5 s is NABLA too)."""
    handle = sparse.apply(tiny_kandinsky(), method="lvsa", device="cpu")
    handle.remove()
    assert handle.params["reference_frames"] == 31
    handle = sparse.apply(tiny_kandinsky(), method="lvsa", device="cpu", reference_frames=61)
    handle.remove()
    assert handle.params["reference_frames"] == 61


def test_context_parallelism_is_refused_at_apply_and_before_the_forward_runs():
    """diffusers has no plan for Kandinsky 5; a config of the user's own on its processors is refused at ``apply``,
    or, set after it, before any step counts."""
    message = (r"transformer: Kandinsky5Transformer3DModel under context parallelism is not supported by sparsecore "
               r"\(diffusers has no plan for it\); run it on one GPU")
    config = fake_parallel_config(ulysses_degree=2)
    model = tiny_kandinsky()
    for module in CASES["kandinsky-5"].attention(model):
        module.processor._parallel_config = config
    with pytest.raises(ValueError, match=message):
        sparse.apply(model, method="lvsa", device="cpu")
    for module in CASES["kandinsky-5"].attention(model):
        module.processor._parallel_config = None
    handle = sparse.apply(model, method="lvsa", device="cpu")
    try:
        for module in CASES["kandinsky-5"].attention(model):
            module.processor._parallel_config = config          # as enable_parallelism sets it, after apply
        with pytest.raises(ValueError, match=message):
            forward(model, kandinsky_inputs(batch=1), 999.0)
        assert handle.step is None
    finally:
        handle.remove()


def test_bfloat16_dense_mask_gives_the_original_output_and_a_sparse_mask_runs():
    """In bfloat16 (the released checkpoints' dtype) a full mask gives diffusers' output bit for bit (its norms cast
    back to bfloat16, its RoPE rounds to it); a sparse mask runs and changes it."""
    model, inputs = tiny_kandinsky().to(torch.bfloat16), kandinsky_inputs(batch=2)
    for name, module in model.named_modules():           # as from_pretrained keeps them (_keep_in_fp32_modules)
        if any(part in model._keep_in_fp32_modules for part in name.split(".")):
            module.float()
    inputs = {name: value.to(torch.bfloat16) if name in ("hidden_states", "encoder_hidden_states",
                                                         "pooled_projections") else value
              for name, value in inputs.items()}
    expected = forward(model, inputs, 500.0)
    outputs = [forward_applied(model, inputs, 500.0, method) for method in (full_mask, random_mask)]
    assert outputs[0].dtype == torch.bfloat16 and torch.equal(outputs[0], expected)
    assert torch.isfinite(outputs[1]).all() and (outputs[1].float() - expected.float()).abs().max() > 5e-3


@pytest.mark.parametrize("chosen_by", ["set_attention_backend", "context"])
def test_dense_steps_do_not_take_flex_attention_which_nabla_configurations_need(monkeypatch, chosen_by):
    """NABLA's block mask needs diffusers' FlexAttention backend (``set_attention_backend("flex")``); sparsecore's masks
    replace it, and its dense steps run as on the default backend: FlexAttention with no mask would run its unfused
    fallback (every pair's score) or fail compiled. The model's other attentions keep FlexAttention. Chosen on the
    processors (and made active, as ``set_attention_backend`` does), or by the ``attention_backend`` context alone."""
    from diffusers.models import attention_dispatch
    registry = attention_dispatch._AttentionBackendRegistry
    flex, native = (attention_dispatch.AttentionBackendName(name) for name in ("flex", "native"))
    calls = []
    monkeypatch.setitem(registry._backends, flex, lambda query, key, *args, **kwargs:
                        calls.append((query.shape[1], key.shape[1])) or registry._backends[native](query, key, *args,
                                                                                                   **kwargs))
    model, inputs = tiny_kandinsky(), kandinsky_inputs(batch=1)
    expected = forward(model, inputs, 999.0)
    for module in model.modules():
        if chosen_by == "set_attention_backend" and hasattr(getattr(module, "processor", None), "_attention_backend"):
            module.processor._attention_backend = flex                 # what set_attention_backend("flex") sets
    looked = []
    monkeypatch.setattr(processors, "faster_dense", lambda *args: looked.append(1))
    with attention_dispatch.attention_backend("flex"):
        got = forward_applied(model, inputs, 999.0)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    tokens = 8 * 8 * 8
    assert calls and (tokens, tokens) not in calls                # text and cross-attention: flex; video: not
    assert len(looked) == 2                                       # each layer's dense step sought the faster op
