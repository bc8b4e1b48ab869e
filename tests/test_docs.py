"""The code a new user copies from README.md and docs/*.md: every snippet parses, and the README's quick start
runs as written on CPU in a fresh process (its print, its files)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def snippets(path: Path) -> list[tuple[int, str]]:
    """(line, code) of each ```python block of ``path``, dedented (a block may sit in a list item)."""
    text = path.read_text(encoding="utf-8")
    return [(text[:m.start()].count("\n") + 1, textwrap.dedent(m.group(2)))
            for m in re.finditer(r"^([ \t]*)```python\n(.*?)^\1```", text, re.S | re.M)]


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_every_python_snippet_parses(path):
    for line, code in snippets(path):
        compile(code, f"{path.name}:{line}", "exec")


def test_the_readme_quick_start_runs_as_written_on_cpu(tmp_path):
    line, code = next((line, code) for line, code in snippets(ROOT / "README.md") if "BlockMask.from_dense" in code)
    pytest.importorskip("matplotlib", reason="the quick start's render() needs matplotlib")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"README.md:{line}: {result.stderr[-2000:]}"
    assert re.fullmatch(r"BlockMask\(heads=4, q_len=1024, kv_len=1024, blocks=8x8, nnz=\d+, density=0\.\d{4}\)\n",
                        result.stdout)
    assert (tmp_path / "mask.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "mask.safetensors").stat().st_size > 0
