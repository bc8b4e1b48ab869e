"""The parts behind approximating masks: the torch statistics and pass (against the oracle's token-level terms),
and the planners' ``approximation`` parameter (PASA's default, AdaSpa and LVSA opting in)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from oracle_unselected import approximated_attention, block_terms

import sparsecore
from sparsecore import BlockMask, VideoGeometry
from sparsecore.backends import approximation
from sparsecore.ir import Unselected
from sparsecore.methods import adaspa, lvsa, pasa
from sparsecore.workloads import video_qkv


@pytest.mark.parametrize("kind", ["zeroth", "grouped-first-order:2"])
def test_a_non_finite_first_token_stays_in_its_own_block(kind):
    """Pieces shorter than the widest read token 0 in their padding: an inf there made NaN in every other block's
    statistics (inf * 0), so rows that list block 0 and approximate others were NaN where dense attention is not."""
    offsets = np.array([0, 5, 8, 20])                                # pieces of 4 tokens: blocks 0 and 1 padded
    unselected = Unselected.parse(kind)
    rng = np.random.default_rng(4)
    k, v = rng.standard_normal((2, 1, 1, 20, 4))
    k[..., 0, 0], v[..., 0, 1] = np.inf, -np.inf
    plan = approximation.StatisticsPlan.build(offsets, unselected, torch.device("cpu"))
    stats = approximation.statistics(torch.from_numpy(k), torch.from_numpy(v), plan)
    with np.errstate(invalid="ignore"):                              # block 0's own terms are inf - inf
        mean_key, value_sum, _ = block_terms(k[0, 0], v[0, 0], offsets, unselected.kind, unselected.group_blocks)
    np.testing.assert_allclose(stats.key_means[0, 0, 1:].numpy(), mean_key[1:], rtol=1e-12)
    sizes = np.diff(offsets)[1:, None]
    np.testing.assert_allclose(sizes * stats.value_means[0, 0, 1:].numpy(), value_sum[1:], rtol=1e-12)
    assert all(np.isfinite(t[0, 0, 1:].numpy()).all() for t in (stats.key_means, stats.value_means))


@pytest.mark.parametrize("piece_tokens", [3, 2048])
@pytest.mark.parametrize("kind", ["zeroth", "global-first-order", "grouped-first-order:2", "grouped-first-order:4"])
def test_statistics_match_the_token_level_terms(monkeypatch, kind, piece_tokens):
    """Ragged blocks (1 to 29 tokens), pieces shorter than a group (piece_tokens=3): the same k̄, ΣV and Ĥ."""
    monkeypatch.setattr(approximation, "PIECE_TOKENS", piece_tokens)
    offsets = np.array([0, 1, 30, 37, 40, 52, 53, 80])
    unselected = Unselected.parse(kind)
    rng = np.random.default_rng(2)
    k, v = rng.standard_normal((2, 2, 3, 80, 8))
    plan = approximation.StatisticsPlan.build(offsets, unselected, torch.device("cpu"))
    stats = approximation.statistics(torch.from_numpy(k), torch.from_numpy(v), plan)
    sizes = np.diff(offsets)
    for b in range(2):
        for h in range(3):
            mean_key, value_sum, h_hat = block_terms(k[b, h], v[b, h], offsets, unselected.kind,
                                                     unselected.group_blocks)
            np.testing.assert_allclose(stats.key_means[b, h].numpy(), mean_key, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(sizes[:, None] * stats.value_means[b, h].numpy(), value_sum, rtol=1e-12,
                                       atol=1e-12)
            if unselected.kind == "zeroth":
                assert stats.group_matrices is None
                continue
            got = sizes[:, None, None] * stats.group_matrices[b, h][stats.group_of_block].numpy()
            np.testing.assert_allclose(got, h_hat, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["zeroth", "global-first-order", "grouped-first-order:4"])
def test_one_wide_block_among_small_ones_is_cut_into_pieces(kind):
    """40 blocks of 8 tokens and a text block of 128: the statistics gathered every block padded to the widest
    (5,248 slots for 448 tokens; 31x at 1,000 blocks of 64 and 2,048 text tokens). The plan's pieces now hold at most
    twice the tokens, and k̄, ΣV and Ĥ still equal the token-level terms."""
    offsets = np.append(np.arange(0, 321, 8), 448)
    unselected = Unselected.parse(kind)
    rng = np.random.default_rng(5)
    k, v = rng.standard_normal((2, 1, 2, 448, 8))
    plan = approximation.StatisticsPlan.build(offsets, unselected, torch.device("cpu"))
    for pieces in (p for p in (plan.blocks, plan.groups) if p is not None):
        assert pieces.tokens.numel() <= 2 * 448
    stats = approximation.statistics(torch.from_numpy(k), torch.from_numpy(v), plan)
    sizes = np.diff(offsets)
    for h in range(2):
        mean_key, value_sum, h_hat = block_terms(k[0, h], v[0, h], offsets, unselected.kind, unselected.group_blocks)
        np.testing.assert_allclose(stats.key_means[0, h].numpy(), mean_key, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(sizes[:, None] * stats.value_means[0, h].numpy(), value_sum, rtol=1e-12,
                                   atol=1e-12)
        if stats.group_matrices is not None:
            got = sizes[:, None, None] * stats.group_matrices[0, h][stats.group_of_block].numpy()
            np.testing.assert_allclose(got, h_hat, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk_elements", [1, 500, 1 << 24])
def test_the_pass_does_not_depend_on_its_chunks(chunk_elements):
    rng = np.random.default_rng(4)
    dense = rng.random((4, 4, 6)) < 0.3
    rows = [[np.nonzero(dense[h, i])[0] for i in range(4)] for h in range(4)]
    mask = BlockMask.from_lists(rows, np.array([0, 9, 30, 31, 50]), np.array([0, 5, 20, 33, 40, 60, 61]))
    mask = BlockMask(mask.num_heads, mask.q_offsets, mask.kv_offsets, mask.indptr, mask.indices,
                     unselected=Unselected("grouped-first-order", 4))
    q = rng.standard_normal((2, 4, 50, 16))
    k, v = rng.standard_normal((2, 2, 2, 61, 16))
    kernel = sparsecore.compile(mask, device="cpu", backend="portable", chunk_elements=chunk_elements)
    out, lse = kernel(*(torch.from_numpy(x) for x in (q, k, v)), return_lse=True)
    ref_out, ref_lse = approximated_attention(q, k, v, mask, 0.25)
    np.testing.assert_allclose(out.numpy(), ref_out, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(lse.numpy(), ref_lse, rtol=1e-6)


# ------------------------------------------------------------------ planners
G = VideoGeometry(8, 4, 6)


@pytest.fixture(scope="module")
def qkv():
    return video_qkv(G, 2, 32, seed=1)


def test_pasa_emits_grouped_first_order_by_default_and_keeps_its_selection(qkv):
    q, k, v = qkv
    plan = lambda **p: pasa.plan(G, 2, step=20, q=q, k=k, block_size=16, **p)  # noqa: E731
    default = plan()
    assert default.unselected == Unselected("grouped-first-order", 32)
    assert default.meta["params"]["approximation"] == "grouped-first-order"
    assert default.meta["unselected"] == "grouped-first-order:32"
    expected = {"drop": Unselected(), "zeroth": Unselected("zeroth"),
                "global-first-order": Unselected("global-first-order"),
                "grouped-first-order:4": Unselected("grouped-first-order", 4)}
    for approximation_, unselected in expected.items():
        mask = plan(approximation=approximation_)
        assert mask.unselected == unselected
        assert torch.equal(mask.indices, default.indices) and torch.equal(mask.indptr, default.indptr)
    assert plan(group_size=8).unselected == Unselected("grouped-first-order", 8)
    assert pasa.plan(G, 2, step=0, q=q, k=k, block_size=16).unselected == Unselected()      # dense step
    out = sparsecore.compile(default, device="cpu")(q, k, v)
    ref, _ = approximated_attention(q.double().numpy(), k.double().numpy(), v.double().numpy(), default.to_host(),
                                    32 ** -0.5)
    assert np.linalg.norm(out.double().numpy() - ref) / np.linalg.norm(ref) < 1e-5


@pytest.mark.parametrize("bad, error", [("first-order", ValueError), ("grouped-first-order:0", ValueError),
                                        ("zeroth:4", ValueError), ("grouped-first-order:x", ValueError),
                                        (None, TypeError), (32, TypeError)])
def test_a_bad_approximation_names_the_parameter(bad, error):
    for method in (pasa, adaspa, lvsa):
        with pytest.raises(error, match="approximation"):
            method.session(num_steps=50, approximation=bad)


def test_adaspa_and_lvsa_keep_dropping_unless_asked(qkv):
    q, k, _ = qkv
    assert adaspa.plan(G, 2, step=10, q=q, k=k, block_size=16).unselected == Unselected()
    grouped = adaspa.plan(G, 2, step=10, q=q, k=k, block_size=16, approximation="grouped-first-order")
    assert grouped.unselected == Unselected("grouped-first-order", 32)
    assert grouped.meta["params"]["approximation"] == "grouped-first-order"
    assert lvsa.plan(G, 2, step=1, reference_frames=2).unselected == Unselected()
    mask = lvsa.plan(G, 2, step=1, reference_frames=2, approximation="global-first-order")
    assert mask.unselected == Unselected("global-first-order")
    assert lvsa.plan(G, 2, step=1, approximation="zeroth").unselected == Unselected()   # 8 <= 21 frames: dense


def test_an_approximating_mask_is_not_extended_by_a_padding_block():
    mask = BlockMask.full(1, 48, 48, 16)
    zeroth = BlockMask(1, mask.q_offsets, mask.kv_offsets, mask.indptr, mask.indices, unselected=Unselected("zeroth"))
    assert mask.with_padding(64).q_len == 64
    with pytest.raises(ValueError, match="unselected: with_padding expected a mask that drops"):
        zeroth.with_padding(64)


@pytest.mark.parametrize("kind", ["zeroth", "grouped-first-order:2"])
def test_the_integration_runs_an_approximating_mask_on_the_valid_tokens_of_a_padded_sequence(kind):
    """Text padding (HunyuanVideo 1.5): the padding keys enter no row's approximation, padding rows get 0."""
    from sparsecore.integrations.diffusers.planner import Planner
    from sparsecore.integrations.diffusers.stats import Stats
    geometry = VideoGeometry(3, 4, 4, text_tokens=5, text_position="end")       # 53 valid tokens of 64
    rng = np.random.default_rng(8)
    offsets = geometry.block_offsets(16)
    lists = rng.random((2, len(offsets) - 1, len(offsets) - 1)) < 0.4
    lists[:, np.arange(len(offsets) - 1), np.arange(len(offsets) - 1)] = True
    mask = BlockMask(2, offsets, offsets, *sparsecore.ir.csr.from_block_map(lists), unselected=Unselected.parse(kind))
    planner = Planner(lambda *_: mask, {}, "cpu", None, 4, Stats())
    q, k, v = (torch.from_numpy(rng.standard_normal((1, 64, 2, 8))) for _ in range(3))   # [B, S, H, D]
    got = planner.attend(0, geometry, 1, 0, q, k, v, None, dense=lambda: pytest.fail("the step is sparse"))
    valid = [t.transpose(1, 2)[:, :, :geometry.tokens].numpy() for t in (q, k, v)]
    expected, _ = approximated_attention(*valid, mask, 8 ** -0.5)
    np.testing.assert_allclose(got.transpose(1, 2)[:, :, :geometry.tokens].numpy(), expected, rtol=1e-9, atol=1e-12)
    assert (got[:, geometry.tokens:] == 0).all()


