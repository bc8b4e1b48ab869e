"""How the peer benchmarks (``bench/radial_benchmark.py``, ``bench/sta_benchmark.py``) time the kernels their tables
compare, checked on CPU: the case loop runs on ``"cpu"`` with the GPU-only peers (FlashInfer, FlexAttention compiled,
FastVideo's Triton kernel) faked and ``kernel_timing.median_ms`` replaced by a counter, so the order in which kernels
are timed and what each row reports can be read back."""

from __future__ import annotations

import contextlib
import json
import sys
import types

import pytest
import torch

from test_bench_records import load_script

from sparsecore import VideoGeometry


def on_cpu(monkeypatch, bench) -> list[int]:
    """Run ``bench``'s case loop on the CPU: cuDNN's backend choice and CUDA syncs are no-ops, and every
    ``median_ms`` (the one ``kernel_timing.interleaved_ms`` calls, and any the script calls itself) calls the kernel
    once and returns how many kernels it has timed so far. Returns the list of the kernels' ids in timing order."""
    order: list[int] = []
    seen: dict[int, int] = {}

    def fake_median_ms(fn, min_samples: int = 10) -> float:
        fn()
        order.append(seen.setdefault(id(fn), len(seen)))
        return float(len(order))
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.nn.attention, "sdpa_kernel", lambda *backends: contextlib.nullcontext())
    monkeypatch.setattr(sys.modules["kernel_timing"], "median_ms", fake_median_ms)
    monkeypatch.setattr(bench, "median_ms", fake_median_ms, raising=False)
    return order


def interleaved(kernels: int, rounds: int = 3) -> list[list[float]]:
    """What ``interleaved_ms`` gives ``kernels`` kernels under the counting ``median_ms``, sorted: round ``r`` starts
    at kernel ``r``."""
    samples: list[list[float]] = [[] for _ in range(kernels)]
    count = 0
    for r in range(rounds):
        for i in list(range(r % kernels, kernels)) + list(range(r % kernels)):
            count += 1
            samples[i].append(float(count))
    return sorted(samples)


def check_rounds(rows: list[dict], kernels: int) -> list[dict]:
    """Every timed row has its round medians, their median and spread, and all of them came from one set of
    interleaved rounds. Returns the timed rows."""
    timed = [row for row in rows if "ms" in row]
    assert len(timed) == kernels, [row["row"] for row in rows]
    assert all("ms_rounds" in row for row in timed), [row["row"] for row in timed if "ms_rounds" not in row]
    assert sorted(row["ms_rounds"] for row in timed) == interleaved(kernels)
    for row in timed:
        assert (row["ms"], row["ms_min"], row["ms_max"]) == (sorted(row["ms_rounds"])[1], min(row["ms_rounds"]),
                                                             max(row["ms_rounds"]))
    return timed


def check_report(tmp_path, bench, rows: list[dict], kernels: int) -> None:
    """:func:`check_rounds`, and ``kernel_timing.write_rows``' json and markdown carry the rounds and spread."""
    timed = check_rounds(rows, kernels)
    meta = {"machine": "cpu", "date": "2026-12-06", "versions": {}}
    bench.write_rows(tmp_path, "kernels", "kernels", rows, meta, ("error",))
    written = [row for row in json.loads((tmp_path / "kernels.json").read_text())["rows"] if "ms" in row]
    keys = ("row", "ms", "ms_min", "ms_max", "ms_rounds")
    assert [[row[key] for key in keys] for row in written] == [[row[key] for key in keys] for row in timed]
    text = (tmp_path / "kernels.md").read_text()
    for row in timed:
        assert f"| {row['ms']:.2f} ms ({row['ms_min']:.2f}-{row['ms_max']:.2f} over 3 rounds) |" in text


def test_the_radial_benchmark_times_a_shapes_kernels_together_in_interleaved_rounds(tmp_path, monkeypatch):
    """Each kernel was timed once (one ``median_ms``), one after another: the ratios the docs give between
    sparsecore, the released FlashInfer calls and cuDNN carried the run-to-run spread of up to 15%."""
    bench = load_script("radial_benchmark")
    order = on_cpu(monkeypatch, bench)

    def released_mask(query, q_len, kv_len, frames, *, block_size, sparse_type, decay_factor, model_type):
        geometry = VideoGeometry(frames, 8, 16)
        mask = bench.radial.plan(geometry, 2, decay_factor=decay_factor, sink=model_type == "wan")
        return torch.as_tensor(mask.to_dense()[0])
    released = types.SimpleNamespace(gen_log_mask_shrinked=released_mask)
    monkeypatch.setattr(bench, "flashinfer_call", lambda block_map, q, k, v, backend: (lambda: q.clone()))
    rows = bench.case_rows(released, "tiny", 4, 8, 16, 2, 16, 0.2, True)       # 512 tokens: the released path runs
    assert [row.get("masks_equal") for row in rows if "released plan" in row["row"]] == [True]
    check_report(tmp_path, bench, rows, 4)                  # sparsecore, cuDNN, FlashInfer fa2 and auto
    assert len(order) == 12
    order.clear()
    short = bench.case_rows(released, "short", 4, 10, 13, 2, 16, 0.2, True)    # 520 tokens: sparsecore and cuDNN
    assert [row["row"] for row in short if "error" in row] == ["released path"]
    check_report(tmp_path, bench, short, 2)


