"""LTX-Video (``LTXVideoTransformer3DModel``) with sparsecore: what its packed-token forward adds to the shared cases.

The oracle, remove(), steps and methods run in tests/test_integration_diffusers.py's "ltx" case; here the forward's
token grid (``num_frames``, ``height``, ``width`` beside ``[B, S, C]`` tokens) and the refusals. Context parallelism:
tests/test_integration_context_parallel.py.
"""

from __future__ import annotations

import pytest
import torch
from context_parallel_run import fake_parallel_config
from test_integration_diffusers import CASES, FRAMES, HEIGHT, WIDTH, forward

from sparsecore import BlockMask
from sparsecore.integrations import diffusers as sparse


def test_the_geometry_is_the_forwards_token_grid():
    case = CASES["ltx"]
    model, inputs = case.build(), case.inputs(batch=1)
    seen = []

    def full(geometry, heads, step, layer):
        seen.append(geometry)
        return BlockMask.full(heads, geometry.tokens, geometry.tokens, 64)
    handle = sparse.apply(model, method=full, device="cpu")
    try:
        forward(model, inputs, 999.0)
    finally:
        handle.remove()
    assert {(g.frames, g.height, g.width, g.text_tokens) for g in seen} == {(FRAMES, HEIGHT, WIDTH, 0)}


@pytest.mark.parametrize("change, message", [
    ({"num_frames": FRAMES - 1}, r"hidden_states: expected num_frames x height x width = 448 tokens for "
                                 r"LTXVideoTransformer3DModel, got 512"),
    ({"height": None}, r"num_frames, height, width: expected the forward's token grid as positive integers .*"
                       r"got \(8, None, 8\)"),
    ({"video_coords": torch.zeros(1, 3, FRAMES * HEIGHT * WIDTH)}, r"video_coords: expected None for "
                                                                   r"LTXVideoTransformer3DModel"),
    ({"hidden_states": torch.zeros(1, 4, FRAMES, HEIGHT, WIDTH)}, r"hidden_states: expected a latent video \[B, S, "
                                                                  r"C\] \(packed tokens"),
])
def test_a_forward_off_its_token_grid_is_refused_before_it_runs(change, message):
    case = CASES["ltx"]
    refused_before_any_step(case.build(), {**case.inputs(batch=1), **change}, message)


def refused_before_any_step(model, inputs: dict, message: str) -> None:
    """A forward of ``model`` with LVSA applied raises ``ValueError`` matching ``message`` before its step counts."""
    handle = sparse.apply(model, method="lvsa", device="cpu")
    try:
        with pytest.raises(ValueError, match=message):
            forward(model, inputs, 999.0)
        assert handle.step is None
    finally:
        handle.remove()


def test_a_grid_of_numpy_integers_is_taken():
    """The grid as NumPy integers (a pipeline that computes it with NumPy) reads as the same grid."""
    import numpy as np
    case = CASES["ltx"]
    model = case.build()
    taken_as_the_grid(model, {**case.inputs(batch=1), "num_frames": np.int64(FRAMES), "height": np.int32(HEIGHT)})


def taken_as_the_grid(model, inputs: dict) -> None:
    """A forward of ``model`` with LVSA applied reads the 8 x 8 x 8 grid and gives the model's own output (LVSA keeps
    every block at this length)."""
    expected = forward(model, inputs, 999.0)
    handle = sparse.apply(model, method="lvsa", device="cpu")
    try:
        got = forward(model, inputs, 999.0)
    finally:
        handle.remove()
    assert handle.geometry.tokens == FRAMES * HEIGHT * WIDTH
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["ltx", "wan"])
def test_video_tokens_the_ranks_cannot_share_equally_are_refused_before_the_plan_splits_them(name):
    """512 video tokens over 3 Ulysses ranks: refused before the forward runs (diffusers' split would assert)."""
    case = CASES[name]
    model = case.build()
    handle = sparse.apply(model, method="lvsa", device="cpu")
    try:
        for module in case.attention(model):
            module.processor._parallel_config = fake_parallel_config(ulysses_degree=3)
        with pytest.raises(ValueError, match=r"hidden_states: under context parallelism \(ring degree 1 x Ulysses "
                                             r"degree 3\) expected video tokens divisible by 3, got 512 \(8 x 8 x 8\)"):
            forward(model, case.inputs(batch=1), 999.0)
        assert handle.step is None
    finally:
        for module in case.attention(model):
            module.processor._parallel_config = None
        handle.remove()
