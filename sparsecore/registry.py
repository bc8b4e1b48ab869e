"""The backend registry: every lowering registers a :class:`Backend`, selection reads capabilities.

A backend package exposes ``BACKENDS``, a tuple of :class:`Backend` instances. Every
package under ``sparsecore.backends`` (the ``backends/`` folder) is imported on first use
and its backends registered: a new backend is a new folder with its ``BACKENDS``.
Importing a backend package must not import its device library (triton, flashinfer,
torch_npu): that happens in :meth:`Backend.unavailable_reason` and :meth:`Backend.lower`.
Besides lowering masks, a backend may offer optional operations (:class:`BlockMassOp`, :class:`RowTopOp`,
:class:`DenseOp`), found through this registry too.
"""

from __future__ import annotations

import importlib
import pkgutil
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Hashable

from .capabilities import Capabilities

if TYPE_CHECKING:
    from sparsecore.ir import BlockMask


# run(q, k, v, scale, return_lse) -> (out, lse or None); inputs already validated.
Run = Callable[[Any, Any, Any, float, bool], "tuple[Any, Any]"]


@dataclass(frozen=True)
class BlockMassOp:
    """A backend's implementation of AdaSpa's block-mass pass (:func:`sparsecore.search.block_mass`).

    ``run(q, k, q_offsets, kv_offsets, lse, scale) -> mass`` float32 ``[B, H, MB, NB]`` given the
    row LSE (pass 2 of the search; the search makes a fresh LSE itself when none is cached); under
    frame-causal attention also ``visible=`` (int ``[MB]``: the leading key blocks each query block sees,
    the others' masses 0) where ``takes_visible`` (else the search runs the plain pass and zeroes them).
    ``supports(q, k, q_offsets, kv_offsets)`` is None when it takes the inputs, else why not.
    Optional, the first search step in one pass: ``with_output(q, k, v, q_offsets, kv_offsets, scale)
    -> (out, lse, mass)``, the dense output and its LSE with exact masses, where
    ``with_output_supports(q, k, v, q_offsets, kv_offsets)`` is None: the backend takes the inputs in one
    pass and prefers it to its dense pass then ``run`` (else the reason it does not).
    """

    run: Callable[..., Any]
    supports: Callable[..., "str | None"]
    with_output: Callable[..., Any] | None = None
    with_output_supports: Callable[..., "str | None"] | None = None
    takes_visible: bool = False


@dataclass(frozen=True)
class RowTopOp:
    """A backend's row-wise top-k for the planners (:func:`sparsecore.methods.selection.sorted_top`).

    ``run(scores, k, noise) -> ids`` int32 ``[H, R, k]``: the column ids of each row's ``k`` largest
    entries of ``scores`` float32 ``[H, R, C]`` (any strides) plus ``noise`` (a
    :class:`sparsecore.noise.GumbelNoise` of the ``R x C`` map, or None), in ascending order; among
    entries equal to the ``k``-th largest the lowest ids. ``supports(scores, k)`` is None when it
    takes the inputs, else why not.
    """

    run: Callable[..., Any]
    supports: Callable[..., "str | None"]


@dataclass(frozen=True)
class DenseOp:
    """A backend's dense attention, where measured faster than the default (:func:`sparsecore.search.dense_attention`).

    ``run(q, k, v, scale, return_lse) -> (out, lse or None)``: ``q [B, H, L_q, D]``, ``k, v [B, H_kv, L_kv, D]``
    (any strides); ``out [B, H, L_q, D_v]`` contiguous, ``lse`` natural-log float32 ``[B, H, L_q]``.
    ``supports(q, k, v)`` is None when it takes the inputs and was measured faster there, else why not.
    """

    run: Callable[..., Any]
    supports: Callable[..., "str | None"]


class UnsupportedError(ValueError):
    """A backend cannot take this mask or these tensors; the message names the unmet capability."""


@dataclass(frozen=True)
class NoOptions:
    """Options of a backend that has none."""


