"""Edges of the Wan VACE / Animate / SkyReels-V2 support and of handle.audit that the main integration tests missed.

Each test here failed on a mutant of the code that every other test let pass (a mutation audit, 2026-12-02): layer
order, the new models' LVSA horizons and processor classes, their token-mask refusal, audit()'s refusals under
context parallelism, held masks measured on a copy, and the approximated output being the one measured.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from context_parallel_run import fake_parallel_config
from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor
from test_integration_diffusers import (CASES, FRAMES, HEIGHT, WIDTH, forward, hunyuan_inputs, random_mask,
                                        tiny_hunyuan, tiny_skyreels_v2, tiny_wan, tiny_wan_animate, tiny_wan_vace,
                                        wan_inputs)

import sparsecore
from sparsecore import BlockMask
from sparsecore.integrations import diffusers as sparse
from sparsecore.integrations.diffusers.audit import NO_SEQUENCE_SPLIT, fidelity
from sparsecore.ir import Unselected
from sparsecore.methods.approximation import with_unselected


# m01: the processors of Wan VACE's modules carry their layer in the forward's order (control blocks first)
def test_wan_vace_processors_are_numbered_in_the_forwards_order():
    model = tiny_wan_vace()
    handle = sparse.apply(model, method=random_mask, device="cpu")
    try:
        assert [m.processor.layer for m in CASES["wan-vace"].attention(model)] == [0, 1, 2]
    finally:
        handle.remove()


# m06, m07: LVSA's horizon per new model
@pytest.mark.parametrize("build, frames", [(tiny_skyreels_v2, 25), (tiny_wan_vace, 21), (tiny_wan_animate, 21)])
def test_lvsa_takes_each_new_models_horizon(build, frames):
    handle = sparse.apply(build(), method="lvsa", device="cpu")
    handle.remove()
    assert handle.params["reference_frames"] == frames


# m14: a module with added key/value projections in a self-attention slot is refused even if not flagged cross
def test_a_module_with_added_kv_projections_in_a_self_attention_slot_is_refused():
    model = tiny_wan()
    model.blocks[1].attn1 = WanAttention(dim=32, heads=2, dim_head=16, added_kv_proj_dim=8, is_cross_attention=False,
                                         processor=WanAttnProcessor())
    with pytest.raises(TypeError, match=r"blocks\[1\]\.attn1: expected the self-attention of a WanTransformer3DModel"):
        sparse.apply(model, method=random_mask, device="cpu")


# m15: SkyReels-V2 gets its exported processor class
def test_skyreels_v2_gets_its_own_processor_class():
    model = tiny_skyreels_v2()
    handle = sparse.apply(model, method=random_mask, device="cpu")
    try:
        assert all(type(b.attn1.processor) is sparse.SkyReelsV2SparseAttnProcessor for b in model.blocks)
    finally:
        handle.remove()


# m16, m17: the Wan-family processor refuses a token mask, naming the model class
@pytest.mark.parametrize("name", ["wan-vace", "wan-animate", "skyreels-v2"])
def test_wan_family_processors_refuse_an_attention_mask_naming_the_model(name):
    case = CASES[name]
    model = case.build()
    handle = sparse.apply(model, method=random_mask, device="cpu")
    try:
        handle._pre_forward(model, (), case.inputs(batch=1))             # inside a forward, as the op needs
        attn = case.attention(model)[0]
        tokens = FRAMES * HEIGHT * WIDTH
        with pytest.raises(ValueError, match=rf"attention_mask: {type(model).__name__} self-attention \(layer 0\) "
                                             r"expected None"):
            attn.processor(attn, torch.zeros(1, tokens, 32), None, torch.ones(1, 1, tokens, tokens, dtype=torch.bool))
    finally:
        handle.active = False
        handle.remove()


# m20: apply reads the model's config, not deprecated attribute access on the model
def test_apply_pasa_on_wan_vace_emits_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        handle = sparse.apply(tiny_wan_vace(), method="pasa", device="cpu")
        handle.remove()
    assert handle.params["dense_layers"] == (0, 1)


# m29, m30, m31, m32: audit()'s refusal: ring and joint models refused, Ulysses on Wan allowed, nothing changed on a
# refusal, audit(False) always allowed
def test_audit_refusal_follows_the_sequence_split():
    for build, config, refused in ((tiny_wan, fake_parallel_config(ulysses_degree=2), False),
                                   (tiny_wan, fake_parallel_config(ring_degree=2), True),
                                   (tiny_hunyuan, fake_parallel_config(ulysses_degree=2), True)):
        model = build()
        handle = sparse.apply(model, method=random_mask, device="cpu", num_steps=3)
        try:
            for processor in handle._processors:
                processor._parallel_config = config
            if refused:
                with pytest.raises(ValueError, match="handle.audit: this call runs under sparsecore's sequence split"):
                    handle.audit(layers=[0])
                assert handle._planner.audit is None                   # a refusal changes nothing
            else:
                handle.audit(layers=[0])
                assert handle._planner.audit.layers == frozenset({0})
            handle.audit(False)                                          # turning it off is always allowed
            assert handle._planner.audit is None
        finally:
            for processor in handle._processors:
                processor._parallel_config = None
            handle.remove()


# m35: an audit turned on before sparsecore's sequence split raises at the first call, before any collective
def test_an_audit_on_before_a_ring_split_raises_at_the_first_call():
    model = tiny_wan()
    handle = sparse.apply(model, method=random_mask, device="cpu", num_steps=3)
    handle.audit()
    try:
        for processor in handle._processors:
            processor._parallel_config = fake_parallel_config(ring_degree=2)
        with pytest.raises(ValueError, match=NO_SEQUENCE_SPLIT.split(" (")[0].replace(".", r"\.")):
            forward(model, wan_inputs(batch=1), 999.0)
    finally:
        for processor in handle._processors:
            processor._parallel_config = None
        handle.remove()


def fresh_copy(mask: BlockMask, device) -> BlockMask:
    """``BlockMask.copy_to`` as on an accelerator, where a held mask's call gets a copy (on CPU it is the mask)."""
    return type(mask).unchecked(mask.num_heads, mask.q_offsets, mask.kv_offsets, mask.indptr.clone(),
                                mask.indices.clone(), mask.budgets.clone(), mask.meta, mask.unselected)


