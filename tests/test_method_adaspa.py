"""AdaSpa: the block-mass search against float64, row-wise top-k, head budgets, the step schedule, valid IR."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies import offsets

import sparsecore
from sparsecore import BlockMask, Capabilities
from sparsecore import search
from sparsecore.geometry import VideoGeometry
from sparsecore.methods import adaspa
from sparsecore.methods.common import mask_from_rows
from sparsecore.quality import attention_fidelity
from sparsecore.search import block_mass, register_block_mass
from sparsecore.workloads import video_qkv

ANY = Capabilities(devices=("test",), array_type="numpy", dtypes=frozenset({"float64"}))


def mass_float64(q, k, q_offsets, kv_offsets, lse=None):
    """Block masses from float64 dense softmax probabilities, [B, H, MB, NB]."""
    q, k = q.double().numpy(), k.double().numpy()
    k = np.repeat(k, q.shape[1] // k.shape[1], axis=1)
    scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
    if lse is None:
        top = scores.max(axis=-1, keepdims=True)
        lse = (top + np.log(np.exp(scores - top).sum(axis=-1, keepdims=True)))[..., 0]
    probs = np.exp(scores - lse[..., None])
    rows = np.add.reduceat(probs, q_offsets[:-1], axis=2)
    return np.add.reduceat(rows, kv_offsets[:-1], axis=3)


# ------------------------------------------------------------------ the search kernel
@settings(max_examples=30)
@given(offsets(ANY, "q"), offsets(ANY, "kv"), st.integers(1, 2), st.sampled_from([(1, 1), (2, 2), (4, 2), (3, 1)]),
       st.sampled_from([8, 16, 64]), st.integers(0, 2**32 - 1), st.sampled_from([1 << 22, 5000]))
def test_block_mass_matches_float64_dense(q_offsets, kv_offsets, batch, heads, head_dim, seed, max_elements):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads[0], int(q_offsets[-1]), head_dim, generator=gen)
    k = torch.randn(batch, heads[1], int(kv_offsets[-1]), head_dim, generator=gen)
    result = block_mass(q, k, q_offsets, kv_offsets, max_elements=max_elements)
    want = mass_float64(q, k, q_offsets, kv_offsets)
    got = result.mass.double().numpy()
    assert result.mass.dtype == torch.float32 and result.mass.shape == want.shape and result.impl == "torch"
    assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want)
    rows = got.sum(axis=3)                                              # fresh LSE: row sums = query tokens
    np.testing.assert_allclose(rows, np.broadcast_to(np.diff(q_offsets), rows.shape), rtol=1e-5)


def test_block_mass_with_the_kernels_lse_and_a_cached_lse():
    g = VideoGeometry(4, 4, 6)
    q, k, v = video_qkv(g, 3, 32, seed=4)
    offs = g.block_offsets(16)
    dense = sparsecore.compile(BlockMask.full(3, g.tokens, g.tokens, 16), device="cpu")
    _, lse = dense(q, k, v, return_lse=True)
    with_kernel = block_mass(q, k, offs, offs, lse=lse).mass.double().numpy()
    np.testing.assert_allclose(with_kernel.sum(axis=3), np.broadcast_to(np.diff(offs), (1, 3, len(offs) - 1)),
                               rtol=1e-5)
    older = lse + 0.25                                               # a stale normalizer rescales every mass
    cached = block_mass(q, k, offs, offs, lse=older).mass.double().numpy()
    np.testing.assert_allclose(cached, with_kernel * np.exp(-0.25), rtol=2e-5, atol=1e-9)
    want = mass_float64(q, k, offs, offs, lse=older.double().numpy())
    assert np.linalg.norm(cached - want) <= 1e-5 * np.linalg.norm(want)


def test_block_mass_dispatches_through_the_registry(monkeypatch):
    monkeypatch.setattr(search, "_IMPLS", {})
    calls = []

    def fake(q, k, q_offsets, kv_offsets, lse, scale):
        calls.append(scale)
        return search.torch_block_mass(q, k, q_offsets, kv_offsets, lse, scale)

    register_block_mass("cpu", fake, name="fake", supports=lambda q, k, qo, ko: "odd" if q.shape[2] % 2 else None)
    q, k = torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8)
    offs = np.array([0, 4, 8])
    assert block_mass(q, k, offs, offs).impl == "fake" and calls == [8 ** -0.5]
    assert block_mass(q, k, offs, offs, impl="torch").impl == "torch"
    odd_q, odd = torch.randn(1, 2, 7, 8), np.array([0, 4, 7])
    assert block_mass(odd_q, k, odd, offs).impl == "torch"                 # auto falls back, naming nothing lost
    with pytest.raises(ValueError, match="cannot take these inputs: odd"):
        block_mass(odd_q, k, odd, offs, impl="fake")
    with pytest.raises(ValueError, match="not registered"):
        block_mass(q, k, offs, offs, impl="triton")
    with pytest.raises(ValueError, match="already has implementation"):
        register_block_mass("cpu", fake, name="other")


def test_block_mass_input_errors():
    q, k = torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8)
    offs = np.array([0, 4, 8])
    with pytest.raises(ValueError, match="lse: expected a float32 tensor"):
        block_mass(q, k, offs, offs, lse=torch.zeros(1, 2, 7))
    with pytest.raises(TypeError, match="lse: expected float32"):
        block_mass(q, k, offs, offs, lse=torch.zeros(1, 2, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="end at L_q=8"):
        block_mass(q, k, np.array([0, 4, 9]), offs)
    with pytest.raises(ValueError, match="H_kv dividing"):
        block_mass(q, torch.randn(1, 3, 8, 8), offs, offs)


# ------------------------------------------------------------------ selection and budgets
@given(st.integers(1, 6), st.integers(1, 4), st.integers(1, 4), st.integers(0, 20), st.sampled_from(["start", "end"]),
       st.integers(1, 16), st.integers(1, 3), st.floats(0.0, 0.95), st.integers(0, 2**32 - 1))
def test_top_k_keeps_the_largest_masses_and_the_text_sink(frames, height, width, text, position, block, heads,
                                                          sparsity, seed):
    g = VideoGeometry(frames, height, width, text_tokens=text, text_position=position)
    offs = g.block_offsets(block)
    n = len(offs) - 1
    mass = torch.rand(heads, n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    rows, sparsities, _ = adaspa.select(mass, g, offs, sparsity=sparsity, head_adaptive=False)
    dense = mask_from_rows(rows, offs, offs).to_dense()
    text_blocks = g.text_blocks(offs)
    video = np.nonzero(~text_blocks)[0]
    keep = max(1, round((1 - sparsity) * len(video)))
    assert dense[:, :, text_blocks].all() and dense[:, text_blocks, :].all()
    m = mass.numpy()
    for h in range(heads):
        for i in video:
            kept = dense[h, i, video]
            assert kept.sum() == keep
            if not kept.all():
                assert m[h, i, video][kept].min() > m[h, i, video][~kept].max()


@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=24), st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_head_budgets_keep_the_base_average(recalls, sparsity, threshold):
    out = adaspa.head_sparsities(np.array(recalls), sparsity, threshold)
    assert out.mean() == pytest.approx(sparsity, abs=1e-12)
    assert ((out >= 0) & (out <= 1)).all() and len(set(out.tolist())) <= 3
    order = np.argsort(-np.array(recalls), kind="stable")
    assert (np.diff(out[order]) <= 1e-12).all()                     # better recall: never less sparse
    n = min(sum(r > threshold for r in recalls), len(recalls) // 2)
    if sparsity >= 1 / 3 and n:
        assert out[order[0]] == pytest.approx((1 + sparsity) / 2)
        assert out[order[-1]] == pytest.approx((3 * sparsity - 1) / 2)


def test_paper_example_levels():
    out = adaspa.head_sparsities(np.array([0.95, 0.9, 0.7, 0.5, 0.85, 0.3]), 0.8)   # n = 3 of 6
    assert sorted(out.tolist()) == pytest.approx([0.7, 0.7, 0.7, 0.9, 0.9, 0.9])
    capped = adaspa.head_sparsities(np.array([0.95, 0.9, 0.99, 0.3]), 0.8)          # n = 3 > H/2: capped at 2
    assert sorted(capped.tolist()) == pytest.approx([0.7, 0.7, 0.9, 0.9])


def constructed_inputs(logits: np.ndarray, g: VideoGeometry, block: int):
    """q, k whose scaled scores are exactly ``logits[h, i, j]`` for every token of query block i, key block j."""
    heads, n, _ = logits.shape
    head_dim = 2 * n
    scale = head_dim ** -0.5
    offs = g.block_offsets(block)
    q = torch.zeros(1, heads, g.tokens, head_dim, dtype=torch.float64)
    k = torch.zeros(1, heads, g.tokens, head_dim, dtype=torch.float64)
    for j in range(n):
        k[0, :, offs[j]:offs[j + 1], j] = 1.0
    for h in range(heads):
        for i in range(n):
            q[0, h, offs[i]:offs[i + 1], :n] = torch.from_numpy(logits[h, i]) / scale
    return q.float(), k.float(), offs


def test_recall_on_inputs_with_known_block_masses():
    g = VideoGeometry(4, 4, 4)                                       # 64 tokens, blocks of 8: 8 x 8 blocks
    rng = np.random.default_rng(0)
    logits = rng.uniform(0, 4, size=(3, 8, 8)) * np.array([0.2, 1.0, 2.5])[:, None, None]
    q, k, offs = constructed_inputs(logits, g, 8)
    weights = np.exp(logits) / np.exp(logits).sum(axis=2, keepdims=True)     # equal block sizes: per-token share
    mask = adaspa.plan(g, 3, step=10, q=q, k=k, block_size=8, sparsity=0.75, head_adaptive=False)
    top2 = np.sort(weights, axis=2)[:, :, -2:].sum(axis=2)                     # keep 2 of 8 blocks per row
    assert mask.meta["base_recall"] == pytest.approx(top2.mean(axis=1).tolist(), rel=1e-5)
    for h in range(3):
        for i in range(8):
            assert set(mask.row(h, i).tolist()) == set(np.argsort(weights[h, i])[-2:].tolist())
    v = torch.randn(1, 3, g.tokens, 16, generator=torch.Generator().manual_seed(1))
    fid = attention_fidelity(q, k, v, mask)
    np.testing.assert_allclose(fid.recall, top2.mean(axis=1), rtol=1e-5)
    adaptive = adaspa.plan(g, 3, step=10, q=q, k=k, block_size=8, sparsity=0.75)
    recalls = np.array(adaptive.meta["base_recall"])
    n = min(int((recalls > 0.8).sum()), 1)
    expected = adaspa.head_sparsities(recalls, 0.75)
    assert adaptive.meta["head_sparsity"] == pytest.approx(expected.tolist())
    assert adaptive.budgets.tolist() == pytest.approx((1 - expected).tolist())
    assert n == 0 or adaptive.row_lengths[np.argmax(recalls)].max() < adaptive.row_lengths[np.argmin(recalls)].max()


# ------------------------------------------------------------------ schedule and session
def test_session_schedule_dense_search_reuse_cached_search():
    session = adaspa.session(num_steps=50)
    actions = [session.action(s) for s in range(50)]
    assert actions[:10] == ["dense"] * 10 and actions[10] == "search" and actions[30] == "cached-search"
    assert set(actions[11:30]) == {"reuse"} and set(actions[31:]) == {"reuse"}

    g = VideoGeometry(6, 4, 4)
    q1, k1, _ = video_qkv(g, 2, 32, seed=1)
    q2, k2, _ = video_qkv(g, 2, 32, seed=2)
    assert session.plan(g, 2, step=3, layer=0).density() == 1.0
    at_search = session.plan(g, 2, step=10, layer=0, q=q1, k=k1)
    assert at_search.density() == 1.0 and at_search.meta["action"] == "search"   # the search step runs dense
    searched = session.cached_mask(0)
    assert searched == adaspa.plan(g, 2, step=10, layer=0, q=q1, k=k1)
    assert session.plan(g, 2, step=11, layer=0) is searched
    fresh_lse = block_mass(q1, k1, g.block_offsets(64), g.block_offsets(64)).lse
    later = session.plan(g, 2, step=30, layer=0, q=q2, k=k2)
    assert later.meta["lse"] == "given" and later.meta["action"] == "cached-search"
    expected = adaspa.plan(g, 2, step=30, layer=0, q=q2, k=k2, lse=fresh_lse)
    assert later.fingerprint() == expected.fingerprint()
    assert session.plan(g, 2, step=45, layer=0) is later
    with pytest.raises(ValueError, match="no search result cached for this layer"):
        session.plan(g, 2, step=12, layer=1)
    with pytest.raises(ValueError, match="search_steps"):
        adaspa.session(num_steps=20, search_steps=(10, 30))


def test_parameter_errors_name_the_field():
    g = VideoGeometry(4, 4, 4)
    with pytest.raises(TypeError, match="unknown parameter"):
        adaspa.plan(g, 1, step=10, sparsty=0.8)
    with pytest.raises(ValueError, match="sparsity: expected a value in"):
        adaspa.plan(g, 1, step=10, sparsity=1.5)
    with pytest.raises(ValueError, match="q: this method needs q"):
        adaspa.plan(g, 1, step=10)
    with pytest.raises(ValueError, match="mass: expected float block masses"):
        adaspa.plan(g, 1, step=10, mass=torch.zeros(2, 2))


@pytest.mark.parametrize("geometry, heads", [
    (VideoGeometry(21, 30, 52), 12),                          # Wan 2.1 1x
    (VideoGeometry(121, 30, 52), 12),                         # Wan 2.1 6x
    (VideoGeometry(33, 30, 52, text_tokens=256), 16),         # HunyuanVideo 1.5 with text
])
def test_valid_ir_at_model_shapes(geometry, heads):
    offs = geometry.block_offsets(64)
    n = len(offs) - 1
    mass = torch.rand(heads, n, n, generator=torch.Generator().manual_seed(0))
    mask = adaspa.plan(geometry, heads, step=10, layer=5, mass=mass)
    video = ~geometry.text_blocks(offs)
    assert mask.q_len == geometry.tokens and mask.num_heads == heads
    assert mask.budgets.mean() == pytest.approx(0.2)
    lengths = mask.row_lengths[:, video]
    assert (lengths == lengths[:, :1]).all()                  # row-wise: one count per head
    assert mask.meta["step"] == 10 and mask.meta["layer"] == 5
    assert adaspa.plan(geometry, heads, step=0).density() == 1.0


def test_cached_search_with_a_stale_lse_raises_instead_of_nan_budgets():
    g = VideoGeometry(6, 4, 8, text_tokens=8)
    session = adaspa.session(num_steps=5, block_size=16, warmup_steps=1, search_steps=(1, 3))
    q1, k1, _ = video_qkv(g, 6, 16, seed=1, batch=2, sharpness=2.0)
    q2, k2, _ = video_qkv(g, 6, 16, seed=2, batch=2, sharpness=2.0)   # unrelated content: masses overflow
    session.plan(g, 6, step=1, layer=0, q=q1, k=k1)
    with pytest.raises(ValueError, match="lse: the cached LSE is far below the scores of layer 0 at step 3"):
        session.plan(g, 6, step=3, layer=0, q=q2, k=k2)
