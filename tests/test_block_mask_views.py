"""Constructors, views and identity of BlockMask, checked against hand-computed values."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from oracle import expand_to_tokens
from strategies import block_masks

from sparsecore import BlockMask, Capabilities

ANY = Capabilities(devices=("test",), array_type="numpy", dtypes=frozenset({"float64"}))


def small() -> BlockMask:
    # q_len 10 in blocks [0,4,8,10]; kv_len 6 in blocks [0,4,6]
    dense = np.array([[[1, 0], [1, 1], [0, 0]],
                      [[0, 1], [0, 1], [1, 1]]], dtype=bool)
    return BlockMask.from_dense(dense, 10, 6, 4, meta={"method": "hand"})


def test_uniform_offsets_short_last_block():
    assert BlockMask.uniform_offsets(10, 4).tolist() == [0, 4, 8, 10]
    assert BlockMask.uniform_offsets(8, 4).tolist() == [0, 4, 8]
    assert BlockMask.uniform_offsets(3, 8).tolist() == [0, 3]


def test_from_dense_round_trips_and_builds_csr():
    mask = small()
    assert mask.indptr.tolist() == [[0, 1, 3, 3], [3, 4, 5, 7]]
    assert mask.indices.tolist() == [0, 0, 1, 1, 1, 0, 1]
    assert (mask.to_dense() == np.array([[[1, 0], [1, 1], [0, 0]], [[0, 1], [0, 1], [1, 1]]], dtype=bool)).all()


def test_from_lists_sorts_rows_and_accepts_sets():
    mask = BlockMask.from_lists([[{2, 0}, []], [[1], (2, 1, 0)]], [0, 5, 9], [0, 3, 6, 7])
    assert mask.row(0, 0).tolist() == [0, 2] and mask.row(0, 1).tolist() == []
    assert mask.row(1, 1).tolist() == [0, 1, 2]


def test_full_keeps_everything():
    mask = BlockMask.full(3, 50, 70, 16, 32)
    assert mask.density() == 1.0 and mask.to_dense().all()
    assert mask.num_q_blocks == 4 and mask.num_kv_blocks == 3
    assert np.allclose(mask.budgets, 1.0)


def test_density_flops_budgets_by_hand():
    mask = small()
    # head 0: block rows of 4, 4, 2 query tokens keep 4, 6, 0 key tokens -> 16 + 24 = 40 of 60 pairs
    # head 1: rows keep 2, 2, 6 key tokens -> 8 + 8 + 12 = 28 of 60
    assert np.allclose(mask.density(per_head=True), [40 / 60, 28 / 60])
    assert mask.density() == pytest.approx(68 / 120)
    assert mask.flops(head_dim=8) == 4 * 68 * 8
    assert mask.dense_flops(head_dim=8) == 4 * 2 * 10 * 6 * 8
    assert np.allclose(mask.budgets, [(1 + 2 + 0) / 3 / 2, (1 + 1 + 2) / 3 / 2])


def test_token_mask_by_hand_and_limit():
    tokens = small().token_mask()
    assert tokens.shape == (2, 10, 6)
    assert tokens[0, :4, :4].all() and not tokens[0, :4, 4:].any()
    assert not tokens[0, 8:].any() and tokens[1, 8:].all()
    with pytest.raises(ValueError, match=r"token_mask: 2x10x6 = 120 elements exceeds the limit of 100"):
        small().token_mask(limit=100)


@given(block_masks(ANY, num_heads=3))
def test_token_mask_equals_an_independent_expansion(mask):
    assert (mask.token_mask() == expand_to_tokens(mask)).all()
    assert mask.density() == pytest.approx(expand_to_tokens(mask).mean())


@given(block_masks(ANY, num_heads=2))
def test_dense_and_lists_constructors_agree(mask):
    if mask.uniform_block_size("q") and mask.uniform_block_size("kv"):
        again = BlockMask.from_dense(mask.to_dense(), mask.q_len, mask.kv_len, mask.uniform_block_size("q"),
                                     mask.uniform_block_size("kv"))
        assert again.fingerprint() == mask.fingerprint()
    rows = [[mask.row(h, i) for i in range(mask.num_q_blocks)] for h in range(mask.num_heads)]
    assert BlockMask.from_lists(rows, mask.q_offsets, mask.kv_offsets).fingerprint() == mask.fingerprint()


def test_select_heads():
    mask = small()
    one = mask.select_heads([1])
    assert one.num_heads == 1 and (one.to_dense()[0] == mask.to_dense()[1]).all()
    swapped = mask.select_heads(np.array([1, 0]))
    assert (swapped.to_dense() == mask.to_dense()[::-1]).all()
    assert np.allclose(swapped.budgets, mask.budgets[::-1]) and swapped.meta == mask.meta
    assert mask.select_heads(slice(0, 1)).num_heads == 1
    assert mask.select_heads(np.array([False, True])).fingerprint() == one.fingerprint()
    with pytest.raises(ValueError, match=r"heads: expected a non-empty selection of 0..1, got \[2\]"):
        mask.select_heads([2])
    with pytest.raises(ValueError, match=r"heads: expected a non-empty selection of 0..1, got \[-1\]"):
        mask.select_heads([-1])                                             # not read as the last head
    with pytest.raises(ValueError, match=r"heads: a bool selector needs shape \[2\], got \[1\]"):
        mask.select_heads(np.array([True]))                                 # not read as "head 0 only"


def test_select_heads_selects_the_meta_entries_named_per_head():
    """meta["per_head_keys"] names entries of one value per head: a selection of heads (host or device) keeps the
    selected heads' values in its order; other entries stay; a listed entry of the wrong length is refused."""
    torch = pytest.importorskip("torch")
    mask = BlockMask.from_dense(small().to_dense(), 10, 6, 4,
                                meta={"method": "hand", "per_head_keys": ["label"], "label": ["a", "b"]})
    for m in (mask, mask.to(torch.device("cpu"))):
        picked = m.select_heads([1, 0, 1])
        assert picked.meta["label"] == ("b", "a", "b") and picked.meta["method"] == "hand"
        assert m.select_heads(np.array([False, True])).meta["label"] == ("b",)