def test_the_sta_benchmark_times_a_shapes_kernels_together_in_interleaved_rounds(tmp_path, monkeypatch):
    """As Radial's: sparsecore, the token order's copies, cuDNN, FlexAttention and FastVideo's kernel were each
    timed once, one after another, and the docs' ratios between them carried the run-to-run spread."""
    bench = load_script("sta_benchmark")
    order = on_cpu(monkeypatch, bench)
    monkeypatch.setattr(bench, "HEAD_DIM", 16)
    monkeypatch.setattr(bench, "flex_call", lambda mask, geometry, q, k, v: ((lambda: q.clone()), 0.0))
    fastvideo = types.SimpleNamespace(sliding_tile_attention_triton=lambda q, k, v, windows, text, has_text,
                                      dit_seq_shape: q.clone())
    rows = bench.case_rows(fastvideo, "tiny", 12, 16, 16, 0, 2, [(1, 1, 1), (3, 3, 3)], "12x16x16")
    assert [row for row in rows if "error" in row] == []
    check_report(tmp_path, bench, rows, 5)
    assert len(order) == 15


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_the_nabla_benchmark_times_its_layers_planning_and_kernels_together_in_interleaved_rounds(monkeypatch):
    """``--part kernels`` timed its five rows once each, one after another, and the docs' 1.47x (planning plus
    attention against diffusers' planning plus FlexAttention) came from those medians."""
    bench = load_script("nabla_benchmark")
    order = on_cpu(monkeypatch, bench)
    monkeypatch.setattr(bench, "HEADS", 2)
    compile_ = torch.compile                                        # the script's own call: FlexAttention eager,
    monkeypatch.setattr(torch, "compile", lambda fn, **options: compile_(fn, **options) if options else fn)  # on CPU
    rows = bench.kernel_rows(2, 0.9, (1, 3, 3))
    assert [row["masks_equal"] for row in rows] == [True] * 5
    check_rounds(rows, 5)
    assert len(order) == 15
    text = "\n".join(bench.kernel_lines(rows))
    for row in rows:
        assert f"| {row['row']} | {row['ms']:.3f} | {row['ms_min']:.3f}-{row['ms_max']:.3f} |" in text


def rounds_of(*sets: int) -> list[list[float]]:
    """What ``interleaved_ms`` gives successive sets of ``sets[i]`` kernels under the counting ``median_ms``, sorted."""
    samples, base = [], 0
    for kernels in sets:
        samples += [[value + base for value in rounds] for rounds in interleaved(kernels)]
        base += 3 * kernels
    return sorted(samples)


def spread(rounds: list[float], digits: int = 2) -> str:
    """A kernel's median round and the range of its rounds, as the markdown gives them."""
    return f"{sorted(rounds)[1]:.{digits}f} ({min(rounds):.{digits}f}-{max(rounds):.{digits}f})"


