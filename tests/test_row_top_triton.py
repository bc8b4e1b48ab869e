"""The planners' row-wise top-k kernel (Triton; PASA's selection on CUDA) against a NumPy ranking.

Runs on a GPU, or on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1, as CI does)
inside the Triton backend's emulator; otherwise it skips with the backend's reason. The oracle
ranks each row by value, then by id (the kernel's rule for ties at the k-th value).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsecore.backends.cuda import row_top
from sparsecore.geometry import VideoGeometry
from sparsecore.methods import pasa
from sparsecore.methods.selection import sorted_top
from sparsecore.noise import GumbelNoise, head_keys
from sparsecore.workloads import video_qkv


def ranked_top(values: np.ndarray, k: int) -> np.ndarray:
    """Ids of each row's k largest values (ties: lowest ids), ascending, ``[H, R, k]``."""
    heads, rows, cols = values.shape
    ids = np.broadcast_to(np.arange(cols), values.shape)
    order = np.lexsort((ids, -values), axis=-1)                     # by value descending, then by id
    return np.sort(order[..., :k], axis=-1)


def test_signed_zeros_tie_and_nans_rank_highest_as_in_torch(triton_device):
    """-0.0 ranked below +0.0 (the int image of the float order), and a NaN with its sign bit set lowest, where
    torch.topk, the fallback, ranks every NaN highest."""
    scores = torch.tensor([[[-0.0, 0.0, -1.0], [1.0, float("nan"), 2.0]]])
    scores[0, 1, 1] = -scores[0, 1, 1]                              # a NaN with the sign bit set
    got = row_top.run(scores.to(triton_device), 1).cpu()
    assert got[0, 0].tolist() == [0] and got[0, 1].tolist() == [1]
    assert torch.topk(scores[0, 1], 1).indices.tolist() == [1]


@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(1, 3), st.integers(1, 5), st.integers(1, 300), st.data(), st.booleans(), st.integers(0, 2**32 - 1))
def test_kernel_keeps_the_k_largest_lowest_ids_first(triton_device, heads, rows, cols, data, tied, seed):
    gen = torch.Generator().manual_seed(seed)
    k = data.draw(st.integers(1, cols), label="k")
    if tied:                                                        # a few distinct values: many ties at the k-th
        scores = torch.randint(-3, 3, (heads, rows, cols + 2), generator=gen).float() / 4
    else:
        scores = torch.randn(heads, rows, cols + 2, generator=gen) * 1e3
    view = scores[:, :, 1:-1]                                       # strided, as the planners' video slice
    got = row_top.run(view.to(triton_device), k).cpu().numpy()
    np.testing.assert_array_equal(got, ranked_top(view.double().numpy(), k))


@settings(max_examples=15, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(1, 3), st.integers(1, 40), st.integers(2, 200), st.data(), st.floats(0.05, 3.0),
       st.integers(0, 2**31 - 1))
def test_kernel_noise_is_the_counter_noise(triton_device, heads, rows, cols, data, scale, seed):
    """The kernel draws the noise of :class:`GumbelNoise` itself: its choice equals the ranking of
    scores + sampled noise, up to entries within float32 rounding of the k-th value."""
    k = data.draw(st.integers(1, cols - 1), label="k")
    scores = torch.randn(heads, rows, cols, generator=torch.Generator().manual_seed(seed))
    noise = GumbelNoise(head_keys(range(2, 2 + heads), seed, 3, 7, "cpu"), scale)
    values = (scores + noise.sample(rows, cols)).double().numpy()
    got = row_top.run(scores.to(triton_device), k, GumbelNoise(noise.keys.to(triton_device), scale)).cpu().numpy()
    want = ranked_top(values, k)
    kth = np.sort(values, axis=-1)[..., cols - k]
    for h, r in zip(*np.nonzero((got != want).any(axis=-1))):
        differ = np.setxor1d(got[h, r], want[h, r])
        np.testing.assert_allclose(values[h, r, differ], kth[h, r], rtol=1e-6, atol=1e-6)


def test_pasa_selects_the_same_blocks_through_the_kernel(triton_device, monkeypatch):
    """PASA's mask from the kernel (inside the emulator on CPU, or CUDA tensors) equals its torch path's."""
    from sparsecore.methods import selection
    geometry = VideoGeometry(12, 4, 8)
    q, k, _ = video_qkv(geometry, 3, 32, seed=5)
    kwargs = dict(step=30, layer=2, block_size=16, noise_scale=0.5, seed=9)
    found, find = [], selection._row_top
    monkeypatch.setattr(selection, "_row_top", lambda scores, keep: found.append(find(scores, keep)) or found[-1])
    through_kernel = pasa.plan(geometry, 3, q=q.to(triton_device), k=k.to(triton_device), **kwargs)
    assert found and all(op is not None for op in found)
    monkeypatch.setattr(selection, "_row_top", lambda scores, keep: None)
    torch_path = pasa.plan(geometry, 3, q=q, k=k, **kwargs)
    np.testing.assert_array_equal(through_kernel.to_host().to_dense(), torch_path.to_host().to_dense())


def test_the_torch_path_ranks_every_nan_highest_as_the_kernel():
    scores = torch.tensor([[[1.0, float("nan"), 2.0, float("nan"), 3.0]]])
    scores[0, 0, 3] = -scores[0, 0, 3]                              # a NaN with its sign bit set
    assert sorted_top(scores, 3).tolist() == [[[1, 3, 4]]]


def test_one_noise_key_is_every_heads_and_a_wrong_count_is_refused(triton_device):
    """sample() gives every head one key's noise; the kernel read keys[h] past the one there (out of bounds)."""
    scores = torch.randn(3, 5, 40, generator=torch.Generator().manual_seed(1))
    one = GumbelNoise(head_keys(range(1), 7, 3, 7, "cpu"), 1.0)
    values = (scores + one.sample(5, 40)).double().numpy()
    got = row_top.run(scores.to(triton_device), 6, GumbelNoise(one.keys.to(triton_device), 1.0)).cpu().numpy()
    assert np.array_equal(got, ranked_top(values, 6))
    two = GumbelNoise(head_keys(range(2), 7, 3, 7, "cpu"), 1.0)
    with pytest.raises(ValueError, match=r"noise: expected one key or one per head \(3\), got 2"):
        row_top.run(scores.to(triton_device), 6, GumbelNoise(two.keys.to(triton_device), 1.0))