def test_a_mask_whose_per_head_meta_does_not_hold_one_entry_per_head_is_refused(tmp_path):
    """meta["per_head_keys"] entries were checked only by select_heads: a mask (or a file) whose entry held another
    count of values was taken, so its meta described heads it does not have. Construction (checked, unchecked, load)
    now refuses it, naming the entry."""
    torch = pytest.importorskip("torch")
    lists = small()
    wrong_length = (r"meta\['label'\]: listed in meta\['per_head_keys'\], so expected a list of one entry per head "
                    r"\(2\), got 1 entries; record one entry per head")
    for meta, message in (({"per_head_keys": ["label"], "label": ["a"]}, wrong_length),
                          ({"per_head_keys": ["label"], "label": "ab"}, r"meta\['label'\]: .* got str"),
                          ({"per_head_keys": ["label"]}, r"meta\['per_head_keys'\]: expected a list of the meta keys")):
        with pytest.raises(ValueError, match=message):
            BlockMask.from_dense(lists.to_dense(), 10, 6, 4, meta=meta)
        for indptr, indices in ((lists.indptr, lists.indices),
                                (torch.as_tensor(np.array(lists.indptr)), torch.as_tensor(np.array(lists.indices)))):
            with pytest.raises(ValueError, match=message):
                BlockMask.unchecked(2, lists.q_offsets, lists.kv_offsets, indptr, indices, lists.budgets, meta)
    path = BlockMask.from_dense(lists.to_dense(), 10, 6, 4, meta={"per_head_keys": ["label"], "label": ["a", "b"]}) \
        .save(tmp_path / "mask.safetensors")
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    header["__metadata__"]["meta"] = json.dumps({"per_head_keys": ["label"], "label": ["a"]})
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + size:])   # a header edited by hand
    with pytest.raises(ValueError, match=wrong_length):
        BlockMask.load(path)


def test_row_bounds():
    with pytest.raises(IndexError, match=r"h=2: expected 0..1"):
        small().row(2, 0)
    with pytest.raises(IndexError, match=r"h=-1: expected 0..1"):           # negatives too, not a ValueError
        small().row(-1, 0)
    assert np.array_equal(small().row(np.int64(1), 0), small().row(1, 0))   # ints of any kind that index
    import torch
    assert np.array_equal(small().row(torch.tensor(1), 0), small().row(1, 0))


