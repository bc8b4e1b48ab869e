"""Where a first call's seconds go (issue 13: a new mask shape's first call within 5 s on a fresh machine).

Each case runs in its own Python process with empty compile caches (Triton's and the CuTe DSL's on-disk
caches in a fresh directory; FA4's own is off unless ``--fa4-disk-cache``), as on a fresh machine, then once
more in a new process with the caches the first left (a later process on the same machine). Python's
bytecode goes to one ``PYTHONPYCACHEPREFIX`` for the run, filled first by a process that only imports
(timed apart): pip compiles bytecode when it installs, so a first call on a fresh machine does not pay for
it (a wheel installed with ``--no-compile`` into a read-only place would, at every import). The child times its
imports, CUDA's start, ``sparsecore.compile(mask, device="cuda")``, the first call (synchronized), a
second call, a new mask of the same shape (compile and first call: it should compile nothing) and one of
a new length in the same process (FA4's and the guard's kernels do not specialize on lengths). In the
library's default warm-up mode (``--warmup background``, :mod:`sparsecore.warmup`) a first call whose preferred
backend (``fa4``) is slow to load runs on Triton while FA4 loads and compiles in a background thread: the child
then calls again until a call runs the preferred backend and records when that was (``ready_s``, from
``compile()``'s start) and what the calls meanwhile took; ``--warmup wait`` loads it in place. A
sampling thread reads the main thread's stack every few milliseconds during the first call; the report
lists, for the functions most often on that stack, the seconds they were (inclusive: a caller includes
its callees; each interval goes to the stack seen at its end), so the compiles (FA4's CuTe DSL, Triton's
kernels and the C launchers it builds with the host compiler) and sparsecore's own work (conversion,
planning) can be told apart. The sampler slows Python-bound work (it takes the GIL every millisecond or
two): ``--no-sample`` times the same calls without it.

    python bench/first_call_probe.py --out DIR [--cases lvsa random] [--no-sample] [--fa4-disk-cache]
                                     [--warmup background|wait] [--budget-s 500]

Cost: the import-only pass (11-20 s on the H200s of 2026-12-02..04), then two processes a case, each 25-45 s in
the background mode as measured there (imports 3-8 s, the first call 1-4 s, ``fa4`` ready 13-26 s after
``compile()``) plus the new length's warm-up it waits for (up to 60 s), and up to ``CHILD_TIMEOUT_S`` (300 s) if a
warm-up hangs: the four cases, 8 processes, take about 210-860 s and up to 2,400 s, more than one 600 s device call
holds. So the default runs two cases, ``lvsa random``, and ``--cases adaspa adaspa6x`` in a second call gives the
other two; both reports together are the whole table. ``--budget-s`` (default 500) bounds a run: each process gets
at most the seconds left (``CHILD_TIMEOUT_S`` at most), one with under ``MIN_CHILD_S`` left is not started but
recorded as not run, naming the ``--cases`` that would run it, and the report is written after every case, so a
call cut short keeps what it measured.

Writes ``first-call-<date>[_fa4-disk-cache][_unsampled][_wait].json`` and ``.md`` under DIR.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

from report import run_meta

ROOT = Path(__file__).resolve().parent.parent
CASES = {
    # name: (what it is, builder source run in the child)
    "lvsa": "LVSA frames at 6x (121 x 1560 tokens, 12 heads; fa4 with mask tiles)",
    "adaspa": "AdaSpa-shaped 64-token blocks with text, 12 heads, 32,760 + 512 tokens "
              "(default since 2026-12-04: fa4, joint-64; triton when this probe ran, 2026-12-02)",
    "random": "128-token random rows, S = 32,768, d = 0.1, 12 heads (fa4, full tiles only)",
    "adaspa6x": "AdaSpa-shaped 64-token blocks at 6x (188,736 tokens, 12 heads; fa4 at two CTAs per SM, 4 key ranges)",
}
DEFAULT_CASES = ["lvsa", "random"]             # a 600 s device call holds two cases: see the docstring
TOP = 60
CHILD_TIMEOUT_S = 300
MIN_CHILD_S = 30                # less left of the budget: the process is not started (a fresh one needs 10 s or more)
READY_WITHIN_S = 120          # calls while the preferred backend warms up, at most this long
HIDDEN = ("<frozen", "first_call_probe.py", "threading.py")   # frames on every stack or the import machinery
SAMPLE_S = 0.002


class StackSampler:
    """Adds, every ``SAMPLE_S`` or as soon as the GIL allows, the time since the last sample to each distinct
    ``file:function`` on thread ``ident``'s stack (time-weighted: a thread holding the GIL is sampled less often)."""

    def __init__(self, ident: int) -> None:
        self.ident, self.seconds_on_stack = ident, collections.Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        last, names = time.perf_counter(), {}          # names: label of each code object seen (made once)
        while not self._stop.is_set():
            frame = sys._current_frames().get(self.ident)
            now = time.perf_counter()
            labels = set()
            while frame is not None:
                code = frame.f_code
                if code not in names:
                    names[code] = f"{_short(code.co_filename)}:{code.co_name}"
                labels.add(names[code])
                frame = frame.f_back
            for label in labels:
                self.seconds_on_stack[label] += now - last
            last = now
            time.sleep(SAMPLE_S)

    def __enter__(self) -> "StackSampler":
        self._previous_interval = sys.getswitchinterval()
        sys.setswitchinterval(SAMPLE_S / 2)                  # the sampler gets the GIL back sooner
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        sys.setswitchinterval(self._previous_interval)

    def top(self, n: int) -> list[tuple[str, float]]:
        """The ``n`` labels longest on the stack, with their seconds there."""
        shown = [(label, s) for label, s in self.seconds_on_stack.most_common() if not label.startswith(HIDDEN)
                 and not any(f"/{hidden}" in label for hidden in HIDDEN)]
        return shown[:n]


