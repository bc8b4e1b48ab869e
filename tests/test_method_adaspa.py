"""AdaSpa: the block-mass search against float64, row-wise top-k, head budgets, the step schedule, valid IR."""

from __future__ import annotations

import ast
import dataclasses
from functools import partial

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies import offsets
import method_reference as ref

import sparsecore
from sparsecore import BlockMask, Capabilities, registry
from sparsecore.geometry import VideoGeometry
from sparsecore.methods import HeadShard, adaspa
from sparsecore.quality import attention_fidelity
from sparsecore.search import block_mass, mass_steps, torch_block_mass
from sparsecore.workloads import video_qkv

ANY = Capabilities(devices=("test",), array_type="numpy", dtypes=frozenset({"float64"}))


def mass_float64(q, k, q_offsets, kv_offsets, lse=None, scale=None):
    """Block masses from float64 dense softmax probabilities, [B, H, MB, NB]."""
    q, k = q.double().numpy(), k.double().numpy()
    k = np.repeat(k, q.shape[1] // k.shape[1], axis=1)
    scores = q @ np.swapaxes(k, -1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if lse is None:
        top = scores.max(axis=-1, keepdims=True)
        lse = (top + np.log(np.exp(scores - top).sum(axis=-1, keepdims=True)))[..., 0]
    probs = np.exp(scores - lse[..., None])
    rows = np.add.reduceat(probs, q_offsets[:-1], axis=2)
    return np.add.reduceat(rows, kv_offsets[:-1], axis=3)


# ------------------------------------------------------------------ the search kernel
@settings(max_examples=30)
@given(offsets(ANY, "q"), offsets(ANY, "kv"), st.integers(1, 2), st.sampled_from([(1, 1), (2, 2), (4, 2), (3, 1)]),
       st.sampled_from([8, 16, 64]), st.integers(0, 2**32 - 1), st.sampled_from([1 << 22, 5000]),
       st.sampled_from([None, 0.2]))
def test_block_mass_matches_float64_dense(q_offsets, kv_offsets, batch, heads, head_dim, seed, max_elements, scale):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads[0], int(q_offsets[-1]), head_dim, generator=gen)
    k = torch.randn(batch, heads[1], int(kv_offsets[-1]), head_dim, generator=gen)
    result = block_mass(q, k, q_offsets, kv_offsets, max_elements=max_elements, scale=scale)
    want = mass_float64(q, k, q_offsets, kv_offsets, scale=scale)
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


class _FakeMassBackend(registry.Backend):
    """A CPU backend that offers only a block-mass pass: the search finds it through the registry."""

    name = "fake-mass"
    capabilities = Capabilities(devices=("cpu",), array_type="torch", dtypes=frozenset({"float32"}))
    calls: list = []

    def __init__(self) -> None:
        self.block_mass = registry.BlockMassOp(run=self._run, supports=lambda q, k, qo, ko: "odd" if q.shape[2] % 2
                                               else None)

    def _run(self, q, k, q_offsets, kv_offsets, lse, scale):
        self.calls.append(scale)
        return torch_block_mass(q, k, q_offsets, kv_offsets, lse, scale)

    def unavailable_reason(self, device):
        return None

    def preference(self, mask):
        return -100

    def lower(self, mask, device, options):
        raise NotImplementedError


def test_block_mass_dispatches_through_the_registry(monkeypatch):
    fake = _FakeMassBackend()
    monkeypatch.setitem(registry._REGISTRY, fake.name, fake)
    q, k = torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8)
    offs = np.array([0, 4, 8])
    assert block_mass(q, k, offs, offs).impl == "fake-mass" and fake.calls == [8 ** -0.5]
    assert block_mass(q, k, offs, offs, impl="torch").impl == "torch"
    odd_q, odd = torch.randn(1, 2, 7, 8), np.array([0, 4, 7])
    assert block_mass(odd_q, k, odd, offs).impl == "torch"                 # auto falls back, naming nothing lost
    with pytest.raises(ValueError, match="cannot take these inputs: odd"):
        block_mass(odd_q, k, odd, offs, impl="fake-mass")
    with pytest.raises(ValueError, match="not registered"):
        block_mass(q, k, offs, offs, impl="nonesuch")