@pytest.mark.parametrize("text", ["grouped-first-order:" + "9" * 5000, "grouped-first-order:\u0661\u0662",
                                  "grouped-first-order:\u00b2"])
def test_a_group_size_parse_takes_ascii_digits_only_and_names_the_form(text):
    with pytest.raises(ValueError, match="<group blocks>"):
        Unselected.parse(text)


def test_a_group_size_a_file_cannot_hold_is_refused_and_every_other_round_trips(tmp_path):
    """The loader reads at most 4,000 digits of a group size; a larger one saved a file its loader refused (and past
    4,300 digits str() itself failed)."""
    mask = BlockMask.from_lists([[np.array([0])]], [0, 16], [0, 16, 32])
    largest = Unselected("grouped-first-order", 10 ** 4000 - 1)
    saved = BlockMask(1, mask.q_offsets, mask.kv_offsets, mask.indptr, mask.indices, unselected=largest)
    assert BlockMask.load(saved.save(tmp_path / "m.safetensors")).unselected == largest
    for group in (10 ** 4000, 10 ** 5000):
        with pytest.raises(ValueError, match="unselected.group_blocks: expected fewer than 4001 digits"):
            Unselected("grouped-first-order", group)


@pytest.mark.parametrize("group", [2**31 - 1, 2**63, 10**30])
def test_a_group_past_the_blocks_runs_as_one_group(group):
    """A group size beyond the key blocks is one group of every block (at 2**63 and more torch's pass indexed with a
    float array); such a mask saves and loads, and PASA takes such a group size."""
    rng = np.random.default_rng(5)
    rows = [[np.array([0, 2]), np.array([1]), np.array([], dtype=np.int64)]]
    mask = BlockMask.from_lists(rows, np.array([0, 16, 32, 40]), np.array([0, 16, 32, 48, 50]))
    mask = BlockMask(mask.num_heads, mask.q_offsets, mask.kv_offsets, mask.indptr, mask.indices,
                     unselected=Unselected("grouped-first-order", group))
    assert Unselected.parse(str(mask.unselected)) == mask.unselected
    assert pasa.PASAParams(group_size=group).group_size == group
    q, k, v = rng.standard_normal((3, 1, 1, 50, 8))
    ref_out, ref_lse = approximated_attention(q[:, :, :40], k, v, mask, 8 ** -0.5)
    out, lse = sparsecore.compile(mask, device="cpu", backend="portable")(
        *(torch.from_numpy(x) for x in (q[:, :, :40], k, v)), return_lse=True)
    np.testing.assert_allclose(out.numpy(), ref_out, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(lse.numpy(), ref_lse, rtol=1e-6)


def test_statistics_plans_are_shared_by_threads():
    """compile() may warm up in a thread: the plans' memo was looked up and reordered in two steps, so another
    thread's eviction in between raised KeyError (in 5 runs of 5 here, before the lock)."""
    import sys
    import threading
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)                                      # switch threads as often as possible
    layouts = [np.arange(0, 16 * (i + 2) + 1, 16) for i in range(40)]              # more than the memo keeps
    errors: list[str] = []

    def build_many(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            for _ in range(10000):
                offsets = layouts[rng.integers(len(layouts))]
                plan = approximation.StatisticsPlan.build(offsets, Unselected("zeroth"), torch.device("cpu"))
                assert len(plan.sizes) == len(offsets) - 1
        except (KeyError, AssertionError) as err:
            errors.append(repr(err))
    try:
        threads = [threading.Thread(target=build_many, args=(seed,)) for seed in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors[:1]


@pytest.mark.parametrize("sizes", [[75600], [12480] * 3, [1560] * 30])
def test_statistics_pieces_are_at_most_piece_tokens_wide(sizes):
    """Blocks wider than PIECE_TOKENS (frame groups of LVSA's global first order: 30 frames of 1,560 tokens) are cut
    into pieces of at most PIECE_TOKENS tokens, as the statistics' docstrings say: the smallest block size was a
    candidate width even above it."""
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    plan = approximation.StatisticsPlan.build(offsets, Unselected.parse("global-first-order"), torch.device("cpu"))
    for pieces in (p for p in (plan.blocks, plan.groups) if p is not None):
        assert pieces.tokens.shape[1] <= approximation.PIECE_TOKENS
