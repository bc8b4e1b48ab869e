"""What the benchmark scripts under ``bench/`` record beside their timings, checked on CPU: the date, machine and
package versions of every result (``bench/report.py``'s ``run_meta``), what an eff TFLOP/s counts on a mask that
approximates its unselected blocks (``report.eff_tflops``), the selection table's densities and rates
(``bench/cuda_benchmark.py``), and ``bench/first_call_probe.py``'s time budget (its children faked: no GPU here)."""

from __future__ import annotations

import datetime
import importlib.util
import json
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsecore import BlockMask
from sparsecore.ir import Unselected
from sparsecore.methods.approximation import with_unselected

BENCH = Path(__file__).resolve().parent.parent / "bench"


def load_script(name: str):
    """``bench/<name>.py`` as a module, with ``bench/`` importable as the scripts expect."""
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module                   # a dataclass looks its module up while it is being made
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


@pytest.mark.parametrize("seq_len, nominal, kept_per_row", [(32760, 0.1, 2), (32760, 0.25, 5), (98280, 0.25, 16)])
def test_selection_table_reports_the_frame_masks_actual_density_and_rate(seq_len, nominal, kept_per_row):
    bench = load_script("cuda_benchmark")
    heads, head_dim, frame = 12, 64, 1560
    mask = load_script("cuda_cases").random_rows(heads, seq_len, nominal, block=frame, seed=3)
    frames = seq_len // frame
    density = kept_per_row / frames                                    # whole frames kept per row of frames
    kept_flops = 4.0 * heads * frames * kept_per_row * frame * frame * head_dim
    point = bench.selection_point(mask, nominal, head_dim, {"triton": 2.5, "fa4": 1.25})
    assert point["density"] == pytest.approx(density, rel=1e-12) and point["density"] != pytest.approx(nominal)
    assert point["fastest"] == "fa4"
    assert point["eff_tflops"]["fa4"] == pytest.approx(kept_flops / 1.25 / 1e9, rel=1e-12)
    assert point["eff_tflops"]["triton"] == pytest.approx(kept_flops / 2.5 / 1e9, rel=1e-12)
    text = bench.markdown([], {"date": "2026-12-05", "versions": load_script("report").versions("cpu"),
                               "selection": [point]})
    assert f"| {frame} | {density:.4f} ({nominal}) | {seq_len} | {head_dim} | 2.500 | 1.250 |  | fa4 | " \
           f"{kept_flops / 1.25 / 1e9:.1f} |" in text


# scripts that write a result (a json or markdown file) and record no date and versions of their own
RESULT_WRITERS = re.compile(r"write_text\(|write_report\(|write_rows\(|json\.dump\(")
GIVEN_THEIR_META = {"report.py": "its writers take the caller's meta", "kernel_timing.py": "write_rows takes meta"}
# helpers that record the date and report.versions together: report.run_meta, report.probe_main (run_meta),
# e2e_report.environment
SHARED_META = re.compile(r"\brun_meta\(|\bprobe_main\(|\benvironment\(")


def test_run_meta_records_the_date_machine_and_versions():
    meta = load_script("report").run_meta("cpu", tokens=5)
    assert meta["date"] == datetime.date.today().isoformat() and meta["tokens"] == 5
    assert {"gpu", "torch", "triton", "flash_attn_4", "flashinfer", "diffusers", "python"} <= set(meta["versions"])
    assert meta["versions"]["gpu"]                                       # the machine: the CPU here


WRITING_SCRIPTS = sorted(p.name for p in BENCH.glob("*.py")
                         if p.name not in GIVEN_THEIR_META and RESULT_WRITERS.search(p.read_text()))


@pytest.mark.parametrize("script", WRITING_SCRIPTS)
def test_every_result_a_script_writes_records_date_and_versions(script):
    source = (BENCH / script).read_text()
    records_both = SHARED_META.search(source) or ("versions(" in source and re.search(r"[\"']date[\"']", source))
    assert records_both, f"bench/{script} writes a result without the date and versions: meta = report.run_meta()"


@pytest.mark.parametrize("unselected", ["drop", "zeroth", "global-first-order", "grouped-first-order:2"])
def test_eff_tflops_says_when_it_leaves_the_approximation_out(unselected):
    report = load_script("report")
    rng = np.random.default_rng(11)
    kept = rng.random((3, 5, 6)) < 0.4
    kept[:, np.arange(5), np.arange(5)] = True
    q_offsets, kv_offsets = np.array([0, 64, 128, 192, 256, 300]), np.array([0, 64, 128, 192, 256, 320, 350])
    lists = BlockMask.from_lists([[np.flatnonzero(row) for row in head] for head in kept], q_offsets, kv_offsets)
    mask = with_unselected(lists, Unselected.parse(unselected))
    pairs = sum(int(np.diff(q_offsets)[i] * np.diff(kv_offsets)[j]) for _, i, j in zip(*np.nonzero(kept)))
    rate = report.eff_tflops(mask, 32, 0.5)
    assert rate["eff_tflops"] == pytest.approx(4 * pairs * 32 / 0.5 / 1e9, rel=1e-12)
    if unselected == "drop":
        assert set(rate) == {"eff_tflops"}
    else:
        assert "kept blocks only" in rate["eff_tflops_counts"] and "approximation" in rate["eff_tflops_counts"]