def test_block_mass_input_errors():
    q, k = torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8)
    offs = np.array([0, 4, 8])
    with pytest.raises(ValueError, match="lse: expected a float32 tensor"):
        block_mass(q, k, offs, offs, lse=torch.zeros(1, 2, 7))
    with pytest.raises(TypeError, match="lse: expected float32"):
        block_mass(q, k, offs, offs, lse=torch.zeros(1, 2, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="end at L_q=8"):
        block_mass(q, k, np.array([0, 4, 9]), offs)
    with pytest.raises(ValueError, match="key heads must divide the query heads"):
        block_mass(q, torch.randn(1, 3, 8, 8), offs, offs)


# ------------------------------------------------------------------ selection and budgets
geometries = st.builds(VideoGeometry, st.integers(1, 6), st.integers(1, 4), st.integers(1, 4), st.integers(0, 20),
                       st.sampled_from(["start", "end"]))


@given(geometries, st.integers(1, 16), st.integers(1, 4), st.floats(0.0, 0.95), st.booleans(), st.floats(0.0, 1.0),
       st.integers(0, 2**32 - 1), st.data())
def test_device_search_equals_the_host_statement_of_the_rules(g, block, heads, sparsity, adaptive, threshold, seed,
                                                              data):
    offs = g.block_offsets(block)
    n = len(offs) - 1
    mass = torch.rand(heads, n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    text = g.text_blocks(offs)
    want, sparsities, recalls = ref.adaspa(mass.numpy(), text, sparsity, threshold, adaptive)
    start = data.draw(st.integers(0, heads - 1), label="shard start")
    stop = data.draw(st.integers(start + 1, heads), label="shard stop")
    full = torch.from_numpy(recalls)
    gather = lambda values: torch.cat([full[:start], values, full[stop:]])      # noqa: E731  (the other ranks')
    shard = HeadShard(start, stop, heads, gather)
    params = adaspa.AdaSpaParams(sparsity=sparsity, head_adaptive=adaptive, recall_threshold=threshold,
                                 block_size=block)
    meta = {"layer": 0, "step": 10}
    mask = adaspa.search(mass[start:stop].float(), g, offs, params, shard, meta)
    assert mask.device == torch.device("cpu") and mask.nnz == int(want[start:stop].sum())
    assert mask == BlockMask.from_lists([[np.flatnonzero(r) for r in head] for head in want[start:stop]], offs, offs,
                                        budgets=1 - sparsities[start:stop], meta=mask.meta)
    assert meta["head_sparsity"] == pytest.approx(sparsities.tolist())
    assert meta["base_recall"] == pytest.approx(recalls.tolist(), rel=1e-5)


@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=24), st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_head_budgets_keep_the_base_average(recalls, sparsity, threshold):
    out = adaspa.head_sparsities(torch.tensor(recalls, dtype=torch.float64), sparsity, threshold).numpy()
    assert out == pytest.approx(ref.head_sparsities(np.array(recalls), sparsity, threshold))
    assert out.mean() == pytest.approx(sparsity, abs=1e-12)
    assert ((out >= 0) & (out <= 1)).all() and len(set(out.tolist())) <= 3
    order = np.argsort(-np.array(recalls), kind="stable")
    assert (np.diff(out[order]) <= 1e-12).all()                     # better recall: never less sparse
    n = min(sum(r > threshold for r in recalls), len(recalls) // 2)
    if sparsity >= 1 / 3 and n:
        assert out[order[0]] == pytest.approx((1 + sparsity) / 2)
        assert out[order[-1]] == pytest.approx((3 * sparsity - 1) / 2)


def test_paper_example_levels():
    out = adaspa.head_sparsities(torch.tensor([0.95, 0.9, 0.7, 0.5, 0.85, 0.3]), 0.8)   # n = 3 of 6
    assert sorted(out.tolist()) == pytest.approx([0.7, 0.7, 0.7, 0.9, 0.9, 0.9])
    capped = adaspa.head_sparsities(torch.tensor([0.95, 0.9, 0.99, 0.3]), 0.8)          # n = 3 > H/2: capped at 2
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
    expected = ref.head_sparsities(recalls, 0.75, 0.8)
    assert adaptive.meta["head_sparsity"] == pytest.approx(expected.tolist())
    assert adaptive.budgets.tolist() == pytest.approx((1 - expected).tolist())
    lengths = adaptive.row_lengths.numpy()
    assert n == 0 or lengths[np.argmax(recalls)].max() < lengths[np.argmin(recalls)].max()


# ------------------------------------------------------------------ schedule and session
def test_session_schedule_of_the_papers_fused_first_search():
    session = adaspa.session(num_steps=50, first_search="fused")
    g = VideoGeometry(6, 4, 4)
    actions = [session.action(g, s) for s in range(50)]
    assert [a.label for a in actions[:10]] == ["dense"] * 10 and actions[10].label == "search"
    assert actions[30].label == "cached-search" and {a.label for a in actions[11:30] + actions[31:]} == {"reuse"}
    assert actions[10].dense and actions[10].wants_lse and not actions[30].dense and not actions[11].needs_qk

    q1, k1, v1 = video_qkv(g, 2, 32, seed=1)
    q2, k2, _ = video_qkv(g, 2, 32, seed=2)
    assert session.plan(g, 2, step=3, layer=0).density() == 1.0
    _, dense_lse = sparsecore.search.dense_attention(q1, k1, v1)
    searched = session.plan(g, 2, step=10, layer=0, q=q1, k=k1, lse=dense_lse)   # the dense pass's LSE: pass 2 only
    assert searched.meta["action"] == "search" and searched.meta["lse"] == "given"
    assert session.cached_mask(0) is searched
    fresh = adaspa.plan(g, 2, step=10, layer=0, q=q1, k=k1)                     # the same as a fresh search
    assert searched.fingerprint() == fresh.fingerprint() and fresh.meta["lse"] == "fresh"
    assert session.plan(g, 2, step=11, layer=0) is searched
    later = session.plan(g, 2, step=30, layer=0, q=q2, k=k2)
    assert later.meta["lse"] == "given" and later.meta["action"] == "cached-search"
    expected = adaspa.plan(g, 2, step=30, layer=0, q=q2, k=k2, lse=dense_lse)
    assert later.fingerprint() == expected.fingerprint() and torch.equal(later.budgets, expected.budgets)
    assert session.plan(g, 2, step=45, layer=0) is later
    # a layer that skipped the search steps (a block cache did not run its block) searches at its next run
    assert session.action(g, 12, 1).label == "cached-search" and session.action(g, 12, 0).label == "reuse"
    late = session.plan(g, 2, step=12, layer=1, q=q2, k=k2)                   # no LSE kept for it: its own
    assert late.meta["action"] == "cached-search"
    assert late.fingerprint() == adaspa.plan(g, 2, step=12, layer=1, q=q2, k=k2).fingerprint()
    assert late.fingerprint() != searched.fingerprint()
    assert session.plan(g, 2, step=13, layer=1) is late and session.action(g, 13, 1).label == "reuse"
    with pytest.raises(ValueError, match="search_steps"):
        adaspa.session(num_steps=20, search_steps=(10, 30))


def test_a_layer_that_skipped_a_later_search_step_searches_at_its_next_step():
    """A layer that missed search step 5 (a block cache did not run it there) searches at step 6, on the first
    search's LSE as step 5 would have, then reuses that mask; a layer that ran step 5 reuses its search at 6."""
    g = VideoGeometry(4, 4, 4)
    (q, k, _), (q6, k6, _) = video_qkv(g, 2, 16, seed=0), video_qkv(g, 2, 16, seed=6)
    session = adaspa.session(8, warmup_steps=2, search_steps=(2, 5), block_size=8)
    for layer in (0, 1):
        session.plan(g, 2, step=1, layer=layer, q=q, k=k)
        session.plan(g, 2, step=2, layer=layer, q=q, k=k)
    session.plan(g, 2, step=5, layer=1, q=q6, k=k6)                      # layer 0 skips step 5
    assert session.action(g, 6, 0).label == "cached-search" and session.action(g, 6, 1).label == "reuse"
    late = session.plan(g, 2, step=6, layer=0, q=q6, k=k6)
    kept = torch.logsumexp(q.double() @ k.double().transpose(-1, -2) / 4.0, -1).float()   # step 1's LSE
    expected = adaspa.plan(g, 2, step=6, layer=0, q=q6, k=k6, lse=kept, warmup_steps=2, block_size=8)
    assert late.meta["action"] == "cached-search" and late.fingerprint() == expected.fingerprint()
    assert session.action(g, 7, 0).label == "reuse" and session.plan(g, 2, step=7, layer=0) is late


def test_a_layer_that_skipped_its_cached_first_search_searches_at_its_next_step():
    """The default first search is cached on the LSE of the step before it; a layer whose search step did not run
    (a block cache skipped its block) searches at its next step, on the LSE it kept, and reuses that mask after."""
    g = VideoGeometry(4, 4, 4)
    q, k, _ = video_qkv(g, 2, 16, seed=0)
    q3, k3, _ = video_qkv(g, 2, 16, seed=3)
    session = adaspa.session(8, warmup_steps=2, search_steps=(2, 5), block_size=8)
    assert [session.action(g, t, 0).label for t in range(3)] == ["dense", "dense-lse", "cached-search"]
    session.plan(g, 2, step=1, layer=0, q=q, k=k)                        # keeps the LSE; step 2 is skipped
    assert session.action(g, 3, 0).label == "cached-search"              # "reuse" once layer 0 has a search
    late = session.plan(g, 2, step=3, layer=0, q=q3, k=k3)
    kept = torch.logsumexp(q.double() @ k.double().transpose(-1, -2) / 4.0, -1).float()   # step 1's LSE
    stateless = partial(adaspa.plan, g, 2, step=3, layer=0, q=q3, k=k3, warmup_steps=2, block_size=8)
    assert late.meta["action"] == "cached-search" and late.fingerprint() == stateless(lse=kept).fingerprint()
    assert late.meta["base_recall"] != stateless().meta["base_recall"]          # not on step 3's own LSE
    assert session.plan(g, 2, step=4, layer=0) is late and session.cached_mask(0) is late


def test_a_session_refuses_to_reuse_a_search_for_other_inputs():
    """A session keeps one search per layer: a search without a layer index, or a reuse step for another video of
    the same token count or other heads, is refused (each returned the stored mask of other inputs before)."""
    session = adaspa.session(num_steps=50, first_search="fused")
    g, other = VideoGeometry(8, 4, 4), VideoGeometry(8, 2, 8)            # 128 tokens each
    q, k, _ = video_qkv(g, 2, 32, seed=1)
    with pytest.raises(ValueError, match="layer: expected the layer's index"):
        session.plan(g, 2, step=10, q=q, k=k)
    session.plan(g, 2, step=10, layer=0, q=q, k=k)
    assert session.plan(g, 2, step=11, layer=0).meta["geometry"]["height"] == 4
    with pytest.raises(ValueError, match=r"geometry, heads: layer 0 at step 11 \(reuse\) asks for 8x2x8 = 128 tokens"):
        session.plan(other, 2, step=11, layer=0)
    with pytest.raises(ValueError, match=r"heads \[1, 2\) of 2, but its search was for .* heads \[0, 2\) of 2"):
        session.plan(g, 2, step=11, layer=0, heads=HeadShard(1, 2, 2))
    qo, ko, _ = video_qkv(other, 2, 32, seed=2)
    with pytest.raises(ValueError, match="geometry, heads: layer 0 at step 30 \\(cached-search\\)"):
        session.plan(other, 2, step=30, layer=0, q=qo, k=ko)


def test_a_cached_first_search_uses_the_lse_of_the_step_before():
    """first_search="cached": step 9 keeps its dense pass's LSE; step 10 is an LSE-cached search on it, whose mask
    serves step 10 itself (not dense) and the reuse steps; step 30 searches on the same LSE."""
    g, block = VideoGeometry(8, 8, 8, text_tokens=5), dict(block_size=32)
    session = adaspa.session(num_steps=50, **block)                   # the default when a step precedes the search
    assert session.params.first_search == "auto" and session.params.first_search_kind == "cached"
    assert adaspa.session(num_steps=50, warmup_steps=0, search_steps=(0, 30)).params.first_search_kind == "fused"
    assert dataclasses.replace(session.params, search_steps=(0, 30)).first_search_kind == "fused"
    actions = [session.action(g, s) for s in range(50)]
    assert [a.label for a in actions[:11]] == ["dense"] * 9 + ["dense-lse", "cached-search"]
    assert actions[9].dense and actions[9].wants_lse and actions[9].needs_qk and actions[9].plans
    assert not actions[10].dense and actions[10].needs_qk and actions[30].label == "cached-search"
    q9, k9, v9 = video_qkv(g, 3, 32, seed=9)
    q10, k10, _ = video_qkv(g, 3, 32, seed=10)
    _, lse9 = sparsecore.search.dense_attention(q9, k9, v9)
    assert session.plan(g, 3, step=9, layer=0, q=q9, k=k9, lse=lse9).density() == 1.0
    first = session.plan(g, 3, step=10, layer=0, q=q10, k=k10)
    expected = adaspa.plan(g, 3, step=10, layer=0, q=q10, k=k10, lse=lse9, **block)
    assert first.fingerprint() == expected.fingerprint() and first.meta["action"] == "cached-search"
    assert first.fingerprint() != adaspa.plan(g, 3, step=10, layer=0, q=q10, k=k10, **block).fingerprint()   # not fresh
    assert session.plan(g, 3, step=11, layer=0) is first
    without_lse = adaspa.session(num_steps=50, first_search="cached", **block)          # no LSE handed over: computed
    without_lse.plan(g, 3, step=9, layer=0, q=q9, k=k9)
    assert without_lse.plan(g, 3, step=10, layer=0, q=q10, k=k10).fingerprint() == expected.fingerprint()
    # a layer whose step 9 never ran here (Wan 2.2's second expert has its own handle): this step's own LSE
    assert session.plan(g, 3, step=10, layer=1, q=q10, k=k10).fingerprint() == \
        adaspa.plan(g, 3, step=10, layer=1, q=q10, k=k10, **block).fingerprint()
    with pytest.raises(ValueError, match="q: this method needs q"):         # layer 2 missed both: a late search
        session.plan(g, 3, step=11, layer=2)
    assert session.plan(g, 3, step=11, layer=2, q=q10, k=k10).fingerprint() == \
        adaspa.plan(g, 3, step=11, layer=2, q=q10, k=k10, **block).fingerprint()
    with pytest.raises(ValueError, match="first_search: expected one of"):
        adaspa.session(first_search="lazy")
    with pytest.raises(TypeError, match="first_search: expected one of"):
        adaspa.session(first_search=1)
    with pytest.raises(ValueError, match="first_search='cached' takes the LSE of the step before"):
        adaspa.session(num_steps=50, first_search="cached", warmup_steps=0, search_steps=(0, 30))


def test_first_search_from_the_dense_pass_masses_equals_the_two_pass_search():
    g = VideoGeometry(6, 4, 4, text_tokens=5)
    session = adaspa.session(num_steps=50, first_search="fused")
    action = session.action(g, 10)
    assert action.wants_lse and action.mass_block_size == 64
    fused = dict(num_steps=50, first_search="fused")
    assert adaspa.session(**fused, scale=0.2).action(g, 10).mass_block_size is None   # masses at 1/sqrt(D) only
    assert adaspa.session(**fused, impl="torch").action(g, 10).mass_block_size is None     # the impl asked for
    q, k, v = video_qkv(g, 3, 32, seed=7)
    offsets = g.block_offsets(action.mass_block_size)
    out, found = sparsecore.search.dense_attention_with_mass(q, k, v, offsets, offsets)
    want_out, want_lse = sparsecore.search.dense_attention(q, k, v)
    assert torch.allclose(out, want_out, atol=1e-6) and torch.allclose(found.lse, want_lse, atol=1e-6)
    from_masses = session.plan(g, 3, step=10, layer=0, lse=found.lse, mass=found.mass.sum(0))
    two_pass = adaspa.plan(g, 3, step=10, layer=0, q=q, k=k, lse=want_lse)
    assert from_masses.fingerprint() == two_pass.fingerprint()
    q2, k2, _ = video_qkv(g, 3, 32, seed=8)                      # the later search uses the cached LSE of the pass
    later = session.plan(g, 3, step=30, layer=0, q=q2, k=k2)
    assert later.fingerprint() == adaspa.plan(g, 3, step=30, layer=0, q=q2, k=k2, lse=found.lse).fingerprint()
    with pytest.raises(ValueError, match="lse: .*mass without lse"):
        adaspa.session(num_steps=50, first_search="fused").plan(g, 3, step=10, layer=0, mass=found.mass.sum(0))


def test_a_cached_search_on_unbatched_q_keeps_the_cached_lse():
    """q, k of [H, L, D] (no batch): the cached LSE is [1, H, L]; comparing shapes unbatched took it for another
    batch and searched on a fresh LSE instead."""
    g = VideoGeometry(6, 4, 4)
    session = adaspa.session(num_steps=50, first_search="fused", block_size=8, sparsity=0.75)
    q1, k1, _ = video_qkv(g, 2, 16, seed=1)
    q2, k2, _ = video_qkv(g, 2, 16, seed=2)
    for step in range(10):
        session.plan(g, 2, step=step, layer=0)
    session.plan(g, 2, step=10, layer=0, q=q1[0], k=k1[0])
    later = session.plan(g, 2, step=30, layer=0, q=q2[0], k=k2[0])
    assert later.meta["lse"] == "given"
    want = adaspa.plan(g, 2, step=30, layer=0, q=q2[0], k=k2[0], lse=session._lse[0], block_size=8, sparsity=0.75)
    assert later.fingerprint() == want.fingerprint()


def test_a_handed_in_lse_is_checked_where_it_is_handed_in():
    """The LSE kept at the dense-lse step or by a fused search given masses: a NumPy array, a wrong shape or dtype
    raised later (or in torch, naming nothing) and an unbatched [H, L] one with unbatched q was dropped for a fresh
    dense pass at every later search."""
    g = VideoGeometry(4, 4, 8)
    q, k, v = video_qkv(g, 2, 16, seed=3)
    _, lse = sparsecore.search.dense_attention(q, k, v)
    params = dict(warmup_steps=2, search_steps=(2, 5), block_size=16)
    cached, fused = dict(num_steps=12, **params), adaspa.session(12, first_search="fused", **params)
    for bad, error, match in [(lse.numpy(), TypeError, "a float32 torch tensor \\[{}, 2, 128\\].*got ndarray"),
                              (lse.transpose(1, 2), ValueError, "\\[{}, 2, 128\\].*got \\[1, 128, 2\\] on cpu"),
                              (lse.double(), TypeError, "float32 natural-log LSE, got torch.float64")]:
        with pytest.raises(error, match="lse: expected " + match.format(1)):
            adaspa.session(**cached).plan(g, 2, step=1, layer=0, q=q, k=k, lse=bad)
        with pytest.raises(error, match="lse: expected " + match.format("B")):     # masses given, no q
            fused.plan(g, 2, step=2, layer=0, lse=bad, mass=torch.ones(2, 8, 8))
    with pytest.raises(ValueError, match="lse: expected \\[1, 2, 128\\] on cpu.*got \\[2, 128\\]"):
        adaspa.session(**cached).plan(g, 2, step=1, layer=0, q=q, k=k, lse=lse[0])        # q has a batch axis
    session = adaspa.session(**cached)
    session.plan(g, 2, step=1, layer=0, q=q[0], k=k[0], lse=lse[0])           # unbatched, as q is
    later = session.plan(g, 2, step=2, layer=0, q=q[0], k=k[0])
    assert later.meta["lse"] == "given"
    assert later.fingerprint() == adaspa.plan(g, 2, step=2, layer=0, q=q, k=k, lse=lse, **params).fingerprint()


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
    with pytest.raises(TypeError, match="head_adaptive: expected a bool"):
        adaspa.session(head_adaptive="yes")


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
    assert float(mask.budgets.mean()) == pytest.approx(0.2)
    lengths = mask.row_lengths.numpy()[:, video]
    assert (lengths == lengths[:, :1]).all()                  # row-wise: one count per head
    assert mask.meta["step"] == 10 and mask.meta["layer"] == 5
    assert adaspa.plan(geometry, heads, step=0).density() == 1.0


@pytest.mark.parametrize("first_search, lse_step, cached_step", [("fused", 1, 3), ("cached", 0, 1)])
def test_cached_search_with_a_stale_lse_raises_instead_of_nan_budgets(first_search, lse_step, cached_step):
    g = VideoGeometry(6, 4, 8, text_tokens=8)
    session = adaspa.session(num_steps=5, block_size=16, warmup_steps=1, search_steps=(1, 3),
                             first_search=first_search)
    q1, k1, _ = video_qkv(g, 6, 16, seed=1, batch=2, sharpness=2.0)
    q2, k2, _ = video_qkv(g, 6, 16, seed=2, batch=2, sharpness=2.0)   # unrelated content: masses overflow
    session.plan(g, 6, step=lse_step, layer=0, q=q1, k=k1)
    with pytest.raises(ValueError, match=f"lse: the cached LSE is far from the scores of layer 0 at step "
                                         f"{cached_step}"):
        session.plan(g, 6, step=cached_step, layer=0, q=q2, k=k2)


def test_a_given_lse_far_above_the_scores_raises_instead_of_planning_from_vanished_masses():
    """Every mass underflows to 0 under an LSE 200 above the scores: the search had planned silently, every recall
    0 (a review found it); a NaN LSE row now makes the masses NaN, refused the same way."""
    g = VideoGeometry(6, 4, 8, text_tokens=8)
    q, k, _ = video_qkv(g, 6, 16, seed=1, batch=1)
    lse = torch.logsumexp((q @ k.transpose(-1, -2)) * 16 ** -0.5, dim=-1)
    with pytest.raises(ValueError, match="lse: the cached LSE is far from the scores of layer 3 at step 10 .*vanish"):
        adaspa.plan(g, 6, step=10, layer=3, q=q, k=k, lse=lse + 200.0, block_size=16, impl="torch")
    lse[0, 2, 5] = float("nan")
    with pytest.raises(ValueError, match="lse: the cached LSE is far from the scores"):
        adaspa.plan(g, 6, step=10, layer=3, q=q, k=k, lse=lse, block_size=16, impl="torch")
    assert adaspa.plan(g, 6, step=10, layer=3, q=q, k=k, lse=lse.nan_to_num(0.0), block_size=16,
                       impl="torch").density() < 1


def test_equal_recalls_rank_heads_in_head_order():
    """Where the base budget keeps every video block, every head's recall is 1: the ranking is then by head order,
    not by the float rounding of each head's sums (which put recalls at 1 +- 2e-16, some above 1; a review found
    it with 300 text tokens before two video blocks)."""
    g = VideoGeometry(2, 4, 4, 300, "start")
    blocks = len(g.block_offsets(16)) - 1
    gen = torch.Generator().manual_seed(7)
    for _ in range(5):
        mass = torch.rand(3, blocks, blocks, generator=gen) ** 4 * 50
        meta = adaspa.plan(g, 3, step=10, layer=0, mass=mass, block_size=16, sparsity=0.2).meta
        assert list(meta["base_recall"]) == [1.0, 1.0, 1.0]
        assert list(meta["head_sparsity"]) == sorted(meta["head_sparsity"], reverse=True)
        assert meta["lse"] == "none"                        # masses handed over: no LSE was made or used


def test_a_rank_whose_masses_are_fine_raises_when_another_ranks_are_not():
    """Under Ulysses each rank sums its own heads' masses: the refusal travels with the gathered recalls, so every
    rank raises together instead of one raising while the others go on into the next collective."""
    g = VideoGeometry(4, 4, 4)
    mass = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(5))
    other_rank_failed = HeadShard(0, 2, 4, lambda values: torch.cat([values, torch.full_like(values, -1.0)]))
    with pytest.raises(ValueError, match="are not finite or all 0"):
        adaspa.search(mass, g, g.block_offsets(16), adaspa.AdaSpaParams(sparsity=0.5, block_size=16),
                      other_rank_failed, {"layer": 0, "step": 10})


def test_block_masses_under_an_ambient_autocast_are_float32_masses():
    """An ambient ``torch.autocast(bfloat16)`` rounded the torch pass's scores: rows summed to 63.1-64.7 of 64."""
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 2, 256, 64, generator=gen) * 3 for _ in range(2))
    offsets = np.arange(0, 257, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = block_mass(q, k, offsets, offsets, impl="torch").mass.double().numpy()
    want = mass_float64(q, k, offsets, offsets)
    assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want)


