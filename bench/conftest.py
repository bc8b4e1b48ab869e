"""Benchmarks share the test helpers (oracle, targets) and their own case builders."""

import os
import sys
from pathlib import Path

# the benchmarks time the backend compile() prefers: loaded in place, not warmed up behind another (sparsecore.warmup)
os.environ.setdefault("SPARSECORE_WARMUP", "wait")

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
