"""A tiny Wan model with sparsecore applied, run in one process or in N gloo processes under Ulysses.

Shared by test_integration_context_parallel.py (the parent) and its spawned workers, which
import this module by name (it holds no test, so the workers do not import pytest).
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import traceback
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from diffusers import WanTransformer3DModel
from diffusers import ContextParallelConfig

from sparsecore import BlockMask, VideoGeometry
from sparsecore.integrations import diffusers as sparse
from sparsecore.methods import lvsa

HEADS = 4
TIMESTEPS = (999.0, 800.0, 600.0, 400.0, 200.0)     # one forward per denoising step
LVSA = {"window": 1, "reference_frames": 6, "first_frames": 1}
ADASPA = {"block_size": 16, "sparsity": 0.6, "warmup_steps": 1, "search_steps": (1, 3),
          "recall_threshold": 0.444}   # the tiny random model's recalls are ~0.44: some heads get other budgets
PARALLEL_FIRST = {"lvsa", "adaspa"}                 # these enable parallelism before apply(), the others after
WORKER_SECONDS = 240                                   # a hung collective fails the test instead of CI


def tiny_wan() -> WanTransformer3DModel:
    torch.manual_seed(0)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=16,
                                 in_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2,
                                 rope_max_seq_len=32).eval()


def inputs() -> dict:
    """Two samples (as with CFG), 12 latent frames of 4x4 patches: 192 tokens, divisible by 2 and 4 ranks."""
    gen = torch.Generator().manual_seed(3)
    return {"hidden_states": 2.0 * torch.randn(2, 4, 12, 8, 8, generator=gen),
            "encoder_hidden_states": torch.randn(2, 7, 16, generator=gen)}


def full(geometry: VideoGeometry, num_heads: int, step: int, layer: int) -> BlockMask:
    """Every pair kept: the processors take the model's own (dense) attention."""
    return BlockMask.full(num_heads, geometry.tokens, geometry.tokens, geometry.frame_tokens)


def lvsa_per_head(geometry: VideoGeometry, num_heads: int, step: int, layer: int) -> BlockMask:
    """LVSA's pattern with head ``h``'s anchors rotated as at step ``step + 2h + layer``: a different mask per head."""
    maps = [lvsa.plan(geometry, 1, step=step + 2 * h + layer, **LVSA).to_dense()[0] for h in range(num_heads)]
    offsets = geometry.block_offsets(None)
    return BlockMask.from_lists([[np.nonzero(row)[0] for row in m] for m in maps], offsets, offsets)


METHODS: dict[str, tuple[Any, dict]] = {
    "dense": (full, {}),
    "lvsa": ("lvsa", LVSA),
    "lvsa-per-head": (lvsa_per_head, {}),
    "adaspa": ("adaspa", ADASPA),
    "adaspa-compiled": ("adaspa", ADASPA),              # the transformer's blocks under torch.compile
}


def prepare(model: WanTransformer3DModel, method: str) -> None:
    """What a run does to the model after apply(): compile its blocks for the "-compiled" methods.

    Not ``fullgraph=True``: diffusers 0.42's own context-parallel block hooks do not trace
    (``hasattr`` in ``hooks/context_parallel.py``), with or without sparsecore.
    """
    if method.endswith("-compiled"):
        model.compile_repeated_blocks(fullgraph=False, backend="aot_eager")


def run(method: str) -> dict:
    """Outputs of every step and the last masks of both layers, with sparsecore applied (CPU, portable)."""
    model = tiny_wan()
    provider, params = METHODS[method]
    handle = sparse.apply(model, method=provider, device="cpu", num_steps=len(TIMESTEPS), **params)
    prepare(model, method)
    data = inputs()
    outputs = []
    with torch.no_grad():
        for t in TIMESTEPS:
            timestep = torch.full((2,), t)
            outputs.append(model(**data, timestep=timestep, return_dict=False)[0].numpy())
    masks = [handle.mask(layer).to_host() for layer in range(len(model.blocks))]
    heads = [row["heads"] for row in handle.stats() if row["layer"] == 0][-1]
    return {"outputs": np.stack(outputs), "masks": [m.to_dense() for m in masks], "heads": heads,
            "budgets": [m.budgets for m in masks], "backends": sorted({row["backend"] for row in handle.stats()})}


def run_dense() -> np.ndarray:
    """The same steps with diffusers' own processors (no sparsecore): what the dense method must match."""
    model, data = tiny_wan(), inputs()
    with torch.no_grad():
        return np.stack([model(**data, timestep=torch.full((2,), t), return_dict=False)[0].numpy()
                         for t in TIMESTEPS])


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


def worker(rank: int, world: int, port: int, methods: list[str], results: Any) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    try:
        allow_context_parallel_on_cpu()
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=WORKER_SECONDS))
        out = {}
        for method in methods:
            model = tiny_wan()
            provider, params = METHODS[method]
            config = ContextParallelConfig(ulysses_degree=world)
            if method in PARALLEL_FIRST:
                model.enable_parallelism(config=config)
            handle = sparse.apply(model, method=provider, device="cpu", num_steps=len(TIMESTEPS), **params)
            if method not in PARALLEL_FIRST:
                model.enable_parallelism(config=config)
            prepare(model, method)
            data, outputs = inputs(), []
            with torch.no_grad():
                for t in TIMESTEPS:
                    outputs.append(model(**data, timestep=torch.full((2,), t), return_dict=False)[0].numpy())
            heads = [row["heads"] for row in handle.stats() if row["layer"] == 0][-1]
            out[method] = {"outputs": np.stack(outputs), "heads": heads,
                           "masks": [handle.mask(layer).to_host().to_dense() for layer in range(len(model.blocks))]}
        results.put((rank, out))
    except BaseException:                                # the parent reports it; a worker never hangs silently
        results.put((rank, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_parallel(world: int, methods: list[str]) -> list[dict]:
    """Per rank: {method: outputs, heads, masks} from ``world`` gloo processes on loopback."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, world, port, methods, results), daemon=True) for r in range(world)]
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
