"""STA's window search (``handle.search_windows``, :mod:`sparsecore.methods.sta_search`): candidate windows against the
window rule counted tile by tile, FastVideo's per-head choice on hand-made errors, and a search on a tiny Wan whose
errors are held to float64 attention under each window's rule written token by token."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from context_parallel_run import fake_parallel_config
from test_integration_diffusers import CASES, forward
from test_sta import raster_mask, sees

from sparsecore.integrations import diffusers as sparse
from sparsecore.integrations.diffusers.window_search import WindowSearch
from sparsecore.methods import sta
from sparsecore.methods.sta_search import candidate_windows, choose_windows, save_strategy

TILE = (2, 4, 4)                      # the tiny models' 8 x 8 x 8 latent tokens: 4 x 2 x 2 tiles
CANDIDATES = [(1, 1, 1), (3, 1, 1), (1, 2, 2), (1, 1, 2)]


def tile_pair_density(grid, window) -> float:
    """Fraction of (query tile, key tile) pairs the window keeps, counted pair by pair with FastVideo's rule."""
    kept = 1.0
    for tiles, width in zip(grid, window):
        index = np.arange(tiles)
        kept *= sees(index[:, None], index[None, :], tiles, width).mean()
    return kept


def test_candidate_windows_keep_the_asked_share_of_tile_pairs():
    """On FastVideo's Wan grid (3 x 6 x 10 tiles) the windows keeping exactly 30 of 180 tile pairs per row are its
    three hand-picked ones of that cost; elsewhere every candidate lies within the spread, nearest first."""
    assert set(candidate_windows((3, 6, 10), 30 / 180, spread=1e-9)) == {(3, 1, 10), (1, 3, 10), (1, 6, 5)}
    for grid, density in [((3, 6, 10), 0.15), ((4, 7, 13), 0.1), ((1, 9, 9), 0.3)]:
        found = candidate_windows(grid, density, spread=0.2, limit=50)
        kept = [tile_pair_density(grid, w) for w in found]
        assert found and all(abs(k - density) <= 0.2 * density + 1e-12 for k in kept)
        assert (np.diff(np.abs(np.array(kept) - density)) >= -1e-12).all()                  # nearest first
        assert tuple(grid) not in found and all(w % 2 or w == n for win in found for w, n in zip(win, grid))
    assert candidate_windows((3, 6, 10), 0.05, spread=0) == ((1, 1, 9), (1, 3, 3), (3, 1, 3), (3, 3, 1))   # 1/20 each
    assert (3, 3, 9) in candidate_windows((3, 6, 10), 0.3, spread=0.5, limit=64)           # 0.45: on the bound
    with pytest.raises(ValueError, match="density: no window"):
        candidate_windows((1, 1, 2), 0.1)
    with pytest.raises(ValueError, match="density: expected a fraction"):
        candidate_windows((3, 6, 10), 1.0)


def test_choice_is_each_heads_least_error_and_dense_before_dense_steps(tmp_path):
    rng = np.random.default_rng(3)
    errors = rng.random((4, 2, 3, 5))
    errors[2, 1, :, 0] = [0.5, 0.2, 0.2]                                    # a tie: the first listed
    errors[0] = np.nan                                                      # not measured: a dense step
    candidates = [(1, 1, 3), (3, 1, 1), (1, 3, 1)]
    strategy = choose_windows(errors, candidates, (4, 2, 2), dense_steps=1)
    for step in range(4):
        for layer in range(2):
            want = [(4, 2, 2)] * 5 if step == 0 else [candidates[int(np.argmin(errors[step, layer, :, h]))]
                                                      for h in range(5)]
            assert list(strategy[(step, layer)]) == want
    assert strategy[(2, 1)][0] == (3, 1, 1)
    path = tmp_path / "strategy.json"
    save_strategy(strategy, path)
    data = json.loads(path.read_text())
    assert len(data) == 4 * 2 * 5 and data["3_1_4"] == list(strategy[(3, 1)][4])
    assert dict(sta.read_strategy(path)) == dict(strategy)
    with pytest.raises(ValueError, match="step 0 layer 0 was not measured"):
        choose_windows(errors, candidates, (4, 2, 2), dense_steps=0)
    with pytest.raises(ValueError, match=r"errors: expected \[steps, layers, 3 candidates, heads\]"):
        choose_windows(errors[:, :, :2], candidates, (4, 2, 2), dense_steps=1)
    for wrong in (np.inf, -1.0):                                            # no mean squared error is
        bad = errors.copy()
        bad[3, 1, 2, 4] = wrong
        with pytest.raises(ValueError, match="errors: expected mean squared errors .finite, >= 0. at step 3 layer 1"):
            choose_windows(bad, candidates, (4, 2, 2), dense_steps=1)
    bad = errors.copy()
    bad[0] = np.inf                                                         # below dense_steps: not read
    assert dict(choose_windows(bad, candidates, (4, 2, 2), dense_steps=1)) == dict(strategy)


