"""A benchmark's results on disk: ``<stem>.json`` (its meta and rows) and ``<stem>.md`` (its table)."""

from __future__ import annotations

import json
from pathlib import Path


def write_report(stem: Path, meta: dict, rows: list[dict], table: str) -> None:
    """Write ``stem.json`` and ``stem.md`` (the folder is made if missing)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    stem.with_suffix(".md").write_text(table)