class Backend(ABC):
    """One lowering of the IR for one or more devices.

    Subclasses set ``name``, ``capabilities`` and ``install_hint``, and implement
    :meth:`unavailable_reason` and :meth:`lower`.
    """

    name: str
    capabilities: Capabilities
    install_hint: str = ""
    options_type: type = NoOptions
    lowers_from_host: bool = False   # lower() reads the mask's lists with NumPy (else torch, on the run device)
    host_plans: bool = False         # its runs keep their plans in host memory on request (keep_plans_on_host)
                                     # and lower() takes a host mask too: such a kernel keeps no device copy of it
    block_mass: BlockMassOp | None = None   # optional: AdaSpa's block-mass pass for this backend's devices
    row_top: RowTopOp | None = None         # optional: the planners' row-wise top-k on this backend's devices
    dense: DenseOp | None = None            # optional: dense attention measured faster than cuDNN's on its devices
    differentiable: bool = False  # its drop masks' runs are torch ops with true gradients (else a backward raises)
    slow_to_load: bool = False    # getting ready (importing its library, JIT-compiling) takes seconds: checked last
                                  # where any backend of the device will do (sparsecore.check.device_problem), and
                                  # warmed up in the background while another runs (sparsecore.warmup)

    @abstractmethod
    def unavailable_reason(self, device: str) -> str | None:
        """None if the backend runs on ``device`` here, else why not (e.g. which import failed)."""

    def unavailable_before_loading(self, device: str) -> str | None:
        """What :meth:`unavailable_reason` would say, as far as it can be seen without loading the library (a backend
        :attr:`slow_to_load` overrides it: its library's import is checked when it warms up)."""
        return self.unavailable_reason(device)

    def warmup_options(self, mask: "BlockMask", options: Hashable, call: tuple) -> Hashable:
        """The options with which a small sample of ``call`` (q, k, v, scale, return_lse) compiles what ``call``
        launches on ``mask`` (:func:`sparsecore.warmup_sample.sample_call`): where a lowering decides from the whole
        mask or the inputs' lengths (tiles, key ranges), it fixes those decisions here. Default: the call's own."""
        return options

    @abstractmethod
    def lower(self, mask: "BlockMask", device: str, options: Hashable) -> Run:
        """Plan ``mask`` for ``device`` (once) and return the function that runs it.

        ``mask`` arrives on the host when :attr:`lowers_from_host` is set, or for a host mask whose kernel keeps its
        plans on the host where :attr:`host_plans` is set; else with its lists on the device of the tensors it
        will run on (see :meth:`BlockMask.to`).
        """

    def shared_memory(self, device: str) -> int | None:
        """Bytes of shared memory a block may use on ``device`` (``"cuda:N"``), which selection compares with
        ``capabilities.unselected_shared_memory``; None: no such limit, or not known here."""
        return None

    def emulator(self) -> ContextManager[None] | None:
        """A context in which this backend runs on CPU without its device (for tests), or None.

        The property suite runs every backend that has one under it, so a lowering for
        hardware CI lacks (an NPU) still executes on every generated mask.
        """
        return None

    def preference(self, mask: "BlockMask") -> int:
        """Rank among backends that can take ``mask`` on a device; the highest is the default."""
        return 0

    def parse_options(self, options: dict[str, Any]) -> Hashable:
        """Validate keyword options into the backend's frozen options dataclass."""
        fields = self.options_type.__dataclass_fields__
        unknown = sorted(set(options) - set(fields))
        if unknown:
            accepted = ", ".join(sorted(fields)) or "none"
            raise TypeError(f"compile(): backend {self.name!r} got unknown option(s) {unknown}; accepted: {accepted}")
        return self.options_type(**options)

    def tensor_device_problem(self, device: str, tensor_device: str) -> str | None:
        """Why tensors on ``tensor_device`` cannot run a kernel compiled for ``device`` (None: they can)."""
        if tensor_device != device.split(":")[0]:
            return f"tensors are on {tensor_device!r} but the kernel was compiled for device {device!r}"
        return None

    def __repr__(self) -> str:
        return f"<backend {self.name} for {', '.join(self.capabilities.devices)}>"


_REGISTRY: dict[str, Backend] = {}
_LOADED = False
_GENERATION = 0       # what runs where, as of now: compile()'s cache keys hold it (see changed())
_LOADING = False
_LOAD_LOCK = threading.RLock()


def register(backend: Backend) -> Backend:
    """Add a backend; names are unique."""
    if not isinstance(backend, Backend):
        raise TypeError(f"register(): expected a sparsecore Backend instance, got {type(backend).__name__}")
    if backend.name in _REGISTRY and _REGISTRY[backend.name] is not backend:
        raise ValueError(f"register(): a backend named {backend.name!r} is already registered")
    if backend.name not in _REGISTRY and not _LOADING:    # the built-in ones load at a first compile: no change
        changed()
    _REGISTRY[backend.name] = backend
    return backend


