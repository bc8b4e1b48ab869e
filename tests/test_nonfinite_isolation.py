"""A NaN or inf in one key/value token reaches exactly the rows that attend to its block.

Every registered backend, on every device it declares (emulated where it has an emulator),
runs a generated mask twice: on clean inputs and with one element of one key or value
token of one batch element and key head replaced by NaN, +inf or -inf. Rows that do not
list the token's block (any head, any batch element) must give bit-identical output and
LSE to the clean run: padding, partial tiles and fused masks must never multiply a
non-finite value by a zero weight (``0 * NaN = NaN``). Rows that do list it must show it
where dense attention would: a NaN key, or a non-finite value, makes their output
non-finite (an infinite key may legitimately give weight 0, so only isolation is asserted
for it).
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from strategies import attention_cases
from targets import all_targets, to_float64

import sparsecore

TARGETS = all_targets()


@pytest.fixture(params=TARGETS, ids=[t.id for t in TARGETS])
def target(request):
    t = request.param
    with t.emulator() if t.emulated else contextlib.nullcontext():
        reason = t.unavailable_reason()
        if reason is not None:
            pytest.skip(f"{t.backend} on {t.device}: {reason}")
        yield t


def attending_rows(mask, key_head: int, group: int, token: int) -> np.ndarray:
    """bool ``[H, q_len]``: query tokens whose row lists the key block holding ``token`` of ``key_head``."""
    block = int(np.searchsorted(mask.kv_offsets, token, side="right")) - 1
    rows = np.zeros((mask.num_heads, mask.q_len), dtype=bool)
    for h in range(key_head * group, (key_head + 1) * group):
        for i in range(mask.num_q_blocks):
            if block in set(np.asarray(mask.row(h, i)).tolist()):
                rows[h, mask.q_offsets[i]:mask.q_offsets[i + 1]] = True
    return rows


def _run(target, kernel, arrays, scale):
    args, _ = target.cast(*arrays)
    want_lse = target.capabilities.lse
    result = kernel(*args, scale=scale, return_lse=want_lse)
    out, lse = result if want_lse else (result, None)
    return to_float64(out), None if lse is None else to_float64(lse)


@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_non_finite_token_reaches_exactly_the_rows_that_attend_to_it(target, data):
    case = data.draw(attention_cases(target.capabilities), label="case")
    mask = case.mask
    q, k, v = case.inputs()
    batch = data.draw(st.integers(0, case.batch - 1), label="batch element")
    key_head = data.draw(st.integers(0, case.num_kv_heads - 1), label="key head")
    token = data.draw(st.integers(0, mask.kv_len - 1), label="key token")
    dim = data.draw(st.integers(0, case.head_dim - 1), label="head dim element")
    where = data.draw(st.sampled_from(["k", "v"]), label="tensor")
    poison = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]), label="value")
    bad_k, bad_v = k.copy(), v.copy()
    (bad_k if where == "k" else bad_v)[batch, key_head, token, dim] = poison

    kernel = sparsecore.compile(mask, device=target.device, backend=target.backend)
    clean_out, clean_lse = _run(target, kernel, (q, k, v), case.scale)
    out, lse = _run(target, kernel, (q, bad_k, bad_v), case.scale)

    hit = np.zeros(out.shape[:3], dtype=bool)
    hit[batch] = attending_rows(mask, key_head, mask.num_heads // case.num_kv_heads, token)
    assert np.isfinite(clean_out).all()
    untouched = ~hit
    assert np.array_equal(out[untouched], clean_out[untouched]), (
        f"{where}[{batch}, {key_head}, {token}, {dim}] = {poison} changed rows that do not attend to its block: "
        f"{int((out[untouched] != clean_out[untouched]).any(axis=-1).sum())} of {int(untouched.sum())} rows")
    if lse is not None:
        assert np.array_equal(lse[untouched], clean_lse[untouched]), "the LSE of rows that do not attend changed"
    if where == "v":
        assert not np.isfinite(out[hit][:, dim]).any(), f"a non-finite value {poison} did not reach an attending row"
    elif np.isnan(poison):
        assert not np.isfinite(out[hit]).any(axis=-1).any(), "a NaN key did not reach every attending row"
