"""``sparsecore.compile``: lower a mask, choose the backend per input signature, check every call's inputs.

Calling convention (all backends): ``out = kernel(q, k, v, scale=None)`` or ``out, lse = kernel(q, k, v,
return_lse=True)`` with q ``[B, H, q_len, D]`` and k, v ``[B, H_kv, kv_len, D]``, ``H % H_kv == 0``; query head ``h``
reads key head ``h // (H // H_kv)``. ``scale`` defaults to ``1/sqrt(D)``. A query row whose list is empty gives
output 0 and LSE -inf; LSE is natural-log float32 ``[B, H, q_len]``. Inference only: where q, k or v require
gradients (and grad mode is on) the output carries a backward that raises (:mod:`sparsecore.no_backward`), except on
backends whose runs are differentiable torch ops (``Backend.differentiable``: ``portable``) for masks that drop
unlisted blocks.

Choice of backend. ``compile`` finds the backends that can take the mask on the device (capabilities; most preferred
first) and checks that the first of them runs here (the next one if not, and so on). The first call with a new input
signature (dtype, head dim, heads, key heads, LSE wanted, tensor device, which backends' per-call row limits its batch
keeps) picks the most preferred of them whose capabilities take those inputs and that runs here (a fallback is
checked, and so loaded, only then), lowers the mask for it once and remembers the choice; later calls with that
signature only check shapes and launch. So a kernel never refuses inputs that another registered backend would take.
Under ``torch.compile`` a call is one opaque op (:mod:`sparsecore.compiled_call`).

Warm-up (:mod:`sparsecore.warmup`). A backend slow to get ready (``Backend.slow_to_load``: ``fa4`` imports and
compiles for 15-23 s, FlashInfer JIT-compiles for longer) is checked at ``compile`` without loading it, and by default
a call whose inputs it would run runs the kernel's next backend that takes them while a worker thread loads the slow
one and runs it once on a small sample of that call; later calls, and kernels of masks of the same geometry, run it.
``warmup="wait"`` loads it in place at the first call.

Caching. A host mask's kernels are cached by its fingerprint, bounded; an equal pattern with its own meta or budgets
gets a kernel bound to its mask that shares the plans (:mod:`sparsecore.kernel_cache`, :mod:`.kernel_view`). A device
mask, which methods build every layer and step, is never hashed: the mask object itself holds its kernels, weakly (a
kernel refers to its mask), so compiling a mask again while its kernel is in use (AdaSpa's reuse steps) returns that
kernel, and dropping the kernel frees it at once. ``cache=False`` treats a host mask the same way (the diffusers
integration does, for the methods' per-step masks).
"""

from __future__ import annotations

from typing import Any, Hashable

import torch

from sparsecore.ir import BlockMask
from sparsecore.ir.validation import check_bool

from . import compiled_call, kernel_cache
from .inputs import AttentionShape, array_kind, attention_shape, check_return_lse, check_scale
from .launch_device import StreamOrder, check_device_index, on_device_of, without_autocast
from .no_backward import inference_only
from .registry import (Backend, Run, UnsupportedError, candidates, device_name, device_type, first_available,
                       generation, with_options)
from . import warmup as warmups
from .warmup_sample import Warming, queued_warming