def generation() -> int:
    """Which state of the registry compiled kernels were chosen in (:func:`changed`)."""
    return _GENERATION


def changed() -> None:
    """What can run where may have changed (a backend registered; Triton's emulator entered or left): a mask compiled
    before is chosen for again, not found in ``compile()``'s caches (the kernels compiled before stay valid)."""
    global _GENERATION
    _GENERATION += 1


def checked_options(backend: str | None, options: Any, field: str) -> dict[str, Any]:
    """``options`` (None or a dict of option names to values) checked against ``backend``'s options dataclass now,
    as a dict; errors name ``field``. Options need a named backend (``backend`` a registered name)."""
    if options is None:
        return {}
    if not isinstance(options, dict) or not all(isinstance(key, str) for key in options):
        raise TypeError(f"{field}: expected None or a dict of option names to values, got {options!r}")
    if options and backend is None:
        raise ValueError(f"{field}: options belong to one backend; name it (backend='fa4', ...), got backend=None "
                         f"with {sorted(options)}")
    if options:
        try:
            registered_backends()[backend].parse_options(options)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{field}: {err}") from None
    return dict(options)


def registered_backends() -> dict[str, Backend]:
    """All registered backends by name (available here or not)."""
    if not _LOADED:
        _load_backends()
    return dict(_REGISTRY)


def _load_backends() -> None:
    """Import every backend package once. Other threads wait until it is done; the loading thread's own imports
    that ask again get what is registered so far."""
    global _LOADED, _LOADING
    with _LOAD_LOCK:
        if _LOADED or _LOADING:
            return
        _LOADING = True
        try:
            import sparsecore.backends as folder
            for package in sorted(m.name for m in pkgutil.iter_modules(folder.__path__) if m.ispkg):
                for backend in importlib.import_module(f"{folder.__name__}.{package}").BACKENDS:
                    register(backend)
            _LOADED = True              # only once all loaded: a package that failed raises again, never a partial set
        finally:
            _LOADING = False


def explained(backend: Backend, reason: str) -> str:
    """``reason`` a backend does not run here, with its install hint where a package is missing (the reason says it
    is not installed or not importable); a reason such as no GPU is left as it is: installing would not help."""
    missing = "not installed" in reason or "not importable" in reason
    return f"{reason} ({backend.install_hint})" if missing and backend.install_hint else reason


def known_devices() -> list[str]:
    return sorted({d for b in registered_backends().values() for d in b.capabilities.devices})


def device_name(device: Any) -> str:
    """``device`` as a string: a string as it is, a ``torch.device`` as torch writes it (``torch.device("cuda", 1)``
    is ``"cuda:1"``: ``device=pipe.device`` works); ``TypeError`` for anything else."""
    import torch                      # not at import: the registry loads before any backend needs torch
    if isinstance(device, torch.device):
        return str(device)
    if not isinstance(device, str):
        raise TypeError(f"device: expected a string such as 'cpu' or 'cuda:0', or a torch.device, got "
                        f"{type(device).__name__} {str(device)[:40]}")
    return device


HOST_DEVICES = ("cpu", "reference")      # one device each: torch numbers no CPUs ("cpu:1" names nothing)


def device_type(device: str) -> str:
    """``"cuda:1"`` -> ``"cuda"``; checks the type is one some backend compiles for, and that an index names a device
    of a numbered type (a host device takes ``:0`` alone)."""
    if not isinstance(device, str):
        raise TypeError(f"device: expected a string such as 'cpu' or 'cuda:0', got {type(device).__name__} "
                        f"{str(device)[:40]}")
    kind, colon, index = device.partition(":")
    if kind not in known_devices():
        raise ValueError(f"device={device[:40]!r} is not known; known devices: {', '.join(known_devices())}")
    if colon and not (index.isascii() and index.isdigit() and len(index) <= 6 and (index == "0" or index[0] != "0")):
        raise ValueError(f"device={device[:40]!r}: expected {kind!r} or '{kind}:N' with N a device index (0, 1, ...), "
                         f"got index {index[:20]!r}")
    if colon and index != "0" and kind in HOST_DEVICES:
        raise ValueError(f"device={device[:40]!r}: {kind!r} is the host, one device with no index but 0; pass "
                         f"{kind!r}")
    return kind


