"""``bench/report.py``'s ``write_report``: a benchmark's ``<stem>.json`` and ``<stem>.md``, also for a stem that holds
a dot (the e2e benchmark's ``cogvideox-1.5`` runs)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "report.py"


def load_report():
    spec = importlib.util.spec_from_file_location("report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_stem_with_a_dot_keeps_its_whole_name(tmp_path):
    stem = tmp_path / "results" / "e2e-cogvideox-1.5-2026-12-02"
    load_report().write_report(stem, {"model": "cogvideox-1.5"}, [{"step": 0}], "| table |\n")
    assert sorted(p.name for p in stem.parent.iterdir()) == ["e2e-cogvideox-1.5-2026-12-02.json",
                                                             "e2e-cogvideox-1.5-2026-12-02.md"]
    assert json.loads((stem.parent / "e2e-cogvideox-1.5-2026-12-02.json").read_text()) == {
        "meta": {"model": "cogvideox-1.5"}, "rows": [{"step": 0}]}
    assert (stem.parent / "e2e-cogvideox-1.5-2026-12-02.md").read_text() == "| table |\n"
