"""End-to-end benchmark: transformer steps and whole generations, dense vs sparsecore, eager and compiled.

    python bench/e2e_benchmark.py --out bench/results [--models wan-1.3b wan-14b hv15 hv15-t2v hv cogvideox-1.5 wan-vace
                                  skyreels-df mochi ltx ltx2 kandinsky5 cosmos]
                                  [--lengths 6x]
                                  [--modes eager compiled] [--tiny]

Random-weight models with the real configurations (weights do not change timing), bf16 on one
GPU, batch 1 (one CFG branch), 512 text tokens:

- ``wan-1.3b``: Wan 2.1 1.3B (30 layers, 12 heads x 128, ffn 8960) at 480x832 with 21, 41,
  81, 121 latent frames (81/161/321/481 video frames: 1x, 2x, 4x, 6x the training length).
- ``wan-14b``: Wan 2.1 14B-shaped layers (40 heads x 128, ffn 13824) at 6x, run with 2 of
  its 40 layers and reported per layer and scaled to 40 (stated in the table).
- ``hv15``: HunyuanVideo 1.5-shaped (16 heads x 128, 8.3B at 54 layers) at 480p (30x53
  latent) with 33 and 65 latent frames (1x, 2x its horizon), run with 6 of 54 layers, scaled.
- ``hv15-t2v``: the same with a text-to-video prompt as HunyuanVideo 1.5's pipeline passes it: 1,000 Qwen2.5-VL
  slots (150 valid), 256 ByT5 slots (none valid: no quoted text), 729 image slots of zeros (t2v), so 1,835 of its
  1,985 text tokens are padding, which sparsecore runs as padding blocks no row lists.
- ``hv``: HunyuanVideo 1.0 13B-shaped (24 heads x 128, 20 double-stream and 40 single-stream blocks) at 720p
  (90x160 latent, 45x80 tokens a frame) with 33 latent frames (129 video frames, its horizon), 256 text
  tokens, run with 1 double-stream and 2 single-stream blocks (the model's 1 : 2), scaled to 60 layers.
- ``cogvideox-1.5``: CogVideoX 1.5 5B-shaped (48 heads x 64, 42 layers, patches 2x2x2) at 1360x768 (96x170
  latent) with 22 and 42 latent frames (81 and 161 video frames: 1x and 2x its training length; 11 and 21 token
  frames), 226 text tokens (its prompt length) before the video, run with 6 of 42 layers, scaled; compiled mode
  compiles each block (diffusers 0.42 declares no repeated blocks for it).
- ``wan-vace``: Wan 2.1 VACE 1.3B (Wan 2.1 1.3B's 30 blocks and 15 VACE blocks, at every other layer, over 96
  control channels) at 480x832 with 41 latent frames (2x), every layer run: 45 self-attention layers a step.
- ``skyreels-df``: SkyReels-V2 DF 1.3B (Wan 2.1 1.3B's configuration) with diffusion forcing's causal blocks of 5
  latent frames (``num_frame_per_block=5``, the pipelines' ``causal_block_size=5``) at 544x960 (68x120 latent, 2,040
  tokens a frame) with 50 and 125 latent frames (197 and 497 video frames, 2x and 5x its pipelines' base of 97),
  every layer run: 102,000 and 255,000 tokens. Its dense row is the model's own attention, SDPA under the
  ``[1, 1, L, L]`` boolean mask its forward builds (10.4 GB at 2x, 65 GB at 5x; where that does not fit, the row
  says so and the methods still run); sparsecore's dense row runs every block each frame may see.
- ``mochi``: Mochi 1 preview (10B: 48 layers, 24 heads x 128, patch 2) at 848x480 (106x60 latent, 53x30 tokens a
  frame) with 28 latent frames (163 video frames, its horizon: 44,520 video tokens), 256 text tokens after the video
  (all valid), run with 6 of 48 layers, scaled; its processor runs torch SDPA itself (per sample; no diffusers
  backend), and compiled mode compiles each block (diffusers 0.42 declares no repeated blocks for it).
- ``ltx``: LTX-Video 13B-shaped (``LTXVideoTransformer3DModel``: 48 layers, 32 heads x 128, cross-attention 4096 over
  T5's 4096 channels, patch 1) at 1216x704 (22x38 latent: its VAE's 32x spatial and 8x temporal; 836 tokens a frame;
  its pipeline's default is 704x512) with 21 and 41 latent frames (161 and 321 video frames: 1x and 2x LVSA's horizon
  for it, its pipeline's default 161 frames, which is ours: ``lvsa.REFERENCE_FRAMES``; 17,556 and 34,276 tokens), 128
  text tokens (its ``max_sequence_length``, all valid) in its cross-attention only, run with 6 of 48 layers, scaled.
  Its forward takes packed tokens ``[B, S, C]`` beside ``num_frames``, ``height``, ``width`` (where the token grid is
  read from, as the integration reads it) and RoPE's interpolation scale as its pipeline passes it (8 / its 25 fps,
  32, 32).
- ``ltx2``: LTX-2 (``LTX2VideoTransformer3DModel``'s default configuration, the 19B, with split RoPE as diffusers'
  conversion script sets for the 2.0 checkpoint (files before 2026-12-03's twenty-third session's second run had the
  default interleaved RoPE): 48 audio-video blocks, video 32 heads x 128, audio 32 x 64) at the same size with 16 and 33 latent frames (121 and 257 video frames, 13,376 and
  27,588 tokens: its horizon, 16 latent frames, is ours too: its pipeline's default 121 frames), with audio of the
  video's duration as its pipeline counts it (at its 24 fps and 25 audio latents a second: 126 and 268 audio tokens),
  1024 text tokens for the video and for the audio (its ``max_sequence_length``; its connectors fill padding with
  registers, so all are valid), ``video_coords`` and
  ``audio_coords`` made as its pipeline makes them, and the timestep passed as ``sigma`` too with
  ``use_cross_timestep=True`` (its pipeline's defaults); run with 6 of 48 layers, scaled. sparsecore takes its video
  self-attention (``attn1``); the audio self-attention and the text and audio-video cross-attentions stay the model's.
- ``kandinsky5``: Kandinsky 5.0 Video Lite (``Kandinsky5Transformer3DModel``, 2B: 32 visual blocks, 28 heads x 64,
  RoPE axes 16 / 24 / 24, two text blocks, the image condition's channels) at 768x512 (its pipeline's default size;
  64x96 latent, 32x48 tokens a frame) with 31 and 61 latent frames (121 and 241 video frames: its 5 s and 10 s
  checkpoints' lengths; 31 is LVSA's horizon for it, ours; 47,616 and 93,696 tokens), 256 Qwen2.5-VL text tokens in
  its cross-attention, raster token order (no NABLA ``sparse_params``: the dense rows are dense), run with 8 of 32
  visual blocks, scaled. Its float32 modules (time embeddings, modulations) stay float32, as ``from_pretrained``
  keeps them.
- ``cosmos``: Cosmos-Predict2.5 2B-shaped (``CosmosTransformer3DModel``: 28 blocks, 16 heads x 128, patch 1 x 2 x 2,
  RoPE scale 1 / 3 / 3 (RoPE's values do not change timing), no learnable positions) at 1280x704 (160x88 latent, 80x44
  tokens a frame) with 24 and 47 latent frames (93 frames, its pipelines' length and LVSA's horizon for it, ours; and
  185 frames: 84,480 and 165,440 tokens), 512 text tokens of 1024 channels in its cross-attention, text-to-world as
  its pipeline passes it: a condition mask of zeros (17 input channels) and a timestep per latent frame ``[1, 1, F, 1,
  1]``, so its blocks modulate every token (files before 2026-12-03's twenty-fourth session's second Cosmos run passed
  one timestep ``[1]``, 16 fps and no condition mask); no padding-mask channel (resizing it needs torchvision; one
  input channel, timing-neutral); run with 4 of 28 blocks, scaled. Its pipelines default to 35-36 steps; the
  generations here are 50 steps, as every row's.
  On fewer layers than the model has, PASA and Radial Attention run every layer sparse and their dense first layers
  are composed in (:func:`with_dense_layers`).

Modes compare like with like: ``eager`` (diffusers' own attention, cuDNN SDPA, against
sparsecore eagerly) and ``compiled`` (diffusers' regional compilation,
``compile_repeated_blocks(fullgraph=True)``, on both sides). Per method, each kind of step its
schedule has is timed (one transformer forward; the median of three after a warm-up that compiles
kernels, once for the kinds a generation runs once: AdaSpa's dense+lse, search and cached search; the
files before 2026-12-02's sixteenth session took one forward for the dense baseline and for most of
AdaSpa's and PASA's kinds, and the median of two for LVSA's and PASA's sparse steps): dense (for a
method, its own dense step with sparsecore applied: the model's attention through sparsecore's op, on
HunyuanVideo 1.5 without diffusers' ``[B, 1, S, S]`` padding mask; files before 2026-12-01's fourth
session composed the dense row's step instead); LVSA's sparse step; AdaSpa's dense step
that keeps its LSE (step 9), first search (an LSE-cached search on it, sparse), reuse steps (the first one
reported too), cached search; PASA's sparse step. A 50-step generation's time is then composed from the schedule:
AdaSpa = 9 dense + 1 dense+lse + 1 search + 1 cached search + 38 reuse; PASA = 10 dense + 40 sparse (layer 0 dense
in each); LVSA = 50 of its steps; Radial Attention (``radial``, with its released Wan 2.1 script's settings,
:data:`METHOD_PARAMS`: decay 0.2, dense steps 12, dense layer 1) = 12 dense + 38 sparse; Sliding Tile Attention
(``sta``: one 3 x 3 x 3 window of 6 x 8 x 8 tiles, FastVideo's Wan search's 12 dense steps) = 12 dense + 38 sparse;
``sta-file`` runs the windows of ``--sta-strategy`` (FastVideo's HunyuanVideo file: full windows at steps 0-14, so
15 dense + 35 sparse, the sparse steps' median over steps 16, 32 and 48, whose windows differ).
``pasa-drop`` is PASA with ``approximation="drop"`` (no first-order term for
unkept blocks); ``adaspa-fused-first`` is AdaSpa with the paper's ``first_search="fused"`` (step 10's output is dense,
its masses from that pass: 10 dense + search + cached search + 38 reuse; the default before 2026-12-01's second
session, whose files call today's default ``adaspa-cached-first``). ``adaspa-device`` is AdaSpa with
``store="device"`` (searched masks and LSEs wait on the GPU between steps; the default ``"host"`` keeps them
in pinned host memory and copies a layer's mask per call). ``dense-sparsecore`` runs every step dense through
sparsecore (``apply(..., dense_attention="auto")``: FlashAttention-4's dense forward where it was measured
faster than cuDNN, on an H200; since 2026-12-01's sixth session the methods' dense steps run it too, and
``--dense-attention model`` keeps them on the model's own attention): the table's last column compares every
generation with that row, the fastest dense generation measured, as well as with diffusers' own.
Results from before 2026-12-01 ran AdaSpa with its masks on the GPU (the default then), and the
``_6x_store`` / ``_lengths_store`` files name the host-memory rows ``adaspa-host``.
Steps are timed with the handle's timing off: timing synchronizes the device before each
layer's plan, which a dense step does not pay. Host planning per layer (``plan_ms`` of the
handle's stats, median over layers) comes from one more forward with timing on, a step of the
kind that repeats (:data:`PLAN_PROBE`: LVSA's step, AdaSpa's reuse, PASA's sparse step). Peak
memory per row (``max_memory_allocated``): dense over its second step (the first compiles the
blocks in compiled mode), a method over all its steps from ``apply()`` on; next to it, in MiB, the
peak above dense's and the memory allocated after the row's steps above dense's (what the method,
or a row before it, still holds between steps). ``--tiny`` runs the
same code on tiny configs on any device.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch

from e2e_models import (COGVIDEOX_TEXT, COSMOS_TEXT, HV15_PROMPT, HV15_T2V_SLOTS, HV_TEXT, KANDINSKY5_TEXT, LTX2_TEXT,
                        LTX_TEXT, MOCHI_TEXT, MODELS, TEXT_TOKENS, Case, attention_shape, build_model, cases,
                        model_inputs, timestep_inputs, token_grid, video_tokens)
from report import time_one_backend, versions, write_report

import sparsecore
from sparsecore import VideoGeometry
from sparsecore.integrations import diffusers as sc_diffusers
from sparsecore.methods import sta
from sparsecore.methods.pasa import PASAParams
from sparsecore.timing import synchronize


NUM_STEPS = 50
SCHEDULES = {   # method -> (kind of step, how many of the 50)
    "dense": [("dense", 50)],
    "lvsa": [("sparse", 50)],
    "adaspa": [("dense", 9), ("dense+lse", 1), ("search", 1), ("cached search", 1), ("reuse", 38)],
    "adaspa-fused-first": [("dense", 10), ("search", 1), ("cached search", 1), ("reuse", 38)],
    "pasa": [("dense", 10), ("sparse", 40)],
    "radial": [("dense", 12), ("sparse", 38)],
    "sta": [("dense", 12), ("sparse", 38)],
    "sta-file": [("dense", 15), ("sparse", 35)],
    "dense-sparsecore": [("dense", 50)],
}
METHOD_PARAMS = {   # method -> parameters its rows run with: Radial Attention's released Wan 2.1 script (1x length)
    "radial": {"dense_steps": 12, "dense_layers": 1, "decay_factor": 0.2},
    "sta": {"dense_steps": 12, "window": (3, 3, 3)},              # FastVideo's Wan search: 12 dense steps
}
VARIANTS = {    # row name -> (method, parameters)
    "pasa-drop": ("pasa", {"approximation": "drop"}),          # without its approximation of unkept blocks
    "adaspa-device": ("adaspa", {"store": "device"}),          # searched masks wait on the GPU
    "adaspa-fused-first": ("adaspa", {"first_search": "fused"}),     # the paper's first search: step 10 dense
    "sta-file": ("sta", {"dense_steps": 0}),         # windows from --sta-strategy (FastVideo's Hunyuan file)
}
WARM_UP = "warm-up"      # a forward that compiles a kind's kernels, not timed into it
STEPS = {       # method -> (kind, step index) forwards, in order (step 0, untimed, compiles the dense path)
    "lvsa": [(WARM_UP, 20), ("sparse", 21), ("sparse", 22), ("sparse", 23)],
    "adaspa": [("dense", 1), ("dense", 2), ("dense", 3), ("dense+lse", 9), ("search", 10), ("first reuse", 11),
               ("reuse", 12), ("reuse", 13), ("reuse", 14), ("cached search", 30)],
    "pasa": [("dense", 1), ("dense", 2), ("dense", 3), (WARM_UP, 10), ("sparse", 11), ("sparse", 12),
             ("sparse", 13)],
    "radial": [("dense", 1), ("dense", 2), ("dense", 3), (WARM_UP, 12), ("sparse", 13), ("sparse", 14),
               ("sparse", 15)],
    "sta": [("dense", 1), ("dense", 2), ("dense", 3), (WARM_UP, 12), ("sparse", 13), ("sparse", 14), ("sparse", 15)],
    "sta-file": [("dense", 1), ("dense", 2), ("dense", 3), (WARM_UP, 15), ("sparse", 16), ("sparse", 32),
                 ("sparse", 48)],                    # the file's windows differ per step: three steps apart
    "dense-sparsecore": [("dense", 1), ("dense", 2), ("dense", 3)],     # every step dense, through sparsecore
    "adaspa-fused-first": [("dense", 1), ("dense", 2), ("dense", 3), ("search", 10), ("first reuse", 11),
                           ("reuse", 12), ("reuse", 13), ("reuse", 14), ("cached search", 30)],
}
DENSE_REPEATS = 3           # the dense baseline's timed forwards, after one that compiles
# a further step of the kind that repeats, run with timing on
PLAN_PROBE = {"lvsa": 24, "adaspa": 31, "pasa": 14, "radial": 16, "sta": 16, "dense-sparsecore": 4}
ROWS = list(dict.fromkeys([*STEPS, *VARIANTS]))


def full_attention(geometry: VideoGeometry, num_heads: int, step: int, layer: int) -> sparsecore.BlockMask:
    """The ``dense-sparsecore`` row's method: every pair kept, so every step takes the dense path, which runs
    sparsecore's dense kernel where one was measured faster than cuDNN (``apply(..., dense_attention="auto")``)."""
    return sparsecore.BlockMask.full(num_heads, geometry.tokens, geometry.tokens, geometry.tokens, geometry.tokens)


