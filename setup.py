"""The package list: ``sparsecore``'s own subpackages and the ``ir/`` and ``backends/`` folders that
``pyproject.toml``'s package-dir maps into it, found by walking the tree (a new backend is a new folder)."""

from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
MAPPED = {"sparsecore": "sparsecore", "sparsecore.ir": "ir", "sparsecore.backends": "backends"}


def packages() -> list[str]:
    found = []
    for name, folder in MAPPED.items():
        for init in sorted((ROOT / folder).rglob("__init__.py")):
            relative = init.parent.relative_to(ROOT / folder)
            found.append(".".join([name, *relative.parts]))
    return found


setup(packages=packages())
