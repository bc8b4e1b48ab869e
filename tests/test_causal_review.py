"""Review of frame-causal attention: paths where a block a row may not see could still enter its softmax or its LSE.

What a token may see is written here from token positions alone (token t sees token s where
``frame(s) // n <= frame(t) // n``); recalls are float64 block masses of causal softmax computed here; outputs are
compared with the model's own attention under its ``[1, 1, L, L]`` causal mask (diffusers' forward without
sparsecore).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from oracle import expand_to_tokens
from test_integration_diffusers import CASES, forward, tiny_skyreels_v2

from sparsecore import BlockMask, VideoGeometry
from sparsecore.integrations import diffusers as sparse
from sparsecore.integrations.diffusers.planner import VISIBLE_BLOCKS
from sparsecore.ir import Unselected
from sparsecore.ir.validation import INDEX_LIMIT
from sparsecore.methods import adaspa, causal, pasa
from sparsecore.methods.approximation import with_unselected
from sparsecore.methods.contract import fixed_block_offsets

GEOMETRY = VideoGeometry(6, 2, 4, causal_frames=2)                 # 3 causal blocks of 16 tokens


def visible_tokens(geometry: VideoGeometry) -> np.ndarray:
    group = np.arange(geometry.tokens) // geometry.frame_tokens // geometry.causal_frames
    return group[None, :] <= group[:, None]


def block_groups(geometry: VideoGeometry, offsets: np.ndarray) -> np.ndarray:
    return offsets[:-1] // geometry.frame_tokens // geometry.causal_frames


def qk(geometry: VideoGeometry, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, 4, geometry.tokens, 16, generator=gen), torch.randn(1, 2, geometry.tokens, 16, generator=gen)


def assert_rows_keep_visible_blocks(mask: BlockMask, geometry: VideoGeometry, density: float) -> None:
    """Only visible blocks listed, and each row keeps ``clamp(round(density * visible), 1, visible)`` of them."""
    assert not (expand_to_tokens(mask) & ~visible_tokens(geometry)).any()
    groups = block_groups(geometry, mask.q_offsets)
    visible = np.array([(groups <= g).sum() for g in groups])
    want = np.minimum(visible, np.maximum(1, np.round(density * visible)))
    host = mask.to_host()
    np.testing.assert_array_equal(np.diff(host.indptr, axis=1), np.broadcast_to(want, (mask.num_heads, len(want))))


# ------------------------------------------------------------------ approximating masks of a caller
def diagonal(geometry: VideoGeometry, heads: int, on_torch: bool = False) -> BlockMask:
    """Each frame block lists itself only (all visible), and approximates the rest ("zeroth")."""
    offsets = geometry.block_offsets(None)
    mask = BlockMask.from_lists([[np.array([i]) for i in range(len(offsets) - 1)]] * heads, offsets, offsets)
    if on_torch:
        return BlockMask.unchecked(heads, offsets, offsets, torch.tensor(mask.indptr), torch.tensor(mask.indices),
                                   torch.tensor(mask.budgets), mask.meta, Unselected("zeroth"))
    return with_unselected(mask, Unselected("zeroth"))


@pytest.mark.parametrize("on_torch", [False, True])
def test_restrict_refuses_an_approximation_even_where_the_mask_lists_only_visible_blocks(on_torch):
    """The approximation adds every unlisted block, later causal blocks included: refused whatever is listed, except
    where the geometry hides nothing (one causal block)."""
    mask = diagonal(GEOMETRY, 2, on_torch)
    with pytest.raises(ValueError, match=r"mask: it approximates .*\(zeroth\).*later causal blocks"):
        causal.restrict(mask, GEOMETRY)
    assert causal.restrict(mask, VideoGeometry(6, 2, 4, causal_frames=6)) is mask


def test_a_callables_approximating_mask_is_refused_at_the_forward():
    model, inputs = tiny_skyreels_v2(frames_per_block=2), CASES["skyreels-v2"].inputs(batch=2)
    handle = sparse.apply(model, method=lambda g, heads, step, layer: diagonal(g, heads), device="cpu", num_steps=1)
    try:
        with pytest.raises(ValueError, match=r"mask: it approximates .*\(zeroth\)"):
            forward(model, inputs, 999.0)
    finally:
        handle.remove()


# ------------------------------------------------------------------ PASA: noise and non-finite scores
@pytest.mark.parametrize("noise_scale", [3e38, 1e39])
def test_pasa_noise_of_any_accepted_scale_never_lifts_a_block_a_row_may_not_see(noise_scale):
    """``noise_scale`` takes any finite float; noise that overflows float32 to +-inf must not turn a hidden block's
    -inf into NaN (which top-k ranks first) nor a visible one's score into -inf (tied with the hidden)."""
    q, k = qk(GEOMETRY, seed=1)
    mask = pasa.plan(GEOMETRY, 4, step=25, layer=2, q=q, k=k, block_size=8, approximation="drop",
                     noise_scale=noise_scale)
    assert_rows_keep_visible_blocks(mask, GEOMETRY, mask.meta["density"])


def test_pasa_keeps_visible_blocks_whose_pooled_scores_overflow():
    """q of +1e20 and k of -1e20 make every pooled score -inf: a visible block's still ranks above every hidden one's
    (top-k breaks ties in no set order)."""
    q, k = (x.abs() + 1.0 for x in qk(GEOMETRY, seed=2))
    q, k = q * 1e20, k * -1e20
    mask = pasa.plan(GEOMETRY, 4, step=25, layer=2, q=q, k=k, block_size=8, approximation="drop", noise_scale=0.0)
    assert_rows_keep_visible_blocks(mask, GEOMETRY, mask.meta["density"])


