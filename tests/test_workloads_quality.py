"""The synthetic video workload and the fidelity metrics (checked against the float64 oracle)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from largest_result import LargestResult
from oracle import dense_attention, expand_to_tokens
from strategies import block_masks

from sparsecore import BlockMask, Capabilities
from sparsecore.geometry import VideoGeometry
from sparsecore.quality import attention_fidelity, fidelity_of_masks
from sparsecore.workloads import rope_dims, video_qkv

ANY = Capabilities(devices=("test",), array_type="numpy", dtypes=frozenset({"float64"}))


def dense_probs(q, k, head: int) -> np.ndarray:
    """float64 dense softmax of one head (batch 0)."""
    s = q[0, head].double().numpy() @ k[0, head].double().numpy().T / np.sqrt(q.shape[-1])
    s -= s.max(axis=1, keepdims=True)
    p = np.exp(s)
    return p / p.sum(axis=1, keepdims=True)


# ------------------------------------------------------------------ workload
def test_same_seed_same_tensors_and_shapes():
    g = VideoGeometry(3, 4, 5, text_tokens=6)
    a = video_qkv(g, 4, 16, seed=1, num_kv_heads=2, batch=2)
    b = video_qkv(g, 4, 16, seed=1, num_kv_heads=2, batch=2)
    c = video_qkv(g, 4, 16, seed=2, num_kv_heads=2, batch=2)
    assert [t.shape for t in a] == [(2, 4, 66, 16), (2, 2, 66, 16), (2, 2, 66, 16)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    assert all(torch.isfinite(t).all() for t in a)
    assert video_qkv(g, 2, 16, seed=1, dtype=torch.float64)[0].dtype == torch.float64


def test_a_default_device_does_not_change_the_workload():
    """The tensors are made on the host from a CPU generator, then moved: under ``torch.device(...)`` (here "meta")
    they are the same tensors on the device asked for (they raised: the generator's device was not the default)."""
    g = VideoGeometry(3, 4, 5, text_tokens=6)
    want = video_qkv(g, 4, 16, seed=1, num_kv_heads=2, sinks=2)
    with torch.device("meta"):
        got = video_qkv(g, 4, 16, seed=1, num_kv_heads=2, sinks=2)
    assert all(x.device.type == "cpu" and torch.equal(x, y) for x, y in zip(got, want))


def test_a_device_this_machine_lacks_is_refused_before_the_tensors_are_built():
    """torch's own AssertionError ('Torch not compiled with CUDA enabled') came at the move, after the work."""
    import pytest
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="device: 'cuda' is not available here .*pass 'cpu'"):
        video_qkv(VideoGeometry(2, 4, 4), 2, 16, seed=0, device="cuda")


def test_one_video_token_gives_finite_tensors():
    """The content field's standard deviation over one token was NaN (unbiased), and so were q, k, v."""
    for g in (VideoGeometry(1, 1, 1), VideoGeometry(1, 1, 1, text_tokens=5)):
        assert all(torch.isfinite(t).all() for t in video_qkv(g, 2, 12, seed=0))


def test_rope_split_matches_wan():
    assert rope_dims(128) == (44, 42, 42)
    assert sum(rope_dims(64)) == 64


def test_head_kinds_have_the_locality_they_claim():
    g = VideoGeometry(12, 6, 6)
    q, k, _ = video_qkv(g, 5, 64, seed=0, kinds=("local", "spatial", "temporal", "global", "sink"))
    t, y, x = (np.asarray(a) for a in g.position(np.arange(g.tokens)))
    same_frame = t[:, None] == t[None, :]
    same_place = (y[:, None] == y[None, :]) & (x[:, None] == x[None, :]) & ~same_frame   # in other frames
    near_time = np.abs(t[:, None] - t[None, :]) <= 1
    mass = {kind: dense_probs(q, k, h) for h, kind in enumerate(("local", "spatial", "temporal", "global", "sink"))}
    frame_mass = {kind: (p * same_frame).sum(1).mean() for kind, p in mass.items()}
    place_mass = {kind: (p * same_place).sum(1).mean() for kind, p in mass.items()}
    assert frame_mass["spatial"] > 0.5 > frame_mass["temporal"]                # spatial heads stay in their frame
    assert place_mass["temporal"] > 2 * place_mass["spatial"]                   # temporal heads follow a position
    assert (mass["local"] * near_time).sum(1).mean() > (mass["global"] * near_time).sum(1).mean()
    uniform = 1 / g.tokens
    column = {kind: p.mean(0) for kind, p in mass.items()}                      # mass each key receives
    assert column["sink"].max() > 20 * uniform and column["sink"].max() > 3 * column["local"].max()


