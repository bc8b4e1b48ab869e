"""Every (backend, device, dtype) the registry declares, and how to feed each one.

The property suite is parametrized over :func:`all_targets`, so a backend joins it
by registering; whether a target runs here comes from the backend itself
(``unavailable_reason``), never from a list in the tests.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import pytest

import sparsecore


@dataclass(frozen=True)
class Target:
    backend: str
    device: str
    dtype: str
    emulated: bool = False  # run inside the backend's emulator() context (no device needed)

    @property
    def id(self) -> str:
        return f"{self.backend}-{self.device}-{self.dtype}" + ("-emulated" if self.emulated else "")

    @property
    def matrix_row(self) -> tuple[str, str]:
        return self.backend, self.device + (" (emulated)" if self.emulated else "")

    @property
    def tensor_device(self) -> str:
        """Emulators (the NPU emulator, Triton's interpreter) run on CPU tensors."""
        return "cpu" if self.emulated else self.device

    def emulator(self):
        return sparsecore.registered_backends()[self.backend].emulator()

    @property
    def capabilities(self) -> sparsecore.Capabilities:
        return sparsecore.registered_backends()[self.backend].capabilities

    def unavailable_reason(self) -> str | None:
        return sparsecore.registered_backends()[self.backend].unavailable_reason(self.device)

    @contextlib.contextmanager
    def running(self):
        """This target inside its emulator (if emulated); skips, saying why, where it cannot run here."""
        with self.emulator() if self.emulated else contextlib.nullcontext():
            reason = self.unavailable_reason()
            if reason is not None:
                pytest.skip(f"{self.backend} on {self.device}: {reason}")
            yield self

    def cast(self, *arrays: np.ndarray) -> tuple[list, list[np.ndarray]]:
        """The arrays in this target's type, dtype and device, and their rounded values as float64."""
        if self.capabilities.array_type == "numpy":
            cast = [a.astype(self.dtype) for a in arrays]
            return cast, [a.astype(np.float64) for a in cast]
        import torch
        cast = [torch.from_numpy(a).to(device=self.tensor_device, dtype=getattr(torch, self.dtype)) for a in arrays]
        return cast, [c.double().cpu().numpy() for c in cast]


def all_targets() -> list[Target]:
    """Each backend x device x dtype, plus an emulated copy for backends that offer an emulator."""
    return [Target(name, device, dtype, emulated)
            for name, backend in sorted(sparsecore.registered_backends().items())
            for emulated in ((False, True) if backend.emulator() is not None else (False,))
            for device in backend.capabilities.devices
            for dtype in sorted(backend.capabilities.dtypes)]


def to_float64(x) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x.astype(np.float64)
    return x.double().cpu().numpy()


def default_scale(head_dim: int, scale: float | None) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else scale
