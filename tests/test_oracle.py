"""The oracle itself against torch's float64 softmax attention: a row that lists no key gives 0 and LSE -inf (the
IR's rule); a row whose scores are NaN gives NaN, as dense attention does (not the empty row's 0); a key a row does
not list does not enter it, even with a non-finite value."""

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


def test_a_non_finite_value_at_a_key_a_row_does_not_list_leaves_that_row_as_with_a_zero_value():
    """The oracle made every row of the head NaN: its product multiplied the unlisted key's weight 0 by NaN. Rows that
    list the key still get the value's NaN and infinity, as dense attention gives them."""
    rng = np.random.default_rng(11)
    q, k, v = rng.normal(size=(2, 2, 6, 4)), rng.normal(size=(2, 1, 7, 4)), rng.normal(size=(2, 1, 7, 4))
    tokens = rng.random((2, 6, 7)) < 0.6
    tokens[:, :, 0] = True                         # every row keeps a key
    tokens[0, :, 3] = False                        # head 0: no row lists key 3; head 1: rows 0-2 do, 3-5 do not
    tokens[1, :3, 3], tokens[1, 3:, 3] = True, False
    zeroed = v.copy()
    zeroed[1, 0, 3] = 0.0
    bad = v.copy()
    bad[1, 0, 3, 0], bad[1, 0, 3, 1], bad[1, 0, 3, 2] = np.nan, np.inf, -np.inf
    out, lse = dense_attention(q, k, bad, tokens, 0.5)
    want_out, want_lse = dense_attention(q, k, zeroed, tokens, 0.5)
    listing = np.zeros((2, 2, 6), dtype=bool)
    listing[1] = tokens[None, :, :, 3]             # batch 1's rows that list key 3
    assert np.isfinite(out[~listing]).all()
    np.testing.assert_allclose(out[~listing], want_out[~listing], rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(lse, want_lse)
    hit = out[listing]
    assert np.isnan(hit[:, 0]).all() and (hit[:, 1] == np.inf).all() and (hit[:, 2] == -np.inf).all()
    clean_out, _ = dense_attention(q, k, v, tokens, 0.5)                    # element 3 of the key's value is kept
    np.testing.assert_allclose(hit[:, 3], clean_out[listing][:, 3], rtol=1e-12, atol=1e-12)
