"""``sparsecore.compile``: lower a mask, choose the backend per input signature, check every call's inputs.

Calling convention (all backends): ``out = kernel(q, k, v, scale=None)`` or
``out, lse = kernel(q, k, v, return_lse=True)`` with q ``[B, H, q_len, D]`` and
k, v ``[B, H_kv, kv_len, D]``, ``H % H_kv == 0``; query head ``h`` reads key head
``h // (H // H_kv)``. ``scale`` defaults to ``1/sqrt(D)``. A query row whose list is
empty gives output 0 and LSE -inf; LSE is natural-log float32 ``[B, H, q_len]``.
Inference only: where q, k or v require gradients (and grad mode is on) the output carries a
backward that raises (:mod:`sparsecore.no_backward`), except on backends whose runs are
differentiable torch ops (``Backend.differentiable``: ``portable``) for masks that drop unlisted blocks.

Choice of backend. ``compile`` finds the backends that can take the mask on the device
(capabilities; most preferred first) and checks that the first of them runs here (the next
one if not, and so on). The first call with a new input signature (dtype, head dim, heads,
key heads, LSE wanted, tensor device) picks the most preferred of them whose capabilities
take those inputs and that runs here (a fallback is checked, and so loaded, only then),
lowers the mask for it once and remembers the choice; later calls with that signature only
check shapes and launch. So a kernel never refuses inputs that another registered backend
would take.

Caching. A host mask's kernels are cached by its fingerprint (a pattern that recurs
across layers and steps compiles once), the most recently used first, at most
:data:`CACHE_SIZE` of them listing at most :data:`CACHE_BLOCKS` blocks together (a kernel's
device lists and tile plan grow with its blocks: a method returning new large host masks
every step must not pile them up). A device mask, which methods build every layer
and step, is never hashed: the mask object itself holds its kernels, weakly (a kernel refers
to its mask), so compiling a mask again while its kernel is in use (AdaSpa's reuse steps)
returns that kernel, and dropping the kernel frees it at once. ``cache=False`` treats a host
mask the same way (the diffusers integration does, for the methods' per-step masks).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Hashable

from sparsecore.ir import BlockMask

from .inputs import AttentionShape, attention_shape, check_scale
from .launch_device import on_device_of
from .no_backward import inference_only
from .registry import Backend, Run, UnsupportedError, candidates, device_type, first_available

CACHE_SIZE = 64             # compiled kernels of host masks kept
CACHE_BLOCKS = 1 << 27      # ... listing this many (head, query block, key block) entries together
_CACHE: "OrderedDict[tuple, CompiledKernel]" = OrderedDict()


class CompiledKernel:
    """A mask compiled for one device; call it like attention (see the module docstring)."""

    def __init__(self, mask: BlockMask, device: str, choices: list[tuple[Backend, Hashable]]) -> None:
        self.mask = mask
        self.device = device
        self._choices = choices
        self._by_signature: dict[tuple, tuple[Backend, Hashable]] = {}
        self._runs_here = {choices[0][0].name}          # backends checked to run here (compile checks the first)
        self._runs: dict[tuple, Run] = {}
        self.backend = choices[0][0]          # the mask's preferred backend; after a call, the one that ran
        self.plans_on_host = False

    @property
    def options(self) -> Hashable:
        return self._choices[0][1]

    def __call__(self, q: Any, k: Any, v: Any, scale: float | None = None, return_lse: bool = False) -> Any:
        with on_device_of(q):           # Triton launches (and the lowerings place plans) on the current device
            run, scale = self._run_for(q, k, v, scale, return_lse)
            if self.backend.differentiable and self.mask.unselected.kind == "drop":  # approximations merge in place
                out, lse = run(q, k, v, scale, return_lse)
            else:
                out, lse = inference_only(f"backend {self.backend.name!r}", lambda: run(q, k, v, scale, return_lse),
                                          q, k, v)
        return (out, lse) if return_lse else out

    def keep_plans_on_host(self) -> None:
        """Ask the lowerings to keep what they hold on the device between calls (converted lists, lookup tables) in
        host memory instead, copied to the device at each call: for a mask many layers call in turn, where the
        device memory between calls matters more than one copy a call. Lowerings with such a mode
        (``Backend.host_plans``; today ``fa4``) then also lower a host mask from the host, so no device copy of
        its lists stays either (except where the lowering itself needs one: ``fa4``'s approximation pass); the
        others keep theirs on the device."""
        self.plans_on_host = True
        for run in self._runs.values():
            if hasattr(run, "keep_plans_on_host"):          # runs lowered before: their plans move to the host
                run.keep_plans_on_host()

    def prepare(self, q: Any, k: Any, v: Any, scale: float | None = None, return_lse: bool = False) -> None:
        """Do everything a call with inputs like these would do before launching (choose, lower, plan)."""
        with on_device_of(q):
            run, _ = self._run_for(q, k, v, scale, return_lse)
            if hasattr(run, "prepare"):
                run.prepare(q, k, v)

    def _run_for(self, q: Any, k: Any, v: Any, scale: Any, return_lse: Any) -> tuple[Run, float]:
        if not isinstance(return_lse, bool):
            raise TypeError(f"return_lse: expected a bool, got {type(return_lse).__name__} {return_lse!r}")
        shape = self._check_shape(q, k, v)
        scale = check_scale(scale, shape.head_dim)
        backend, options = self._backend_for(shape, return_lse, q)
        problem = backend.tensor_device_problem(self.device, shape.device) if shape.device != "host" else None
        if problem:
            raise ValueError(f"q: {problem}; move them with .to({self.device!r}) or compile for their device")
        run_key = (backend.name, str(getattr(q, "device", "host")))
        run = self._runs.get(run_key)
        if run is None:
            host_plans = self.plans_on_host and backend.host_plans
            from_host = backend.lowers_from_host or (host_plans and self.mask.on_host)  # no device copy kept
            mask = self.mask.to_host() if from_host else self.mask.to(q.device)
            run = self._runs[run_key] = backend.lower(mask, self.device, options)
            if host_plans:
                run.keep_plans_on_host()
        self.backend = backend
        return run, scale

    def _check_shape(self, q: Any, k: Any, v: Any) -> AttentionShape:
        mask = self.mask
        q_shape = tuple(getattr(q, "shape", ()))
        if len(q_shape) == 4 and (q_shape[1], q_shape[2]) != (mask.num_heads, mask.q_len):
            raise ValueError(f"q: expected [B, {mask.num_heads}, {mask.q_len}, D] to match the mask "
                             f"(num_heads={mask.num_heads}, q_len={mask.q_len}), got {list(q_shape)}")
        array_type = self._choices[0][0].capabilities.array_type
        try:
            shape = attention_shape(q, k, v, kind=array_type, kv_len=mask.kv_len)
        except TypeError as err:
            if "expected a" in str(err) and "array" in str(err):
                name = str(err).split(":")[0]
                hint = " (convert with .numpy())" if array_type == "numpy" else " (convert with torch.from_numpy)"
                got = {"q": q, "k": k, "v": v}.get(name)
                raise TypeError(f"{name}: backend {self.backend.name!r} takes {array_type} arrays, got "
                                f"{type(got).__name__}{hint}") from None
            raise
        return shape

    def _backend_for(self, shape: AttentionShape, return_lse: bool, q: Any) -> tuple[Backend, Hashable]:
        signature = (shape.dtype, shape.head_dim, shape.num_heads, shape.num_kv_heads, return_lse, shape.device)
        chosen = self._by_signature.get(signature)
        if chosen is None:
            problems = {}
            for backend, options in self._choices:
                found = backend.capabilities.tensor_problems(shape.dtype, shape.head_dim, shape.num_heads,
                                                             shape.num_kv_heads, return_lse,
                                                             self.mask.unselected.kind != "drop")
                if not found and backend.name not in self._runs_here:
                    reason = backend.unavailable_reason(self.device)
                    if reason is None:
                        self._runs_here.add(backend.name)
                    else:
                        found = [f"cannot run here: {reason}"]
                if not found:
                    chosen = self._by_signature[signature] = (backend, options)
                    break
                problems[backend.name] = found
            else:
                if len(problems) == 1:
                    name, found = next(iter(problems.items()))
                    raise UnsupportedError(f"backend {name!r} cannot run these inputs: {'; '.join(found)}")
                lines = "; ".join(f"{name}: {', '.join(found)}" for name, found in problems.items())
                raise UnsupportedError(f"no backend compiled for this mask can run these inputs: {lines}")
        return chosen

    def __repr__(self) -> str:
        return f"CompiledKernel(backend={self.backend.name!r}, device={self.device!r}, mask={self.mask!r})"


def compile(mask: BlockMask, device: str = "cpu", backend: str | None = None, *, cache: bool = True,
            **options: Any) -> CompiledKernel:
    """Compile ``mask`` for ``device`` and return a callable kernel.

    Args:
        mask: the block-mask IR (host or device lists).
        device: ``"reference"`` (NumPy float64 spec), ``"cpu"``, ``"cuda"`` (or ``"cuda:N"``), ``"npu"``.
        backend: a registered backend name, or None for the preferred one that takes the mask and,
            at each call, the inputs.
        cache: keep a host mask's kernel in the module's cache, found again by content (default). False:
            the mask object itself holds it weakly, as for device masks, so it lives as long as the caller
            holds the kernel (for callers that compile one mask object per step and hold its kernel).
        **options: backend-specific options (see each backend's options dataclass); with
            ``backend=None`` only backends that accept them are considered.

    Raises:
        ValueError: unknown device or backend name.
        UnsupportedError: the named backend (or every one that runs here) cannot take this mask.
        RuntimeError: the device is known but no backend for it that takes this mask (and these options) can run
            here (says why of each).
        TypeError: ``mask`` is not a BlockMask, or an option no candidate accepts.
    """
    if not isinstance(mask, BlockMask):
        raise TypeError(f"mask: expected a sparsecore.ir.BlockMask, got {type(mask).__name__}")
    if not isinstance(device, str):
        device_type(device)                              # the argument's own TypeError before any option's
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend: expected None or a registered backend name (str), got {type(backend).__name__}")
    if not isinstance(cache, bool):
        raise TypeError(f"cache: expected a bool, got {type(cache).__name__}")
    try:
        request = (device, backend, tuple(sorted(options.items())))
        hash(request)
    except TypeError:  # an unhashable option value
        raise TypeError(f"compile(): options must be plain values (int, float, str, bool, None), got "
                        f"{ {k: type(v).__name__ for k, v in options.items()} }") from None
    by_content = mask.on_host and cache
    table, key = (_CACHE, (mask.fingerprint(), *request)) if by_content else (mask.compiled_kernels, request)
    cached = table.get(key)
    if cached is not None:  # the per-layer, per-step path: no backend probing
        if table is _CACHE:
            _CACHE.move_to_end(key)
        return cached
    device_type(device)                                  # a cache miss: check the device string fully
    _check_index(device)
    choices = _choices(candidates(mask, device, backend), options)
    start = first_available([b for b, _ in choices], device, mask if backend is None else None)
    kernel = CompiledKernel(mask, device, choices[start:])
    table[key] = kernel
    if table is _CACHE:                                   # evict the least recently used; keep the new one
        listed = sum(k.mask.nnz for k in _CACHE.values())
        while len(_CACHE) > 1 and (len(_CACHE) > CACHE_SIZE or listed > CACHE_BLOCKS):
            listed -= _CACHE.popitem(last=False)[1].mask.nnz
    return kernel


def _choices(backends: list[Backend], options: dict[str, Any]) -> list[tuple[Backend, Hashable]]:
    """Each candidate with its parsed options; with options given, those that reject them drop out."""
    if not options:
        return [(b, b.parse_options({})) for b in backends]
    choices, errors = [], []
    for b in backends:
        try:
            choices.append((b, b.parse_options(options)))
        except TypeError as err:
            errors.append(str(err))
    if not choices:
        raise TypeError("; ".join(errors))
    return choices


def _check_index(device: str) -> None:
    """``"cuda:3"`` on a machine with fewer devices is refused here, not at the first call."""
    kind, _, index = device.partition(":")
    if not index or kind in ("cpu", "reference"):
        return
    import torch
    module = getattr(torch, kind, None)
    if module is not None and hasattr(module, "device_count") and module.is_available() \
            and int(index) >= module.device_count():
        raise ValueError(f"device={device!r}: this machine has {module.device_count()} {kind} device(s), numbered "
                         f"from 0")


def clear_cache() -> None:
    """Forget every compiled kernel of host masks (frees plans and device buffers they hold)."""
    _CACHE.clear()
