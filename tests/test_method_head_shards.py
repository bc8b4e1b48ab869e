"""Planning one rank's heads (HeadShard, Ulysses): each shard's mask is the all-heads mask's slice.

The ranks run as threads here; their ``gather`` is an all-gather through a barrier, as
torch.distributed's would be. The multi-process version through diffusers is in
test_integration_context_parallel.py.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from sparsecore.geometry import VideoGeometry
from sparsecore.methods import HeadShard, adaspa, lvsa, pasa
from sparsecore.workloads import video_qkv

GEOMETRY = VideoGeometry(6, 4, 8, text_tokens=8)
HEADS = 6
ADASPA = {"block_size": 16, "warmup_steps": 1, "search_steps": (1, 3)}


def shards(world: int) -> list[HeadShard]:
    """One HeadShard per rank whose gather is a barrier all-gather across the ``world`` threads."""
    barrier, slots = threading.Barrier(world), [None] * world
    size = HEADS // world

    def gather_for(rank: int):
        def gather(values: torch.Tensor) -> torch.Tensor:
            slots[rank] = values
            barrier.wait()
            out = torch.cat(slots)
            barrier.wait()                      # nobody overwrites a slot before every rank has read them
            return out
        return gather

    return [HeadShard(r * size, (r + 1) * size, HEADS, gather_for(r)) for r in range(world)]


def per_rank(world: int, plan_shard) -> list:
    with ThreadPoolExecutor(world) as pool:
        return list(pool.map(plan_shard, shards(world)))


def inputs(seed: int, drift: float = 0.0):
    """q, k of one step; ``drift`` > 0: seed 1's tensors moved a little (a later step of the same run)."""
    q, k, _ = video_qkv(GEOMETRY, HEADS, 16, seed=seed, batch=2, sharpness=2.0)
    if drift:
        gen = torch.Generator().manual_seed(seed + 100)
        q, k = (t + drift * torch.randn(t.shape, generator=gen) for t in (q, k))
    return q, k


@pytest.mark.parametrize("first_search", ["auto", "fused"])
@pytest.mark.parametrize("world", [2, 3])
def test_adaspa_session_shards_match_the_all_heads_session(world, first_search):
    # steps: dense (keeping its LSE by default), the first search, reuse, cached search, reuse
    steps = [(0, 0.0), (1, 0.0), (2, None), (3, 0.05), (4, None)]
    params = {**ADASPA, "first_search": first_search}
    full = adaspa.session(num_steps=5, **params)
    sessions = [adaspa.session(num_steps=5, **params) for _ in range(world)]
    adapted = False
    for step, drift in steps:
        q, k = inputs(1, drift) if drift is not None else (None, None)
        expected = full.plan(GEOMETRY, HEADS, step=step, layer=0, q=q, k=k)

        def plan_shard(shard, step=step, q=q, k=k):
            pick = (lambda t: None if t is None else t[:, shard.start:shard.stop])
            return sessions[shard.start // shard.size].plan(GEOMETRY, HEADS, step=step, layer=0, q=pick(q),
                                                            k=pick(k), heads=shard)

        for shard, got in zip(shards(world), per_rank(world, plan_shard)):
            assert got == expected.select_heads(shard.heads), (step, shard)
        adapted |= len(set(expected.to_host().budgets.tolist())) > 1
    assert adapted, "the inputs never gave heads different budgets: the test would not see a wrong head slice"


@pytest.mark.parametrize("world", [2, 3])
def test_pasa_shards_draw_each_heads_own_noise(world):
    session = pasa.session(num_steps=10, density=0.3, block_size=16, dense_layers=())
    q, k = inputs(5)
    expected = session.plan(GEOMETRY, HEADS, step=6, layer=2, q=q, k=k)
    rows = [expected.to_host().select_heads([h]).indices.tolist() for h in range(HEADS)]
    assert len({tuple(r) for r in rows}) > 1

    def plan_shard(shard):
        return session.plan(GEOMETRY, HEADS, step=6, layer=2, q=q[:, shard.start:shard.stop],
                            k=k[:, shard.start:shard.stop], heads=shard)

    for shard, got in zip(shards(world), per_rank(world, plan_shard)):
        assert got == expected.select_heads(shard.heads)


def test_lvsa_shard_is_the_shared_pattern():
    video = VideoGeometry(30, 2, 2)
    session = lvsa.session(num_steps=4)
    expected = session.plan(video, HEADS, step=2)
    for shard in shards(3):
        assert session.plan(video, HEADS, step=2, heads=shard) == expected.select_heads(shard.heads)


