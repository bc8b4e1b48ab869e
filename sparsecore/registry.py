"""The backend registry: every lowering registers a :class:`Backend`, selection reads capabilities.

A backend package exposes ``BACKENDS``, a tuple of :class:`Backend` instances; the
built-in packages are listed in :data:`BUILTIN_PACKAGES` and imported on first use.
Importing a backend package must not import its device library (triton, flashinfer,
torch_npu): that happens in :meth:`Backend.unavailable_reason` and :meth:`Backend.lower`.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Hashable

from .capabilities import Capabilities

if TYPE_CHECKING:
    from sparsecore.ir import BlockMask

BUILTIN_PACKAGES = (
    "sparsecore.backends.reference",
    "sparsecore.backends.portable",
    "sparsecore.backends.cuda",
    "sparsecore.backends.npu",
)

# run(q, k, v, scale, return_lse) -> (out, lse or None); inputs already validated.
Run = Callable[[Any, Any, Any, float, bool], "tuple[Any, Any]"]


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

    @abstractmethod
    def unavailable_reason(self, device: str) -> str | None:
        """None if the backend runs on ``device`` here, else why not (e.g. which import failed)."""

    @abstractmethod
    def lower(self, mask: "BlockMask", device: str, options: Hashable) -> Run:
        """Plan ``mask`` for ``device`` (once) and return the function that runs it."""

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


def register(backend: Backend) -> Backend:
    """Add a backend; names are unique."""
    if not isinstance(backend, Backend):
        raise TypeError(f"register(): expected a sparsecore Backend instance, got {type(backend).__name__}")
    if backend.name in _REGISTRY and _REGISTRY[backend.name] is not backend:
        raise ValueError(f"register(): a backend named {backend.name!r} is already registered")
    _REGISTRY[backend.name] = backend
    return backend


def registered_backends() -> dict[str, Backend]:
    """All registered backends by name (available here or not)."""
    global _LOADED
    if not _LOADED:
        _LOADED = True
        for package in BUILTIN_PACKAGES:
            for backend in importlib.import_module(package).BACKENDS:
                register(backend)
    return dict(_REGISTRY)


def known_devices() -> list[str]:
    return sorted({d for b in registered_backends().values() for d in b.capabilities.devices})


def device_type(device: str) -> str:
    """``"cuda:1"`` -> ``"cuda"``; checks the type is one some backend compiles for."""
    if not isinstance(device, str):
        raise TypeError(f"device: expected a string such as 'cpu' or 'cuda:0', got {type(device).__name__}")
    kind = device.split(":", 1)[0]
    if kind not in known_devices():
        raise ValueError(f"device={device!r} is not known; known devices: {', '.join(known_devices())}")
    return kind


def select(mask: "BlockMask", device: str, name: str | None) -> Backend:
    """The backend that compiles ``mask`` for ``device``: the named one, or the preferred capable one."""
    kind = device_type(device)
    candidates = [b for b in registered_backends().values() if kind in b.capabilities.devices]
    if name is not None:
        if name not in registered_backends():
            raise ValueError(f"backend={name!r} is not registered; "
                             f"registered: {', '.join(sorted(registered_backends()))}")
        chosen = registered_backends()[name]
        if chosen not in candidates:
            raise UnsupportedError(f"backend {name!r} compiles for {list(chosen.capabilities.devices)}, "
                                   f"not device {device!r}")
        candidates = [chosen]
    reasons = {b.name: b.unavailable_reason(device) for b in candidates}
    available = [b for b in candidates if reasons[b.name] is None]
    if not available:
        lines = "; ".join(f"{b.name}: {reasons[b.name]} ({b.install_hint})" for b in candidates)
        raise RuntimeError(f"no backend can run on device {device!r} here: {lines}")
    problems = {b.name: b.capabilities.mask_problems(mask) for b in available}
    capable = [b for b in available if not problems[b.name]]
    if not capable:
        lines = "; ".join(f"{n}: {', '.join(p)}" for n, p in problems.items())
        raise UnsupportedError(f"no available backend for device {device!r} can take {mask!r}: {lines}")
    return max(capable, key=lambda b: b.preference(mask))
