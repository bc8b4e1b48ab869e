"""The end-to-end benchmark's report (``bench/e2e_benchmark.py``): the run's environment (date and versions) and
the markdown table of its rows, each row's steps and 50-step generation against the dense rows of its model, length
and mode (diffusers' own attention and ``dense-sparsecore``), with what every row was measured under."""

from __future__ import annotations

import datetime

from e2e_models import (COGVIDEOX_TEXT, COSMOS_TEXT, HV15_PROMPT, HV15_T2V_SLOTS, HV_TEXT, KANDINSKY5_TEXT, LTX2_TEXT,
                        LTX_TEXT, MOCHI_TEXT, TEXT_TOKENS)
from e2e_schedules import SCHEDULES, VARIANTS
from report import versions


def environment(device: str) -> dict:
    """What a run's results depend on: today's date and :func:`report.versions` of ``device``."""
    return {"date": datetime.date.today().isoformat(), **versions(device)}


def markdown(rows: list[dict], meta: dict) -> str:
    """The results file's text: a header saying what was measured and how (from ``meta``, the run's environment and
    options), then a table line per row; an error row names its error and leaves the other columns empty."""
    batch = "batch 1" + (" (Mochi's: 2)" if meta.get("negative_tokens") is not None else "")
    lines = [f"# End-to-end: transformer steps and 50-step generations, dense vs sparsecore, {meta['date']}", "",
             f"Machine: {meta['gpu']}; torch {meta['torch']}, diffusers {meta['diffusers']}, triton {meta['triton']}, "
             f"flash-attn-4 {meta['flash_attn_4']}. bf16, {batch}, random weights, {TEXT_TOKENS} text tokens "
             f"({COGVIDEOX_TEXT} for CogVideoX, {HV_TEXT} for HunyuanVideo 1.0, {MOCHI_TEXT} for Mochi, {LTX_TEXT} for "
             f"LTX-Video, {LTX2_TEXT} for LTX-2 and its audio, {KANDINSKY5_TEXT} for Kandinsky 5, {COSMOS_TEXT} for "
             f"Cosmos; HunyuanVideo 1.5: {TEXT_TOKENS} Qwen2.5-VL, 64 ByT5 and 729 image tokens, all valid, and "
             f"`hv15-t2v` {sum(HV15_T2V_SLOTS):,} slots as its pipeline pads a t2v prompt of {HV15_PROMPT} tokens"
             + (f"; HunyuanVideo 1.0's and Mochi's slots hold a prompt of {meta['prompt_tokens']} tokens, the rest "
                "padding" if meta.get("prompt_tokens") else "")
             + (f"; Mochi runs classifier-free guidance's batch of two, its negative prompt {meta['negative_tokens']} "
                "valid tokens (0: an empty one its pipeline zeroes)" if meta.get("negative_tokens") is not None
                else "") + "). "
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


def schedules_text(rows: list[dict]) -> str:
    """The schedules of the methods in ``rows``, e.g. ``pasa 10 dense + 40 sparse``."""
    names = dict.fromkeys(r["method"] for r in rows if r.get("method") != "dense"      # nor "(all)": a mode that ran
                          and (r.get("method") in SCHEDULES or r.get("method") in VARIANTS))  # out of memory outside one
    return "; ".join(f"{name} " + " + ".join(f"{count} {kind}" for kind, count in
                                             SCHEDULES.get(name) or SCHEDULES[VARIANTS[name][0]]) for name in names)
