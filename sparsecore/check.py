"""``sparsecore check``: run one backend on random masks and compare with float64 dense attention.

A self-test for a user's machine (does the kernel for my device compute the right
thing?). It covers short last blocks, arbitrary block boundaries, empty rows,
per-head patterns, GQA and masks that approximate their unlisted blocks (PASA's kinds,
held to the reference lowering, their executable definition: not drawn when checking
that lowering itself); each case compares the output and the LSE (float32 by contract;
-inf exactly where a row attends to nothing). It stops at the first mismatch. A case
the backend cannot take (its capabilities: ``UnsupportedError``) is reported as skipped,
never as checked; one on which compile or the call raises another error (:data:`KERNEL_ERRORS`:
a bug of the kernel, not of the command line) fails, naming it; a run in which no case ran does not pass.
:func:`device_problem` says in one line why a device, backend and dtype cannot run here (the command line's
errors, and the demo's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from sparsecore.ir import BlockMask, Unselected

from .dense import masked_dense_attention, relative_error, to_numpy64
from .kernel import compile
from .registry import Backend, UnsupportedError, device_type, explained, first_available, registered_backends

TOLERANCE = {"float64": 1e-10, "float32": 1e-5, "float16": 3e-3, "bfloat16": 2e-2}  # relative L2 of the output
LSE_TOLERANCE = {"float64": 1e-5, "float32": 1e-5, "float16": 2e-3, "bfloat16": 2e-3}  # |error| / max(1, |lse|)
APPROXIMATIONS = ("zeroth", "global-first-order", "grouped-first-order")
HEAD_DIMS = (16, 32, 64, 128)
KERNEL_ERRORS = (ValueError, TypeError, RuntimeError, IndexError)   # what a lowering raises on a case it gets wrong


@dataclass(frozen=True)
class CheckResult:
    case: int
    description: str
    backend: str
    rel_err: float
    passed: bool
    skipped: str | None = None     # why the backend could not take the case (then nothing was checked)
    lse_err: float = float("nan")  # the LSE's largest error, a row's over max(1, |lse|); inf where -inf rows differ
    broken: str | None = None      # what the result breaks of the calling convention (shape, dtype, device)
    raised: str | None = None      # the error compile or the call raised on a case the backend takes


@dataclass(frozen=True)
class CheckSummary:
    ran: int
    passed: int
    skipped: int
    raised: int = 0      # cases (of those that ran) on which the kernel raised

    @property
    def ok(self) -> bool:
        """At least one case ran and every case that ran matched."""
        return self.ran > 0 and self.passed == self.ran


def device_problem(device: Any, backend: str | None = None, dtype: str | None = None) -> str | None:
    """Why ``device`` (with ``backend`` and ``dtype`` if given) cannot run here, in one line; None when it can."""
    try:
        kind = device_type(device)
    except (TypeError, ValueError) as err:
        return str(err)
    backends = registered_backends()
    if backend is not None and backend not in backends:
        return f"backend={backend!r} is not registered; registered: {', '.join(sorted(backends))}"
    found = [b for b in backends.values() if kind in b.capabilities.devices and backend in (None, b.name)]
    if not found:
        return (f"backend {backend!r} compiles for {list(backends[backend].capabilities.devices)}, not device "
                f"{device!r}; leave the backend out to use the device's preferred one")
    # any backend that runs here (and takes dtype) will do: stop at the first, those slow to check last
    takers = sorted((b for b in found if dtype is None or dtype in b.capabilities.dtypes),
                    key=lambda b: b.slow_to_load)
    try:
        first_available(takers, device)
    except RuntimeError:                                  # none of them runs here: say why, from every backend
        reasons = {b.name: b.unavailable_reason(device) for b in found}
        available = [b for b in found if reasons[b.name] is None]
        if not available:
            why = "; ".join(f"{b.name}: {explained(b, reasons[b.name])}" for b in found)
            return f"no backend can run on device {device!r} here: {why}"
        takes = "; ".join(f"{b.name} takes {', '.join(sorted(b.capabilities.dtypes))}" for b in available)
        cannot = "; ".join(f"{b.name}: {explained(b, reasons[b.name])}" for b in takers)
        return (f"dtype {dtype!r} is not supported on device {device!r}: {takes}"
                + (f"; those that take it cannot run here: {cannot}" if takers else ""))
    index = device.partition(":")[2]
    module = getattr(torch, kind, None)
    if index and kind != "cpu" and hasattr(module, "device_count") and int(index) >= module.device_count():
        return f"device={device!r}: this machine has {module.device_count()} {kind} device(s), numbered from 0"
    return None


def tensor_device_problem(device: Any, backend: str | None = None) -> str | None:
    """:func:`device_problem` for work on torch tensors (a model, the demo): a device none of whose backends takes
    torch tensors (``"reference"``: NumPy float64 arrays) cannot run it."""
    problem = device_problem(device, backend)
    if problem is not None:
        return problem
    kinds = {b.capabilities.array_type for b in registered_backends().values()
             if device_type(device) in b.capabilities.devices and backend in (None, b.name)}
    if "torch" not in kinds:
        return (f"device {device!r} runs {', '.join(sorted(kinds))} arrays, not torch tensors; pass the device the "
                f"tensors are on, e.g. 'cpu'")
    return None


def random_case(rng: np.random.Generator, head_dims: tuple[int, ...],
                approximate: bool = True) -> tuple[BlockMask, int, int]:
    """A random mask (uniform or arbitrary blocks, empty rows, GQA; a third of them approximating their unlisted blocks
    where ``approximate``) with its key-head count and head dim."""
    kv_heads, group = int(rng.integers(1, 3)), int(rng.choice([1, 2, 4]))
    heads = kv_heads * group

    def offsets() -> np.ndarray:
        length = int(rng.integers(1, 300))
        if rng.random() < 0.6:
            return BlockMask.uniform_offsets(length, int(rng.integers(max(1, length // 40), 129)))
        cuts = rng.choice(np.arange(1, length), size=min(length - 1, int(rng.integers(0, 30))), replace=False)
        return np.concatenate([[0], np.sort(cuts), [length]]).astype(np.int64)

    q_off, kv_off = offsets(), offsets()
    density = rng.choice([0.0, 0.1, 0.4, 0.8, 1.0], size=(heads, 1, 1))
    dense = rng.random((heads, len(q_off) - 1, len(kv_off) - 1)) < density
    rows = [[np.nonzero(r)[0] for r in head] for head in dense]
    mask = BlockMask.from_lists(rows, q_off, kv_off)
    if approximate and rng.random() < 1 / 3:
        kind = str(rng.choice(APPROXIMATIONS))
        group = int(rng.integers(1, 5)) if kind == "grouped-first-order" else None
        mask = BlockMask(heads, q_off, kv_off, mask.indptr, mask.indices, unselected=Unselected(kind, group))
    return mask, kv_heads, int(rng.choice(head_dims))


def lse_error(lse: Any, ref: np.ndarray) -> float:
    """The LSE's largest error, each row's over its own ``max(1, |ref|)``, on the rows that attend to something; inf
    where a row is -inf (attends to nothing) on one side only."""
    got = to_numpy64(lse)
    if got.shape != ref.shape or not np.array_equal(np.isneginf(got), np.isneginf(ref)):
        return float("inf")
    finite = ~np.isneginf(ref)
    if not finite.any():
        return 0.0
    return float((np.abs(got[finite] - ref[finite]) / np.maximum(1.0, np.abs(ref[finite]))).max())


def contract_problem(out: Any, lse: Any, q: Any) -> str | None:
    """What a call's result breaks of the calling convention (``sparsecore.kernel``), else None: out of q's shape (a
    head dim of q's, as v's here), dtype and device; the LSE float32 ``[B, H, q_len]``."""
    if tuple(out.shape) != tuple(q.shape) or out.dtype != q.dtype or getattr(out, "device", None) != \
            getattr(q, "device", None):
        return (f"output {list(out.shape)} {out.dtype} on {getattr(out, 'device', 'host')}, expected q's "
                f"{list(q.shape)} {q.dtype} on {getattr(q, 'device', 'host')}")
    if tuple(lse.shape) != tuple(q.shape[:3]) or str(lse.dtype).removeprefix("torch.") != "float32":
        return f"LSE {list(lse.shape)} {lse.dtype}, expected float32 {list(q.shape[:3])}"
    return None


def _head_dims(device: str, backend: str | None) -> tuple[int, ...]:
    """The head dims some backend that may run takes (so cases are not drawn only to be skipped)."""
    kind = device_type(device)
    chosen: list[Backend] = [b for b in registered_backends().values()
                             if kind in b.capabilities.devices and backend in (None, b.name)]
    dims = tuple(d for d in HEAD_DIMS if any(b.capabilities.head_dims is None or d in b.capabilities.head_dims
                                             for b in chosen))
    return dims or HEAD_DIMS


def run_check(device: str, backend: str | None, cases: int, seed: int, dtype: str,
              report: Callable[[CheckResult], None]) -> CheckSummary:
    """Run ``cases`` random cases; stops at the first mismatch. Cases the backend cannot take are skipped."""
    rng = np.random.default_rng(seed)
    ran = passed = skipped = raised = 0
    approximate = device_type(device) != "reference" and backend != "reference"    # else the definition vs itself
    for case in range(cases):
        mask, kv_heads, head_dim = random_case(rng, _head_dims(device, backend), approximate)
        description = f"{mask!r}, kv_heads={kv_heads}, head_dim={head_dim}"
        shapes = [(1, mask.num_heads, mask.q_len, head_dim)] + [(1, kv_heads, mask.kv_len, head_dim)] * 2
        arrays = [rng.standard_normal(s) for s in shapes]
        kernel, stage = None, "compile"
        try:
            # "wait": the backend compile() prefers runs from the first call, the one a user's kernel ends up on
            kernel = compile(mask, device=device, backend=backend, warmup="wait")
            stage = "making the inputs"
            if kernel.backend.capabilities.array_type == "numpy":
                inputs = [a.astype(dtype) for a in arrays]
            else:
                inputs = [torch.from_numpy(a).to(device=device, dtype=getattr(torch, dtype)) for a in arrays]
            stage = "the call"
            out, lse = kernel(*inputs, return_lse=True)
        except UnsupportedError as err:            # the backend's capabilities do not cover this case
            skipped += 1
            report(CheckResult(case, description, backend or "-", float("nan"), False, skipped=str(err)))
            continue
        except KERNEL_ERRORS as err:               # on a case it takes: the kernel's failure, reported as one
            ran, raised = ran + 1, raised + 1
            name = kernel.backend.name if kernel is not None else backend or "-"
            report(CheckResult(case, description, name, float("nan"), False,
                               raised=f"{stage} raised {type(err).__name__}: {' '.join(str(err).split())[:800]}"))
            break
        ref, ref_lse = masked_dense_attention(mask, *inputs, scale=head_dim ** -0.5)
        broken = contract_problem(out, lse, inputs[0])
        same_shape = tuple(out.shape) == ref.shape              # another shape: compared nowhere, reported as broken
        rel = relative_error(to_numpy64(out), ref)[1] if same_shape else float("nan")
        lse_err = lse_error(lse, ref_lse)
        ok = bool(broken is None and np.isfinite(rel) and rel <= TOLERANCE[dtype] and lse_err <= LSE_TOLERANCE[dtype])
        ran, passed = ran + 1, passed + ok
        report(CheckResult(case, description, kernel.backend.name, rel, ok, lse_err=lse_err, broken=broken))
        if not ok:
            break
    return CheckSummary(ran, passed, skipped, raised)