def test_a_session_keeps_its_own_copy_of_a_handed_in_lse():
    """A caller may reuse its LSE buffer after handing it over (a CUDA graph's static output): the session's cached
    searches at steps 10 and 30 run on the LSE of step 9 as it was, not as the buffer holds later."""
    g, block = VideoGeometry(8, 8, 8, text_tokens=5), dict(block_size=32)
    q9, k9, v9 = video_qkv(g, 3, 32, seed=9)
    q10, k10, _ = video_qkv(g, 3, 32, seed=10)
    _, lse9 = sparsecore.search.dense_attention(q9, k9, v9)
    session = adaspa.session(num_steps=50, first_search="cached", **block)
    buffer = lse9.clone()
    session.plan(g, 3, step=9, layer=0, q=q9, k=k9, lse=buffer)
    buffer.zero_()                                                          # the caller's next use of its buffer
    expected = adaspa.plan(g, 3, step=10, layer=0, q=q10, k=k10, lse=lse9, **block)
    assert session.plan(g, 3, step=10, layer=0, q=q10, k=k10).fingerprint() == expected.fingerprint()
    fused = adaspa.session(num_steps=50, first_search="fused", warmup_steps=0, search_steps=(0, 30), **block)
    buffer = lse9.clone()
    fused.plan(g, 3, step=0, layer=0, q=q9, k=k9, lse=buffer)
    buffer.zero_()
    assert fused.plan(g, 3, step=30, layer=0, q=q10, k=k10).fingerprint() == \
        adaspa.plan(g, 3, step=30, layer=0, q=q10, k=k10, lse=lse9, **block).fingerprint()


