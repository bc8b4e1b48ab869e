"""What the host knows of a mask's lists without reading them (sparsecore.ir.host_facts): the row-length bounds
the planners note, checked against each mask's own lists, and who shares them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsecore import BlockMask, VideoGeometry
from sparsecore.ir import Unselected
from sparsecore.ir.host_facts import as_new, host_reads, note_row_lengths, row_lengths
from sparsecore.methods import HeadShard, adaspa, pasa
from sparsecore.methods.approximation import with_unselected
from sparsecore.workloads import video_qkv

GEOMETRIES = [VideoGeometry(12, 4, 8), VideoGeometry(6, 4, 6, text_tokens=40), VideoGeometry(5, 3, 7, text_tokens=9),
              VideoGeometry(6, 4, 6, text_tokens=40, text_position="start"), VideoGeometry(8, 4, 6, causal_frames=3)]


def row_lengths_of(mask: BlockMask) -> np.ndarray:
    """Every row's kept key blocks, counted from its lists by definition."""
    indptr = np.asarray(mask.indptr.cpu() if isinstance(mask.indptr, torch.Tensor) else mask.indptr)
    return np.diff(indptr.reshape(mask.num_heads, -1), axis=1)


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(GEOMETRIES), st.sampled_from([8, 16]), st.floats(0.05, 0.9), st.integers(0, 2**31 - 1),
       st.sampled_from(["drop", "grouped-first-order"]), st.sampled_from([None, (1, 3)]))
def test_pasa_masks_note_bounds_their_rows_keep(geometry, block, density, seed, approximation, shard):
    """PASA keeps the same count in every video row (text rows keep every block): its noted bounds are the shortest
    and the longest row, also on the mask that approximates the unlisted blocks and on a shard of the heads; under
    frame-causal attention (rows keep shares of what they see) they bound every row."""
    q, k, _ = video_qkv(geometry, 4, 16, seed=seed % 1000)
    heads = None
    if shard is not None:
        heads = HeadShard(*shard, 4)
        q, k = q[:, shard[0]:shard[1]], k[:, shard[0]:shard[1]]
    approximation = "drop" if geometry.causal_frames else approximation
    mask = pasa.plan(geometry, 4, step=30, layer=1, q=q, k=k, density=density, block_size=block,
                     approximation=approximation, seed=seed, heads=heads)
    lengths = row_lengths_of(mask)
    shortest, longest = row_lengths(mask)
    assert shortest <= lengths.min() and lengths.max() <= longest
    if not geometry.causal_frames:
        assert (shortest, longest) == (int(lengths.min()), int(lengths.max()))


@settings(max_examples=20, deadline=None)
@given(st.sampled_from(GEOMETRIES), st.floats(0.3, 0.9), st.integers(0, 2**31 - 1), st.booleans())
def test_adaspa_masks_note_bounds_their_rows_keep(geometry, sparsity, seed, adaptive):
    """AdaSpa's head-adaptive counts are on the device: the bounds noted hold every row (0 as the shortest)."""
    q, k, _ = video_qkv(geometry, 3, 16, seed=seed % 1000)
    mask = adaspa.plan(geometry, 3, step=10, q=q, k=k, block_size=8, sparsity=sparsity, head_adaptive=adaptive)
    shortest, longest = row_lengths(mask)
    lengths = row_lengths_of(mask)
    assert shortest <= lengths.min() and lengths.max() <= longest <= mask.num_kv_blocks


def small_mask() -> BlockMask:
    return BlockMask.from_lists([[[0], [0, 1]]], [0, 4, 8], [0, 4, 8])


def test_row_length_bounds_are_checked_before_they_are_kept():
    mask = small_mask()
    with pytest.raises(TypeError, match="shortest"):
        note_row_lengths(mask, 1.0, 2)
    with pytest.raises(ValueError, match="longest: expected an int >= 2"):
        note_row_lengths(mask, 2, 1)
    with pytest.raises(ValueError, match="at most the mask's 2 key blocks"):
        note_row_lengths(mask, 1, 3)
    assert row_lengths(mask) is None
    assert note_row_lengths(mask, 1, 2) is mask and row_lengths(mask) == (1, 2)


def test_masks_sharing_lists_share_what_is_known_of_them(monkeypatch):
    """A mask that treats the unlisted blocks otherwise (the same lists) and a copy on another device (a stand-in
    device here: the copy is a clone) share the host facts; a mask with lists of its own, or one made :func:`as_new`
    for a benchmark, does not."""
    from sparsecore.ir import placement, uploads
    mask = note_row_lengths(small_mask().to("cpu"), 1, 2)
    treated = with_unselected(mask, Unselected.parse("zeroth"))
    assert treated is not mask and treated.indices is mask.indices and row_lengths(treated) == (1, 2)
    assert host_reads(treated) is host_reads(mask)
    assert row_lengths(small_mask()) is None
    fresh = as_new(mask)
    assert fresh.indices is mask.indices and row_lengths(fresh) is None and host_reads(fresh) is not host_reads(mask)
    monkeypatch.setattr(placement, "run_device", lambda device: "elsewhere")
    monkeypatch.setattr(uploads, "moved", lambda tensor, device: tensor.clone())
    copy = mask.copy_to("elsewhere")
    assert copy.indices is not mask.indices and row_lengths(copy) == (1, 2)
