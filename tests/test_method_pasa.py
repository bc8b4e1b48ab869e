"""PASA: seeded stochastic top-k, curvature-aware budgets, the calibration API, valid IR."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from sparsecore.geometry import VideoGeometry
from sparsecore.methods import pasa
from sparsecore.methods.common import mask_from_rows, topk_rows
from sparsecore.workloads import video_qkv

GEOMETRY = VideoGeometry(12, 4, 8)        # 384 tokens: 6 blocks of 64


@functools.lru_cache(maxsize=None)
def inputs(seed: int = 0, heads: int = 2):
    q, k, _ = video_qkv(GEOMETRY, heads, 32, seed=seed)
    return q, k


# ------------------------------------------------------------------ selection
@given(st.integers(0, 2**31 - 1), st.integers(0, 9), st.integers(10, 49), st.floats(0.0, 3.0))
def test_same_seed_same_mask(seed, layer, step, noise):
    q, k = inputs()
    a = pasa.plan(GEOMETRY, 2, step=step, layer=layer + 1, q=q, k=k, seed=seed, noise_scale=noise, block_size=16)
    b = pasa.plan(GEOMETRY, 2, step=step, layer=layer + 1, q=q, k=k, seed=seed, noise_scale=noise, block_size=16)
    assert a == b


def test_noise_is_redrawn_per_layer_step_and_seed():
    q, k = inputs()
    base = dict(q=q, k=k, noise_scale=3.0, block_size=16)
    masks = [pasa.plan(GEOMETRY, 2, step=s, layer=l, seed=seed, **base)
             for s, l, seed in [(20, 1, 0), (21, 1, 0), (20, 2, 0), (20, 1, 1)]]
    assert len({m.fingerprint() for m in masks}) == 4


def test_pooled_scores_are_block_means():
    q, k = inputs(heads=2)
    offs = GEOMETRY.block_offsets(64)
    qm, km = pasa.block_means(q, offs), pasa.block_means(k, offs)
    q64 = q[0, 1].double().numpy().reshape(6, 64, -1).mean(1)
    k64 = k[0, 1].double().numpy().reshape(6, 64, -1).mean(1)
    np.testing.assert_allclose(pasa.pooled_scores(qm, km, 1, 0.5).numpy(), q64 @ k64.T * 0.5, rtol=1e-4, atol=1e-5)


def selected(scores: torch.Tensor, keep: int) -> np.ndarray:
    """bool [n, n]: the row-wise top-k of square block scores (no text)."""
    n = scores.shape[0]
    rows = topk_rows(scores, keep, np.zeros(n, dtype=bool))[0]
    return mask_from_rows([rows], np.arange(n + 1), np.arange(n + 1)).to_dense()[0]


@given(st.integers(0, 2**31 - 1), st.floats(1e-4, 0.5), st.integers(2, 40), st.integers(1, 39))
def test_noise_moves_selections_only_among_near_tied_blocks(seed, scale, cols, keep):
    assume(keep < cols)
    rng = np.random.default_rng(seed)
    scores = torch.from_numpy(rng.standard_normal((cols, cols)) * 3).float()
    noise = pasa.selection_noise((cols, cols), seed=seed, layer=0, step=0, head=0, scale=scale)
    clean = selected(scores, keep)
    noisy = selected(scores + noise, keep)
    spread = float(noise.max() - noise.min())
    s = scores.numpy()
    for row in range(cols):
        promoted, demoted = noisy[row] & ~clean[row], clean[row] & ~noisy[row]
        if promoted.any():                   # a swap needs the noise to bridge the score gap
            assert s[row, demoted].max() - s[row, promoted].min() <= spread + 1e-5
    tiny = pasa.selection_noise((cols, cols), seed=seed, layer=0, step=0, head=0, scale=1e-12)
    gaps = np.diff(np.sort(s, axis=1), axis=1)
    assume(gaps.min() > 1e-6)
    again = selected(scores + tiny, keep)
    assert (again == clean).all()


def test_gumbel_noise_has_the_gumbel_moments():
    noise = pasa.selection_noise((400, 500), seed=3, layer=None, step=7, head=0, scale=0.5)
    assert noise.mean().item() == pytest.approx(0.5 * 0.5772, abs=0.01)
    assert noise.std().item() == pytest.approx(0.5 * np.pi / np.sqrt(6), abs=0.01)


# ------------------------------------------------------------------ budgets
profiles = st.lists(st.floats(0.01, 10.0), min_size=2, max_size=60)


@given(profiles, st.floats(0.02, 0.9), st.floats(0.0, 1.0), st.floats(0.0, 0.5))
def test_mean_budget_over_sparse_steps_is_rho(changes, rho, low_fraction, dense_fraction):
    steps = len(changes)
    profile = pasa.CurvatureProfile(np.array([np.nan, *changes[1:]]))
    schedule = pasa.density_schedule(steps, rho, dense_fraction=dense_fraction, profile=profile,
                                     min_density=rho * low_fraction)
    first = pasa.dense_steps(steps, dense_fraction)
    assert (schedule[:first] == 1.0).all()
    if first < steps:
        sparse = schedule[first:]
        assert sparse.mean() == pytest.approx(rho, rel=1e-9)
        assert (sparse >= rho * low_fraction - 1e-12).all() and (sparse <= 1 + 1e-12).all()
        change = np.array([changes[1], *changes[1:]])[first:]
        free = (sparse > rho * low_fraction + 1e-9) & (sparse < 1 - 1e-9)
        if free.sum() > 1:                              # unclipped steps stay proportional to the change
            ratio = sparse[free] / change[free]
            assert ratio.max() == pytest.approx(ratio.min(), rel=1e-6)
        assert (np.diff(sparse[np.argsort(change, kind="stable")]) >= -1e-9).all()   # more change, more budget


def test_schedule_defaults_and_errors():
    flat = pasa.density_schedule(50, 0.15)
    assert (flat[:10] == 1).all() and (flat[10:] == 0.15).all()
    with pytest.raises(ValueError, match="recorded for 10 steps"):
        pasa.density_schedule(50, 0.15, profile=pasa.CurvatureProfile(np.ones(10)))
    with pytest.raises(ValueError, match="min_density"):
        pasa.density_schedule(50, 0.15, min_density=0.3)


def test_calibration_record_save_load_average(tmp_path):
    recorder = pasa.CurvatureRecorder(5)
    velocities = [torch.full((2, 3), float(x)) for x in (0, 1, 3, 6, 10)]
    for step, v in enumerate(velocities):
        recorder.record(step, v)
    profile = recorder.profile()
    assert np.isnan(profile.values[0]) and profile.values[1:].tolist() == [1, 2, 3, 4]
    loaded = pasa.CurvatureProfile.load(profile.save(tmp_path / "curve.json"))
    np.testing.assert_array_equal(loaded.values[1:], profile.values[1:])
    twice = pasa.CurvatureProfile.average([profile, pasa.CurvatureProfile(profile.values * 3)])
    assert twice.values[1:].tolist() == [2, 4, 6, 8]
    with pytest.raises(ValueError, match="no recorded change"):
        pasa.CurvatureRecorder(3).profile()
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a PASA curvature profile"):
        pasa.CurvatureProfile.load(tmp_path / "bad.json")


def test_session_follows_the_schedule_and_counts_blocks():
    curve = pasa.CurvatureProfile(np.array([np.nan] + [1.0] * 39 + [4.0] * 10))
    session = pasa.session(num_steps=50, profile=curve, block_size=16)
    q, k = inputs()
    assert [session.action(s) for s in (0, 9, 10)] == ["dense", "dense", "select"]
    assert session.plan(GEOMETRY, 2, step=5, layer=1).density() == 1.0
    assert session.plan(GEOMETRY, 2, step=20, layer=0, q=q, k=k).density() == 1.0     # dense layer 0
    quiet = session.plan(GEOMETRY, 2, step=20, layer=1, q=q, k=k)
    busy = session.plan(GEOMETRY, 2, step=45, layer=1, q=q, k=k)
    blocks = quiet.num_kv_blocks
    for mask in (quiet, busy):
        assert (mask.row_lengths == max(1, round(mask.meta["density"] * blocks))).all()
    assert busy.meta["density"] > 0.15 > quiet.meta["density"]
    assert np.mean(session.schedule[10:]) == pytest.approx(0.15)


@pytest.mark.parametrize("geometry, heads", [
    (VideoGeometry(21, 30, 52), 12),                          # Wan 2.1 1x
    (VideoGeometry(121, 30, 52), 12),                         # Wan 2.1 6x
    (VideoGeometry(33, 30, 52, text_tokens=256), 16),         # HunyuanVideo 1.5 with text
])
def test_valid_ir_at_model_shapes(geometry, heads):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, geometry.tokens, 8, generator=gen)        # small head dim: planning cost only
    k = torch.randn(1, heads, geometry.tokens, 8, generator=gen)
    mask = pasa.plan(geometry, heads, step=20, layer=3, q=q, k=k)
    offs = geometry.block_offsets(64)
    text = geometry.text_blocks(offs)
    keep = round(0.15 * (~text).sum())
    assert mask.q_len == geometry.tokens and mask.num_heads == heads
    assert (mask.row_lengths[:, ~text] == keep + text.sum()).all() and (mask.row_lengths[:, text] == len(text)).all()
    assert mask.meta["method"] == "pasa" and mask.meta["step"] == 20 and mask.meta["layer"] == 3


def test_parameter_errors_name_the_field():
    with pytest.raises(TypeError, match="unknown parameter"):
        pasa.plan(GEOMETRY, 1, step=20, rho=0.1)
    with pytest.raises(ValueError, match="density: expected a value in"):
        pasa.plan(GEOMETRY, 1, step=20, density=0.0)
    with pytest.raises(ValueError, match="q: this method needs q"):
        pasa.plan(GEOMETRY, 1, step=20)
    with pytest.raises(ValueError, match="step: expected 0 <= step < num_steps=50"):
        pasa.plan(GEOMETRY, 1, step=50)
