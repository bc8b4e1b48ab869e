"""A benchmark's results on disk: ``<stem>.json`` (its meta and rows) and ``<stem>.md`` (its table)."""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path
from typing import Callable


def write_report(stem: Path, meta: dict, rows: list[dict], table: str) -> None:
    """Write ``stem.json`` and ``stem.md`` (the folder is made if missing)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    stem.with_suffix(".md").write_text(table)


def gpu_meta(**extra) -> dict:
    """A GPU probe's meta: today's date, and the versions of torch, the GPU, triton and flash-attn-4, plus ``extra``."""
    from importlib import metadata

    import torch
    versions = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0),
                **{name: metadata.version(name) for name in ("triton", "flash-attn-4")}}
    return {"date": datetime.date.today().isoformat(), **extra, "versions": versions}


def probe_main(doc: str, name: str, measure: Callable[[], list[dict]],
               markdown: Callable[[dict, list[dict]], str]) -> int:
    """A GPU probe's command line (``--out DIR``): measure, write ``DIR/<name>-<date>.{json,md}``, print the table."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    meta = gpu_meta()
    rows = measure()
    write_report(args.out / f"{name}-{meta['date']}", meta, rows, markdown(meta, rows))
    print(markdown(meta, rows))
    return 0
