"""Runs one case of the end-to-end benchmark (``bench/e2e_benchmark.py``): for each mode it builds the model
(compiled in the ``compiled`` mode), times dense, then applies each method in turn and measures its row (its kinds of
step timed, its generation composed, its planning, density and memory); where fewer layers ran than the model has,
the methods' dense first layers are composed in (:func:`with_dense_layers`)."""

from __future__ import annotations

import gc
import statistics

import torch

from e2e_models import Case, build_model, model_inputs
from e2e_schedules import (DENSE_REPEATS, METHOD_PARAMS, NUM_STEPS, PLAN_PROBE, STEPS, TINY_PARAMS, VARIANTS, by_kind,
                           full_attention, generation)
from e2e_timing import allocated_mib, peak_gib, reset_peak, timed_forward, warm_batch_lengths, warm_kernels

from sparsecore.integrations import diffusers as sc_diffusers
from sparsecore.methods.pasa import PASAParams


def run_case(case: Case, modes: list[str], tiny: bool, device: str, log, methods: list[str],
             kernel_args: dict, prompt_tokens: int | None = None, negative_tokens: int | None = None) -> list[dict]:
    """The rows of ``case`` in each of ``modes``: a fresh model a mode (bf16 on CUDA, float32 elsewhere; compiled
    in the ``compiled`` mode), freed with its compiled code before the next. A mode that runs out of memory outside
    a method gives one error row. ``prompt_tokens``, ``negative_tokens``: as ``--prompt-tokens``,
    ``--negative-tokens``; ``kernel_args``: ``apply``'s backend, its options and ``dense_attention``."""
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
            rows += run_mode(case, model, inputs, mode, device, log, methods, kernel_args, tiny)
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


def run_mode(case: Case, model, inputs: dict, mode: str, device: str, log, methods: list[str],
             kernel_args: dict, tiny: bool) -> list[dict]:
    """The rows of one mode on a built model: after :func:`~e2e_timing.warm_kernels`, the dense row (the model's own
    attention; its first forward, which compiles, left out of the median), then each of ``methods`` applied (with
    :data:`~e2e_schedules.TINY_PARAMS` on ``tiny`` configs), measured (:func:`run_method`) and removed. Steps are
    scaled by the depth (``layers_full / layers_run``). Where dense runs out of memory or a method fails, that row
    says so and the other methods still run."""
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
        params = {**METHOD_PARAMS.get(name, {}), **(TINY_PARAMS.get(name, {}) if tiny else {}), **params}
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


def run_method(case: Case, model, inputs: dict, mode: str, method: str, plan: list, handle, dense_time: float,
               scale: float, base: dict, device: str, log) -> dict:
    """One method's row: its kinds of step timed, the generation composed, planning and memory.

    An untimed forward at step 0 first (a dense step of AdaSpa and PASA) compiles the blocks with sparsecore's
    processors in the compiled mode, as a generation's first step would: a step measured once (AdaSpa's search)
    must not include it."""
    handle.set_step(0)
    first_step = timed_forward(model, inputs, 1000.0, device) * scale
    if any(kind.endswith("search") for kind, _ in plan):     # the joint lengths are known now
        warm_batch_lengths(model, inputs, device, handle)
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