# m40: an audited held mask (AdaSpa store="host") is measured on a per-call copy, never compiled itself
def test_an_audited_held_mask_is_measured_on_a_copy(monkeypatch):
    model = tiny_wan()
    handle = sparse.apply(model, method="adaspa", device="cpu", num_steps=3, warmup_steps=1, search_steps=(1,),
                          sparsity=0.5, block_size=32, store="host")
    monkeypatch.setattr(BlockMask, "copy_to", fresh_copy)
    compiled_masks = []
    original = handle._planner.compiled
    monkeypatch.setattr(handle._planner, "compiled", lambda mask: compiled_masks.append(mask) or original(mask))
    handle.audit()
    try:
        for t in (999.0, 700.0, 400.0):
            forward(model, wan_inputs(batch=1), t)
        held = {id(plan.mask) for plan in handle._planner._plans.values() if plan.held}
    finally:
        handle.remove()
    assert held and compiled_masks
    assert not any(id(mask) in held for mask in compiled_masks)
    assert any("recall" in row for row in handle.stats())


# a held mask (AdaSpa store="host") is counted on its call's copy: counting the host lists walked 17.7 M entries at
# every layer of every reuse step on the host (CogVideoX 1.5 2x, 85 ms a layer; the GPU waited for it on fa4);
# HunyuanVideo 1.5's padded text gives the copy padding blocks (key blocks of several sizes)
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA not available: a held mask's call copies it to the GPU"))])
@pytest.mark.parametrize("build, make_inputs", [(tiny_wan, wan_inputs), (tiny_hunyuan, hunyuan_inputs)],
                         ids=["wan", "hunyuan-1.5-padded-text"])