def takes_tensors_on(device: str, backend: str | None, tensor_device: str) -> bool:
    """Whether kernels compiled for ``device`` (by ``backend``, or by any of the device's) take tensors on
    ``tensor_device`` (a torch device type; an emulator's CPU tensors included)."""
    kind = device_type(device)
    return any(b.tensor_device_problem(device, tensor_device) is None for b in registered_backends().values()
               if kind in b.capabilities.devices and backend in (None, b.name))


def candidates(mask: "BlockMask", device: str, name: str | None) -> list[Backend]:
    """The backends for ``device`` that take ``mask``, most preferred first, not yet checked to run here
    (:func:`first_available` checks them in this order).

    ``name`` restricts them to that backend. Raises when none takes the mask: ``ValueError`` for an
    unknown name, ``UnsupportedError`` naming each one's unmet capabilities (and, where one does not run here either,
    why). That some of them do not run here is :func:`first_available`'s to say.
    """
    kind = device_type(device)
    found = [b for b in registered_backends().values() if kind in b.capabilities.devices]
    if name is not None:
        if name not in registered_backends():
            raise ValueError(f"backend={name!r} is not registered; "
                             f"registered: {', '.join(sorted(registered_backends()))}")
        chosen = registered_backends()[name]
        if chosen not in found:
            raise UnsupportedError(f"backend {name!r} compiles for {list(chosen.capabilities.devices)}, "
                                   f"not device {device!r}")
        found = [chosen]
    problems = {b.name: b.capabilities.mask_problems(mask) for b in found}
    capable = [b for b in found if not problems[b.name]]
    if not capable:                   # what each lacks (installing one that cannot take the mask would not help)
        lines = []
        for b in found:
            reason = b.unavailable_reason(device)
            lines.append(f"{b.name}: {', '.join(problems[b.name])}" + (f" (nor does it run here: {reason})"
                                                                       if reason is not None else ""))
        raise UnsupportedError(f"no backend for device {device!r} can take {mask!r}: {'; '.join(lines)}")
    return sorted(capable, key=lambda b: -b.preference(mask))


def with_options(backends: list[Backend], options: dict[str, Any]) -> list[tuple[Backend, Hashable]]:
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


def first_available(backends: list[Backend], device: str, mask: "BlockMask | None" = None,
                    before_loading: bool = False) -> int:
    """Index of the first of ``backends`` that runs on ``device`` here, checked in order and no further.

    A kernel's later candidates are fallbacks for inputs the first cannot take (another dtype or head dim):
    they are checked when a call needs them (:class:`sparsecore.kernel.CompiledKernel`), so a backend slow
    to load is not loaded for a mask another one runs (importing flash-attn-4 took 7.3-10.9 s of a 9.2-13.4 s
    first call on the H200 host for a mask Triton ran: bench/results/gpu-2026-12-01-runs/tenth-session). None of
    them runs here: ``UnsupportedError`` when ``mask`` is given and the device's other backends that run here
    cannot take it, else ``RuntimeError``; each says why of every backend. ``before_loading``: a backend slow to
    load is checked without loading it (:meth:`Backend.unavailable_before_loading`).
    """
    reasons = {}
    for index, backend in enumerate(backends):
        quick = before_loading and backend.slow_to_load
        reason = backend.unavailable_before_loading(device) if quick else backend.unavailable_reason(device)
        if reason is None:
            return index
        reasons[backend] = reason
    lines = "; ".join(f"{b.name}: {explained(b, reason)}" for b, reason in reasons.items())
    if mask is not None:
        kind = device_type(device)
        others = [b for b in registered_backends().values()
                  if kind in b.capabilities.devices and b not in reasons and b.unavailable_reason(device) is None]
        problems = {b.name: b.capabilities.mask_problems(mask) for b in others}
        if others and all(problems.values()):
            taking = "; ".join(f"{name}: {', '.join(found)}" for name, found in problems.items())
            raise UnsupportedError(f"no available backend for device {device!r} can take {mask!r}: {taking}; "
                                   f"those that can take it cannot run here: {lines}")
        if others:                                   # those that run here took the mask but not the options
            raise RuntimeError(f"no backend for device {device!r} that takes this mask and these options can run "
                               f"here: {lines}")
    raise RuntimeError(f"no backend can run on device {device!r} here: {lines}")
