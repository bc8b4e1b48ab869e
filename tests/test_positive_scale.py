"""FA4 and FlashInfer take positive scales only (FA4's row maximum is of the raw scores): others run as the same
scores at a positive scale (``backends/cuda/positive_scale.py``). On the H200 both gave NaN at scale -20; at scale 0
FA4 gave NaN (a masked-out score times 0) and FlashInfer a wrong output."""

from __future__ import annotations

import math

import pytest
import torch

from sparsecore.backends.cuda.positive_scale import positive_scale


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("scale", [0.3, -20.0, -0.125, 0.0])
def test_the_scores_the_kernels_compute_equal_the_callers_bit_for_bit(dtype, scale):
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 16, 64, generator=gen).to(dtype) for _ in range(2))
    q_run, scale_run = positive_scale(q, scale)
    assert scale_run > 0 and (q_run is q) == (scale > 0)
    want = (q.float() @ k.float().transpose(1, 2)) * scale
    got = (q_run.float() @ k.float().transpose(1, 2)) * scale_run
    assert torch.equal(got, want)


def test_a_zero_scale_keeps_a_non_finite_query_non_finite():
    """Dense attention's ``q . k * 0`` is NaN where q holds an infinity; so is the kernels' run of it."""
    q = torch.tensor([[1.0, math.inf], [2.0, 3.0]])
    q_run, _ = positive_scale(q, 0.0)
    assert torch.isnan(q_run[0, 1]) and torch.equal(q_run[1], torch.zeros(2))
