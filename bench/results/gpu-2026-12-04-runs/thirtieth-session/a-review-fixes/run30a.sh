#!/usr/bin/env bash
# Thirtieth session (no FA4 needed): the review's fixes to the fa4 conversion (run-time loops in the tile-lists
# kernel, no specialization, one heads rule). The conversion probe against 6e5b348's layout, the conversion's GPU
# tests (incl. the recompile count), and tiny blocks' first conversion (compile included) on CUDA.
set -u
export TRITON_INTERPRET=0 HYPOTHESIS_PROFILE=gpu-quick
mkdir -p $OUT/run
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/run/gpu.txt
timeout 150 python3 bench/fa4_conversion_probe.py --out $OUT/run --baseline .fa4/2/old_fa4_layout.py \
  > $OUT/run/fa4-conversion-probe.log 2>&1
echo "probe rc=$?"; grep "^|" $OUT/run/fa4-conversion-probe.log
timeout 120 python3 - > $OUT/run/tiny-blocks.log 2>&1 <<'PY'
import time, numpy as np, torch
from sparsecore import BlockMask
from sparsecore.backends.cuda.fa4_layout import to_fa4
rng = np.random.default_rng(0)
for block in (8, 4, 48, 96):
    offsets = np.append(np.arange(0, 4096, block), 4096 + 7)
    n = len(offsets) - 1
    rows = [[np.nonzero(rng.random(n) < 0.2)[0] for _ in range(n)] for _ in range(2)]
    mask = BlockMask.from_lists(rows, offsets, offsets)
    for call in ("first", "second"):
        torch.cuda.synchronize(); t = time.perf_counter()
        layout = to_fa4(mask, 128, 128, "cuda", reorder_keys=False)
        torch.cuda.synchronize()
        print(f"block {block}: {call} conversion {1e3 * (time.perf_counter() - t):.1f} ms "
              f"(full {layout.num_full_tiles}, mask {layout.num_mask_tiles})", flush=True)
PY
echo "tiny rc=$?"; cat $OUT/run/tiny-blocks.log
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_fa4_tile_lists.py tests/test_fa4_layout.py \
  > $OUT/run/gpu-tests-conversion.log 2>&1
echo "tests rc=$?"; tail -3 $OUT/run/gpu-tests-conversion.log | cut -c1-300
grep -n "new_length\|PASS\|FAIL" $OUT/run/gpu-tests-conversion.log | head
