"""The command line on user errors: one line on stderr, a non-zero exit, no traceback, no false claim.

Runs ``sparsecore.cli.main`` in-process on hostile command lines (Hypothesis draws devices,
dtypes, backends, counts, seeds and paths), through the real ``python -m sparsecore.cli``
entry point for a few, and with matplotlib missing (pictures skipped with a one-line note).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostile import ROOT, bounded

import sparsecore
from sparsecore import BlockMask, UnsupportedError
from sparsecore.cli import main
from sparsecore.demo import DemoShape, run_demo

AVAILABLE = {d for d in sparsecore.known_devices()
             if any(d in b.capabilities.devices and b.unavailable_reason(d) is None
                    for b in sparsecore.registered_backends().values())}
UNAVAILABLE = sorted(set(sparsecore.known_devices()) - AVAILABLE)


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    with bounded():
        try:
            code = main(argv)
        except SystemExit as exit_:              # argparse's usage errors exit through SystemExit
            code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, out: str, err: str, command: str, *words: str) -> None:
    assert code not in (0, None), f"exit status {code} for a user error; stdout {out!r}"
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {lines}"
    assert lines[0].startswith(f"sparsecore {command}: error: ") or lines[0].startswith("sparsecore: error: "), lines
    assert "Traceback" not in err + out
    for word in words:
        assert word in lines[0], (word, lines[0])


def runs_nowhere(device: str) -> bool:
    """Refused here: an unknown or absent kind, or an index that is not a plain number (torch refuses '01')."""
    kind, colon, index = device.partition(":")
    return kind not in AVAILABLE or bool(colon) and not (index.isascii() and index.isdigit() and
                                                          (index == "0" or not index.startswith("0")))


DEVICES = st.one_of(st.text(max_size=8).filter(lambda s: s.partition(":")[0] not in sparsecore.known_devices()
                                                and not s.startswith("-")),
                    st.sampled_from(["gpu", "npu", "cpu:abc", "cuda", "CPU", "cpu:", "cpu:-1", "cuda:0", "mps", "xpu",
                                     "reference:x", "cpu:0:0", "cpu:01", "reference:00"]).filter(runs_nowhere))


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=30)
@given(device=DEVICES)
def test_check_and_demo_refuse_devices_that_do_not_run_here(capsys, device):
    for command in ("check", "demo"):
        code, out, err = run([command, "--device", device], capsys)
        assert_one_line_error(code, out, err, command, "device")


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=30)
@given(argv=st.one_of(
    st.sampled_from(["int8", "float", "fp16", "", "bool"]).map(lambda d: ["--dtype", d]),
    st.sampled_from(["bogus", "", "Portable", "triton", "npu", "reference"]).map(lambda b: ["--backend", b]),
    st.sampled_from(["0", "-1", "x", "1e3", "2.5", ""]).map(lambda n: ["--cases", n]),
    st.sampled_from(["-1", "x", str(2**64), "0.5"]).map(lambda s: ["--seed", s]),
    st.just(["--bogus"]), st.just([])))
def test_check_refuses_bad_options(capsys, argv):
    """The issue: --dtype int8 and --backend bogus printed tracebacks; --cases 0 claimed success having run nothing."""
    device = [] if argv == [] else ["--device", "cpu"]
    code, out, err = run(["check", *device, *argv], capsys)
    assert_one_line_error(code, out, err, "check")
    assert "match dense attention" not in out


def test_check_on_float16_reference_names_the_dtype(capsys):
    code, out, err = run(["check", "--device", "reference", "--dtype", "float16"], capsys)
    assert_one_line_error(code, out, err, "check", "float16")


def test_check_never_claims_cases_it_did_not_run(capsys, monkeypatch):
    import sparsecore.check as check

    def cannot(*args, **kwargs):
        raise UnsupportedError("backend 'portable' cannot take this mask: pretend")
    monkeypatch.setattr(check, "compile", cannot)
    code, out, err = run(["check", "--device", "cpu", "--cases", "3"], capsys)
    assert code == 1 and "match dense attention" not in out and "NOTHING CHECKED" in out
    assert out.count("skip case") == 3


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=20)
@given(content=st.one_of(st.binary(max_size=64), st.just(b"")))
def test_show_refuses_bad_files_in_one_line(tmp_path_factory, capsys, content):
    path = tmp_path_factory.mktemp("show") / "bad.safetensors"
    path.write_bytes(content)
    code, out, err = run(["show", str(path)], capsys)
    assert_one_line_error(code, out, err, "show", str(path))


def test_show_refuses_missing_files_folders_and_unwritable_pictures(tmp_path, capsys):
    for argv in (["show", str(tmp_path / "missing.safetensors")], ["show", str(tmp_path)], ["show"],
                 ["show", "/dev/zero"]):
        assert_one_line_error(*run(argv, capsys), "show")
    good = BlockMask.from_dense(np.eye(3, dtype=bool)[None], 30, 30, 10).save(tmp_path / "m.safetensors")
    code, out, err = run(["show", str(good), "--png", "/proc/no/such/place.png"], capsys)
    assert_one_line_error(code, out, err, "show", "/proc/no", "a --png in a writable folder")   # the folder it made
    assert_one_line_error(*run(["show", str(tmp_path / "missing.safetensors")], capsys), "show",
                          "missing.safetensors", "pass a mask file that exists")
    assert_one_line_error(*run(["show", str(good), "--png", ""], capsys), "show", "mask.png")   # pathlib's words before


def test_a_closed_pipe_ends_the_command_quietly(tmp_path, capsys, monkeypatch):
    """`sparsecore show m | head`: the reader closed the pipe; exit 0, no 'Broken pipe' error (exit 2 before)."""
    from sparsecore import cli

    def closed(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "_show", closed)
    code, out, err = run(["show", str(tmp_path / "m.safetensors")], capsys)
    assert code == 0 and err == ""


def test_a_path_stdout_cannot_encode_is_printed_escaped(tmp_path, capsys, monkeypatch):
    """A non-UTF-8 file name (a surrogate-escaped str) printed to a strict UTF-8 stdout, after the work was done,
    made the command report failure (exit 2): it is printed escaped."""
    import io
    import os
    good = BlockMask.from_dense(np.eye(3, dtype=bool)[None], 30, 30, 10).save(tmp_path / "m.safetensors")
    buffer = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(buffer, encoding="utf-8", errors="strict"))
    picture = str(tmp_path).encode() + b"/r\xff.png"
    code = main(["show", str(good), "--png", os.fsdecode(picture)])
    sys.stdout.flush()
    assert code == 0 and b"r\\udcff.png" in buffer.getvalue()


def test_demo_refuses_an_output_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    assert_one_line_error(*run(["demo", "--out", str(target), "--device", "cpu"], capsys), "demo", "--out")


@pytest.mark.parametrize("module", ["sparsecore.cli", "sparsecore"])
@pytest.mark.parametrize("argv", [["check", "--device", "gpu"], ["check", "--device", "cpu", "--dtype", "int8"],
                                  ["check", "--device", "cpu", "--cases", "0"], ["demo", "--device", "cuda:abc"],
                                  ["show", "/nonexistent.safetensors"]])
def test_the_real_entry_point_prints_one_line(argv, module):
    result = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr


# ------------------------------------------------------------------------------- without matplotlib
def _no_matplotlib(monkeypatch):
    import sparsecore.ir.draw as draw

    def missing():
        raise draw.MatplotlibMissing(f"render() needs matplotlib (No module named 'matplotlib'); install it with: "
                                     f"{draw.INSTALL_MATPLOTLIB}")
    monkeypatch.setattr(draw, "matplotlib_pyplot", missing)


def test_show_without_matplotlib_prints_the_stats_and_a_note(tmp_path, capsys, monkeypatch):
    _no_matplotlib(monkeypatch)
    good = BlockMask.from_dense(np.eye(3, dtype=bool)[None], 30, 30, 10).save(tmp_path / "m.safetensors")
    code, out, err = run(["show", str(good)], capsys)
    assert code == 0 and "density=0.3333" in out and "picture skipped: render() needs matplotlib" in out
    assert "pip install matplotlib" in out and not (tmp_path / "m.png").exists()


def test_demo_without_matplotlib_skips_pictures_with_one_note(tmp_path, monkeypatch):
    _no_matplotlib(monkeypatch)
    notes: list[str] = []
    rows = run_demo(tmp_path, device="cpu", shape=DemoShape(frames=3, height=4, width=4, heads=2, head_dim=16),
                    log=notes.append)
    assert [r["png"] for r in rows] == [None] * len(rows) and all(r["rel_err"] < 1e-5 for r in rows)
    assert sum("mask pictures skipped" in n for n in notes) == 1 and (tmp_path / "demo.json").exists()


def test_show_with_matplotlib_blocked_in_a_fresh_process(tmp_path):
    good = BlockMask.from_dense(np.eye(3, dtype=bool)[None], 30, 30, 10).save(tmp_path / "m.safetensors")
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from sparsecore.cli import main\n"
            f"sys.exit(main(['show', {str(good)!r}]))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0 and "picture skipped" in result.stdout and "Traceback" not in result.stderr


def test_show_never_writes_its_picture_over_the_mask(tmp_path, capsys):
    """A mask saved as ``m.png`` (``save`` takes any name): the default picture path is the file itself, refused
    in one line, and the mask is still there to load."""
    mask = BlockMask.from_dense(np.eye(3, dtype=bool)[None], 30, 30, 10)
    path = mask.save(tmp_path / "m.png")
    for argv in (["show", str(path)], ["show", str(path), "--png", str(path)]):
        assert_one_line_error(*run(argv, capsys), "show", "overwrite the mask file")
    # matplotlib adds .png to a name without one: "--png m" wrote m.png, the mask, and printed "picture: m"
    assert_one_line_error(*run(["show", str(path), "--png", str(tmp_path / "m")], capsys), "show", "path")
    assert BlockMask.load(path) == mask
    # a picture name that is not a PNG's is refused before anything is printed (the stats came first, then the error)
    code, out, err = run(["show", str(path), "--png", str(tmp_path / "m.jpg")], capsys)
    assert_one_line_error(code, out, err, "show", "--png", ".png")
    assert out == ""


def test_demo_on_the_reference_device_is_refused_in_one_line(capsys, tmp_path):
    """``reference`` runs NumPy arrays; the demo's torch inputs reached it and raised a traceback."""
    assert_one_line_error(*run(["demo", "--device", "reference", "--out", str(tmp_path)], capsys), "demo",
                          "device 'reference'")


def test_a_png_that_is_a_folder_is_refused_with_a_remedy_that_works(tmp_path, capsys):
    """``--png pictures.png`` naming an existing folder: the remedy suggested that same folder ("pass e.g.
    'pictures.png'"), and the line said ``show:`` twice ("sparsecore show: error: show: --png path: ...")."""
    good = BlockMask.from_dense(np.eye(3, dtype=bool)[None], 30, 30, 10).save(tmp_path / "m.safetensors")
    folder = tmp_path / "pictures.png"
    folder.mkdir()
    code, out, err = run(["show", str(good), "--png", str(folder)], capsys)
    assert_one_line_error(code, out, err, "show", "--png", "(a folder)", repr(str(folder / "mask.png")))
    assert out == "" and err.count("show:") == 1
    for argv in (["show", str(good), "--png", str(tmp_path / "m.jpg")], ["show", str(good), "--png", str(good)]):
        assert run(argv, capsys)[2].count("show:") == 1
    with pytest.raises(ValueError, match=r"\(a folder\); pass e\.g\. .*pictures\.png/mask\.png'"):
        BlockMask.from_dense(np.eye(3, dtype=bool)[None], 30, 30, 10).render(folder)
