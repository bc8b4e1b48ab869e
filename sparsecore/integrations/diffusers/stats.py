"""Per (run, layer, step, geometry) statistics of a handle: what ran, how often, how long.

Values that need the device (a device mask's density, event timings) are read when
:meth:`Stats.rows` is called, never on the attention path. Records keep a mask's kept-pair
count and the kernel's backend name, never the mask or the kernel: a generation's records must
not hold every step's lists and plans. A count made on a CUDA device is copied to pinned host
memory without waiting (:class:`~sparsecore.ir.uploads.HostCounts`; a 0-d tensor per record had
kept 512 bytes of device memory each: PASA's records of three steps held 44.5 KB at 2x, growing
with every step of a generation). Only the records of the current run and the one before it are kept
(:data:`KEPT_RUNS`): a process serving many generations would otherwise hold 1,500 records (30 layers x 50
steps) more each generation, with their timing events. With timing on, each plan's host
time is measured too (``plan_ms``: from the processor's call to a kernel that only has to
launch; the device is synchronized first, so earlier layers' work is not counted).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import threading
import time

import torch

from sparsecore.geometry import VideoGeometry
from sparsecore.ir import BlockMask
from sparsecore.ir.uploads import HostCounts
from sparsecore.methods import HeadShard
from sparsecore.timing import Stopwatch, synchronize

from .audit import summary


@dataclass
class Record:
    """One (run, layer, step, geometry): its fields, what its mask kept, the backend that ran, its times."""

    fields: dict
    kept: list = field(default_factory=list)   # each planned mask's kept token pairs (0-d tensors or ints); none: dense
    kept_on: torch.device | None = None   # where ``kept`` was counted, if it is read after a device's work
    visible: int = 1                 # token pairs of one head that dense attention computes (geometry.visible_pairs)
    pairs: int = 0                   # the pairs dense attention computes on the planned masks' heads: density's whole
    backend: str = "dense"
    dense_kernels: set = field(default_factory=set)   # what its dense calls ran: "model" (diffusers' dispatch) or
                                                      # sparsecore's dense kernel's name
    watch: Stopwatch | None = None
    plan_seconds: float | None = None
    audit: list = field(default_factory=list)     # the audited calls' Fidelity (:mod:`.audit`)

    def ran(self, mask: BlockMask, kernel: Any, counts: HostCounts, kept: Any = None) -> None:
        """Note a sparse mask planned for this record's calls and the kernel that ran it (the kept-pair count goes
        to ``counts`` when the mask is on a CUDA device). ``kept``: the mask's kept pairs where the caller counted
        them already (on a device copy of a mask held on the host). A record whose calls each plan their own mask
        (PASA, NABLA per sample, guidance as separate calls) counts them all: its density is theirs together."""
        kept = mask.kept_pairs().sum() if kept is None else kept
        if isinstance(kept, torch.Tensor):
            self.kept.append(counts.add(kept))
            self.kept_on = kept.device
        else:
            self.kept.append(kept)
        self.pairs += mask.num_heads * self.visible
        self.backend = kernel.backend.name


KEPT_RUNS = 2        # the current run's records and the previous run's


class Stats:
    def __init__(self) -> None:
        self.timing = False
        self.dense_kernel: str | None = None   # what the processors' dense call ran (they set it, the planner reads it)
        self._records: dict[tuple, Record] = {}
        self.counts = HostCounts()                # the records' kept-pair counts made on a GPU
        self._watch_lock = threading.Lock()       # a record's first timed calls in two threads make one watch

    def record(self, run: int, layer: int, step: int, geometry: VideoGeometry, seq_len: int, heads: int,
               shard: HeadShard | None, action: str) -> Record:
        """The record of this (run, layer, step, geometry): a new one, or the one planned before (after set_step, or
        after a failed attempt); :meth:`planned` counts the call in ``calls`` once its plan is made."""
        key = (run, layer, step, geometry)
        found = self._records.get(key)
        if found is not None:
            return found
        if self._records and run > next(reversed(self._records))[0]:     # a new run: forget the older runs
            self._records = {k: r for k, r in self._records.items() if k[0] > run - KEPT_RUNS}
        fields = {"run": run, "layer": layer, "step": step, "action": action, "calls": 0,
                  "tokens": geometry.tokens, "text_tokens": geometry.text_tokens, "padding": seq_len - geometry.tokens,
                  "heads": [0, heads] if shard is None else [shard.start, shard.stop]}
        self._records[key] = Record(fields, visible=geometry.visible_pairs)
        return self._records[key]

    def time(self, record: Record, like: torch.Tensor, fn: Callable[[], Any]) -> Any:
        """``fn()``, timed into ``record`` on ``like``'s device when timing is on (threads share one watch)."""
        if not self.timing:
            return fn()
        with self._watch_lock:
            if record.watch is None:
                record.watch = Stopwatch(like.device)
            watch = record.watch
        with watch:
            return fn()

    def planned(self, plan: Callable[[], Any], device: torch.device) -> Any:
        """``plan()`` (which returns an object with a ``record``), counted as a call of its record once made (a failed
        attempt is not a call), its host time added there when timing is on."""
        if self.timing:
            synchronize(device)
        began = time.perf_counter()
        result = plan()
        result.record.fields["calls"] += 1
        if self.timing:                                     # a record planned at several calls sums them
            result.record.plan_seconds = (result.record.plan_seconds or 0.0) + time.perf_counter() - began
        return result

    def rows(self) -> list[dict]:
        """One dict per record in call order (keys: see ``SparseAttentionHandle.stats``)."""
        out = []
        records = list(self._records.values())      # a copy: a generation in another thread may add records meanwhile
        for device in {r.kept_on for r in records if r.kept_on is not None}:
            synchronize(device)                      # the counts' copies to the host have run
        for record in records:
            if not record.fields["calls"]:         # no plan made yet: its attempts failed, or one is being made
                continue
            row = dict(record.fields)
            row["density"] = sum(float(k) for k in record.kept) / record.pairs if record.kept else 1.0
            row["backend"] = record.backend
            if record.dense_kernels and not record.kept:
                row["dense_kernel"] = "+".join(sorted(record.dense_kernels))
            seconds, timed = record.watch.totals() if record.watch is not None else (0.0, 0)
            if timed:
                row.update(ms=seconds * 1e3 / timed, ms_total=seconds * 1e3)
            if record.plan_seconds is not None:
                row["plan_ms"] = record.plan_seconds * 1e3
            if record.audit:
                row.update(summary(record.audit))
            out.append(row)
        return out
