"""The npu lowering on CPU: import hygiene, availability messages, routes, call arguments, the LSE merge.

Numbers are checked against the float64 oracle under the emulator
(``sparsecore.backends.npu.emulate``); the generated-mask property suite covers the
same lowering in ``test_backends_match_oracle.py`` (target ``npu-npu-*-emulated``).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import subprocess
import sys
import textwrap
import types
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from checks import assert_matches
from npu_cases import PATH_CASES
from oracle import dense_attention, expand_to_tokens
from targets import default_scale

import sparsecore
from sparsecore import BlockMask, UnsupportedError
from sparsecore.backends.npu import NpuBackend, NpuOptions, emulate, loader
from sparsecore.backends.npu.merge import merge_partials
from sparsecore.backends.npu.schedule import (BLOCK_Y, full_op_blocks, key_pieces, schedule_fallback, schedule_hybrid,
                                          query_runs)

NPU = NpuBackend()


@contextmanager
def counted_emulator():
    """The emulator with its two ops wrapped to record every call's arguments."""
    with emulate() as module:
        log = {"npu_block_sparse_attention": [], "npu_fusion_attention": []}
        for name in log:
            op = getattr(module, name)

            def spy(*args, _op=op, _log=log[name], **kwargs):
                _log.append((args, kwargs))
                return _op(*args, **kwargs)

            setattr(module, name, spy)
        yield module, log


def run_case(case, dtype: str, **options):
    """Compile and run ``case`` for npu under the current emulator; returns (out, lse) as float64 and the oracle's.

    The call without the LSE (which asks the block-sparse op for none where a call's part is not merged) is held to
    the oracle here too: the caller checks the call with it.
    """
    kernel = sparsecore.compile(case.mask, device="npu", **options)
    q, k, v = (torch.from_numpy(a).to(getattr(torch, dtype)) for a in case.inputs())
    out, lse = kernel(q, k, v, scale=case.scale, return_lse=True)
    assert out.dtype == q.dtype and lse.dtype == torch.float32 and tuple(lse.shape) == tuple(q.shape[:3])
    ref_out, ref_lse = dense_attention(q.double().numpy(), k.double().numpy(), v.double().numpy(),
                                       expand_to_tokens(case.mask), default_scale(q.shape[-1], case.scale))
    assert_matches(dtype, kernel(q, k, v, scale=case.scale).double().numpy(), None, ref_out, ref_lse)
    return out.double().numpy(), lse.double().numpy(), ref_out, ref_lse


# ----------------------------------------------------------------------------------------- import hygiene

