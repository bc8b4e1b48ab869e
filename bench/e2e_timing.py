"""How the end-to-end benchmark (``bench/e2e_benchmark.py``) measures: one transformer forward timed between device
synchronizations, the warm-up that compiles the kernels a generation runs only once before any of them is timed, and
the device's peak and allocated memory (``None`` off CUDA, where the allocator keeps no such statistics)."""

from __future__ import annotations

import time

import torch

from e2e_models import attention_shape, timestep_inputs, token_grid, video_tokens

import sparsecore
from sparsecore import VideoGeometry
from sparsecore.timing import synchronize


FORWARD_RANGE = "timed forward"      # the profiler's name for the forward alone, without the timer's synchronizes


def timed_forward(model, inputs: dict, timestep: float, device: str) -> float:
    """Seconds of one forward of ``model`` on ``inputs`` at ``timestep``, from a synchronized device to a synchronized
    device (so the kernels it queued are counted), without autograd. Under ``torch.profiler`` the forward alone is
    the range :data:`FORWARD_RANGE`."""
    synchronize(device)
    start = time.perf_counter()
    with torch.no_grad(), torch.profiler.record_function(FORWARD_RANGE):
        model(**timestep_inputs(model, timestep, device, inputs), **inputs)
    synchronize(device)
    return time.perf_counter() - start


def peak_gib(device: str) -> float | None:
    """The device's peak allocated memory since the last :func:`reset_peak`, in GiB."""
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def allocated_mib(device: str) -> float | None:
    """Device memory allocated now (after a row's steps: what it holds between steps)."""
    return torch.cuda.memory_allocated() / 2**20 if device == "cuda" else None


def reset_peak(device: str) -> None:
    """Start a new peak for :func:`peak_gib` (a row's, or a step's)."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def warm_kernels(model, inputs: dict, device: str, dtype: torch.dtype, text: int = 0, backend: str | None = None,
                 options: dict | None = None, padding: int = 0) -> None:
    """Compile the kernels a step runs only once (AdaSpa's search passes and the kernel of its 64-token masks) at
    this length and head count: the JIT time of a first call is not a step's time, and Triton specializes its
    kernels on whether lengths and block counts divide by 16, so a warm-up at another length may not reuse.
    ``text``: valid text tokens after the video (HunyuanVideo 1.5's joint sequence, known after a forward; then
    it runs inside a method's row, so the kernel it compiles is not kept in sparsecore's cache, where its plan
    would count as memory the row holds: likely the 3.76 MiB of AdaSpa's HunyuanVideo row, 2026-12-01).
    ``backend``, ``options``: what the methods' kernels are compiled with (``--backend``, ``--backend-option``).
    ``padding``: text slots after the valid tokens (a padded prompt): the searched masks' kernel then runs on the
    mask extended over them (``BlockMask.with_padding``), as the planner runs it."""
    import numpy as np
    from sparsecore.integrations.diffusers.models import spec_of
    from sparsecore.methods.causal import visible_counts
    from sparsecore.methods.selection import dense_mask
    from sparsecore.search import block_mass, dense_attention_with_mass
    (heads, dim), tokens = attention_shape(model), video_tokens(model, inputs) + text
    q = torch.randn(1, heads, tokens, dim, device=device, dtype=dtype)
    causal = spec_of(model).causal_frames(model.config)     # a frame-causal model's blocks restart at each causal block
    geometry = VideoGeometry(*token_grid(model, inputs), text_tokens=text, causal_frames=causal)
    offsets = geometry.block_offsets(64)
    if geometry.causal_frames:     # AdaSpa's LSE pass (every visible block's kernel), then the masses of those blocks
        visible = dense_mask(geometry, q.shape[1], {"method": "causal", "action": "warm-up"})
        _, lse = sparsecore.compile(visible, device=device, backend=backend, cache=False, **(options or {}))(
            q, q, q, return_lse=True)
        block_mass(q, q, offsets, offsets, lse, visible=visible_counts(geometry, offsets))
    else:
        block_mass(q, q, offsets, offsets)
        dense_attention_with_mass(q, q, q, offsets, offsets)
    blocks = len(offsets) - 1
    keep = np.random.default_rng(0).random((q.shape[1], blocks, blocks)) < min(1.0, 16 / blocks)
    lists = [[np.flatnonzero(row) for row in head] for head in keep]             # the searched masks' layout
    mask = sparsecore.BlockMask.from_lists(lists, offsets, offsets)
    if padding:
        mask, q = mask.with_padding(tokens + padding), torch.randn(1, heads, tokens + padding, dim, device=device,
                                                                    dtype=dtype)
    sparsecore.compile(mask, device=device, backend=backend, cache=False, **(options or {}))(q, q, q)   # not kept
    synchronize(device)


def warm_batch_lengths(model, inputs: dict, device: str, handle) -> None:
    """:func:`warm_kernels` for each (valid text, text padding) of the samples a forward under ``handle`` ran (its
    stats; a classifier-free guidance batch has two), with ``handle``'s backend and options."""
    for text, padding in sorted({(s["text_tokens"], s["padding"]) for s in handle.stats()} - {(0, 0)}):
        warm_kernels(model, inputs, device, model.dtype, text, handle.backend, handle.backend_options, padding)
