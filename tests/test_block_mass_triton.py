"""The Triton block-mass kernel and the fused first-search pass (AdaSpa on CUDA) against float64 dense attention.

Runs on a GPU, or on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1, as CI
does) inside the Triton backend's emulator; otherwise it skips with the backend's reason.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oracle import dense_attention as oracle_attention
from strategies import offsets
from test_method_adaspa import ANY, mass_float64

import sparsecore
from sparsecore import BlockMask
from sparsecore.backends.cuda import block_mass as triton_block_mass
from sparsecore.backends.cuda import search_attention
from sparsecore.search import block_mass, dense_attention_with_mass


@settings(max_examples=15, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(offsets(ANY, "q"), offsets(ANY, "kv"), st.sampled_from([(1, 1), (4, 2), (2, 1)]), st.sampled_from([16, 32]),
       st.sampled_from(["float32", "float16"]), st.integers(0, 2**32 - 1))
def test_triton_block_mass_matches_float64(triton_device, q_offsets, kv_offsets, heads, head_dim, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads[0], int(q_offsets[-1]), head_dim, generator=gen).to(getattr(torch, dtype))
    k = torch.randn(1, heads[1], int(kv_offsets[-1]), head_dim, generator=gen).to(getattr(torch, dtype))
    want = mass_float64(q, k, q_offsets, kv_offsets)
    lse = torch.logsumexp(q.double() @ k.double().repeat_interleave(heads[0] // heads[1], 1).transpose(-1, -2)
                          * head_dim ** -0.5, dim=-1).float()                 # the fresh LSE, float64 then rounded
    q, k, lse = (x.to(triton_device) for x in (q, k, lse))
    mass = triton_block_mass.run(q, k, q_offsets, kv_offsets, lse, head_dim ** -0.5)
    tolerance = 1e-5 if dtype == "float32" else 2e-3
    got = mass.double().cpu().numpy()
    assert np.linalg.norm(got - want) <= tolerance * np.linalg.norm(want)
    np.testing.assert_allclose(got.sum(axis=3), np.broadcast_to(np.diff(q_offsets), got.shape[:3]), rtol=tolerance)
    older = triton_block_mass.run(q, k, q_offsets, kv_offsets, lse + 0.5, head_dim ** -0.5)   # a stale LSE rescales
    np.testing.assert_allclose(older.double().cpu().numpy(), got * np.exp(-0.5), rtol=tolerance, atol=1e-9)


@settings(max_examples=12, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(1, 330), st.integers(1, 330), st.sampled_from([(1, 1), (4, 2), (2, 1)]), st.integers(1, 2),
       st.sampled_from([16, 32]), st.sampled_from(["float32", "float16"]), st.sampled_from([64, 128]),
       st.integers(0, 2**32 - 1))
def test_uniform_block_kernel_matches_float64(triton_device, q_len, kv_len, heads, batch, head_dim, dtype, block_n,
                                              seed):
    """64-token blocks (AdaSpa's) take the table-free kernel, one or two blocks a key tile, a short last block or
    not; a row whose LSE is not finite adds nothing, and a stale LSE rescales every mass."""
    q_offsets, kv_offsets = (BlockMask.uniform_offsets(n, 64) for n in (q_len, kv_len))
    assert triton_block_mass.uniform_blocks(q_offsets) and triton_block_mass.uniform_blocks(kv_offsets)
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads[0], q_len, head_dim, generator=gen).to(getattr(torch, dtype))
    k = torch.randn(batch, heads[1], kv_len, head_dim, generator=gen).to(getattr(torch, dtype))
    scores = q.double() @ k.double().repeat_interleave(heads[0] // heads[1], 1).transpose(-1, -2) * head_dim ** -0.5
    lse = torch.logsumexp(scores, dim=-1) + 0.25                                   # a stale LSE
    dropped = torch.rand(lse.shape, generator=gen) < 0.1
    infinite = torch.where(torch.rand(lse.shape, generator=gen) < 0.5, float("inf"), float("-inf")).double()
    lse[dropped] = infinite[dropped]
    want = mass_float64(q, k, q_offsets, kv_offsets, np.where(dropped.numpy(), np.inf, lse.numpy()))
    config = triton_block_mass.SegmentedConfig(block_n, 4, 1, use_tma=False)
    mass = triton_block_mass.run(q.to(triton_device), k.to(triton_device), q_offsets, kv_offsets,
                                 lse.float().to(triton_device), head_dim ** -0.5, config=config)
    got = mass.double().cpu().numpy()
    tolerance = 1e-5 if dtype == "float32" else 2e-3
    assert got.shape == want.shape
    assert np.linalg.norm(got - want) <= tolerance * np.linalg.norm(want)
    np.testing.assert_allclose(got, want, rtol=tolerance * 10, atol=1e-6)


@settings(max_examples=15, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(offsets(ANY, "q"), offsets(ANY, "kv"), st.sampled_from([(1, 1), (4, 2)]), st.sampled_from(["triton", "torch"]),
       st.sampled_from(["float32", "float16"]), st.integers(0, 2**32 - 1))
def test_masses_of_a_visible_prefix_match_float64_and_later_blocks_are_zero(triton_device, q_offsets, kv_offsets,
                                                                            heads, impl, dtype, seed):
    """Frame-causal attention: query block i sees its first ``visible[i]`` key blocks (any count, 0 too), under the
    LSE of those keys; the masses of the rest are 0 (the Triton kernel does not walk their tiles), even 64-token
    blocks on both sides, whose kernel without ``visible`` is another."""
    rng = np.random.default_rng(seed)
    if rng.random() < 0.3:
        q_offsets = kv_offsets = BlockMask.uniform_offsets(int(rng.integers(1, 300)), 64)
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads[0], int(q_offsets[-1]), 16, generator=gen).to(getattr(torch, dtype))
    k = torch.randn(1, heads[1], int(kv_offsets[-1]), 16, generator=gen).to(getattr(torch, dtype))
    visible = rng.integers(0, len(kv_offsets), len(q_offsets) - 1)
    row_ends = np.repeat(kv_offsets[visible], np.diff(q_offsets))                     # keys each row sees
    seen = np.arange(kv_offsets[-1])[None, :] < row_ends[:, None]
    scores = q.double() @ k.double().repeat_interleave(heads[0] // heads[1], 1).transpose(-1, -2) * 0.25
    lse = torch.logsumexp(scores.masked_fill(torch.from_numpy(~seen), float("-inf")), dim=-1)
    want = mass_float64(q, k, q_offsets, kv_offsets, lse.numpy(), 0.25)
    want[..., np.arange(len(kv_offsets) - 1)[None, :] >= visible[:, None]] = 0.0
    device = triton_device if impl == "triton" else "cpu"
    found = block_mass(q.to(device), k.to(device), q_offsets, kv_offsets, lse.float().to(device), 0.25,
                       visible=visible, impl=impl)
    got = found.mass.double().cpu().numpy()
    tolerance = 1e-5 if dtype == "float32" else 2e-3
    assert found.impl == impl and got.shape == want.shape
    assert (got[..., np.arange(len(kv_offsets) - 1)[None, :] >= visible[:, None]] == 0).all()
    np.testing.assert_allclose(got, want, rtol=tolerance * 10, atol=1e-6)


def test_a_visible_count_out_of_range_is_refused_naming_the_field():
    q = torch.randn(1, 1, 8, 16)
    offs = np.array([0, 4, 8])
    lse = torch.zeros(1, 1, 8)
    for bad in ([0, 3], [1], [-1, 1], [0.5, 1.0]):
        with pytest.raises(ValueError, match=r"visible: expected None or integers in \[0, 2\] per query block"):
            block_mass(q, q, offs, offs, lse, visible=np.array(bad))
    with pytest.raises(ValueError, match="lse: expected the LSE over the keys each row sees"):
        block_mass(q, q, offs, offs, visible=np.array([1, 2]))


def test_cuda_tensors_dispatch_to_the_triton_kernel():
    if not torch.cuda.is_available():
        pytest.skip("torch.cuda.is_available() is False: dispatch to the CUDA kernel needs CUDA tensors")
    q = torch.randn(1, 2, 256, 64, device="cuda", dtype=torch.bfloat16)
    result = block_mass(q, q, np.array([0, 128, 256]), np.array([0, 64, 256]))
    assert result.impl == "triton"


@pytest.mark.parametrize("heads, q_offsets, kv_offsets", [((2, 2), [0, 64, 128, 130], [0, 64, 128, 130]),
                                                         ((4, 2), [0, 50, 90], [0, 30, 100, 120])])
def test_bf16_under_the_interpreter_takes_the_torch_pass_with_float64_masses(triton_device, heads, q_offsets,
                                                                             kv_offsets):
    """Triton's interpreter multiplies bf16 bit patterns in ``tl.dot`` (triton-lang/triton#11584): the kernel gave
    infinite masses on CPU. Under the interpreter the kernel and the fused pass refuse bf16 and the search takes the
    torch pass, whose masses are the float64 softmax's (the bf16 inputs are exact in float64)."""
    if triton_device != "cpu":
        pytest.skip("a GPU without TRITON_INTERPRET runs bf16 in the kernel (test_cuda_tensors_dispatch_...)")
    gen = torch.Generator().manual_seed(17)
    q_offsets, kv_offsets = np.array(q_offsets), np.array(kv_offsets)
    q = torch.randn(1, heads[0], int(q_offsets[-1]), 32, generator=gen).bfloat16()
    k, v = (torch.randn(1, heads[1], int(kv_offsets[-1]), 32, generator=gen).bfloat16() for _ in range(2))
    reason = triton_block_mass.supports(q, k, q_offsets, kv_offsets)
    assert reason is not None and "bfloat16" in reason and "interpreter" in reason
    assert search_attention.supports(q, k, v, q_offsets, kv_offsets) == reason
    with pytest.raises(ValueError, match="impl='triton' cannot take these inputs: bfloat16 under Triton's CPU"):
        block_mass(q, k, q_offsets, kv_offsets, impl="triton")
    want = mass_float64(q, k, q_offsets, kv_offsets)
    _, fused = dense_attention_with_mass(q, k, v, q_offsets, kv_offsets)
    for found in (block_mass(q, k, q_offsets, kv_offsets), fused):
        assert found.impl == "torch"
        np.testing.assert_allclose(found.mass.double().numpy(), want, rtol=1e-4, atol=1e-6)



# ------------------------------------------------------------------ the first search step in one pass
def dense_float64(q, k, v):
    """Dense attention and natural-log LSE from the float64 oracle (every token pair kept)."""
    tokens = np.ones((q.shape[1], q.shape[2], k.shape[2]), dtype=bool)
    out, lse = oracle_attention(q.double().numpy(), k.double().numpy(), v.double().numpy(), tokens,
                                q.shape[-1] ** -0.5)
    return torch.from_numpy(out), torch.from_numpy(lse)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(offsets(ANY, "q"), offsets(ANY, "kv"), st.sampled_from([(1, 1), (4, 2), (3, 1)]), st.integers(1, 2),
       st.sampled_from([16, 32]), st.sampled_from(["float32", "float16"]), st.sampled_from([1, 2]),
       st.booleans(), st.sampled_from([1.0, -1.0]), st.integers(0, 2**32 - 1))
def test_fused_search_pass_matches_float64(triton_device, q_offsets, kv_offsets, heads, batch, head_dim, dtype, pieces,
                                           one_head_chunks, sign, seed):
    config = search_attention.SearchConfig(32, pieces, 4, 1, use_tma=False)
    one_head = batch * search_attention.piece_layout(kv_offsets, pieces).num_pieces * int(q_offsets[-1]) * 4
    scratch = one_head if one_head_chunks else search_attention.SCRATCH_BYTES    # one head's partial sums per launch
    assert_fused_pass_matches_float64(triton_device, q_offsets, kv_offsets, heads, batch, head_dim, dtype, sign, seed,
                                      config, scratch)


def test_the_passes_keep_no_upload_between_calls(triton_device):
    """The block-mass passes (Triton's for blocks of several sizes, torch's) and the fused search copy their small
    host arrays at each call: nothing stays in the process-wide upload cache (on a GPU it stayed allocated after a
    method's removal: 49,664 bytes for AdaSpa on HunyuanVideo 1.5)."""
    from sparsecore.ir import uploads
    uploads._UPLOADS.clear()
    q_offsets, kv_offsets = np.array([0, 16, 40, 48]), np.array([0, 32, 40, 72])
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, int(o[-1]), 16, generator=gen) for o in (q_offsets, kv_offsets, kv_offsets))
    lse = torch.logsumexp(q @ k.transpose(-1, -2) * 0.25, dim=-1)
    triton_block_mass.run(*(x.to(triton_device) for x in (q, k)), q_offsets, kv_offsets, lse.to(triton_device), 0.25)
    search_attention.run(*(x.to(triton_device) for x in (q, k, v)), q_offsets, kv_offsets, 0.25,
                         config=search_attention.SearchConfig(32, 1, 4, 1, use_tma=False))
    block_mass(q, k, q_offsets, kv_offsets, lse, 0.25, impl="torch")
    assert len(uploads._UPLOADS) == 0


