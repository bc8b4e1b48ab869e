"""NABLA (``sparsecore.methods.nabla``): its masks are diffusers' own (``nablaT_v2`` joined with the sliding window its
Kandinsky 5 pipelines build, restated here from the window's definition), and the method runs Kandinsky 5's NABLA
configurations to the float64 oracle with those masks (CPU)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers.models.transformers import transformer_kandinsky
from oracle import dense_attention
from test_integration_diffusers import forward, kandinsky_inputs

from sparsecore import VideoGeometry
from sparsecore.integrations import diffusers as sparse
from sparsecore.methods import nabla

GRID = (3, 16, 24)          # frames, height, width: 2 x 3 tiles a frame, 18 blocks


def window(frames: int, rows: int, cols: int, w: tuple[int, int, int]) -> torch.Tensor:
    """The sliding window of tiles, from its definition: blocks (frame, tile row, tile column) in tile order, each axis
    within ``w // 2``."""
    coords = [(t, r, c) for t in range(frames) for r in range(rows) for c in range(cols)]
    return torch.tensor([[all(abs(a - b) <= side // 2 for a, b, side in zip(i, j, w)) for j in coords]
                         for i in coords])


def diffusers_nabla(q: torch.Tensor, k: torch.Tensor, grid: tuple[int, int, int], threshold: float,
                    w: tuple[int, int, int]) -> torch.Tensor:
    """Diffusers' NABLA block map ``[B, H, NB, NB]`` (bool) for ``q, k [B, S, H, D]`` in tile order."""
    frames, height, width = grid
    sta = window(frames, height // 8, width // 8, w)[None, None]
    return transformer_kandinsky.nablaT_v2(q, k, sta, thr=threshold).to_dense().bool()


def block_map(mask) -> torch.Tensor:
    """``[H, NB, NB]`` bool from a mask's lists."""
    indptr, indices = (torch.as_tensor(np.asarray(t.cpu() if hasattr(t, "cpu") else t)) for t in
                       (mask.indptr, mask.indices))
    heads, rows = indptr.shape[0], indptr.shape[1] - 1
    out = torch.zeros(heads, rows, len(mask.kv_offsets) - 1, dtype=torch.bool)
    for h in range(heads):
        for i in range(rows):
            out[h, i, indices[indptr[h, i]:indptr[h, i + 1]].long()] = True
    return out


def qk(batch: int, heads: int, dim: int, dtype: torch.dtype, seed: int, kv_heads: int | None = None,
       grid: tuple[int, int, int] = GRID) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k ``[B, S, H, D]`` with some structure (a shared direction per head) so the maps are not flat."""
    gen = torch.Generator().manual_seed(seed)
    tokens = math.prod(grid)
    shared = torch.randn(1, 1, heads, dim, generator=gen)
    q = (torch.randn(batch, tokens, heads, dim, generator=gen) + 2 * shared).to(dtype)
    k = (torch.randn(batch, tokens, kv_heads or heads, dim, generator=gen) + 2 * shared[:, :, :kv_heads or heads])
    return q, k.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("threshold, w", [(0.9, (3, 3, 3)), (0.7, (1, 3, 1)), (0.3, (1, 1, 1)), (1.0, (1, 1, 1)),
                                          (0.0, (5, 1, 3)), (0.8, (2, 4, 2))])
def test_masks_are_diffusers_nabla_masks(dtype, threshold, w):
    q, k = qk(1, 4, 32, dtype, seed=3)
    mask = nabla.plan(VideoGeometry(*GRID), 4, q=q.transpose(1, 2), k=k.transpose(1, 2), threshold=threshold, window=w)
    want = diffusers_nabla(q, k, GRID, threshold, w)[0]
    got = block_map(mask)
    assert torch.equal(got, want)
    assert not want.all() or threshold == 1.0                       # the cases select (all: P = 1 keeps every block)
    assert np.allclose(np.asarray(mask.budgets), want.double().mean(dim=(1, 2)).numpy())
    assert list(mask.q_offsets) == list(range(0, math.prod(GRID) + 1, 64))


def test_samples_of_a_batch_share_the_union_of_their_masks():
    q, k = qk(3, 2, 16, torch.bfloat16, seed=4)
    mask = nabla.plan(VideoGeometry(*GRID), 2, q=q.transpose(1, 2), k=k.transpose(1, 2), threshold=0.6,
                      window=(1, 1, 1))
    per_sample = diffusers_nabla(q, k, GRID, 0.6, (1, 1, 1))
    assert not torch.equal(per_sample[0], per_sample[1])              # the samples differ, so the union matters
    assert torch.equal(block_map(mask), per_sample.any(dim=0))


def test_query_heads_read_their_key_heads_means():
    q, k = qk(1, 4, 16, torch.float32, seed=5, kv_heads=2)
    mask = nabla.plan(VideoGeometry(*GRID), 4, q=q.transpose(1, 2), k=k.transpose(1, 2), threshold=0.8,
                      window=(1, 1, 1))
    want = diffusers_nabla(q, k.repeat_interleave(2, dim=2), GRID, 0.8, (1, 1, 1))[0]
    assert torch.equal(block_map(mask), want)


@pytest.mark.parametrize("bad, match", [
    (dict(threshold=1.5), "threshold"), (dict(threshold="0.9"), "threshold"), (dict(window=(3, 3)), "window"),
    (dict(window=(3, 0, 3)), r"window\[1\]"), (dict(window="333"), "window"), (dict(density=0.2), "unknown")])
def test_bad_parameters_name_the_field(bad, match):
    with pytest.raises((TypeError, ValueError), match=match):
        nabla.session(10, **bad)


def test_a_window_past_any_grid_is_refused_at_the_session_naming_the_field():
    """A window of 10**30 blocks was accepted, and the first plan broke in the window map's torch comparison with a bare
    'OverflowError: int too big to convert'; any window past a grid covers it, so one as wide as a geometry can be
    still plans (every block, here)."""
    with pytest.raises(ValueError, match=r"window\[0\]"):
        nabla.session(10, window=(10**30, 3, 3))
    geometry = VideoGeometry(2, 8, 16)
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 2, geometry.tokens, 8, generator=gen) for _ in range(2))
    assert nabla.plan(geometry, 2, q=q, k=k, window=(2**31 - 1,) * 3).density() == 1.0


@pytest.mark.parametrize("geometry, match", [
    (VideoGeometry(2, 12, 16), "divisible by 8"), (VideoGeometry(2, 8, 8, text_tokens=64), "text tokens"),
    (VideoGeometry(2, 8, 8, causal_frames=1), "causal")])
def test_geometries_without_whole_tiles_or_with_text_are_refused(geometry, match):
    q = torch.zeros(1, 1, geometry.tokens, 8)
    with pytest.raises(ValueError, match=match):
        nabla.plan(geometry, 1, q=q, k=q)


def test_a_session_keeps_the_last_window_maps_and_finds_a_re_seen_geometry(monkeypatch):
    """A session kept every geometry's window map (a device tensor each) for ever: a server seeing many resolutions
    grew it without bound. It keeps the WINDOWS_KEPT last used; one of them seen again is not rebuilt."""
    built = []
    make = nabla.window_map
    monkeypatch.setattr(nabla, "window_map", lambda geometry, *args: built.append(geometry) or make(geometry, *args))
    session = nabla.session(1)
    geometries = [VideoGeometry(frames, 8, 8) for frames in range(1, 21)]     # a stream of 20 resolutions
    gen = torch.Generator().manual_seed(7)
    for geometry in [geometries[0], *geometries, geometries[-2]]:
        q = torch.randn(1, 1, geometry.tokens, 8, generator=gen)
        mask = session.plan(geometry, 1, step=0, q=q, k=q)
        assert block_map(mask)[0][window(geometry.frames, 1, 1, (3, 3, 3))].all()       # the window's blocks kept
    assert len(session._windows) < len(geometries)
    assert len(session._windows) == nabla.WINDOWS_KEPT
    assert built == geometries                   # the first seen again while kept, the next-to-last too: no rebuild
    last = geometries[-nabla.WINDOWS_KEPT:]
    assert [geometry for geometry, _ in session._windows] == [*last[:-2], last[-1], last[-2]]    # least recent first

# ------------------------------------------------------------------ Kandinsky 5's NABLA configurations
NABLA_GRID = (4, 16, 16)    # 2 x 2 tiles a frame, 16 blocks
NABLA_CONFIG = dict(attention_type="nabla", attention_P=0.6, attention_wT=1, attention_wH=3, attention_wW=1)


def nabla_kandinsky() -> transformer_kandinsky.Kandinsky5Transformer3DModel:
    """The tiny Kandinsky 5 of test_integration_diffusers with a NABLA configuration."""
    torch.manual_seed(0)
    model = transformer_kandinsky.Kandinsky5Transformer3DModel(
        in_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16, out_visual_dim=4, model_dim=32, ff_dim=64,
        num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 6, 6), **NABLA_CONFIG)
    for module in model.modules():
        if isinstance(module, transformer_kandinsky.Kandinsky5Modulation):
            torch.nn.init.normal_(module.out_layer.weight, std=0.2)
        elif isinstance(module, torch.nn.RMSNorm):
            torch.nn.init.normal_(module.weight, mean=1.0, std=0.3)
    return model.eval()


def nabla_inputs(batch: int = 1) -> dict:
    """``batch`` samples on :data:`NABLA_GRID` with NABLA's ``sparse_params``, as Kandinsky 5's pipelines pass them."""
    frames, height, width = NABLA_GRID
    inputs = kandinsky_inputs(batch=batch, fractal=True)
    inputs["hidden_states"] = torch.randn(batch, frames, 2 * height, 2 * width, 4,
                                          generator=torch.Generator().manual_seed(5))
    inputs["visual_rope_pos"] = [torch.arange(n) for n in NABLA_GRID]
    sta = window(frames, height // 8, width // 8, (1, 3, 1))[None, None]
    inputs["sparse_params"] = {"to_fractal": True, "sta_mask": sta, "P": 0.6}
    return inputs


@pytest.mark.parametrize("batch", [1, 2])
def test_kandinsky_nabla_runs_the_models_own_masks_to_the_float64_oracle(monkeypatch, batch):
    """Each layer's mask is diffusers' NABLA mask of that layer's q and k (the config's P and window), one a sample as
    diffusers makes them, and the output is float64 attention under those masks."""
    model, inputs = nabla_kandinsky(), nabla_inputs(batch)
    seen: list[torch.Tensor] = []                                     # each layer's masks [B, H, NB, NB]
    original = transformer_kandinsky.Kandinsky5AttnProcessor.__call__

    def oracle(self, attn, hidden_states, encoder_hidden_states=None, rotary_emb=None, sparse_params=None):
        if encoder_hidden_states is not None or sparse_params is None:          # cross-attention, the text blocks
            return original(self, attn, hidden_states, encoder_hidden_states, rotary_emb, sparse_params)
        from sparsecore.integrations.diffusers import kandinsky
        q, k, v = kandinsky.kandinsky_qkv(attn, hidden_states, rotary_emb)
        blocks = diffusers_nabla(q, k, NABLA_GRID, 0.6, (1, 3, 1))
        seen.append(blocks)
        outs = [dense_attention(*(t[b:b + 1].transpose(1, 2).double().numpy() for t in (q, k, v)),
                                expand_to_tokens_of(blocks[b]), q.shape[-1] ** -0.5)[0] for b in range(len(blocks))]
        out = torch.from_numpy(np.concatenate(outs)).transpose(1, 2).flatten(-2).to(hidden_states.dtype)
        return attn.out_layer(out)

    monkeypatch.setattr(transformer_kandinsky.Kandinsky5AttnProcessor, "__call__", oracle)
    expected = forward(model, inputs, 500.0)
    monkeypatch.undo()
    handle = sparse.apply(model, "nabla", device="cpu", num_steps=1)
    try:
        handle.keep_masks()
        got = forward(model, inputs, 500.0)
        masks = [block_map(handle.mask(layer)) for layer in range(2)]         # the last sample's
    finally:
        handle.remove()
    assert handle._planner.session(handle.geometry).params == nabla.NablaParams(0.6, (1, 3, 1))   # from the config
    assert all(torch.equal(got_mask, want[-1]) for got_mask, want in zip(masks, seen)) and not seen[0].all()
    if batch > 1:
        assert not torch.equal(seen[0][0], seen[0][1])                # the samples' masks differ: each its own counts
    # a row's density is that of all its masks (every sample's), its blocks all of one size
    assert [row["density"] for row in handle.stats()] == pytest.approx([float(m.double().mean()) for m in seen])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - forward(model, {**inputs, "sparse_params": None}, 500.0)).abs().max() > 1e-3


def expand_to_tokens_of(blocks: torch.Tensor) -> np.ndarray:
    """A ``[H, NB, NB]`` block map as the ``[H, S, S]`` token mask of 64-token blocks."""
    return blocks.repeat_interleave(64, dim=1).repeat_interleave(64, dim=2).numpy()


def test_nabla_is_refused_where_tokens_are_not_in_tiles():
    raster = transformer_kandinsky.Kandinsky5Transformer3DModel(
        in_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16, out_visual_dim=4, model_dim=32, ff_dim=64,
        num_text_blocks=1, num_visual_blocks=1, axes_dims=(4, 6, 6))
    with pytest.raises(ValueError, match="attention_type='nabla'"):
        sparse.apply(raster, "nabla", device="cpu")
    from diffusers import WanTransformer3DModel
    wan = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                out_channels=4, text_dim=8, freq_dim=8, ffn_dim=16, num_layers=1)
    with pytest.raises(ValueError, match="raster"):
        sparse.apply(wan, "nabla", device="cpu")
    model = nabla_kandinsky()
    handle = sparse.apply(model, "nabla", device="cpu", num_steps=1)
    try:
        for params in (None, {"to_fractal": False}):
            with pytest.raises(ValueError, match="raster order"):
                forward(model, {**nabla_inputs(), "sparse_params": params}, 500.0)
        assert handle.stats() == []                                     # refused before any layer ran
    finally:
        handle.remove()


def test_given_parameters_override_the_configs():
    model = nabla_kandinsky()
    handle = sparse.apply(model, "nabla", device="cpu", num_steps=1, threshold=0.3, window=(1, 1, 1))
    try:
        forward(model, nabla_inputs(), 500.0)
        assert handle._planner.session(handle.geometry).params == nabla.NablaParams(0.3, (1, 1, 1))
    finally:
        handle.remove()


def test_regional_fullgraph_compile_equals_eager_with_no_graph_break():
    from torch._dynamo.utils import counters
    model, inputs = nabla_kandinsky(), nabla_inputs(2)
    handle = sparse.apply(model, "nabla", device="cpu", num_steps=1)
    try:
        eager = forward(model, inputs, 500.0)
        torch._dynamo.reset()
        counters.clear()
        model.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
        compiled = forward(model, inputs, 500.0)
    finally:
        handle.remove()
        torch._dynamo.reset()
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] >= 1
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
