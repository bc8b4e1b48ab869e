"""The Triton approximation's parts against float64: its block statistics kernel and its split-operand pass.

Runs on a GPU, or on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1, as CI
does) inside the Triton backend's emulator; otherwise it skips with the backend's reason.
The whole lowering is held to the oracle in ``test_unselected_match_oracle.py``; here the
statistics are checked term by term (ragged blocks, groups cut into several programs), and
the bf16 operand path (means as hi + lo, value means and group matrices in 16 bits) is run on
CPU with fp16 operands, since the interpreter's bf16 products are wrong.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oracle_unselected import approximated_attention, block_terms
from strategies import offsets
from test_method_adaspa import ANY
from tolerances import OUT_REL

import sparsecore
from sparsecore import BlockMask
from sparsecore.backends.cuda import approximation_launch, shared_memory
from sparsecore.ir import Unselected

KINDS = ["zeroth", "global-first-order", "grouped-first-order:1", "grouped-first-order:3", "grouped-first-order:4",
         "grouped-first-order:8"]


@pytest.fixture(autouse=True)
def fresh_fitting(monkeypatch):
    """Each test decides the pass's tiles anew (the decision is kept per process), on a pretend SM90 device where
    there is no GPU (the tests that fake a CUDA compile)."""
    monkeypatch.setattr(approximation_launch, "_FITTING", {})
    if not torch.cuda.is_available():
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))


def _mask(q_offsets, kv_offsets, heads: int, kind: str, seed: int) -> BlockMask:
    rng = np.random.default_rng(seed)
    dense = rng.random((heads, len(q_offsets) - 1, len(kv_offsets) - 1)) < 0.4
    rows = [[np.nonzero(dense[h, i])[0] for i in range(dense.shape[1])] for h in range(heads)]
    mask = BlockMask.from_lists(rows, np.asarray(q_offsets), np.asarray(kv_offsets))
    return BlockMask(mask.num_heads, mask.q_offsets, mask.kv_offsets, mask.indptr, mask.indices,
                     unselected=Unselected.parse(kind))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(offsets(ANY, "kv"), st.sampled_from(KINDS), st.sampled_from([1, 5, 2048]), st.integers(0, 2**32 - 1))
def test_block_statistics_match_the_token_level_terms(triton_device, monkeypatch, kv_offsets, kind, piece_tokens, seed):
    """k̄_j, ΣV_j and Ĥ_j / |B_j| = H_g / T_g from the kernel, in float32, equal the float64 terms; a group
    split over several programs (small ``piece_tokens``) sums to the same matrix. Ĥ_j's absolute bound follows the
    size of the products it sums, not of Ĥ_j: groups of one-token blocks have Ĥ_j = 0 exactly, which float32 on
    CUDA gives to about 1e-8 (H200, 2026-12-05)."""
    monkeypatch.setattr(approximation_launch, "PIECE_TOKENS", piece_tokens)
    mask = _mask([0, int(kv_offsets[-1])], kv_offsets, 2, kind, seed)
    gen = torch.Generator().manual_seed(seed)
    k, v = (torch.randn(2, 2, int(kv_offsets[-1]), 16, generator=gen) + 0.5 for _ in range(2))
    launch = approximation_launch.ApproximationLaunch(mask)
    stats = launch.statistics(k.to(triton_device), v.to(triton_device), launch.plan(torch.device(triton_device)))
    sizes = np.diff(kv_offsets)
    for b in range(2):
        for h in range(2):
            mean_key, value_sum, h_hat = block_terms(k[b, h].double().numpy(), v[b, h].double().numpy(),
                                                     np.asarray(kv_offsets), mask.unselected.kind,
                                                     mask.unselected.group_blocks)
            np.testing.assert_allclose(stats.means_high[b, h].cpu().double().numpy(), mean_key, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(sizes[:, None] * stats.value_means[b, h].cpu().double().numpy(), value_sum,
                                       rtol=1e-5, atol=1e-4)
            if mask.unselected.kind != "zeroth":
                group = np.arange(mask.num_kv_blocks) // launch.group_blocks
                got = sizes[:, None, None] * stats.group_matrices[b, h].cpu().double().numpy()[group]
                products = sizes.max() * float(k[b, h].abs().max() * v[b, h].abs().max())   # a centred sum's terms
                np.testing.assert_allclose(got, h_hat, rtol=1e-4, atol=1e-6 * products)      # (0 for one-token blocks)


@pytest.mark.parametrize("kind", KINDS)
def test_split_operands_match_the_oracle(triton_device, kind):
    """The 16-bit means of fp16 inputs (bf16's path takes the same split). Keys share a large mean (as DiT keys
    do), so a mean rounded to 16 bits shifts every approximated score: unsplit, this case is 1.9e-3 to 2.2e-3
    from the oracle (fp16 inputs' bound is 3e-3); split into hi + lo it is 3e-4, the fp16 rounding of the exact
    part."""
    assert approximation_launch.MEANS[torch.float16] == torch.float16          # the path this test runs
    q_offsets, kv_offsets = [0, 17, 64, 100], [0, 7, 40, 41, 64, 90, 128]
    mask = _mask(q_offsets, kv_offsets, 4, kind, seed=3)
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 100, 32, generator=gen).half()
    k = (torch.randn(1, 2, 128, 32, generator=gen) + 40.0).half()      # a common offset, as DiT keys have
    v = torch.randn(1, 2, 128, 32, generator=gen).half()
    kernel = sparsecore.compile(mask, device="cuda", backend="triton")
    out, lse = kernel(q.to(triton_device), k.to(triton_device), v.to(triton_device), scale=0.5, return_lse=True)
    ref_out, ref_lse = approximated_attention(q.double().numpy(), k.double().numpy(), v.double().numpy(), mask, 0.5)
    error = np.linalg.norm(out.cpu().double().numpy() - ref_out) / np.linalg.norm(ref_out)
    assert error <= OUT_REL["float16"] / 3, error
    np.testing.assert_allclose(lse.cpu().double().numpy(), ref_lse, atol=2e-3 * max(1.0, np.abs(ref_lse).max()))


@pytest.mark.parametrize("kind", ["zeroth", "grouped-first-order:2"])
@pytest.mark.parametrize("listed", [True, False])
def test_a_nan_key_makes_the_rows_it_reaches_nan_in_output_and_lse(triton_device, kind, listed):
    """A NaN key in a block a row lists (an exact NaN score) or approximates (a NaN block mean) makes that row's
    output and LSE NaN, as the float64 oracle's (every row of an approximating mask reaches every block). The exact
    kernel's LSE was -inf there ("no keys"), and the pass then dropped the exact part's NaN for a finite value."""
    mask = _mask([0, 64, 128], [0, 64, 128], 1, kind, seed=0)
    mask = BlockMask(1, mask.q_offsets, mask.kv_offsets, np.array([[0, 1, 2]]), np.array([0, 1], np.int32),
                     unselected=mask.unselected)                          # row 0 lists block 0, row 1 block 1
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 128, 16, generator=gen) for _ in range(3))
    k[0, 0, 10 if listed else 70] = float("nan")                          # in block 0 (listed by row 0) or block 1
    kernel = sparsecore.compile(mask, device="cuda", backend="triton")
    out, lse = kernel(*(t.to(triton_device) for t in (q, k, v)), return_lse=True)
    ref_out, ref_lse = approximated_attention(q.double().numpy(), k.double().numpy(), v.double().numpy(), mask,
                                              16 ** -0.5)
    out, lse = out.cpu().double().numpy(), lse.cpu().double().numpy()
    assert np.array_equal(np.isnan(lse), np.isnan(ref_lse)) and np.isnan(ref_lse).any()
    assert np.array_equal(np.isnan(out).any(-1), np.isnan(ref_out).any(-1))


@pytest.mark.parametrize("group, needed, chosen", [
    (8, {(3, 4): 500_736, (2, 4): 344_576, (1, 4): 65_536}, (1, 4)),        # bf16, head dim 128 (H200 figures)
    (32, {(3, 1): 394_240, (2, 1): 295_424, (1, 1): 196_608}, (1, 1)),       # fp16's float32 matrices, PASA's groups
    (32, {(3, 1): 394_240, (2, 1): 300_000, (1, 1): 240_000, (3, 0): 263_168, (2, 0): 229_888}, (2, 0)),  # made up:
                                                                             # the group walk once no whole-group tile fits
])
def test_the_pass_takes_the_first_tiles_that_fit_shared_memory(monkeypatch, group, needed, chosen):
    """On a GPU the pass compiles each candidate (no launch) and takes the first whose shared memory fits: fewer
    pipeline stages first, then the group-by-group walk; the figures are Triton's for sm90 (232,448 bytes)."""
    calls = []

    class Compiled:
        def __init__(self, stages, groups):
            self.metadata = type("Metadata", (), {"shared": needed.get((stages, groups), 10**6)})

    class Pass:
        @staticmethod
        def warmup(*args, grid, num_stages, GROUPS_PER_TILE, **params):
            calls.append((num_stages, GROUPS_PER_TILE))
            return Compiled(num_stages, GROUPS_PER_TILE)

    monkeypatch.setattr(approximation_launch, "approximate_unselected_fwd", Pass)
    monkeypatch.setattr(shared_memory, "shared_memory_limit", lambda: 232_448)
    offsets = BlockMask.uniform_offsets(40 * 4, 4)
    launch = approximation_launch.ApproximationLaunch(_mask([0, 32], offsets, 2, f"grouped-first-order:{group}", 0))
    monkeypatch.setattr(approximation_launch.interpreter, "interpreting", lambda: False)
    q = torch.empty(0, dtype=torch.float16)
    params = launch.fitting((q,), (1, 2, 1), {"HEAD_DIM": 128}, torch.device("cuda", 0))
    assert (params["num_stages"], params["GROUPS_PER_TILE"]) == chosen == calls[-1]
    assert params["WORD_TILES"]            # 32-block tiles that start at multiples of 32 (whole 8- or 32-block groups)
    compiled = len(calls)                  # decided once: the next call, and another mask's alike, compile nothing
    other = approximation_launch.ApproximationLaunch(_mask([0, 16], offsets, 2, f"grouped-first-order:{group}", 1))
    assert launch.fitting((q,), (1, 2, 1), {"HEAD_DIM": 128}, torch.device("cuda", 0)) == params
    assert other.fitting((q,), (1, 2, 1), {"HEAD_DIM": 128}, torch.device("cuda", 0)) == params
    assert len(calls) == compiled
    launch.fitting((q,), (1, 2, 1), {"HEAD_DIM": 64}, torch.device("cuda", 0))        # other constants: decided anew
    assert len(calls) > compiled


@pytest.mark.parametrize("kind, warps", [("zeroth", 4), ("global-first-order", 8), ("grouped-first-order:32", 8)])
def test_the_pass_runs_4_warps_on_cuda_only_without_first_order_products(kind, warps):
    """The zeroth kind has no ``q H_g`` product and ran faster at 4 warps on the H200; the first-order kinds keep 8
    (the grouped one spills at 4). A configuration given by the caller and the CPU interpreter's are kept."""
    launch = approximation_launch.ApproximationLaunch(_mask([0, 32], BlockMask.uniform_offsets(64, 8), 2, kind, 0))
    assert launch.config_for(torch.device("cuda", 0)).num_warps == warps
    assert launch.config_for(torch.device("cpu")) == approximation_launch.INTERPRETER_CONFIG
    given = approximation_launch.ApproximationConfig(64, 32, 2, 1)
    assert approximation_launch.ApproximationLaunch(launch.mask, given).config_for(torch.device("cuda", 0)) is given


def test_float32_takes_the_group_walk_on_cuda_without_compiling_whole_group_tiles(monkeypatch):
    """IEEE float32 tiles of whole groups compile for a minute at head dim 128 (and do not fit at 2-3 stages):
    float32 inputs on CUDA at head dim 128 go straight to the group-by-group walk."""
    calls = []

    class Pass:
        @staticmethod
        def warmup(*args, grid, num_stages, GROUPS_PER_TILE, **params):
            calls.append((num_stages, GROUPS_PER_TILE))
            return type("Compiled", (), {"metadata": type("Metadata", (), {"shared": 148_992})})

    monkeypatch.setattr(approximation_launch, "approximate_unselected_fwd", Pass)
    monkeypatch.setattr(shared_memory, "shared_memory_limit", lambda: 232_448)
    monkeypatch.setattr(approximation_launch.interpreter, "interpreting", lambda: False)
    launch = approximation_launch.ApproximationLaunch(_mask([0, 32], BlockMask.uniform_offsets(160, 4), 2,
                                                            "grouped-first-order:8", 0))
    q = torch.empty(0, dtype=torch.float32)
    params = launch.fitting((q,), (1, 2, 1), {"HEAD_DIM": 128, "DOT_PRECISION": "ieee"}, torch.device("cuda", 0))
    assert calls == [(3, 0)] and (params["num_stages"], params["GROUPS_PER_TILE"]) == (3, 0)
    calls.clear()                                       # 16-bit inputs keep whole-group tiles first
    launch.fitting((q,), (1, 2, 1), {"HEAD_DIM": 128, "DOT_PRECISION": "tf32"}, torch.device("cuda", 0))
    assert calls == [(3, 4)]
    calls.clear()                                       # and float32 at head dim 64 (5.7 s to compile, 215 KB: fits)
    launch.fitting((q,), (1, 2, 1), {"HEAD_DIM": 64, "DOT_PRECISION": "ieee"}, torch.device("cuda", 0))
    assert calls == [(3, 4)]


def test_a_pass_that_fits_nowhere_says_what_it_needed(monkeypatch):
    class Pass:
        @staticmethod
        def warmup(*args, grid, **params):
            return type("Compiled", (), {"metadata": type("Metadata", (), {"shared": 300_000})})

    monkeypatch.setattr(approximation_launch, "approximate_unselected_fwd", Pass)
    monkeypatch.setattr(shared_memory, "shared_memory_limit", lambda: 99_000)
    launch = approximation_launch.ApproximationLaunch(_mask([0, 32], BlockMask.uniform_offsets(160, 4), 2,
                                                            "grouped-first-order:8", 0))
    monkeypatch.setattr(approximation_launch.interpreter, "interpreting", lambda: False)
    q = torch.empty(0, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"grouped-first-order, torch.bfloat16, head dim 128\): no tile configuration "
                                           r"fits .*\(99000 bytes: .*1 stage\(s\), 0 group\(s\) a tile: 300000 bytes"
                                           r".*approximation 'drop'"):
        launch.fitting((q,), (1, 2, 1), {"HEAD_DIM": 128}, torch.device("cuda", 0))


def test_the_pass_is_not_checked_where_triton_interprets(monkeypatch):
    """Under Triton's interpreter (warmup gives no compiled kernel) the configured tiles run, nothing compiled."""
    class Pass:
        @staticmethod
        def warmup(*args, grid, **params):
            raise AssertionError("no compile under the interpreter")

    monkeypatch.setattr(approximation_launch, "approximate_unselected_fwd", Pass)
    monkeypatch.setattr(approximation_launch.interpreter, "interpreting", lambda: True)
    launch = approximation_launch.ApproximationLaunch(_mask([0, 32], BlockMask.uniform_offsets(160, 4), 2,
                                                            "grouped-first-order:8", 0))
    params = launch.fitting((torch.empty(0),), (1, 2, 1), {"HEAD_DIM": 128}, torch.device("cuda", 0))
    assert (params["num_stages"], params["GROUPS_PER_TILE"]) == (3, 4)
