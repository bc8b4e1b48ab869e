"""handle.audit(): the chosen layers' and steps' masks measured against dense attention on the model's own q, k, v.

The oracle: the first layer's q, k, v captured from diffusers' own dispatch in a dense run of the same inputs and
timestep (the first layer's input does not depend on attention), then recall, relative L2 and cosine of the masked
softmax against the dense one in float64, written here.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers.models.transformers import transformer_wan
from context_parallel_run import fake_parallel_config
from oracle import expand_to_tokens
from test_integration_diffusers import CASES, FRAMES, HEIGHT, WIDTH, forward, random_mask, tiny_wan, wan_inputs

from sparsecore import VideoGeometry
from sparsecore.integrations import diffusers as sparse

TIMESTEPS = (999.0, 700.0, 400.0)


def first_layer_qkv(model, inputs: dict, timestep: float, monkeypatch) -> tuple[torch.Tensor, ...]:
    """q, k, v ``[B, S, H, D]`` of the first self-attention call of a forward with diffusers' own processors."""
    seen = []
    original = transformer_wan.dispatch_attention_fn

    def spy(query, key, value, **kwargs):
        if not seen and query.shape == key.shape:
            seen.append((query, key, value))
        return original(query, key, value, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(transformer_wan, "dispatch_attention_fn", spy)
        forward(model, inputs, timestep)
    return seen[0]


def oracle_fidelity(query, key, value, step: int) -> dict[str, float]:
    """recall, min_recall, rel_l2 and cosine of ``random_mask``'s layer-0 mask at ``step``, float64, head means."""
    q, k, v = (t.permute(0, 2, 1, 3).double() for t in (query, key, value))      # [B, H, S, D]
    heads = q.shape[1]
    allowed = torch.from_numpy(expand_to_tokens(random_mask(VideoGeometry(FRAMES, HEIGHT, WIDTH), heads, step, 0)))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    probs = torch.softmax(scores, -1)
    dense = probs @ v
    kept = probs * allowed
    recall = kept.sum(-1)                                                          # [B, H, S]
    masked = (kept / recall[..., None]) @ v
    diff2 = ((masked - dense) ** 2).sum((0, 2, 3))
    ref2, out2, dot = (dense ** 2).sum((0, 2, 3)), (masked ** 2).sum((0, 2, 3)), (masked * dense).sum((0, 2, 3))
    return {"recall": recall.mean((0, 2)).mean().item(), "min_recall": recall.min().item(),
            "rel_l2": (diff2 / ref2).sqrt().mean().item(), "cosine": (dot / (out2 * ref2).sqrt()).mean().item()}


def test_audited_rows_carry_the_masks_fidelity_on_the_models_own_qkv(monkeypatch):
    """Two calls at each step (the second on latents moved by 0.4 of their norm, which stays on the step): the
    audited row pools both, means of their means and the smaller worst-query recall."""
    model, inputs = tiny_wan(), wan_inputs(batch=2)
    moved = {**inputs, "hidden_states": inputs["hidden_states"] + 0.4 * torch.randn(
        inputs["hidden_states"].shape, generator=torch.Generator().manual_seed(5))}
    calls = [oracle_fidelity(*first_layer_qkv(model, data, TIMESTEPS[1], monkeypatch), step=1)
             for data in (inputs, moved)]
    expected = {name: (min if name == "min_recall" else np.mean)([c[name] for c in calls]) for name in calls[0]}
    assert abs(calls[0]["min_recall"] - calls[1]["min_recall"]) > 1e-3             # the calls tell min from max
    handle = sparse.apply(model, method=random_mask, device="cpu", num_steps=3)
    handle.audit(layers=[0], steps=[1])
    try:
        for timestep in TIMESTEPS:
            forward(model, inputs, timestep)
            forward(model, moved, timestep)
    finally:
        handle.remove()
    rows = handle.stats()
    audited = [row for row in rows if "recall" in row]
    assert [(row["layer"], row["step"], row["calls"]) for row in audited] == [(0, 1, 2)]
    got = {name: audited[0][name] for name in expected}
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert 0.2 < got["recall"] < 0.9 and got["rel_l2"] > 1e-3                     # a mask that matters
    assert all({"recall", "min_recall", "rel_l2", "cosine"}.isdisjoint(row) for row in rows if row is not audited[0])


def test_audit_false_stops_and_dense_steps_are_not_audited():
    model, inputs = tiny_wan(), wan_inputs(batch=1)
    handle = sparse.apply(model, method="adaspa", device="cpu", num_steps=3, warmup_steps=1, search_steps=(1,),
                          sparsity=0.6, block_size=32)
    handle.audit()
    try:
        forward(model, inputs, TIMESTEPS[0])                  # dense warm-up: nothing to measure
        forward(model, inputs, TIMESTEPS[1])                  # the search step: measured
        handle.audit(False)
        forward(model, inputs, TIMESTEPS[2])                  # a reuse step after audit(False)
    finally:
        handle.remove()
    audited = {(row["step"], row["backend"] != "dense") for row in handle.stats() if "recall" in row}
    assert audited == {(1, True)}
    assert all(0.0 < row["recall"] <= 1.0 and row["min_recall"] <= row["recall"]
               for row in handle.stats() if "recall" in row)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"layers": [2]}, ValueError, r"layers: expected 0\.\.1, got 2"),
    ({"steps": [3]}, ValueError, r"steps: expected 0\.\.2, got 3"),
    ({"layers": "0"}, TypeError, r"layers: expected None \(all\) or an iterable of ints, got str"),
    ({"steps": [True]}, TypeError, r"steps: expected an int, got bool"),
])
def test_audit_arguments_are_checked(kwargs, error, match):
    handle = sparse.apply(tiny_wan(), method=random_mask, device="cpu", num_steps=3)
    try:
        with pytest.raises(error, match=match):
            handle.audit(**kwargs)
        with pytest.raises(TypeError, match=r"enabled: expected a bool \(True or False\), got int 1"):
            handle.audit(1)
        assert handle._planner.audit is None                 # a refused call leaves the audit off
    finally:
        handle.remove()