def test_the_dense_pass_masses_are_not_offered_under_causal_frames():
    """Those masses (sparsecore.search.dense_attention_with_mass) and their LSE are of non-causal attention: a
    frame-causal video's first search takes its causal pass's LSE and searches from q, k."""
    session = adaspa.session(num_steps=50, first_search="fused")
    step = session.params.search_steps[0]
    assert session.action(VideoGeometry(8, 4, 4), step).mass_block_size == session.params.block_size
    action = session.action(VideoGeometry(8, 4, 4, causal_frames=2), step)
    assert action.label == "search" and action.wants_lse and action.mass_block_size is None


@pytest.mark.parametrize("max_elements", [1 << 24, 300])
def test_the_torch_mass_pass_reads_each_key_head_for_its_query_heads(max_elements):
    """GQA (4 query heads on 2 key heads), ragged blocks, chunks of a few rows: the float64 masses (the pass holds
    one converted copy of the keys, not one per query head)."""
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 4, 50, 8, generator=gen)
    k = torch.randn(2, 2, 70, 8, generator=gen)
    q_offsets, kv_offsets = np.array([0, 13, 40, 50]), np.array([0, 16, 32, 48, 64, 70])
    want = mass_float64(q, k, q_offsets, kv_offsets)
    lse = torch.from_numpy(np.log(np.exp(
        q.double().numpy() @ np.swapaxes(np.repeat(k.double().numpy(), 2, axis=1), -1, -2) * 8 ** -0.5).sum(-1)))
    got = torch_block_mass(q, k, q_offsets, kv_offsets, lse.float(), 8 ** -0.5, max_elements=max_elements)
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5, atol=1e-6)