def test_a_searched_strategy_refuses_another_grid_naming_both(tmp_path):
    """A searched strategy writes its dense steps as the whole searched grid: on a larger grid a session ran those
    steps with that window, sparse (on a smaller one its sparse windows could cover the grid and run dense), and its
    windows were chosen by their errors on the searched grid. Its sessions now refuse another grid, naming both grids
    and the remedy; a strategy read from FastVideo's json records no grid (dense steps then come from dense_steps)."""
    from sparsecore import VideoGeometry
    errors = np.random.default_rng(5).random((3, 2, 2, 2))
    strategy = choose_windows(errors, [(1, 1, 1), (3, 1, 1)], (3, 2, 2), dense_steps=1)
    searched = VideoGeometry(6, 8, 8)                                 # 3 x 2 x 2 tiles of TILE
    session = sta.session(3, mask_strategy=strategy, tile=TILE)
    assert [session.action(searched, step, 0).dense for step in range(3)] == [True, False, False]
    mask = session.plan(searched, 2, step=1, layer=1)
    assert mask.meta["head_windows"] == tuple(tuple(sta.span(n, w) for n, w in zip((3, 2, 2), window))
                                              for window in strategy[(1, 1)])
    calls = [lambda geometry: session.action(geometry, 0, 0),
             lambda geometry: session.plan(geometry, 2, step=1, layer=0),
             lambda geometry: sta.plan(geometry, 2, step=0, layer=1, mask_strategy=strategy, tile=TILE)]
    for geometry, grid in ((VideoGeometry(8, 8, 8), r"\(4, 2, 2\)"), (VideoGeometry(4, 8, 8), r"\(2, 2, 2\)")):
        for call in calls:
            with pytest.raises(ValueError, match=rf"mask_strategy: expected the \(3, 2, 2\) tile grid the strategy was "
                                                 rf"searched on .* got .*, a {grid} grid .* search the windows at this "
                                                 rf"resolution"):
                call(geometry)
    path = tmp_path / "strategy.json"
    save_strategy(strategy, path)
    assert sta.read_strategy(path).grid is None and strategy.grid == (3, 2, 2)
    from_file = sta.session(3, mask_strategy=path, tile=TILE, dense_steps=1)
    assert [from_file.action(VideoGeometry(8, 8, 8), step, 0).dense for step in range(3)] == [True, False, False]

def float64_errors(query, key, value, geometry, windows) -> np.ndarray:
    """Per window and head, the mean squared error of attention under the window's token rule against dense
    attention, both in float64 on ``[B, S, H, D]`` inputs (model order)."""
    q, k, v = (t.double().transpose(1, 2) for t in (query, key, value))
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    dense = torch.softmax(scores, -1) @ v
    found = []
    for window in windows:
        allowed = torch.from_numpy(raster_mask(geometry, TILE, window))
        out = torch.softmax(scores.masked_fill(~allowed, -torch.inf), -1) @ v
        found.append(((out - dense) ** 2).mean(dim=(0, 2, 3)).numpy())
    return np.stack(found)


