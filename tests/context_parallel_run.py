"""Tiny Wan (and Wan VACE, SkyReels-V2, also with diffusion forcing's causal blocks), HunyuanVideo 1.5, Mochi 1 and
LTX-Video models with sparsecore applied, in one process or in N gloo processes.

Shared by test_integration_context_parallel.py (the parent) and its spawned workers, which
import this module by name (it holds no test, so the workers do not import pytest). Modes:
``ulysses`` (diffusers' ``enable_parallelism`` as a user calls it), ``ring`` and ``unified``
(ring x Ulysses, through ``sparsecore.integrations.diffusers.parallel.enable_parallelism``, which
HunyuanVideo 1.5, Mochi 1, Wan VACE, SkyReels-V2 and LTX-Video need for their context-parallel plans).
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import traceback
import warnings
from dataclasses import fields
from datetime import timedelta
from functools import partial
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from diffusers import (ContextParallelConfig, HunyuanVideo15Transformer3DModel, LTXVideoTransformer3DModel,
                       MochiTransformer3DModel, ParallelConfig, SkyReelsV2Transformer3DModel, WanTransformer3DModel,
                       WanVACETransformer3DModel)

from sparsecore import BlockMask, VideoGeometry
from sparsecore.integrations import diffusers as sparse
from sparsecore.integrations.diffusers import parallel
from sparsecore.integrations.diffusers.ring import RingWork
from sparsecore.methods import lvsa
from sparsecore.methods.pasa import PASAParams

HEADS = 4
CAUSAL_FRAMES = 2                                       # "skyreels-causal": diffusion forcing's causal blocks
TIMESTEPS = (999.0, 800.0, 600.0, 400.0, 200.0)     # one forward per denoising step
LVSA = {"wan": {"window": 1, "reference_frames": 6, "first_frames": 1},
        "hunyuan": {"window": 1, "reference_frames": 4, "first_frames": 1}}
LVSA["mochi"] = LVSA["hunyuan-pad"] = LVSA["hunyuan"]
LVSA.update({name: LVSA["wan"] for name in ("vace", "skyreels", "skyreels-df", "skyreels-causal", "ltx", "ltx-i2v",
                                            "ltx-b1")})
ADASPA = {"block_size": 16, "sparsity": 0.6, "warmup_steps": 1, "search_steps": (1, 3),
          "recall_threshold": 0.444}   # the tiny random model's recalls are ~0.44: some heads get other budgets
PASA = {"density": 0.4, "block_size": 16, "dense_layers": (), "noise_scale": 0.5,
        **({"approximation": "drop"} if "approximation" in {f.name for f in fields(PASAParams)} else {})}
PARALLEL_FIRST = {"lvsa", "adaspa", "adaspa-fused-first", "pasa"}   # parallelism enabled before apply(), others after
WORKER_SECONDS = 240                                   # a hung collective fails the test instead of CI


def tiny_wan() -> WanTransformer3DModel:
    torch.manual_seed(0)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=16,
                                 in_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2,
                                 rope_max_seq_len=32).eval()


def tiny_vace() -> WanVACETransformer3DModel:
    torch.manual_seed(0)
    return WanVACETransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=16,
                                     in_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2,
                                     rope_max_seq_len=32, vace_layers=[0, 1], vace_in_channels=6).eval()


def tiny_skyreels(frames_per_block: int = 1) -> SkyReelsV2Transformer3DModel:
    """``frames_per_block`` > 1: diffusion forcing's causal blocks (the model masks attention frame-causally)."""
    torch.manual_seed(0)
    return SkyReelsV2Transformer3DModel(patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=16,
                                        in_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32,
                                        num_layers=2, rope_max_seq_len=32,
                                        num_frame_per_block=frames_per_block).eval()


