"""Library branches that run correctly but that no other CPU test executed (the coverage review's list of real
behaviour no test reaches). One small test each; the docstring names the file and lines it holds."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch

from checks import assert_matches
from oracle import block_lists, dense_attention, expand_to_tokens

import sparsecore
from sparsecore import BlockMask
from sparsecore.ir import Unselected


# ---------------------------------------------------------------- ir/constructors.py, ir/csr.py
def test_from_dense_with_a_torch_block_map_equals_the_numpy_path_and_runs_as_the_oracle():
    """``ir/constructors.py:40`` and ``ir/csr.py:26-31, 43-46`` (the torch branches of ``indptr_from_counts`` and
    ``from_block_map``): a torch block map gives the NumPy map's mask (same fingerprint, budgets and lists) with its
    lists on the map's device, and its kernel matches the oracle (empty rows, a short last block on each side)."""
    rng = np.random.default_rng(0)
    keep = rng.random((3, 4, 5)) < 0.4
    keep[1, 2] = False                                               # an empty row
    host = BlockMask.from_dense(keep, 250, 300, 64)
    held = BlockMask.from_dense(torch.from_numpy(keep), 250, 300, 64)
    assert host.on_host and held.device == torch.device("cpu")
    assert held == host and held.fingerprint() == host.fingerprint()
    assert np.array_equal(held.indptr.numpy(), host.indptr) and np.array_equal(held.indices.numpy(), host.indices)
    assert [[r.tolist() for r in h] for h in block_lists(held)] == [[np.flatnonzero(r).tolist() for r in h]
                                                                     for h in keep]
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, n, 16, generator=gen, dtype=torch.float64) for n in (250, 300, 300))
    out, lse = sparsecore.compile(held, "cpu", cache=False)(q, k, v, return_lse=True)
    ref_out, ref_lse = dense_attention(q.numpy(), k.numpy(), v.numpy(), expand_to_tokens(host), 16 ** -0.5)
    assert np.isneginf(ref_lse).any()
    assert_matches("float64", out.numpy(), lse.numpy(), ref_out, ref_lse)


# ---------------------------------------------------------------- backends/cuda/selection.py
@pytest.fixture
def cuda_backends_available(monkeypatch):
    for name in ("triton", "fa4", "flashinfer"):
        monkeypatch.setattr(sparsecore.registered_backends()[name], "unavailable_reason", lambda device: None)
    return sparsecore.registered_backends()


def test_a_ragged_mask_ranks_fa4_then_triton_and_flashinfer_cannot_take_it(cuda_backends_available, monkeypatch):
    """``backends/cuda/selection.py:62`` (``"ragged"``) and ``RANKS["ragged"]``: video blocks of 128 tokens with a
    short last one, then text blocks, have no uniform interior, so they rank fa4 > triton > flashinfer; FlashInfer
    (uniform blocks only) is not a candidate, and without fa4 the kernel runs Triton."""
    from sparsecore.backends.cuda.selection import block_class
    from sparsecore.registry import candidates
    video, text = 5 * 128 - 40, 200                                  # 4 blocks of 128 and one of 88, then 128 and 72
    offsets = np.concatenate([BlockMask.uniform_offsets(video, 128),
                              video + BlockMask.uniform_offsets(text, 128)[1:]])
    mask = BlockMask.from_lists([[[i] for i in range(len(offsets) - 1)]] * 2, offsets, offsets)
    assert mask.largest_block_size("kv") == 128 and mask.interior_block_size("kv") is None
    assert block_class(mask) == "ragged"
    backends = cuda_backends_available
    ranks = [backends[name].preference(mask) for name in ("fa4", "triton", "flashinfer")]
    assert ranks == sorted(ranks, reverse=True) and len(set(ranks)) == 3
    names = [b.name for b in candidates(mask, "cuda", None)]
    assert names[:2] == ["fa4", "triton"] and "flashinfer" not in names
    assert sparsecore.compile(mask, "cuda", warmup="wait", cache=False).backend.name == "fa4"
    monkeypatch.setattr(backends["fa4"], "unavailable_reason", lambda device: "not here")
    assert sparsecore.compile(mask, "cuda", warmup="wait", cache=False).backend.name == "triton"


# ---------------------------------------------------------------- sparsecore/methods/pasa.py
PROFILE = np.array([np.nan, 1.0, 0.5, 0.25, 0.0, 0.0])             # two sparse steps with no change


