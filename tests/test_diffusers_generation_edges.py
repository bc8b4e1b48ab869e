"""Generation loops that change between calls: CFG as two calls, guidance that stops, masks kept for inspection.

Each test failed before its fix (a review's reproducers, 2026-12-02):

- ``keep_masks(True)`` made PASA's second call of a step (CFG's other branch) reuse the first call's mask, where
  PASA plans from each call's own q, k: the switch meant for inspection changed the output.
- AdaSpa's cached search took the LSE kept at an earlier step whatever its batch: when guidance stopped (batch 2,
  then 1) the search raised.
- ``handle.mask(layer)`` returned the plan first inserted last, not the newest: an older step's mask of another
  text length on HunyuanVideo 1.5.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers", reason="the diffusers integration needs diffusers 0.42 (pip install '.[diffusers]')")
from test_integration_diffusers import (forward, hunyuan_inputs, random_mask, tiny_hunyuan,  # noqa: E402
                                        tiny_wan, wan_inputs)

from sparsecore import VideoGeometry  # noqa: E402
from sparsecore.integrations import diffusers as sparse  # noqa: E402


def pasa_generation(keep: bool) -> list[torch.Tensor]:
    model = tiny_wan()
    cond = wan_inputs(batch=1, seed=1)
    uncond = {**wan_inputs(batch=1, seed=5), "hidden_states": cond["hidden_states"]}
    handle = sparse.apply(model, method="pasa", device="cpu", num_steps=2, dense_fraction=0.5, density=0.3,
                          block_size=32)
    handle.keep_masks(keep)
    try:
        return [forward(model, inputs, t) for t in (999.0, 500.0) for inputs in (cond, uncond)]
    finally:
        handle.remove()


def test_keeping_pasa_masks_does_not_change_the_generation():
    for kept, plain in zip(pasa_generation(True), pasa_generation(False)):
        assert torch.equal(kept, plain)


def test_adaspa_cached_search_after_guidance_stops():
    model = tiny_wan()
    both = wan_inputs(batch=2)                                        # CFG batched: one call of batch 2
    handle = sparse.apply(model, method="adaspa", device="cpu", num_steps=3, warmup_steps=1, search_steps=(1,),
                          sparsity=0.6, block_size=32)
    try:
        forward(model, both, 999.0)                                   # step 0: dense, its LSE kept (batch 2)
        out = forward(model, {name: t[:1] for name, t in both.items()}, 800.0)   # step 1: cached search, batch 1
        assert torch.isfinite(out).all()
        assert [s["action"] for s in handle.stats() if s["layer"] == 0] == ["dense-lse", "cached-search"]
    finally:
        handle.remove()


def test_mask_of_a_layer_is_the_newest_plan():
    model = tiny_hunyuan()
    cond = hunyuan_inputs(batch=1, text="same", seed=1)               # 4 valid text tokens
    uncond = {**hunyuan_inputs(batch=1, text="ragged", seed=2), "hidden_states": cond["hidden_states"]}  # 6
    handle = sparse.apply(model, method=random_mask, device="cpu", num_steps=3)
    try:
        forward(model, cond, 999.0)
        forward(model, uncond, 999.0)                                 # step 0 with guidance: two text lengths
        forward(model, cond, 800.0)                                   # step 1: guidance stopped
        newest = random_mask(VideoGeometry(8, 8, 8, text_tokens=4, text_position="end"), 2, 1, 0)
        found = handle.mask(0)
        assert found.q_len == newest.q_len and np.array_equal(found.to_dense(), newest.to_dense())
    finally:
        handle.remove()
