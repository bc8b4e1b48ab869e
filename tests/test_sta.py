"""Sliding Tile Attention (``method="sta"``): the tile order and the window against the rule written token by token in
raster order, FastVideo's mask strategy files, and tiny models run to the float64 oracle through the tile order."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from context_parallel_run import fake_parallel_config
from hypothesis import given, settings
from hypothesis import strategies as st
from oracle import expand_to_tokens
from test_integration_diffusers import CASES, forward, oracle_output

import sparsecore
from sparsecore import VideoGeometry
from sparsecore.integrations import diffusers as sparse
from sparsecore.ir import BlockMask, csr
from sparsecore.methods import sta, sta_strategy
from sparsecore.methods.contract import MAX_STEPS
from sparsecore.ordering import TokenOrder


def sees(query_tile: np.ndarray, key_tile: np.ndarray, tiles: int, window: int) -> np.ndarray:
    """FastVideo's kernels' rule on one axis: the window's centre clamped to ``[r, n - 1 - r]`` (r when they cross)."""
    r = window // 2
    centre = np.maximum(np.minimum(query_tile, tiles - 1 - r), r)
    return np.abs(centre - key_tile) <= r


def raster_positions(geometry: VideoGeometry, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(t, y, x)`` of video tokens computed here, not by the geometry: diffusers flattens a latent ``(F, H, W)``
    row-major (x fastest), and the video follows the text when the text comes first."""
    local = np.asarray(tokens) - (geometry.text_tokens if geometry.text_position == "start" else 0)
    frame = geometry.height * geometry.width
    return local // frame, local % frame // geometry.width, local % geometry.width


def raster_mask(geometry: VideoGeometry, tile, window) -> np.ndarray:
    """bool ``[L, L]`` in the model's order: video tokens by their tiles' windows, text rows and columns full."""
    tokens = geometry.tokens
    allowed = np.ones((tokens, tokens), dtype=bool)
    start = geometry.text_tokens if geometry.text_position == "start" else 0
    video = np.arange(start, start + geometry.frames * geometry.height * geometry.width)
    t, y, x = raster_positions(geometry, video)
    keep = np.ones((len(video), len(video)), dtype=bool)
    for coord, size, edge, width in zip((t, y, x), tile, (geometry.frames, geometry.height, geometry.width), window):
        tiles = -(-edge // size)
        keep &= sees((coord // size)[:, None], (coord // size)[None, :], tiles, width)
    allowed[np.ix_(video, video)] = keep
    return allowed


def in_model_order(mask: BlockMask, order: TokenOrder) -> np.ndarray:
    """The mask's token map ``[H, L, L]`` moved from the tile order to the model's."""
    tiled = expand_to_tokens(mask)
    raster = np.zeros_like(tiled)
    raster[:, order.index[:, None], order.index[None, :]] = tiled
    return raster


geometries = st.builds(VideoGeometry, frames=st.integers(1, 7), height=st.integers(1, 9), width=st.integers(1, 9),
                       text_tokens=st.integers(0, 9), text_position=st.sampled_from(["end", "start"]))
triples = st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4))


@settings(max_examples=60, deadline=None)
@given(geometry=geometries, tile=triples, window=st.tuples(st.integers(1, 5), st.integers(1, 5), st.integers(1, 5)))
def test_masks_follow_the_window_token_by_token_in_the_models_order(geometry, tile, window):
    mask = sta.plan(geometry, 2, tile=tile, window=window)
    order = sta.token_order(geometry, tile)
    expected = raster_mask(geometry, tile, window)
    got = in_model_order(mask, order)
    assert (got == expected[None]).all()
    offsets = np.asarray(mask.q_offsets)               # every video block is one tile's tokens: one tile id each
    t, y, x = raster_positions(geometry, order.index[geometry.video_slice])
    grid = sta.tile_grid(geometry, tile)
    ids = (t // tile[0] * grid[1] + y // tile[1]) * grid[2] + x // tile[2]
    starts = offsets[:-1] - geometry.video_start
    video_blocks = (starts >= 0) & (starts < geometry.video_tokens)
    assert len(np.unique(ids)) == video_blocks.sum() == np.prod(grid)
    assert (np.diff(ids) >= 0).all() and set(np.flatnonzero(np.diff(ids)) + 1) == set(starts[video_blocks][1:])


@settings(max_examples=40, deadline=None)
@given(geometry=geometries, tile=triples,
       windows=st.lists(st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4)), min_size=1, max_size=5))
def test_a_strategys_heads_each_follow_their_own_window(geometry, tile, windows):
    """A strategy's mask copies each head's lists from its window's one-head mask: every head against the rule for
    its own window (heads in any order, windows repeated), and lists and budgets the checked constructor accepts."""
    strategy = {f"0_0_{h}": window for h, window in enumerate(windows)}
    mask = sta.session(1, tile=tile, mask_strategy=strategy).plan(geometry, len(windows), step=0, layer=0)
    got = in_model_order(mask, sta.token_order(geometry, tile))
    for head, window in enumerate(windows):
        assert (got[head] == raster_mask(geometry, tile, window)).all(), head
    checked = BlockMask(mask.num_heads, mask.q_offsets, mask.kv_offsets, mask.indptr, mask.indices)
    assert np.array_equal(mask.budgets, checked.budgets) and mask.indptr.dtype == mask.indices.dtype == np.int32
    assert not mask.indptr.flags.writeable and not mask.indices.flags.writeable


def test_tile_order_is_fastvideos_tile_layout():
    """FastVideo's ``tile``: token (t, h, w) goes to ``((t//6 NH + h//8) NW + w//8) 384 + ((t%6) 8 + h%8) 8 + w%8``."""
    geometry = VideoGeometry(12, 16, 24)
    t, h, w = raster_positions(geometry, np.arange(geometry.tokens))
    nh, nw = 16 // 8, 24 // 8
    place = ((t // 6 * nh + h // 8) * nw + w // 8) * 384 + ((t % 6) * 8 + h % 8) * 8 + w % 8
    order = sta.token_order(geometry)
    assert (order.inverse == place).all() and (order.index[place] == np.arange(geometry.tokens)).all()
    assert (np.diff(np.asarray(sta.plan(geometry, 1).q_offsets)) == 384).all()


def test_token_order_gathers_and_scatters_and_keeps_padding_in_place():
    order = sta.token_order(VideoGeometry(3, 4, 5, text_tokens=3), (2, 2, 2))
    x = torch.randn(2, 3, len(order) + 4, 5, generator=torch.Generator().manual_seed(0))
    gathered = order.gather(x, 2)
    index = torch.from_numpy(order.index.copy())
    torch.testing.assert_close(gathered[:, :, :len(order)], x[:, :, index], rtol=0, atol=0)
    torch.testing.assert_close(gathered[:, :, len(order):], x[:, :, len(order):], rtol=0, atol=0)
    torch.testing.assert_close(order.scatter(gathered, 2), x, rtol=0, atol=0)
    shorter = x[:, :, :len(order) + 2]                    # another length: its own device index
    torch.testing.assert_close(order.scatter(order.gather(shorter, 2), 2), shorter, rtol=0, atol=0)
    with pytest.raises(ValueError, match="at least 63 tokens"):
        order.gather(x[:, :, :10], 2)
    assert order.device_index("cpu", len(order) + 4).dtype == torch.int64
    with pytest.raises(TypeError, match="length: expected an int, got float 67.0"):
        order.device_index("cpu", len(order) + 4.0)        # gave a float64 index
    with pytest.raises(ValueError, match="length: expected at least the order's 63 tokens, got 10"):
        order.device_index("cpu", 10)
    with pytest.raises(ValueError, match="permutation"):
        TokenOrder(np.array([0, 0, 1]), "bad")
    with pytest.raises(TypeError, match="1-D integer"):
        TokenOrder(np.zeros((2, 2), dtype=np.int64), "bad")


def test_a_device_index_longer_than_any_sequence_is_refused_before_it_is_built():
    """device_index(device, 10**12) built an index of 10**12 tokens (8 TB) before anything said the length was
    wrong: a MemoryError at best."""
    order = sta.token_order(VideoGeometry(3, 4, 5, text_tokens=3), (2, 2, 2))
    with pytest.raises(ValueError, match="length: expected at most 2,147,483,647 tokens"):
        order.device_index("cpu", 10 ** 12)
    assert len(order.device_index("cpu", len(order) + 1)) == len(order) + 1


def test_clear_cache_reads_the_live_orders_while_another_thread_makes_one(monkeypatch):
    """sparsecore.clear_cache() reads every live TokenOrder while a pipeline thread may make one (STA at a new
    size): reading the set as another thread added to it raised 'Set changed size during iteration' and left
    clear_cache half done. Here the other thread makes its order in the middle of the read; it waits for the read."""
    import threading
    import weakref
    from sparsecore import ordering
    made = []

    class ReadSlowly(weakref.WeakSet):
        def __iter__(self):
            for i, order in enumerate(super().__iter__()):
                if i == 0:                       # another thread makes an order while this one reads
                    maker = threading.Thread(target=lambda: made.append(TokenOrder(np.arange(3), "new")))
                    maker.start()
                    maker.join(0.2)
                yield order
    live = ReadSlowly()
    keep = [TokenOrder(np.arange(3), f"order {i}") for i in range(2)]
    for order in keep:
        live.add(order)
    monkeypatch.setattr(ordering, "_LIVE", live)
    sparsecore.clear_cache()
    for _ in range(50):                          # the maker ends once the read has
        if made:
            break
        threading.Event().wait(0.1)
    assert len(made) == 1 and made[0] in live


def test_mask_strategy_gives_windows_per_step_layer_and_head(tmp_path):
    """FastVideo's json: full windows at a step make it dense; other steps get per-head windows in one mask."""
    geometry = VideoGeometry(6, 8, 8, text_tokens=5)                     # grid of 3 x 2 x 2 tiles of (2, 4, 4)
    strategy = {f"{s}_{layer}_{h}": [3, 2, 2] if s == 0 else [1 + h, 1, 2 - h] for s in range(2)
                for layer in range(2) for h in range(2)}
    path = tmp_path / "mask_strategy.json"
    path.write_text(json.dumps(strategy))
    session = sta.session(2, tile=(2, 4, 4), mask_strategy=str(path))
    assert session.action(geometry, 0, 1).dense
    action = session.action(geometry, 1, 1)
    assert not action.dense and not action.shared and action.per_call   # no layer's kernel kept while others run
    assert action.token_order is sta.token_order(geometry, (2, 4, 4))
    mask = session.plan(geometry, 2, step=1, layer=1)
    got = in_model_order(mask, action.token_order)
    for head, window in enumerate([(1, 1, 2), (2, 1, 1)]):
        assert (got[head] == raster_mask(geometry, (2, 4, 4), window)).all()
    assert session.plan(geometry, 2, step=1, layer=0) is mask                      # same windows: one mask
    half = session.plan(geometry, 2, step=1, layer=1, heads=sparse_shard(1, 2, 2))
    assert (expand_to_tokens(half)[0] == expand_to_tokens(mask)[1]).all()
    with pytest.raises(ValueError, match="no windows for layer 2, the strategy has 2 layers"):
        session.action(geometry, 0, 2)                                         # refused at a dense step already
    other = VideoGeometry(6, 8, 12, text_tokens=5)                            # same windows, another geometry
    assert session.plan(other, 2, step=1, layer=1).q_len == other.tokens
    with pytest.raises(ValueError, match="gives 2 heads' windows, the model has 3"):
        session.plan(geometry, 3, step=1, layer=1)


def sparse_shard(start: int, stop: int, total: int):
    from sparsecore.methods import HeadShard
    return HeadShard(start, stop, total)


@pytest.mark.parametrize("params, error, match", [
    ({"window": (3, 3)}, TypeError, "window: expected three ints"),
    ({"window": (3, 0, 3)}, ValueError, r"window\[1\]"),
    ({"tile": "688"}, TypeError, "tile: expected three ints"),
    ({"dense_steps": -1}, ValueError, "dense_steps"),
    ({"mask_strategy": {"0_0": [1, 1, 1]}}, ValueError, "keys 'step_layer_head'"),
    ({"mask_strategy": {"0_0_1": [1, 1, 1]}}, ValueError, "not head 0"),
    ({"mask_strategy": {"0_0_0": [1, 1]}}, TypeError, r"mask_strategy\['0_0_0'\]: expected three ints"),
    ({"mask_strategy": []}, TypeError, "non-empty mapping"),
    ({"mask_strategy": {"\u00b2_0_0": [1, 1, 1]}}, ValueError, "keys 'step_layer_head'"),
    ({"mask_strategy": {"0_0_1234567890": [1, 1, 1]}}, ValueError, "at most 9 digits"),
    ({"mask_strategy": {"0_0_0": {1: 1, 2: 2, 3: 3}}}, TypeError, "expected three ints"),
    ({"mask_strategy": {"0_0_0": [1, 1, 1], "0_1_0": [1, 1, 1], "0_1_1": [1, 1, 1]}}, ValueError, "same heads"),
    ({"mask_strategy": {"0_0_0": [1, 1, 1], "1_1_0": [1, 1, 1]}}, ValueError, "same layers"),
    ({"mask_strategy": "/nonexistent/strategy.json"}, ValueError, "could not read"),
    ({"window": (2 ** 31 + 1, 1, 1)}, ValueError, "at most 2,147,483,648"),
    ({"mask_strategy": {"0_0_0": [1, 1, 1], "00_0_0": [1, 1, 1]}}, ValueError, "listed twice"),
    ({"mask_strategy": {0: [1, 1, 1]}}, TypeError, "string keys"),
    ({"blocks": 3}, TypeError, "unknown parameter"),
])
def test_bad_parameters_raise_naming_the_field(params, error, match):
    with pytest.raises(error, match=match):
        sta.session(4, **params)


def test_dense_steps_that_leave_no_sparse_step_are_refused_naming_the_remedy():
    """``dense_steps >= num_steps`` made every step dense without a word (a mask strategy's steps were not even
    read): STA never ran. Refused as Radial's and AdaSpa's are; a one-off plan() at a dense step is still dense."""
    for params in ({}, {"mask_strategy": {"0_0_0": [1, 1, 1]}}):
        for dense in (3, 4, 10 ** 30):
            with pytest.raises(ValueError, match="dense_steps: expected fewer than num_steps=3 .*; pass"):
                sta.session(3, dense_steps=dense, **params)
    assert sta.plan(VideoGeometry(4, 8, 8), 1, step=0, dense_steps=10 ** 30).density() == 1


def test_strategies_missing_steps_and_too_many_blocks_are_refused_before_any_step():
    strategy = {f"{s}_0_0": [1, 1, 1] for s in range(2)}
    with pytest.raises(ValueError, match="got none for step 2"):
        sta.session(3, mask_strategy=strategy)
    with pytest.raises(ValueError, match="got none for step 2"):
        sta.session(MAX_STEPS, mask_strategy=strategy)                    # work in the strategy's steps only
    read = sta.read_strategy(strategy)
    assert sta.read_strategy(read) is read and not hasattr(read, "__setitem__")
    assert sta.plan(VideoGeometry(4, 8, 8), 1, step=1, layer=0, mask_strategy={"1_0_0": [1, 1, 1]}).num_heads == 1
    with pytest.raises(ValueError, match="no windows for step 0"):
        sta.session(2, mask_strategy={"1_0_0": [1, 1, 1]}, dense_steps=1).plan(VideoGeometry(4, 8, 8), 1, step=0,
                                                                                 layer=0)
    with pytest.raises(ValueError, match="gives 1 heads' windows, the model has 3"):
        sta.plan(VideoGeometry(4, 8, 8), 3, step=1, layer=0, mask_strategy={"1_0_0": [1, 1, 1]})
    assert sta.session(3, mask_strategy={"2_0_0": [1, 1, 1]}, dense_steps=2).action(VideoGeometry(4, 8, 8), 1, 0).dense
    with pytest.raises(ValueError, match="no windows for layer 1"):              # at a dense step already
        sta.session(2, mask_strategy=strategy, dense_steps=1).action(VideoGeometry(4, 8, 8), 0, 1)
    with pytest.raises(ValueError, match="exceed the int32 index limit.*use larger tiles"):
        sta.session(1, tile=(1, 1, 1)).action(VideoGeometry(48, 32, 32), 0, 0)
    with pytest.raises(ValueError, match="exceed the int32 index limit"):
        sta.plan(VideoGeometry(8, 32, 32), 40, tile=(1, 1, 1), window=(1, 1, 1))


def test_mixed_heads_windows_huge_windows_and_bad_json(tmp_path):
    """A (step, layer) where one head's window covers the grid and another's does not runs the mask; a window larger
    than the grid covers its axis; an unreadable file is named."""
    geometry = VideoGeometry(8, 8, 8)                                          # 4 x 2 x 2 tiles of (2, 4, 4)
    session = sta.session(1, tile=(2, 4, 4), mask_strategy={"0_0_0": [4, 2, 2], "0_0_1": [1, 2, 2]})
    assert not session.action(geometry, 0, 0).dense
    huge = in_model_order(sta.plan(geometry, 1, tile=(2, 4, 4), window=(2 ** 31, 1, 1)),
                          sta.token_order(geometry, [2, 4, 4]))
    assert (huge[0] == raster_mask(geometry, (2, 4, 4), (4, 1, 1))).all()
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json.* is not valid UTF-8 JSON"):
        sta.session(1, mask_strategy=bad)


@pytest.mark.parametrize("text, match", [
    ('{"0_0_0": ' + "[" * 100_000 + "]" * 100_000 + "}", "is not valid UTF-8 JSON .RecursionError"),
    ('{"0_0_0": [' + "9" * 5000 + ", 3, 3]}", "is not valid UTF-8 JSON .*4300 digits"),
    ('{"0_0_0": [1, 1, 1], "0_0_0": [3, 3, 3]}', "key '0_0_0' twice"),
])
def test_hostile_json_files_are_refused_naming_the_file(tmp_path, text, match):
    """A file nested past Python's recursion limit or with an integer past its digit limit raised RecursionError or an
    unnamed ValueError; a key written twice silently kept its last window (json.loads alone), where a mapping's
    head given twice is refused."""
    path = tmp_path / "hostile.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        sta.session(1, mask_strategy=str(path))


def test_large_files_causal_geometries_and_missing_layers_are_refused(tmp_path, monkeypatch):
    path = tmp_path / "big.json"
    path.write_text(json.dumps({"0_0_0": [1, 1, 1]}))
    monkeypatch.setattr(sta_strategy, "STRATEGY_FILE_LIMIT", 8)
    with pytest.raises(ValueError, match="at most 8 bytes"):
        sta.session(1, mask_strategy=str(path))
    with pytest.raises(ValueError, match="causal_frames=2; use 'lvsa'"):
        sta.session(1).action(VideoGeometry(4, 8, 8, causal_frames=2), 0)
    with pytest.raises(ValueError, match="layer=None"):
        sta.plan(VideoGeometry(4, 8, 8), 1, mask_strategy={"0_0_0": [1, 1, 1]})


def test_dense_steps_and_windows_covering_the_grid_are_dense_actions():
    geometry = VideoGeometry(12, 16, 16)                                  # 2 x 2 x 2 tiles
    assert sta.session(4, dense_steps=2).action(geometry, 1, 0).dense
    assert not sta.session(4, dense_steps=2, window=(1, 1, 1)).action(geometry, 2, 0).dense
    assert sta.session(4).action(geometry, 3, 0).dense                   # (3, 3, 3) covers 2 tiles an axis
    assert sta.session(4, window=(2, 5, 2)).action(geometry, 0, 0).dense
    assert sta.session(4, window=(1, 5, 2)).action(geometry, 0, 0).shared


def test_an_even_window_one_tile_short_of_an_axis_spans_it_and_is_dense():
    """An even window of n - 1 tiles spans n (FastVideo's kernels): on every axis, the whole grid; the action was
    "plan" and ran a sparse kernel on a mask keeping every block."""
    geometry = VideoGeometry(5, 5, 5)                                     # 5 x 5 x 5 tiles of one token
    assert sta.session(10, window=(4, 4, 4), tile=(1, 1, 1)).action(geometry, 3, 0).dense
    assert sta.session(10, window=(4, 5, 4), tile=(1, 1, 1)).action(geometry, 3, 0).dense
    assert not sta.session(10, window=(4, 3, 4), tile=(1, 1, 1)).action(geometry, 3, 0).dense
    strategy = {"0_0_0": [4, 4, 4], "0_0_1": [5, 6, 4]}
    assert sta.session(1, tile=(1, 1, 1), mask_strategy=strategy).action(geometry, 0, 0).dense
    mixed = sta.session(1, tile=(1, 1, 1), mask_strategy={**strategy, "0_0_1": [2, 5, 5]})
    assert not mixed.action(geometry, 0, 0).dense
    assert mixed.plan(geometry, 2, step=0, layer=0).meta["head_windows"] == ((5, 5, 5), (3, 5, 5))


def test_plan_is_dense_at_the_dense_steps_as_the_sessions_action_says():
    """sta.plan took dense_steps, recorded the step in its place and returned the windows' mask at a dense step."""
    geometry = VideoGeometry(8, 8, 16)
    assert sta.session(50, dense_steps=12, tile=(2, 4, 4)).action(geometry, 3, 0).dense
    dense = sta.plan(geometry, 2, step=3, dense_steps=12, tile=(2, 4, 4))
    assert dense.density() == 1.0 and dense.num_heads == 2 and dense.meta["action"] == "dense"
    assert dense.meta["params"]["dense_steps"] == 12
    sparse = sta.plan(geometry, 2, step=12, dense_steps=12, tile=(2, 4, 4), window=(1, 1, 1))
    assert sparse.density() < 1 and sparse.meta["params"]["dense_steps"] == 12
    assert sta.plan(geometry, 2, step=3, layer=0, dense_steps=4, mask_strategy={"9_0_0": [1, 1, 1]}).density() == 1
    with pytest.raises(ValueError, match="mask_strategy: .*layer 5"):                  # as the session refuses it
        sta.plan(geometry, 2, step=3, layer=5, dense_steps=4, mask_strategy={"9_0_0": [1, 1, 1]})


def token_provider(tile, window, second=None):
    """The oracle's masks: STA's rule in the model's order, one-token blocks (independent of the tile order); with
    ``second``, odd heads take that window."""
    def provider(geometry, num_heads, step, layer):
        allowed = np.stack([raster_mask(geometry, tile, second if h % 2 and second else window)
                            for h in range(num_heads)])
        offsets = np.arange(geometry.tokens + 1)
        return BlockMask(num_heads, offsets, offsets, *csr.from_block_map(allowed), None, {})
    return provider


@pytest.mark.parametrize("name, strategy", [("wan", False), ("hunyuan", False), ("cogvideox", False),
                                            ("wan", True), ("hunyuan", True)])
def test_models_run_to_the_float64_oracle_through_the_tile_order(name, strategy, monkeypatch):
    """Tiny Wan (no text), HunyuanVideo 1.5 (text after the video, padded per sample) and CogVideoX (text first):
    q, k, v go into the tile order and back; the output is float64 attention under STA's rule in raster order. With
    a mask strategy, odd heads take another window: each window runs as its own one-head kernel on its heads, and no
    layer's mask is kept after its call."""
    case = CASES[name]
    model, inputs = case.build(), case.inputs(batch=2)
    params = {"tile": (2, 4, 4), "window": (1, 1, 3)}
    second = (3, 1, 1) if strategy else None
    expected, _ = oracle_output(case, model, inputs, token_provider(**params, second=second), 0, 500.0, monkeypatch)
    dense = forward(model, inputs, 500.0)
    layers, heads = len(case.attention(model)), model.config.num_attention_heads
    run = {"tile": params["tile"], "mask_strategy": {f"0_{layer}_{h}": second if h % 2 else params["window"]
                                                     for layer in range(layers) for h in range(heads)}} \
        if strategy else params
    handle = sparse.apply(model, "sta", device="cpu", num_steps=1, **run)
    try:
        got = forward(model, inputs, 500.0)
        kept = handle.mask(0)
    finally:
        handle.remove()
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=max(5e-6, case.atol))
    assert (got - dense).abs().max() > 5e-3
    assert {s["backend"] for s in handle.stats()} != {"dense"}
    assert (kept is None) == strategy                                  # a strategy's masks: kept by no plan
    order = sta.token_order(handle.geometry, params["tile"])
    sparsecore.clear_cache()
    assert not order._on_device


def test_ring_attention_and_kandinsky_tiles_are_refused_at_the_forward():
    model = CASES["wan"].build()
    handle = sparse.apply(model, "sta", device="cpu", num_steps=2, tile=(2, 4, 4), dense_steps=1)
    for block in model.blocks:
        block.attn1.processor._parallel_config = fake_parallel_config(ring_degree=2)
    with pytest.raises(ValueError, match=r"method: under ring attention \(ring degree 2\).*tiles of 2x4x4"):
        forward(model, CASES["wan"].inputs(batch=1), 999.0)
    assert handle.step is None
    with pytest.warns(UserWarning):
        handle.remove()
    case = CASES["kandinsky-5"]
    from test_integration_kandinsky import tiled_inputs
    for method in ("sta", "radial"):
        model = case.build()
        handle = sparse.apply(model, method, device="cpu", num_steps=1, **({"block_size": 16} if method == "radial"
                                                                             else {}))
        try:
            with pytest.raises(ValueError, match=f"method '{method}' places tokens by their raster position"):
                forward(model, tiled_inputs(batch=1), 500.0)
        finally:
            handle.remove()



def test_a_strategy_for_other_layers_is_refused_at_apply():
    """A strategy must number the model's layers 0..N-1: fewer failed only at the first forward, after earlier layers
    ran; more (another model's numbering, e.g. Wan VACE's blocks first) ran silently with shifted windows."""
    model = CASES["wan"].build()                                        # two attention layers, two heads
    for layers in (1, 3):
        strategy = {f"0_{layer}_{h}": (1, 1, 3) for layer in range(layers) for h in range(2)}
        with pytest.raises(ValueError, match=f"mask_strategy: expected windows for the model's layers 0..1, got "
                                             f"{layers} layers 0..{layers - 1}"):
            sparse.apply(model, "sta", device="cpu", num_steps=1, tile=(2, 4, 4), mask_strategy=strategy)
    assert all(type(block.attn1.processor).__module__.startswith("diffusers") for block in model.blocks)


def test_a_strategy_compiles_each_window_once_and_runs_it_on_its_heads(monkeypatch):
    """Two layers x two steps of per-head windows out of two: two one-head kernels, compiled at the first call that
    needs each and run on their heads at every call; the output is the mask's (the float64 oracle above holds the
    whole path; here the grouped output against the multi-head mask's own kernel on the same q, k, v)."""
    case = CASES["wan"]
    model, inputs = case.build(), case.inputs(batch=2)
    windows = [(1, 1, 3), (3, 1, 1)]
    strategy = {f"{step}_{layer}_{h}": windows[(step + layer + h) % 2] for step in range(2) for layer in range(2)
                for h in range(2)}
    compiled = []
    compile_ = sparsecore.compile
    monkeypatch.setattr(sparsecore, "compile", lambda mask, **kw: compiled.append(mask) or compile_(mask, **kw))
    handle = sparse.apply(model, "sta", device="cpu", num_steps=2, tile=(2, 4, 4), mask_strategy=strategy)
    try:
        for t in (999.0, 500.0):
            forward(model, inputs, t)
    finally:
        handle.remove()
    assert [m.num_heads for m in compiled] == [1, 1]
    assert sorted(m.meta["head_windows"] for m in compiled) == [((1, 1, 2),), ((3, 1, 1),)]    # clamped to the grid
    from sparsecore.integrations.diffusers.head_groups import HeadGroupKernel
    session = sta.session(1, tile=(2, 4, 4), mask_strategy={f"0_0_{h}": windows[h % 2] for h in range(3)})
    geometry = VideoGeometry(4, 8, 8)
    mask = session.plan(geometry, 3, step=0, layer=0)
    groups = session.head_groups(geometry, mask)
    assert [members.tolist() for _, members in groups] == [[0, 2], [1]]
    grouped = HeadGroupKernel(mask, [(sparsecore.compile(m, device="cpu"), members) for m, members in groups])
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, geometry.tokens + 5, 3, 16, generator=gen) for _ in range(3))     # [B, S, H, D]
    order = sta.token_order(geometry, (2, 4, 4))
    want = order.scatter(sparsecore.compile(mask, device="cpu")(*(order.gather(t.transpose(1, 2)[:, :, :-5], 2)
                                                                  for t in (q, k, v))), 2).transpose(1, 2)
    layouts = {"token-major": (q, k, v),                                 # eager processors pass it
               "head-major": [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)],   # compiled
               "a slice of a longer sequence": [torch.cat([t, t], dim=1)[:, :t.shape[1]] for t in (q, k, v)]}
    for layout, inputs in layouts.items():
        got = grouped.attend(*inputs, order)
        torch.testing.assert_close(got[:, :-5], want, rtol=1e-6, atol=1e-6)
        assert (got[:, -5:] == 0).all() and got.transpose(1, 2).is_contiguous()      # rows past the mask 0; head-major
    with pytest.raises(ValueError, match="expected every one of the mask's 3 heads in exactly one group"):
        HeadGroupKernel(mask, [(None, (0, 1))] + [(None, (1, 2))])