def test_a_held_masks_density_is_counted_on_its_calls_copy(monkeypatch, device, build, make_inputs):
    model = build().to(device)
    inputs = {name: t.to(device) for name, t in make_inputs(batch=1).items()}
    handle = sparse.apply(model, method="adaspa", device=device, num_steps=4, warmup_steps=1, search_steps=(1,),
                          sparsity=0.5, block_size=32, store="host")
    if device == "cpu":
        monkeypatch.setattr(BlockMask, "copy_to", fresh_copy)
    counted = []                                 # the masks themselves: a freed copy's id may be a held mask's
    original = BlockMask.kept_pairs
    monkeypatch.setattr(BlockMask, "kept_pairs", lambda mask: counted.append(mask) or original(mask))
    try:
        for t in (999.0, 700.0, 400.0, 100.0):
            forward(model, inputs, t)
        held = [plan.mask for plan in handle._planner._plans.values() if plan.held]
    finally:
        handle.remove()
    assert held and not any(mask is kept for mask in held for kept in counted)
    assert {None if mask.device is None else mask.device.type for mask in counted} == {device}   # none on the host
    rows = {(row["layer"], row["step"]): row for row in handle.stats()}
    for mask in held:                          # the density the stats report: the held lists, counted here
        lists = mask.to_host()
        q_sizes, kv_sizes = np.diff(lists.q_offsets), np.diff(lists.kv_offsets)
        kept = sum(q_sizes[i] * kv_sizes[lists.indices[lists.indptr[h, i]:lists.indptr[h, i + 1]]].sum()
                   for h in range(lists.num_heads) for i in range(lists.num_q_blocks))
        row = rows[(mask.meta["layer"], 3)]
        assert row["action"] == "reuse" and (row["padding"] > 0) == (build is tiny_hunyuan)    # a padded copy
        assert row["density"] == pytest.approx(kept / (lists.num_heads * lists.q_len * lists.kv_len))


# m46: an approximating mask's rel_l2 and cosine are of its output with the approximation
def test_fidelity_of_an_approximating_mask_measures_the_approximated_output():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 16, generator=gen) for _ in range(3))
    lists = [[[0], [0, 1], [2], [1, 3]], [[0, 1], [1], [0, 2], [3]]]
    offsets = np.arange(0, 65, 16)
    mask = with_unselected(BlockMask.from_lists([[np.array(r) for r in h] for h in lists], offsets, offsets),
                           Unselected("zeroth"))

    def compiled(m: BlockMask):
        return sparsecore.compile(m, device="cpu", backend="portable")

    got = fidelity(q, k, v, mask, compiled)
    probs = torch.softmax(q.double() @ k.double().transpose(-1, -2) / math.sqrt(16), -1)   # float64 dense attention
    out, dense = compiled(mask)(q, k, v).double(), probs @ v.double()
    diff = ((out - dense) ** 2).sum((0, 2, 3)).sqrt() / (dense ** 2).sum((0, 2, 3)).sqrt()
    cosine = (out * dense).sum((0, 2, 3)) / ((out ** 2).sum((0, 2, 3)) * (dense ** 2).sum((0, 2, 3))).sqrt()
    np.testing.assert_allclose(got.rel_l2, diff.numpy(), rtol=1e-4)
    np.testing.assert_allclose(got.cosine, cosine.numpy(), rtol=1e-5)


# m54 (killed only through numpy's ambiguous truth value): an empty list audits nothing, not everything
def test_audit_of_no_layers_audits_nothing():
    model = tiny_wan()
    handle = sparse.apply(model, method=random_mask, device="cpu", num_steps=3)
    try:
        handle.audit(layers=[])
        forward(model, wan_inputs(batch=1), 999.0)
    finally:
        handle.remove()
    assert handle._planner.audit.layers == frozenset()
    assert not any("recall" in row for row in handle.stats())