class CompiledKernel:
    """A mask compiled for one device; call it like attention (see the module docstring)."""

    def __init__(self, mask: BlockMask, device: str, choices: list[tuple[Backend, Hashable]], warmup: str = "wait",
                 first_checked: bool = True) -> None:
        self.mask = mask
        self.device = device
        self.warmup = warmup                  # "background" or "wait": see sparsecore.warmup
        self._choices = choices
        self._row_limits = sorted({b.capabilities.max_call_rows for b, _ in choices} - {None})
        self._by_signature: dict[tuple, tuple[Backend, Hashable]] = {}
        self._runs_here = {(choices[0][0].name, device)} if first_checked else set()   # (backend, device) checked
        self._unloadable: dict[tuple, str] = {}  # (backend, tensor device) a background load found does not run: why
        self._ready: set[tuple] = set()   # (backend, tensor device, signature): warm (here or by a kernel of this
        #                                   geometry), or loaded in place
        self._queued: list[Warming] = []          # warm-ups to submit once this call has launched
        self._streams = StreamOrder()   # before the runs: its finaliser's waits come before their plans are freed
        self._runs: dict[tuple, Run] = {}
        self.backend = choices[0][0]          # the mask's preferred backend; after a call, the one that ran
        self.plans_on_host = False
        self.slot = compiled_call.register(self)   # how torch.compile's graphs find it (sparsecore.compiled_call)

    @property
    def options(self) -> Hashable:
        return self._choices[0][1]

    @property
    def differentiable(self) -> bool:  # a backend of the mask may keep autograd's graph (sparsecore.no_backward)
        return self.mask.unselected.kind == "drop" and any(backend.differentiable for backend, _ in self._choices)

    def __call__(self, q: Any, k: Any, v: Any, scale: float | None = None, return_lse: bool = False) -> Any:
        if torch.compiler.is_compiling() and isinstance(q, torch.Tensor):    # one opaque op in the graph
            return compiled_call.traced_call(self, q, k, v, scale, return_lse)
        return self.eager_call(q, k, v, scale, return_lse)

    def eager_call(self, q: Any, k: Any, v: Any, scale: float | None = None, return_lse: bool = False) -> Any:
        try:                                # the call itself (what __call__ runs outside torch.compile)
            # Triton launches (and the lowerings place plans) on the current device; autocast stays outside
            with on_device_of(q), without_autocast(q):
                run, scale, backend, plans = self._run_for(q, k, v, scale, return_lse)  # not self.backend: another
                call = lambda: run(q, k, v, scale, return_lse)  # noqa: E731             # thread may set it meanwhile
                with self._streams.ordered(plans, q):             # after another stream's build of these plans
                    out, lse = call() if backend.differentiable and self.mask.unselected.kind == "drop" \
                        else inference_only(f"backend {backend.name!r}", call, q, k, v)
        finally:
            self._submit_queued()           # after this call's own launch: a warm-up's work does not delay it
        return (out, lse) if return_lse else out

    def wait_for_warmups(self, timeout: float | None = None) -> bool:
        """Wait until the warm-ups queued so far (those of calls still running too) have ended: True if they did within
        ``timeout`` seconds (None or math.inf: no limit). The next call runs the warmed backend; where it does not load,
        the next choice (a slow one warms up in turn); where its warm-up failed, it warns and loads that backend in
        place."""
        self._submit_queued()                 # a call in another thread queued one that starts after its launch
        return warmups.wait(timeout)

    def keep_plans_on_host(self) -> None:
        """Have the lowerings keep what they hold on the device between calls in host memory, copied to the device at
        each call: for a mask many layers call in turn, where the device memory between calls matters more than a copy.
        Lowerings with such a mode (``Backend.host_plans``: ``fa4``) also lower a host mask from the host, so no device
        copy of its lists stays (``fa4``'s approximation pass keeps one); the others keep theirs on the device."""
        self.plans_on_host = True
        for run in self._runs.values():
            if hasattr(run, "keep_plans_on_host"):          # runs lowered before: their plans move to the host
                run.keep_plans_on_host()

    def prepare(self, q: Any, k: Any, v: Any, scale: float | None = None, return_lse: bool = False) -> None:
        """Do everything a call with inputs like these would do before launching (choose, lower, plan)."""
        try:
            with on_device_of(q):
                run, scale, _, plans = self._run_for(q, k, v, scale, return_lse)
                if hasattr(run, "prepare"):
                    with self._streams.ordered(("prepare", *plans), q):     # the first call may build more
                        run.prepare(q, k, v, scale)
        finally:
            self._submit_queued()

    def _run_for(self, q: Any, k: Any, v: Any, scale: Any, return_lse: Any) -> tuple[Run, float, Backend, tuple]:
        """The run, scale, backend (also left in ``self.backend``) and key of its plans (``StreamOrder``) of a call."""
        check_return_lse(return_lse)
        shape = self._check_shape(q, k, v)
        scale = check_scale(scale, shape.head_dim)
        where = str(getattr(q, "device", "host"))          # the tensors' device, with its index ("cuda:1")
        signature = (shape.dtype, shape.head_dim, shape.num_heads, shape.num_kv_heads, return_lse, where,
                     tuple(self._call_rows(shape) <= limit for limit in self._row_limits))  # which limits hold
        backend, options = self._backend_for(signature, shape)
        self._check_device(backend, shape)
        if self.warmup == "background" and backend.slow_to_load:
            backend, options = self._meanwhile(signature, shape, backend, options, (q, k, v, scale, return_lse))
            self._check_device(backend, shape)
        run_key = (backend.name, str(getattr(q, "device", "host")))
        if (run := self._runs.get(run_key)) is None:    # a lowering builds too (portable's chunks): recorded
            with self._streams.ordered(("lowered", run_key), q):                # (one thread lowers, others wait)
                if (run := self._runs.get(run_key)) is None:
                    run = self._runs[run_key] = self._lowered(backend, options, q)
            kernel_cache.lowered(self)          # its plans may grow with the tokens (portable's)
        self.backend = backend
        return run, scale, backend, (id(run), signature, scale, shape.batch)

    def _check_device(self, backend: Backend, shape: AttentionShape) -> None:
        problem = backend.tensor_device_problem(self.device, shape.device) if shape.device != "host" else None
        if problem:
            raise ValueError(f"q: {problem}; move them with .to({self.device!r}) or compile for their device")

    def _lowered(self, backend: Backend, options: Hashable, q: Any, mask: BlockMask | None = None) -> Run:
        """``backend``'s run of the mask (or of ``mask``: a warm-up's sample) for calls with tensors on ``q``'s
        device."""
        host_plans = self.plans_on_host and backend.host_plans and mask is None      # not for a sample's run
        mask = self.mask if mask is None else mask
        from_host = backend.lowers_from_host or (host_plans and mask.on_host)  # no device copy kept
        mask = mask.to_host() if from_host else mask.to(q.device)
        run = backend.lower(mask, self.device, options)
        if host_plans:
            run.keep_plans_on_host()
        return run

    def _meanwhile(self, signature: tuple, shape: AttentionShape, backend: Backend, options: Hashable,
                   call: tuple) -> tuple[Backend, Hashable]:
        """The backend a call runs on while ``backend`` (slow to load, preferred for ``signature``) warms up in the
        background (:mod:`sparsecore.warmup`): ``backend`` once it is warm for these inputs and this mask's geometry
        (by this kernel or another), or where a warm-up of it failed (loaded in place, as in the "wait" mode), or
        where no other backend takes these inputs (loaded here); else the next one that takes them, queuing the
        geometry's warm-up unless one is in flight."""
        key = (backend.name, str(call[0].device), signature)
        if key in self._ready:
            return backend, options
        shared = warmups.warm_key(backend, key[1], signature, options, self.mask)
        found = warmups.status(shared)
        if found == "warm":
            return self._runs_it(key, backend, options)
        if found == "failed":                       # as in the "wait" mode: checked whole, then loaded here
            return self._loaded_in_place(key, signature, shape, backend, options, call)
        if found == "unloadable":
            return self._unloadable_now(backend, warmups.unloadable(backend.name, key[1]), signature, shape, call)
        fallback = self._fallback(shape, signature, backend)
        if fallback is None:                        # nothing else takes these inputs: load it here
            return self._loaded_in_place(key, signature, shape, backend, options, call)
        if found == "none" and (warming := queued_warming(shared, backend, self.mask, options, call)) is not None:
            self._queued.append(warming)                  # (None: its setup failed here, recorded as the warm-up's)
        return fallback

    def _runs_it(self, key: tuple, backend: Backend, options: Hashable) -> tuple[Backend, Hashable]:
        self._runs_here.add((backend.name, self._checked_device(key[1])))
        self._ready.add(key)
        return backend, options

    def _unloadable_now(self, backend: Backend, reason: str, signature: tuple, shape: AttentionShape,
                        call: tuple) -> tuple[Backend, Hashable]:
        """``backend`` cannot run on these tensors' device after all: choose again without it there (another slow one
        warms up in turn); other devices keep it."""
        where = signature[5]
        self._unloadable[(backend.name, where)] = reason
        self._by_signature = {s: c for s, c in self._by_signature.items() if c[0] is not backend or s[5] != where}
        chosen, options = self._backend_for(signature, shape)
        if chosen.slow_to_load:
            return self._meanwhile(signature, shape, chosen, options, call)
        return chosen, options

    def _loaded_in_place(self, key: tuple, signature: tuple, shape: AttentionShape, backend: Backend,
                         options: Hashable, call: tuple) -> tuple[Backend, Hashable]:
        reason = backend.unavailable_reason(self._checked_device(signature[5]))
        if reason is not None:
            return self._unloadable_now(backend, reason, signature, shape, call)
        return self._runs_it(key, backend, options)

    def _fallback(self, shape: AttentionShape, signature: tuple, backend: Backend) -> tuple[Backend, Hashable] | None:
        """The first choice after ``backend`` that takes these inputs, runs here and is not slow to load."""
        later = self._choices[[b for b, _ in self._choices].index(backend) + 1:]
        for other, options in later:
            if not other.slow_to_load and not self._problems(other, shape, signature) \
                    and self._reason(other, signature[5]) is None:
                return other, options
        return None

    def _submit_queued(self) -> None:
        """Start the warm-ups this call queued: the worker loads the preferred backend and runs it on the call's
        sample (:func:`sparsecore.warmup_sample.sample_call`)."""
        while True:                     # threads sharing this kernel (compile's cache) take the same list: one pop
            try:                        # each, not a check then a pop another thread may have emptied in between
                queued = self._queued.pop(0)
            except IndexError:
                return
            device = self._checked_device(str(queued.sample[1].device))        # the call's tensors' (its sample's)
            warmups.start(queued.key, lambda w=queued, d=device: w.run(d, self._lowered))

    def _check_shape(self, q: Any, k: Any, v: Any) -> AttentionShape:
        mask = self.mask
        q_shape = () if getattr(q, "is_nested", False) else tuple(getattr(q, "shape", ()))   # nested: refused below
        if len(q_shape) == 4 and (q_shape[1], q_shape[2]) != (mask.num_heads, mask.q_len):
            swapped = (q_shape[2], q_shape[1]) == (mask.num_heads, mask.q_len)
            remedy = ("; these look like [B, length, heads, D]: pass q.transpose(1, 2) (and k, v alike)" if swapped
                      else "; compile a mask for these inputs' heads and length")
            raise ValueError(f"q: expected [B, {mask.num_heads}, {mask.q_len}, D] to match the mask "
                             f"(num_heads={mask.num_heads}, q_len={mask.q_len}), got {list(q_shape)}{remedy}")
        array_type = self._choices[0][0].capabilities.array_type
        try:
            return attention_shape(q, k, v, kind=array_type, kv_len=mask.kv_len)
        except TypeError as err:
            if "expected a" in str(err) and "array" in str(err):
                name = str(err).split(":")[0]
                got = {"q": q, "k": k, "v": v}.get(name)
                hint = "" if array_kind(got) not in ("torch", "numpy") else \
                    " (convert with .numpy())" if array_type == "numpy" else " (convert with torch.from_numpy)"
                raise TypeError(f"{name}: backend {self.backend.name!r} takes {array_type} arrays, got "
                                f"{type(got).__name__}{hint}") from None
            raise

    def _backend_for(self, signature: tuple, shape: AttentionShape) -> tuple[Backend, Hashable]:
        chosen = self._by_signature.get(signature)
        if chosen is None:
            problems = {}
            for backend, options in self._choices:
                found = self._problems(backend, shape, signature)
                if not found:
                    reason = self._reason(backend, signature[5])
                    found = [f"cannot run here: {reason}"] if reason is not None else []
                if not found:
                    chosen = self._by_signature[signature] = (backend, options)
                    break
                problems[backend.name] = found
            else:
                remedy = ("; give q, k, v what a backend takes (cast them: torch .to(dtype), NumPy .astype(dtype); pad "
                          "the head dim), or compile for another backend or device (each of "
                          "sparsecore.registered_backends().values() has .capabilities)")
                if len(problems) == 1:
                    name, found = next(iter(problems.items()))
                    raise UnsupportedError(f"backend {name!r} cannot run these inputs: {'; '.join(found)}{remedy}")
                lines = "; ".join(f"{name}: {', '.join(found)}" for name, found in problems.items())
                raise UnsupportedError(f"no backend compiled for this mask can run these inputs: {lines}{remedy}")
        return chosen

    def _problems(self, backend: Backend, shape: AttentionShape, signature: tuple) -> list[str]:
        kind, caps, group = self.mask.unselected.kind, backend.capabilities, self.mask.unselected.group_blocks
        kind = "global-first-order" if group is not None and group >= self.mask.num_kv_blocks else kind  # one group
        shared = backend.shared_memory(self._checked_device(signature[5])) if caps.unselected_shared_memory \
            and kind != "drop" else None                                     # the device's limit, where it may matter
        return caps.tensor_problems(shape.dtype, shape.head_dim, shape.num_heads, shape.num_kv_heads, signature[4],
                                    kind != "drop", self._call_rows(shape), kind, shared)

    def _call_rows(self, shape: AttentionShape) -> int:
        """(batch element, head, query block) rows of a call: what backends' per-call limits count."""
        return shape.batch * self.mask.num_heads * self.mask.num_q_blocks

    def _reason(self, backend: Backend, where: str) -> str | None:
        """Why ``backend`` cannot run here, on tensors on ``where`` (None: it can; or, slow to load and warmed up in
        the background, nothing seen without loading it says it cannot: its warm-up loads it)."""
        if (backend.name, where) in self._unloadable:
            return self._unloadable[(backend.name, where)]
        if (backend.name, device := self._checked_device(where)) in self._runs_here:
            return None
        if self.warmup == "background" and backend.slow_to_load:
            return backend.unavailable_before_loading(device)
        reason = backend.unavailable_reason(device)
        if reason is None:
            self._runs_here.add((backend.name, device))
        return reason

    def _checked_device(self, where: str) -> str:
        """Where backends are checked for tensors on ``where``: there (GPUs may differ), if of the compiled type."""
        return where if where.split(":")[0] == self.device.split(":")[0] else self.device

    def __repr__(self) -> str:
        return f"CompiledKernel(backend={self.backend.name!r}, device={self.device!r}, mask={self.mask!r})"

    def __copy__(self) -> "CompiledKernel":
        """The kernel itself (fixed at compile): a copy's slot would call the original (:mod:`.compiled_call`)."""
        return self

    def __deepcopy__(self, memo: dict) -> "CompiledKernel":
        return self

    def __reduce__(self) -> Any:
        raise TypeError("CompiledKernel: a kernel holds device plans and cannot be pickled; pickle its mask "
                        "(kernel.mask, or save it with kernel.mask.save(path)) and compile it where it is loaded")


