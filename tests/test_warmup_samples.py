"""The background warm-up (sparsecore.warmup): what it holds, its shared state, its failures, and whether its samples
compile what the calls launch.

CPU only. The kernel tests use tests/test_warmup.py's fake backends (fixture ``fakes``: ``fake-slow`` stands in for
fa4, tag FAST; ``fake-quick`` for triton, tag FALLBACK). The fa4 tests compute, on CPU, the decisions that pick
which FA4 / Triton kernels a call compiles (the fa4 lowering's own functions, as on an H200 with flash-attn-4
4.0.0b36) for a call and for its warm-up sample: where they differ, the call after the warm-up compiles in place
on the caller's thread (FA4's CuTe DSL compile: 4-9 s), which the warm-up exists to avoid.
"""

from __future__ import annotations

from collections import OrderedDict

import gc
import threading
import time
import weakref

import numpy as np
import pytest
import torch

import sparsecore
from sparsecore import warmup, warmup_sample
from sparsecore.ir import BlockMask
from test_warmup import FALLBACK, FAST, _fresh_state, _inputs, _mask, fakes  # noqa: F401  (fakes: the fixture)

torch.manual_seed(0)


# ------------------------------------------------------------------------------------------- inputs held
def test_ready_for_holds_no_input_of_the_caller_while_its_warm_up_waits(monkeypatch):
    """ready_for's task keeps ``like`` (the caller's q: FA4's dense op passes its whole q, hundreds of MB at video
    lengths) in its closure until the worker has imported flash-attn-4 and compiled (10-20 s)."""
    _fresh_state(monkeypatch)
    gate = threading.Event()

    def load():
        assert gate.wait(30)
        return None
    like = torch.randn(8, 8)
    held = weakref.ref(like)
    assert warmup.ready_for(("review2", "like"), load, lambda: (lambda: None), like) is not None   # warming up
    del like
    gc.collect()
    alive = held() is not None
    gate.set()
    assert warmup.wait(30)
    assert not alive, "the queued warm-up holds the caller's tensor (`like`, captured by its task's closure)"


def test_a_warm_up_sample_carries_no_autograd_graph_of_the_call(fakes):
    """Called with grad mode on and inputs that require gradients (inference_only allows it), the sample's copies
    are cut with autograd recording: their grad_fn reaches the caller's q, k, v (a leaf's AccumulateGrad holds it;
    a non-leaf's graph holds what its producers saved) until the worker gets to the sample."""
    slow, quick = fakes
    slow.gate.clear()
    q, k, v = (t.requires_grad_() for t in _inputs())
    held = weakref.ref(q)
    out = sparsecore.compile(_mask(), device="cuda")(q, k, v)
    assert float(out.flatten()[0]) == FALLBACK
    quick.runs.clear()                              # the fake's record of what ran holds the inputs too
    del q, k, v, out
    gc.collect()
    alive = held() is not None
    slow.gate.set()
    assert warmup.wait(30)
    assert not alive, "the warm-up's sample holds the caller's q through its autograd graph"


# ------------------------------------------------------------------------------------------- shared state
def test_a_warm_up_that_ends_between_a_callers_two_reads_is_not_queued_again(fakes, monkeypatch):
    """The worker records a warm-up as warm (or failed) before it leaves the in-flight table, and callers read the
    in-flight table first: a warm-up that ends between a caller's two reads is seen in one of them. Here each read
    lets the worker end the warm-up right after it: read in the other order, the caller would see neither and queue
    the geometry again (one more sample, host read and worker run)."""
    slow, quick = fakes
    slow.gate.clear()
    q, k, v = _inputs()
    assert float(sparsecore.compile(_mask(0), device="cuda")(q, k, v).flatten()[0]) == FALLBACK
    settled = []

    def then_the_worker_ends(read):
        def patched(key):
            found = read(key)
            if not settled:
                settled.append(True)
                slow.gate.set()
                deadline = time.monotonic() + 30
                while warmup._pending and time.monotonic() < deadline:
                    time.sleep(0.001)
            return found
        return patched
    monkeypatch.setattr(warmup, "pending", then_the_worker_ends(warmup.pending))
    monkeypatch.setattr(warmup, "is_warm", then_the_worker_ends(warmup.is_warm))
    sparsecore.compile(_mask(1), device="cuda")(q, k, v)
    assert warmup.wait(30)
    runs = [thread for thread, _ in slow.runs].count("sparsecore-warmup")
    assert runs == 1, f"the geometry warmed up {runs} times"