def test_fingerprint_is_stable_and_ignores_budgets_and_meta():
    mask = small()
    # A change to this value means saved cache keys and compiled-kernel reuse change: do it on purpose only.
    assert mask.fingerprint() == "78ce3a17c925f83bee580599b33ef4e8ce51f47f0313bff230c92c537faf5321"
    relabeled = BlockMask(mask.num_heads, mask.q_offsets, mask.kv_offsets, mask.indptr, mask.indices,
                          budgets=[0.1, 0.2], meta={"method": "other"})
    assert relabeled.fingerprint() == mask.fingerprint() and hash(relabeled) == hash(mask)
    assert relabeled != mask
    rebudgeted = BlockMask(mask.num_heads, mask.q_offsets, mask.kv_offsets, mask.indptr, mask.indices,
                           budgets=[0.1, 0.2], meta={"method": "hand"})
    assert rebudgeted != mask                                              # budgets alone tell masks apart
    assert rebudgeted == BlockMask(mask.num_heads, mask.q_offsets, mask.kv_offsets, mask.indptr, mask.indices,
                                   budgets=[0.1, 0.2], meta={"method": "hand"})
    moved = BlockMask.from_lists([[[0], [0, 1], []], [[1], [1], [0, 1]]], mask.q_offsets, [0, 3, 6])
    assert moved.fingerprint() != mask.fingerprint()


def test_repr_and_to_string():
    mask = small()
    assert repr(mask) == "BlockMask(heads=2, q_len=10, kv_len=6, blocks=3x2, nnz=7, density=0.5667, method='hand')"
    text = mask.to_string()
    assert "head 0" in text and "#." in text and "##" in text and ".." in text
    assert "larger than max_blocks=1" in mask.to_string(max_blocks=1)


