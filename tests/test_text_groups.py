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
    q, k, v = (torch.randn(len(counts), 5, 2, 3, generator=gen, dtype=torch.float64).to(device) for _ in range(3))
    seen = []

    def attend(count, q_, k_, v_):
        seen.append((count, q_.shape[0]))
        return (q_ * 2 + k_ - v_) * (count + 1)

    out = attend_in_groups(q, k, v, text_groups(counts, per_sample), attend)
    expected = torch.stack([(q[b] * 2 + k[b] - v[b]) * (counts[b] + 1) for b in range(len(counts))])
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    groups = text_groups(counts, per_sample)
    assert sorted(seen) == sorted((count, len(rows)) for (count, _), rows in groups.items())


def test_consecutive_groups_reach_attention_as_views_of_the_batch():
    q, k, v = (torch.randn(2, 4, 2, 3, generator=torch.Generator().manual_seed(1)) for _ in range(3))
    bases = []

    def attend(count, q_, k_, v_):
        bases.append(q_.untyped_storage().data_ptr() == q.untyped_storage().data_ptr())
        return q_

    attend_in_groups(q, k, v, text_groups([0, 40], False), attend)
    assert bases == [True, True]