def test_a_strategy_without_its_grid_warns_where_its_dense_steps_would_run_sparse():
    """FastVideo's json records no grid; it writes its dense steps as the whole searched grid, every head the widest
    window. On a grid that window does not cover those steps run sparse: the session says so once a grid, naming
    the steps, the window and the grid, unless ``dense_steps`` makes them dense anyway; a strategy without such
    first steps (one window throughout) says nothing."""
    strategy = {f"{s}_{layer}_{h}": [3, 2, 2] if s < 2 else [1 + h, 1, 1] for s in range(3) for layer in range(2)
                for h in range(2)}
    written, larger = VideoGeometry(6, 8, 8), VideoGeometry(10, 8, 8)          # 3 x 2 x 2 and 5 x 2 x 2 tiles
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        session = sta.session(3, tile=(2, 4, 4), mask_strategy=strategy)
        assert [session.action(written, step, 0).dense for step in range(3)] == [True, True, False]
        calm = sta.session(3, tile=(2, 4, 4), mask_strategy=strategy, dense_steps=2)
        assert [calm.action(larger, step, 1).dense for step in range(3)] == [True, True, False]
        uniform = sta.session(2, tile=(2, 4, 4), mask_strategy={f"{s}_0_0": [3, 2, 2] for s in range(2)})
        assert not uniform.action(larger, 0, 0).dense
    with pytest.warns(RuntimeWarning, match=r"mask_strategy: steps 0\.\.1 give every head the strategy's widest window "
                                            r"\(3, 2, 2\).* is a \(5, 2, 2\) grid .* those steps run sparse here"):
        assert not session.action(larger, 0, 0).dense
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                      # once a grid
        session.plan(larger, 2, step=2, layer=1)