def test_search_on_a_tiny_wan_follows_dense_and_measures_each_window(monkeypatch, tmp_path):
    """Two steps, both layers, a batch of two: the output is the model's own (dense), the errors are the float64
    oracle's means over the calls, and the saved strategy runs."""
    case = CASES["wan"]
    model, inputs = case.build(), case.inputs(batch=2)
    expected = [forward(model, inputs, t) for t in (999.0, 500.0)]
    seen = []
    attend = WindowSearch.attend

    def recording(self, layer, geometry, step, query, key, value, shard, dense):
        seen.append((step, layer, geometry, query.clone(), key.clone(), value.clone()))
        return attend(self, layer, geometry, step, query, key, value, shard, dense)

    monkeypatch.setattr(WindowSearch, "attend", recording)
    handle = sparse.apply(model, "sta", device="cpu", num_steps=2, tile=TILE)
    try:
        search = handle.search_windows(CANDIDATES)
        got = [forward(model, inputs, t) for t in (999.0, 500.0)]
    finally:
        handle.remove()
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
    errors = search.errors()
    assert errors.shape == (2, 2, 4, 2) and search.calls == 8 and search.grid == (4, 2, 2)    # samples
    for step, layer, geometry, q, k, v in seen:
        want = float64_errors(q, k, v, geometry, CANDIDATES)
        np.testing.assert_allclose(errors[step, layer], want, rtol=2e-4, atol=1e-12)
        assert (want > 1e-6).all()
    strategy = search.save(tmp_path / "s.json", dense_steps=1)
    assert set(strategy[(0, 1)]) == {(4, 2, 2)}
    for layer in range(2):
        assert list(strategy[(1, layer)]) == [CANDIDATES[i] for i in errors[1, layer].argmin(axis=0)]
    handle = sparse.apply(model, "sta", device="cpu", num_steps=2, tile=TILE, mask_strategy=tmp_path / "s.json",
                          dense_steps=1)
    try:
        for t in (999.0, 500.0):
            forward(model, inputs, t)
    finally:
        handle.remove()
    assert {row["action"] for row in handle.stats()} == {"dense", "plan"}


def test_search_refusals_name_the_cause():
    case = CASES["wan"]
    model = case.build()
    handle = sparse.apply(model, "lvsa", device="cpu", num_steps=2)
    with pytest.raises(ValueError, match="handle.search_windows: searches Sliding Tile Attention's windows"):
        handle.search_windows(CANDIDATES)
    handle.remove()
    handle = sparse.apply(model, "sta", device="cpu", num_steps=2, tile=TILE)
    for bad, error, match in [([], TypeError, "candidates: expected a non-empty sequence"),
                              ([(1, 1, 1), (1, 1, 1)], ValueError, "candidates: expected distinct windows"),
                              ([(1, 0, 1)], ValueError, r"candidates\[0\]\[1\]"),
                              ([(1, 1, 1)] * 65, ValueError, "at most 64 windows")]:
        with pytest.raises(error, match=match):
            handle.search_windows(bad)
    with pytest.raises(ValueError, match="layers: expected 0..1"):
        handle.search_windows(CANDIDATES, layers=[2])
    handle.search_windows([*CANDIDATES, (5, 2, 3)])              # sees the whole grid: dense, not a window
    with pytest.raises(ValueError, match=r"candidates: \[\(5, 2, 3\)\] see the whole \(4, 2, 2\) tile grid"):
        forward(model, case.inputs(batch=1), 999.0)
    handle.search_windows([(1, 1, 2), (1, 1, 3)])                # both span one tile by two
    with pytest.raises(ValueError, match=r"\(1, 1, 2\) and \(1, 1, 3\) span the same tiles"):
        forward(model, case.inputs(batch=1), 999.0)
    search = handle.search_windows(CANDIDATES, layers=[0])
    with pytest.raises(TypeError, match="candidates: expected a non-empty sequence"):
        handle.search_windows([])                                  # refused: the running search goes on
    assert handle._planner.window_search is search
    with pytest.raises(ValueError, match="no call was measured yet"):
        search.strategy()
    forward(model, case.inputs(batch=1), 999.0)
    smaller = {**case.inputs(batch=1), "hidden_states": torch.randn(1, 4, 4, 16, 16,
                                                                     generator=torch.Generator().manual_seed(5))}
    with pytest.raises(ValueError, match=r"measures a \(4, 2, 2\) tile grid and this call's video makes \(2, 2, 2\)"):
        forward(model, smaller, 500.0)
    with pytest.raises(ValueError, match="step 0 layer 1 was not measured"):
        search.strategy()
    assert handle.search_windows(None) is None
    assert search.calls == 1 and not search._kernels                   # closed: its kernels gone, its sums kept
    for block in model.blocks:
        block.attn1.processor._parallel_config = fake_parallel_config(ulysses_degree=2)
    with pytest.raises(ValueError, match="under context parallelism"):
        handle.search_windows(CANDIDATES)
    for block in model.blocks:
        block.attn1.processor._parallel_config = None
    search = handle.search_windows(CANDIDATES)
    forward(model, case.inputs(batch=1), 999.0)
    handle.remove()
    assert not search._kernels and search.calls == 2                    # remove() closed it
    with pytest.raises(ValueError, match="this handle was removed"):
        handle.search_windows(CANDIDATES)


