"""Frame-causal geometries (SkyReels-V2's diffusion forcing with causal blocks): blocks, masks, budgets, kernels.

The oracle of what a token may see is written here from token positions alone (token t sees token s where
``frame(s) // n <= frame(t) // n``), never from the geometry's own groups; PASA's selection is checked against
float64 pooled scores and AdaSpa's recall against float64 block masses of causal softmax, both computed here.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from oracle import dense_attention, expand_to_tokens

import sparsecore
from sparsecore import BlockMask, VideoGeometry
from sparsecore.methods import adaspa, causal, lvsa, pasa

GEOMETRIES = [VideoGeometry(12, 4, 6, causal_frames=3), VideoGeometry(7, 3, 5, causal_frames=2),
              VideoGeometry(5, 4, 4, causal_frames=1), VideoGeometry(6, 2, 9, causal_frames=4)]


def visible_tokens(geometry: VideoGeometry) -> np.ndarray:
    """bool ``[L, L]``: query token t may see key token s (frames counted from token positions)."""
    group = np.arange(geometry.tokens) // geometry.frame_tokens // geometry.causal_frames
    return group[None, :] <= group[:, None]


def qk(geometry: VideoGeometry, heads: int = 4, kv_heads: int = 2, dim: int = 16, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(1, heads, geometry.tokens, dim, generator=gen),
            torch.randn(1, kv_heads, geometry.tokens, dim, generator=gen))


# ------------------------------------------------------------------ geometry
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
@pytest.mark.parametrize("block", [7, 16, 64])
def test_blocks_restart_at_every_causal_block(geometry, block):
    offsets = geometry.block_offsets(block)
    group_tokens = geometry.causal_frames * geometry.frame_tokens
    starts = np.arange(0, geometry.tokens, group_tokens)
    assert set(starts) <= set(offsets.tolist()) and offsets[-1] == geometry.tokens
    assert np.diff(offsets).max() <= block and len(offsets) - 1 == geometry.video_block_count(block)
    sizes = np.diff(offsets)
    assert (sizes[sizes < block] > 0).all()
    groups = geometry.causal_groups(offsets)
    expected = (offsets[:-1] // geometry.frame_tokens) // geometry.causal_frames
    np.testing.assert_array_equal(groups, expected)


@pytest.mark.parametrize("frames, causal_frames", [(6, 2), (7, 3), (5, 5), (4, 0), (1, 2)])
def test_visible_pairs_count_the_pairs_whose_key_is_in_an_earlier_or_the_same_causal_block(frames, causal_frames):
    geometry = VideoGeometry(frames, 3, 2, causal_frames=causal_frames)
    frame = np.arange(geometry.tokens) // 6
    group = frame // causal_frames if causal_frames else np.zeros_like(frame)
    assert geometry.visible_pairs == int((group[None, :] <= group[:, None]).sum())


def test_blocks_that_cross_a_causal_block_and_causal_text_are_refused():
    geometry = VideoGeometry(4, 2, 4, causal_frames=2)                     # 16-token causal blocks
    with pytest.raises(ValueError, match=r"offsets: block 1 \(tokens 12\.\.24\) crosses .*block_offsets"):
        geometry.causal_groups(np.array([0, 12, 24, 32]))
    with pytest.raises(ValueError, match="offsets: expected block boundaries"):
        geometry.causal_groups(np.array([0, 16]))
    with pytest.raises(ValueError, match="causal_frames: .*text_tokens=3"):
        VideoGeometry(4, 2, 4, text_tokens=3, causal_frames=2)
    with pytest.raises(ValueError, match="causal_frames"):
        VideoGeometry(4, 2, 4, causal_frames=-1)
    with pytest.raises(ValueError, match="split_text: .*causal blocks of 2 frames"):
        geometry.block_offsets(8, split_text=False)
    assert "causal blocks of 2 frames" in str(geometry)
    np.testing.assert_array_equal(VideoGeometry(4, 2, 4).causal_groups(np.array([0, 12, 32])), [0, 0])


# ------------------------------------------------------------------ masks of the methods
def plans(geometry: VideoGeometry):
    q, k = qk(geometry)
    yield "pasa", pasa.plan(geometry, 4, step=25, layer=2, q=q, k=k, block_size=8, approximation="drop")
    yield "pasa-noise", pasa.plan(geometry, 4, step=25, layer=2, q=q, k=k, block_size=8, approximation="drop",
                                  noise_scale=1.0)
    yield "adaspa", adaspa.plan(geometry, 4, step=20, layer=1, q=q, k=k, block_size=8)
    yield "lvsa", lvsa.plan(geometry, 4, step=7, window=1, first_frames=1, reference_frames=2)
    yield "lvsa-blocks", lvsa.plan(geometry, 4, step=7, window=1, first_frames=1, reference_frames=2, block_size=8)
    yield "dense", pasa.plan(geometry, 4, step=0, layer=2, q=q, k=k, block_size=8, approximation="drop")


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_every_method_lists_only_blocks_a_row_may_see(geometry):
    allowed = visible_tokens(geometry)
    for name, mask in plans(geometry):
        tokens = expand_to_tokens(mask)
        assert not (tokens & ~allowed).any(), name
        assert tokens.any(axis=2).all(), f"{name}: a row keeps nothing"
        if name == "dense":                                        # a dense step: every visible token
            assert (tokens == allowed).all()


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_pasa_keeps_the_best_pooled_blocks_among_those_a_row_may_see(geometry):
    """Without noise each row keeps its ``clamp(round(rho * visible), 1, visible)`` best visible blocks by float64
    pooled scores ``mean(q) . mean(k) / sqrt(D)`` (query head h reads key head h // 2)."""
    q, k = qk(geometry, seed=3)
    mask = pasa.plan(geometry, 4, step=25, layer=2, q=q, k=k, block_size=8, approximation="drop", noise_scale=0.0)
    rho = mask.meta["density"]
    offsets = mask.q_offsets
    blocks = len(offsets) - 1
    means = lambda x: np.stack([x[0, :, a:b].double().mean(1).numpy() for a, b in zip(offsets[:-1], offsets[1:])],
                               axis=1)                                                      # noqa: E731
    qm, km = means(q), np.repeat(means(k), 2, axis=0)
    scores = qm @ km.transpose(0, 2, 1) / math.sqrt(q.shape[-1])
    frame = offsets[:-1] // geometry.frame_tokens // geometry.causal_frames
    rows = mask.to_host()
    for h in range(4):
        for i in range(blocks):
            visible = np.flatnonzero(frame <= frame[i])
            want = int(min(len(visible), max(1, round(rho * len(visible)))))
            best = visible[np.argsort(-scores[h, i, visible], kind="stable")[:want]]
            np.testing.assert_array_equal(np.asarray(rows.row(h, i)), np.sort(best))


@pytest.mark.parametrize("geometry", GEOMETRIES[:2], ids=str)
def test_pasa_ranks_the_visible_blocks_by_their_noisy_pooled_scores(geometry):
    """With noise each row keeps its best visible blocks by float64 pooled score plus the Gumbel draw of
    ``(seed, layer, step, head)`` (:func:`method_reference.gumbel`, the counter hash over the block grid): the causal
    path adds the noise before its own ranking, which the noise-free test above cannot see. Rows whose k-th and
    next visible scores are within float32's reach of each other are not asserted."""
    import method_reference as ref
    q, k = qk(geometry, seed=3)
    mask = pasa.plan(geometry, 4, step=25, layer=2, q=q, k=k, block_size=8, approximation="drop", noise_scale=2.0)
    rho, offsets = mask.meta["density"], mask.q_offsets
    blocks = len(offsets) - 1
    plain = ref.pasa_scores(q.double().numpy(), k.double().numpy(), offsets, q.shape[-1] ** -0.5)
    noisy = plain + ref.gumbel(range(4), blocks, blocks, 0, 2, 25, 2.0)
    frame = offsets[:-1] // geometry.frame_tokens // geometry.causal_frames
    rows, asserted, moved = mask.to_host(), 0, 0
    for h in range(4):
        for i in range(blocks):
            visible = np.flatnonzero(frame <= frame[i])
            want = int(min(len(visible), max(1, round(rho * len(visible)))))
            ranked = visible[np.argsort(-noisy[h, i, visible], kind="stable")]
            ordered = noisy[h, i, ranked]
            if want < len(visible) and ordered[want - 1] - ordered[want] < 1e-4:
                continue
            asserted += 1
            np.testing.assert_array_equal(np.asarray(rows.row(h, i)), np.sort(ranked[:want]))
            unnoised = visible[np.argsort(-plain[h, i, visible], kind="stable")[:want]]
            moved += set(unnoised.tolist()) != set(ranked[:want].tolist())
    assert asserted >= 0.9 * 4 * blocks and moved > 0      # the noise decided some rows


@pytest.mark.parametrize("geometry", GEOMETRIES[:2], ids=str)
def test_adaspa_recall_is_the_mass_kept_of_causal_softmax(geometry):
    """The base recall AdaSpa reports per head equals the float64 oracle's: block masses of softmax over the keys a
    token may see, each row's best ``round(0.2 * visible)`` visible blocks kept, over every visible block's mass."""
    q, k = qk(geometry, seed=5)
    mask = adaspa.plan(geometry, 4, step=20, layer=1, q=q, k=k, block_size=8)
    offsets = mask.q_offsets
    allowed = visible_tokens(geometry)
    kk = np.repeat(k[0].double().numpy(), 2, axis=0)
    scores = q[0].double().numpy() @ kk.transpose(0, 2, 1) / math.sqrt(q.shape[-1])
    scores = np.where(allowed[None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    cut = np.add.reduceat(np.add.reduceat(probs, offsets[:-1], axis=1), offsets[:-1], axis=2)   # [H, MB, NB]
    frame = offsets[:-1] // geometry.frame_tokens // geometry.causal_frames
    for h in range(4):
        kept = total = 0.0
        for i in range(len(frame)):
            visible = np.flatnonzero(frame <= frame[i])
            want = int(min(len(visible), max(1, round(0.2 * len(visible)))))
            kept += np.sort(cut[h, i, visible])[::-1][:want].sum()
            total += cut[h, i, visible].sum()
        assert mask.meta["base_recall"][h] == pytest.approx(kept / total, abs=2e-6)


def test_an_approximation_under_causal_frames_is_refused_naming_the_remedy():
    geometry = GEOMETRIES[0]
    q, k = qk(geometry)
    with pytest.raises(ValueError, match="approximation: grouped-first-order:32 .*approximation='drop'"):
        pasa.plan(geometry, 4, step=25, layer=2, q=q, k=k, block_size=8)
    with pytest.raises(ValueError, match="approximation: zeroth"):
        lvsa.plan(geometry, 4, step=7, window=1, first_frames=1, reference_frames=2, approximation="zeroth")
    with pytest.raises(ValueError, match="approximation: grouped-first-order:32"):     # before any scoring: no q
        pasa.plan(geometry, 4, step=25, layer=2, block_size=8)


def test_an_approximation_where_the_causal_block_holds_every_frame_is_planned():
    """frames <= causal_frames hides nothing (causal.restrict takes such masks): PASA's default approximation was
    refused there after the scoring, now the mask is the one of the same geometry without causal frames."""
    causal_geometry, plain = VideoGeometry(2, 4, 8, causal_frames=4), VideoGeometry(2, 4, 8)
    q, k = qk(plain)
    got = pasa.plan(causal_geometry, 4, step=30, layer=1, q=q, k=k, block_size=16)
    want = pasa.plan(plain, 4, step=30, layer=1, q=q, k=k, block_size=16)
    assert str(got.unselected) == "grouped-first-order:32" and got.unselected == want.unselected
    np.testing.assert_array_equal(expand_to_tokens(got), expand_to_tokens(want))
    assert causal.restrict(got, causal_geometry) is got
    one_block = dict(window=1, first_frames=1, reference_frames=1, approximation="zeroth")
    assert lvsa.plan(VideoGeometry(8, 2, 4, causal_frames=8), 2, step=7, **one_block).unselected.kind == "zeroth"


# ------------------------------------------------------------------ restrict, kernels
@pytest.mark.parametrize("on_torch", [False, True])
def test_restrict_drops_exactly_the_blocks_a_row_may_not_see(on_torch):
    geometry = VideoGeometry(6, 2, 4, causal_frames=2)
    offsets = geometry.block_offsets(5)
    blocks = len(offsets) - 1
    keep = np.random.default_rng(11).random((3, blocks, blocks)) < 0.5
    mask = BlockMask.from_lists([[np.flatnonzero(keep[h, i]) for i in range(blocks)] for h in range(3)],
                                offsets, offsets)
    given = BlockMask.unchecked(3, offsets, offsets, torch.tensor(mask.indptr), torch.tensor(mask.indices),
                                torch.tensor(mask.budgets)) if on_torch else mask
    cut = causal.restrict(given, geometry)
    np.testing.assert_array_equal(expand_to_tokens(cut), expand_to_tokens(mask) & visible_tokens(geometry)[None])
    assert causal.restrict(cut, geometry) is cut
    with pytest.raises(ValueError, match="crosses"):
        causal.restrict(BlockMask.full(3, geometry.tokens, geometry.tokens, 6), geometry)


@pytest.mark.parametrize("backend", ["reference", "portable"])
def test_a_causal_plan_runs_on_a_kernel_as_float64_causal_attention_under_it(backend):
    geometry = GEOMETRIES[1]
    q, k = qk(geometry, heads=4, kv_heads=2, seed=9)
    v = torch.randn(k.shape, generator=torch.Generator().manual_seed(10))
    mask = pasa.plan(geometry, 4, step=25, layer=2, q=q, k=k, block_size=8, approximation="drop")
    tokens = expand_to_tokens(mask) & visible_tokens(geometry)[None]      # the model's own causal mask, and the plan
    expected, expected_lse = dense_attention(q.numpy(), k.numpy(), v.numpy(), tokens, 0.25)
    kernel = sparsecore.compile(mask, device="reference" if backend == "reference" else "cpu", backend=backend)
    args = (q.double().numpy(), k.double().numpy(), v.double().numpy()) if backend == "reference" else \
        (q.double(), k.double(), v.double())
    out, lse = kernel(*args, scale=0.25, return_lse=True)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.asarray(lse), expected_lse, rtol=1e-6)                  # the IR's LSE: float32