def test_the_approximation_benchmark_times_its_kernels_together_in_interleaved_rounds(triton_device, monkeypatch):
    """The first table's ``overhead`` (total / exact - 1) and ``pass`` (the launch less the statistics) came from
    single medians, the exact kernel timed long before the totals; the sweep's configs and the default table's
    statistics and cuBLAS rate likewise: every ratio carried the run-to-run spread of up to 15%."""
    triton = pytest.importorskip("triton", reason="the benchmark times Triton kernels")
    bench = load_script("approximation_benchmark")
    order = on_cpu(monkeypatch, bench)
    monkeypatch.setattr(bench, "DEVICE", triton_device)
    monkeypatch.setattr(bench, "DTYPE", torch.float16)              # the interpreter's bf16 dot is wrong
    monkeypatch.setattr(bench, "GEMM_SIZE", 32)
    monkeypatch.setattr(bench, "HEADS", 2)
    monkeypatch.setattr(bench, "GEOMETRIES", {512: VideoGeometry(4, 8, 16)})
    too_large = bench.SWEEP[-1]

    class Launch(bench.ApproximationLaunch):                      # the last config does not fit this "GPU"
        def __call__(self, *args):
            if self.config == too_large:
                raise triton.runtime.errors.OutOfResources(1 << 20, 1 << 18, "shared memory")
            return super().__call__(*args)
    monkeypatch.setattr(bench, "ApproximationLaunch", Launch)
    sweep = ("grouped-first-order",)
    rows = bench.rows_for(512, 32, check=False, sweep=sweep)
    first = 2 + 4 * len(bench.KINDS) + len(bench.SWEEP) - 1  # exact, dense; total, statistics x2, launch; configs
    assert len(order) == 3 * (first + 4), "each kernel timed 3 times, in rounds"        # default: + statistics, GEMM
    table, default = rows[:-1], rows[-1]
    recorded = {tuple(rounds) for row in table for rounds in row["ms_rounds"].values()}
    recorded |= {tuple(rounds) for rounds in default["default_ms_rounds"].values()}
    assert sorted(map(list, recorded)) == rounds_of(first, 4)
    for row in table:
        median = {name: sorted(rounds)[1] for name, rounds in row["ms_rounds"].items()}
        assert (row["exact_ms"], row["dense_sdpa_ms"]) == (median["exact"], median["dense_sdpa"])
        assert row["ms_rounds"]["exact"] == table[0]["ms_rounds"]["exact"]            # one exact kernel, one set
        if row["approximation"] == "drop":
            continue
        assert (row["total_ms"], row["statistics_ms"]) == (median["total"], median["statistics"])
        assert row["torch_statistics_ms"] == median["torch_statistics"]
        assert row["overhead"] == row["total_ms"] / row["exact_ms"] - 1
        assert row["pass_ms"] == median["launch"] - row["statistics_ms"]
        assert (row["approximation"] in sweep) == ("sweep" in row)
    swept = next(row for row in table if "sweep" in row)
    assert list(swept["sweep"]) == [bench.label(config) for config in bench.SWEEP]
    assert swept["sweep"][bench.label(too_large)] is None
    for name, ms in ((name, ms) for name, ms in swept["sweep"].items() if name != bench.label(too_large)):
        assert ms == sorted(swept["ms_rounds"][f"sweep {name}"])[1] - swept["statistics_ms"]
    paired = default["default_ms_rounds"]
    assert default["default_ratio"] == sorted(paired["grouped"])[1] / sorted(paired["drop"])[1]
    assert default["statistics_ms"] == sorted(paired["statistics"])[1]
    assert default["gemm_tflops"] == 2 * 32 ** 3 / sorted(paired["gemm"])[1] / 1e9
    text = bench.markdown({"gpu": "cpu", "date": "2026-12-06", "torch": "", "triton": "", "rows": rows})
    for row in table:
        for rounds in row["ms_rounds"].values():
            assert f" {spread(rounds)} |" in text, spread(rounds)
    for name in ("drop", "grouped"):
        assert f" {spread(paired[name])} |" in text
    assert f"| {bench.label(too_large)} |  | out of resources |" in text


def test_the_row_top_benchmark_times_torch_and_the_kernel_together_in_interleaved_rounds(triton_device, monkeypatch):
    """The markdown's speedup (torch / kernel) and the plan's two paths came from single medians, one after another."""
    bench = load_script("row_top_benchmark")
    order = on_cpu(monkeypatch, bench)
    monkeypatch.setattr(bench, "DEVICE", triton_device)
    monkeypatch.setattr(bench, "HEADS", 2)
    monkeypatch.setattr(bench, "HEAD_DIM", 16)
    monkeypatch.setattr(bench, "GEOMETRIES", {512: VideoGeometry(4, 8, 16)})
    found, find = [], bench.selection._row_top
    wrapper = lambda scores, keep: found.append(find(scores, keep)) or found[-1]  # noqa: E731
    monkeypatch.setattr(bench.selection, "_row_top", wrapper)
    (row,) = bench.rows_for(512)
    assert len(order) == 12, "each kernel timed 3 times, in rounds"
    assert sorted(row["ms_rounds"].values()) == interleaved(4)
    assert bench.selection._row_top is wrapper and len(found) == 3 and all(op is not None for op in found)
    for name, rounds in row["ms_rounds"].items():
        assert row[f"{name}_ms"] == sorted(rounds)[1]
    meta = {"date": "2026-12-06", "versions": {"gpu": "cpu"}}
    text = bench.markdown(meta, [row])
    for rounds in row["ms_rounds"].values():
        assert f" {spread(rounds, 3)} |" in text
    assert f"| {row['torch_ms'] / row['kernel_ms']:.1f}x |" in text