def tiny_hunyuan() -> HunyuanVideo15Transformer3DModel:
    torch.manual_seed(0)
    return HunyuanVideo15Transformer3DModel(in_channels=4, out_channels=4, num_attention_heads=HEADS,
                                            attention_head_dim=16, num_layers=2, num_refiner_layers=1, mlp_ratio=2.0,
                                            patch_size=1, patch_size_t=1, text_embed_dim=16, text_embed_2_dim=8,
                                            image_embed_dim=8, rope_axes_dim=(4, 6, 6)).eval()


def tiny_mochi() -> MochiTransformer3DModel:
    """Mochi 1: two blocks, the last ``context_pre_only``; its RoPE frequencies drawn (the model starts them at 0,
    which would leave RoPE the identity, and a wrong split of it unseen)."""
    torch.manual_seed(0)
    model = MochiTransformer3DModel(patch_size=2, num_attention_heads=HEADS, attention_head_dim=16, num_layers=2,
                                    pooled_projection_dim=16, in_channels=4, text_embed_dim=16, time_embed_dim=16,
                                    max_sequence_length=8).eval()
    with torch.no_grad():
        model.pos_frequencies.normal_()
    return model


def tiny_ltx() -> LTXVideoTransformer3DModel:
    torch.manual_seed(0)
    return LTXVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=HEADS, attention_head_dim=16,
                                      cross_attention_dim=64, num_layers=2, caption_channels=16).eval()


def inputs(model: str) -> dict:
    """Two samples (as with CFG). Wan: 12 latent frames of 4x4 patches (192 tokens). HunyuanVideo 1.5: 8 frames of
    4x4 (128 video tokens) and 13 text tokens, 6 and 8 of them valid (two text lengths in one batch). Mochi 1: 8
    frames of 4x4 patches (128 video tokens) and 8 text tokens, 3 and 6 of them valid. LTX-Video: 12 frames of 4x4
    packed tokens [B, 192, C] and the grid beside them, 7 text tokens, 5 and 7 of them valid."""
    gen = torch.Generator().manual_seed(3)
    if model.startswith("ltx"):
        return {"hidden_states": 2.0 * torch.randn(2, 12 * 4 * 4, 4, generator=gen),
                "encoder_hidden_states": torch.randn(2, 7, 16, generator=gen),
                "encoder_attention_mask": torch.tensor([[1] * 5 + [0] * 2, [1] * 7]), "num_frames": 12, "height": 4,
                "width": 4}
    if model == "mochi":
        return {"hidden_states": torch.randn(2, 4, 8, 8, 8, generator=gen),
                "encoder_hidden_states": torch.randn(2, 8, 16, generator=gen),
                "encoder_attention_mask": torch.tensor([[1] * 3 + [0] * 5, [1] * 6 + [0] * 2])}
    if not model.startswith("hunyuan"):   # Wan's; VACE adds control latents, SkyReels-V2's diffusion forcing a flag
        wan = {"hidden_states": 2.0 * torch.randn(2, 4, 12, 8, 8, generator=gen),
               "encoder_hidden_states": torch.randn(2, 7, 16, generator=gen)}
        extra = {"vace": {"control_hidden_states": torch.randn(2, 6, 12, 8, 8, generator=gen)},
                 "skyreels-df": {"enable_diffusion_forcing": True},
                 "skyreels-causal": {"enable_diffusion_forcing": True}}.get(model, {})
        return {**wan, **extra}
    return {"hidden_states": 2.0 * torch.randn(2, 4, 8, 4, 4, generator=gen),
            "encoder_hidden_states": torch.randn(2, 6, 16, generator=gen),
            "encoder_attention_mask": torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]]),
            "encoder_hidden_states_2": torch.randn(2, 4, 8, generator=gen),
            "encoder_attention_mask_2": torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]]),
            "image_embeds": torch.zeros(2, 3, 8)}