def assert_fused_pass_matches_float64(device, q_offsets, kv_offsets, heads, batch, head_dim, dtype, sign, seed, config,
                                      scratch):
    """Random q, k, v; the fused pass's output, LSE and masses against float64, every row's mass counted once."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads[0], int(q_offsets[-1]), head_dim, generator=gen).to(getattr(torch, dtype))
    k, v = (torch.randn(batch, heads[1], int(kv_offsets[-1]), head_dim, generator=gen).to(getattr(torch, dtype))
            for _ in range(2))
    out, lse, mass = search_attention.run(*(x.to(device) for x in (q, k, v)), q_offsets, kv_offsets,
                                          sign * head_dim ** -0.5, config=config, scratch_bytes=scratch)
    want_out, want_lse = dense_float64(sign * q, k, v)                  # a negative scale: the scores of -q
    want_mass = mass_float64(sign * q, k, q_offsets, kv_offsets)
    got_mass = mass.double().cpu().numpy()
    tolerance = 1e-5 if dtype == "float32" else 2e-3
    assert np.linalg.norm(got_mass - want_mass) <= tolerance * np.linalg.norm(want_mass)
    np.testing.assert_allclose(got_mass.sum(axis=3), np.broadcast_to(np.diff(q_offsets), got_mass.shape[:3]),
                               rtol=tolerance)                       # every row counted once: row sums = block sizes
    assert (lse.double().cpu() - want_lse).abs().max() <= 1e-4
    assert (out.double().cpu() - want_out).norm() <= tolerance * want_out.norm()


@given(offsets(ANY, "kv"), st.sampled_from([1, 2, 3]))
def test_piece_layout_covers_every_key_once_inside_its_block(kv_offsets, pieces):
    layout = search_attention.piece_layout(kv_offsets, pieces)
    start, block_end, block = triton_block_mass.cut_blocks(kv_offsets, 64)
    end = np.minimum(start + 64, block_end)
    assert (start[1:] == end[:-1]).all() and start[0] == 0 and end[-1] == kv_offsets[-1]
    covered = np.zeros(len(start), dtype=int)
    for first, piece in zip(layout.full_start, layout.full_piece):              # full tiles: full pieces in a row
        run = np.arange(piece, piece + pieces)
        assert (end[run] - start[run] == 64).all() and start[piece] == first
        assert (start[run[1:]] == end[run[:-1]]).all()
        covered[run] += 1
    covered[layout.solo_piece] += 1
    np.testing.assert_array_equal(covered, 1)
    np.testing.assert_array_equal(start[layout.solo_piece], layout.solo_start)
    np.testing.assert_array_equal(end[layout.solo_piece], layout.solo_end)
    np.testing.assert_array_equal(layout.piece_block, block)
    assert (kv_offsets[block] <= start).all() and (end <= kv_offsets[block + 1]).all()


def test_dense_attention_with_mass_takes_the_fused_pass_or_two_passes(triton_device):
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 150, 16, generator=gen).half().to(triton_device) for _ in range(3))
    q_offsets, kv_offsets = np.array([0, 64, 128, 150]), np.array([0, 100, 150])
    out, fused = dense_attention_with_mass(q, k, v, q_offsets, kv_offsets)
    _, two_pass = dense_attention_with_mass(q, k, v, q_offsets, kv_offsets, impl="torch")
    assert fused.impl == "triton fused" and two_pass.impl == "torch"
    want = mass_float64(q.cpu(), k.cpu(), q_offsets, kv_offsets)
    for found in (fused, two_pass):
        got = found.mass.double().cpu().numpy()
        assert np.linalg.norm(got - want) <= 2e-3 * np.linalg.norm(want)
    want_out, _ = dense_float64(q.cpu(), k.cpu(), v.cpu())
    assert (out.double().cpu() - want_out).norm() <= 2e-3 * want_out.norm()
    uniform = BlockMask.uniform_offsets(150, 64)          # 64-token blocks: dense pass, then the segmented kernel
    out, found = dense_attention_with_mass(q, k, v, uniform, uniform)
    assert found.impl == "triton"
    want = mass_float64(q.cpu(), k.cpu(), uniform, uniform)
    assert np.linalg.norm(found.mass.double().cpu().numpy() - want) <= 2e-3 * np.linalg.norm(want)
    assert (out.double().cpu() - want_out).norm() <= 2e-3 * want_out.norm()


def test_fused_search_pass_splits_full_tiles_into_their_two_blocks(triton_device):
    q_offsets, kv_offsets = np.array([0, 64, 128, 200]), np.array([0, 64, 128, 192, 256, 300])
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 2, 200 if i == 0 else 300, 16, generator=gen) for i in range(3))
    layout = search_attention.piece_layout(kv_offsets, 2)
    assert list(layout.full_start) == [0, 128]                     # two full 128-key tiles, one solo piece
    config = search_attention.SearchConfig(32, 2, 4, 1, use_tma=False)
    _, _, mass = search_attention.run(*(x.to(triton_device) for x in (q, k, v)), q_offsets, kv_offsets, 0.25,
                                      config=config)
    want = mass_float64(q * (0.25 * 16 ** 0.5), k, q_offsets, kv_offsets)          # scale 0.25 through q
    np.testing.assert_allclose(mass.double().cpu().numpy(), want, rtol=1e-5, atol=1e-9)


def test_the_fused_pass_takes_lengths_whose_partial_sums_exceed_the_scratch_limit(triton_device):
    q = torch.zeros(1, 1, 1, 16, dtype=torch.float16, device=triton_device).expand(1, 1, 1 << 19, 16)   # no memory
    offsets = np.array([0, 1 << 19])
    assert search_attention.supports(q, q, q, offsets, offsets) is None      # a head's partial sums: 16 GiB
    pieces = search_attention.piece_layout(offsets, 2).num_pieces
    assert search_attention.scratch_chunks(1, 1, pieces, 1 << 19, 128, search_attention.SCRATCH_BYTES) == (1, 1 << 15)


@st.composite
def rows_cut_inside_tiles(draw, tile):
    """Query block offsets of arbitrary lengths over several ``tile``-row tiles, no edge on a tile's edge."""
    length = draw(st.integers(4 * tile + 1, 7 * tile + 20))     # over two tiles and their slack
    cuts = draw(st.lists(st.integers(1, length - 1).filter(lambda c: c % tile != 0), max_size=12, unique=True))
    return np.array([0, *sorted(cuts), length], dtype=np.int64)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows_cut_inside_tiles(32), offsets(ANY, "kv"), st.sampled_from([(2, 1), (4, 2), (3, 1)]),
       st.sampled_from(["float32", "float16"]), st.sampled_from([1, 2]), st.integers(1, 2), st.integers(0, 1000),
       st.sampled_from([1.0, -1.0]), st.integers(0, 2**32 - 1))