def lse_float64(q, k, scale):
    """The rows' natural-log LSE in float64 (GQA keys repeated to their query heads)."""
    keys = np.repeat(k.double().numpy(), q.shape[1] // k.shape[1], axis=1)
    scores = q.double().numpy() @ np.swapaxes(keys, -1, -2) * scale
    top = scores.max(-1, keepdims=True)
    return torch.from_numpy((top + np.log(np.exp(scores - top).sum(-1, keepdims=True)))[..., 0])


@pytest.mark.parametrize("kv_offsets", [
    BlockMask.uniform_offsets(300, 64),                 # steps of whole 64-key blocks, a short last block
    BlockMask.uniform_offsets(300, 16),
    np.array([0, 7, 100, 101, 180, 300]),               # ragged: a step ends inside a block
    np.array([0, 150, 300]),                            # blocks wider than a step's keys
], ids=["64", "16", "ragged", "wide"])
@pytest.mark.parametrize("max_elements", [2000, 9000])
def test_the_torch_mass_pass_in_steps_of_keys_matches_float64(kv_offsets, max_elements):
    """The keys are converted a step at a time (no batch element's keys whole): several key steps, each cut where
    the blocks allow, give the float64 masses, GQA and a stale LSE included."""
    gen = torch.Generator().manual_seed(21)
    q = torch.randn(2, 4, 90, 16, generator=gen).half()
    k = torch.randn(2, 2, 300, 16, generator=gen).half()
    q_offsets = np.array([0, 30, 64, 90])
    lse = lse_float64(q, k, 0.3) + 0.125
    uniform = int(np.diff(kv_offsets)[0]) if len(set(np.diff(kv_offsets)[:-1])) <= 1 else None
    _, keys = mass_steps(4, 2, 300, 16, max_elements, uniform)
    assert keys < 300                                                   # more than one step of keys
    got = torch_block_mass(q, k, q_offsets, kv_offsets, lse.float(), 0.3, max_elements=max_elements)
    want = mass_float64(q, k, q_offsets, kv_offsets, lse=lse.numpy(), scale=0.3)
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5, atol=1e-7)


