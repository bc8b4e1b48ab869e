"""The sparsecore command: demo, show, check (run in-process through cli.main)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from sparsecore import BlockMask
from sparsecore.cli import main
from sparsecore.demo import DemoShape, format_table, run_demo


def test_demo_prints_the_table_and_writes_pictures(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert "mask" in out and "density" in out and "vs dense" in out
    for name in ("dense", "local-frame-window", "random-blocks"):
        assert name in out
        assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert "[1/" in err  # progress goes to stderr
    report = json.loads((tmp_path / "demo.json").read_text())
    rows = report["rows"]
    assert report["timing"] == {"warmup": 3, "repeats": 9, "statistic": "median"} and "median of 9" in out
    assert all(row["rel_err"] < 1e-5 and row["ms"] > 0 and row["dense_sdpa_ms"] > 0 for row in rows)
    assert rows[0]["density"] == 1.0 and rows[1]["density"] < 0.5


def test_demo_rows_are_correct_on_a_tiny_shape(tmp_path):
    rows = run_demo(tmp_path, device="cpu", shape=DemoShape(frames=3, height=4, width=4, heads=2, head_dim=16),
                    log=lambda s: None)
    assert [r["mask"] for r in rows][:3] == ["dense", "local-frame-window", "random-blocks"]
    assert all(r["rel_err"] < 1e-5 for r in rows)
    assert "FLOPs saved" in format_table(rows)
    assert {r["mask"]: r["unselected"] for r in rows}["pasa"].startswith("grouped-first-order")   # its default
    indexed = run_demo(tmp_path, device="cpu:0", shape=DemoShape(frames=2, height=2, width=4, heads=1, head_dim=8),
                       log=lambda s: None)                     # an indexed CPU device runs float32 too, not bf16
    assert json.loads((tmp_path / "demo.json").read_text())["dtype"] == "torch.float32"
    assert all(r["rel_err"] < 1e-5 for r in indexed)


def test_the_demo_table_says_its_flops_leave_out_the_approximation_pass():
    """PASA's row said "FLOPs saved" as its kept blocks alone save them, with no word of the pass that approximates
    the blocks it skips (grouped first-order, FLOPs of its own): the saving was overstated."""
    row = {"backend": "portable", "blocks": "4x4", "density": 0.5, "flops_saved": 0.5, "recall": 0.9,
           "dense_rel_err": 0.1, "max_err": 1e-6, "rel_err": 1e-7, "ms": 1.0, "dense_sdpa_ms": 2.0}
    table = format_table([{**row, "mask": "adaspa", "unselected": "drop"},
                          {**row, "mask": "pasa", "unselected": "grouped-first-order:32"}]).splitlines()
    width = len(table[0])
    assert re.search(r" 50\.0% ", table[2]) and re.search(r" 50\.0%\* ", table[3])      # only the approximating row
    assert len(table[2]) == len(table[3]) and all(len(line) <= width for line in table[4:])     # columns aligned
    legend = " ".join(" ".join(table[4:]).split())
    assert "FLOPs saved: 1 - the computed blocks' FLOPs" in legend
    assert "* a mask that approximates the blocks it skips (PASA's): that pass costs FLOPs not counted here" in legend


def test_demo_compiles_in_the_wait_warm_up_mode(tmp_path, monkeypatch):
    """In the default background mode a slow preferred backend (FA4) loaded while the table was timed: the backend
    and ms columns depended on when it finished."""
    from sparsecore import demo

    seen, real = [], demo.compile
    monkeypatch.setattr(demo, "compile", lambda *args, **kwargs: seen.append(kwargs) or real(*args, **kwargs))
    monkeypatch.setenv("SPARSECORE_WARMUP", "background")
    run_demo(tmp_path, device="cpu", shape=DemoShape(frames=2, height=2, width=4, heads=1, head_dim=8),
             log=lambda s: None)
    assert seen and all(kwargs.get("warmup") == "wait" for kwargs in seen)


def test_show_prints_stats_and_writes_a_png(tmp_path, capsys):
    mask = BlockMask.from_dense(np.eye(4, dtype=bool)[None], 64, 64, 16, meta={"method": "diag"})
    path = mask.save(tmp_path / "m.safetensors")
    assert main(["show", str(path)]) == 0
    out = capsys.readouterr().out
    assert "density=0.2500" in out and '\n  method: "diag"\n' in out and mask.fingerprint() in out
    assert (tmp_path / "m.png").exists()


def test_show_prints_meta_as_json_values_not_python_reprs(tmp_path, capsys):
    """``show`` printed ``str(dict(mask.meta))``: the read-only copy's ``mappingproxy({...})``, tuples and ``None``
    instead of the JSON values the file holds."""
    meta = {"method": "pasa", "density": np.float64(0.2), "window": (1, 2), "params": {"a": [1.5, None], "on": True},
            "note": "two\nlines", "bad key\n": 1}
    path = BlockMask.from_dense(np.eye(2, dtype=bool)[None], 20, 20, 10, meta=meta).save(tmp_path / "m.safetensors")
    assert main(["show", str(path)]) == 0
    out = capsys.readouterr().out
    shown = out[out.index("\nmeta:\n") + 1:out.index("\nfingerprint:")].split("\n")
    assert shown == ["meta:", '  "bad key\\n": 1', "  density: 0.2", '  method: "pasa"', '  note: "two\\nlines"',
                     '  params: {"a": [1.5, null], "on": true}', "  window: [1, 2]"]
    many = BlockMask.from_dense(np.eye(2, dtype=bool)[None], 20, 20, 10, meta={f"k{i:02}": "x" * 500
                                                                                for i in range(30)})
    assert main(["show", str(many.save(tmp_path / "many.safetensors"))]) == 0
    out = capsys.readouterr().out
    lines = out[out.index("\nmeta:\n") + 1:out.index("\nfingerprint:")].split("\n")
    assert len(lines) == 26 and lines[-1] == "  ... (6 more keys)" and max(map(len, lines)) <= 160
    empty = BlockMask.from_dense(np.eye(2, dtype=bool)[None], 20, 20, 10).save(tmp_path / "empty.safetensors")
    assert main(["show", str(empty)]) == 0 and "\nmeta: {}\n" in capsys.readouterr().out


def test_show_reports_a_bad_file_and_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a mask")
    assert main(["show", str(bad)]) == 2
    assert "not a valid sparsecore mask file" in capsys.readouterr().err



def test_the_demo_legend_says_what_an_approximating_rows_kernel_error_is_measured_against(tmp_path):
    """The legend (and README) said every row's max/rel err is "against float64 dense attention under the same mask";
    PASA's row is measured against the reference lowering, which also approximates the blocks the mask skips (dense
    attention over the kept blocks alone differs from its output by far more than the error shown)."""
    rows = run_demo(tmp_path, device="cpu", shape=DemoShape(frames=3, height=4, width=4, heads=2, head_dim=16),
                    log=lambda s: None)
    legend = " ".join(" ".join(format_table(rows).splitlines()[2 + len(rows):]).split())
    assert "* rows: against the reference lowering (float64), which approximates the skipped blocks too" in legend
    pasa = next(r for r in rows if r["mask"] == "pasa")
    assert pasa["unselected"] != "drop" and pasa["rel_err"] < 1e-5


@pytest.mark.parametrize("device", ["reference", "reference:0", "cpu"])
def test_check_passes_on_correct_backends(device, capsys):
    assert main(["check", "--device", device, "--cases", "6", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "all 6 cases match dense attention" in out
    errors = [float(e) for e in re.findall(r"rel err (\S+)", out)]
    assert len(errors) == 6 and (max(errors) < 1e-12) == device.startswith("reference")   # float64 by default there


def test_check_fails_on_a_wrong_kernel(monkeypatch, capsys):
    import sparsecore
    from sparsecore.backends.portable import lowering

    real = lowering._attend

    def off_by_a_little(*args, **kwargs):
        out, lse = real(*args, **kwargs)
        return out * 1.001, lse
    monkeypatch.setattr(lowering, "_attend", off_by_a_little)
    sparsecore.clear_cache()
    assert main(["check", "--device", "cpu", "--cases", "6", "--seed", "1"]) == 1
    assert "MISMATCH" in capsys.readouterr().out
    sparsecore.clear_cache()


@pytest.mark.parametrize("error", [ValueError("q: expected 4 dims, got 3"), TypeError("lse: expected a tensor"),
                                   RuntimeError("CUDA error: an illegal memory access was encountered")])
@pytest.mark.parametrize("where", ["call", "compile"])
def test_check_fails_a_kernel_that_raises_on_a_case_it_takes(monkeypatch, capsys, error, where):
    """A kernel raising ValueError or TypeError on a valid case (a bug of the kernel) was reported as the user's
    usage error ('sparsecore check: error: ...', exit 2, no FAIL line); another error ended in a traceback. Now a
    FAIL line names the error and the stage, and the check exits 1."""
    import sparsecore
    from sparsecore import check
    from sparsecore.backends.portable import lowering

    def raising(*args, **kwargs):
        raise error
    monkeypatch.setattr(lowering, "_attend", raising) if where == "call" else monkeypatch.setattr(
        check, "compile", raising)
    sparsecore.clear_cache()
    try:
        code = main(["check", "--device", "cpu", "--cases", "3", "--seed", "1"])
    finally:
        sparsecore.clear_cache()
    out, err = capsys.readouterr()
    said = f"{'the call' if where == 'call' else 'compile'} raised {type(error).__name__}: {error}"
    assert (code, err) == (1, ""), (code, err)
    assert re.search(r"^FAIL case   0 \[\S+\] " + re.escape(said), out, re.M) and "KERNEL ERROR" in out, out


@pytest.mark.parametrize("break_it, says", [
    (lambda out, lse: (out[0], lse), "output [4, 57, 16] torch.float32 on cpu, expected q's [1, 4, 57, 16]"),
    (lambda out, lse: (out.double(), lse), "output [1, 4, 57, 16] torch.float64 on cpu, expected q's"),
    (lambda out, lse: (out, lse.double()), "LSE [1, 4, 57] torch.float64, expected float32 [1, 4, 57]"),
    (lambda out, lse: (out.transpose(1, 2), lse), "output [1, 57, 4, 16] torch.float32 on cpu, expected q's"),
    (lambda out, lse: (out, lse.transpose(1, 2)), "LSE [1, 57, 4] torch.float32, expected float32 [1, 4, 57]")])
def test_check_fails_a_kernel_that_breaks_the_calling_convention(monkeypatch, capsys, break_it, says):
    """A result of another shape (broadcast against the reference), dtype or LSE dtype matched dense attention's
    numbers, so check reported 'all cases match' (a review helper's 8 of 8); an output of a shape that does not
    broadcast (heads and tokens swapped) ended the command in NumPy's traceback ('operands could not be broadcast
    together') instead of the FAIL line naming the shape."""
    import sparsecore
    from sparsecore import check
    real = check.compile

    def broken(*args, **kwargs):
        kernel = real(*args, **kwargs)

        class Wrapped:
            backend = kernel.backend

            def __call__(self, *inputs, **options):
                return break_it(*kernel(*inputs, **options))
        return Wrapped()

    monkeypatch.setattr(check, "compile", broken)
    monkeypatch.setattr(check, "random_case", lambda rng, dims, approximate: (BlockMask.full(4, 57, 40, 16), 2, 16))
    sparsecore.clear_cache()
    assert main(["check", "--device", "cpu", "--cases", "3"]) == 1
    printed = capsys.readouterr().out
    assert "MISMATCH" in printed and says in printed


def test_check_runs_the_backend_a_users_kernel_ends_up_on_at_every_head_dim(monkeypatch):
    """``check`` compiles in the ``wait`` warm-up mode (in ``background`` a slow preferred backend, FA4, was never
    the one checked: every random case is a new layout, whose first calls run the fallback), and draws head dims up
    to 128 (it stopped at 64)."""
    from sparsecore import check

    seen, real = [], check.compile
    monkeypatch.setattr(check, "compile", lambda *args, **kwargs: seen.append(kwargs) or real(*args, **kwargs))
    monkeypatch.setenv("SPARSECORE_WARMUP", "background")
    assert check.run_check("cpu", None, 3, 0, "float32", lambda result: None).passed == 3
    assert seen and all(kwargs.get("warmup") == "wait" for kwargs in seen)
    assert 128 in check._head_dims("cpu", None) and 128 in check._head_dims("cuda", "triton")


def test_check_compares_the_lse(monkeypatch, capsys):
    """A kernel whose LSE is off by 1e-3 and whose output is right fails the check (it compared outputs only): seed 2
    starts with a mask that drops its unlisted blocks, whose output does not depend on the LSE."""
    import sparsecore
    from sparsecore.backends.portable import lowering

    real = lowering._attend

    def lse_off(*args, **kwargs):
        out, lse = real(*args, **kwargs)
        return out, None if lse is None else lse + 1e-3
    monkeypatch.setattr(lowering, "_attend", lse_off)
    sparsecore.clear_cache()
    assert main(["check", "--device", "cpu", "--cases", "6", "--seed", "2"]) == 1
    out = capsys.readouterr().out
    failed = re.search(r"FAIL case   0 \[portable\] rel err (\S+)  lse err (\S+) ", out)
    assert "MISMATCH" in out and failed and "unselected" not in out
    assert float(failed.group(1)) < 1e-5 < float(failed.group(2))        # the output passes, the LSE does not
    sparsecore.clear_cache()


def test_check_draws_approximating_masks_except_for_the_definition_itself():
    """A third of the cases approximate their unlisted blocks (held to the reference lowering, PASA's definition),
    except when the reference lowering is the one checked; rows that attend to nothing must be -inf on both sides."""
    from sparsecore import check

    for device, approximating in (("cpu", True), ("reference", False)):
        results = []
        assert check.run_check(device, None, 12, 3, "float32", results.append).ok
        assert any("unselected=" in r.description for r in results) == approximating
        assert all(r.lse_err <= check.LSE_TOLERANCE["float32"] for r in results)
    ref = np.array([[0.5, -np.inf]])
    assert check.lse_error(np.array([[0.5, 2.0]]), ref) == check.lse_error(np.array([[0.5]]), ref) == np.inf
    assert check.lse_error(np.array([[0.5 + 1e-6, -np.inf]]), ref) == pytest.approx(1e-6)
    # each row against its own size: a row of LSE 0.5 off by 3e-4 fails beside one of 40 (it passed as 7.5e-6)
    assert check.lse_error(np.array([[0.5 + 3e-4, 40.0]]), np.array([[0.5, 40.0]])) == pytest.approx(3e-4)


def test_the_cli_yardstick_matches_the_oracle_and_keeps_a_nan_row_nan():
    """``masked_dense_attention`` (``sparsecore check``'s and the demo's accuracy columns) gave 0 for a row made NaN
    by a NaN query, where the reference kernel and dense attention give NaN, and a non-finite value reached rows that
    do not attend it (0 * inf); empty rows stay 0 / -inf."""
    from oracle import dense_attention, expand_to_tokens
    from sparsecore.dense import masked_dense_attention
    rng = np.random.default_rng(4)
    keep = rng.random((4, 3, 3)) < 0.5
    keep[0, 1] = False                                                  # an empty row
    keep[2, 0, 0] = True                                                # the NaN query's row lists a block
    mask = BlockMask.from_dense(keep, 24, 24, 8)
    q, k, v = (rng.standard_normal((1, heads, 24, 16)) for heads in (4, 2, 2))
    out, lse = masked_dense_attention(mask, q, k, v, 0.3)
    want_out, want_lse = dense_attention(q, k, v, expand_to_tokens(mask), 0.3)
    np.testing.assert_allclose(out, want_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-12)
    assert (out[0, 0, 8:16] == 0).all() and (lse[0, 0, 8:16] == -np.inf).all()
    q[0, 2, 3] = np.nan
    out, _ = masked_dense_attention(mask, q, k, v, 0.3)
    assert np.isnan(out[0, 2, 3]).all() and np.isfinite(np.delete(out[0, 2], 3, axis=0)).all()
    q[0, 2, 3] = 0.5
    v[0, 0, 20, 1], v[0, 0, 21, 2] = np.inf, np.nan            # key block 2 of key head 0 (query heads 0, 1)
    out, _ = masked_dense_attention(mask, q, k, v, 0.3)
    rows = np.repeat(keep[:2, :, 2], 8, axis=1)                 # [head, query token]: attends key block 2
    assert rows.any() and (~rows).any()
    assert (out[0, :2, :, 1][rows] == np.inf).all() and np.isnan(out[0, :2, :, 2][rows]).all()
    assert np.isfinite(out[0, :2][~rows]).all() and (out[0, 0, 8:16] == 0).all()    # not attending, and empty


def test_the_cli_yardstick_forms_the_terms_of_an_infinite_value_as_dense_attention_does():
    """A row made NaN by its query stayed NaN only until it attended a +inf value (it became +inf there), and a +inf
    value whose weight is exactly 0 (its key's score is -inf) gave +inf where dense attention gives NaN (0 * inf)."""
    from oracle import dense_attention, expand_to_tokens
    from sparsecore.dense import masked_dense_attention
    rng = np.random.default_rng(7)
    mask = BlockMask.full(2, 16, 16, 8)
    q, k, v = (rng.standard_normal((1, heads, 16, 4)) for heads in (2, 1, 1))
    q = np.abs(q)                                               # a key of -inf scores -inf in every row
    q[0, 0, 3, 1] = np.nan                                      # head 0, query 3: every weight NaN
    v[0, 0, 5, 0] = np.inf                                      # a positive weight in every other row: +inf
    k[0, 0, 12], v[0, 0, 12, 2] = -np.inf, np.inf               # weight 0: NaN
    out, _ = masked_dense_attention(mask, q, k, v, 0.3)
    with np.errstate(invalid="ignore"):
        want, _ = dense_attention(q, k, v, expand_to_tokens(mask), 0.3)
    assert np.isnan(out[0, 0, 3]).all()      # (the oracle reads a NaN row maximum as a row without keys: 0)
    others = np.ones(out.shape[:3], dtype=bool)
    others[0, 0, 3] = False
    np.testing.assert_allclose(out[others], want[others], rtol=1e-12)
    assert (out[others][:, 0] == np.inf).all() and np.isnan(out[others][:, 2]).all()