@pytest.mark.parametrize("fails", [False, True])
def test_the_worker_records_how_a_warm_up_ended_before_it_leaves_the_in_flight_table(fakes, monkeypatch, fails):
    """The other half of the reading order above: warm (or failed) first, then out of _pending."""
    slow, quick = fakes
    slow.error = RuntimeError("compile failed") if fails else None
    seen = []

    class Recording(OrderedDict):
        def __setitem__(self, key, value):
            seen.append(key in warmup._pending)
            super().__setitem__(key, value)

        def add(self, key):
            self[key] = True
    monkeypatch.setattr(warmup, "_failed" if fails else "_warm", Recording())
    sparsecore.compile(_mask(), device="cuda")(*_inputs())
    assert warmup.wait(30) and seen == [True]


def test_a_failed_warm_up_whose_kernel_is_gone_leaves_later_kernels_loading_in_place(fakes):
    """A method's kernels are called once and dropped: nobody is left to raise a warm-up's error, and none is raised
    later to another caller (a transient error would end a run whose calls all succeeded). A warning says so, and
    kernels of the geometry load the backend in place from then on, as in the "wait" mode."""
    slow, quick = fakes
    slow.error = RuntimeError("transient: CUDA out of memory on the worker")
    q, k, v = _inputs()
    first = sparsecore.compile(_mask(0), device="cuda", cache=False)
    assert float(first(q, k, v).flatten()[0]) == FALLBACK
    assert first.wait_for_warmups(timeout=30)
    del first
    gc.collect()
    slow.error = None
    second = sparsecore.compile(_mask(1), device="cuda", cache=False)
    with pytest.warns(RuntimeWarning, match="transient: CUDA out of memory on the worker"):
        out = second(q, k, v)
    assert float(out.flatten()[0]) == FAST and slow.runs[-1][0] == "MainThread"


# ------------------------------------------------------------------------------------------- fa4 compiles
def _fa4_compiles(mask, k, v, return_lse, options=None):
    """What picks the FA4 (and Triton guard) kernels a call of ``mask`` compiles on an H200 (SM90, flash-attn-4
    4.0.0b36): FA4's compile key holds tile_m, tile_n, num_threads (two CTAs per SM), ``lse is None``, the
    mask_mod, the block-sparse tensors' broadcast pattern (lists of one head are broadcast); the non-finite guard
    (Triton) compiles per key order; an empty mask launches nothing."""
    from sparsecore.backends.cuda import fa4_layout
    from sparsecore.backends.cuda.fa4_backend import Fa4Backend, Fa4Options
    run = Fa4Backend().lower(mask, "cuda", options or Fa4Options())
    parts = run.key_parts_for(k, v)
    layout = fa4_layout.to_fa4(mask, run.tile_m, run.tile_n, "cpu", run.reorder_keys, parts)
    lse = return_lse or parts > 1 or run.approximation is not None
    return dict(tile=(run.tile_m, run.tile_n), two_ctas_per_sm=run.two_per_sm, fa4_lse=lse,
                mask_mod=layout.needs_mask_mod,
                heads_broadcast=mask.num_heads > 1 and layout.full_block_cnt.shape[1] == 1,
                guard_ordered=layout.needs_mask_mod and layout.kv_order is not None,
                launches=len(mask.indices) > 0)


def _lists(keep, q_offsets, kv_offsets):
    return BlockMask.from_lists([[np.flatnonzero(row).tolist() for row in head] for head in keep],
                                np.asarray(q_offsets), np.asarray(kv_offsets))


def _long_64_blocks(rng):                  # AdaSpa / PASA at 188,736 tokens: 4 key ranges (K+V above the L2)
    n = 188736 // 64
    keep = rng.random((2, n, n)) < 0.01
    keep[:, np.arange(n), np.arange(n)] = True
    return BlockMask.from_dense(keep, n * 64, n * 64, 64)


def _sink_and_diagonal(rng):               # heads alike on the first and last blocks, not in between
    n = 64
    keep = rng.random((2, n, n)) < 0.2
    keep[:, :, :8] = True
    keep[:, :, -1] = False
    keep[:, -1, :] = False
    keep[:, np.arange(n), np.arange(n)] = True
    return BlockMask.from_dense(keep, n * 64, n * 64, 64)


def _text_first_128(rng):                  # CogVideoX's layout: 226 text tokens, then 128-token video blocks
    offsets = np.r_[0, 226 + 128 * np.arange(60)]
    n = len(offsets) - 1
    keep = rng.random((2, n, n)) < 0.3
    keep[:, np.arange(n), np.arange(n)] = True
    return _lists(keep, offsets, offsets)


