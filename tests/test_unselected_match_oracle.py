"""Masks that approximate the key blocks a row does not list (PASA / PISA): every backend equals the float64 oracle.

Each backend that declares an approximating kind in ``capabilities.unselected`` runs on
generated masks (odd lengths, short last blocks, arbitrary boundaries, empty and full rows,
GQA, per-head differences) with each kind it declares, and on named cases (text-like blocks,
a row with no listed block, a running maximum that grows inside the approximated part);
``oracle_unselected.py`` is the independent float64 statement. Backends that do not declare
a kind must refuse such masks with the capability's name.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from checks import assert_matches, in_model_layout
from oracle_unselected import approximated_attention, block_terms
from strategies import AttentionCase, attention_cases
from targets import all_targets, default_scale, to_float64
from tolerances import OUT_REL

import sparsecore
from sparsecore import BlockMask
from sparsecore.backends.approximation import _merge
from sparsecore.ir import Unselected

APPROXIMATING = ("zeroth", "global-first-order", "grouped-first-order")
TARGETS = [t for t in all_targets() if set(APPROXIMATING) & t.capabilities.unselected]


@pytest.fixture(params=TARGETS, ids=[t.id for t in TARGETS])
def target(request):
    with request.param.running() as t:
        yield t


def approximating(mask: BlockMask, unselected: Unselected | str) -> BlockMask:
    """``mask`` (a host mask) with ``unselected`` instead of its own treatment (validated constructor)."""
    unselected = Unselected.parse(unselected) if isinstance(unselected, str) else unselected
    return BlockMask(mask.num_heads, mask.q_offsets, mask.kv_offsets, mask.indptr, mask.indices, mask.budgets,
                     mask.meta, unselected)


def run_and_compare(target, mask: BlockMask, q, k, v, scale=None, device_held: bool = False,
                    model_layout: bool = False) -> None:
    torch_device = target.tensor_device if target.capabilities.array_type == "torch" else "cpu"
    kernel = sparsecore.compile(mask.to(torch_device) if device_held else mask, device=target.device,
                                backend=target.backend)
    args, (q64, k64, v64) = target.cast(q, k, v)
    out, lse = kernel(*(in_model_layout(args) if model_layout else args), scale=scale, return_lse=True)
    assert str(lse.dtype).endswith("float32") and out.dtype == args[0].dtype
    ref_out, ref_lse = approximated_attention(q64, k64, v64, mask, default_scale(q.shape[-1], scale))
    assert np.isfinite(ref_lse).all()          # every row has mass: each key block is listed or approximated
    assert_matches(target.dtype, to_float64(out), to_float64(lse), ref_out, ref_lse)


@st.composite
def approximated_cases(draw, caps: sparsecore.Capabilities) -> AttentionCase:
    if caps.unselected_head_dims is not None:                     # where the backend approximates
        caps = dataclasses.replace(caps, head_dims=caps.unselected_head_dims)
    case = draw(attention_cases(caps))
    kind = draw(st.sampled_from([k for k in APPROXIMATING if k in caps.unselected]), label="kind")
    group = draw(st.sampled_from([1, 2, 3, 8, 32]), label="group blocks") if kind == "grouped-first-order" else None
    return dataclasses.replace(case, mask=approximating(case.mask, Unselected(kind, group)))


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_generated_masks_match_the_oracle(target, data):
    case = data.draw(approximated_cases(target.capabilities), label="case")
    device_held = data.draw(st.booleans(), label="lists held as device tensors")
    model_layout = data.draw(st.booleans(), label="q, k, v as views of [B, L, H, D]")
    run_and_compare(target, case.mask, *case.inputs(), scale=case.scale, device_held=device_held,
                    model_layout=model_layout)


# ------------------------------------------------------------------ named cases
def _mask(dense: np.ndarray, q_offsets, kv_offsets, unselected: str) -> BlockMask:
    rows = [[np.nonzero(dense[h, i])[0] for i in range(dense.shape[1])] for h in range(dense.shape[0])]
    return approximating(BlockMask.from_lists(rows, np.asarray(q_offsets), np.asarray(kv_offsets)), unselected)


def _random_inputs(mask: BlockMask, num_kv_heads: int, head_dim: int, seed: int, batch: int = 1):
    return AttentionCase(mask, batch, num_kv_heads, head_dim, seed, None).inputs()


def _growing_maximum():
    """One query row per head whose approximated scores grow block after block, far above its listed block.

    Keys of block j point along q with weight j, so ``s q·k̄_j`` rises by ~2 per block across 40
    blocks and 14 groups of 3: a kernel that does not rescale the approximated sums (the denominator
    in particular) when the running maximum grows is off by orders of magnitude.
    """
    rng = np.random.default_rng(21)
    head_dim, blocks, size = 64, 40, 4
    offsets = np.arange(0, blocks * size + 1, size)
    dense = np.zeros((2, 1, blocks), dtype=bool)
    dense[:, 0, 0] = True                                          # the listed block has the lowest scores
    mask = _mask(dense, [0, 8], offsets, "grouped-first-order:3")
    direction = rng.standard_normal(head_dim)
    direction /= np.linalg.norm(direction)
    q = np.broadcast_to(4.0 * direction, (1, 2, 8, head_dim)).copy() + 0.05 * rng.standard_normal((1, 2, 8, head_dim))
    level = np.repeat(np.arange(blocks) * 0.5, size)[None, None, :, None]
    k = level * direction + 0.3 * rng.standard_normal((1, 1, blocks * size, head_dim))
    v = rng.standard_normal((1, 1, blocks * size, head_dim))
    return mask, q, k, v, 1.0


def _named():
    rng = np.random.default_rng(5)
    cases = {}
    frames = np.array([0, 39, 78, 117, 156, 195, 234, 247])         # six 39-token "frames" and a 13-token text block
    window = np.zeros((4, 7, 7), dtype=bool)
    for i in range(7):
        window[:, i, max(0, i - 1):i + 2] = True
    window[:, :, 6] = window[:, 6, :] = True                        # text sink
    cases["frame_blocks_with_text"] = (_mask(window, frames, frames, "grouped-first-order:2"), 2, 64, None)
    empty = rng.random((3, 5, 5)) < 0.4
    empty[0, 2] = False                                             # a row that lists nothing: approximation only
    empty[1] = False                                                # a head that lists nothing
    empty[2] = True                                                 # a head that lists everything: exact only
    offsets = BlockMask.uniform_offsets(80, 16)
    cases["empty_rows_and_full_head"] = (_mask(empty, offsets, offsets, "global-first-order"), 3, 64, None)
    gqa = rng.random((8, 3, 4)) < 0.4
    cases["gqa_4_to_1_short_last_block"] = (_mask(gqa, BlockMask.uniform_offsets(96, 32),
                                                  BlockMask.uniform_offsets(100, 32), "grouped-first-order:3"),
                                            2, 32, None)
    ragged = rng.random((4, 2, 5)) < 0.5
    cases["gqa_2_to_1_q_len_ne_kv_len_zeroth"] = (_mask(ragged, [0, 30, 64], [0, 1, 40, 41, 100, 160], "zeroth"),
                                                  2, 64, 0.3)
    cases["group_wider_than_the_sequence"] = (_mask(rng.random((2, 4, 5)) < 0.3, BlockMask.uniform_offsets(64, 16),
                                                    BlockMask.uniform_offsets(70, 16), "grouped-first-order:32"),
                                              1, 16, None)
    # Head dim 128, where the pass's group matrices fill shared memory: 8-block groups (four a tile of 32 blocks:
    # 500 KB in bf16 at three stages, found by the generated suite on an H200) and PASA's 32-block groups (one a
    # tile: fp16's float32 matrices need 394 KB at three stages); the launch takes a configuration that fits.
    groups_of_8 = rng.random((2, 4, 13)) < 0.5
    cases["groups_of_8_blocks_at_head_dim_128"] = (
        _mask(groups_of_8, [0, 59, 215, 258, 264], [0, 36, 46, 49, 63, 93, 100, 108, 123, 135, 137, 141, 153, 160],
              "grouped-first-order:8"), 1, 128, 0.2)
    cases["pasa_groups_at_head_dim_128"] = (_mask(rng.random((2, 3, 40)) < 0.15, BlockMask.uniform_offsets(96, 32),
                                                  BlockMask.uniform_offsets(158, 4), "grouped-first-order:32"),
                                            2, 128, None)
    return cases


NAMED = _named()


@pytest.mark.parametrize("name", sorted(NAMED))
def test_named_masks_match_the_oracle(target, name):
    mask, num_kv_heads, head_dim, scale = NAMED[name]
    _run_named(target, mask, *_random_inputs(mask, num_kv_heads, head_dim, seed=len(name), batch=2), scale)


def test_a_growing_maximum_matches_the_oracle(target):
    mask, q, k, v, scale = _growing_maximum()
    _run_named(target, mask, q, k, v, scale)


def _run_named(target, mask, q, k, v, scale):
    problems = target.capabilities.mask_problems(mask) + target.capabilities.tensor_problems(
        target.dtype, q.shape[-1], mask.num_heads, k.shape[1], True, approximating=True)
    if problems:
        pytest.skip(f"{target.backend} cannot take this case: {'; '.join(problems)}")
    run_and_compare(target, mask, q, k, v, scale=scale)
    run_and_compare(target, mask, q, k, v, scale=scale, device_held=True)


WIDE_TARGETS = [t for t in TARGETS if t.dtype in ("float32", "float64")]      # 16-bit products overflow at 1e8


def _huge_scores(kind: str):
    """Scores near 1e8 (q and k near 1e4 in 64 dims): every row approximates every block. ``top + log(total)``
    loses ``log(total)`` to float32's spacing there (8 at 1e8), so a merge that normalised by ``exp(top - lse)``
    scaled such rows by up to a block's token count (the torch merge of portable and npu before 2026-12-05; in
    float64 it was 3e-9 off, over float64's bound)."""
    rng = np.random.default_rng(31)
    offsets = BlockMask.uniform_offsets(64, 8)
    mask = _mask(np.zeros((2, 8, 8), dtype=bool), offsets, offsets, kind)
    q, k, v = (rng.standard_normal((1, 2, 64, 64)) for _ in range(3))
    return mask, 1e4 * q, 1e4 * k, v


