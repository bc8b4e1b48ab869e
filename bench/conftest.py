"""Benchmarks share the test helpers (oracle, targets) and their own case builders."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
