"""The segmented block-mass kernel (``block_mass_segmented_fwd``) against float64 dense attention.

Key blocks of 64 tokens run in segments, each ending with a block of 1 to 64 tokens (AdaSpa's blocks cut at the
edges of frame-causal blocks); a query block walks a prefix of whole segments. Runs on a GPU, or on CPU tensors
through Triton's interpreter (TRITON_INTERPRET=1, as CI does).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_method_adaspa import mass_float64

from sparsecore.backends.cuda import block_mass as triton_block_mass
from sparsecore.search import block_mass


@st.composite
def segmented_layouts(draw):
    """(query offsets, key offsets, visible, segment ends in blocks): 1-4 key segments of 1-5 blocks (64 tokens but a
    last of 1-64), query blocks of 1-64 tokens, each query block seeing a prefix of whole segments (0 to all)."""
    sizes, ends = [], [0]
    for _ in range(draw(st.integers(1, 4))):
        blocks = draw(st.integers(1, 5))
        sizes += [64] * (blocks - 1) + [draw(st.integers(1, 64))]
        ends.append(len(sizes))
    kv_offsets = np.concatenate([[0], np.cumsum(sizes)])
    q_sizes = draw(st.lists(st.integers(1, 64), min_size=1, max_size=6))
    q_offsets = np.concatenate([[0], np.cumsum(q_sizes)])
    walked = np.array([draw(st.integers(0, len(ends) - 1)) for _ in q_sizes])
    return q_offsets, kv_offsets, np.array(ends)[walked], np.array(ends), walked


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(segmented_layouts(), st.sampled_from([(1, 1), (4, 2), (2, 1)]), st.integers(1, 2),
       st.sampled_from(["float32", "float16"]), st.sampled_from([64, 128]), st.integers(0, 2**32 - 1))
def test_segmented_kernel_matches_float64_and_leaves_later_segments_zero(triton_device, layout, heads, batch, dtype,
                                                                         block_n, seed):
    """The kernel on the segments the test drew (whatever ``segments()`` would choose for the layout)."""
    q_offsets, kv_offsets, visible, ends, walked = layout
    drawn = triton_block_mass.Segments(*(np.ascontiguousarray(a, dtype=np.int32)
                                         for a in (kv_offsets[ends], ends, walked)))
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads[0], int(q_offsets[-1]), 16, generator=gen).to(getattr(torch, dtype))
    k = torch.randn(batch, heads[1], int(kv_offsets[-1]), 16, generator=gen).to(getattr(torch, dtype))
    row_ends = np.repeat(kv_offsets[visible], np.diff(q_offsets))
    seen = torch.from_numpy(np.arange(kv_offsets[-1])[None, :] < row_ends[:, None])
    scores = q.double() @ k.double().repeat_interleave(heads[0] // heads[1], 1).transpose(-1, -2) * 0.25
    lse = torch.logsumexp(scores.masked_fill(~seen, float("-inf")), dim=-1) + 0.25      # a stale LSE
    dropped = torch.rand(lse.shape, generator=gen) < 0.1                                # rows that add nothing
    lse[dropped] = float("inf")
    want = mass_float64(q, k, q_offsets, kv_offsets, lse.numpy(), 0.25)
    later = np.arange(len(kv_offsets) - 1)[None, :] >= visible[:, None]
    want[..., later] = 0.0
    mass = torch.zeros(want.shape, dtype=torch.float32, device=triton_device)
    triton_block_mass._run_segmented(q.to(triton_device), k.to(triton_device), lse.float().to(triton_device), mass,
                                     q_offsets, drawn, 0.25 * 1.4426950408889634,
                                     triton_block_mass.SegmentedConfig(block_n, 4, 1, use_tma=False))
    got = mass.double().cpu().numpy()
    tolerance = 1e-5 if dtype == "float32" else 2e-3
    assert (got[..., later] == 0).all()
    np.testing.assert_allclose(got, want, rtol=tolerance * 10, atol=1e-6)


@given(segmented_layouts())
def test_the_segments_chosen_for_a_layout_end_at_every_visible_count_and_every_short_block(layout):
    """Where ``segments()`` takes a layout, each query block walks exactly its visible prefix, and no segment holds
    a short block before its last; where it does not, its segments would average under SEGMENT_BLOCKS blocks."""
    q_offsets, kv_offsets, visible, _, _ = layout
    found = triton_block_mass.segments(q_offsets, kv_offsets, visible)
    short = np.flatnonzero(np.diff(kv_offsets) < 64) + 1                       # block ends after a short block
    needed = np.unique(np.concatenate([[0, len(kv_offsets) - 1], short, visible]))
    if found is None:
        assert (len(needed) - 1) * triton_block_mass.SEGMENT_BLOCKS > len(kv_offsets) - 1 and len(needed) > 2
    else:
        np.testing.assert_array_equal(found.blocks[found.walked], visible)
        assert set(needed) <= set(found.blocks.tolist())
        np.testing.assert_array_equal(found.starts, kv_offsets[found.blocks])


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(segmented_layouts(), st.data(), st.sampled_from([64, 128]), st.integers(0, 2**32 - 1))
def test_any_visible_prefix_through_run_matches_float64(triton_device, layout, data, block_n, seed):
    """Counts anywhere in [0, NB], inside a run of 64-token blocks too (they cut a segment there), through ``run``
    whichever kernel it chooses; hidden blocks exactly 0."""
    q_offsets, kv_offsets = layout[:2]
    visible = np.array(data.draw(st.lists(st.integers(0, len(kv_offsets) - 1), min_size=len(q_offsets) - 1,
                                          max_size=len(q_offsets) - 1)))
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 2, int(q_offsets[-1]), 16, generator=gen)
    k = torch.randn(1, 1, int(kv_offsets[-1]), 16, generator=gen)
    seen = torch.from_numpy(np.arange(kv_offsets[-1])[None, :] < np.repeat(kv_offsets[visible],
                                                                           np.diff(q_offsets))[:, None])
    lse = torch.logsumexp((q.double() @ k.double().transpose(-1, -2) * 0.25).masked_fill(~seen, float("-inf")), -1)
    want = mass_float64(q, k, q_offsets, kv_offsets, lse.numpy(), 0.25)
    later = np.arange(len(kv_offsets) - 1)[None, :] >= visible[:, None]
    want[..., later] = 0.0
    got = triton_block_mass.run(q.to(triton_device), k.to(triton_device), q_offsets, kv_offsets,
                                lse.float().to(triton_device), 0.25, visible=visible,
                                config=triton_block_mass.SegmentedConfig(block_n, 4, 1, use_tma=False))
    got = got.double().cpu().numpy()
    assert (got[..., later] == 0).all()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_causal_blocks_of_64_token_blocks_take_the_segmented_kernel_through_block_mass(triton_device, monkeypatch):
    """SkyReels-V2's layout in small: causal blocks of 330 tokens (five 64-token blocks and one of 10), each query
    block seeing its own and earlier causal blocks; block_mass reaches the segmented kernel, whose masses match
    float64 (later causal blocks exactly 0)."""
    offsets = np.concatenate([[0], np.cumsum([64] * 5 + [10] + [64] * 5 + [10] + [64] * 5 + [10])])
    group = np.repeat(np.arange(3), 6)
    visible = 6 * (group + 1)
    ran = []
    original = triton_block_mass._run_segmented
    monkeypatch.setattr(triton_block_mass, "_run_segmented", lambda *a: (ran.append(a[5]), original(*a))[1])
    gen = torch.Generator().manual_seed(3)
    q, k = (torch.randn(1, 2, int(offsets[-1]), 16, generator=gen) for _ in range(2))
    seen = torch.from_numpy(np.arange(offsets[-1])[None, :] < np.repeat(offsets[visible], np.diff(offsets))[:, None])
    lse = torch.logsumexp((q.double() @ k.double().transpose(-1, -2) * 0.25).masked_fill(~seen, float("-inf")), -1)
    found = block_mass(q.to(triton_device), k.to(triton_device), offsets, offsets, lse.float().to(triton_device),
                       0.25, visible=visible, impl="triton")
    assert len(ran) == 1 and list(ran[0].blocks) == [0, 6, 12, 18] and list(ran[0].walked) == list(group + 1)
    want = mass_float64(q, k, offsets, offsets, lse.numpy(), 0.25)
    want[..., np.arange(18)[None, :] >= visible[:, None]] = 0.0
    np.testing.assert_allclose(found.mass.double().cpu().numpy(), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("q_sizes, kv_sizes, visible, why", [
    ([65], [64, 64], None, "a query block over 64 tokens"),
    ([64], [64, 100], None, "a key block over 64 tokens"),
    ([64] * 4, [64, 10, 64, 10, 64, 10], None, "segments of 2 blocks on average"),
])
def test_layouts_the_segmented_kernel_does_not_take_go_to_the_table_kernel(q_sizes, kv_sizes, visible, why):
    offsets = [np.concatenate([[0], np.cumsum(sizes)]) for sizes in (q_sizes, kv_sizes)]
    assert triton_block_mass.segments(*offsets, visible) is None, why


@pytest.mark.parametrize("block_n", [64, 128])
def test_a_block_of_tiny_mass_beside_a_large_one_keeps_its_precision(triton_device, block_n):
    """Both blocks in one 128-key tile: the second's mass (3e-7 of the row's) is its own sum, not the tile's less the
    first's, which lost 30% of it to float32 rounding of the tile sum (hostile review, 2026-12-03)."""
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(1, 1, 64, 16, generator=gen)
    k = torch.randn(1, 1, 130, 16, generator=gen) * 0.1
    k[0, 0, :64] = 12 * q[0, 0]                                   # block 0 holds nearly all of the mass
    offsets = np.array([0, 64, 128, 130])
    lse = torch.logsumexp(q.double() @ k.double().transpose(-1, -2) * 0.25, -1)
    want = mass_float64(q, k, offsets[:2], offsets, lse.numpy(), 0.25)
    got = triton_block_mass.run(q.to(triton_device), k.to(triton_device), offsets[:2], offsets,
                                lse.float().to(triton_device), 0.25,
                                config=triton_block_mass.SegmentedConfig(block_n, 4, 1, use_tma=False))
    got = got.double().cpu().numpy()
    assert want[0, 0, 0, 1] < 1e-5 * want[0, 0, 0, 0]
    np.testing.assert_allclose(got, want, rtol=1e-4)
