"""A benchmark's results on disk: ``<stem>.json`` (its meta and rows) and ``<stem>.md`` (its table)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
from pathlib import Path
from typing import Callable

WARMUP_ENV = "SPARSECORE_WARMUP"
KEPT_BLOCKS_ONLY = "kept blocks only; the approximation pass's work not counted"


def time_one_backend() -> str:
    """Pin sparsecore's warm-up mode to ``wait`` unless ``$SPARSECORE_WARMUP`` chose one, and return the mode.

    In the default ``background`` mode a kernel's first calls run on Triton while a slow backend (FA4) loads
    on a worker thread, so a timed row could mix two backends under one name; with ``wait`` a kernel runs
    one backend from its first call (``sparsecore.warmup``)."""
    return os.environ.setdefault(WARMUP_ENV, "wait")


def versions(device: str = "cuda") -> dict[str, str]:
    """What a measurement depends on: the device, CUDA, cuDNN, Python, torch, triton, flash-attn-4 and its CuTe DSL,
    FlashInfer, diffusers, sparsecore, and sparsecore's warm-up mode."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    import sparsecore
    on_cuda = str(device).startswith("cuda") and torch.cuda.is_available()
    info = {"gpu": torch.cuda.get_device_name() if on_cuda else platform.processor() or platform.machine(),
            "torch": torch.__version__, "cuda": torch.version.cuda or "", "python": platform.python_version(),
            "cudnn": str(torch.backends.cudnn.version()) if on_cuda else "", "sparsecore": sparsecore.__version__,
            "warmup": os.environ.get(WARMUP_ENV, "background (default)")}
    for name, dist in (("triton", "triton"), ("flash_attn_4", "flash-attn-4"), ("cutlass_dsl", "nvidia-cutlass-dsl"),
                       ("flashinfer", "flashinfer-python"), ("diffusers", "diffusers")):
        try:
            info[name] = version(dist)
        except PackageNotFoundError:
            info[name] = "not installed"
    return info


def eff_tflops(mask, head_dim: int, ms: float) -> dict:
    """``eff_tflops`` of one call of ``ms`` milliseconds on ``mask``, from its kept FLOPs (``mask.flops``), and for a
    mask that approximates its unselected blocks (``mask.unselected`` other than ``"drop"``: PASA's default) what
    that rate counts, ``eff_tflops_counts``: the kept blocks only, so it reads higher than the work done and does
    not compare with a drop-only mask's rate (issue 16's approximation pass is timed but not counted)."""
    rate = {"eff_tflops": mask.flops(head_dim) / ms / 1e9}
    return rate if mask.unselected.kind == "drop" else rate | {"eff_tflops_counts": KEPT_BLOCKS_ONLY}


def write_report(stem: Path, meta: dict, rows: list[dict], table: str) -> None:
    """Write ``stem.json`` and ``stem.md`` (the folder is made if missing)."""
    stem.parent.mkdir(parents=True, exist_ok=True)      # not with_suffix: a stem may hold a dot ("cogvideox-1.5")
    (stem.parent / f"{stem.name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (stem.parent / f"{stem.name}.md").write_text(table)


def run_meta(device: str = "cuda", **extra) -> dict:
    """A result's meta, plus ``extra``: today's date, and the machine and package versions (:func:`versions` of
    ``device``), which every json and markdown under ``bench/results`` records so that a table can be traced to
    the setup that produced it."""
    return {"date": datetime.date.today().isoformat(), **extra, "versions": versions(device)}


def probe_main(doc: str, name: str, measure: Callable[[], list[dict]],
               markdown: Callable[[dict, list[dict]], str]) -> int:
    """A GPU probe's command line (``--out DIR``): measure, write ``DIR/<name>-<date>.{json,md}``, print the table."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    time_one_backend()
    meta = run_meta()
    rows = measure()
    write_report(args.out / f"{name}-{meta['date']}", meta, rows, markdown(meta, rows))
    print(markdown(meta, rows))
    return 0
