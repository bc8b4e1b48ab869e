"""A batch's samples grouped by valid text length (:mod:`sparsecore.integrations.diffusers.text_groups`): each group's
rows reach its attention and come back to their places; consecutive rows are views, not gathers."""

from __future__ import annotations

import pytest
import torch

from sparsecore.integrations.diffusers.text_groups import attend_in_groups, batch_rows, text_groups


def test_groups_by_valid_text_in_order_of_first_appearance():
    assert text_groups([0, 40], per_sample=False) == {(0, 0): [0], (40, 0): [1]}
    assert text_groups([40, 0, 40, 0], per_sample=False) == {(40, 0): [0, 2], (0, 0): [1, 3]}
    assert text_groups([5, 5, 5], per_sample=False) == {(5, 0): [0, 1, 2]}
    assert text_groups([5, 5], per_sample=True) == {(5, 0): [0], (5, 1): [1]}


def test_consecutive_rows_are_a_slice_and_others_an_index():
    cpu = torch.device("cpu")
    assert batch_rows([2], cpu) == slice(2, 3)
    assert batch_rows([1, 2, 3], cpu) == slice(1, 4)
    index = batch_rows([0, 2], cpu)
    assert isinstance(index, torch.Tensor) and index.dtype == torch.long and index.tolist() == [0, 2]


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available: the index sent from pinned "
                          "memory is a CUDA path")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("counts, per_sample", [([0, 40], False), ([40, 0, 40, 0], False), ([3, 3, 7], False),
                                                ([3, 3], True), ([6], False)])
def test_each_row_gets_its_own_groups_attention(counts, per_sample, device):
    """The oracle, by definition: row b's output is the attention its own valid length gives it, here a function of
    (valid text, the row's q, k, v) that tells rows and lengths apart."""
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(len(counts), 5, 2, 3, generator=gen, dtype=torch.float64).to(device) for _ in range(2))
    v = torch.randn(len(counts), 5, 2, 4, generator=gen, dtype=torch.float64).to(device)     # its own head dim
    seen = []

    def attend(count, q_, k_, v_):
        seen.append((count, q_.shape[0]))
        return (v_ * (q_ * 2 + k_).sum(-1, keepdim=True) * (count + 1)).float()       # a kernel's dtype may differ

    if device == "cuda":                           # neither slices nor the index of other rows wait for the GPU
        torch.cuda.set_sync_debug_mode("error")
    try:
        out = attend_in_groups(q, k, v, text_groups(counts, per_sample), attend)
    finally:
        torch.cuda.set_sync_debug_mode("default") if device == "cuda" else None
    expected = torch.stack([(v[b] * (q[b] * 2 + k[b]).sum(-1, keepdim=True) * (counts[b] + 1)).float().double()
                            for b in range(len(counts))])
    assert out.dtype == torch.float64 and out.shape == v.shape
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    groups = text_groups(counts, per_sample)
    assert sorted(seen) == sorted((count, len(rows)) for (count, _), rows in groups.items())


def test_consecutive_groups_reach_attention_as_views_of_the_batch_and_fill_head_major_memory():
    q, k, v = (torch.randn(2, 4, 2, 3, generator=torch.Generator().manual_seed(1)) for _ in range(3))
    bases = []

    def attend(count, q_, k_, v_):
        bases.append(tuple(x.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()
                           for x, y in ((q_, q), (k_, k), (v_, v))))
        return q_.transpose(1, 2).contiguous().transpose(1, 2)            # head-major, as the kernels write

    out = attend_in_groups(q, k, v, text_groups([0, 40], False), attend)
    assert bases == [(True, True, True)] * 2
    assert out.transpose(1, 2).is_contiguous()            # what the op returns without another copy


def test_a_group_result_of_the_wrong_batch_raises():
    q = torch.zeros(2, 4, 2, 3)
    with pytest.raises(RuntimeError, match="2 samples with 5 valid text tokens returned 1"):
        attend_in_groups(q, q, q, text_groups([5, 5, 0], False) | {}, lambda count, q_, k_, v_: q_[:1])