def _frames_then_text(rng):                # 1,560-token frames, local window, then a text block all attend
    offsets = np.r_[0, 1560 * np.arange(1, 11), 1560 * 10 + 256]
    n = len(offsets) - 1
    keep = np.zeros((2, n, n), bool)
    for i in range(n):
        keep[:, i, max(0, i - 1):i + 2] = True
    keep[:, :, -1] = True
    keep[:, -1, :] = True
    return _lists(keep, offsets, offsets)


def _aligned_ends_64_middle(rng):         # 128-token blocks at both ends, 64-token ones between: tiles of 64
    offsets = np.r_[0, 128 * np.arange(1, 11), 1280 + 64 * np.arange(1, 41), 3840 + 128 * np.arange(1, 11)]
    n = len(offsets) - 1
    keep = rng.random((2, n, n)) < 0.3
    keep[:, np.arange(n), np.arange(n)] = True
    return _lists(keep, offsets, offsets)


@pytest.mark.parametrize("make", [_long_64_blocks, _sink_and_diagonal, _text_first_128, _frames_then_text,
                                  _aligned_ends_64_middle])
def test_the_warm_up_sample_compiles_what_the_call_launches(make, monkeypatch):
    from sparsecore.backends.cuda import fa4_backend, fa4_launch, fa4_occupancy
    monkeypatch.setattr(fa4_backend.torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(fa4_occupancy, "supported", lambda: True)          # flash-attn-4 4.0.0b36
    monkeypatch.setattr(fa4_launch, "l2_bytes", lambda device: 50 * 2 ** 20)      # the H200's L2
    rng = np.random.default_rng(5)
    mask = make(rng)
    q = torch.zeros(1, 1, 1, 128, dtype=torch.bfloat16).expand(1, mask.num_heads, mask.q_len, 128)
    k = torch.zeros(1, 1, 1, 128, dtype=torch.bfloat16).expand(1, mask.num_heads, mask.kv_len, 128)
    from sparsecore.backends.cuda.fa4_backend import Fa4Backend, Fa4Options
    options = Fa4Backend().warmup_options(mask, Fa4Options(), (q, k, k, None, False))
    part, _, k_s, v_s, _, lse = warmup_sample.sample_call(mask, (q, k, k, None, False))
    call, sample = _fa4_compiles(mask, k, k, False), _fa4_compiles(part, k_s, v_s, lse, options)
    differ = {name: (call[name], sample[name]) for name in call if call[name] != sample[name]}
    assert not differ, f"(call, sample) differ in {differ}: the call after the warm-up compiles in place"


def test_fa4s_dense_op_warms_up_on_a_detached_sample_that_keeps_the_last_tiles_remainder():
    """The sample FA4's dense op compiles on: the first SAMPLE_TILES tiles of 128 tokens and the length's remainder
    (a short last tile stays short), copies with no autograd graph back to the caller's tensors."""
    from sparsecore.backends.cuda import fa4_dense
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 9000, 8, generator=gen, requires_grad=True)
    k, v = (torch.randn(1, 1, 8300, 8, generator=gen, requires_grad=True) for _ in range(2))
    run = fa4_dense._sample_run(q * 1.0, k, v)                  # q a non-leaf: its graph would hold q
    held = [cell.cell_contents for cell in run.__closure__ if isinstance(cell.cell_contents, torch.Tensor)]
    by_length = {t.shape[2]: t for t in held}
    assert sorted(t.shape[2] for t in held) == [1024 + 9000 % 128] + [1024 + 8300 % 128] * 2
    assert not any(t.requires_grad or t.grad_fn is not None for t in held)
    assert torch.equal(by_length[1064], q[:, :, :1064].detach())


def test_fa4s_dense_warm_up_compiles_the_variants_with_and_without_the_lse(monkeypatch):
    """FA4 compiles per ``lse is None`` (flash_attn/cute/interface.py's compile key). The model's dense steps ask no
    LSE (processors.dispatch: ``run(..., False)``) and the searches' dense pass does (search.dense_attention): a
    warm-up that compiled only the LSE variant left the dense steps' first FA4 call to compile in place, on the
    caller's thread (FA4's CuTe DSL compile: about 4 s), after the warm-up had ended."""
    from sparsecore.backends.cuda import fa4_dense
    asked = []
    monkeypatch.setattr(fa4_dense, "run", lambda q, k, v, scale, return_lse: asked.append(return_lse))
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 9000, 8, generator=gen) for _ in range(3))
    fa4_dense._sample_run(q, k, v)()
    assert sorted(asked) == [False, True]
