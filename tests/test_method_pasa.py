"""PASA: seeded stochastic top-k, curvature-aware budgets, the calibration API, valid IR."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import method_reference as ref

from sparsecore.geometry import VideoGeometry
from sparsecore import noise
from sparsecore.methods import HeadShard, pasa
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
    want = ref.pasa_scores(q.double().numpy(), k.double().numpy(), offs, 0.5)
    np.testing.assert_allclose(pasa.pooled_scores(q, k, offs, 0.5).numpy(), want, rtol=1e-4, atol=1e-5)


def test_pooled_scores_of_a_short_last_block_keep_float32_under_a_float64_default_dtype():
    """``torch.set_default_dtype(torch.float64)`` (a float64 script's first line) does not reach the block means: the
    short last block's sums were made in the default dtype and refused the float32 tokens added to them."""
    q, k = inputs(heads=2)
    offs = VideoGeometry(12, 4, 7).block_offsets(64)                  # 336 tokens: a last block of 16
    q, k = q[:, :, :336], k[:, :, :336]
    want = ref.pasa_scores(q.double().numpy(), k.double().numpy(), offs, 0.5)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = pasa.pooled_scores(q, k, offs, 0.5)
    finally:
        torch.set_default_dtype(default)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-5)


def test_noise_is_the_splitmix_counter_hash_on_any_shard():
    full = noise.gumbel(range(0, 3), 5, 7, seed=11, layer=4, step=9, scale=0.7, device="cpu")
    np.testing.assert_allclose(full.double().numpy(), ref.gumbel(range(0, 3), 5, 7, 11, 4, 9, 0.7), rtol=1e-5)
    assert torch.equal(noise.gumbel(range(1, 3), 5, 7, seed=11, layer=4, step=9, scale=0.7, device="cpu"), full[1:])
    assert not torch.equal(noise.gumbel(range(0, 3), 5, 7, seed=11, layer=None, step=9, scale=0.7, device="cpu"),
                           full)


geometries = st.builds(VideoGeometry, st.integers(2, 8), st.integers(1, 4), st.integers(1, 4), st.integers(0, 24),
                       st.sampled_from(["start", "end"]))


@settings(max_examples=40)
@given(geometries, st.sampled_from([4, 8, 16]), st.sampled_from([(2, 2), (4, 2), (3, 1)]), st.floats(0.05, 0.9),
       st.sampled_from([0.0, 0.2, 2.0]), st.integers(0, 2**31 - 1), st.data())