MODELS = {"wan": tiny_wan, "hunyuan": tiny_hunyuan, "hunyuan-pad": tiny_hunyuan, "mochi": tiny_mochi, "vace": tiny_vace,
          "skyreels": tiny_skyreels, "skyreels-df": tiny_skyreels,
          "skyreels-causal": partial(tiny_skyreels, CAUSAL_FRAMES), "ltx": tiny_ltx, "ltx-i2v": tiny_ltx,
          "ltx-b1": tiny_ltx}


def timesteps(model: str, t: float) -> torch.Tensor:
    """A forward's timestep for two samples: one each, or (SkyReels-V2's diffusion forcing) one per latent frame, the
    first half of the 12 frames 150 ahead (with causal blocks of 2 frames, whole causal blocks ahead), or for
    LTX-Video one per token, the first frame's 16 tokens at 0 (the conditioning image), as ``[B, S, 1]`` (its long
    multi-prompt pipeline's shape; its image-to-video pipeline's is ``[B, S]``), or ``[B, 1]`` (its condition
    pipeline's without conditions)."""
    if model in ("skyreels-df", "skyreels-causal"):
        return torch.tensor([[max(t - 150.0, 0.0)] * 6 + [t] * 6] * 2)
    if model == "ltx-i2v":
        return torch.tensor([[0.0] * 16 + [t] * (11 * 16)] * 2)[:, :, None]
    if model == "ltx-b1":
        return torch.full((2, 1), t)
    return torch.full((2,), t)


def full(geometry: VideoGeometry, num_heads: int, step: int, layer: int) -> BlockMask:
    """Every pair kept: the processors take the model's own (dense) attention."""
    return BlockMask.full(num_heads, geometry.tokens, geometry.tokens, geometry.frame_tokens)


def lvsa_per_head(geometry: VideoGeometry, num_heads: int, step: int, layer: int) -> BlockMask:
    """LVSA's pattern with head ``h``'s anchors rotated as at step ``step + 2h + layer``: a different mask per head."""
    params = LVSA["wan" if geometry.text_tokens == 0 else "hunyuan"]
    maps = [lvsa.plan(geometry, 1, step=step + 2 * h + layer, **params).to_dense()[0] for h in range(num_heads)]
    offsets = geometry.block_offsets(None)
    return BlockMask.from_lists([[np.nonzero(row)[0] for row in m] for m in maps], offsets, offsets)


def band(geometry: VideoGeometry, num_heads: int, step: int, layer: int) -> BlockMask:
    """Each frame attends to its neighbours only (text both ways): far ring shards hold no listed key."""
    offsets = geometry.block_offsets(None)
    frames = geometry.block_frames(offsets)
    video = frames >= 0
    keep = ~(video[:, None] & video[None, :]) | (np.abs(frames[:, None] - frames[None, :]) <= 1)
    rows = [[np.nonzero(row)[0] for row in keep]] * num_heads
    return BlockMask.from_lists(rows, offsets, offsets)


def random_blocks(geometry: VideoGeometry, num_heads: int, step: int, layer: int) -> BlockMask:
    """A random pattern per head, layer and step on frame blocks (the diagonal kept: no empty row), the same in every
    process; it lists later causal blocks too, which leave it under causal frames."""
    offsets = geometry.block_offsets(None)
    blocks = len(offsets) - 1
    keep = np.random.default_rng([11, layer, step]).random((num_heads, blocks, blocks)) < 0.35
    keep[:, np.arange(blocks), np.arange(blocks)] = True
    return BlockMask.from_lists([[np.nonzero(row)[0] for row in head] for head in keep], offsets, offsets)


