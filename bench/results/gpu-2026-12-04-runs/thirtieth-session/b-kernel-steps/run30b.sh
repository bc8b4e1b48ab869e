#!/usr/bin/env bash
# Thirtieth session (no FA4 needed): the tile-lists kernel's unrolled steps (ROW_STEP x RUN_STEP lookups a step of
# its run-time loops) timed on the conversion probe's three masks; tiny blocks' first conversions with the kernel's
# compiled variants counted; the tile-lists GPU tests at the committed steps.
set -u
export TRITON_INTERPRET=0 HYPOTHESIS_PROFILE=gpu-quick
mkdir -p $OUT/run
timeout 300 python3 - > $OUT/run/kernel-steps.log 2>&1 <<'PY'
import sys, time, statistics, torch
sys.path.insert(0, "bench")
import fa4_conversion_probe as probe
from sparsecore.backends.cuda import fa4_tile_lists
from sparsecore.backends.cuda.fa4_layout import to_fa4
cases = [("HV15 joint", probe.joint_mask(16, 103350, 256, 64, 0), (64, 64)),
         ("Cog joint", probe.joint_mask(48, 85680, 226, 64, 1), (64, 64)),
         ("STA", probe.sta_mask(), (128, 128))]
print("| case | rows x runs a step | wall ms | kernel GPU us (both passes) |")
print("|---|---|---:|---:|")
for name, mask, tiles in cases:
    for steps in ((1, 1), (2, 2), (2, 4), (4, 4), (1, 2), (2, 1)):
        fa4_tile_lists.ROW_STEP, fa4_tile_lists.RUN_STEP = steps
        to_fa4(mask, *tiles, "cuda"); torch.cuda.synchronize()
        walls = []
        for _ in range(5):
            torch.cuda.synchronize(); t = time.perf_counter()
            to_fa4(mask, *tiles, "cuda"); torch.cuda.synchronize()
            walls.append(time.perf_counter() - t)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            to_fa4(mask, *tiles, "cuda"); torch.cuda.synchronize()
        gpu = sum(e.self_device_time_total for e in prof.key_averages() if "fa4_tile_lists_kernel" in e.key)
        print(f"| {name} | {steps[0]} x {steps[1]} | {1e3 * statistics.median(walls):.2f} | {gpu:.0f} |", flush=True)
PY
echo "steps rc=$?"; cat $OUT/run/kernel-steps.log | tail -25
timeout 120 python3 - > $OUT/run/tiny-blocks.log 2>&1 <<'PY'
import time, numpy as np, torch, triton
from sparsecore import BlockMask
from sparsecore.backends.cuda.fa4_layout import to_fa4
from sparsecore.backends.cuda.fa4_tile_lists_kernel import fa4_tile_lists_kernel
rng = np.random.default_rng(0)
for block in (8, 4, 48, 96, 1560):
    offsets = np.append(np.arange(0, 4096 if block < 1560 else 1560 * 8, block), (4096 if block < 1560 else 1560 * 8) + 7)
    n = len(offsets) - 1
    rows = [[np.nonzero(rng.random(n) < 0.2)[0] for _ in range(n)] for _ in range(2)]
    mask = BlockMask.from_lists(rows, offsets, offsets)
    for call in ("first", "second"):
        torch.cuda.synchronize(); t = time.perf_counter()
        layout = to_fa4(mask, 128, 128, "cuda", reorder_keys=False)
        torch.cuda.synchronize()
        device = triton.runtime.driver.active.get_current_device()
        print(f"block {block}: {call} conversion {1e3 * (time.perf_counter() - t):.1f} ms (full "
              f"{layout.num_full_tiles}, mask {layout.num_mask_tiles}; kernel variants "
              f"{len(fa4_tile_lists_kernel.device_caches[device][0])})", flush=True)
PY
echo "tiny rc=$?"; cat $OUT/run/tiny-blocks.log
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_fa4_tile_lists.py tests/test_fa4_layout.py -k "tile_lists or new_length or heads_with or geometry" \
  > $OUT/run/gpu-tests-conversion.log 2>&1
echo "tests rc=$?"; tail -2 $OUT/run/gpu-tests-conversion.log | cut -c1-300
