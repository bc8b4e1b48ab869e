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
from sparsecore.ir.host_facts import host_reads, note_row_lengths, row_lengths
from sparsecore.methods import adaspa, pasa
from sparsecore.methods.approximation import with_unselected
from sparsecore.workloads import video_qkv

GEOMETRIES = [VideoGeometry(12, 4, 8), VideoGeometry(6, 4, 6, text_tokens=40), VideoGeometry(5, 3, 7, text_tokens=9)]


def row_lengths_of(mask: BlockMask) -> np.ndarray:
    """Every row's kept key blocks, counted from its lists by definition."""
    indptr = np.asarray(mask.indptr.cpu() if isinstance(mask.indptr, torch.Tensor) else mask.indptr)
    return np.diff(indptr.reshape(mask.num_heads, -1), axis=1)


@settings(max_examples=20, deadline=None)
@given(st.sampled_from(GEOMETRIES), st.sampled_from([8, 16]), st.floats(0.05, 0.9), st.integers(0, 2**31 - 1),
       st.sampled_from(["drop", "grouped-first-order"]))
def test_pasa_masks_note_the_exact_row_lengths(geometry, block, density, seed, approximation):
    """PASA keeps the same count in every video row (text rows keep every block): its noted bounds are the shortest
    and the longest row, also on the mask that approximates the unlisted blocks."""
    q, k, _ = video_qkv(geometry, 2, 16, seed=seed % 1000)
    mask = pasa.plan(geometry, 2, step=30, layer=1, q=q, k=k, density=density, block_size=block,
                     approximation=approximation, seed=seed)
    lengths = row_lengths_of(mask)
    assert row_lengths(mask) == (int(lengths.min()), int(lengths.max()))


@settings(max_examples=20, deadline=None)
@given(st.sampled_from(GEOMETRIES), st.floats(0.3, 0.9), st.integers(0, 2**31 - 1))
def test_adaspa_masks_note_bounds_their_rows_keep(geometry, sparsity, seed):
    """AdaSpa's head-adaptive counts are on the device: the bounds noted hold every row (0 as the shortest)."""
    q, k, _ = video_qkv(geometry, 3, 16, seed=seed % 1000)
    mask = adaspa.plan(geometry, 3, step=10, q=q, k=k, block_size=8, sparsity=sparsity)
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


def test_masks_sharing_lists_share_what_is_known_of_them():
    """A mask that treats the unlisted blocks otherwise (the same lists) and a copy on another device share the
    host facts; a mask with lists of its own does not."""
    mask = note_row_lengths(small_mask().to("cpu"), 1, 2)
    treated = with_unselected(mask, Unselected.parse("zeroth"))
    assert treated is not mask and treated.indices is mask.indices and row_lengths(treated) == (1, 2)
    assert host_reads(treated) is host_reads(mask)
    assert row_lengths(small_mask()) is None
    if torch.cuda.is_available():
        assert row_lengths(mask.copy_to("cuda")) == (1, 2)