@pytest.mark.parametrize("kind", ["zeroth", "global-first-order", "grouped-first-order:2"])
@pytest.mark.parametrize("wide", WIDE_TARGETS, ids=[t.id for t in WIDE_TARGETS])
def test_scores_near_1e8_match_the_oracle(wide, kind):
    mask, q, k, v = _huge_scores(kind)
    with wide.running() as target:
        _run_named(target, mask, q, k, v, None)


FLOAT64_TARGETS = [t for t in TARGETS if t.dtype == "float64" and not t.emulated and t.unavailable_reason() is None]


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**31), exponent=st.floats(0, 4.5), density=st.floats(0, 1),
       kind=st.sampled_from(["zeroth", "global-first-order", "grouped-first-order:2"]), shift=st.floats(-3000, 3000))
def test_float64_rows_mixing_listed_and_approximated_blocks_at_any_magnitude(seed, exponent, density, kind, shift):
    """Rows mixing listed blocks far above or below their approximated ones (GQA 4:2, scores up to ~1e9) in float64:
    the merge before 2026-12-05 was 1.45e-10 off here, over float64's bound (a review's property)."""
    rng = np.random.default_rng(seed)
    offsets = np.array([0, 5, 13, 16, 29, 40])
    mask = _mask(rng.random((4, 3, 5)) < density, np.array([0, 7, 9, 20]), offsets, kind)
    direction = rng.standard_normal(16)
    direction /= np.linalg.norm(direction)
    q = rng.standard_normal((1, 4, 20, 16)) * 10 ** exponent + 16 * direction
    k = rng.standard_normal((1, 2, 40, 16)) * 10 ** exponent
    k[:, :, :13] += shift / 16 * direction                 # the first two blocks far above or below the rest
    v = rng.standard_normal((1, 2, 40, 16))
    for wide in FLOAT64_TARGETS:
        with wide.running() as target:
            run_and_compare(target, mask, q, k, v, scale=1.0)


