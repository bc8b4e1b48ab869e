"""sparsecore inside context parallelism: Ulysses, ring and ring x Ulysses, in gloo processes on loopback (CPU).

Tiny random Wan (also Wan VACE, and SkyReels-V2 with and without diffusion forcing's per-frame timesteps, and with
its causal blocks of 2 latent frames), HunyuanVideo 1.5 and Mochi 1 (two text lengths in one batch under the shards),
and LTX-Video (packed tokens; also with per-token timesteps, and timesteps [B, 1]) models with sparsecore applied give
the same outputs in N processes as in one (fp32, 1e-5, five denoising steps), and each rank's masks are the
one-process masks' slice of its heads (every rank plans the whole sequence). The masks differ per head (LVSA with
per-head rotations, AdaSpa's search, PASA's noise), so a wrong head slice or a wrong ring step fails both checks.
Half of the methods enable parallelism before ``apply()``, half after.

Modes: Ulysses 2 and 4 (diffusers' own all-to-alls around sparsecore; HunyuanVideo 1.5 through
sparsecore's exchange and context-parallel plan; Mochi 1 likewise; LTX-Video under sparsecore's plan), ring 2, ring
4, and ring 2 x Ulysses 2. Mochi's
runs also check, after ``handle.remove()``, the warning and the refused forward (diffusers' processor cannot run under
``MOCHI_CP_PLAN``).
"""

from __future__ import annotations

import warnings

from functools import lru_cache
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from context_parallel_run import (CAUSAL_FRAMES, HEADS, LVSA, fake_parallel_config, inputs, random_blocks, run,
                                  run_dense, run_parallel, tiny_mochi, tiny_wan)

from sparsecore import BlockMask, VideoGeometry
from sparsecore.integrations import diffusers as sparse
from sparsecore.integrations.diffusers import parallel
from sparsecore.integrations.diffusers.planner import Planner
from sparsecore.integrations.diffusers.ring import RingGroup
from sparsecore.integrations.diffusers.sharded import ShardedAttention
from sparsecore.integrations.diffusers.stats import Stats

TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}      # fp32
CAUSAL = [("skyreels-causal", m) for m in ("random", "lvsa", "adaspa", "pasa")]   # frame-causal: a callable, methods
MOCHI = [("mochi", m) for m in ("random", "lvsa", "adaspa", "pasa")]       # under sparsecore's MOCHI_CP_PLAN
LTX = [("ltx", "lvsa-per-head"), ("ltx", "adaspa"), ("ltx-i2v", "pasa"),   # under sparsecore's LTX_VIDEO_CP_PLAN
       ("ltx-b1", "lvsa")]
ULYSSES = {2: [("wan", m) for m in ("dense", "lvsa", "lvsa-per-head", "adaspa", "adaspa-compiled",
                                    "adaspa-fused-first")]
           + [("hunyuan", m) for m in ("lvsa-per-head", "adaspa", "pasa", "sta")] + [("wan", "sta")]
           + [("vace", "adaspa"), ("vace", "lvsa-per-head"), ("skyreels", "pasa"), ("skyreels-df", "adaspa")] + CAUSAL
           + MOCHI + LTX,
           4: [("wan", m) for m in ("dense", "lvsa", "lvsa-per-head", "adaspa", "adaspa-compiled")]}
RING = {("ring", 2): [("wan", m) for m in ("dense", "lvsa", "lvsa-guards", "lvsa-per-head", "adaspa",
                                           "adaspa-fused-first", "pasa")]
        + [("hunyuan", m) for m in ("dense", "lvsa", "lvsa-per-head", "adaspa", "pasa")] + [("hunyuan-pad", "lvsa")]
        + [("vace", "lvsa"), ("skyreels-df", "lvsa-per-head")] + CAUSAL + MOCHI + LTX,
        ("ring", 4): [("wan", m) for m in ("lvsa", "band", "adaspa", "pasa")]
        + [("hunyuan", m) for m in ("lvsa", "adaspa", "pasa")],
        ("unified", 4): [("wan", m) for m in ("lvsa", "lvsa-per-head", "adaspa", "pasa")]
        + [("hunyuan", m) for m in ("dense", "lvsa", "adaspa", "pasa")] + CAUSAL + MOCHI + [("ltx-i2v", "lvsa")]}


@lru_cache(maxsize=None)
def single(model: str, method: str, ring: int = 1) -> dict:
    return run(model, method, ring)