def test_audit_refuses_sparsecores_sequence_split():
    model = tiny_wan()
    handle = sparse.apply(model, method=random_mask, device="cpu", num_steps=3)
    try:
        for module in CASES["wan"].attention(model):
            module.processor._parallel_config = fake_parallel_config(ring_degree=2)
        with pytest.raises(ValueError, match="handle.audit: this call runs under sparsecore's sequence split"):
            handle.audit()
        for module in CASES["wan"].attention(model):
            module.processor._parallel_config = None
        handle.audit(layers=np.arange(2))                     # numpy indices are ints too
        assert handle._planner.audit.layers == frozenset({0, 1})
    finally:
        handle.remove()


@pytest.mark.parametrize("method, params", [("pasa", {"dense_fraction": 0.25, "density": 0.3, "block_size": 32}),
                                            ("lvsa", {"reference_frames": 4, "window": 1})])
def test_audit_measures_padded_text_groups_and_approximating_masks(method, params):
    """HunyuanVideo 1.5 with two valid text lengths (two groups, masks padded to the sequence) under PASA (whose
    masks approximate their unlisted blocks) and LVSA: every sparse row is audited, within its bounds."""
    case = CASES["hunyuan"]
    model, inputs = case.build(), case.inputs(batch=2, text="ragged")
    handle = sparse.apply(model, method=method, device="cpu", num_steps=4, **params)
    handle.audit()
    try:
        for timestep in (999.0, 750.0, 500.0, 250.0):
            forward(model, inputs, timestep)
    finally:
        handle.remove()
    rows = handle.stats()
    sparse_rows = [row for row in rows if row["backend"] != "dense"]
    assert sparse_rows and all("recall" in row for row in sparse_rows)
    assert {row["text_tokens"] for row in sparse_rows} == {6, 8}
    for row in sparse_rows:
        assert 0.0 < row["min_recall"] <= row["recall"] < 1.0 and 0.0 < row["rel_l2"] < 1.0 and row["cosine"] > 0.5
    assert not any("recall" in row for row in rows if row["backend"] == "dense")


def test_a_float64_model_is_audited_in_float64(monkeypatch):
    """The audit's norms summed in float32 whatever the model's dtype; torch refuses to narrow float64 that way, so
    an audited float64 forward raised. Now the norms are float64 (the recalls come from float32 LSEs, as always)."""
    model = tiny_wan().double()
    inputs = {name: t.double() for name, t in wan_inputs(batch=1).items()}
    expected = oracle_fidelity(*first_layer_qkv(model, inputs, TIMESTEPS[0], monkeypatch), step=0)
    handle = sparse.apply(model, method=random_mask, device="cpu", num_steps=1)
    handle.audit(layers=[0], steps=[0])
    try:
        forward(model, inputs, TIMESTEPS[0])
    finally:
        handle.remove()
    (row,) = [row for row in handle.stats() if "recall" in row]
    for name, rel in (("recall", 1e-6), ("min_recall", 1e-6), ("rel_l2", 1e-9), ("cosine", 1e-9)):   # LSEs: float32
        assert row[name] == pytest.approx(expected[name], rel=rel), name
