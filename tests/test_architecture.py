"""The layout's rules, checked on the source: module sizes, import directions, no cycles, device-free methods.

Library modules are every ``.py`` file under ``sparsecore/``, ``ir/`` and ``backends/``, named by
their import path (``ir/csr.py`` is ``sparsecore.ir.csr``).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"sparsecore": "sparsecore", "ir": "sparsecore.ir", "backends": "sparsecore.backends"}
LONG_MODULES_ALLOWED = {"sparsecore.backends.npu.emulator"}      # the op specs of two torch_npu ops
MAX_LINES = 400
DEVICE_LIBRARIES = ("triton", "flashinfer", "torch_npu", "flash_attn", "cutlass")


def library_modules() -> dict[str, Path]:
    modules = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join([package, *parts])
            modules[name.removesuffix(".__init__")] = path
    return modules


def imports(name: str, path: Path, top_level_only: bool) -> set[str]:
    """Absolute names of the sparsecore modules ``name`` imports (module level only, or anywhere)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if node.module is not None:                        # "from . import x" imports x, not the package
                found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    modules = library_modules()
    return {n for n in found if n in modules and n != name}


def test_no_library_module_is_over_the_size_limit():
    long = {name: len(path.read_text().splitlines()) for name, path in library_modules().items()}
    over = {name: lines for name, lines in long.items() if lines > MAX_LINES and name not in LONG_MODULES_ALLOWED}
    assert not over, f"modules over {MAX_LINES} lines: {over}"


def test_module_level_imports_have_no_cycle():
    modules = library_modules()
    graph = {name: imports(name, path, top_level_only=True) for name, path in modules.items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = trail[trail.index(nxt):] + [nxt] if nxt in trail else [node, nxt]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_backends_import_neither_the_compile_api_nor_the_integrations():
    for name, path in library_modules().items():
        if name.startswith("sparsecore.backends"):
            upward = {n for n in imports(name, path, top_level_only=False)
                      if n.startswith(("sparsecore.kernel", "sparsecore.integrations", "sparsecore.methods"))}
            assert not upward, f"{name} imports {sorted(upward)}"


def test_methods_run_with_every_device_library_blocked():
    code = ("import sys\n"
            f"for name in {DEVICE_LIBRARIES!r}: sys.modules[name] = None\n"
            "import torch, sparsecore\n"
            "from sparsecore.methods import adaspa, lvsa, pasa\n"
            "g = sparsecore.VideoGeometry(6, 4, 4)\n"
            "q = torch.randn(1, 2, g.tokens, 16)\n"
            "masks = [lvsa.plan(g, 2, step=1, reference_frames=2), pasa.plan(g, 2, step=20, q=q, k=q, block_size=16),\n"
            "         adaspa.plan(g, 2, step=10, q=q, k=q, block_size=16)]\n"
            f"assert not [m for m in {DEVICE_LIBRARIES!r} if sys.modules.get(m) is not None]\n"
            "print(len(masks))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "3", result.stderr[-2000:]


@pytest.mark.parametrize("package", ["sparsecore", "sparsecore.ir", "sparsecore.methods", "sparsecore.backends",
                                     "sparsecore.integrations", "sparsecore.integrations.diffusers",
                                     "sparsecore.backends.cuda", "sparsecore.backends.npu"])
def test_every_package_says_what_lives_there(package):
    path = library_modules()[package]
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert doc and len(doc.split()) >= 12, f"{package}: __init__ docstring should say what lives there"


def test_import_from_a_fresh_checkout_root_needs_no_install():
    code = "import sparsecore; print(sparsecore.compile.__module__, sorted(sparsecore.registered_backends()))"
    result = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, '.'); {code}"],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("sparsecore.kernel") and "portable" in result.stdout


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "bench").glob("*.py")))
def test_bench_scripts_parse(script):
    """Benchmark scripts run only on GPU machines or by hand; a syntax error must not wait for that."""
    source = (ROOT / "bench" / script).read_text()
    ast.parse(source, filename=script)