def test_pasa_schedule_when_every_step_is_dense():
    """``sparsecore/methods/pasa.py:225-226``: ``dense_fraction=1`` makes every step dense, with or without a
    profile (whose sparse steps there are none of)."""
    from sparsecore.methods.pasa import CurvatureProfile, dense_steps, density_schedule
    assert dense_steps(6, 1.0) == 6
    for profile in (None, CurvatureProfile(PROFILE)):
        schedule = density_schedule(6, 0.3, dense_fraction=1.0, profile=profile)
        assert schedule.dtype == np.float64 and schedule.tolist() == [1.0] * 6


def test_pasa_schedule_at_density_one():
    """``sparsecore/methods/pasa.py:250-251`` (``_water_fill`` at density 1): every step is dense, even with
    sparse steps whose change is 0 (which alone could not be raised to 1)."""
    from sparsecore.methods.pasa import CurvatureProfile, density_schedule
    assert density_schedule(6, 1.0, profile=CurvatureProfile(PROFILE)).tolist() == [1.0] * 6
    assert density_schedule(6, 1.0).tolist() == [1.0] * 6


def test_pasa_schedule_when_min_density_equals_density():
    """``sparsecore/methods/pasa.py:266-267`` (the flat stretch of the mean at the first knot): with the floor at
    the mean every sparse step sits on it, whatever the profile."""
    from sparsecore.methods.pasa import CurvatureProfile, density_schedule
    with warnings.catch_warnings():
        warnings.simplefilter("error")                              # no 0 / 0 on the way
        schedule = density_schedule(6, 0.3, dense_fraction=0.2, profile=CurvatureProfile(PROFILE), min_density=0.3)
    assert schedule.tolist() == [1.0, 1.0, 0.3, 0.3, 0.3, 0.3]


