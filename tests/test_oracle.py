"""The oracle itself against torch's float64 softmax attention: a row that lists no key gives 0 and LSE -inf (the
IR's rule); a row whose scores are NaN gives NaN, as dense attention does (not the empty row's 0)."""

import numpy as np
import torch

from oracle import dense_attention


def test_oracle_matches_torch_softmax_and_keeps_nan_rows_nan():
    rng = np.random.default_rng(7)
    q, k, v = rng.normal(size=(2, 2, 5, 4)), rng.normal(size=(2, 1, 6, 4)), rng.normal(size=(2, 1, 6, 4))
    tokens = rng.random((2, 5, 6)) < 0.6
    tokens[:, :4, 0] = True                        # rows 0-3 keep a key; row 4 of head 1 keeps none
    tokens[1, 4] = False
    tokens[0, 4, 1] = True
    q[1, 0, 2, 1] = np.nan                         # batch 1, head 0, row 2: NaN scores
    out, lse = dense_attention(q, k, v, tokens, 0.5)
    scores = torch.tensor(q) @ torch.tensor(k).transpose(-1, -2) * 0.5
    scores = scores.masked_fill(~torch.tensor(tokens)[None], float("-inf"))
    kept = torch.tensor(tokens).any(-1)[None].expand(2, 2, 5)
    expected = torch.where(kept[..., None], torch.softmax(scores, -1) @ torch.tensor(v), 0.0)
    expected_lse = torch.where(kept, torch.logsumexp(scores, -1), float("-inf"))
    np.testing.assert_allclose(out, expected.numpy(), rtol=1e-12, atol=1e-12)      # NaN where torch has NaN
    np.testing.assert_allclose(lse, expected_lse.numpy(), rtol=1e-12, atol=1e-12)
    assert np.isnan(out[1, 0, 2]).all() and np.isnan(lse[1, 0, 2])
    assert (out[:, 1, 4] == 0).all() and (lse[:, 1, 4] == -np.inf).all()
