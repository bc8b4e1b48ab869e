"""Helpers behind published figures: issue 16's work counts (``bench/approximation_benchmark.py``) against a
brute-force count, and the drop-equivalent density of ``bench/fidelity_unselected.py``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from sparsecore import BlockMask

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "approximation_benchmark.py"


def load_benchmark(script: Path = SCRIPT):
    spec = importlib.util.spec_from_file_location(script.stem, script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("group_blocks", [1, 8, 32])
def test_extra_flops_counts_unselected_blocks_and_open_groups(group_blocks):
    pytest.importorskip("triton", reason="the benchmark imports the Triton approximation launch")
    rng = np.random.default_rng(7)
    heads, q_blocks, kv_blocks, block, head_dim = 3, 6, 70, 64, 16
    kept = rng.random((heads, q_blocks, kv_blocks)) < 0.3
    kept[:, 1, :40] = True                       # whole groups selected: their q H_g is not needed
    kept[:, 2, :] = False                        # an empty row: every block unselected
    q_offsets = np.r_[np.arange(0, q_blocks * block, block), q_blocks * block - 10]      # short last blocks
    kv_offsets = np.r_[np.arange(0, kv_blocks * block, block), kv_blocks * block - 5]
    mask = BlockMask.from_lists([[np.flatnonzero(kept[h, i]) for i in range(q_blocks)] for h in range(heads)],
                                q_offsets, kv_offsets)
    want = 0
    for h in range(heads):
        for i in range(q_blocks):
            unselected = np.flatnonzero(~kept[h, i])
            open_groups = len(set(unselected // group_blocks))
            want += int(np.diff(q_offsets)[i]) * (4 * head_dim * len(unselected) + 2 * head_dim ** 2 * open_groups)
    assert load_benchmark().extra_flops(mask, head_dim, group_blocks) == want


def test_drop_equivalent_density_says_which_side_of_the_sweep_it_falls():
    """An approximation worse than drop-only at the lowest swept density has no equivalent there: it was reported as
    that density (a review found it), now as below the sweep; better than the highest, as above it."""
    fidelity = load_benchmark(SCRIPT.parent / "fidelity_unselected.py")
    sweep = [(0.15, 0.25, 0.66), (0.2, 0.2, 0.7), (0.8, 0.05, 0.95)]       # (density, rel L2, recall) of drop-only
    assert fidelity.drop_equivalent(0.30, sweep) == (None, None) and fidelity.beyond_sweep(0.30, sweep) == "< 0.15"
    assert fidelity.drop_equivalent(0.01, sweep) == (None, None) and fidelity.beyond_sweep(0.01, sweep) == "> 0.8"
    density, recall = fidelity.drop_equivalent(0.22, sweep)
    assert density == pytest.approx(0.18) and recall == pytest.approx(0.684)