def test_a_strategys_whole_grid_steps_are_its_first_steps_with_every_layer_and_head_widest():
    """Only first steps whose every layer gives every head the widest window look like FastVideo's dense steps: a step
    with one narrower layer ends them, a later widest step is not one of them."""
    def strategy(windows_of):        # windows_of(step, layer) -> one window a head, 2 heads, 2 layers, 4 steps
        return sta.read_strategy({f"{s}_{layer}_{h}": windows_of(s, layer)[h] for s in range(4) for layer in range(2)
                                  for h in range(2)})
    wide, narrow = [3, 2, 2], [1, 1, 1]
    assert strategy(lambda s, layer: [wide, wide] if s < 2 else [narrow, wide]).whole_grid_steps == (0, 1)
    assert strategy(lambda s, layer: [wide, wide] if s != 1 else [narrow, narrow]).whole_grid_steps == (0,)
    assert strategy(lambda s, layer: [wide, wide] if s == 0 and layer == 0 else [narrow, narrow]).whole_grid_steps \
        == ()
    assert strategy(lambda s, layer: [wide, wide]).whole_grid_steps == ()              # one window throughout
    assert strategy(lambda s, layer: [wide, narrow]).widest == (3, 2, 2)


def test_repeated_heads_repeats_a_one_head_masks_per_head_meta():
    """selection.repeated_heads (shared_mask's) copied a one-head mask's meta to n heads as it was: STA's window mask
    repeated to 3 heads kept one head_windows entry, so head_groups named head 0 only (heads 1 and 2 ran nothing) and
    select_heads refused the mask. Each per-head entry is now repeated; shared_mask's meta is the n-head mask's."""
    from sparsecore.methods.selection import repeated_heads, shared_mask
    geometry = VideoGeometry(6, 8, 8, text_tokens=5)
    session = sta.session(1, tile=(2, 4, 4), mask_strategy={"0_0_0": [1, 1, 1], "0_0_1": [3, 1, 2]})
    one = session.head_groups(geometry, session.plan(geometry, 2, step=0, layer=0))[0][0]
    assert one.num_heads == 1 and len(one.meta["head_windows"]) == 1
    repeated = repeated_heads(one, 3)
    assert repeated.meta["head_windows"] == one.meta["head_windows"] * 3
    tokens, seen = expand_to_tokens(repeated), []
    for one_head, heads in session.head_groups(geometry, repeated):
        for head in heads.tolist():
            assert (expand_to_tokens(one_head)[0] == tokens[head]).all(), head
        seen += heads.tolist()
    assert sorted(seen) == [0, 1, 2]
    assert repeated.select_heads([2]).meta["head_windows"] == one.meta["head_windows"]
    meta = {"per_head_keys": ["label"], "label": ["a", "b"]}
    block_map = np.eye(3, dtype=bool)
    offsets = np.array([0, 4, 8, 10])
    assert shared_mask(block_map, 2, offsets, offsets, meta=meta).select_heads([1]).meta["label"] == ("b",)
    with pytest.raises(ValueError, match=r"meta\['label'\]: listed in meta\['per_head_keys'\], so expected a list "
                                         r"of one entry per head \(3\), got 2 entries"):
        shared_mask(block_map, 3, offsets, offsets, meta=meta)