def timed_forward(model, inputs: dict, timestep: float, device: str) -> float:
    synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        model(**timestep_inputs(model, timestep, device, inputs), **inputs)
    synchronize(device)
    return time.perf_counter() - start


def peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def allocated_mib(device: str) -> float | None:
    """Device memory allocated now (after a row's steps: what it holds between steps)."""
    return torch.cuda.memory_allocated() / 2**20 if device == "cuda" else None


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def by_kind(seconds: list[tuple[str, float]]) -> dict[str, list[float]]:
    """The timed forwards of each kind of step (warm-ups left out)."""
    kinds: dict[str, list[float]] = {}
    for kind, s in seconds:
        if kind != WARM_UP:
            kinds.setdefault(kind, []).append(s)
    return kinds


def generation(method: str, times: dict[str, float]) -> float:
    schedule = SCHEDULES.get(method) or SCHEDULES[VARIANTS.get(method, (method,))[0]]
    return sum(count * times[kind] for kind, count in schedule)


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


def run_mode(case: Case, model, inputs: dict, mode: str, device: str, log, methods: list[str],
             kernel_args: dict) -> list[dict]:
    rows, scale = [], case.layers_full / case.layers_run
    warm_kernels(model, inputs, device, model.dtype, backend=kernel_args["backend"],
                 options=kernel_args["backend_options"])
    base = dict(model=case.model, length=case.label, latent_frames=case.frames, mode=mode,
                layers_run=case.layers_run, layers_full=case.layers_full)
    try:
        dense = [timed_forward(model, inputs, 999.0, device)]
        reset_peak(device)                              # the peak of a step, not of compiling the blocks
        dense += [timed_forward(model, inputs, 999.0, device) for _ in range(DENSE_REPEATS)]
    except torch.OutOfMemoryError as err:              # the model's own attention does not fit; sparsecore's may
        rows.append(dict(base, method="dense", error=f"out of memory: {str(err)[:300]}"))
        log(f"  {case.model} {case.label} {mode:8s} dense       out of memory")
        dense, dense_time = None, None
        torch.cuda.empty_cache()
    if dense is not None:
        dense_time = statistics.median(dense[1:]) * scale
        rows.append(dict(base, method="dense", steps={"dense": dense_time}, samples={"dense": DENSE_REPEATS},
                         generation_s=generation("dense", {"dense": dense_time}), peak_gib=peak_gib(device),
                         allocated_mib=allocated_mib(device), first_step_s=dense[0] * scale))
        log(f"  {case.model} {case.label} {mode:8s} dense       step {dense_time:8.3f} s "
            f"(first {dense[0] * scale:.1f} s)")
    for method in methods:
        if method == "dense-sparsecore" and kernel_args["dense_attention"] == "model":
            log("  dense-sparsecore skipped: with --dense-attention model it would time the model's own attention")
            continue
        name, params = VARIANTS.get(method, (method, {}))
        params = {**METHOD_PARAMS.get(name, {}), **params}
        plan = STEPS.get(method) or STEPS[name]
        dense_layers = 0
        if name == "pasa" and case.layers_run < case.layers_full:    # see :func:`with_dense_layers`
            dense_layers, params = len(PASAParams().dense_layers), {**params, "dense_layers": ()}
        if name == "radial" and case.layers_run < case.layers_full:
            dense_layers, params = params["dense_layers"], {**params, "dense_layers": 0}
        handle = sc_diffusers.apply(model, method=full_attention if name == "dense-sparsecore" else name,
                                    device=device, num_steps=NUM_STEPS, **kernel_args, **params)
        reset_peak(device)
        try:
            row = run_method(case, model, inputs, mode, method, plan, handle, dense_time, scale, base, device, log)
            rows.append(with_dense_layers(row, dense_layers, row.get("steps", {}).get("dense", dense_time),
                                          case.layers_full))
        except (RuntimeError, ValueError) as err:            # a failing method is reported; the others still run
            rows.append(dict(base, method=method, error=f"{type(err).__name__}: {err}"))
            log(f"  !!! {case.model} {case.label} {mode} {method} FAILED: {type(err).__name__}: {str(err)[:400]}")
        finally:
            handle.remove()
    return rows