@pytest.fixture(scope="module", params=sorted(ULYSSES), ids=[f"ulysses{w}" for w in sorted(ULYSSES)])
def ulysses(request) -> tuple[int, list[dict]]:
    return request.param, run_parallel("ulysses", request.param, ULYSSES[request.param])


@pytest.fixture(scope="module", params=list(RING), ids=["ring2", "ring4", "ring2xulysses2"])
def ring(request) -> tuple[str, int, list[dict]]:
    mode, world = request.param
    return mode, world, run_parallel(mode, world, RING[request.param])


def check_ranks(ranks: list[dict], jobs: list, ring_degree: int, ulysses_degree: int, label: str) -> None:
    """Outputs equal one process's; rank ``g = r U + u`` has heads ``u`` of the one-process masks; Mochi's ranks
    warned at ``handle.remove()`` and refused the next forward."""
    for model, method in jobs:
        expected = single(model, method, ring_degree if method == "lvsa-guards" else 1)
        size = len(expected["masks"][0]) // ulysses_degree
        for rank, result in enumerate(ranks):
            got, u = result[(model, method)], rank % ulysses_degree
            np.testing.assert_allclose(got["outputs"], expected["outputs"], **TOLERANCE,
                                       err_msg=f"{model} {method}, {label}, rank {rank}")
            assert got["heads"] == [u * size, (u + 1) * size]
            for layer, mask in enumerate(got["masks"]):
                assert np.array_equal(mask, expected["masks"][layer][u * size:(u + 1) * size]), \
                    (model, method, label, rank, layer)
            if model == "mochi":
                assert any("MochiTransformer3DModel under context parallelism runs only with sparsecore applied" in w
                           for w in got["remove_warnings"]), (method, label, rank)
                assert got["refused"] is not None and got["refused"].startswith(
                    "transformer_blocks[0].attn1.processor: under MOCHI_CP_PLAN expected sparsecore's "
                    "MochiSparseAttnProcessor, got MochiAttnProcessor2_0"), (method, label, rank)


def test_dense_method_matches_diffusers_own_processors():
    for model in ("wan", "hunyuan", "vace", "skyreels-df", "ltx", "ltx-i2v"):
        np.testing.assert_allclose(single(model, "dense")["outputs"], run_dense(model), **TOLERANCE)
        assert single(model, "dense")["backends"] == ["dense"]


def test_sparse_masks_differ_per_head_and_change_the_output():
    for model, method in [("wan", "lvsa-per-head"), ("wan", "adaspa"), ("hunyuan", "pasa")]:
        result, dense = single(model, method), single(model, "dense")
        masks = result["masks"][0]
        assert any(not np.array_equal(masks[0], masks[h]) for h in range(1, len(masks))), (model, method)
        assert result["backends"] != ["dense"], (model, method)
        assert np.abs(result["outputs"][-1] - dense["outputs"][-1]).max() > 1e-3, (model, method)
    assert all(len(set(b.tolist())) > 1 for b in single("wan", "adaspa")["budgets"])   # head-adaptive budgets at work


def test_the_causal_model_runs_frame_causal_masks():
    """The context-parallel runs of ``CAUSAL`` check a causal model: the one-process masks list no later causal block
    (the random callable's do), and the output differs from the same model without causal blocks."""
    raw = random_blocks(VideoGeometry(12, 4, 4), HEADS, 0, 0).to_dense()
    group = np.arange(raw.shape[1]) // CAUSAL_FRAMES
    assert (raw & (group[None, :] > group[:, None])).any()
    for model, method in CAUSAL:
        for mask in single(model, method)["masks"]:                              # [H, frames, frames], frame blocks
            group = np.arange(mask.shape[1]) // CAUSAL_FRAMES
            assert not (mask & (group[None, :] > group[:, None])).any(), method
    causal, free = single("skyreels-causal", "random")["outputs"], single("skyreels-df", "random")["outputs"]
    assert np.abs(causal - free).max() > 1e-3


def test_lvsa_guards_add_anchor_frames_at_the_shard_boundary():
    plain, guarded = single("wan", "lvsa")["masks"][0], single("wan", "lvsa-guards", 2)["masks"][0]
    assert guarded.sum() > plain.sum() and (guarded | plain).sum() == guarded.sum()


def test_ulysses_matches_one_process(ulysses):
    world, ranks = ulysses
    check_ranks(ranks, ULYSSES[world], 1, world, f"ulysses_degree={world}")


