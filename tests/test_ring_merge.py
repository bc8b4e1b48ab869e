"""The ring's arithmetic in one process: per-shard slices of a mask, merged by LSE, equal the whole mask's attention."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from oracle import dense_attention, expand_to_tokens
from strategies import block_masks

import sparsecore
from sparsecore import Capabilities
from sparsecore.integrations.diffusers.ring import merge
from sparsecore.ir.slicing import slices

ANY = Capabilities(devices=("test",), array_type="numpy", dtypes=frozenset({"float64"}))


def test_merge_handles_rows_without_keys_on_either_side():
    out = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [0.0, 0.0], [0.0, 0.0]]])
    lse = torch.tensor([[0.5, float("-inf"), float("-inf"), 2.0]])
    other = torch.tensor([[[5.0, 6.0], [7.0, 8.0], [0.0, 0.0], [1.0, 1.0]]])
    other_lse = torch.tensor([[float("-inf"), 1.5, float("-inf"), 2.0]])
    got, got_lse = merge(out, lse, other, other_lse)
    assert torch.equal(got[0, 0], out[0, 0]) and got_lse[0, 0] == 0.5            # right side empty
    assert torch.equal(got[0, 1], other[0, 1]) and got_lse[0, 1] == 1.5          # left side empty
    assert torch.equal(got[0, 2], torch.zeros(2)) and got_lse[0, 2] == float("-inf")   # both empty
    assert torch.allclose(got[0, 3], torch.tensor([0.5, 0.5])) and abs(float(got_lse[0, 3]) - 2 - np.log(2)) < 1e-6
    assert not torch.isnan(got).any()


def test_merge_of_partial_lses_far_apart_is_exact_in_float32():
    """One shard's keys dominate the other's by e^150 or more: the merge works relative to the larger LSE, where
    exp(lse) itself overflows float32."""
    out_a, out_b = torch.full((1, 2, 4), 1.0), torch.full((1, 2, 4), 3.0)
    lse_a, lse_b = torch.tensor([[0.0, 200.0]]), torch.tensor([[150.0, 10.0]])
    out, lse = merge(out_a, lse_a, out_b, lse_b)
    torch.testing.assert_close(out[0, :, 0], torch.tensor([3.0, 1.0]))
    torch.testing.assert_close(lse, torch.tensor([[150.0, 200.0]]))


@settings(max_examples=25, deadline=None)
@given(data=st.data(), shards=st.integers(1, 4), heads=st.integers(1, 2), seed=st.integers(0, 2**31 - 1))
def test_shard_slices_merged_by_lse_equal_the_whole_mask(data, shards, heads, seed):
    mask = data.draw(block_masks(ANY, heads))
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, mask.q_len, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(1, heads, mask.kv_len, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    whole, whole_lse = (torch.from_numpy(x) for x in dense_attention(q.numpy(), k.numpy(), v.numpy(),
                                                                       expand_to_tokens(mask), 8 ** -0.5))
    q_cuts = np.linspace(0, mask.q_len, shards + 1).astype(int)
    kv_cuts = np.linspace(0, mask.kv_len, shards + 1).astype(int)
    keys = [(int(a), int(b)) for a, b in zip(kv_cuts[:-1], kv_cuts[1:]) if b > a]
    for a, b in zip(q_cuts[:-1], q_cuts[1:]):
        if b == a:
            continue
        out = torch.zeros(1, heads, b - a, 8, dtype=torch.float64)
        lse = torch.full((1, heads, b - a), float("-inf"), dtype=torch.float64)
        for (c, d), piece in zip(keys, slices(mask, (int(a), int(b)), keys)):
            if piece.nnz:                                    # an empty slice is a skipped ring step
                part, part_lse = sparsecore.compile(piece, device="cpu")(q[:, :, a:b], k[:, :, c:d], v[:, :, c:d],
                                                                         return_lse=True)
                out, lse = merge(out, lse, part, part_lse.double())
        torch.testing.assert_close(out, whole[:, :, a:b], rtol=1e-6, atol=1e-6)     # LSEs are float32
        torch.testing.assert_close(lse, whole_lse[:, :, a:b], rtol=1e-6, atol=1e-6)


def test_the_ring_holds_at_most_two_received_shards(monkeypatch):
    """Each step's shard is released before the next transfer is posted (docs/diffusers.md's memory table counts
    two). Transfers are replaced by buffers handed over at once; every ring step needs a shard."""
    import gc
    import weakref

    from sparsecore.integrations.diffusers import ring

    world, video, heads, dim = 5, 4, 1, 2
    monkeypatch.setattr(ring.dist, "P2POp", lambda *args, **kwargs: None)
    monkeypatch.setattr(ring.dist, "batch_isend_irecv", lambda ops: [])
    monkeypatch.setattr(ring.RingGroup, "peer", lambda self, index: index)
    received, alive = [], []
    post = ring._Exchange.post

    def counting_post(self, step):
        post(self, step)
        buffer = self.posted.get(step, (None,))[0]
        if buffer is not None and all(r() is not buffer for r in received):
            received.append(weakref.ref(buffer))
        del buffer
        gc.collect()
        alive.append(sum(r() is not None for r in received))

    monkeypatch.setattr(ring._Exchange, "post", counting_post)
    kernel = lambda q, k, v, return_lse: (torch.zeros_like(q), torch.zeros(q.shape[:3]))   # noqa: E731
    work = ring.RingWork([kernel] * world, None, [[True] * world for _ in range(world)], video, 0)
    q, k, v = (torch.randn(1, video, heads, dim, generator=torch.Generator().manual_seed(i)) for i in range(3))
    ring.run(work, ring.RingGroup(world, 0, None), q, k, v)
    assert len(received) == world - 1 and max(alive) == 2, alive