def with_dense_layers(row: dict, dense_layers: int, dense_time: float, layers_full: int) -> dict:
    """``row`` with ``dense_layers`` of the full depth's layers dense in its non-dense steps.

    A run on fewer layers than the model has (HunyuanVideo 1.5, Wan 14B) scales its step by the depth; PASA's (or
    Radial Attention's) dense first layer would then count as 1 of 6 (or 1 of 2) layers instead of 1 of 54 (or 40).
    Such runs time the method with every layer sparse and swap ``dense_layers`` layers' shares for dense ones here,
    taking every layer (and its share of the rest of the model) as equal: ``t + n (dense - t) / layers``."""
    if not dense_layers or "error" in row:
        return row
    steps = {kind: t if kind == "dense" else t + dense_layers * (dense_time - t) / layers_full
             for kind, t in row["steps"].items()}
    return dict(row, steps=steps, generation_s=generation(row["method"], steps),
                dense_layers_composed=dense_layers)


def run_method(case: Case, model, inputs: dict, mode: str, method: str, plan: list, handle, dense_time: float,
               scale: float, base: dict, device: str, log) -> dict:
    """One method's row: its kinds of step timed, the generation composed, planning and memory.

    An untimed forward at step 0 first (a dense step of AdaSpa and PASA) compiles the blocks with sparsecore's
    processors in the compiled mode, as a generation's first step would: a step measured once (AdaSpa's search)
    must not include it."""
    handle.set_step(0)
    first_step = timed_forward(model, inputs, 1000.0, device) * scale
    if any(kind.endswith("search") for kind, _ in plan):     # the joint lengths are known now: each sample's valid
        for text, padding in sorted({(s["text_tokens"], s["padding"]) for s in handle.stats()} - {(0, 0)}):  # text
            warm_kernels(model, inputs, device, model.dtype, text, handle.backend, handle.backend_options, padding)
    seconds = []
    for kind, step in plan:
        handle.set_step(step)
        seconds.append((kind, timed_forward(model, inputs, 1000.0 - 19 * step, device) * scale))
    samples = by_kind(seconds)
    times = {kind: statistics.median(values) for kind, values in samples.items()}
    dense_measured = "dense" in times
    times.setdefault("dense", dense_time)
    handle.timing(True)                                 # the plan's host time, on an untimed step
    handle.set_step(PLAN_PROBE[VARIANTS.get(method, (method,))[0]])
    timed_forward(model, inputs, 500.0, device)
    handle.timing(False)
    stats = handle.stats()
    planned = [s for s in stats if s.get("plan_ms") is not None]
    sparse = [s for s in stats if s["backend"] != "dense"]
    plan_ms = [s["plan_ms"] for s in planned if s["backend"] != "dense"]
    row = dict(base, method=method, steps=times, samples={kind: len(v) for kind, v in samples.items()},
               generation_s=generation(method, times), peak_gib=peak_gib(device),
               allocated_mib=allocated_mib(device),
               density=statistics.mean(s["density"] for s in sparse) if sparse else 1.0,
               backends=sorted({s["backend"] if s["backend"] != "dense" else f"dense ({s.get('dense_kernel')})"
                                for s in stats}),
               plan_ms_median=statistics.median(plan_ms) if plan_ms else None,
               plan_ms_by_action={action: statistics.median(s["plan_ms"] for s in planned if s["action"] == action)
                                  for action in {s["action"] for s in planned}},
               first_step_s=first_step, dense_measured=dense_measured)
    log(f"  {case.model} {case.label} {mode:8s} {method:10s} "
        + ", ".join(f"{k} {t:.3f} s" for k, t in times.items() if k != "dense" or dense_measured)
        + f"; generation {row['generation_s']:.1f} s vs dense "
        + (f"{generation('dense', {'dense': dense_time}):.1f} s" if dense_time is not None else "(out of memory)")
        + f"; plan/layer {row['plan_ms_median']}")
    return row


