"""Edges of the diffusers integration the main suite (tests/test_integration_diffusers.py) does not reach.

A timestep by keyword after positional inputs; HunyuanVideo 1.0's key mask (its last video token masked, text padding
before a valid token, a one-token video); the block list a refused processor sits in; non-square token grids; a
CogVideoX call with no text (against the float64 oracle); CogVideoX's dense steps on the faster dense op while another
diffusers backend is active; and each model's attention called outside the transformer's forward, which must give
diffusers' own processor's output (CogVideoX's RoPE included).
"""

from __future__ import annotations

import inspect
import re

import pytest
import torch
from diffusers.models.attention_dispatch import attention_backend
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from test_dense_attention import counting_op  # noqa: F401  (the fixture)
from test_integration_diffusers import (CASES, cogvideox_inputs, forward, full_mask, oracle_output, random_mask,
                                        tiny_cogvideox, tiny_hunyuan_10, tiny_wan, wan_inputs)

from sparsecore import VideoGeometry
from sparsecore.integrations import diffusers as sparse


# ------------------------------------------------------------------ the timestep's place
@pytest.mark.parametrize("name", sorted(CASES))
def test_steps_follow_a_timestep_passed_by_keyword_after_positional_inputs(name):
    """``model(latents, timestep=t, ...)`` (Wan, HunyuanVideo) or ``model(latents, text, timestep=t, ...)``
    (CogVideoX): the arguments before the timestep by position, the timestep by keyword."""
    case = CASES[name]
    model, inputs = case.build(), case.inputs(batch=1, text="same")
    names = list(inspect.signature(type(model).forward).parameters)[1:]
    before = names[:names.index("timestep")]
    rest = {k: v for k, v in inputs.items() if k not in before}
    handle = sparse.apply(model, method=random_mask, device="cpu", num_steps=2)
    seen = []
    try:
        for t in (999.0, 500.0):
            with torch.no_grad():
                model(*(inputs[k] for k in before), timestep=torch.full((1,), t), **rest, return_dict=False)
            seen.append(handle.step)
    finally:
        handle.remove()
    assert seen == [0, 1]


# ------------------------------------------------------------------ HunyuanVideo 1.0's key mask [B, 1, 1, S]
def text_counts(keys: list[bool], text: int) -> list[int]:
    """What a tiny HunyuanVideo 1.0 handle reads from the key mask ``[1, 1, 1, len(keys)]`` with ``text`` text
    tokens last."""
    handle = sparse.apply(tiny_hunyuan_10(), method=full_mask, device="cpu")
    try:
        return handle.text_valid(handle._processors[0], torch.tensor([keys])[:, None, None, :], 1, text)
    finally:
        handle.remove()


def test_a_key_mask_that_masks_the_last_video_token_raises():
    with pytest.raises(ValueError, match=r"expected every video token valid in the key mask"):
        text_counts([True] * 9 + [False] + [True] * 5, 5)


def test_text_padding_before_a_valid_text_token_is_named_as_such_in_a_key_mask():
    """Every video token valid, text ``[valid, padding, valid, valid, valid]``: the order is what is wrong."""
    with pytest.raises(ValueError, match=r"expected each sample's valid text tokens first, then its padding"):
        text_counts([True] * 10 + [True, False, True, True, True], 5)


def test_a_key_mask_over_a_one_token_video_counts_the_text():
    assert text_counts([True] + [True] * 3 + [False], 4) == [3]


def test_a_refused_processor_is_named_by_its_block_list():
    model = tiny_hunyuan_10()
    model.single_transformer_blocks[0].attn.set_processor(AttnProcessor2_0())
    with pytest.raises(TypeError, match=r"^single_transformer_blocks\[0\]\.attn\.processor: expected diffusers' "
                                        r"HunyuanVideoAttnProcessor2_0, got AttnProcessor2_0") as refused:
        sparse.apply(model, method=full_mask, device="cpu")
    remedy = re.search(r"e\.g\. (transformer\.\S+ = \w+\(\))", str(refused.value)).group(1)
    exec(remedy, {"transformer": model, "HunyuanVideoAttnProcessor2_0": HunyuanVideoAttnProcessor2_0})  # as told
    sparse.apply(model, method=full_mask, device="cpu").remove()


# ------------------------------------------------------------------ non-square grids
def non_square(name: str) -> tuple:
    """A tiny model and latents of 4 token frames of 4 x 8 patches (height 4, width 8): Wan ``[B, C, F, H, W]``,
    CogVideoX ``[B, F, C, H, W]`` (with its RoPE for that grid), both with 2 x 2 patches."""
    gen = torch.Generator().manual_seed(1)
    if name == "wan":
        return tiny_wan(), {"hidden_states": torch.randn(1, 4, 4, 8, 16, generator=gen),
                            "encoder_hidden_states": torch.randn(1, 7, 16, generator=gen)}
    rope = get_3d_rotary_pos_embed(16, ((0, 0), (4, 8)), (4, 8), 4)
    return tiny_cogvideox(), {"hidden_states": torch.randn(1, 4, 4, 8, 16, generator=gen),
                              "encoder_hidden_states": torch.randn(1, 7, 16, generator=gen), "image_rotary_emb": rope}