# ---------------------------------------------------------------- sparsecore/warmup.py
FORK_SCRIPT = textwrap.dedent("""
    import json, os, sys, threading
    from sparsecore import warmup
    key = ("fork-test", "cpu", "signature")
    release = threading.Event()
    parents = warmup.start(key, lambda: release.wait(60))
    while not parents.running():
        release.wait(0.01)
    pid = os.fork()
    if pid == 0:
        found = {}
        try:
            lost = parents.exception(timeout=10)
            found["lost"] = [type(lost).__name__, str(lost)]
            found["status"] = warmup.status(key)
            found["again"] = warmup.start(key, lambda: 42).result(timeout=10)
            found["status again"] = warmup.status(key)
            found["wait"] = warmup.wait(10)
        finally:
            with open(sys.argv[1], "w") as child_file:
                json.dump(found, child_file)
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    in_flight = warmup.status(key)
    release.set()
    print(json.dumps({"child exit": os.waitstatus_to_exitcode(status), "in flight": in_flight,
                      "result": parents.result(timeout=60), "status": warmup.status(key)}))
""")


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="os.fork is POSIX only")
def test_a_forked_child_loses_the_parents_warm_up_by_key_and_starts_its_own(tmp_path):
    """``sparsecore/warmup.py:375-388`` (``_forget_worker``) and ``start``'s bookkeeping after a fork, by key as
    kernels use it, in a fresh process: in the child the parent's running warm-up ends with the documented
    RuntimeError and its key reads "none", a new warm-up of that key runs on the child's own worker and makes it
    "warm", and ``wait()`` returns; the parent's warm-up is unaffected."""
    child_file = tmp_path / "child.json"
    done = subprocess.run([sys.executable, "-c", FORK_SCRIPT, str(child_file)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    parent = json.loads(done.stdout.strip().splitlines()[-1])
    assert parent == {"child exit": 0, "in flight": "in flight", "result": True, "status": "warm"}
    child = json.loads(child_file.read_text())
    assert child["lost"][0] == "RuntimeError" and "did not survive fork()" in child["lost"][1]
    assert {name: child[name] for name in ("status", "again", "status again", "wait")} == \
        {"status": "none", "again": 42, "status again": "warm", "wait": True}


# ---------------------------------------------------------------- sparsecore/integrations/diffusers/steps.py
def test_step_tracker_with_none_numbers_and_empty_timesteps():
    """``sparsecore/integrations/diffusers/steps.py:68-70`` (no timestep: stay on the step), ``:151-152`` and
    ``:154-155`` (None and an empty tensor are no timestep) and ``:163-164`` (a Python number is read alone): numbers
    advance the step as they fall and a larger one starts a new run (``on_new_run``); None and empty tensors keep
    the step, before the first timestep too, and do not disturb what the next number is compared with."""
    from sparsecore.integrations.diffusers.steps import StepTracker
    new_runs = []
    tracker = StepTracker(3, lambda: new_runs.append(tracker.step))
    sequence = [(None, 0, 0), (torch.tensor([]), 0, 0), (999, 0, 0), (999, 0, 0), (500.0, 1, 0), (None, 1, 0),
                (torch.empty(0, dtype=torch.bfloat16), 1, 0), (500, 1, 0), (10, 2, 0), (None, 2, 0),
                (999.0, 0, 1), (600, 1, 1), (None, 1, 1)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")                  # the first run is as long as num_steps: no short-run warning
        for timestep, step, run in sequence:
            tracker.observe(timestep)
            tracker.completed()
            assert (tracker.step, tracker.run) == (step, run), timestep
    assert new_runs == [2]                              # the second run started once, after step 2 of the first


# ---------------------------------------------------------------- ir/uploads.py
def test_the_upload_cache_keeps_the_most_recently_used_cache_entries(monkeypatch):
    """``ir/uploads.py`` (``on_device``, through ``ir/memo.py``): after more than :data:`CACHE_ENTRIES` distinct uploads the cache
    holds exactly that many, the least recently used leave first, and a hit moves an entry to the recent end."""
    from sparsecore.ir import uploads
    from sparsecore.ir.memo import LruMemo
    monkeypatch.setattr(uploads, "_UPLOADS", LruMemo(uploads.CACHE_ENTRIES))
    limit = uploads.CACHE_ENTRIES
    arrays = [np.array([i, i + 1], dtype=np.int64) for i in range(limit + 6)]
    first = [uploads.on_device(a, "cpu") for a in arrays[:limit]]
    assert uploads.on_device(arrays[0].copy(), "cpu") is first[0]   # a hit, by content: now the most recent
    later = [uploads.on_device(a, "cpu") for a in arrays[limit:]]
    assert len(uploads._UPLOADS) == limit
    assert all(uploads.on_device(a, "cpu") is t for a, t in zip(arrays[limit:], later))
    assert uploads.on_device(arrays[0], "cpu") is first[0]
    assert all(uploads.on_device(a, "cpu") is t for a, t in zip(arrays[7:limit], first[7:]))
    assert not any(uploads.on_device(a, "cpu") is t for a, t in zip(arrays[1:7], first[1:7]))   # evicted
    assert torch.equal(first[0], torch.tensor([0, 1]))


# ---------------------------------------------------------------- sparsecore/demo.py
def test_best_device_is_one_this_machine_runs_a_kernel_on(monkeypatch):
    """``sparsecore/demo.py:116-122``: what ``make demo`` runs on without ``--device``: cpu on a machine without
    CUDA or an NPU (this one), and a kernel compiled for it runs there and matches the oracle; the first of cuda,
    npu, cpu where a backend runs (one made to report cuda available here moves it to cuda)."""
    from sparsecore.demo import best_device
    device = best_device()
    if not torch.cuda.is_available() and not hasattr(torch, "npu"):
        assert device == "cpu"
    mask = BlockMask.from_dense(np.tril(np.ones((2, 3, 3), dtype=bool)), 80, 80, 32)
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 80, 16, generator=gen) for _ in range(3))
    out = sparsecore.compile(mask, device, cache=False)(q.to(device), k.to(device), v.to(device))
    ref_out, ref_lse = dense_attention(q.double().numpy(), k.double().numpy(), v.double().numpy(),
                                       expand_to_tokens(mask), 16 ** -0.5)
    assert_matches("float32", out.double().cpu().numpy(), None, ref_out, ref_lse)
    for name in ("npu", "triton"):
        monkeypatch.setattr(sparsecore.registered_backends()[name], "unavailable_reason", lambda device: None)
    assert best_device() == "cuda"


# ---------------------------------------------------------------- sparsecore/quality.py
def _zeroth_fidelity64(q, k, v, mask, scale):
    """Recall, min recall, rel_l2 and cosine per head in float64, by the docs of ``sparsecore.quality`` and
    ``ir/unselected.py`` ("zeroth": an unlisted key block j adds |B_j| exp(s q.k̄_j) to the denominator and
    exp(s q.k̄_j) ΣV_j to the numerator), in log space."""
    tokens = expand_to_tokens(mask)
    kv_off = np.asarray(mask.kv_offsets)
    sizes = np.diff(kv_off)
    recall, low, rel, cos = [], [], [], []
    for h in range(q.shape[0]):
        s = q[h] @ k[h].T * scale                                                   # [L, T]
        dense_lse = np.logaddexp.reduce(s, axis=1)
        dense = np.exp(s - dense_lse[:, None]) @ v[h]
        kept_lse = np.logaddexp.reduce(np.where(tokens[h], s, -np.inf), axis=1)
        row_recall = np.exp(kept_lse - dense_lse)
        means_k = np.stack([k[h, a:b].mean(0) for a, b in zip(kv_off[:-1], kv_off[1:])])    # [NB, D]
        means_v = np.stack([v[h, a:b].mean(0) for a, b in zip(kv_off[:-1], kv_off[1:])])
        block_logit = q[h] @ means_k.T * scale + np.log(sizes)[None]                 # [L, NB]: |B_j| exp(s q.k̄_j)
        listed = np.stack([tokens[h][:, a] for a in kv_off[:-1]], axis=1)            # [L, NB]
        logits = np.concatenate([np.where(tokens[h], s, -np.inf), np.where(listed, -np.inf, block_logit)], axis=1)
        values = np.concatenate([v[h], means_v])
        top = logits.max(1, keepdims=True)
        weights = np.exp(logits - top)
        approx = weights @ values / weights.sum(1, keepdims=True)
        recall.append(row_recall.mean())
        low.append(row_recall.min())
        rel.append(np.linalg.norm(approx - dense) / np.linalg.norm(dense))
        cos.append((approx * dense).sum() / (np.linalg.norm(approx) * np.linalg.norm(dense)))
    return tuple(np.array(x) for x in (recall, low, rel, cos))


@pytest.mark.parametrize("compute_dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_fidelity_of_an_approximating_mask_with_rows_keeping_almost_no_mass(compute_dtype):
    """``sparsecore/quality.py:117-120``: an approximating mask ("zeroth") whose first query block keeps only a key
    block it scores far below the others, so those rows keep under 1e-30 of the softmax mass: their recall is
    recomputed in log space. Recall, min_recall, rel_l2 and cosine match a float64 computation (in float32 the
    smallest recall, about 1e-83 here, is below what float32 holds: it must stay under 1e-30)."""
    from sparsecore.quality import attention_fidelity
    gen = torch.Generator().manual_seed(0)
    heads, length, dim = 2, 128, 16
    q, k, v = (torch.randn(1, heads, length, dim, generator=gen, dtype=torch.float64) for _ in range(3))
    k[:, :, 32:64] = -q[:, :, :32].mean(2, keepdim=True) * 400       # key block 1 far below for query block 0
    offsets = BlockMask.uniform_offsets(length, 32)
    base = BlockMask.from_lists([[[1], [0, 1], [2], [3]]] * heads, offsets, offsets)
    mask = BlockMask(heads, offsets, offsets, base.indptr, base.indices, unselected=Unselected("zeroth"))
    recall, low, rel, cos = _zeroth_fidelity64(q[0].numpy(), k[0].numpy(), v[0].numpy(), mask, dim ** -0.5)
    assert (low < 1e-30).all() and (recall > 0.1).all()
    found = attention_fidelity(q, k, v, mask, compute_dtype=compute_dtype)
    tol = 1e-9 if compute_dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(found.recall, recall, rtol=tol)
    np.testing.assert_allclose(found.rel_l2, rel, rtol=tol)
    np.testing.assert_allclose(found.cosine, cos, rtol=tol)
    if compute_dtype == torch.float64:
        np.testing.assert_allclose(found.min_recall, low, rtol=tol)
    else:
        assert (found.min_recall >= 0).all() and (found.min_recall < 1e-30).all()
    assert math.isclose(found.summary()["min_recall"], float(found.min_recall.min()))


# ---------------------------------------------------------------- sparsecore/registry.py
def test_a_backend_package_that_fails_to_import_fails_every_lookup_not_only_the_first(monkeypatch):
    """The registry counted itself loaded even when a package's import raised: the first lookup raised, every later
    one saw the backends registered before it, with no error."""
    import importlib

    from sparsecore import registry
    real = importlib.import_module

    def broken(name, *args):
        if name == "sparsecore.backends.portable":
            raise ImportError("portable: a broken install")
        return real(name, *args)
    monkeypatch.setattr(registry, "_REGISTRY", {})
    monkeypatch.setattr(registry, "_LOADED", False)
    monkeypatch.setattr(importlib, "import_module", broken)
    for _ in range(2):
        with pytest.raises(ImportError, match="a broken install"):
            registry.registered_backends()
    monkeypatch.setattr(importlib, "import_module", real)
    assert "portable" in registry.registered_backends() and registry._LOADED