def test_the_torch_mass_pass_holds_no_tensor_beyond_a_step():
    """Every tensor the pass makes (converted keys, queries, scores, their exponentials, block sums) stays within
    ``max_elements`` besides the result: it held a batch element's keys whole in float32 (H_kv x L x D)."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 40, 32, generator=gen).half()
    k = torch.randn(1, 2, 600, 32, generator=gen).half()                   # keys: 38,400 elements
    offs_q, offs_kv = BlockMask.uniform_offsets(40, 16), BlockMask.uniform_offsets(600, 64)
    lse = lse_float64(q, k, 32 ** -0.5).float()
    sizes = []

    class Sizes(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            sizes.extend(t.numel() for t in (out if isinstance(out, (tuple, list)) else [out])
                         if isinstance(t, torch.Tensor))
            return out

    with Sizes():
        got = torch_block_mass(q, k, offs_q, offs_kv, lse, 32 ** -0.5, max_elements=4096)
    assert max(sizes) <= 4096
    np.testing.assert_allclose(got.double().numpy(), mass_float64(q, k, offs_q, offs_kv), rtol=1e-5, atol=1e-7)


@settings(max_examples=200)
@given(st.integers(1, 16), st.integers(1, 8), st.integers(1, 1 << 22), st.sampled_from([8, 64, 128, 256]),
       st.integers(1, 1 << 28), st.one_of(st.none(), st.integers(1, 4096)))
def test_a_steps_keys_and_scores_stay_within_max_elements(num_kv_heads, group, kv_len, head_dim, max_elements, block):
    """The step sizes for claimed shapes (nothing allocated): converted keys and scores within the limit, keys in
    whole blocks where a block fits, at least one row and one key."""
    heads = num_kv_heads * group
    rows, keys = mass_steps(heads, num_kv_heads, kv_len, head_dim, max_elements, block)
    assert 1 <= rows and 1 <= keys <= kv_len
    per_key = max(num_kv_heads * head_dim, heads)             # a key's converted values, or a row's scores of it
    if per_key <= max_elements:
        assert num_kv_heads * keys * head_dim <= max_elements and heads * rows * keys <= max_elements
    if block is not None and keys < kv_len and block * per_key <= max_elements:
        assert keys % block == 0


def test_a_step_at_wan_6x_holds_64_mib_of_keys_not_the_batch_elements_1_16_gb():
    """Wan 2.1 at 6x (188,760 tokens, 12 heads, head dim 128), AdaSpa's 64-token blocks, the default limit: a step's
    float32 keys and scores take at most 64 MiB each (the keys whole took 12 x 188,760 x 128 x 4 = 1.16 GB)."""
    rows, keys = mass_steps(12, 12, 188_760, 128, 1 << 24, 64)
    assert keys % 64 == 0 and 12 * keys * 128 * 4 <= 64 << 20 and 12 * rows * keys * 4 <= 64 << 20
    assert -(-188_760 // keys) <= 20                              # a handful of key steps per batch element


def test_a_run_shorter_than_the_default_schedule_names_num_steps_and_a_schedule_that_fits():
    """A session of fewer than 31 steps with the default schedule (the paper's, for 50 steps) was refused with
    "search_steps: expected steps in [warmup_steps=10, num_steps=5), got [10, 30]": two parameters the caller never
    passed, and no remedy. It now names num_steps, says the defaults are the paper's 50-step schedule and gives one in
    the paper's fractions of the run; that schedule is taken for every short run."""
    with pytest.raises(ValueError) as info:
        adaspa.session(num_steps=5)
    message = str(info.value)
    assert message.startswith("num_steps:") and "50" in message and "warmup_steps=1, search_steps=(1, 3)" in message
    for num_steps in range(1, 31):
        with pytest.raises(ValueError, match="num_steps") as info:
            adaspa.session(num_steps=num_steps)
        example = str(info.value).split("e.g. ")[1].split(" (")[0]
        params = dict(part.split("=") for part in example.split(", ", 1))
        session = adaspa.session(num_steps=num_steps, warmup_steps=int(params["warmup_steps"]),
                                 search_steps=ast.literal_eval(params["search_steps"]))
        assert session.params.search_steps[-1] < num_steps
    assert adaspa.session(num_steps=31).params.search_steps == (10, 30)
    with pytest.raises(ValueError, match=r"search_steps: .*\[10, 30\] \(the default\).*; pass") as info:
        adaspa.session(num_steps=50, warmup_steps=20)          # the default searches fall before the warm-up
    with pytest.raises(ValueError, match=r"warmup_steps=10 \(the default\).*; pass"):
        adaspa.session(num_steps=8, search_steps=(2, 5))