def test_import_sparsecore_never_imports_torch_npu():
    script = textwrap.dedent("""
        import sys
        import sparsecore
        import sparsecore.backends.npu
        backends = sparsecore.registered_backends()
        assert "npu" in backends, sorted(backends)
        backends["npu"].capabilities
        backends["npu"].emulator()            # creating the context manager installs nothing
        assert "torch_npu" not in sys.modules, "torch_npu was imported"
        print("clean")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "clean"


# ----------------------------------------------------------------------------------- availability messages

@pytest.fixture
def no_torch_npu(monkeypatch):
    """A process where torch_npu is neither imported nor installed."""
    sparsecore.registered_backends()
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch_npu" else real_find_spec(name, *a))


def test_missing_torch_npu_says_what_to_install(no_torch_npu):
    reason = NPU.unavailable_reason("npu")
    assert reason == "torch_npu is not installed"
    mask = BlockMask.full(1, 128, 128, 128)
    with pytest.raises(RuntimeError, match=r"npu: torch_npu is not installed \(pip install torch-npu==2\.14.*CANN"):
        sparsecore.compile(mask, device="npu")


@pytest.mark.parametrize("error", [ImportError("libhccl.so: cannot open shared object file"),
                                   OSError("libascendcl.so: cannot open shared object file"),
                                   RuntimeError("Two accelerators cannot be used at the same time in PyTorch")])
def test_a_failing_import_is_reported_not_raised(monkeypatch, error):
    sparsecore.registered_backends()
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    real_find_spec, real_import = importlib.util.find_spec, importlib.import_module
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "torch_npu" else real_find_spec(name, *a))

    def failing_import(name, *args):
        if name == "torch_npu":
            raise error
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", failing_import)
    reason = NPU.unavailable_reason("npu")
    assert reason.startswith(f"import torch_npu failed with {type(error).__name__}: {error}")
    with pytest.raises(RuntimeError, match=type(error).__name__):
        sparsecore.compile(BlockMask.full(1, 128, 128, 128), device="npu")


def test_a_real_looking_module_without_a_device_is_unavailable(monkeypatch):
    fake = types.ModuleType("torch_npu")
    fake.__version__ = "2.14.0"
    monkeypatch.setitem(sys.modules, "torch_npu", fake)
    monkeypatch.delattr(torch, "npu", raising=False)
    assert "torch.npu.is_available() is False" in NPU.unavailable_reason("npu")
    assert loader.hardware_problem() == NPU.unavailable_reason("npu")


def test_a_blocked_import_is_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)
    assert "blocked" in NPU.unavailable_reason("npu")


def test_emulator_makes_the_backend_available_on_cpu_tensors(no_torch_npu):
    assert NPU.tensor_device_problem("npu", "cpu") is not None
    with emulate():
        assert NPU.unavailable_reason("npu") is None
        assert NPU.tensor_device_problem("npu", "cpu") is None
        assert "emulator" in loader.hardware_problem()
    assert "torch_npu" not in sys.modules


def test_a_kernel_compiled_under_the_emulator_keeps_no_module(no_torch_npu):
    mask = BlockMask.full(2, 128, 128, 128)
    q = torch.randn(1, 2, 128, 64, dtype=torch.float16, generator=torch.Generator().manual_seed(0))
    with emulate():
        kernel = sparsecore.compile(mask, device="npu")
        first = kernel(q, q, q)
    with emulate():                                     # a fresh emulator module: looked up per call
        assert torch.equal(kernel(q, q, q), first)
    with pytest.raises(ValueError, match="tensors are on 'cpu' but the kernel was compiled for device 'npu'"):
        kernel(q, q, q)                                 # CPU tensors are accepted only under the emulator
    run = NPU.lower(mask, "npu", NpuOptions())
    with pytest.raises(RuntimeError, match="torch_npu is not installed.*only while the emulator is installed"):
        run(q, q, q, 0.125, False)


# ---------------------------------------------------------------------------------------- routes and numbers

@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", sorted(PATH_CASES))
def test_each_path_matches_the_oracle_and_takes_its_route(name, dtype):
    path_case = PATH_CASES[name]
    with counted_emulator() as (_, log):
        out, lse, ref_out, ref_lse = run_case(path_case.case, dtype)
    assert_matches(dtype, out, lse, ref_out, ref_lse)
    used = (bool(log["npu_block_sparse_attention"]), bool(log["npu_fusion_attention"]))
    expected = {"block_sparse": (True, False), "both": (True, True), "fallback": (False, True)}[path_case.route]
    assert used == expected, f"{name} ({path_case.why}): block-sparse/fallback calls {used}, expected {expected}"


@pytest.mark.parametrize("name", ["frames_1560_with_text", "gqa_4_to_1", "empty_rows_and_head"])
def test_float32_goes_through_the_fallback_only(name):
    with counted_emulator() as (_, log):
        out, lse, ref_out, ref_lse = run_case(PATH_CASES[name].case, "float32")
    assert_matches("float32", out, lse, ref_out, ref_lse)
    assert not log["npu_block_sparse_attention"] and log["npu_fusion_attention"]


@pytest.mark.parametrize("name", ["frames_1560_with_text", "blocks_64_disagreeing_pairs"])
def test_every_call_asks_whether_a_graph_is_being_captured_before_it_copies(name, monkeypatch):
    """``npu_fusion_attention`` is documented without graph mode or aclgraph, and a first call copies its schedule
    to the device: every call asks ``refuse_capture`` (which raises inside an NPU graph capture; tested in
    ``test_block_mask_device.py``) before the schedule is built."""
    import sparsecore.backends.npu.lowering as lowering
    asked = []

    def refuse(device, what, why):
        asked.append(why)
        raise RuntimeError("capturing")

    monkeypatch.setattr(lowering, "refuse_capture", refuse)
    built = []
    monkeypatch.setattr(lowering.NpuKernel, "_device_schedule", lambda *args: built.append(args))
    with counted_emulator() as (_, log), pytest.raises(RuntimeError, match="capturing"):
        run_case(PATH_CASES[name].case, "float16")
    assert asked and "without graph mode" in asked[0] and not built
    assert not log["npu_block_sparse_attention"] and not log["npu_fusion_attention"]


def test_path_fallback_and_tiny_chunks_split_rows_and_still_match():
    case = PATH_CASES["blocks_64_disagreeing_pairs"].case
    options = {"path": "fallback", "chunk_elements": 2 * 8 * 130}   # a few rows per chunk
    schedule = schedule_fallback(case.mask, options["chunk_elements"])
    assert len(schedule.fallback_chunks) > case.mask.num_q_blocks
    for chunk in schedule.fallback_chunks:
        assert case.mask.num_heads * len(chunk.q_tokens) * len(chunk.kv_tokens) <= options["chunk_elements"]
    with counted_emulator() as (_, log):
        out, lse, ref_out, ref_lse = run_case(case, "float16", **options)
    assert_matches("float16", out, lse, ref_out, ref_lse)
    assert not log["npu_block_sparse_attention"]
    calls = 2                            # run_case calls the kernel with and without the LSE
    assert len(log["npu_fusion_attention"]) == calls * len(schedule.fallback_chunks) * case.batch


def test_a_fallback_row_larger_than_chunk_elements_is_refused_with_the_size_it_needs():
    """One 4-head row over 600 keys needs 2,400 entries: chunks of one row each exceeded chunk_elements=1,000."""
    mask = BlockMask.from_dense(np.ones((4, 1, 1), bool), 128, 600, q_block=128, kv_block=600)
    with pytest.raises(ValueError, match="chunk_elements: .* 2,400 entries.*pass chunk_elements >= 2,400"):
        schedule_fallback(mask, 1000)
    assert all(4 * len(c.q_tokens) * len(c.kv_tokens) <= 2400 for c in schedule_fallback(mask, 2400).fallback_chunks)


def test_a_torch_npu_without_the_block_sparse_op_warns_and_uses_the_fallback():
    case = PATH_CASES["aligned_128_multiples"].case
    with counted_emulator() as (module, log):
        del module.npu_block_sparse_attention
        with pytest.warns(RuntimeWarning, match="lacks npu_block_sparse_attention"):
            out, lse, ref_out, ref_lse = run_case(case, "bfloat16")
    assert_matches("bfloat16", out, lse, ref_out, ref_lse)
    assert log["npu_fusion_attention"]


def test_no_lse_requested_skips_the_lse_of_unmerged_calls():
    case = PATH_CASES["aligned_128_multiples"].case
    q, k, v = (torch.from_numpy(a).half() for a in case.inputs())
    with counted_emulator() as (_, log):
        out = sparsecore.compile(case.mask, device="npu")(q, k, v)
    assert isinstance(out, torch.Tensor) and log["npu_block_sparse_attention"]
    assert all(kwargs["softmax_lse_flag"] == 0 for _, kwargs in log["npu_block_sparse_attention"])


# --------------------------------------------------------------------------------- the arguments of each call

def test_call_arguments_follow_the_op_docs():
    """Polarity, explicit scale, block shape, layouts, precision: what the emulator cannot tell from numbers alone."""
    case = PATH_CASES["blocks_64_disagreeing_pairs"].case
    mask = case.mask
    q, k, v = (torch.from_numpy(a).bfloat16() for a in case.inputs())
    with counted_emulator() as (_, log):
        sparsecore.compile(mask, device="npu")(q, k, v, scale=0.25, return_lse=True)
    (args, kwargs), = log["npu_block_sparse_attention"]
    compute = args[3]
    assert compute.dtype == torch.int8 and set(compute.unique().tolist()) <= {0, 1}
    assert args[4] == [64, BLOCK_Y]
    assert kwargs == {"q_input_layout": "BNSD", "kv_input_layout": "BNSD", "num_key_value_heads": 2,
                      "scale_value": 0.25, "inner_precise": 0, "softmax_lse_flag": 1,
                      "actual_seq_lengths": [mask.q_len] * case.batch,
                      "actual_seq_lengths_kv": [mask.kv_len] * case.batch}
    # 1 = compute exactly where the IR keeps the whole 128-token op block
    dense = mask.to_dense()
    whole = dense[:, :, 0::2] & dense[:, :, 1::2]
    assert np.array_equal(compute[0].numpy().astype(bool), whole)
    for args, kwargs in log["npu_fusion_attention"]:
        assert args[3:] == (mask.num_heads, "BNSD")
        assert kwargs["scale"] == 0.25 and kwargs["sparse_mode"] == 0 and kwargs["inner_precise"] == 0
        assert kwargs["atten_mask"].dtype == torch.bool and kwargs["atten_mask"].shape[:2] == (1, mask.num_heads)
    # True = masked out: the fallback attends exactly the kept tokens of the half-kept op blocks
    tokens = expand_to_tokens(mask)
    kept_by_fallback = np.zeros_like(tokens)
    schedule = schedule_hybrid(mask, NpuOptions().chunk_elements)
    for chunk, (args, kwargs) in zip(schedule.fallback_chunks, log["npu_fusion_attention"]):
        attend = ~kwargs["atten_mask"][0].numpy()
        kept_by_fallback[:, chunk.q_tokens[:, None], chunk.kv_tokens[None, :]] |= attend
    op_tokens = np.repeat(np.repeat(whole, 64, axis=1), 128, axis=2)
    assert np.array_equal(kept_by_fallback, tokens & ~op_tokens)


# ---------------------------------------------------------------------------------------------------- the schedule

def test_query_runs_cut_at_size_changes_and_absorb_a_short_last_block():
    mask = BlockMask.from_lists([[[0]] * 6], [0, 64, 128, 160, 224, 288, 300], [0, 300])
    assert query_runs(mask) == [(0, 3), (3, 6)]
    frames = PATH_CASES["frames_1560_with_text"].case.mask
    assert query_runs(frames) == [(0, 3)]            # two frames and the shorter text block: one call


def test_key_pieces_and_full_blocks_on_frame_boundaries():
    mask = BlockMask.from_lists([[[1], [0, 1]]], [0, 1560, 1600], [0, 1560, 1600])
    pieces = key_pieces(mask, BLOCK_Y)
    assert pieces.bounds.tolist() == [*range(0, 1600, 128), 1560, 1600]
    assert pieces.ir_block.tolist() == [0] * 13 + [1]
    assert pieces.op_block.tolist() == [*range(13), 12]
    full = full_op_blocks(mask.to_dense(), pieces)
    assert full[0, 0].tolist() == [False] * 13       # op block 12 = 1536..1600 holds 24 tokens of block 0
    assert full[0, 1].tolist() == [True] * 13


def test_schedule_routes_by_exactness():
    summaries = {name: schedule_hybrid(c.case.mask, NpuOptions().chunk_elements).summary()
                 for name, c in PATH_CASES.items()}
    assert summaries["aligned_128_multiples"]["fallback_chunks"] == 0
    assert summaries["blocks_64_agreeing_pairs"]["fallback_chunks"] == 0
    frames = summaries["frames_1560_with_text"]
    assert frames["block_sparse_calls"] == 1 and frames["fallback_chunks"] >= 1
    # fallback work is only the kept tokens of the straddling op blocks
    assert frames["fallback_pairs"] < 0.05 * expand_to_tokens(PATH_CASES["frames_1560_with_text"].case.mask).sum()


# ------------------------------------------------------------------------------------------------- the merge

def test_merge_is_attention_over_the_union():
    out, lse = merge_partials(torch.tensor([[1.0, 2.0]]), torch.tensor([0.0]),
                              torch.tensor([[5.0, 6.0]]), torch.tensor([math.log(3.0)]))
    # weights exp(0) = 1 and exp(log 3) = 3 out of 4
    assert torch.allclose(out, torch.tensor([[(1 + 15) / 4, (2 + 18) / 4]]))
    assert torch.allclose(lse, torch.tensor([math.log(4.0)]))


def test_merge_ignores_empty_parts_even_if_their_output_is_nan():
    nan, inf = math.nan, math.inf
    out, lse = merge_partials(torch.tensor([[nan], [3.0], [nan]]), torch.tensor([-inf, 0.5, -inf]),
                              torch.tensor([[7.0], [nan], [nan]]), torch.tensor([1.25, -inf, -inf]))
    assert out.tolist() == [[7.0], [3.0], [0.0]]
    assert lse.tolist() == [1.25, 0.5, -inf]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_merge_at_lses_near_1e8_weighs_the_parts_by_their_lses(dtype):
    """log 2 added to an LSE of 1e8 rounds away in float32, so weights exp(lse_x - lse) summed to 2 (the merge before
    2026-12-05: two equal parts of outputs 1 and 3 gave 4, not 2). LSEs 1e8 and 1e8 - 8 (float32 holds both) weigh
    1 : exp(-8)."""
    lse_a, lse_b = torch.tensor([1e8, 1e8], dtype=dtype), torch.tensor([1e8, 1e8 - 8], dtype=dtype)
    out, lse = merge_partials(torch.tensor([[1.0], [1.0]], dtype=dtype), lse_a,
                              torch.tensor([[3.0], [5.0]], dtype=dtype), lse_b)
    light = math.exp(-8.0)
    assert torch.allclose(out, torch.tensor([[2.0], [(1 + 5 * light) / (1 + light)]], dtype=dtype), rtol=1e-6)
    want = torch.tensor([1e8 + math.log(2.0), 1e8 + math.log1p(light)], dtype=torch.float64).to(dtype)
    assert torch.equal(lse, want) or dtype == torch.float64 and torch.allclose(lse, want, rtol=1e-15)


def test_merge_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="matching shapes"):
        merge_partials(torch.zeros(2, 4), torch.zeros(2), torch.zeros(3, 4), torch.zeros(3))


# ----------------------------------------------------------------------------------------------- options

@pytest.mark.parametrize("options, error", [({"path": "gpu"}, ValueError), ({"chunk_elements": 0}, ValueError),
                                            ({"chunk_elements": True}, TypeError), ({"tile": 3}, TypeError)])
def test_bad_options_are_rejected(options, error):
    with emulate():
        with pytest.raises(error):
            sparsecore.compile(BlockMask.full(1, 128, 128, 128), device="npu", **options)


def test_more_heads_than_the_fused_op_takes_is_unsupported():
    with emulate():
        with pytest.raises(UnsupportedError, match="at most 256 query heads"):
            sparsecore.compile(BlockMask.full(257, 16, 16, 16), device="npu")


@pytest.mark.parametrize("name", sorted(PATH_CASES))
@pytest.mark.parametrize("limit", [4096, 50_000, 400_000, 3_000_000])
def test_every_fallback_chunk_holds_at_most_chunk_elements(name, limit):
    """A fallback chunk's expanded mask ``[H, rows, keys]`` stays within ``chunk_elements``; a row that alone needs
    more is refused by name."""
    mask = PATH_CASES[name].case.mask
    for schedule in (schedule_hybrid, schedule_fallback):
        try:
            chunks = schedule(mask, limit).fallback_chunks
        except ValueError as err:
            assert "chunk_elements" in str(err)
            continue
        for chunk in chunks:
            entries = mask.num_heads * len(chunk.q_tokens) * len(chunk.kv_tokens)
            assert entries <= limit, (schedule.__name__, entries, limit)


def test_the_fallback_builds_one_token_mask_a_chunk_whatever_the_batch(monkeypatch):
    """``chunk_elements`` bounds the fallback's memory: each chunk builds its ``[1, H, R, L]`` token mask once, in the
    op's polarity, for every batch element (which rows attend a non-finite key is read from the compact table), so no
    second mask-sized tensor lives beside it and none is rebuilt per batch element."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from sparsecore.backends.npu import calls
    case = PATH_CASES["blocks_64_disagreeing_pairs"].case
    q, k, v = (torch.from_numpy(a).half().repeat(3, 1, 1, 1) for a in case.inputs())
    masks, sizes = [], []

    def fused(torch_npu, query, key, value, masked_out, scale):
        masks.append(masked_out)
        sizes.append(masked_out.numel())
        return torch.zeros(*query.shape[:3], value.shape[-1]), torch.zeros(query.shape[:3])
    monkeypatch.setattr(calls, "fusion_attention", fused)

    class BoolTensors(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            if isinstance(result, torch.Tensor) and result.dtype == torch.bool:
                made.append((result.numel(), result.untyped_storage().data_ptr()))
            return result
    made: list[tuple[int, int]] = []
    with emulate():
        kernel = sparsecore.compile(case.mask, device="npu", path="fallback")
        kernel.prepare(q, k, v)
        with BoolTensors():
            kernel(q, k, v)
    chunks = len(masks) // 3
    assert chunks and len(masks) == 3 * chunks
    assert all(masks[3 * c] is masks[3 * c + b] for c in range(chunks) for b in range(3))
    mask_sized = {storage for n, storage in made if n in sizes}          # views share their base's storage
    assert len(mask_sized) == chunks, (made, sizes)


def _schedule_bytes(schedule) -> int:
    arrays = [a for c in schedule.block_sparse_calls for a in (c.block_mask, c.row_empty)]
    arrays += [a for c in schedule.fallback_chunks
               for a in (c.q_tokens, c.kv_tokens, c.row_group, c.key_piece, c.allowed, c.row_has_keys)]
    return sum(a.nbytes for a in arrays)


@pytest.mark.parametrize("dtype, kinds", [("float16", ["hybrid"]), ("float32", ["hybrid", "fallback"])])
def test_the_kernel_cache_counts_the_schedules_and_their_device_copies(dtype, kinds):
    """The schedules grow with the tokens (rows per call, gathered positions per chunk): the kernel cache's byte bound
    must count them: the host arrays built when lowered (the hybrid schedule) and at the first float32 call (the
    fallback one, which float32 runs), and the device copy of the schedule a call runs (the cache counted 0: the npu
    run reported no ``plan_bytes``)."""
    from sparsecore import kernel_cache
    sparsecore.clear_cache()
    case = PATH_CASES["frames_1560_with_text"].case
    q, k, v = (torch.from_numpy(a).to(getattr(torch, dtype)) for a in case.inputs())
    with emulate():
        kernel = sparsecore.compile(case.mask, device="npu")
        kernel(q, k, v)
        sparsecore.compile(BlockMask.full(1, 128, 128, 128), device="npu")     # the next compile counts again
    run, = kernel._runs.values()
    host = sum(_schedule_bytes(run.schedule(kind)) for kind in kinds)
    copied = _schedule_bytes(run.schedule(kinds[-1]))                   # the schedule the call ran, on its device
    assert copied > 0 and kernel_cache._SIZES[next(iter(kernel_cache._SIZES))][1] == host + copied
    sparsecore.clear_cache()


def test_no_fallback_chunk_passes_the_fused_ops_sequence_limit():
    """npu_fusion_attention takes S of 1..1M tokens (2**20): one frame-sized block of 2**20 + 300 keys, kept whole by
    every row, went to it as one chunk of 2**20 + 300 keys. Planned on the host, nothing of that size is computed."""
    from sparsecore.backends.npu import schedule
    mask = BlockMask.from_dense(np.ones((2, 2, 1), bool), 256, schedule.FUSION_MAX_SEQ + 300, q_block=128,
                                kv_block=schedule.FUSION_MAX_SEQ + 300)
    fallback = schedule_fallback(mask, 1 << 26)
    assert max(len(c.kv_tokens) for c in fallback.fallback_chunks) <= schedule.FUSION_MAX_SEQ
    assert fallback.summary()["fallback_pairs"] == 2 * 256 * (schedule.FUSION_MAX_SEQ + 300)


@pytest.mark.parametrize("name, path", [("blocks_64_disagreeing_pairs", "auto"), ("blocks_64_disagreeing_pairs",
                                        "fallback"), ("frames_1560_with_text", "auto")])
def test_chunks_split_at_the_fused_ops_sequence_limit_still_match(monkeypatch, name, path):
    """The emulator refuses what the doc refuses (S past 1M); with that limit lowered to 100 tokens in both (to test
    it without millions of tokens), the fallback splits its rows and keys into chunks the op takes and merges them."""
    from sparsecore.backends.npu import emulator, schedule
    monkeypatch.setattr(emulator, "FUSION_MAX_SEQ", 100)
    monkeypatch.setattr(schedule, "FUSION_MAX_SEQ", 100)
    case = PATH_CASES[name].case
    with counted_emulator() as (_, log):
        out, lse, ref_out, ref_lse = run_case(case, "float16", path=path)
    assert_matches("float16", out, lse, ref_out, ref_lse)
    assert log["npu_fusion_attention"]
