"""A hostile review of the twenty-first session: visible block counts in the block-mass pass (its checks, what
reaches the Triton kernels from AdaSpa's search, batches with GQA), the ring refusal read for the forward's geometry,
and stats' density over the valid tokens of a padded batch.

The masses' oracle is the float64 statement of ``test_method_adaspa.mass_float64``; the Triton cases run on a GPU
or through Triton's interpreter (TRITON_INTERPRET=1), otherwise they skip with the backend's reason.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from oracle import expand_to_tokens
from test_integration_causal import causal_case
from test_integration_diffusers import CASES, forward, random_mask
from test_method_adaspa import mass_float64

from sparsecore import VideoGeometry
from sparsecore.backends.cuda import block_mass as triton_block_mass
from sparsecore.integrations import diffusers as sparse
from sparsecore.methods import adaspa
from sparsecore.search import block_mass


def prefix_counts(offsets: np.ndarray, frame_tokens: int, causal_frames: int) -> np.ndarray:
    """Key blocks each query block may see, from the causal block of each block's first token (blocks in order)."""
    group = offsets[:-1] // frame_tokens // causal_frames
    return (group[None, :] <= group[:, None]).sum(axis=1)


def test_visible_counts_on_a_device_are_refused_naming_the_field():
    """A device tensor (``causal.Visibility.visible`` is one) raised NumPy's own TypeError, naming no field."""
    q, offs, lse = torch.randn(1, 1, 8, 16), np.array([0, 4, 8]), torch.zeros(1, 1, 8)
    with pytest.raises(TypeError, match=r"visible: expected host integers .* got a tensor on meta; pass "
                                        r"sparsecore\.methods\.causal\.visible_counts"):
        block_mass(q, q, offs, offs, lse, visible=torch.tensor([1, 2], device="meta"))
    on_host = block_mass(q, q, offs, offs, lse, visible=torch.tensor([1, 2])).mass       # a CPU tensor is host data
    assert (on_host[..., 0, 1] == 0).all() and (on_host[..., 1, :] > 0).all()


def test_visible_counts_out_of_range_name_the_values_got():
    """The refusal said ``got int64 [2]`` for counts of the right type and shape: what was wrong went unsaid."""
    q, offs, lse = torch.randn(1, 1, 8, 16), np.array([0, 4, 8]), torch.zeros(1, 1, 8)
    with pytest.raises(ValueError, match=r"visible: expected None or integers in \[0, 2\] .*got int64 \[2\] "
                                         r"holding 0\.\.3"):
        block_mass(q, q, offs, offs, lse, visible=np.array([0, 3], dtype=np.int64))
    with pytest.raises(ValueError, match=r"got int64 \[2\] holding -1\.\.1"):
        block_mass(q, q, offs, offs, lse, visible=np.array([-1, 1], dtype=np.int64))


@pytest.mark.parametrize("frame_side, causal_frames, kernel", [(16, 2, "segmented"), (8, 2, "table"),
                                                               (8, 0, "segmented")])
def test_adaspas_search_hands_the_kernel_its_visible_prefixes(triton_device, frame_side, causal_frames, kernel,
                                                              monkeypatch):
    """AdaSpa's search must reach the kernel with each query block's prefix of key blocks under causal frames; a
    kernel that walked every key block would score the hidden ones. Causal blocks of 512 tokens (8 blocks of 64)
    take the segmented kernel, a segment a causal block; of 128 (2 blocks a segment) the table kernel; without
    causal frames every count is NB: one segment. Its mask is the torch pass's."""
    geometry = VideoGeometry(4, frame_side, frame_side, causal_frames=causal_frames)
    gen = torch.Generator().manual_seed(21)
    q = torch.randn(2, 4, geometry.tokens, 16, generator=gen).to(triton_device)
    k = torch.randn(2, 2, geometry.tokens, 16, generator=gen).to(triton_device)          # GQA
    ran = []
    original_tiles, original_segmented = triton_block_mass._tiles, triton_block_mass._run_segmented
    monkeypatch.setattr(triton_block_mass, "_tiles", lambda qo, ko, visible: (ran.append(("table", visible)),
                                                                               original_tiles(qo, ko, visible))[1])
    monkeypatch.setattr(triton_block_mass, "_run_segmented", lambda *args: (ran.append(("segmented", args[5])),
                                                                             original_segmented(*args))[1])
    params = dict(step=10, layer=0, q=q, k=k, sparsity=0.5)
    mask = adaspa.plan(geometry, 4, **params)
    offsets = geometry.block_offsets(64)
    (ran_kernel, seen), = ran
    assert ran_kernel == kernel
    counts = prefix_counts(offsets, frame_side ** 2, causal_frames) if causal_frames else None
    if kernel == "table":
        np.testing.assert_array_equal(seen, counts)
        assert list(seen) == [2, 2, 4, 4]
    elif causal_frames:
        np.testing.assert_array_equal(seen.blocks[seen.walked], counts)              # each row's prefix, in blocks
        assert list(seen.blocks) == [0, 8, 16] and list(seen.starts) == [0, 512, 1024]
    else:
        assert list(seen.walked) == [1] * 4 and list(seen.blocks) == [0, 4]
    on_torch = adaspa.plan(geometry, 4, impl="torch", **params)
    np.testing.assert_array_equal(np.asarray(mask.to_host().indptr), np.asarray(on_torch.to_host().indptr))
    np.testing.assert_array_equal(np.asarray(mask.to_host().indices), np.asarray(on_torch.to_host().indices))


