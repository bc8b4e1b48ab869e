"""sparsecore inside diffusers' Ulysses context parallelism: 2 and 4 gloo processes on loopback (CPU).

A tiny random Wan model with sparsecore applied gives the same outputs under
``ulysses_degree=N`` as in one process (fp32), and each rank runs its own heads' slice of the
one-process masks. The masks differ per head (LVSA with per-head rotations, AdaSpa's search),
so a wrong head slice fails both checks. Half of the methods enable parallelism before
``apply()``, half after: both orders work.
"""

from __future__ import annotations

import numpy as np
import pytest

from context_parallel_run import METHODS, run, run_dense, run_parallel

WORLDS = (2, 4)
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}      # fp32; the all-to-alls move values exactly


@pytest.fixture(scope="module")
def single() -> dict:
    return {method: run(method) for method in METHODS}


@pytest.fixture(scope="module", params=WORLDS, ids=[f"ulysses{w}" for w in WORLDS])
def parallel(request) -> tuple[int, list[dict]]:
    return request.param, run_parallel(request.param, list(METHODS))


def test_dense_method_matches_diffusers_own_processors(single):
    np.testing.assert_allclose(single["dense"]["outputs"], run_dense(), **TOLERANCE)
    assert single["dense"]["backends"] == ["dense"]


def test_sparse_masks_differ_per_head_and_change_the_output(single):
    for method in ("lvsa-per-head", "adaspa"):
        masks = single[method]["masks"][0]
        assert any(not np.array_equal(masks[0], masks[h]) for h in range(1, len(masks))), method
        assert single[method]["backends"] != ["dense"], method
        assert np.abs(single[method]["outputs"][-1] - single["dense"]["outputs"][-1]).max() > 1e-3, method
    assert all(len(set(b.tolist())) > 1 for b in single["adaspa"]["budgets"])      # head-adaptive budgets at work


@pytest.mark.parametrize("method", list(METHODS))
def test_ulysses_matches_one_process(single, parallel, method):
    world, ranks = parallel
    for rank, result in enumerate(ranks):
        got = result[method]
        np.testing.assert_allclose(got["outputs"], single[method]["outputs"], **TOLERANCE,
                                   err_msg=f"{method}, ulysses_degree={world}, rank {rank}")
        size = len(single[method]["masks"][0]) // world
        assert got["heads"] == [rank * size, (rank + 1) * size]
        for layer, mask in enumerate(got["masks"]):
            expected = single[method]["masks"][layer][rank * size:(rank + 1) * size]
            assert np.array_equal(mask, expected), (method, world, rank, layer)
