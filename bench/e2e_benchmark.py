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
  are composed in (:func:`e2e_runner.with_dense_layers`).

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
:data:`e2e_schedules.METHOD_PARAMS`: decay 0.2, dense steps 12, dense layer 1) = 12 dense + 38 sparse; Sliding Tile
Attention (``sta``: one 3 x 3 x 3 window of 6 x 8 x 8 tiles, FastVideo's Wan search's 12 dense steps) = 12 dense
+ 38 sparse; ``sta-file`` runs the windows of ``--sta-strategy`` (FastVideo's HunyuanVideo file: full windows at
steps 0-14, so 15 dense + 35 sparse, the sparse steps' median over steps 16, 32 and 48, whose windows differ).
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
kind that repeats (:data:`e2e_schedules.PLAN_PROBE`: LVSA's step, AdaSpa's reuse, PASA's sparse step). Peak
memory per row (``max_memory_allocated``): dense over its second step (the first compiles the
blocks in compiled mode), a method over all its steps from ``apply()`` on; next to it, in MiB, the
peak above dense's and the memory allocated after the row's steps above dense's (what the method,
or a row before it, still holds between steps). ``--tiny`` runs the
same code on tiny configs on any device.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

from e2e_models import MODELS, cases, prompt_options_error
from e2e_report import environment, markdown
from e2e_runner import run_case
from e2e_schedules import ROWS, STEPS, VARIANTS
from report import time_one_backend, write_report

from sparsecore.methods import sta


def main() -> int:
    """Parse the options, run each chosen case within the time budget, and rewrite the results files after each."""
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
                        "prompt holding this many valid tokens (0: an empty prompt that its pipeline zeroes, with "
                        "force_zeros_for_empty_prompt; default: batch 1)")
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
    error = prompt_options_error(args.prompt_tokens, args.negative_tokens, args.models)
    if error:
        parser.error(error)
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
