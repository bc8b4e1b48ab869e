"""Small defects a review of rarely reviewed modules found (2026-12-05), each reproduced before it was mended."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparsecore.integrations.diffusers.steps import _relative_change
from sparsecore.methods import pasa
from sparsecore.noise import SEED_LIMIT, gumbel, head_keys
from sparsecore.timing import median_seconds


def test_head_keys_take_the_heads_of_a_stepped_range():
    """``range(0, 8, 2)`` gave the keys of heads 0..7 (the step was dropped): 8 rows of noise for 4 heads."""
    every = head_keys(range(8), 3, 1, 2, "cpu")
    assert torch.equal(head_keys(range(0, 8, 2), 3, 1, 2, "cpu"), every[::2])
    noise = gumbel(range(1, 8, 3), 2, 5, seed=3, layer=1, step=2, scale=0.2, device="cpu")
    assert torch.equal(noise, gumbel(range(8), 2, 5, seed=3, layer=1, step=2, scale=0.2, device="cpu")[1::3])


def test_pasa_refuses_a_seed_the_noise_key_would_wrap():
    """A seed of 2**64 drew exactly seed 0's noise (the key takes 64 bits of it)."""
    assert pasa.session(num_steps=3, seed=SEED_LIMIT - 1).params.seed == SEED_LIMIT - 1
    with pytest.raises(ValueError, match="seed: expected 0..18446744073709551615, got 18446744073709551616"):
        pasa.session(num_steps=3, seed=SEED_LIMIT)


@pytest.mark.parametrize("field, kwargs", [("repeats", {"repeats": 0}), ("warmup", {"warmup": -1})])
def test_median_seconds_names_a_count_it_cannot_time(field, kwargs):
    """``repeats=0`` failed with statistics' "no median for empty data", naming nothing."""
    with pytest.raises(ValueError, match=f"{field}: expected an int >="):
        median_seconds(lambda: None, "cpu", **kwargs)


def test_a_nan_at_the_same_place_in_both_samples_is_no_change():
    """NaNs at the same place counted as a change of 1 each: latents 1e-3 apart with one shared NaN read as 0.58
    apart, over the 0.5 that starts a new run."""
    rng = np.random.default_rng(0)
    seen = rng.standard_normal((1, 3))
    sample = seen + 1e-3 * rng.standard_normal((1, 3))
    seen[0, 1] = sample[0, 1] = np.nan
    kept = [0, 2]
    want = np.linalg.norm(sample[0, kept] - seen[0, kept]) / np.linalg.norm(seen[0, kept])
    assert _relative_change(((3,), sample), ((3,), seen)) == pytest.approx(want)
    sample[0, 1] = 0.0                                   # a NaN on one side only is still a change
    assert _relative_change(((3,), sample), ((3,), seen)) > 0.5


def test_import_sparsecore_leaves_torch_dynamo_unimported():
    """compiled_call's graph-break decorator imported ``torch._dynamo`` (and Triton) at ``import sparsecore``, about a
    second for every process, CPU-only ones included; it is now made at its first use, under torch.compile."""
    import subprocess
    import sys
    code = "import sys, sparsecore; print(sorted(m for m in ('torch._dynamo', 'triton') if m in sys.modules))"
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert found == "[]"