def test_shard_errors_name_the_field():
    session = lvsa.session(num_steps=4)
    with pytest.raises(ValueError, match="heads: expected 0 <= start < stop <= total"):
        session.plan(GEOMETRY, HEADS, step=0, heads=HeadShard(4, 8, 8))
    with pytest.raises(TypeError, match="heads: expected a sparsecore.methods.HeadShard"):
        session.plan(GEOMETRY, HEADS, step=0, heads=(0, 3))
    lonely = HeadShard(0, 3, HEADS)
    with pytest.raises(ValueError, match="heads.gather: a shard of heads"):
        lonely.all_heads(torch.zeros(3))
    q, k = inputs(1)
    for shard, error, message in [
        (HeadShard(0, 3, 6.0, gather=lambda values: values), TypeError, "heads.total: expected an int, got float"),
        (HeadShard(0, 3, HEADS, gather=5), TypeError, "heads.gather: expected None or a callable"),
    ]:   # a float total was taken (6.0 == 6) and met a slice; a non-callable gather was called ('int' object ...)
        with pytest.raises(error, match=message):
            adaspa.plan(GEOMETRY, HEADS, step=1, layer=0, q=q[:, :3], k=k[:, :3], heads=shard, **ADASPA)
    liar = HeadShard(0, 3, HEADS, gather=lambda values: torch.zeros(HEADS))
    with pytest.raises(ValueError, match="heads.gather: expected the 6 heads' values"):
        liar.all_heads(torch.ones(3))


GQA_HEADS, GQA_KV_HEADS = 12, 4                 # each key head serves 3 query heads


def gqa_inputs(seed: int):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, heads, GEOMETRY.tokens, 16, generator=gen, dtype=torch.float64)
               for heads in (GQA_HEADS, GQA_KV_HEADS, GQA_KV_HEADS))
    return q, k, v


@pytest.mark.parametrize("start, stop, kv_start, kv_stop", [(0, 4, 0, 2), (3, 7, 1, 3), (2, 8, 0, 2)])
def test_a_shard_that_splits_a_key_head_group_is_refused(start, stop, kv_start, kv_stop):
    """A shard of query heads that cuts a GQA group (12 query heads on 4 key heads: heads 3 and 4 read different key
    heads than the shard's local grouping gives them) planned its search with the wrong key heads, silently: the
    shard did not know the model's key heads. With num_kv_heads it says so; without it, grouped k is refused."""
    q, k, _ = gqa_inputs(1)
    session = pasa.session(num_steps=10, density=0.3, block_size=16, dense_layers=())
    shard_q, shard_k = q[:, start:stop].float(), k[:, kv_start:kv_stop].float()
    with pytest.raises(ValueError, match=rf"heads: a shard of query heads \[{start}, {stop}\) splits a key-head group: "
                                         rf"num_kv_heads={GQA_KV_HEADS}"):
        session.plan(GEOMETRY, GQA_HEADS, step=6, layer=2, q=shard_q, k=shard_k,
                     heads=HeadShard(start, stop, GQA_HEADS, num_kv_heads=GQA_KV_HEADS))
    with pytest.raises(ValueError, match=r"heads.num_kv_heads: k holds 2 key heads for the shard's .* query heads"):
        session.plan(GEOMETRY, GQA_HEADS, step=6, layer=2, q=shard_q, k=shard_k,
                     heads=HeadShard(start, stop, GQA_HEADS))
    aligned = HeadShard(3, 9, GQA_HEADS, num_kv_heads=GQA_KV_HEADS)
    with pytest.raises(ValueError, match=r"k: expected the shard's 2 key heads .* got 3"):
        session.plan(GEOMETRY, GQA_HEADS, step=6, layer=2, q=q[:, 3:9].float(), k=k[:, :3].float(), heads=aligned)
    with pytest.raises(ValueError, match=r"heads.num_kv_heads: expected the model's key heads, a divisor of "
                                         r"total=12 query heads, got 5"):
        session.plan(GEOMETRY, GQA_HEADS, step=6, layer=2, q=q[:, 3:9].float(), k=k[:, 1:3].float(),
                     heads=HeadShard(3, 9, GQA_HEADS, num_kv_heads=5))


@pytest.mark.parametrize("world", [2, 4])
def test_aligned_gqa_shards_plan_the_all_heads_mask_and_attend_as_the_oracle(world):
    """Shards of whole key-head groups (Ulysses over 12 query and 4 key heads): each plans the all-heads mask's
    heads, and attention of its q, k, v under its mask equals the float64 oracle's of the whole model there."""
    from oracle import dense_attention, expand_to_tokens

    import sparsecore
    q, k, v = gqa_inputs(2)
    session = pasa.session(num_steps=10, density=0.3, block_size=16, dense_layers=(), approximation="drop")
    whole = session.plan(GEOMETRY, GQA_HEADS, step=6, layer=2, q=q.float(), k=k.float()).to_host()
    want, _ = dense_attention(q.numpy(), k.numpy(), v.numpy(), expand_to_tokens(whole), 16 ** -0.5)
    size, kv_size = GQA_HEADS // world, GQA_KV_HEADS // world
    for rank in range(world):
        heads, kv = slice(rank * size, (rank + 1) * size), slice(rank * kv_size, (rank + 1) * kv_size)
        shard = HeadShard(heads.start, heads.stop, GQA_HEADS, num_kv_heads=GQA_KV_HEADS)
        mask = session.plan(GEOMETRY, GQA_HEADS, step=6, layer=2, q=q[:, heads].float(), k=k[:, kv].float(),
                            heads=shard)
        assert mask == whole.select_heads(shard.heads)
        out = sparsecore.compile(mask.to_host(), device="cpu")(q[:, heads], k[:, kv], v[:, kv])
        np.testing.assert_allclose(np.asarray(out), want[:, heads], rtol=1e-10, atol=1e-12)