def test_device_plan_equals_the_host_statement_of_the_rules(g, block, heads, density, noise_scale, seed, data):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads[0], g.tokens, 16, generator=gen)
    k = torch.randn(2, heads[1], g.tokens, 16, generator=gen)
    group = heads[0] // heads[1]
    kv_start = data.draw(st.integers(0, heads[1] - 1), label="shard's first key head")   # a shard: whole key heads
    kv_stop = data.draw(st.integers(kv_start + 1, heads[1]), label="shard's key heads end")
    start, stop = kv_start * group, kv_stop * group
    session = pasa.session(num_steps=10, density=density, block_size=block, noise_scale=noise_scale, seed=seed % 97,
                           dense_layers=())
    mask = session.plan(g, heads[0], step=5, layer=3, q=q[:, start:stop], k=k[:, start // group:stop // group],
                        heads=HeadShard(start, stop, heads[0], num_kv_heads=heads[1]))
    offs = g.block_offsets(block)
    text = g.text_blocks(offs)
    scores = ref.pasa_scores(q.double().numpy(), k.double().numpy(), offs, 16 ** -0.5)
    video = np.flatnonzero(~text)
    scores[np.ix_(range(heads[0]), video, video)] += ref.gumbel(range(heads[0]), len(video), len(video), seed % 97, 3,
                                                                 5, noise_scale)
    keep = ref.keep_count(density, len(video))
    want = ref.sink_map(scores, text, [keep] * heads[0])[start:stop]
    got = mask.to_dense().numpy()
    clear = ref.cut_gaps(scores, text, [keep] * heads[0])[start:stop] > 1e-4     # float32 vs float64 near-ties
    assert (got[clear] == want[clear]).all()
    assert (got.sum(axis=2) == want.sum(axis=2)).all() and mask.device == torch.device("cpu")
    assert torch.equal(mask.budgets, torch.full((stop - start,), density, dtype=torch.float64))


def test_noise_is_finite_on_every_counter():
    sample = noise.gumbel(range(2), 2048, 2048, seed=1, layer=2, step=3, scale=1.0, device="cpu")   # 8 M draws
    assert torch.isfinite(sample).all()                  # the extreme uniforms stay inside (0, 1) in float32


def test_gumbel_noise_has_the_gumbel_moments():
    sample = noise.gumbel(range(1), 400, 500, seed=3, layer=None, step=7, scale=0.5, device="cpu")
    assert sample.mean().item() == pytest.approx(0.5 * 0.5772, abs=0.01)
    assert sample.std().item() == pytest.approx(0.5 * np.pi / np.sqrt(6), abs=0.01)


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
    assert np.isnan(loaded.values[0])                            # an unrecorded step stays unrecorded (null), not 0
    twice = pasa.CurvatureProfile.average([profile, pasa.CurvatureProfile(profile.values * 3)])
    assert twice.values[1:].tolist() == [2, 4, 6, 8]
    with pytest.raises(ValueError, match="no recorded change"):
        pasa.CurvatureRecorder(3).profile()
    for bad in (torch.tensor([0.0, float("nan")]), torch.tensor([float("-inf"), 0.0]), torch.tensor([1e300, 0.0])):
        recorder = pasa.CurvatureRecorder(3)                 # a NaN change was kept, and profile() blamed the order
        recorder.record(0, torch.zeros(2))
        with pytest.raises(ValueError, match="velocity: expected finite values at step 1, got NaN or inf"):
            recorder.record(1, bad.double())
    recorder = pasa.CurvatureRecorder(3)    # an empty prediction: a NaN mean was kept, profile() blamed the order
    with pytest.raises(ValueError, match=r"velocity: expected a non-empty tensor at step 0, got shape \[2, 0\]"):
        recorder.record(0, torch.zeros(2, 0))
    # every bad file names itself (some raised bare TypeErrors or an OverflowError)
    for bad in ("{}", '{"l1_change": 5}', '{"l1_change": ["a", 1]}', '{"l1_change": [{"a": 1}]}',
                '{"l1_change": [true]}', "[1, 2]", '{"l1_change": [null, -1]}', '{"l1_change": []}',
                '{"l1_change": [null, ' + "9" * 400 + "]}", '{"l1_change": [null, 1], "l1_change": [null, 2]}',
                '{"l1_change": ' + "[" * 100_000 + "]" * 100_000 + "}"):     # a key twice; a bare RecursionError
        (tmp_path / "bad.json").write_text(bad)
        with pytest.raises(ValueError, match="bad.json: not a PASA curvature profile"):
            pasa.CurvatureProfile.load(tmp_path / "bad.json")


def test_schedule_mean_is_exact_whatever_the_spread_of_the_changes():
    """A change 1e13 times smaller than the others: the water-filling's search for c stopped at 1e12 and the mean
    came out 0.89 for density 0.9."""
    profile = pasa.CurvatureProfile(np.array([np.nan, 1.0, 1.0, 1.0, 1e-13]))
    rho = pasa.density_schedule(5, 0.9, dense_fraction=0.0, profile=profile)
    np.testing.assert_allclose(rho, [1.0, 1.0, 1.0, 1.0, 0.5])
    rng = np.random.default_rng(0)
    for _ in range(200):
        changes = rng.random(12) * 10.0 ** rng.uniform(-15, 3, 12)
        rho = pasa.density_schedule(13, 0.3, dense_fraction=0.0, profile=pasa.CurvatureProfile(
            np.concatenate([[np.nan], changes])), min_density=0.05)
        assert abs(rho.mean() - 0.3) < 1e-12 and rho.min() >= 0.05 and rho.max() <= 1.0
        free = (rho > 0.05) & (rho < 1.0)                     # unclipped steps stay proportional to their change
        ratios = rho[free] / np.concatenate([[changes[0]], changes])[free]
        np.testing.assert_allclose(ratios, ratios[0] if free.any() else ratios, rtol=1e-9)


def test_session_follows_the_schedule_and_counts_blocks():
    curve = pasa.CurvatureProfile(np.array([np.nan] + [1.0] * 39 + [4.0] * 10))
    session = pasa.session(num_steps=50, profile=curve, block_size=16)
    q, k = inputs()
    assert [session.action(GEOMETRY, s).label for s in (0, 9, 10)] == ["dense", "dense", "select"]
    assert session.action(GEOMETRY, 20, layer=0).dense and session.action(GEOMETRY, 20, layer=0).label == "dense"
    assert session.plan(GEOMETRY, 2, step=5, layer=1).density() == 1.0
    assert session.plan(GEOMETRY, 2, step=20, layer=0, q=q, k=k).density() == 1.0     # dense layer 0
    quiet = session.plan(GEOMETRY, 2, step=20, layer=1, q=q, k=k)
    busy = session.plan(GEOMETRY, 2, step=45, layer=1, q=q, k=k)
    blocks = quiet.num_kv_blocks
    for mask in (quiet, busy):
        assert (mask.row_lengths == max(1, round(mask.meta["density"] * blocks))).all()
        assert mask.meta["keep_blocks"] == max(1, round(mask.meta["density"] * blocks))
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
    lengths = mask.row_lengths.numpy()
    assert (lengths[:, ~text] == keep + text.sum()).all() and (lengths[:, text] == len(text)).all()
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
    with pytest.raises(TypeError, match="dense_layers\\[0\\]: expected an int"):
        pasa.session(dense_layers=["0"])
    for call in (lambda: pasa.session(profile="flat"),
                 lambda: pasa.density_schedule(50, 0.15, profile=np.ones(50)),
                 lambda: pasa.density_schedule(5, 0.15, dense_fraction=1.0, profile=np.ones(5))):   # all dense
        with pytest.raises(TypeError, match="profile: expected a pasa.CurvatureProfile"):
            call()


def test_pooled_scores_read_key_head_h_over_g():
    """4 query heads on 2 key heads: query head h reads key head h // 2 (the property above plans shards of whole
    key heads; this pins the mapping on its own)."""
    gen = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 4, 64, 8, generator=gen), torch.randn(1, 2, 64, 8, generator=gen)
    offsets = np.array([0, 16, 32, 48, 64])
    got = pasa.pooled_scores(q, k, offsets, 0.5).double().numpy()
    q_means = q.double().numpy().reshape(1, 4, 4, 16, 8).mean(axis=3)
    k_means = np.repeat(k.double().numpy().reshape(1, 2, 4, 16, 8).mean(axis=3), 2, axis=1)
    np.testing.assert_allclose(got, (q_means @ np.swapaxes(k_means, -1, -2)).mean(axis=0) * 0.5, rtol=1e-5,
                               atol=1e-6)


