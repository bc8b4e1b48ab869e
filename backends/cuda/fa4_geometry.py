"""The tables of :func:`.fa4_layout.to_fa4`'s general path that follow from a mask's block offsets and tiles alone.

A method's masks share one geometry (their offsets) while their lists change at every call, so these tables are
built once per geometry, tiles and key ranges and kept in host memory (pinned with CUDA) for the conversion to copy
to its device at each call, without a wait.
"""

from __future__ import annotations

import numpy as np
import torch

from sparsecore.ir.memo import LruMemo
from sparsecore.ir.uploads import HostPack

from .fa4_key_order import key_runs
from .fa4_tile_lists import host_tables

GEOMETRY_ENTRIES = 8       # block geometries whose tables stay in host memory (:func:`geometry_tables`)
_GEOMETRIES = LruMemo(GEOMETRY_ENTRIES)     # shared by threads: compile() may convert in a warm-up thread


def block_of_position(offsets: np.ndarray, count: int) -> np.ndarray:
    """Block id of positions ``0 .. count-1`` (positions past the end get the last block)."""
    ids = np.searchsorted(offsets, np.arange(count, dtype=np.int64), side="right") - 1
    return np.minimum(ids, len(offsets) - 2)


def geometry_tables(q_off: np.ndarray, kv_off: np.ndarray, tile_m: int, tile_n: int, edges: list[int],
                    kv_order: np.ndarray | None, on_triton: bool) -> tuple[HostPack, int, int, np.ndarray]:
    """The general path's tables that follow from the block offsets (and key order) alone, int64 in host memory
    (pinned with CUDA) for the caller to upload per call (:meth:`HostPack.to`, no wait): the runs of one IR block
    inside each key tile in the order FA4 reads the keys, the rows each query tile overlaps (``rows [rmax, QT]``,
    rmax 1-3 for real masks), tile widths, token -> block, block sizes, which key tiles are ``movable`` (a tile of
    full width inside one block keeps its status in :func:`.fa4_key_order.key_order`'s order, as one of that
    block's whole tiles there: only the others can get cheaper) and the kernel's tables
    (:func:`.fa4_tile_lists.host_tables`); with them the most runs in a key tile, the run count, and offsets whose
    block sizes are each block's tokens in movable key tiles
    (for :func:`.fa4_layout.to_fa4`'s bound on a key order). Built once per geometry (a method's masks share one):
    the last :data:`GEOMETRY_ENTRIES` are kept, no device memory held between calls (1.5 MB at CogVideoX 1.5 2x;
    building took several ms of host time a call). A key order depends on the lists: such tables are built anew."""
    if kv_order is not None:
        return _tables(q_off, kv_off, tile_m, tile_n, edges, kv_order, on_triton)
    key = (q_off.tobytes(), kv_off.tobytes(), tile_m, tile_n, tuple(edges), on_triton)
    return _GEOMETRIES.get(key, lambda: _tables(q_off, kv_off, tile_m, tile_n, edges, None, on_triton))


def _tables(q_off: np.ndarray, kv_off: np.ndarray, tile_m: int, tile_n: int, edges: list[int],
            kv_order: np.ndarray | None, on_triton: bool) -> tuple[HostPack, int, int, np.ndarray]:
    q_len, kv_len = int(q_off[-1]), int(kv_off[-1])
    QT, NT = -(-q_len // tile_m), -(-kv_len // tile_n)
    kv_block = block_of_position(kv_off, kv_len)
    if kv_order is not None:
        kv_block = kv_block[kv_order]
    run_tile, run_block, run_length = key_runs(kv_block, tile_n)
    q_tile_start = np.arange(QT, dtype=np.int64) * tile_m
    row_first = np.searchsorted(q_off, q_tile_start, side="right") - 1
    row_last = np.searchsorted(q_off, np.minimum(q_tile_start + tile_m, q_len) - 1, side="right") - 1
    rmax = int((row_last - row_first).max()) + 1
    host = {"run_tile": run_tile, "run_block": run_block, "run_length": run_length,
            "width": np.minimum(tile_n, kv_len - np.arange(NT, dtype=np.int64) * tile_n),
            "rows": np.minimum(row_first[None, :] + np.arange(rmax)[:, None], row_last[None, :]),
            "q_block": block_of_position(q_off, QT * tile_m), "q_sizes": np.diff(q_off),
            "kv_block": np.pad(kv_block, (0, NT * tile_n - kv_len), mode="edge")}
    host["movable"] = (np.bincount(run_tile, minlength=NT) > 1) | (host["width"] < tile_n)
    most_runs = 1
    if kv_order is not None:
        host["kv_order"] = kv_order
    if on_triton:
        tables, most_runs = host_tables(run_tile, NT, edges)
        host.update(tables)
    pack = HostPack({name: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)) for name, a in host.items()})
    in_movable = np.zeros(len(kv_off) - 1, dtype=np.int64)
    np.add.at(in_movable, run_block, run_length * host["movable"][run_tile])
    return pack, most_runs, len(run_tile), np.concatenate([[0], np.cumsum(in_movable)])


def forget_geometries() -> None:
    """Drop the cached geometry tables (:func:`sparsecore.clear_cache`)."""
    _GEOMETRIES.clear()