def test_fused_search_pass_in_row_chunks_matches_float64(triton_device, q_offsets, kv_offsets, heads, dtype, pieces,
                                                         tiles, slack, sign, seed):
    """Row chunks of one or two 32-row tiles, whose edges cut query blocks and reduce programs."""
    batch, head_dim, block_m = 2, 16, 32
    config = search_attention.SearchConfig(block_m, pieces, 4, 1, use_tma=False)
    num_pieces = search_attention.piece_layout(kv_offsets, pieces).num_pieces
    scratch = tiles * batch * num_pieces * block_m * 4 + slack % (batch * num_pieces * block_m * 4)   # a few KB
    q_len = int(q_offsets[-1])
    head_chunk, row_chunk = search_attention.scratch_chunks(batch, heads[0], num_pieces, q_len, block_m, scratch)
    assert head_chunk == 1 and row_chunk in (block_m, 2 * block_m) and row_chunk < q_len
    assert_fused_pass_matches_float64(triton_device, q_offsets, kv_offsets, heads, batch, head_dim, dtype, sign, seed,
                                      config, scratch)


@given(st.integers(1, 4), st.integers(1, 48), st.integers(1, 5000), st.integers(1, 300_000),
       st.sampled_from([16, 32, 64, 128]), st.one_of(st.integers(1, 1 << 20), st.integers(1, 1 << 36)))