def test_select_heads_keeps_the_selected_heads_windows():
    """A mask's select_heads kept meta["head_windows"] of every head of the whole mask, so a sliced strategy mask's
    head_groups gave head ids past its heads, and a shard's plan differed from the whole plan's select_heads."""
    geometry = VideoGeometry(6, 8, 8, text_tokens=5)                     # grid of 3 x 2 x 2 tiles of (2, 4, 4)
    windows = [[1, 1, 1], [3, 1, 2], [1, 2, 1], [3, 1, 2]]
    session = sta.session(1, tile=(2, 4, 4), mask_strategy={f"0_0_{h}": w for h, w in enumerate(windows)})
    mask = session.plan(geometry, 4, step=0, layer=0)
    picked = mask.select_heads([2, 1])
    assert picked.meta["head_windows"] == (mask.meta["head_windows"][2], mask.meta["head_windows"][1])
    assert mask.select_heads(slice(1, 3)) == session.plan(geometry, 4, step=0, layer=0, heads=sparse_shard(1, 3, 4))
    tokens = expand_to_tokens(picked)
    seen = []
    for one_head, heads in session.head_groups(geometry, picked):
        assert ((0 <= heads) & (heads < picked.num_heads)).all(), heads
        for head in heads.tolist():
            assert (expand_to_tokens(one_head)[0] == tokens[head]).all(), head
        seen += heads.tolist()
    assert sorted(seen) == [0, 1]