def run_case(case: Case, modes: list[str], tiny: bool, device: str, log, methods: list[str],
             kernel_args: dict, prompt_tokens: int | None = None, negative_tokens: int | None = None) -> list[dict]:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rows = []
    for mode in modes:
        model = build_model(case, tiny, device, dtype)
        inputs = model_inputs(model, case, device, dtype, prompt_tokens, negative_tokens)
        if mode == "compiled" and model._repeated_blocks:
            model.compile_repeated_blocks(fullgraph=True)
        elif mode == "compiled":                  # CogVideoX, Mochi: no repeated blocks declared; each, as that would
            for block in model.transformer_blocks:
                block.compile(fullgraph=True)
        try:
            rows += run_mode(case, model, inputs, mode, device, log, methods, kernel_args)
        except torch.OutOfMemoryError as err:
            rows.append(dict(model=case.model, length=case.label, mode=mode, method="(all)",
                             error=f"out of memory: {err}"))
            log(f"  {case.model} {case.label} {mode}: out of memory")
        del model
        torch._dynamo.reset()
        gc.collect()                                    # compiled code and handles hold the model in cycles
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def schedules_text(rows: list[dict]) -> str:
    """The schedules of the methods in ``rows``, e.g. ``pasa 10 dense + 40 sparse``."""
    names = dict.fromkeys(r["method"] for r in rows if r.get("method") not in (None, "dense"))
    return "; ".join(f"{name} " + " + ".join(f"{count} {kind}" for kind, count in
                                             SCHEDULES.get(name) or SCHEDULES[VARIANTS[name][0]]) for name in names)


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# End-to-end: transformer steps and 50-step generations, dense vs sparsecore, {meta['date']}", "",
             f"Machine: {meta['gpu']}; torch {meta['torch']}, diffusers {meta['diffusers']}, triton {meta['triton']}, "
             f"flash-attn-4 {meta['flash_attn_4']}. bf16, batch {1 if meta.get('negative_tokens') is None else 2}, "
             f"random weights, {TEXT_TOKENS} text tokens "
             f"({COGVIDEOX_TEXT} for CogVideoX, {HV_TEXT} for HunyuanVideo 1.0, {MOCHI_TEXT} for Mochi, {LTX_TEXT} for "
             f"LTX-Video, {LTX2_TEXT} for LTX-2 and its audio, {KANDINSKY5_TEXT} for Kandinsky 5, {COSMOS_TEXT} for "
             f"Cosmos; HunyuanVideo 1.5: {TEXT_TOKENS} Qwen2.5-VL, 64 ByT5 and 729 image tokens, all valid, and "
             f"`hv15-t2v` {sum(HV15_T2V_SLOTS):,} slots as its pipeline pads a t2v prompt of {HV15_PROMPT} tokens"
             + (f"; HunyuanVideo 1.0's and Mochi's slots hold a prompt of {meta['prompt_tokens']} tokens, the rest "
                "padding" if meta.get("prompt_tokens") else "")
             + (f"; Mochi runs classifier-free guidance's batch of two, its negative prompt {meta['negative_tokens']} "
                "valid tokens" if meta.get("negative_tokens") is not None else "") + "). "
             "Step = one transformer forward (the median of three after a warm-up; AdaSpa's dense+lse, search and "
             "cached search, run once a generation, timed once: the counts are in the JSON's `samples`); rows "
             "measured on fewer layers are scaled to the full depth. eager: diffusers' SDPA (cuDNN) vs sparsecore "
             "eagerly; compiled: "
             "`compile_repeated_blocks(fullgraph=True)` (CogVideoX, Mochi: each block's `compile(fullgraph=True)`) on "
             "both sides. Generation = the 50-step schedule composed from "
             f"the measured steps ({schedules_text(rows)}). Speedups against the dense row of the same model, length "
             "and mode." + (f" Every method on backend `{meta['backend']}` with options {meta['backend_options']}."
                            if meta.get("backend") else "")
             + (f" The methods' dense steps: `dense_attention={meta['dense_attention']!r}`."
                if "dense_attention" in meta else "")
             + (" skyreels-df: causal blocks of 5 latent frames; its dense row is the model's own attention, SDPA "
                "under the `[1, 1, L, L]` boolean mask its forward builds (not cuDNN's kernel); every sparsecore row "
                "runs only blocks a frame may see, its dense steps every such block; "
                + ("densities are fractions of the visible pairs (0.52 of L^2 at 5x)."
                   if meta.get("density") == "visible pairs" else "densities count all L^2 pairs (the visible ones: "
                   "0.55 at 2x, 0.52 at 5x).") if any(r.get("model") == "skyreels-df" for r in rows) else ""), "",
             "| model | length | mode | method | step kinds (s) | step speedup | generation (s) | generation speedup "
             "| density | plan ms/layer | peak GiB | peak, held vs dense (MiB) | kernels "
             "| generation vs dense-sparsecore |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    dense = {(r["model"], r["length"], r["mode"]): r for r in rows if r.get("method") == "dense" and "error" not in r}
    fast = {(r["model"], r["length"], r["mode"]): r for r in rows
            if r.get("method") == "dense-sparsecore" and "error" not in r}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['length']} | {r['mode']} | {r['method']} | {r['error'][:60]} |"
                         + " |" * 9)
            continue
        d = dense.get((r["model"], r["length"], r["mode"]))
        main = r["steps"].get("sparse", r["steps"].get("reuse", r["steps"]["dense"]))
        step_speedup = f"{d['steps']['dense'] / main:.2f}x" if d else ""
        gen_speedup = f"{d['generation_s'] / r['generation_s']:.2f}x" if d else ""
        f = fast.get((r["model"], r["length"], r["mode"]))
        vs_fast = f"{f['generation_s'] / r['generation_s']:.2f}x" if f else ""
        kinds = ", ".join(f"{k} {t:.3f}" for k, t in r["steps"].items()
                          if k != "dense" or r["method"] == "dense" or r.get("dense_measured"))
        plan = "" if r.get("plan_ms_median") is None else f"{r['plan_ms_median']:.1f}"
        peak = "" if r.get("peak_gib") is None else f"{r['peak_gib']:.4f}"
        above = ""
        if d and r.get("peak_gib") is not None and r.get("allocated_mib") is not None:
            above = (f"{(r['peak_gib'] - d['peak_gib']) * 1024:+.2f}, "
                     f"{r['allocated_mib'] - d['allocated_mib']:+.2f}")
        density = "" if r.get("density") is None else f"{r['density']:.3f}"
        lines.append(f"| {r['model']} | {r['length']} | {r['mode']} | {r['method']} | {kinds} | {step_speedup} | "
                     f"{r['generation_s']:.1f} | {gen_speedup} | {density} | {plan} | {peak} | {above} | "
                     f"{', '.join(r.get('backends', []))} | {vs_fast} |")
    return "\n".join(lines) + "\n"


