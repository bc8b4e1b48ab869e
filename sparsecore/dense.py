"""Dense masked attention in float64 NumPy, for the CLI's accuracy columns and self-check.

This is a user-facing yardstick (``sparsecore demo``, ``sparsecore check``); the test
suite has its own, independently written oracle in ``tests/oracle.py``.
"""

from __future__ import annotations

import numpy as np

from sparsecore.ir import BlockMask


def masked_dense_attention(mask: BlockMask, q, k, v, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Softmax attention restricted to ``mask.token_mask()``; returns float64 (out, lse).

    A mask that approximates its unlisted blocks (``mask.unselected``, PASA) is computed by the
    reference lowering, the executable definition of that approximation.
    """
    q, k, v = (to_numpy64(x) for x in (q, k, v))
    if mask.unselected.kind != "drop":
        from sparsecore.backends.reference.lowering import reference_attention
        out, lse = reference_attention(mask.to_host(), q, k, v, scale)
        return out, lse.astype(np.float64)
    group = q.shape[1] // k.shape[1]
    keys = np.repeat(k, group, axis=1)
    values = np.repeat(v, group, axis=1)
    tokens = mask.token_mask()[None]
    scores = np.where(tokens, q @ keys.swapaxes(-1, -2) * scale, -np.inf)
    with np.errstate(invalid="ignore"):  # rows with no key: -inf - -inf, replaced below
        lse = np.logaddexp.reduce(scores, axis=-1)
        weights = np.exp(scores - lse[..., None])
    weights = np.where(tokens.any(axis=-1, keepdims=True), weights, 0.0)   # no key: 0; a NaN input stays NaN
    finite = np.isfinite(values)
    out = weights @ np.where(finite, values, 0.0)   # a token's weight is 0 where its row does not attend, 0 * inf NaN
    if not finite.all():                            # so a non-finite value reaches the rows that attend it, only,
        out = _non_finite_values(out, weights, tokens, values)                 # as in dense attention
    return out, lse


def _non_finite_values(out: np.ndarray, weights: np.ndarray, tokens: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``out`` with the terms ``weight * value`` of the non-finite values of the tokens each row attends, as dense
    attention forms them: a positive weight times +-inf is +-inf, a zero weight times an inf and anything times NaN
    are NaN, +inf plus -inf is NaN; a row that is NaN already (a NaN weight) stays NaN."""
    positive, zero = ((found & tokens).astype(np.float64) for found in (weights > 0, weights == 0))
    reaches = lambda rows, found: rows @ found.astype(np.float64) > 0  # noqa: E731
    pos, neg = reaches(positive, values == np.inf), reaches(positive, values == -np.inf)
    nan = reaches(tokens.astype(np.float64), np.isnan(values)) | reaches(zero, np.isinf(values)) | (pos & neg)
    return np.where(nan | np.isnan(out), np.nan, np.where(pos, np.inf, np.where(neg, -np.inf, out)))


def to_numpy64(x) -> np.ndarray:
    """A numpy or torch array as float64 numpy."""
    if hasattr(x, "detach"):
        return x.detach().double().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def relative_error(out, ref: np.ndarray) -> tuple[float, float]:
    """(max abs error, relative L2 error) of ``out`` against ``ref``."""
    diff = to_numpy64(out) - ref
    return float(abs(diff).max()), float(np.linalg.norm(diff) / max(np.linalg.norm(ref), 1e-300))