def first_call_run(tmp_path, monkeypatch, child_s: float, argv: list[str]) -> tuple[dict, list[float]]:
    """``first_call_probe``'s parent on a fake clock, every child taking ``child_s`` (cut at its time limit):
    the report it wrote and the limits the children got."""
    probe = load_script("first_call_probe")
    now, limits = [0.0], []

    def child(case, result, env, sample, timeout_s):
        limits.append(timeout_s)
        now[0] += min(child_s, timeout_s)
        if child_s > timeout_s:
            return {"case": case, "error": f"no result within {timeout_s:.0f} s"}
        times = dict.fromkeys(("imports_s", "cuda_start_s", "compile_s", "first_call_s", "second_call_s",
                               "new_mask_first_call_s", "new_length_first_call_s"), 1.0)
        return {"case": case, "what": probe.CASES[case], "backend": "triton", "new_mask_backend": "fa4",
                "new_length_backend": "triton", **times}

    def bytecode(pycache):
        now[0] += 20.0

    monkeypatch.setattr(probe, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    monkeypatch.setattr(probe, "run_child", child)
    monkeypatch.setattr(probe, "bytecode_pass", bytecode)
    monkeypatch.setattr(sys, "argv", ["first_call_probe.py", "--out", str(tmp_path), "--pycache", str(tmp_path)]
                        + argv)
    probe.main()
    (written,) = tmp_path.glob("first-call-*.json")
    return json.loads(written.read_text()), limits


def test_first_call_probe_default_fits_a_device_call(tmp_path, monkeypatch):
    report, limits = first_call_run(tmp_path, monkeypatch, 105.0, [])   # the docstring's longest usual process
    assert 20.0 + sum(min(105.0, limit) for limit in limits) <= 500.0
    assert [r["caches"] for r in report["records"]] == ["empty", "kept"] * (len(limits) // 2)
    assert not [r for r in report["records"] if "error" in r] and len(report["records"]) >= 4


def test_first_call_probe_keeps_to_its_budget_and_names_what_it_did_not_run(tmp_path, monkeypatch):
    cases = ["lvsa", "adaspa", "random", "adaspa6x"]
    report, limits = first_call_run(tmp_path, monkeypatch, 400.0, ["--cases", *cases, "--budget-s", "500"])
    assert 20.0 + sum(limits) <= 500.0                                   # every hung child cut within the budget
    records = report["records"]
    assert [(r["case"], r["caches"]) for r in records] == [(c, k) for c in cases for k in ("empty", "kept")]
    not_run = [r for r in records if r["error"].startswith("not run")]
    assert len(not_run) == len(records) - len(limits) >= 6
    assert all(f"--cases {r['case']}" in r["error"] for r in not_run)
    assert report["meta"]["budget_s"] == 500.0 and report["meta"]["versions"]["torch"]


def test_interleaved_timing_rotates_the_order_each_round(monkeypatch):
    kernel_timing = load_script("kernel_timing")
    timed = []
    monkeypatch.setattr(kernel_timing, "median_ms", lambda fn: (timed.append(fn()), float(len(timed)))[1])
    samples = kernel_timing.interleaved_ms({name: (lambda name=name: name) for name in "abc"}, rounds=4)
    assert "".join(timed) == "abc" "bca" "cab" "abc"                     # each round starts one kernel later
    assert samples == {"a": [1.0, 6.0, 8.0, 10.0], "b": [2.0, 4.0, 9.0, 11.0], "c": [3.0, 5.0, 7.0, 12.0]}
    assert kernel_timing.summary(samples["b"]) == {"ms": 6.5, "ms_min": 2.0, "ms_max": 11.0}
    assert kernel_timing.interleaved_ms({}, rounds=3) == {}


def test_fa4_checks_timer_times_a_lengths_kernels_together_and_records_a_failing_one(monkeypatch):
    """``bench/fa4_check.py``'s table: queued kernels are called once, a kernel that raises gets its error (and a
    ``fail``), the others the median of their interleaved rounds and its spread; nothing is lost from the rows."""
    fa4_check = load_script("fa4_check")
    monkeypatch.setattr(fa4_check.torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(fa4_check, "FAILURES", [])
    monkeypatch.setattr(fa4_check, "fail", lambda case, error: fa4_check.FAILURES.append(f"{case}: {error}"))
    rounds = {}

    def fake_rounds(fns, count):
        rounds.update({i: [float(10 * i + r) for r in range(count)] for i in fns})
        return {i: rounds[i] for i in fns}
    monkeypatch.setattr(fa4_check, "interleaved_ms", fake_rounds)
    timer = fa4_check.Timer()

    def broken():
        raise RuntimeError("no kernel")
    timer.add("dense", 64, 1.0, "a", lambda: None, 2e9)
    timer.add("random128", 64, 0.5, "b", broken, 1e9, tile=[128, 128])
    timer.add("random128", 64, 0.5, "c", lambda: None, 1e9, tile=[64, 64])
    assert timer.rows == []                                              # nothing is timed before the flush
    timer.flush()
    a, b, c = timer.rows
    assert (a["ms"], a["ms_min"], a["ms_max"], a["ms_rounds"]) == (1.0, 0.0, 2.0, [0.0, 1.0, 2.0])
    assert a["eff_tflops"] == 2e9 / 1.0 / 1e9 and c["ms"] == 21.0 and c["tile"] == [64, 64]
    assert "ms" not in b and b["error"] == "RuntimeError: no kernel" and b["tile"] == [128, 128]
    assert set(rounds) == {0, 2} and fa4_check.FAILURES == ["time random128 b: RuntimeError: no kernel"]
    assert "| random128 | 64 | 0.5000 | b | **RuntimeError: no kernel** |" in fa4_check.markdown(
        {"date": "d", "versions": {}}, [], timer.rows, [])


def test_the_fa4_checks_reference_is_float64_attention_under_the_lists_tokens():
    """``fa4_check``'s exactness reference: its token mask, expanded from the CSR lists, is the oracle's, and its
    float64 attention is the oracle's (odd block boundaries, empty rows, GQA, batch 2)."""
    from oracle import dense_attention, expand_to_tokens
    exactness = load_script("fa4_check_exactness")
    rng = np.random.default_rng(7)
    for case in range(12):
        q_offsets = np.concatenate([[0], np.cumsum(rng.integers(1, 40, rng.integers(1, 7)))])
        kv_offsets = np.concatenate([[0], np.cumsum(rng.integers(1, 40, rng.integers(1, 7)))])
        heads = 2 * int(rng.integers(1, 3))
        keep = rng.random((heads, len(q_offsets) - 1, len(kv_offsets) - 1)) < 0.4
        mask = BlockMask.from_lists([[np.flatnonzero(row) for row in head] for head in keep], q_offsets, kv_offsets)
        tokens = exactness.token_mask(mask, "cpu")
        np.testing.assert_array_equal(tokens.numpy(), expand_to_tokens(mask), err_msg=f"case {case}")
        gen = torch.Generator().manual_seed(case)
        q = torch.randn(2, heads, mask.q_len, 8, generator=gen)
        k, v = (torch.randn(2, heads // 2, mask.kv_len, 8, generator=gen) for _ in range(2))
        out, lse = exactness.reference(q, k, v, tokens, 0.3)
        want_out, want_lse = dense_attention(q.numpy(), k.numpy(), v.numpy(), tokens.numpy(), 0.3)
        assert out.dtype == lse.dtype == torch.float64
        np.testing.assert_allclose(out.numpy(), want_out, rtol=0, atol=1e-12, err_msg=f"case {case}")
        np.testing.assert_allclose(lse.numpy(), want_lse, rtol=0, atol=1e-12, err_msg=f"case {case}")


def test_the_multigpu_reports_header_counts_the_most_gpus_its_rows_ran_on(tmp_path, capsys):
    """The header's GPU count came from the last row's meta, which is the one-GPU reference where that ran last."""
    bench = load_script("multigpu_benchmark")
    method = next(iter(bench.STEPS))

    def row(world: int) -> dict:
        meta = {"gpus": world, "gpu": "NVIDIA H200", "date": "2026-12-06", "torch": "t", "diffusers": "d",
                "triton": "tr", "flashinfer": "f"}
        return {"model": "wan-1.3b", "method": method, "layers_run": 2, "layers_full": 30, "world": world,
                "step_s": 1.0 / world, "density": None, "peak_gib_per_gpu": [1.0] * world, "backends": [],
                "meta": meta}
    (tmp_path / "multigpu-rows.jsonl").write_text("\n".join(json.dumps(row(w)) for w in (2, 1)) + "\n")
    assert bench.report(tmp_path) == 0
    header = (tmp_path / "multigpu-2026-12-06.md").read_text().splitlines()[2]
    assert header.startswith("Machine: 2x NVIDIA H200"), header


def test_the_tiny_end_to_end_run_gives_radial_a_row(tmp_path, monkeypatch):
    """``e2e_benchmark --tiny`` is the harness's smoke run on any device: Radial Attention's 128-token blocks did not
    fit its frames of 4 x 4 tokens, so its row was always an error and the smoke run never ran it."""
    bench = load_script("e2e_benchmark")
    monkeypatch.setattr(sys, "argv", ["e2e_benchmark.py", "--tiny", "--models", "wan-1.3b", "--modes", "eager",
                                      "--lengths", "1x", "--methods", "radial", "--out", str(tmp_path)])
    assert bench.main() == 0
    rows = json.loads((tmp_path / "e2e-tiny.json").read_text())["rows"]
    assert {r["method"] for r in rows} == {"dense", "radial"}
    assert [r["error"] for r in rows if "error" in r] == []