def test_a_float64_search_and_non_finite_errors_before_dense_steps():
    """The search summed its norms in float32 whatever the model's dtype (torch refuses to narrow float64 so: a
    float64 model's search raised); and strategy(dense_steps) refused a non-finite error at a step before dense_steps,
    whose errors it never reads (those steps keep the grid), naming dense_steps as the remedy."""
    case = CASES["wan"]
    model = case.build().double()
    inputs = {name: t.double() for name, t in case.inputs(batch=1).items()}
    handle = sparse.apply(model, "sta", device="cpu", num_steps=2, tile=TILE)
    try:
        search = handle.search_windows(CANDIDATES)
        for t in (999.0, 500.0):
            forward(model, inputs, t)
    finally:
        handle.remove()
    assert np.isfinite(search.errors()).all() and (search.errors() > 0).all()
    search._sums[0] = torch.inf                                   # as a float16 overflow at step 0 would leave
    assert set(search.strategy(dense_steps=1)[(0, 0)]) == {(4, 2, 2)}
    with pytest.raises(ValueError, match="step 0 layer 0 measured a non-finite error"):
        search.strategy(dense_steps=0)
    with pytest.raises(ValueError, match="dense_steps: expected 0..2"):
        search.strategy(dense_steps=3)


def test_a_gqa_model_searches_each_query_head_with_its_key_heads_keys():
    """Fewer key heads than query heads: the search reshaped k and v by the query heads ('shape ... is invalid');
    its errors now equal those of the same search with each key head repeated for its query heads."""
    from oracle import expand_to_tokens
    from sparsecore import VideoGeometry

    def compiled(mask):
        allowed = torch.from_numpy(expand_to_tokens(mask))

        def kernel(q, k, v):
            scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
            return torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ v
        return kernel

    g = VideoGeometry(4, 4, 4)
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, g.tokens, 4, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, g.tokens, 2, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    repeated = [t.repeat_interleave(2, dim=2) for t in (k, v)]

    def dense():
        kk, vv = (t.transpose(1, 2) for t in repeated)
        return (torch.softmax(q.transpose(1, 2) @ kk.transpose(-1, -2) / 8 ** 0.5, -1) @ vv).transpose(1, 2)

    errors = []
    for keys, values in ((k, v), repeated):
        search = WindowSearch([(1, 1, 1), (1, 3, 1)], (2, 2, 2), num_layers=1, num_steps=1, compiled=compiled)
        search.attend(0, g, 0, q, keys, values, None, dense)
        errors.append(search.errors())
    np.testing.assert_allclose(errors[0], errors[1], rtol=1e-12)


def test_no_window_at_a_fractional_density_is_said_in_a_value_error():
    """A Fraction density or spread broke the message's format (TypeError from Fraction.__format__)."""
    from fractions import Fraction
    with pytest.raises(ValueError, match=r"density: no window on a \(3, 6, 10\) tile grid keeps 0.167 .* within 0%"):
        candidate_windows((3, 6, 10), Fraction(1, 6), spread=Fraction(0))