def test_workload_input_errors():
    g = VideoGeometry(2, 2, 2)
    with pytest.raises(ValueError, match="head_dim: expected an even number"):
        video_qkv(g, 2, 15, seed=0)
    with pytest.raises(ValueError, match="num_kv_heads: expected a divisor"):
        video_qkv(g, 4, 16, seed=0, num_kv_heads=3)
    with pytest.raises(ValueError, match="kinds"):
        video_qkv(g, 2, 16, seed=0, kinds=("swirl",))
    with pytest.raises(ValueError, match="seed: expected 0..18446744073709551615, got 18446744073709551616"):
        video_qkv(g, 2, 16, seed=2 ** 64)                        # torch's generators take 64-bit seeds
    assert video_qkv(g, 2, 16, seed=2 ** 64 - 1)[0].shape == (1, 2, 8, 16)


# ------------------------------------------------------------------ fidelity
def oracle_fidelity(q, k, v, mask: BlockMask, with_min_recall: bool = False):
    """Per-head recall, rel L2, cosine (and the smallest per-query recall) from the float64 oracle; query head h
    reads key head h // G."""
    scale = q.shape[-1] ** -0.5
    q64, k64, v64 = (t.double().numpy() for t in (q, k, v))
    full = np.ones((mask.num_heads, mask.q_len, mask.kv_len), dtype=bool)
    tokens = expand_to_tokens(mask)
    dense_out, dense_lse = dense_attention(q64, k64, v64, full, scale)
    out, lse = dense_attention(q64, k64, v64, tokens, scale)
    per_query = np.exp(lse - dense_lse)                                  # [B, H, L]
    recall = per_query.mean(axis=(0, 2))
    diff = ((out - dense_out) ** 2).sum(axis=(0, 2, 3))
    ref = (dense_out ** 2).sum(axis=(0, 2, 3))
    dot = (out * dense_out).sum(axis=(0, 2, 3))
    cosine = dot / np.maximum(np.sqrt((out ** 2).sum(axis=(0, 2, 3)) * ref), 1e-300)
    if with_min_recall:
        return recall, np.sqrt(diff / ref), cosine, per_query.min(axis=(0, 2))
    return recall, np.sqrt(diff / ref), cosine


@settings(max_examples=25)
@given(block_masks(ANY, num_heads=4), st.integers(0, 2**32 - 1), st.sampled_from([8, 16]), st.sampled_from([1, 2, 4]),
       st.sampled_from([97, None]))
def test_fidelity_matches_the_float64_oracle(mask, seed, head_dim, kv_heads, max_elements):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 4, mask.q_len, head_dim, generator=gen) * 2
    k, v = (torch.randn(1, kv_heads, mask.kv_len, head_dim, generator=gen) * 2 for _ in range(2))
    fid = attention_fidelity(q, k, v, mask, **({} if max_elements is None else {"max_elements": max_elements}))
    recall, rel_l2, cosine, min_recall = oracle_fidelity(q, k, v, mask, with_min_recall=True)
    np.testing.assert_allclose(fid.recall, recall, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(fid.rel_l2, rel_l2, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(fid.cosine, cosine, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(fid.min_recall, min_recall, rtol=1e-4, atol=1e-6)


def test_dense_and_empty_masks_are_the_extremes():
    g = VideoGeometry(4, 3, 3)
    q, k, v = video_qkv(g, 2, 16, seed=3)
    full = BlockMask.full(2, g.tokens, g.tokens, 9)
    empty = BlockMask.from_lists([[[]] * 4] * 2, g.frame_offsets(), g.frame_offsets())
    dense, none = fidelity_of_masks(q, k, v, [full, empty])
    np.testing.assert_allclose(dense.recall, 1.0, rtol=1e-5)
    np.testing.assert_allclose(dense.rel_l2, 0.0, atol=1e-5)
    np.testing.assert_allclose(dense.cosine, 1.0, rtol=1e-5)
    assert (none.recall == 0).all() and np.allclose(none.rel_l2, 1.0) and (none.cosine == 0).all()


def test_rows_whose_kept_mass_underflows_are_still_exact():
    g = VideoGeometry(2, 2, 2)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 8, 8, generator=gen) * 40
    k = torch.randn(1, 2, 8, 8, generator=gen)
    k[:, :, 4:] *= 40                                     # frame 1's keys dwarf frame 0's: kept mass ~ exp(-1000)
    v = torch.randn(1, 2, 8, 8, generator=gen)
    offsets = g.frame_offsets()
    mask = BlockMask.from_lists([[[0], [0]]] * 2, offsets, offsets)       # keep only the weak frame
    fid = attention_fidelity(q, k, v, mask)
    _, rel_l2, cosine = oracle_fidelity(q, k, v, mask)
    np.testing.assert_allclose(fid.rel_l2, rel_l2, rtol=1e-4)
    np.testing.assert_allclose(fid.cosine, cosine, rtol=1e-4, atol=1e-6)


def test_gqa_and_batches_pool_per_query_head():
    g = VideoGeometry(3, 2, 2)
    q, k, v = video_qkv(g, 4, 8, seed=5, num_kv_heads=2, batch=2)
    mask = BlockMask.from_lists([[[0], [0, 1], [2]]] * 4, g.frame_offsets(), g.frame_offsets())
    fid = attention_fidelity(q, k, v, mask)
    per_batch = [attention_fidelity(q[b], k[b], v[b], mask).recall for b in range(2)]
    np.testing.assert_allclose(fid.recall, np.mean(per_batch, axis=0), rtol=1e-6)
    with pytest.raises(ValueError, match="to match the mask"):
        attention_fidelity(q[:, :2], k, v, mask)


@pytest.mark.parametrize("kind", ["zeroth", "grouped-first-order"])
def test_fidelity_of_an_approximating_mask_measures_the_output_with_its_approximation(kind):
    """rel L2 and cosine compare the output the lowerings compute, the approximation of the unlisted blocks
    included (checked against its float64 oracle); recall stays the mass of the listed blocks."""
    from oracle_unselected import approximated_attention
    from sparsecore.methods.approximation import unselected_of, with_unselected
    keep = np.random.default_rng(2).random((2, 6, 6)) < 0.3
    keep[:, np.arange(6), np.arange(6)] = True
    drop = BlockMask.from_dense(keep, 96, 96, 16)
    mask = with_unselected(drop, unselected_of(kind, 2))
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 96, 16, generator=gen) for _ in range(3))
    fid, dropped = fidelity_of_masks(q, k, v, [mask, drop], compute_dtype=torch.float64, max_elements=500)
    q64, k64, v64 = (t.double().numpy() for t in (q, k, v))
    full = np.ones((2, 96, 96), dtype=bool)
    dense_out, _ = dense_attention(q64, k64, v64, full, 0.25)
    out, _ = approximated_attention(q64, k64, v64, mask, 0.25)
    rel_l2 = np.sqrt(((out - dense_out) ** 2).sum(axis=(0, 2, 3)) / (dense_out ** 2).sum(axis=(0, 2, 3)))
    np.testing.assert_allclose(fid.rel_l2, rel_l2, rtol=1e-8)
    np.testing.assert_allclose(fid.recall, dropped.recall, rtol=1e-12)
    assert (np.abs(fid.rel_l2 - dropped.rel_l2) > 1e-6).all()          # the approximation changed the output