MERGE_LSES = (-math.inf, 0.0, 3.0, 200.0, -1e8, 1e8, 1e8 + 40, math.nan)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_torch_merge_at_every_pair_of_sides(dtype):
    """``_merge`` for every pair of (exact LSE, approximated maximum) among empty, small, large, huge and NaN, against
    the closed form: empty sides add nothing, a NaN on either side spreads, both empty give 0 / -inf."""
    for exact_lse in MERGE_LSES:
        for top in MERGE_LSES:
            total = 0.0 if top == -math.inf else 7.0
            out = torch.tensor([[[[1.0, -2.0]]]], dtype=dtype)
            lse = torch.tensor([[[exact_lse]]], dtype=dtype)
            numerator = torch.tensor([[[[3.0, 5.0]]]], dtype=dtype) * (top != -math.inf)
            _merge(out, lse, slice(0, 1), torch.tensor([[[top]]], dtype=dtype), torch.tensor([[[total]]], dtype=dtype),
                   numerator)
            sides = [x for x in (exact_lse, top) if x != -math.inf]
            if not sides:
                want_out, want_lse = [0.0, 0.0], -math.inf
            elif any(math.isnan(x) for x in sides):
                want_out, want_lse = [math.nan, math.nan], math.nan
            else:
                base = max(sides)
                w_s = 0.0 if exact_lse == -math.inf else math.exp(exact_lse - base)
                w_u = 0.0 if top == -math.inf else math.exp(top - base)
                d = w_s + w_u * total
                want_out = [(w_s * o + w_u * n) / d for o, n in zip((1.0, -2.0), numerator.flatten().tolist())]
                want_lse = base + math.log(d)
            np.testing.assert_allclose(out.flatten().tolist(), want_out, rtol=1e-6, equal_nan=True,
                                       err_msg=f"{exact_lse=} {top=}")
            np.testing.assert_allclose(lse.item(), want_lse, rtol=1e-6, equal_nan=True, err_msg=f"{exact_lse=} {top=}")