def method(model: str, name: str, ring: int = 1) -> tuple[Any, dict]:
    """The provider and parameters of a test method (``lvsa-guards``: LVSA's boundary guards of ``ring`` shards)."""
    return {"dense": (full, {}),
            "lvsa": ("lvsa", LVSA[model]),
            "lvsa-guards": ("lvsa", {**LVSA[model], "sp_world": ring}),
            "lvsa-per-head": (lvsa_per_head, {}),
            "band": (band, {}),
            "random": (random_blocks, {}),
            "adaspa": ("adaspa", ADASPA),
            "adaspa-compiled": ("adaspa", ADASPA),          # the transformer's blocks under torch.compile
            "adaspa-fused-first": ("adaspa", {**ADASPA, "first_search": "fused"}),   # the paper's dense step 1
            "pasa": ("pasa", PASA),
            "sta": ("sta", {"tile": (2, 4, 4), "window": (1, 1, 3)})}[name]       # masks over the tile order


def prepare(model: torch.nn.Module, name: str) -> None:
    """What a run does to the model after apply(): compile its blocks for the "-compiled" methods.

    Not ``fullgraph=True``: diffusers 0.42's own context-parallel block hooks do not trace
    (``hasattr`` in ``hooks/context_parallel.py``), with or without sparsecore.
    """
    if name.endswith("-compiled"):
        model.compile_repeated_blocks(fullgraph=False, backend="aot_eager")


def denoise(model: torch.nn.Module, model_name: str) -> np.ndarray:
    data, outputs = inputs(model_name), []
    with torch.no_grad():
        for t in TIMESTEPS:
            for call in step_calls(model_name, data):
                outputs.append(model(**call, timestep=timesteps(model_name, t), return_dict=False)[0].numpy())
    return np.stack(outputs)


def step_calls(model_name: str, data: dict) -> list[dict]:
    """A step's forwards: one, or for ``hunyuan-pad`` two (guidance as separate calls), the second's text padded 3
    tokens longer (a user's embeddings of another length), so its sequence outgrows the one its step planned for."""
    if model_name != "hunyuan-pad":
        return [data]
    longer = {"encoder_hidden_states": torch.cat([data["encoder_hidden_states"], torch.zeros(2, 3, 16)], 1),
              "encoder_attention_mask": torch.cat([data["encoder_attention_mask"],
                                                   torch.zeros(2, 3, dtype=torch.long)], 1)}
    return [data, {**data, **longer}]


def observe(model: torch.nn.Module, handle: Any) -> dict:
    """Each layer's last mask (block map) and budgets, the heads of this process, the backends that ran, and
    which key shards each ring rank's rows needed in the last plans (ring runs)."""
    masks = [handle.mask(layer).to_host() for layer in range(len(handle._processors))]
    heads = [row["heads"] for row in handle.stats() if row["layer"] == 0][-1]
    needs = [plan.kernel.need for plan in handle._planner._plans.values() if isinstance(plan.kernel, RingWork)]
    return {"masks": [m.to_dense() for m in masks], "heads": heads, "budgets": [m.budgets for m in masks],
            "backends": sorted({row["backend"] for row in handle.stats()}), "needs": needs}


def run(model_name: str, name: str, ring: int = 1) -> dict:
    """Outputs of every step and the last masks of both layers, with sparsecore applied, in one process."""
    model = MODELS[model_name]()
    provider, params = method(model_name, name, ring)
    handle = sparse.apply(model, method=provider, device="cpu", num_steps=len(TIMESTEPS), **params)
    handle.keep_masks(True)                                 # observe() reads every layer's last mask
    prepare(model, name)
    outputs = denoise(model, model_name)
    return {**observe(model, handle), "outputs": outputs}


def run_dense(model_name: str = "wan") -> np.ndarray:
    """The same steps with diffusers' own processors (no sparsecore): what the dense method must match."""
    return denoise(MODELS[model_name](), model_name)


def fake_parallel_config(**degrees) -> ParallelConfig:
    """A ParallelConfig as enable_parallelism leaves it on a processor, for checks that run before any collective."""
    config = ParallelConfig(context_parallel_config=ContextParallelConfig(**degrees))
    cp = config.context_parallel_config
    cp._ulysses_mesh = cp._ring_mesh = SimpleNamespace(get_group=lambda: None)
    cp._ulysses_local_rank = cp._ring_local_rank = 0
    return config