def test_fidelity_of_inputs_that_require_gradients_matches_the_oracle():
    """A model's activations in grad mode: measured without autograd (``.numpy()`` of a tensor with history raised
    after the whole dense pass, which had kept every chunk's graph)."""
    g = VideoGeometry(3, 2, 2)
    q, k, v = (t.requires_grad_() for t in video_qkv(g, 2, 8, seed=6))
    mask = BlockMask.from_lists([[[0], [0, 1], [2]]] * 2, g.frame_offsets(), g.frame_offsets())
    fid = attention_fidelity(q, k, v, mask)
    recall, rel_l2, cosine = oracle_fidelity(q.detach(), k.detach(), v.detach(), mask)
    np.testing.assert_allclose(fid.recall, recall, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(fid.rel_l2, rel_l2, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(fid.cosine, cosine, rtol=1e-4, atol=1e-5)


def test_fidelity_names_inputs_on_different_devices():
    """The shared attention input check (q and k on different devices gave torch's own error, naming nothing)."""
    mask = BlockMask.full(2, 32, 32, 16)
    q = torch.randn(1, 2, 32, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"q, k, v: expected one device, got \['cpu', 'meta', 'cpu'\]"):
        attention_fidelity(q, q.to("meta"), q, mask)


def test_rows_that_keep_little_or_nothing_stay_within_max_elements():
    """Rows whose kept mass is below 1e-30 (empty rows too: a causal or sparse mask has many) were redone with
    their heads' values gathered once per row, ``[rows, L_kv, D]``: head_dim times ``max_elements`` (an empty mask
    of 2 heads x 64 tokens, D 32, at 512 scores made 16,384 elements, 4x its inputs). The results stay exact."""
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(1, 2, 64, 32, generator=gen) * 12
    k, v = (torch.randn(1, 2, 64, 32, generator=gen) for _ in range(2))
    k[:, :, 32:] *= 12                                    # keys 32.. dwarf keys ..32: rows keep < 1e-180
    offsets = BlockMask.uniform_offsets(64, 16)
    weak = BlockMask.from_lists([[[0, 1], [], [0], []]] * 2, offsets, offsets)
    with LargestResult() as largest:
        fid = attention_fidelity(q, k, v, weak, max_elements=512, compute_dtype=torch.float64)
    assert largest.most <= q[0].numel(), largest.most         # the inputs' size: a chunk's scores are 512
    recall, rel_l2, cosine, min_recall = oracle_fidelity(q, k, v, weak, with_min_recall=True)
    np.testing.assert_allclose(fid.recall, recall, rtol=1e-6, atol=1e-300)
    np.testing.assert_allclose(fid.rel_l2, rel_l2, rtol=1e-6)
    np.testing.assert_allclose(fid.cosine, cosine, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(fid.min_recall, min_recall, atol=1e-300)