# ------------------------------------------------------------------ the tests can fail
def test_the_growing_maximum_catches_an_unrescaled_denominator():
    """The case above separates a correct kernel from PISA's public one, which adds the approximated
    denominator without rescaling it when the running maximum grows (the same walk with the rescale
    matches the oracle, so the bug alone makes the difference)."""
    mask, q, k, v, scale = _growing_maximum()
    zeroth = approximating(mask, "zeroth")
    ref_out, ref_lse = approximated_attention(q, k, v, zeroth, scale)
    out, lse = _walk(q, k, v, zeroth, scale, tile=3, rescale_denominator=True)
    np.testing.assert_allclose(out, ref_out[0, 0], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(lse, ref_lse[0, 0], rtol=1e-12)
    out, lse = _walk(q, k, v, zeroth, scale, tile=3, rescale_denominator=False)
    assert np.linalg.norm(out - ref_out[0, 0]) / np.linalg.norm(ref_out[0, 0]) > 100 * OUT_REL["float16"]
    assert abs(lse - ref_lse[0, 0]).max() > 1.0


def _walk(q, k, v, mask, scale, tile, rescale_denominator):
    """Head 0: the exact part online, then tiles of zeroth-order approximated blocks (PISA's walk)."""
    mean_key, value_sum, _ = block_terms(k[0, 0], v[0, 0], mask.kv_offsets, "zeroth", None)
    sizes = np.diff(mask.kv_offsets)
    listed = mask.to_dense()[0, 0]
    rows, end = q[0, 0], mask.kv_offsets[1]
    exact = rows @ k[0, 0, :end].T * scale                                  # the one listed block (block 0)
    m = exact.max(axis=1)
    weights = np.exp(exact - m[:, None])
    l_exact, acc = weights.sum(axis=1), weights @ v[0, 0, :end]
    approx_sum = np.zeros(len(rows))
    for start in range(0, len(sizes), tile):
        cols = [j for j in range(start, min(len(sizes), start + tile)) if not listed[j]]
        score = rows @ mean_key[cols].T * scale
        new_m = np.maximum(m, score.max(axis=1))
        alpha = np.exp(m - new_m)
        acc, l_exact, m = acc * alpha[:, None], l_exact * alpha, new_m
        if rescale_denominator:
            approx_sum = approx_sum * alpha
        p = np.exp(score - m[:, None])
        acc = acc + p @ value_sum[cols]
        approx_sum = approx_sum + (p * sizes[cols]).sum(axis=1)
    total = l_exact + approx_sum
    return acc / total[:, None], m + np.log(total)


def test_the_kinds_differ_from_each_other():
    """A lowering that computed another kind than the mask asks for would fail the comparisons above."""
    mask, num_kv_heads, head_dim, _ = NAMED["gqa_4_to_1_short_last_block"]
    q, k, v = _random_inputs(mask, num_kv_heads, head_dim, seed=3)
    kinds = ["drop", "zeroth", "global-first-order", "grouped-first-order:1", "grouped-first-order:2"]
    outs = {kind: approximated_attention(q, k, v, approximating(mask, kind), 0.5)[0] for kind in kinds}
    for a in kinds:
        for b in kinds:
            if a < b:
                diff = np.linalg.norm(outs[a] - outs[b]) / np.linalg.norm(outs[a])
                assert diff > 100 * OUT_REL["float32"], (a, b, diff)


def test_backends_that_do_not_declare_a_kind_refuse_it_by_name():
    mask = NAMED["empty_rows_and_full_head"][0]
    for name, backend in sparsecore.registered_backends().items():
        for kind in APPROXIMATING:
            problems = backend.capabilities.mask_problems(approximating(mask, Unselected(kind, 2)
                                                                        if kind == "grouped-first-order" else kind))
            declared = kind in backend.capabilities.unselected
            assert declared == (not any(p.startswith("unselected:") for p in problems)), (name, kind, problems)
    kernel = sparsecore.compile(mask, device="cpu")
    assert kernel.backend.name == "portable"


def test_a_backend_approximates_only_at_the_head_dims_it_declares():
    """``fa4`` merges Triton's approximation pass (tiles of powers of two) into its exact part: at head dim 96,
    which it takes for drop-only masks, an approximating mask is refused by the capability's name."""
    from sparsecore.backends.cuda.fa4_backend import Fa4Backend
    caps = Fa4Backend.capabilities
    assert 96 in caps.head_dims and caps.unselected_head_dims == frozenset({64, 128})
    assert caps.tensor_problems("bfloat16", 96, 4, 2, True) == []
    (problem,) = caps.tensor_problems("bfloat16", 96, 4, 2, True, approximating=True)
    assert problem.startswith("unselected_head_dims:") and "got 96" in problem
    assert caps.tensor_problems("float16", 128, 4, 2, True, approximating=True) == []


def test_approximation_is_exact_for_rows_that_list_everything_and_alone_for_rows_that_list_nothing():
    rng = np.random.default_rng(8)
    offsets = BlockMask.uniform_offsets(48, 16)
    full = approximating(BlockMask.full(1, 48, 48, 16), "grouped-first-order:2")
    none = _mask(np.zeros((1, 3, 3), dtype=bool), offsets, offsets, "zeroth")
    q, k, v = (rng.standard_normal((1, 1, 48, 8)) for _ in range(3))
    dense_out, _ = approximated_attention(q, k, v, BlockMask.full(1, 48, 48, 16), 0.5)
    got = sparsecore.compile(full, device="reference")(q, k, v, scale=0.5)
    np.testing.assert_allclose(got, dense_out, rtol=1e-12, atol=1e-12)
    k_bar = k[0, 0].reshape(3, 16, 8).mean(axis=1)                   # the zeroth order by hand: blocks as tokens
    weights = np.exp(q[0, 0] @ k_bar.T * 0.5)
    by_hand = weights @ v[0, 0].reshape(3, 16, 8).sum(axis=1) / (16 * weights.sum(axis=1))[:, None]
    got = sparsecore.compile(none, device="reference")(q, k, v, scale=0.5)
    np.testing.assert_allclose(got[0, 0], by_hand, rtol=1e-12, atol=1e-12)


def test_a_row_that_lists_every_block_ignores_sums_that_overflow(target):
    """Rows that approximate nothing are exact even where a listed block's value sum is not finite (64 values of
    1e37 sum past float32's range): a zero weight times that sum made them NaN."""
    if target.dtype not in ("float32", "float64"):
        pytest.skip(f"{target.dtype}: values of 1e37 need float32's range")
    rng = np.random.default_rng(9)
    rows = np.zeros((1, 2, 3), dtype=bool)
    rows[0, 0] = True                                       # row 0 lists every block; row 1 approximates them all
    offsets = np.array([0, 64, 128, 150])
    mask = _mask(rows, np.array([0, 8, 16]), offsets, "grouped-first-order:2")
    q, k = rng.standard_normal((2, 1, 1, 150, 64))
    q = q[:, :, :16]
    v = rng.standard_normal((1, 1, 150, 64))
    v[..., 0], v[..., 1] = 1e37, -1e37
    args, (q64, k64, v64) = target.cast(q, k, v)
    out, lse = sparsecore.compile(mask, device=target.device, backend=target.backend)(*args, return_lse=True)
    got = to_float64(out)
    ref_out, ref_lse = approximated_attention(q64, k64, v64, mask, default_scale(64, None))
    assert np.isfinite(got[0, 0, :8]).all()
    assert_matches(target.dtype, got[:, :, :8], to_float64(lse)[:, :, :8], ref_out[:, :, :8], ref_lse[:, :, :8])


@pytest.mark.parametrize("kind", ["zeroth", "grouped-first-order:1"])
def test_a_row_that_lists_a_block_whose_sums_overflow_and_approximates_others_matches_the_oracle(target, kind):
    """Block 0's 64 values of +-1e37 sum past float32's range; rows that list it and approximate blocks 1 and 2
    (ordinary values) are finite in dense attention and in the oracle. The value sums times block 0's zero weight
    made them NaN (torch and Triton, every kind); the pass now weighs value means. One-block groups: a group matrix
    over block 0 cancels terms of 1e37 (float32 keeps ~1e30 of them), and the row that lists the group drops it."""
    if target.dtype not in ("float32", "float64", "bfloat16"):
        pytest.skip(f"{target.dtype}: values of 1e37 need float32's range (bf16 has it)")
    rng = np.random.default_rng(37)
    rows = np.zeros((1, 2, 3), dtype=bool)
    rows[0, :, 0] = True                                    # both query blocks list block 0 only
    mask = _mask(rows, np.array([0, 8, 16]), np.array([0, 64, 128, 150]), kind)
    problems = target.capabilities.mask_problems(mask) + target.capabilities.tensor_problems(
        target.dtype, 64, 1, 1, True, approximating=True)
    if problems:
        pytest.skip(f"{target.backend} cannot take this case: {'; '.join(problems)}")
    q, k = rng.standard_normal((2, 1, 1, 150, 64))
    q = q[:, :, :16]
    v = rng.standard_normal((1, 1, 150, 64))
    v[..., :64, 0], v[..., :64, 1] = 1e37, -1e37
    args, (q64, k64, v64) = target.cast(q, k, v)
    out, lse = sparsecore.compile(mask, device=target.device, backend=target.backend)(*args, return_lse=True)
    ref_out, ref_lse = approximated_attention(q64, k64, v64, mask, default_scale(64, None))
    assert np.isfinite(ref_out).all() and np.isfinite(to_float64(out)).all()
    assert_matches(target.dtype, to_float64(out), to_float64(lse), ref_out, ref_lse)


@pytest.mark.parametrize("kind", ["zeroth", "global-first-order", "grouped-first-order:2", "grouped-first-order:4"])
@pytest.mark.parametrize("poison", [np.inf, -np.inf])
def test_a_row_that_lists_a_whole_group_ignores_its_non_finite_statistics(target, kind, poison):
    """Issue 16: a key with an infinite component, which every query scores -inf (weight 0: a finite exact part, as
    dense attention gives), makes its group's H_g NaN (k - k̄ = inf - inf). A row that lists every block of that group
    approximates none of them, so the group adds nothing to it and the row is finite. Every implementation (the
    oracle too) multiplied H_g by the group's zero weight, 0 x NaN, and made the row NaN. 4-block groups take the
    interpreted Triton pass's tiles of whole groups, 2-block groups its group-by-group walk. Rows that approximate a
    block of the group may be non-finite; they are not asserted here."""
    rng = np.random.default_rng(16)
    lists = [[[0, 1, 2, 3], [0, 1], [1, 5]], [[0, 1, 2, 3, 4, 5, 6], [], list(range(8))]]
    offsets = BlockMask.uniform_offsets(64, 8)
    mask = approximating(BlockMask.from_lists(lists, BlockMask.uniform_offsets(24, 8), offsets), kind)
    problems = target.capabilities.mask_problems(mask) + target.capabilities.tensor_problems(
        target.dtype, 32, 2, 1, True, approximating=True)
    if problems:
        pytest.skip(f"{target.backend} cannot take this case: {'; '.join(problems)}")
    q, k, v = rng.standard_normal((3, 1, 2, 64, 32))
    q = q[:, :, :24]
    q[..., 0] = -np.sign(poison) * (np.abs(q[..., 0]) + 0.5)     # q·k = -inf at the poisoned key, for every query
    k[0, 0, 9, 0] = poison                                       # token 9: block 1, in group 0 for every kind
    size = {"zeroth": None, "global-first-order": 8}.get(kind, mask.unselected.group_blocks)
    group = [1] if size is None else range(size)                 # zeroth: no group statistic, block 1 alone
    whole = np.zeros((1, 2, 24), dtype=bool)                     # rows that list every block of block 1's group
    for h, rows in enumerate(lists):
        for i, listed in enumerate(rows):
            whole[0, h, 8 * i:8 * (i + 1)] = set(group) <= set(listed)
    args, (q64, k64, v64) = target.cast(q, k, v)
    out, lse = sparsecore.compile(mask, device=target.device, backend=target.backend)(*args, return_lse=True)
    ref_out, ref_lse = approximated_attention(q64, k64, v64, mask, default_scale(32, None))
    assert whole.sum() == 8 * {"zeroth": 5, "global-first-order": 1, "grouped-first-order:2": 4}.get(kind, 3)
    assert np.isfinite(ref_out[whole]).all() and np.isfinite(ref_lse[whole]).all()
    assert_matches(target.dtype, to_float64(out)[whole], to_float64(lse)[whole], ref_out[whole], ref_lse[whole])