# ------------------------------------------------------------------ N processes
def allow_context_parallel_on_cpu() -> None:
    """Two things diffusers 0.42.1 needs to enable context parallelism on a host with no accelerator.

    ``ModelMixin._resolve_parallel_config`` picks the device ``rank % torch.accelerator.device_count()``,
    a division by zero where the count is 0; and the context-parallel hook logs through
    ``logging.Logger.warning_once``, which exists only after ``transformers`` is imported (as in a pipeline).
    Called in the spawned workers only.
    """
    torch.accelerator.device_count = lambda: 1
    if not hasattr(logging.Logger, "warning_once"):
        logging.Logger.warning_once = logging.Logger.warning


def config(mode: str, world: int) -> ContextParallelConfig:
    """``ulysses`` / ``ring``: all ``world`` ranks in one group; ``unified``: ring 2 x Ulysses ``world / 2``."""
    if mode == "ulysses":
        return ContextParallelConfig(ulysses_degree=world)
    if mode == "ring":
        return ContextParallelConfig(ring_degree=world)
    return ContextParallelConfig(ring_degree=2, ulysses_degree=world // 2)


def after_remove(model: torch.nn.Module, handle: Any) -> dict:
    """Mochi 1 under its plan after ``handle.remove()``: the warning remove() gives, and the error of the next forward
    (diffusers' processor would attend over this rank's video only), raised before any collective."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handle.remove()
    try:
        denoise(model, "mochi")
    except ValueError as err:
        return {"remove_warnings": [str(w.message) for w in caught], "refused": str(err)}
    return {"remove_warnings": [str(w.message) for w in caught], "refused": None}


def worker(rank: int, world: int, port: int, mode: str, jobs: list[tuple[str, str]], results: Any) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    try:
        allow_context_parallel_on_cpu()
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=WORKER_SECONDS))
        out = {}
        for model_name, name in jobs:
            model = MODELS[model_name]()
            cp = config(mode, world)
            provider, params = method(model_name, name, cp.ring_degree)
            enable = (lambda: model.enable_parallelism(config=cp)) if (mode, model_name) == ("ulysses", "wan") else \
                (lambda: parallel.enable_parallelism(model, cp))    # HunyuanVideo 1.5, Mochi 1, LTX: sparsecore's plans
            if name in PARALLEL_FIRST:
                enable()
            handle = sparse.apply(model, method=provider, device="cpu", num_steps=len(TIMESTEPS), **params)
            handle.keep_masks(True)
            if name not in PARALLEL_FIRST:
                enable()
            prepare(model, name)
            outputs = denoise(model, model_name)
            out[(model_name, name)] = {**observe(model, handle), "outputs": outputs,
                                       **(after_remove(model, handle) if model_name == "mochi" else {})}
        results.put((rank, out))
    except BaseException:                                # the parent reports it; a worker never hangs silently
        results.put((rank, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_parallel(mode: str, world: int, jobs: list[tuple[str, str]]) -> list[dict]:
    """Per rank: {(model, method): outputs, heads, masks} from ``world`` gloo processes on loopback."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, world, port, mode, jobs, results), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    by_rank: dict[int, Any] = {}
    try:
        for _ in procs:
            rank, out = results.get(timeout=WORKER_SECONDS + 60)
            by_rank[rank] = out
    except queue.Empty:
        raise TimeoutError(f"{world - len(by_rank)} of {world} gloo workers sent nothing in "
                           f"{WORKER_SECONDS + 60} s") from None
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    failed = {rank: out for rank, out in by_rank.items() if isinstance(out, str)}
    if failed:
        raise RuntimeError("worker(s) failed:\n" + "\n".join(f"rank {r}:\n{tb}" for r, tb in sorted(failed.items())))
    return [by_rank[r] for r in range(world)]