# ------------------------------------------------------------------ AdaSpa: given masses, cached LSE
def test_adaspa_refuses_negative_given_masses_under_causal_blocks():
    """A hidden block ranks as mass -1: a caller's negative masses would rank a visible block below it."""
    offsets = GEOMETRY.block_offsets(8)
    blocks = len(offsets) - 1
    mass = torch.rand(4, blocks, blocks, generator=torch.Generator().manual_seed(3)) - 3.0 + 100 * torch.eye(blocks)
    with pytest.raises(ValueError, match=r"mass: expected block masses >= 0"):
        adaspa.plan(GEOMETRY, 4, step=20, layer=1, mass=mass, block_size=8, sparsity=0.2)


def causal_recall(q: torch.Tensor, k: torch.Tensor, geometry: VideoGeometry, offsets: np.ndarray, scale: float,
                  density: float) -> np.ndarray:
    """float64 base recall per head: each row's best ``round(density * visible)`` visible block masses of causal
    softmax over all its visible blocks' masses."""
    kk = np.repeat(k[0].double().numpy(), q.shape[1] // k.shape[1], axis=0)
    scores = np.where(visible_tokens(geometry)[None], q[0].double().numpy() @ kk.transpose(0, 2, 1) * scale, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    cut = np.add.reduceat(np.add.reduceat(probs, offsets[:-1], axis=1), offsets[:-1], axis=2)
    groups = block_groups(geometry, offsets)
    recalls = []
    for h in range(q.shape[1]):
        kept = total = 0.0
        for i, g in enumerate(groups):
            visible = np.flatnonzero(groups <= g)
            want = int(min(len(visible), max(1, round(density * len(visible)))))
            kept += np.sort(cut[h, i, visible])[::-1][:want].sum()
            total += cut[h, i, visible].sum()
        recalls.append(kept / total)
    return np.array(recalls)


def test_adaspas_cached_search_on_an_lse_it_computed_itself_is_over_the_visible_keys():
    """With a given ``scale`` the planner hands no LSE to the step before the first search: the session computes
    it, over the keys each query may see, and the cached search's recall is causal softmax's."""
    session = adaspa.session(4, warmup_steps=1, search_steps=(1, 2), sparsity=0.6, block_size=8, scale=0.2)
    q, k = qk(GEOMETRY, seed=4)
    session.plan(GEOMETRY, 4, step=0, layer=0, q=q, k=k)                     # "dense-lse": keeps the LSE
    mask = session.plan(GEOMETRY, 4, step=1, layer=0, q=q, k=k)              # "cached-search" on it
    assert mask.meta["action"] == "cached-search" and mask.meta["lse"] == "given"
    expected = causal_recall(q, k, GEOMETRY, mask.q_offsets, 0.2, 0.4)
    np.testing.assert_allclose(mask.meta["base_recall"], expected, atol=2e-6)


@pytest.mark.parametrize("first_search,lse_step", [("cached", 0), ("fused", 1)])
def test_adaspas_dense_pass_that_gives_its_search_an_lse_is_the_models_causal_attention(first_search, lse_step):
    """The step whose dense pass also returns the LSE (the step before the first search, or with ``"fused"`` the
    first search step) outputs the model's own attention under its causal mask, from the visible blocks' kernel."""
    model, inputs = tiny_skyreels_v2(frames_per_block=2), CASES["skyreels-v2"].inputs(batch=2)
    timesteps = (999.0, 750.0)
    reference = forward(model, inputs, timesteps[lse_step])
    handle = sparse.apply(model, method="adaspa", device="cpu", num_steps=4, warmup_steps=1, search_steps=(1, 2),
                          sparsity=0.6, block_size=32, first_search=first_search)
    try:
        for timestep in timesteps[:lse_step + 1]:
            got = forward(model, inputs, timestep)
    finally:
        handle.remove()
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)
    rows = [row for row in handle.stats() if row["step"] == lse_step]
    assert rows and {row["dense_kernel"] for row in rows} == {VISIBLE_BLOCKS}


# ------------------------------------------------------------------ the index-limit check
def test_the_index_limit_counts_the_blocks_that_the_causal_blocks_cut():
    """9-token frames in causal blocks of 1 frame cut into 2 blocks of 8 each: 12 blocks, not the 7 of 54 tokens."""
    geometry = VideoGeometry(6, 3, 3, causal_frames=1)
    heads = INDEX_LIMIT // 144 + 1                       # heads x 12^2 is past the limit, heads x 7^2 is not
    assert heads * 49 <= INDEX_LIMIT
    with pytest.raises(ValueError, match=r"block_size: 8-token blocks cut .* into 12 blocks"):
        fixed_block_offsets(geometry, heads, 8)
    assert len(fixed_block_offsets(geometry, 4, 8)) - 1 == 12


@pytest.mark.parametrize("block_size,error", [(0, ValueError), (2.5, TypeError)])
def test_video_block_count_checks_the_block_size_as_block_offsets_does(block_size, error):
    for count in (GEOMETRY.video_block_count, VideoGeometry(6, 2, 4).video_block_count, GEOMETRY.block_offsets):
        with pytest.raises(error, match="block_size: expected an int"):
            count(block_size)