def compile(mask: BlockMask, device: str = "cpu", backend: str | None = None, *, cache: bool = True,
            warmup: str | None = None, **options: Any) -> CompiledKernel:
    """Compile ``mask`` for ``device`` and return a callable kernel.

    Args:
        mask: the block-mask IR (host or device lists).
        device: ``"reference"`` (NumPy float64), ``"cpu"``, ``"cuda"`` (``"cuda:N"``), ``"npu"``, or a torch.device.
        backend: a registered backend name, or None for the preferred one that takes the mask and, at each call, the
            inputs.
        cache: keep a host mask's kernel in the module's cache, found again by content (default). False: the mask
            object itself holds it weakly, as for device masks, so it lives as long as the caller holds the kernel
            (for callers that compile one mask object per step and hold its kernel).
        warmup: ``"background"``: a call whose preferred backend is slow to load (``fa4``: seconds to import and
            compile) runs on the kernel's next backend that takes its inputs while a worker thread loads, lowers
            and compiles the preferred one, which later calls then run on (:mod:`sparsecore.warmup`); ``"wait"``:
            loaded in place, one backend throughout. None: ``$SPARSECORE_WARMUP``, else ``"background"``.
        **options: backend-specific options (see each backend's options dataclass); with ``backend=None`` only
            backends that accept them are considered.

    Called under ``torch.compile`` it runs outside the graph (a graph break), and the kernel's call is one op there.

    Raises:
        ValueError: unknown device or backend name.
        UnsupportedError: the named backend (or every one that runs here) cannot take this mask.
        RuntimeError: the device is known but no backend for it that takes this mask (and these options) can run
            here (says why of each).
        TypeError: ``mask`` is not a BlockMask, or an option no candidate accepts.
    """
    if torch.compiler.is_compiling():                    # Dynamo cannot trace it: a graph break (compiled_call)
        return compiled_call.outside_graph(compile, mask, device, backend, cache=cache, warmup=warmup, **options)
    if not isinstance(mask, BlockMask):
        raise TypeError(f"mask: expected a sparsecore.ir.BlockMask, got {type(mask).__name__}")
    device = device_name(device)                         # the argument's own TypeError before any option's
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend: expected None or a registered backend name (str), got {type(backend).__name__}")
    check_bool(cache, "cache")
    warmup = warmups.mode(warmup)
    try:
        request = (device, backend, warmup, generation(),                     # a backend registered since: chosen again
                   tuple(sorted((k, type(v), v) for k, v in options.items())))  # 1 != True
        hash(request)
    except TypeError:  # an unhashable option value
        raise TypeError(f"compile(): options must be plain values (int, float, str, bool, None), got "
                        f"{ {k: type(v).__name__ for k, v in options.items()} }") from None
    by_content = mask.on_host and cache
    key = (mask.fingerprint(), *request) if by_content else request
    cached = kernel_cache.lookup(key, mask) if by_content else mask.compiled_kernels.get(key)
    if cached is not None:                       # the per-layer, per-step path: no backend probing
        return cached
    device_type(device)                                  # a cache miss: check the device string fully
    check_device_index(device)
    choices = with_options(candidates(mask, device, backend), options)
    # a slow backend is checked without loading it only where a quick one can run meanwhile: else (a named slow
    # backend, or only slow ones take the mask) compile() checks it whole and raises as in the "wait" mode
    in_background = warmup == "background" and any(not b.slow_to_load for b, _ in choices)
    start = first_available([b for b, _ in choices], device, mask if backend is None else None,
                            before_loading=in_background)
    first = choices[start][0]
    kernel = CompiledKernel(mask, device, choices[start:], warmup, first_checked=not (in_background
                                                                                     and first.slow_to_load))
    if by_content:
        kernel_cache.insert(key, kernel)
    else:
        mask.compiled_kernels[key] = kernel
    return kernel

