"""Triton kernel: FA4's full and mask key-tile lists of one (query tile, head), read from the IR's packed block map.

One program per (query tile, head) walks the key tiles ``BLOCK`` at a time. For each of the (at most
``rows_per_tile``) IR rows the query tile overlaps and each of the (at most ``most_runs``) runs of one key block
inside a key tile, it looks the block up in the row's bits (``keep_bits``, bit ``j % 32`` of word ``j // 32``) and
adds the run's length to the row's covered keys of that tile: a tile every row covers whole is *full*, one some row
covers in part is a *mask* tile (the rule of :mod:`.fa4_layout`). ``WRITE`` false: the counts per key range
(``Edges``, padded to ``PARTS`` ranges with empty ones) go to ``Counts [H, QT, 2, PARTS]``, and those in key tiles
flagged ``Movable`` (which a key order may change) to ``Moved [H, QT, 2]``; true: the tile ids go, ascending, to
the lists ``FullIdx [H, QT, full_width]`` and ``MaskIdx [H, QT, mask_width]`` through a running prefix sum. No block
or tile map is built.

The row and run loops run at run time, ``RUN_STEP`` runs unrolled a step (their lookups in flight at once; past a
tile's last run masked off): unrolled whole, tiny blocks (4 tokens on 128-token tiles: 33 rows x 32 runs) made a
thousand lookups and compiled for minutes. On HunyuanVideo 1.5's joint mask (bench/fa4_conversion_probe.py, H200)
both passes took 0.69 ms unrolled whole, 1.00 ms so, 1.20 with nothing unrolled, 1.35 with 2 rows x 4 runs a step
(bench/results/gpu-2026-12-04-runs/thirtieth-session). No length, count or width is specialized on, so the kernel
compiles once per ``PARTS`` and ``WRITE`` (Triton would compile again for each class of their divisibility by 16).
"""

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["num_q_tiles", "num_kv_tiles", "num_rows", "words", "full_width", "mask_width",
                               "rows_per_tile", "most_runs"])
def fa4_tile_lists_kernel(Bits, Rows, RunStart, RunBlock, RunLength, Width, Edges, Movable, Counts, Moved, FullIdx,
                          MaskIdx, num_q_tiles, num_kv_tiles, num_rows, words, full_width, mask_width,
                          rows_per_tile, most_runs, PARTS: tl.constexpr, BLOCK: tl.constexpr, RUN_STEP: tl.constexpr,
                          WRITE: tl.constexpr):
    qt = tl.program_id(0)
    h = tl.program_id(1)
    program = h.to(tl.int64) * num_q_tiles + qt
    lane = tl.arange(0, BLOCK)
    parts = tl.arange(0, PARTS)
    part_lo = tl.load(Edges + parts)
    part_hi = tl.load(Edges + parts + 1)
    full_parts = tl.zeros([PARTS], dtype=tl.int32)
    mask_parts = tl.zeros([PARTS], dtype=tl.int32)
    full_seen = tl.sum(full_parts, axis=0)               # 0, as a loop-carried int32
    mask_seen = tl.sum(mask_parts, axis=0)
    full_moved = tl.sum(full_parts, axis=0)              # of them in movable key tiles (pass 1)
    mask_moved = tl.sum(mask_parts, axis=0)
    for t0 in range(0, num_kv_tiles, BLOCK):
        t = t0 + lane
        valid = t < num_kv_tiles
        start = tl.load(RunStart + t, mask=valid, other=0)
        stop = tl.load(RunStart + t + 1, mask=valid, other=0)
        width = tl.load(Width + t, mask=valid, other=1)
        every = valid.to(tl.int32)                       # every row so far covers the tile whole
        some = tl.zeros([BLOCK], dtype=tl.int32)         # some row covers part of it
        for c in range(rows_per_tile):
            row = tl.load(Rows + c * num_q_tiles + qt)
            bits = Bits + (h.to(tl.int64) * num_rows + row) * words
            cover = tl.zeros([BLOCK], dtype=tl.int32)
            for k0 in range(0, most_runs, RUN_STEP):
                for dk in tl.static_range(RUN_STEP):
                    has = valid & (start + k0 + dk < stop)
                    block = tl.load(RunBlock + start + k0 + dk, mask=has, other=0)
                    length = tl.load(RunLength + start + k0 + dk, mask=has, other=0)
                    word = tl.load(bits + block // 32, mask=has, other=0)
                    kept = has & (((word >> (block % 32)) & 1) != 0)
                    cover += tl.where(kept, length, 0).to(tl.int32)
            every = every * (cover == width).to(tl.int32)
            some = tl.maximum(some, (cover > 0).to(tl.int32))
        full = every
        partial = some * (1 - every)
        if WRITE:
            tl.store(FullIdx + program * full_width + (full_seen + tl.cumsum(full, axis=0) - 1), t, mask=full != 0)
            tl.store(MaskIdx + program * mask_width + (mask_seen + tl.cumsum(partial, axis=0) - 1), t,
                     mask=partial != 0)
        else:
            inside = ((t[:, None] >= part_lo[None, :]) & (t[:, None] < part_hi[None, :])).to(tl.int32)
            full_parts += tl.sum(inside * full[:, None], axis=0)
            mask_parts += tl.sum(inside * partial[:, None], axis=0)
            movable = tl.load(Movable + t, mask=valid, other=0).to(tl.int32)
            full_moved += tl.sum(full * movable, axis=0)
            mask_moved += tl.sum(partial * movable, axis=0)
        full_seen += tl.sum(full, axis=0)
        mask_seen += tl.sum(partial, axis=0)
    if not WRITE:
        tl.store(Counts + program * 2 * PARTS + parts, full_parts)
        tl.store(Counts + (program * 2 + 1) * PARTS + parts, mask_parts)
        tl.store(Moved + program * 2, full_moved)
        tl.store(Moved + program * 2 + 1, mask_moved)