def environment(device: str) -> dict:
    return {"date": datetime.date.today().isoformat(), **versions(device)}


def main() -> int:
    time_one_backend()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--models", nargs="*", default=["wan-1.3b"], choices=MODELS)
    parser.add_argument("--lengths", nargs="*", default=None, help="only these lengths, e.g. 1x 6x")
    parser.add_argument("--modes", nargs="*", default=["eager", "compiled"], choices=["eager", "compiled"])
    parser.add_argument("--methods", nargs="*", default=[m for m in STEPS if m not in VARIANTS], choices=ROWS,
                        help="sparse methods next to dense (pasa-drop: PASA without its approximation)")
    parser.add_argument("--tiny", action="store_true", help="tiny configs: a smoke test on any device")
    parser.add_argument("--budget-s", type=float, default=540, help="skip remaining cases after this many seconds")
    parser.add_argument("--backend", default=None, help="one sparsecore backend for every method (default: each "
                        "mask's preferred one)")
    parser.add_argument("--backend-option", action="append", default=[], metavar="NAME=INT",
                        help="an option of --backend, e.g. key_parts=4 for fa4 (repeatable)")
    parser.add_argument("--dense-attention", default="auto", choices=["auto", "model"],
                        help="what the methods' dense steps run (apply's dense_attention)")
    parser.add_argument("--sta-strategy", type=Path, default=None,
                        help="FastVideo's mask strategy json for the sta-file rows (its Hunyuan file: 15 dense steps)")
    parser.add_argument("--prompt-tokens", type=int, default=None,
                        help="HunyuanVideo 1.0's and Mochi's 256 text slots hold a prompt of this many tokens, the "
                        "rest padding (default: all valid)")
    parser.add_argument("--negative-tokens", type=int, default=None,
                        help="Mochi runs its pipeline's classifier-free guidance batch (2 samples), the negative "
                        "prompt holding this many valid tokens (0: an empty prompt zeroed; default: batch 1)")
    parser.add_argument("--tag", default="",
                        help="added to the output file names (a tag that begins with '-': --tag=-x)")
    args = parser.parse_args()
    options = {}
    for item in args.backend_option:
        name, _, value = item.partition("=")
        if not re.fullmatch(r"[A-Za-z_]\w*", name) or not re.fullmatch(r"-?\d+", value):
            parser.error(f"--backend-option: expected NAME=INT, got {item!r}")
        options[name] = int(value)
    if options and args.backend is None:
        parser.error("--backend-option: name the backend they belong to (--backend fa4)")
    kernel_args = {"backend": args.backend, "backend_options": options or None,
                   "dense_attention": args.dense_attention}
    if ("sta-file" in args.methods) != (args.sta_strategy is not None):
        parser.error("--methods sta-file and --sta-strategy FILE go together (its schedule is FastVideo's Hunyuan "
                     "file's: 15 dense steps)")
    if "sta-file" in args.methods:
        VARIANTS["sta-file"][1]["mask_strategy"] = sta.read_strategy(args.sta_strategy)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    log = lambda s: print(s, flush=True)  # noqa: E731
    if args.prompt_tokens is not None and not 1 <= args.prompt_tokens < min(HV_TEXT, MOCHI_TEXT):
        parser.error(f"--prompt-tokens: expected 1..{min(HV_TEXT, MOCHI_TEXT) - 1} (fewer than the text slots), got "
                     f"{args.prompt_tokens}")
    if args.prompt_tokens is not None and not {"hv", "mochi"} & set(args.models):
        parser.error("--prompt-tokens: only the hv and mochi cases take it (hv15-t2v pads its own prompt); add one "
                     "of them to --models")
    if args.negative_tokens is not None and not 0 <= args.negative_tokens < MOCHI_TEXT:
        parser.error(f"--negative-tokens: expected 0..{MOCHI_TEXT - 1} (fewer than Mochi's text slots), got "
                     f"{args.negative_tokens}")
    if args.negative_tokens is not None and set(args.models) != {"mochi"}:
        parser.error("--negative-tokens: only the mochi case runs a guidance batch; pass --models mochi alone")
    meta = environment(device) | {"backend": args.backend, "backend_options": options,
                               "prompt_tokens": args.prompt_tokens, "negative_tokens": args.negative_tokens,
                               "dense_attention": args.dense_attention,
                               "density": "visible pairs"}            # handle.stats()' density since 2026-12-03
    log(json.dumps(meta))
    start, rows = time.perf_counter(), []
    stem = args.out / (("e2e-tiny" if args.tiny else f"e2e-{meta['date']}") + args.tag)
    chosen = [c for c in cases(args.models, args.tiny) if not args.lengths or c.label in args.lengths]
    if args.lengths:                                          # in the order asked for: the most wanted first
        chosen.sort(key=lambda c: args.lengths.index(c.label))
    for case in chosen:
        if time.perf_counter() - start > args.budget_s:
            log(f"  skipped {case.model} {case.label}: time budget of {args.budget_s:.0f} s spent")
            continue
        log(f"{case.model} {case.label}: {case.frames} latent frames, {case.layers_run} layers")
        rows += run_case(case, args.modes, args.tiny, device, log, args.methods, kernel_args, args.prompt_tokens,
                         args.negative_tokens)
        write_report(stem, meta, rows, markdown(rows, meta))
    print(markdown(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