def test_render_writes_a_png(tmp_path):
    import matplotlib.pyplot as plt
    before = plt.get_fignums()
    path = small().render(tmp_path / "sub" / "mask.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plt.get_fignums() == before


def test_a_failed_render_leaves_no_figure_open(tmp_path):
    """pyplot keeps each figure until it is closed: a render whose save failed kept its figure for good."""
    import matplotlib.pyplot as plt
    blocker = tmp_path / "file"
    blocker.write_text("")
    before = plt.get_fignums()
    for _ in range(2):
        with pytest.raises(OSError):
            small().render(blocker / "sub" / "mask.png", heads=[1, 0])
    assert plt.get_fignums() == before


@pytest.mark.parametrize("heads, q_blocks, method", [(1, 4, "diag"), (2, 4, "local_frame_window"),
                                                      (2, 300, "local_frame_window"), (1, 300, "m" * 40),
                                                      (2, 300, "m" * 40)])
def test_picture_titles_fit_for_one_or_two_heads(tmp_path, monkeypatch, heads, q_blocks, method):
    """A picture of one or two heads is one or two 3.2-inch panels wide, narrower than the figure's title: the
    title was cut at both edges (its method name lost for one head; for two heads, a long name or a sampled map)."""
    import matplotlib.pyplot as plt
    seen, close = [], plt.close

    def texts_of(fig):                            # the picture as saved: every title's box, in pixels
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        titles = [ax.title for ax in fig.axes if ax.axison]
        seen.append((fig._suptitle.get_text(), fig._suptitle.get_window_extent(renderer), fig.bbox,
                     [(t.get_text(), t.get_window_extent(renderer)) for t in titles]))
        close(fig)

    monkeypatch.setattr(plt, "close", texts_of)
    keep = np.random.default_rng(7).random((heads, q_blocks, q_blocks)) < 0.3
    BlockMask.from_dense(keep, 10 * q_blocks, 10 * q_blocks, 10, meta={"method": method}).render(tmp_path / "m.png")
    (title, box, figure, panels), = seen
    assert "".join(title.split()).startswith(f"{method}:{q_blocks}x{q_blocks}blocks")     # broken into lines
    assert 0 <= box.x0 and box.x1 <= figure.x1 and box.y1 <= figure.y1, (title, box, figure)
    assert [text for text, _ in panels] == [f"head {h}: density {d:.3f}" for h, d in
                                           enumerate(keep.mean(axis=(1, 2)))]
    assert all(0 <= b.x0 and b.x1 <= figure.x1 and not b.overlaps(box) for _, b in panels), (box, panels)


@pytest.mark.parametrize("q_len, kv_len", [(16, 4096), (4096, 16), (64, 64)])
def test_a_picture_of_a_long_thin_mask_shows_its_blocks(tmp_path, monkeypatch, q_len, kv_len):
    """Drawn to token scale, a mask of 16 query tokens against 4,096 keys (a ring shard, cross-attention) was a panel
    under 1 pixel tall: the picture showed none of its blocks. Each panel keeps a visible height and width."""
    import matplotlib.pyplot as plt
    boxes, close = [], plt.close

    def panels_of(fig):
        fig.canvas.draw()
        boxes.extend(ax.get_window_extent() for ax in fig.axes if ax.axison)
        close(fig)

    monkeypatch.setattr(plt, "close", panels_of)
    mask = BlockMask.full(1, q_len, kv_len, 8)
    mask.render(tmp_path / "thin.png")
    (box,), = [boxes]
    assert min(box.width, box.height) >= 0.25 * max(box.width, box.height), box


@given(st.integers(1, 40), st.integers(1, 9))
def test_uniform_block_size(length, block):
    mask = BlockMask.full(1, length, length, block)
    assert mask.uniform_block_size("q") == block or (length < block and mask.uniform_block_size("q") == length)


def test_the_text_map_draws_each_heads_own_blocks():
    from sparsecore.ir.draw import block_map_text
    mask = BlockMask.from_lists([[[0], [1]], [[1], [0]]], [0, 4, 8], [0, 4, 8])
    text = block_map_text(mask, 16).splitlines()
    assert text[2:4] == ["  #.", "  .#"] and text[5:7] == ["  .#", "  #."], text


def test_a_pixel_per_block_shows_each_blocks_own_state():
    """Maps past the drawn cell count are reduced to pixels: where each pixel is one block, it is that block."""
    from sparsecore.ir import draw
    offsets = np.arange(0, 64 + 1, 4)                          # 16 blocks of 4 tokens on 16 pixels of 4 tokens
    keep = np.random.default_rng(0).random((1, 16, 16)) < 0.5
    mask = BlockMask.from_lists([[np.flatnonzero(r).tolist() for r in keep[0]]], offsets, offsets)
    assert (next(draw._pixel_maps(mask, [0], (16, 16))) == keep[0]).all()


def _drawn_images(monkeypatch) -> list:
    """The arrays each panel of the next render draws, read from its figure before pyplot closes it."""
    import matplotlib.pyplot as plt
    images, close = [], plt.close

    def arrays_of(fig):
        images.extend(np.asarray(ax.images[0].get_array()) for ax in fig.axes if ax.axison)
        close(fig)

    monkeypatch.setattr(plt, "close", arrays_of)
    return images


def _kept_share_by_pixel(tokens: np.ndarray, pixels: tuple[int, int]) -> np.ndarray:
    """Brute force: the share of kept (query, key) token cells under each pixel; pixel p of a side of L tokens
    covers tokens [p * L // n, (p + 1) * L // n) for n = min(pixels, L) pixels on that side."""
    rows, cols = (np.arange(min(p, n) + 1) * n // min(p, n) for p, n in zip(pixels, tokens.shape))
    return np.array([[tokens[rows[r]:rows[r + 1], cols[c]:cols[c + 1]].mean() for c in range(len(cols) - 1)]
                     for r in range(len(rows) - 1)])


def test_a_reduced_picture_shows_blocks_narrower_than_a_pixel(tmp_path, monkeypatch):
    """1,024 x 1,024 blocks of 2 tokens: the picture sampled one token in 4, so a lone kept block between samples
    was not drawn and a nearly empty row looked empty. Each pixel shows its kept share now."""
    lone = [(1, 1), (3, 1022), (700, 9), (1023, 1023), (511, 512)]
    rows = [[] for _ in range(1024)]
    for i, j in lone:
        rows[i].append(j)
    rows[40] = list(range(0, 1024, 2))                                   # every other block: a half-kept row
    offsets = BlockMask.uniform_offsets(2048, 2)
    mask = BlockMask.from_lists([rows], offsets, offsets)
    from sparsecore.ir import draw
    monkeypatch.setattr(draw, "CHUNK", 100)                               # the lists' 517 entries in 6 chunks
    images = _drawn_images(monkeypatch)
    mask.render(tmp_path / "m.png")
    (drawn,) = images
    expected = _kept_share_by_pixel(expand_to_tokens(mask)[0], drawn.shape)
    assert 100 < drawn.shape[0] == drawn.shape[1] <= 512 and ((drawn > 0) == (expected > 0)).all(), \
        np.argwhere((drawn > 0) != (expected > 0))
    assert (drawn >= expected).all() and np.allclose(drawn[expected == 1], 1)


def test_a_reduced_picture_of_an_empty_mask_shows_nothing(tmp_path, monkeypatch):
    offsets = BlockMask.uniform_offsets(4096, 4)
    mask = BlockMask.from_lists([[[] for _ in range(1024)]] * 2, offsets, offsets)
    images = _drawn_images(monkeypatch)
    mask.render(tmp_path / "m.png")
    assert len(images) == 2 and all(image.size > 10_000 and not image.any() for image in images)


@given(block_masks(ANY, num_heads=2), st.tuples(st.integers(1, 17), st.integers(1, 17)))
def test_the_pixel_map_is_each_pixels_kept_share(mask, pixels):
    """Against a brute-force reduction of the token mask: odd lengths, arbitrary blocks, pixels that split blocks."""
    from sparsecore.ir import draw
    tokens = expand_to_tokens(mask)
    for h, share in enumerate(draw._pixel_maps(mask, range(mask.num_heads), pixels)):
        assert np.allclose(share, _kept_share_by_pixel(tokens[h], pixels), rtol=0, atol=1e-12)


@pytest.mark.parametrize("q_blocks, kv_blocks", [(1024, 1024), (32, 32768), (2, 8192), (64, 1024), (200, 200)])
def test_the_saved_png_shows_each_lone_block(tmp_path, monkeypatch, q_blocks, kv_blocks):
    """The PNG as a person sees it: a panel is ~200 screen pixels, so 512 image pixels drawn nearest-neighbour
    onto it dropped 3 in 5 of them again. Each lone kept block of 2 x 2 tokens shows as a shaded screen pixel."""
    import matplotlib.image
    import matplotlib.pyplot as plt
    panels, close = [], plt.close

    def panel_of(fig):
        (ax,) = [ax for ax in fig.axes if ax.axison]
        panels.append((ax.get_window_extent().transformed(fig.dpi_scale_trans.inverted()), fig.get_figheight()))
        close(fig)

    monkeypatch.setattr(plt, "close", panel_of)
    rng = np.random.default_rng(3)
    lone = sorted(set(zip(rng.integers(0, q_blocks, 12).tolist(), rng.integers(0, kv_blocks, 12).tolist())))
    rows = [[] for _ in range(q_blocks)]
    for i, j in lone:
        rows[i].append(j)
    mask = BlockMask.from_lists([rows], BlockMask.uniform_offsets(2 * q_blocks, 2),
                                BlockMask.uniform_offsets(2 * kv_blocks, 2))
    picture = matplotlib.image.imread(mask.render(tmp_path / "m.png"))
    ((box, fig_height),) = panels
    dpi = picture.shape[0] / fig_height
    for i, j in lone:                                # the block's centre, in the PNG's pixel rows and columns
        x = int((box.x0 + (2 * j + 1) / (2 * kv_blocks) * box.width) * dpi)
        y = int((fig_height - box.y1 + (2 * i + 1) / (2 * q_blocks) * box.height) * dpi)
        near = picture[max(y - 2, 0):y + 3, max(x - 2, 0):x + 3, 0]
        assert near.min() < 0.9, (i, j, near.min())  # red < 0.9: a shade of blue, not the map's near-white