def test_noise_without_a_layer_is_the_reference_hash():
    got = noise.gumbel(range(0, 3), 5, 7, seed=11, layer=None, step=9, scale=0.7, device="cpu")
    np.testing.assert_allclose(got.double().numpy(), ref.gumbel(range(0, 3), 5, 7, 11, None, 9, 0.7), rtol=1e-5)


@pytest.mark.parametrize("geometry", [VideoGeometry(12, 4, 8), VideoGeometry(12, 4, 8, text_tokens=40),
                                      VideoGeometry(12, 4, 8, text_tokens=40, text_position="start")],
                         ids=["video only", "text at the end", "text at the start"])
def test_each_row_of_a_sparse_step_lists_its_blocks_ascending(geometry):
    """The IR's rule (``BlockMask.indices``: each row sorted ascending and unique), which the lowerings may walk by:
    the torch path's ``topk(sorted=False)`` returns its ids in no order (at seed 0 a row came out [8, 5, 4, 2]), so
    the selection sorts them. The sets alone (``to_dense``) are held above; this holds the order."""
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 2, geometry.tokens, 16, generator=gen) for _ in range(2))
    mask = pasa.plan(geometry, 2, step=20, layer=3, q=q, k=k, block_size=16, density=0.5)
    indptr, indices = mask.indptr.numpy(), mask.indices.numpy()
    rows = [indices[indptr[h, i]:indptr[h, i + 1]] for h in range(2) for i in range(mask.num_q_blocks)]
    assert all(len(row) > 1 for row in rows)
    assert all((np.diff(row) > 0).all() for row in rows), [row for row in rows if not (np.diff(row) > 0).all()][:2]


def test_a_dense_fraction_that_leaves_no_sparse_step_is_refused_naming_the_remedy():
    """``dense_fraction=1.0`` (or a run so short that ``ceil(dense_fraction * num_steps)`` covers it: one step at the
    default 0.2) made every step dense without a word: PASA never ran. Refused, as AdaSpa's ``warmup_steps`` are."""
    for steps, params, got in ((50, {"dense_fraction": 1.0}, "1.0"), (50, {"dense_fraction": 0.99}, "0.99"),
                               (1, {}, r"0.2 \(the default\)")):
        with pytest.raises(ValueError, match=rf"dense_fraction: expected .*num_steps={steps}.*got {got}.*; pass"):
            pasa.session(steps, **params)
    for steps in (1, 3, 50):                 # the largest fraction the message names leaves one sparse step
        session = pasa.session(steps, dense_fraction=(steps - 1) / steps)
        assert [session.action(None, step).dense for step in range(steps)] == [True] * (steps - 1) + [False]
