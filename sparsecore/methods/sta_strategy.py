"""FastVideo's STA mask strategy format: windows per (step, layer, head), read and checked.

The format is FastVideo's (hao-ai-lab/FastVideo up to 37cab18, ``fastvideo/attention/backends/sliding_tile_attn.py``
and the offline search's ``STA_configuration.py``, e.g. ``assets/mask_strategy_hunyuan.json``): a json object whose
keys are ``"step_layer_head"`` and whose values are ``[wt, wh, ww]``, the window in tiles along (frames, rows,
columns). :mod:`.sta` plans masks from it; :mod:`.sta_search` writes it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from sparsecore.ir.validation import check_int, parse_json

STRATEGY_FILE_LIMIT = 256 * 2 ** 20          # bytes: FastVideo's files are 4 MiB (50 steps x 60 layers x 24 heads)
SIZE_LIMIT = 2 ** 31                         # tiles and windows: larger ones than any grid behave as the grid
KEY = re.compile(r"([0-9]{1,9})_([0-9]{1,9})_([0-9]{1,9})", re.ASCII)


def triple(value: Any, field: str) -> tuple[int, int, int]:
    if isinstance(value, (str, bytes, Mapping)) or not hasattr(value, "__len__") or len(value) != 3:
        raise TypeError(f"{field}: expected three ints (frames, rows, columns), got {value!r}")
    checked = tuple(check_int(v, f"{field}[{i}]", 1) for i, v in enumerate(value))
    if max(checked) > SIZE_LIMIT:
        raise ValueError(f"{field}: expected sizes of at most {SIZE_LIMIT:,} (a window or tile larger than any grid "
                         f"covers it whole), got {checked}")
    return checked


class MaskStrategy(Mapping):
    """A mask strategy as :func:`read_strategy` returns it, read-only: ``{(step, layer): windows}``, one
    ``(wt, wh, ww)`` per head in head order, the same heads at every (step, layer) and the same layers at every step;
    ``windows``: the distinct windows. ``grid``: the tile grid it was searched on (:func:`.sta_search.choose_windows`),
    whose whole it writes at its dense steps (FastVideo's rule), so that on another grid those steps would run a
    sparse window: :class:`.sta.STASession` refuses other grids. None where not recorded (FastVideo's json has no
    place for it: a file read or a mapping). ``widest``: the largest window along each axis; ``whole_grid_steps``:
    the first steps, where every layer gives every head that window, before any step that does not, as FastVideo
    writes its dense steps (the searched grid), in a strategy with narrower windows too (else empty): a session warns
    where ``widest`` does not cover a grid, since those steps then run sparse."""

    def __init__(self, table: dict[tuple[int, int], tuple[tuple[int, int, int], ...]],
                 grid: tuple[int, int, int] | None = None) -> None:
        self._table = dict(table)
        self.grid = grid
        self.heads = len(next(iter(self._table.values())))
        self.layers = frozenset(layer for _, layer in self._table)
        self.steps = frozenset(step for step, _ in self._table)
        self.windows = frozenset(window for windows in self._table.values() for window in windows)
        self.widest = tuple(max(window[axis] for window in self.windows) for axis in range(3))
        narrower = {step for (step, _), windows in self._table.items() if set(windows) != {self.widest}}
        whole, first_other = self.steps - narrower, min(narrower, default=None)
        self.whole_grid_steps = () if first_other is None else tuple(sorted(s for s in whole if s < first_other))

    def __getitem__(self, key: tuple[int, int]) -> tuple[tuple[int, int, int], ...]:
        return self._table[key]

    def __iter__(self):
        return iter(self._table)

    def __len__(self) -> int:
        return len(self._table)


def _load(path: Any) -> Any:
    try:
        with open(path, "rb") as file:
            data = file.read(STRATEGY_FILE_LIMIT + 1)          # not the size the file system claims
    except OSError as err:
        raise ValueError(f"mask_strategy: could not read {os.fspath(path)!r} ({err}); pass the path of FastVideo's "
                         f"mask strategy json file or the mapping itself") from None
    if len(data) > STRATEGY_FILE_LIMIT:
        raise ValueError(f"mask_strategy: expected a json file of at most {STRATEGY_FILE_LIMIT:,} bytes, got more "
                         f"at {os.fspath(path)!r}; pass FastVideo's mask strategy file")
    try:
        return parse_json(data, f"mask_strategy: {os.fspath(path)!r}")
    except ValueError as err:
        raise ValueError(f"{err}; pass FastVideo's mask strategy json file (one window per step, layer and head) or "
                         f"the mapping itself") from None


def read_strategy(source: Any) -> MaskStrategy:
    """FastVideo's mask strategy (a mapping ``"step_layer_head" -> [wt, wh, ww]``, or the path of its json file) as
    a :class:`MaskStrategy`, checked: every (step, layer) lists heads ``0 .. H - 1`` (the same H everywhere) and every
    step the same layers. A :class:`MaskStrategy` is returned as it is (read a file once, pass it on)."""
    if isinstance(source, MaskStrategy):
        return source
    if isinstance(source, (str, os.PathLike)):
        source = _load(source)
    if not isinstance(source, Mapping) or not source:
        raise TypeError(f"mask_strategy: expected a non-empty mapping 'step_layer_head' -> [wt, wh, ww] or its json "
                        f"file's path, got {type(source).__name__}")
    heads: dict[tuple[int, int], dict[int, tuple[int, int, int]]] = {}
    for name, window in source.items():
        if not isinstance(name, str):
            raise TypeError(f"mask_strategy: expected string keys 'step_layer_head', got {type(name).__name__}")
        match = KEY.fullmatch(name)
        if match is None:
            raise ValueError(f"mask_strategy: expected keys 'step_layer_head' of three non-negative ints (at most 9 "
                             f"digits each), got {name[:40]!r}")
        step, layer, head = map(int, match.groups())
        found = heads.setdefault((step, layer), {})
        if head in found:
            raise ValueError(f"mask_strategy: step {step} layer {layer} head {head} is listed twice (key {name!r}); "
                             f"pass one window per step, layer and head")
        found[head] = triple(window, f"mask_strategy[{name!r}]")
    table = {}
    layers_of: dict[int, set[int]] = {}
    for (step, layer), found in heads.items():
        missing = sorted(set(range(len(found))) - set(found))
        if missing:
            raise ValueError(f"mask_strategy: step {step} layer {layer} lists {len(found)} heads but not head "
                             f"{missing[0]}; expected heads 0 .. H - 1 for every step and layer listed")
        table[(step, layer)] = tuple(found[h] for h in range(len(found)))
        layers_of.setdefault(step, set()).add(layer)
    counts = {len(windows) for windows in table.values()}
    if len(counts) > 1 or len({frozenset(found) for found in layers_of.values()}) > 1:
        sizes = sorted({len(found) for found in layers_of.values()})
        raise ValueError(f"mask_strategy: expected the same heads at every step and layer and the same layers at every "
                         f"step, got {sorted(counts)} heads and layer sets of {sizes} layers; pass a strategy written "
                         f"for one model")
    return MaskStrategy(table)