def test_ring_matches_one_process(ring):
    mode, world, ranks = ring
    ring_degree, ulysses_degree = (world, 1) if mode == "ring" else (2, world // 2)
    check_ranks(ranks, RING[(mode, world)], ring_degree, ulysses_degree, f"{mode} {world}")
    for job in RING[(mode, world)]:                       # every rank of a ring group has the same transfer table
        tables = [result[job]["needs"] for result in ranks]
        assert all(len(need) == ring_degree for needs in tables for need in needs)
        assert all(tables[rank] == tables[rank % ulysses_degree] for rank in range(world)), job
    jobs = [job for job in RING[(mode, world)] if job in CAUSAL]      # rank 0's rows (the first half of the frames)
    causal = [need for job in jobs for need in ranks[0][job]["needs"]]    # see no key of the later causal blocks
    assert bool(causal) == bool(jobs) and all(not need[0][1] for need in causal)
    if ("wan", "band") in RING[(mode, world)]:              # frames see their neighbours only: far shards are skipped
        needs = ranks[0][("wan", "band")]["needs"]
        assert needs and all(not need[0][2] and not need[2][0] and need[0][1] for need in needs)


@pytest.mark.parametrize("field, value", [("ulysses_anything", True), ("ring_anything", True)])
def test_uneven_shards_are_refused_naming_the_field(field, value):
    cp = SimpleNamespace(ring_degree=2, ulysses_degree=1, ulysses_anything=False, ring_anything=False)
    setattr(cp, field, value)
    with pytest.raises(ValueError, match=f"context_parallel_config.{field}: expected False"):
        parallel.layout(SimpleNamespace(context_parallel_config=cp))


@pytest.mark.parametrize("params, message", [
    ({"sp_world": 3}, "sp_world: LVSA's boundary guards sit at the ring's shard boundaries.*got 3"),
    ({}, "hidden_states: under ring degree 2 x Ulysses degree 1 layer 0 expected 192 / 2 video tokens"),
])
def test_ring_checks_name_the_field_before_any_collective(params, message):
    model = tiny_wan()
    handle = sparse.apply(model, method="lvsa", device="cpu", num_steps=5, **{**LVSA["wan"], **params})
    for block in model.blocks:
        block.attn1.processor._parallel_config = fake_parallel_config(ring_degree=2)
    with pytest.raises(ValueError, match=message), torch.no_grad():
        model(**inputs("wan"), timestep=torch.full((2,), 999.0), return_dict=False)
    with pytest.warns(UserWarning, match="after remove.*ring attention needs an attention backend that returns"):
        handle.remove()                                      # the model keeps the ring config and 'native'


@pytest.mark.parametrize("degrees, refused", [({"ring_degree": 2}, True), ({"ulysses_degree": 2}, False)])
def test_pasas_default_approximation_under_ring_is_refused_at_the_first_forward(degrees, refused):
    """It was refused at the first sparse step only, after every rank had run the dense steps (a review's two-process
    run); Ulysses keeps whole sequences, so it takes the approximation."""
    model = tiny_wan()
    handle = sparse.apply(model, method="pasa", device="cpu", num_steps=5)       # approximation: PASA's default
    geometry = VideoGeometry(8, 8, 8)
    assert handle._planner.approximation(geometry).startswith("grouped-first-order")
    for block in model.blocks:
        block.attn1.processor._parallel_config = fake_parallel_config(**degrees)
    if not refused:
        parallel.refuse_ring_cuts(handle._processors, handle._planner.approximation(geometry), None)
    else:
        with pytest.raises(ValueError, match=r"approximation: under ring attention \(ring degree 2\) expected "
                                             r"'drop', got 'grouped-first-order.*pass approximation='drop'"):
            with torch.no_grad():
                model(**inputs("wan"), timestep=torch.full((2,), 999.0), return_dict=False)
        assert handle.step is None                                   # refused before the step was counted
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        handle.remove()


@pytest.mark.parametrize("joint_model, degrees, backend, need", [
    (None, {}, None, None),                                            # no context parallelism
    (None, {"ulysses_degree": 2}, None, None),                         # Ulysses: diffusers' native backend runs it
    (None, {"ring_degree": 2}, None, "returns the LSE, which 'native' does not"),   # None: the active backend
    (None, {"ring_degree": 2}, "native", "returns the LSE, which 'native' does not"),
    (None, {"ring_degree": 2}, "_native_npu", "returns the LSE, which '_native_npu' does not"),
    (None, {"ring_degree": 2}, "_native_cudnn", None),
    ("HunyuanVideo15Transformer3DModel", {"ulysses_degree": 2}, "_native_cudnn",
     "HunyuanVideo15Transformer3DModel under context parallelism runs only with"),
    ("HunyuanVideoTransformer3DModel", {"ring_degree": 2}, None,
     "HunyuanVideoTransformer3DModel under context parallelism runs only with sparsecore applied (diffusers' "
     "processor builds its padding mask"),
    ("MochiTransformer3DModel", {"ulysses_degree": 2}, None,
     "MochiTransformer3DModel under context parallelism runs only with sparsecore applied (diffusers' processor runs "
     "torch SDPA on this rank's tokens only"),
])
def test_what_a_model_needs_to_run_after_remove_under_context_parallelism(joint_model, degrees, backend, need):
    """Remedies that say ``handle.remove()`` add what context parallelism needs then (a review found the model then
    failed inside diffusers: a padding-mask shape error on HunyuanVideo 1.5, 'Native attention does not support
    return_lse=True' under ring); HunyuanVideo 1.5's remedy is another transformer, not ``remove()``."""
    config = fake_parallel_config(**degrees) if degrees else None
    processors = [SimpleNamespace(_parallel_config=config, _attention_backend=backend)]
    got = parallel.after_remove(processors, joint_model)
    remedy = parallel.dense_remedy(processors, joint_model)
    if need is None:
        assert got is None and remedy == "call handle.remove() to run this input densely"
    elif joint_model:
        assert need in got and remedy == got and "remove()" not in remedy
    else:
        assert need in got and remedy == f"to run this input densely, handle.remove(); then {got}"
    assert parallel.after_remove([], joint_model) is None


def test_mochis_plan_refuses_a_forward_that_would_run_diffusers_own_processor():
    """The pre-hook :func:`parallel.enable_parallelism` puts on Mochi under ``MOCHI_CP_PLAN`` (the gloo runs check it
    is there): diffusers' processor would attend over this rank's video only, a wrong output, so a forward is refused
    unless every block runs sparsecore's: before ``apply()``, after it, after ``remove()``, and with one block's
    processor put back."""
    model = tiny_mochi()
    message = (r"transformer_blocks\[{}\].attn1.processor: under MOCHI_CP_PLAN expected sparsecore's "
               r"MochiSparseAttnProcessor, got MochiAttnProcessor2_0 \(diffusers' processor runs torch SDPA on this "
               r"rank's tokens only.*run it densely on a transformer without enable_parallelism")
    with pytest.raises(ValueError, match=message.format(0)):
        parallel.refuse_diffusers_mochi(model, ())
    handle = sparse.apply(model, method=random_blocks, device="cpu", num_steps=5)
    parallel.refuse_diffusers_mochi(model, ())
    last = model.transformer_blocks[1].attn1
    sparse_processor, last.processor = last.processor, last.processor.original
    with pytest.raises(ValueError, match=message.format(1)):
        parallel.refuse_diffusers_mochi(model, ())
    last.processor = sparse_processor
    handle.remove()
    with pytest.raises(ValueError, match=message.format(0)):
        parallel.refuse_diffusers_mochi(model, ())


def test_mochis_processor_keeps_the_parallel_config_diffusers_sets_after_apply():
    """diffusers' ``enable_parallelism`` after ``apply()`` sets the config on sparsecore's processor, whose original
    (``MochiAttnProcessor2_0``) has no such attribute: it is kept there, where the processor, ``remove()`` and a later
    ``apply()`` read it."""
    model = tiny_mochi()
    handle = sparse.apply(model, method=random_blocks, device="cpu", num_steps=5)
    config = fake_parallel_config(ulysses_degree=2)
    processor = model.transformer_blocks[0].attn1.processor
    processor._parallel_config = config
    assert processor._parallel_config is config and processor.original._parallel_config is config
    with pytest.warns(UserWarning, match="after remove.*MochiTransformer3DModel under context parallelism runs only"):
        handle.remove()
    assert model.transformer_blocks[0].attn1.processor is processor.original      # a later apply() reads it there
    again = sparse.apply(model, method=random_blocks, device="cpu", num_steps=5)
    assert model.transformer_blocks[0].attn1.processor._parallel_config is config
    with pytest.warns(UserWarning, match="after remove.*MochiTransformer3DModel under context parallelism runs only"):
        again.remove()


def test_apply_refuses_a_mochi_whose_parallelism_diffusers_enabled_without_its_processors():
    """diffusers' own ``enable_parallelism`` (before ``apply()``) sets the config on the model but not on Mochi's
    processors, which have no such attribute: sparsecore would run each rank's tokens alone. ``apply()`` refuses,
    naming sparsecore's ``enable_parallelism``; with the config on the processors too it applies."""
    model = tiny_mochi()
    model._parallel_config = fake_parallel_config(ulysses_degree=2)
    with pytest.raises(ValueError, match=r"transformer: its context parallelism was enabled by diffusers' "
                                         r"enable_parallelism, which leaves MochiAttnProcessor2_0 without the config"
                                         r".*sparsecore\.integrations\.diffusers\.enable_parallelism"):
        sparse.apply(model, method=random_blocks, device="cpu", num_steps=5)
    assert all(type(b.attn1.processor).__name__ == "MochiAttnProcessor2_0" for b in model.transformer_blocks)
    for block in model.transformer_blocks:
        block.attn1.processor._parallel_config = model._parallel_config
    handle = sparse.apply(model, method=random_blocks, device="cpu", num_steps=5)
    with pytest.warns(UserWarning, match="after remove"):
        handle.remove()


def test_a_held_masks_cut_is_kept_per_ring_place():
    """A mask kept in host memory is cut once per ring place and kernel, like a device mask: a second ring layout
    (another rank, degree or shard) in the same process gets its own cut, not the first one's."""
    mask = BlockMask.from_dense(np.eye(4, dtype=bool)[None].repeat(2, 0), 16, 16, 4).to("cpu")   # torch lists
    sharded = ShardedAttention(Planner(lambda *a: mask, {}, "cpu", None, 5, Stats()))
    cuts = []

    def runner(m: BlockMask) -> list:
        cuts.append(m)
        return [len(cuts)]

    plan = SimpleNamespace(mask=mask)
    first = sharded._held_work(plan, runner, torch.device("cpu"), 16, RingGroup(2, 0, None), 8)
    assert sharded._held_work(plan, runner, torch.device("cpu"), 16, RingGroup(2, 0, None), 8) is first
    other_rank = sharded._held_work(plan, runner, torch.device("cpu"), 16, RingGroup(2, 1, None), 8)
    other_degree = sharded._held_work(plan, runner, torch.device("cpu"), 16, RingGroup(4, 0, None), 4)
    kept = 2 * 4 * 4 * 4                      # 2 heads x 4 diagonal blocks of 4 x 4 tokens, counted with the cut
    assert (first, other_rank, other_degree) == (([1], kept), ([2], kept), ([3], kept))


@pytest.mark.parametrize("frames, refused", [(5, True), (4, False)])
def test_a_diffusion_forcing_timestep_of_uneven_frames_is_refused_naming_it(frames, refused):
    """SkyReels-V2's diffusion-forcing timestep ``[B, F]`` is split by Wan's plan along its frames: 5 frames of 16
    tokens divide by 2 as tokens but not as frames, which diffusers' split met with a bare assert."""
    from test_integration_diffusers import tiny_skyreels_v2
    model = tiny_skyreels_v2()
    handle = sparse.apply(model, method="lvsa", device="cpu", num_steps=5, window=1, reference_frames=2)
    for block in model.blocks:
        block.attn1.processor._parallel_config = fake_parallel_config(ring_degree=2)
    latents = torch.randn(1, 4, frames, 8, 8, generator=torch.Generator().manual_seed(0))
    timestep, text = torch.full((1, frames), 999.0), torch.randn(1, 7, 16, generator=torch.Generator().manual_seed(1))
    try:
        if refused:
            with pytest.raises(ValueError, match=r"timestep: under context parallelism \(ring degree 2 x Ulysses "
                                                 r"degree 1\) the plan splits a timestep \[B, N\] along N, expected N "
                                                 r"divisible by 2, got \[1, 5\].*5 frames"), torch.no_grad():
                model(hidden_states=latents, timestep=timestep, encoder_hidden_states=text,
                      enable_diffusion_forcing=True, return_dict=False)
            assert handle.step is None                               # refused before the step was counted
        else:                                           # the checks pass (the forward would then run collectives)
            handle._pre_forward(model, (), {"hidden_states": latents, "timestep": timestep})
            handle._post_forward(model, (), None)
            assert handle.step == 0
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            handle.remove()