@pytest.mark.parametrize("name", ["wan", "cogvideox"])
def test_a_non_square_grid_keeps_height_and_width_apart(name):
    model, inputs = non_square(name)
    seen = []

    def recording(geometry, num_heads, step, layer):
        seen.append((geometry.frames, geometry.height, geometry.width))
        return full_mask(geometry, num_heads, step, layer)

    handle = sparse.apply(model, method=recording, device="cpu", num_steps=1)
    try:
        forward(model, inputs, 500.0)
    finally:
        handle.remove()
    assert handle.geometry == VideoGeometry(4, 4, 8)
    assert set(seen) == {(4, 4, 8)}


# ------------------------------------------------------------------ CogVideoX
def test_cogvideox_without_text_matches_float64_masked_attention(monkeypatch):
    """A call with 0 text tokens (diffusers' CogVideoX runs it): the sparse output is all video."""
    case = CASES["cogvideox"]
    model, inputs = case.build(), case.inputs(batch=1)
    inputs["encoder_hidden_states"] = inputs["encoder_hidden_states"][:, :0]
    dense = forward(model, inputs, 500.0)
    expected, _ = oracle_output(case, model, inputs, random_mask, 0, 500.0, monkeypatch)
    handle = sparse.apply(model, method=random_mask, device="cpu", num_steps=1)
    try:
        got = forward(model, inputs, 500.0)
    finally:
        handle.remove()
    assert got.shape == expected.shape
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=5e-6)
    assert (got - dense).abs().max() > 5e-3                  # the mask matters
    assert {(s["text_tokens"], s["backend"]) for s in handle.stats()} == {(0, "portable")}


def test_cogvideox_dense_steps_take_the_faster_op_while_another_diffusers_backend_is_active(counting_op):
    """CogVideoX's processor follows no diffusers backend, so under ``"auto"`` its dense steps take the faster dense
    op whatever backend is active (here ``_native_math``), and give the model's output."""
    model, inputs = tiny_cogvideox(), cogvideox_inputs(batch=1)
    expected = forward(model, inputs, 999.0)
    with attention_backend("_native_math"):
        handle = sparse.apply(model, method=full_mask, device="cpu", dense_attention="auto", num_steps=1)
        try:
            got = forward(model, inputs, 999.0)
        finally:
            handle.remove()
    assert len(counting_op.calls) == 2                        # the dense step of each of the 2 layers
    assert {s["dense_kernel"] for s in handle.stats()} == {"portable"}
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ outside the transformer's forward
@pytest.mark.parametrize("name", sorted(CASES))
def test_an_attention_called_outside_the_forward_gives_the_original_processors_output(name):
    """The arguments the first self-attention got in a forward, passed to it again outside one (the handle is
    inactive): with sparsecore applied, exactly what diffusers' own processor gives (RoPE and all)."""
    case = CASES[name]
    model, inputs = case.build(), case.inputs(batch=1)
    module = case.attention(model)[0]
    calls = []
    hook = module.register_forward_pre_hook(lambda m, args, kwargs: calls.append((args, kwargs)), with_kwargs=True)
    forward(model, inputs, 999.0)
    hook.remove()
    args, kwargs = calls[0]
    with torch.no_grad():
        expected = module(*args, **kwargs)
        handle = sparse.apply(model, method=random_mask, device="cpu")
        try:
            assert type(module.processor).__name__.endswith("SparseAttnProcessor") and not handle.active
            got = module(*args, **kwargs)
        finally:
            handle.remove()
    expected, got = (o if isinstance(o, tuple) else (o,) for o in (expected, got))
    assert len(got) == len(expected) and all(torch.equal(g, e) for g, e in zip(got, expected))


def test_apply_under_a_default_device_keeps_the_ops_arguments_on_the_cpu():
    """``apply()`` inside ``torch.device(...)`` (or after ``torch.set_default_device``): the model's slot and each
    layer's index stay CPU tensors, so the op runs (under "meta" it ran its fake: an uninitialized output, no error)
    and reads them without a device sync."""
    inputs = wan_inputs(batch=1)
    model = tiny_wan()
    handle = sparse.apply(model, method=random_mask, device="cpu")
    try:
        want = forward(model, inputs, 500.0)
    finally:
        handle.remove()
    with torch.device("meta"):
        handle = sparse.apply(model, method=random_mask, device="cpu")
    try:
        got = forward(model, inputs, 500.0)
    finally:
        handle.remove()
    assert {(s["layer"], s["step"]) for s in handle.stats()} == {(0, 0), (1, 0)}
    torch.testing.assert_close(got, want, rtol=0, atol=0)