def test_visible_masses_of_a_batch_with_gqa_on_blocks_of_several_tiles_match_float64(triton_device):
    """Batch 2, GQA 4:2, 70-token causal blocks cut into 100-token blocks (several 64-token tiles each, the short
    ones of 70 and 30 too): each sample's masses under its own LSE over the visible keys; later blocks exactly 0."""
    geometry = VideoGeometry(6, 5, 7, causal_frames=2)                         # 35 tokens a frame, 70 a causal block
    for block in (100, 30):
        offsets = geometry.block_offsets(block)
        visible = prefix_counts(offsets, 35, 2)
        gen = torch.Generator().manual_seed(block)
        q = torch.randn(2, 4, geometry.tokens, 16, generator=gen)
        k = torch.randn(2, 2, geometry.tokens, 16, generator=gen)
        seen = np.arange(geometry.tokens)[None, :] < np.repeat(offsets[visible], np.diff(offsets))[:, None]
        scores = q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2) * 0.25
        lse = torch.logsumexp(scores.masked_fill(torch.from_numpy(~seen), float("-inf")), dim=-1)
        want = mass_float64(q, k, offsets, offsets, lse.numpy(), 0.25)
        later = np.arange(len(offsets) - 1)[None, :] >= visible[:, None]
        want[..., later] = 0.0
        found = block_mass(q.to(triton_device), k.to(triton_device), offsets, offsets, lse.float().to(triton_device),
                           0.25, visible=visible, impl="triton")
        got = found.mass.double().cpu().numpy()
        assert found.impl == "triton" and got.shape == want.shape and (got[..., later] == 0).all()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_an_explicit_approximation_under_ring_is_refused_at_a_causal_forwards_start():
    """PASA's default drops under causal frames, an explicit approximation does not: ring attention still refuses
    it before the step is counted (the refusal now reads the parameter for the forward's geometry)."""
    from context_parallel_run import fake_parallel_config
    _, model, inputs = causal_case()
    handle = sparse.apply(model, method="pasa", device="cpu", num_steps=4, approximation="grouped-first-order")
    for block in model.blocks:
        block.attn1.processor._parallel_config = fake_parallel_config(ring_degree=2)
    try:
        with pytest.raises(ValueError, match=r"approximation: under ring attention \(ring degree 2\) expected "
                                             r"'drop', got 'grouped-first-order"):
            forward(model, inputs, 999.0)
        assert handle.step is None
    finally:
        for block in model.blocks:
            block.attn1.processor._parallel_config = None
        handle.remove()


def test_density_of_a_padded_batch_is_a_fraction_of_each_groups_valid_pairs():
    """HunyuanVideo 1.5 with ragged text: each group's rows (6 and 8 valid text tokens of 13, the rest padding)
    count the pairs of its valid tokens, not of the padded sequence."""
    case = CASES["hunyuan"]
    model, inputs = case.build(), case.inputs(batch=2, text="ragged")
    planned = {}

    def method(geometry, heads, step, layer):
        planned[(geometry.tokens, layer)] = mask = random_mask(geometry, heads, step, layer)
        return mask

    handle = sparse.apply(model, method=method, device="cpu", num_steps=1)
    try:
        forward(model, inputs, 500.0)
    finally:
        handle.remove()
    rows = handle.stats()
    assert {row["padding"] for row in rows} == {7, 5} and len(rows) == len(planned) == 2 * len(case.attention(model))
    for row in rows:
        tokens = expand_to_tokens(planned[(row["tokens"], row["layer"])])
        assert row["density"] == pytest.approx(tokens.sum() / tokens.size, rel=1e-12)


def test_a_block_mass_op_that_does_not_take_visible_counts_runs_the_plain_pass_and_later_blocks_are_zeroed(
        monkeypatch):
    """An op registered with the old signature (``takes_visible`` False) got ``visible=`` and raised TypeError; it
    now runs the plain pass, and the masses of the blocks a query block may not see are zeroed after it."""
    from test_method_adaspa import _FakeMassBackend

    from sparsecore import registry
    fake = _FakeMassBackend()
    monkeypatch.setattr(fake, "calls", [])                 # its own list: the class's is another test's
    monkeypatch.setitem(registry._REGISTRY, fake.name, fake)
    gen = torch.Generator().manual_seed(5)
    q, k = torch.randn(1, 2, 8, 8, generator=gen), torch.randn(1, 2, 8, 8, generator=gen)
    offs, visible = np.array([0, 4, 8]), np.array([1, 2])
    lse = torch.logsumexp((q.double() @ k.double().transpose(-1, -2) * 8 ** -0.5).masked_fill(
        torch.arange(8)[None, :] >= torch.tensor([4] * 4 + [8] * 4)[:, None], float("-inf")), dim=-1)
    found = block_mass(q, k, offs, offs, lse.float(), visible=visible, impl="fake-mass")
    want = mass_float64(q, k, offs, offs, lse.numpy())
    want[..., 0, 1] = 0.0
    assert found.impl == "fake-mass" and fake.calls
    np.testing.assert_allclose(found.mass.double().numpy(), want, rtol=1e-5, atol=1e-7)