def test_scratch_chunks_keep_the_partial_sums_within_the_limit(batch, heads, num_pieces, q_len, block_m, scratch):
    head_chunk, row_chunk = search_attention.scratch_chunks(batch, heads, num_pieces, q_len, block_m, scratch)
    per_row = batch * num_pieces * 4                                    # bytes of one row of one head
    assert batch * head_chunk * num_pieces * row_chunk * 4 <= max(scratch, per_row * block_m)   # partial's bytes
    assert 1 <= head_chunk <= heads and 1 <= row_chunk <= q_len
    if per_row * q_len <= scratch:                                      # whole heads, as many as fit
        assert row_chunk == q_len and head_chunk == min(heads, scratch // (per_row * q_len))
    else:                                                               # one head, rows in whole tiles
        assert head_chunk == 1 and (row_chunk % block_m == 0 or row_chunk == q_len < block_m)
        most_rows = max(1, scratch // (per_row * block_m)) * block_m
        assert -(-q_len // row_chunk) == -(-q_len // most_rows)         # as few row chunks as fit


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_a_nan_lse_row_gives_nan_masses_not_zero(triton_device, impl):
    """A NaN LSE row (non-finite activations in the dense pass that made it) must reach the masses, where AdaSpa's
    finite check refuses them; only infinite LSE rows add nothing. Both passes had zeroed NaN rows as well."""
    q_offsets, kv_offsets = np.array([0, 40, 100]), np.array([0, 64, 128, 150])
    gen = torch.Generator().manual_seed(12)
    q, k = (torch.randn(1, 2, n, 16, generator=gen) for n in (100, 150))
    lse = torch.logsumexp((q @ k.transpose(-1, -2)) * 0.25, dim=-1)
    lse[0, 1, 50] = float("nan")                                           # head 1, query block 1
    lse[0, 0, 3] = float("inf")                                            # adds nothing, as documented
    device = triton_device if impl == "triton" else "cpu"
    mass = block_mass(*(x.to(device) for x in (q, k)), q_offsets, kv_offsets, lse.to(device), 0.25, impl=impl).mass
    assert mass[0, 1, 1].isnan().all() and torch.isfinite(mass[0, 1, 0]).all() and torch.isfinite(mass[0, 0]).all()


def test_the_fused_pass_keeps_nan_inputs_visible_in_the_masses(triton_device):
    """A NaN key makes its rows' LSE NaN; the fused pass had turned them into rows that add nothing (masses 0 where
    the key's block is, a finite plan from NaN attention)."""
    q_offsets, kv_offsets = np.array([0, 64, 128, 200]), np.array([0, 64, 128, 192, 256, 300])
    gen = torch.Generator().manual_seed(13)
    q, k, v = (torch.randn(1, 2, 200 if i == 0 else 300, 16, generator=gen) for i in range(3))
    k[0, 1, 70] = float("nan")
    config = search_attention.SearchConfig(32, 2, 4, 1, use_tma=False)
    out, lse, mass = search_attention.run(*(x.to(triton_device) for x in (q, k, v)), q_offsets, kv_offsets, 0.25,
                                          config=config)
    assert lse[0, 1].isnan().all() and mass[0, 1].isnan().all()
    assert torch.isfinite(lse[0, 0]).all() and torch.isfinite(mass[0, 0]).all()       # the other head is intact


def test_infinite_lse_rows_add_nothing_on_both_passes_even_with_large_scores(triton_device):
    """torch's pass had computed ``exp(scores - 0) * 0`` for such rows: ``inf * 0 = NaN`` once a score passes 88."""
    q_offsets, kv_offsets = np.array([0, 40, 100]), np.array([0, 64, 128, 150])
    gen = torch.Generator().manual_seed(14)
    q, k = (torch.randn(1, 2, n, 16, generator=gen) for n in (100, 150))
    q[0, 0, 7] *= 100.0                                                    # scores far above 88
    lse = torch.logsumexp((q @ k.transpose(-1, -2)) * 0.25, dim=-1)
    lse[0, 0, 7] = float("-inf")
    masses = [block_mass(*(x.to(device) for x in (q, k)), q_offsets, kv_offsets, lse.to(device), 0.25, impl=impl)
              .mass.cpu() for impl, device in (("torch", "cpu"), ("triton", triton_device))]
    assert all(torch.isfinite(m).all() for m in masses)
    torch.testing.assert_close(masses[0], masses[1], rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available: Triton's interpreter keeps NaN in "
                                                          "tl.maximum, so only the GPU's max.f32 can drop it")
def test_a_nan_key_in_the_second_block_of_a_128_key_tile_reaches_its_mass_on_the_gpu():
    """The 128-key tile's second block is the row sum less the first block's: clamped at 0 with ``tl.maximum``, a
    NaN there became 0 on the GPU (max.f32 returns the non-NaN operand), and the planner kept planning."""
    q_offsets = kv_offsets = BlockMask.uniform_offsets(256, 64)
    gen = torch.Generator().manual_seed(15)
    q, k = (torch.randn(1, 2, 256, 64, generator=gen).half() for _ in range(2))
    lse = torch.logsumexp((q.float() @ k.float().transpose(-1, -2)) * 0.125, dim=-1)     # finite: from clean keys
    k[0, 1, 100] = float("nan")                                                         # key block 1, head 1
    config = triton_block_mass.SegmentedConfig(128, 4, 1, use_tma=False)
    mass = triton_block_mass.run(q.cuda(), k.cuda(), q_offsets, kv_offsets, lse.cuda(), 0.125, config=config).cpu()
    assert mass[0, 1, :, 1].isnan().all() and torch.isfinite(mass[0, 0]).all()


def test_a_backward_through_the_kernels_masses_raises(triton_device):
    """The kernel records no gradient: a loss with its masses must not backpropagate silently without them."""
    gen = torch.Generator().manual_seed(8)
    q, k = (torch.randn(1, 2, 130, 16, generator=gen).to(triton_device).requires_grad_() for _ in range(2))
    offsets = np.array([0, 64, 130])
    found = block_mass(q, k, offsets, offsets, impl="triton")
    assert found.impl == "triton" and found.mass.requires_grad
    with pytest.raises(RuntimeError, match="triton's block-mass pass"):
        (found.mass.sum() + (q ** 2).sum()).backward()
    lse = found.lse.detach().requires_grad_()                       # a cached LSE that wants gradients
    found = block_mass(q.detach(), k.detach(), offsets, offsets, lse=lse, impl="triton")
    with pytest.raises(RuntimeError, match="triton's block-mass pass"):
        (found.mass.sum() + lse.sum()).backward()


@pytest.mark.parametrize("bad, error", [(0, ValueError), (-5, ValueError), (2.5, TypeError), (True, TypeError),
                                        ("4", TypeError)])
def test_block_mass_names_a_bad_max_elements(bad, error):
    q = torch.randn(1, 1, 8, 8)
    with pytest.raises(error, match="max_elements"):
        block_mass(q, q, np.array([0, 8]), np.array([0, 8]), max_elements=bad)


@pytest.mark.parametrize("q_offsets, kv_offsets", [([0, 20, 40], [0, 30, 100]), ([0, 40], [0, 64, 100])],
                         ids=["table kernel", "segmented kernel"])
def test_a_key_of_minus_infinite_scores_gives_finite_masses_in_padded_tiles(triton_device, q_offsets, kv_offsets):
    """Keys whose every score is -inf have weight 0; a tile's padded query rows (loaded as 0) made 0 x inf = NaN and
    spread it into the whole block's mass, in both kernels (query blocks off 64 rows, a short last one)."""
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(1, 1, 40, 16, generator=gen)
    q[..., 0] = 1.0
    k = torch.randn(1, 1, 100, 16, generator=gen)
    k[0, 0, 60:, 0] = float("-inf")                                       # scores -inf for every query
    scores = q.double() @ k.double().transpose(-1, -2) * 0.25
    lse = torch.logsumexp(scores, -1)
    probs = torch.exp(scores - lse[..., None]).numpy()
    want = np.add.reduceat(np.add.reduceat(probs, q_offsets[:-1], 2), kv_offsets[:-1], 3)
    found = block_mass(q.to(triton_device), k.to(triton_device), np.asarray(q_offsets), np.asarray(kv_offsets),
                       lse.float().to(triton_device), 0.25, impl="triton")
    np.testing.assert_allclose(found.mass.cpu().double().numpy(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pieces", [1, 2])
def test_the_fused_pass_gives_keys_of_minus_infinite_scores_walked_first_weight_zero(triton_device, pieces):
    """The first key tile's every score is -inf for every query (a -inf component where q's is positive): dense
    attention gives those keys weight 0 and a finite output, LSE and masses. The fused pass's running maximum stayed
    -inf over that tile and exp2(-inf - -inf) made every row NaN, so AdaSpa's search refused the step."""
    gen = torch.Generator().manual_seed(7)
    q_offsets, kv_offsets = np.array([0, 32, 64]), np.array([0, 64, 128, 192])
    q = torch.randn(1, 1, 64, 16, generator=gen)
    q[..., 0] = q[..., 0].abs() + 0.5
    k, v = (torch.randn(1, 1, 192, 16, generator=gen) for _ in range(2))
    k[0, 0, :128, 0] = float("-inf")                             # the first tile (64 or 128 keys) scores -inf
    config = search_attention.SearchConfig(32, pieces, 4, 1, use_tma=False)
    out, lse, mass = search_attention.run(*(x.to(triton_device) for x in (q, k, v)), q_offsets, kv_offsets,
                                          16 ** -0.5, config=config)
    want_out, want_lse = dense_float64(q, k, v)
    assert torch.isfinite(want_out).all()
    np.testing.assert_allclose(out.double().cpu().numpy(), want_out.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(lse.double().cpu().numpy(), want_lse.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mass.double().cpu().numpy(), mass_float64(q, k, q_offsets, kv_offsets), atol=1e-5)