def _short(path: str) -> str:
    """``.../site-packages/triton/runtime/build.py`` -> ``triton/runtime/build.py``."""
    parts = Path(path).parts
    for anchor in ("site-packages", "dist-packages", "site"):
        if anchor in parts:
            return "/".join(parts[len(parts) - parts[::-1].index(anchor):])
    for anchor in ("sparsecore", "backends", "ir", "bench"):
        if anchor in parts:
            return "/".join(parts[parts.index(anchor):])
    return Path(path).name


def build_mask(case: str, seed: int, shorter: bool = False):
    """The case's mask; ``seed`` 1: another mask of the same shape; ``shorter``: the same kind at about 5/6 of the
    length (a new shape whose kernels need no new compile: FA4's and the guard's do not specialize on lengths)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from cuda_cases import LVSA_FRAMES, lvsa_frames, random_rows
    from fa4_check_masks import adaspa_large, adaspa_like
    if case == "adaspa6x":
        return adaspa_large(12, 157248 if shorter else 188736, 64, (0.1, 0.2, 0.3), seed=seed)
    if case == "lvsa":
        return lvsa_frames(12, frames=101 if shorter else LVSA_FRAMES, anchor_every=9 + seed)
    if case == "adaspa":
        return adaspa_like(12, 27240 if shorter else 32760, 512, 64, (0.1, 0.2, 0.3), seed=seed)
    return random_rows(12, 27264 if shorter else 32768, 0.1, seed=seed)


def imports_only() -> None:
    """What the cases import, so that their bytecode is written once (``PYTHONPYCACHEPREFIX``)."""
    import torch._dynamo  # noqa: F401
    import triton  # noqa: F401
    import flash_attn.cute  # noqa: F401
    import sparsecore  # noqa: F401


def child(case: str, path: Path, sample: bool) -> None:
    started = time.perf_counter()
    import torch
    import sparsecore
    record = {"case": case, "what": CASES[case], "imports_s": time.perf_counter() - started}
    start = time.perf_counter()
    torch.zeros(1, device="cuda")                  # CUDA starts here, before a mask builder may start it on the GPU
    torch.cuda.synchronize()
    record["cuda_start_s"] = time.perf_counter() - start
    first, second = build_mask(case, 0), build_mask(case, 1)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 12, first.q_len, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
               for _ in range(3))
    with StackSampler(threading.get_ident()) if sample else contextlib.nullcontext() as sampler:
        start = time.perf_counter()
        kernel = sparsecore.compile(first, device="cuda")
        record["compile_s"] = time.perf_counter() - start
        record["preferred"], record["warmup"] = kernel.backend.name, kernel.warmup
        kernel(q, k, v)
        torch.cuda.synchronize()
        record["first_call_s"] = time.perf_counter() - start
    record["backend"] = kernel.backend.name
    if sample:
        record["top"] = sampler.top(TOP)
    record.update(until_ready(kernel, record["preferred"], (q, k, v), start))
    start = time.perf_counter()
    kernel(q, k, v)
    torch.cuda.synchronize()
    record["second_call_s"] = time.perf_counter() - start
    start = time.perf_counter()
    again = sparsecore.compile(second, device="cuda")
    again(q, k, v)
    torch.cuda.synchronize()
    record["new_mask_first_call_s"] = time.perf_counter() - start
    record["new_mask_backend"] = again.backend.name
    shorter = build_mask(case, 0, shorter=True)
    q, k, v = (torch.randn(1, 12, shorter.q_len, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
               for _ in range(3))
    torch.cuda.synchronize()
    start = time.perf_counter()
    new_length = sparsecore.compile(shorter, device="cuda")
    new_length(q, k, v)
    torch.cuda.synchronize()
    record["new_length_first_call_s"] = time.perf_counter() - start
    record["new_length_backend"] = new_length.backend.name
    new_length.wait_for_warmups(timeout=60)            # the worker ends before the process does
    path.write_text(json.dumps(record, indent=1))


def until_ready(kernel, preferred: str, inputs: tuple, compiled_at: float) -> dict:
    """Call ``kernel`` until a call runs ``preferred`` (at most ``READY_WITHIN_S``): when that call ended, from
    ``compiled_at`` (``ready_s``), and the calls before it (on the fallback, while the warm-up ran)."""
    import torch
    meanwhile, ready_s = [], None
    while kernel.backend.name != preferred and time.perf_counter() - compiled_at < READY_WITHIN_S:
        start = time.perf_counter()
        kernel(*inputs)
        torch.cuda.synchronize()
        if kernel.backend.name == preferred:
            ready_s = time.perf_counter() - compiled_at
            return {"ready_s": ready_s, "ready_call_s": time.perf_counter() - start, **_calls(meanwhile)}
        meanwhile.append(1e3 * (time.perf_counter() - start))
    return {"ready_s": ready_s, **_calls(meanwhile)}


def _calls(ms: list[float]) -> dict:
    ordered = sorted(ms)
    return {"meanwhile_calls": len(ms), "meanwhile_median_ms": ordered[len(ms) // 2] if ms else None,
            "meanwhile_max_ms": ordered[-1] if ms else None}


def bytecode_pass(pycache: str) -> None:
    """A process that only imports what the cases import, writing their bytecode under ``pycache``."""
    subprocess.run([sys.executable, __file__, "--child", "imports"], check=True,
                   env=dict(os.environ, PYTHONPYCACHEPREFIX=pycache))


def run_child(case: str, result: Path, env: dict, sample: bool, timeout_s: float) -> dict:
    command = [sys.executable, __file__, "--child", case, "--json", str(result)] + ([] if sample else ["--no-sample"])
    try:
        run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"case": case, "error": f"no result within {timeout_s:.0f} s"}
    if run.returncode != 0 or not result.exists():
        return {"case": case, "error": (run.stderr or run.stdout)[-2000:]}
    return json.loads(result.read_text())


def run_children(cases: list[str], env_of: Callable[[str], dict], sample: bool, deadline: float,
                 save: Callable[[list[dict]], None]) -> list[dict]:
    """Both processes of every case (caches empty, then kept; ``env_of(scratch)``: their environment over a fresh
    scratch folder), each given the seconds left before ``deadline`` (``time.perf_counter()``), ``CHILD_TIMEOUT_S``
    at most; one with under ``MIN_CHILD_S`` left is recorded as not run, with the ``--cases`` that would run it.
    ``save(records)`` after every case."""
    records: list[dict] = []
    for case in cases:
        with tempfile.TemporaryDirectory() as scratch:
            env = env_of(scratch)
            for caches in ("empty", "kept"):
                left = deadline - time.perf_counter()
                if left < MIN_CHILD_S:
                    record = {"case": case, "error": f"not run: {max(left, 0.0):.0f} s of --budget-s left; run "
                                                     f"--cases {case} in a call of its own"}
                else:
                    record = run_child(case, Path(scratch) / f"{caches}.json", env, sample, min(CHILD_TIMEOUT_S, left))
                records.append(record | {"caches": caches})
                print(json.dumps({k: v for k, v in records[-1].items() if k != "top"}), flush=True)
        save(records)
    return records


def markdown(meta: dict, records: list[dict]) -> str:
    lines = [f"# First calls, {meta['date']}", "", f"{meta['versions']}", "",
             f"Bytecode written by an import-only process first: {meta['bytecode_pass_s']:.1f} s. FA4's disk cache: "
             f"{'on' if meta['fa4_disk_cache'] else 'off'}. Stack sampling during the first call: "
             f"{'on (it slows Python-bound work)' if meta.get('sampled', True) else 'off'}.", "",
             "Each case in a fresh process with empty compile caches, then in another with the caches the first "
             "left. Seconds.", "",
             f"Warm-up mode: {meta.get('warmup', 'wait')}. *ready*: seconds from compile()'s start to the end of the "
             "first call that ran the preferred backend (calls meanwhile on the fallback: their count and median "
             "ms).", "",
             "| case | caches | backend | imports | CUDA start | compile() | first call (incl. compile()) "
             "| ready | second call | new mask, same shape | new length, same process |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['caches']} | error: {r['error'][-300:]!r} | | | | | | | | |")
            continue
        lines.append(f"| {r['case']}: {r['what']} | {r['caches']} | {r['backend']} | {r['imports_s']:.2f} "
                     f"| {r['cuda_start_s']:.2f} "
                     f"| {r['compile_s']:.2f} | **{r['first_call_s']:.2f}** | {_ready(r)} | {r['second_call_s']:.3f} "
                     f"| {r['new_mask_first_call_s']:.3f} ({r['new_mask_backend']}) "
                     f"| {r.get('new_length_first_call_s', float('nan')):.3f} ({r.get('new_length_backend', '?')}) |")
    for r in records:
        if "top" not in r:
            continue
        lines += ["", f"## {r['case']}, caches {r['caches']}: where the first call's {r['first_call_s']:.2f} s went "
                  "(inclusive)", "",
                  "| function | s |", "|---|---:|"]
        lines += [f"| `{label}` | {seconds:.2f} |" for label, seconds in r["top"]]
    return "\n".join(lines) + "\n"


def _ready(record: dict) -> str:
    if "preferred" not in record or record["backend"] == record["preferred"]:
        return "at the first call"
    if record.get("ready_s") is None:
        return f"not within {READY_WITHIN_S} s ({record['meanwhile_calls']} calls on {record['backend']})"
    median = record["meanwhile_median_ms"]
    median = f", median {median:.1f} ms, longest {record['meanwhile_max_ms']:.1f}" if median is not None else ""
    return (f"{record['ready_s']:.2f} ({record['preferred']}; {record['meanwhile_calls']} calls on "
            f"{record['backend']} before{median})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=DEFAULT_CASES,
                        help="the cases to run (default: lvsa random; adaspa adaspa6x in a second call)")
    parser.add_argument("--budget-s", type=float, default=500.0,
                        help="seconds this run may take, the import-only pass included (see the docstring)")
    parser.add_argument("--fa4-disk-cache", action="store_true",
                        help="FA4's own compile cache on disk (FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1)")
    parser.add_argument("--no-sample", action="store_true",
                        help="no stack sampling (its thread slows Python-bound work: time the calls alone)")
    parser.add_argument("--warmup", choices=["background", "wait"], default="background",
                        help="sparsecore's warm-up mode in the children (SPARSECORE_WARMUP; the library's default: "
                             "background)")
    parser.add_argument("--pycache", help="PYTHONPYCACHEPREFIX for every process (default: a new directory)")
    parser.add_argument("--child", choices=sorted(CASES) + ["imports"], help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "imports":
        imports_only()
        return 0
    if args.child:
        child(args.child, args.json, not args.no_sample)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    pycache = args.pycache or tempfile.mkdtemp(prefix="pycache-")
    start = time.perf_counter()
    deadline = start + args.budget_s
    bytecode_pass(pycache)
    bytecode_s = time.perf_counter() - start
    print(f"imports writing their bytecode: {bytecode_s:.1f} s", flush=True)
    meta = run_meta(cpu_count=os.cpu_count(), bytecode_pass_s=bytecode_s, fa4_disk_cache=args.fa4_disk_cache,
                    sampled=not args.no_sample, warmup=args.warmup, budget_s=args.budget_s)
    tags = ("_fa4-disk-cache" if args.fa4_disk_cache else "") + ("_unsampled" if args.no_sample else "") \
        + ("_wait" if args.warmup == "wait" else "")
    stem = args.out / f"first-call-{meta['date']}{tags}"

    def save(records: list[dict]) -> None:
        stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "records": records}, indent=1))
        stem.with_suffix(".md").write_text(markdown(meta, records))

    def env_of(scratch: str) -> dict:
        env = dict(os.environ, TRITON_CACHE_DIR=f"{scratch}/triton", CUTE_DSL_CACHE_DIR=f"{scratch}/cute-dsl",
                   PYTHONPYCACHEPREFIX=pycache, SPARSECORE_WARMUP=args.warmup)
        if args.fa4_disk_cache:
            env.update(FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED="1", FLASH_ATTENTION_CUTE_DSL_CACHE_DIR=f"{scratch}/fa4")
        return env

    records = run_children(args.cases, env_of, not args.no_sample, deadline, save)
    print(markdown(meta, records))
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
