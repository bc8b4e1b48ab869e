"""Every invalid BlockMask input raises ValueError/TypeError with a message that names the field."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparsecore import BlockMask

Q_OFF = np.array([0, 16, 32, 40])
KV_OFF = np.array([0, 32, 64, 96, 100])
INDPTR = np.array([[0, 2, 3, 3], [3, 4, 6, 8]])
INDICES = np.array([0, 2, 1, 3, 0, 1, 2, 3])


def make(**changes):
    fields = dict(num_heads=2, q_offsets=Q_OFF, kv_offsets=KV_OFF, indptr=INDPTR, indices=INDICES)
    fields.update(changes)
    return BlockMask(**fields)


def test_valid_mask_builds():
    mask = make()
    assert (mask.num_heads, mask.q_len, mask.kv_len, mask.num_q_blocks, mask.num_kv_blocks) == (2, 40, 100, 3, 4)
    assert mask.row(0, 0).tolist() == [0, 2] and mask.row(0, 2).tolist() == []
    assert mask.indices.dtype == np.int32 and mask.q_offsets.dtype == np.int64


@pytest.mark.parametrize("changes, error, message", [
    (dict(num_heads=True), TypeError, r"num_heads: expected an int, got bool"),
    (dict(num_heads=2.0), TypeError, r"num_heads: expected an int, got float"),
    (dict(num_heads=0), ValueError, r"num_heads: expected an int >= 1, got 0"),
    (dict(q_offsets=np.array([0.0, 16.0, 40.0])), TypeError, r"q_offsets: expected an integer array, got dtype float64"),
    (dict(q_offsets=np.array([True, False])), TypeError, r"q_offsets: expected an integer array, got dtype bool"),
    (dict(q_offsets=Q_OFF[None]), ValueError, r"q_offsets: expected 1 dimension\(s\), got shape \(1, 4\)"),
    (dict(q_offsets=np.array([0])), ValueError, r"q_offsets: expected at least 2 boundaries"),
    (dict(q_offsets=np.array([1, 16, 32, 40])), ValueError, r"q_offsets\[0\]: expected 0"),
    (dict(q_offsets=np.array([0, 16, 16, 40])), ValueError,
     r"q_offsets: boundaries must be strictly increasing, got q_offsets\[1\]=16 followed by q_offsets\[2\]=16"),
    (dict(kv_offsets=np.array([0, 64, 32, 96, 100])), ValueError, r"kv_offsets: boundaries must be strictly increasing"),
    (dict(indptr=INDPTR[:, :3]), ValueError, r"indptr: expected shape \[num_heads, num_q_blocks \+ 1\] = \[2, 4\], got \[2, 3\]"),
    (dict(indptr=INDPTR.ravel()), ValueError, r"indptr: expected 2 dimension\(s\)"),
    (dict(indptr=INDPTR + 1), ValueError, r"indptr\[0, 0\]: expected 0"),
    (dict(indptr=np.array([[0, 3, 2, 3], [3, 4, 6, 8]])), ValueError,
     r"indptr\[0\]: expected non-decreasing pointers, got indptr\[0, 1\]=3 > indptr\[0, 2\]=2"),
    (dict(indptr=np.array([[0, 2, 3, 3], [2, 4, 6, 8]])), ValueError, r"indptr\[1, 0\]: expected 3 \(each head's lists"),
    (dict(indptr=np.array([[0, 2, 3, 3], [3, 4, 6, 7]])), ValueError, r"indices: expected 7 entries \(indptr\[-1, -1\]\), got 8"),
    (dict(indptr=np.array([[0, 2, 3, 3], [3, 4, 6, 2**40]])), ValueError, r"indptr: values must fit int32"),
    (dict(indices=np.array([0, 2, 1, 3, 0, 1, 2, 3 - 2**32])), ValueError,           # int32 would read it as 3
     r"indices: values must fit int32, got range \[-4294967293, 3\]"),
    (dict(indices=np.array([0, 2, 1, 3, 0, 1, 2, 4])), ValueError,
     r"indices\[7\]=4 is out of range: key blocks are 0..3 \(kv_len=100, 4 blocks\)"),
    (dict(indices=np.array([0, 2, 1, 3, 0, 1, 2, -1])), ValueError, r"indices\[7\]=-1 is out of range"),
    (dict(indices=np.array([2, 0, 1, 3, 0, 1, 2, 3])), ValueError,
     r"indices\[1\]=0 after indices\[0\]=2 in row \(head 0, query block 0\) is out of order"),
    (dict(indices=np.array([0, 2, 1, 3, 0, 1, 3, 3])), ValueError,
     r"indices\[7\]=3 after indices\[6\]=3 in row \(head 1, query block 2\) is a duplicate"),
    (dict(indices=INDICES.astype(np.float32)), TypeError, r"indices: expected an integer array, got dtype float32"),
    (dict(budgets=np.array([0.5])), ValueError, r"budgets: expected shape \[num_heads\] = \[2\], got \[1\]"),
    (dict(budgets=np.array([0.5, 1.5])), ValueError, r"budgets\[1\]=1.5: expected a fraction of key blocks in \[0, 1\]"),
    (dict(budgets=np.array([np.nan, 0.5])), ValueError, r"budgets\[0\]=nan"),
    (dict(budgets=np.array(["a", "b"])), TypeError, r"budgets: expected a float array, got dtype <U1"),
    (dict(meta=[1, 2]), TypeError, r"meta: expected a dict, got list"),
    (dict(meta={"x": object()}), ValueError, r"meta: expected a JSON-serializable dict"),
    (dict(meta={"x": float("nan")}), ValueError, r"meta: expected a JSON-serializable dict"),
])
def test_invalid_fields_raise_naming_the_field(changes, error, message):
    with pytest.raises(error, match=message):
        make(**changes)


def test_rows_may_go_down_across_a_row_boundary():
    mask = make(indices=np.array([2, 3, 0, 3, 0, 1, 2, 3]))  # row 0 = [2, 3], row 1 = [0]
    assert mask.row(0, 1).tolist() == [0]


def test_accepts_torch_tensors_and_lists_and_stores_read_only_numpy():
    mask = make(q_offsets=torch.tensor(Q_OFF), indices=INDICES.tolist())
    assert isinstance(mask.q_offsets, np.ndarray) and isinstance(mask.indices, np.ndarray)
    with pytest.raises(ValueError, match="read-only"):
        mask.indices[0] = 3


def test_meta_is_read_only_and_frozen_fields_cannot_be_set():
    mask = make(meta={"method": "x", "params": {"w": [1, 2]}})
    with pytest.raises(TypeError):
        mask.meta["method"] = "y"
    with pytest.raises(TypeError):
        mask.meta["params"]["w"] = 3
    with pytest.raises(AttributeError):
        mask.num_heads = 3


@pytest.mark.parametrize("call, error, message", [
    (lambda: BlockMask.from_dense(np.ones((1, 2, 2), dtype=np.int8), 8, 8, 4), TypeError,
     r"mask: expected a bool array \[H, MB, NB\], got dtype int8"),
    (lambda: BlockMask.from_dense(np.ones((2, 2), dtype=bool), 8, 8, 4), ValueError, r"mask: expected 3 dimensions"),
    (lambda: BlockMask.from_dense(np.ones((1, 3, 2), dtype=bool), 8, 8, 4), ValueError,
     r"mask: expected shape \[H, 2, 2\] for q_len=8, kv_len=8"),
    (lambda: BlockMask.from_dense(np.ones((1, 1, 1), dtype=bool), 8, 8, 0), ValueError, r"block: expected an int >= 1"),
    (lambda: BlockMask.from_lists([[[0, 0]]], [0, 4], [0, 4]), ValueError, r"lists\[0\]\[0\]: key block 0 is listed twice"),
    (lambda: BlockMask.from_lists([[[0], [0]]], [0, 4], [0, 4]), ValueError,
     r"lists\[0\]: expected one list per query block \(1\), got 2"),
    (lambda: BlockMask.uniform_offsets(0, 4), ValueError, r"length: expected an int >= 1, got 0"),
])
def test_constructor_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()
