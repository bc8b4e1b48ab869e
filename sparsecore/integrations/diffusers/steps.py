"""Which denoising step (and which run) a transformer forward belongs to.

Automatic mode reads the ``timestep`` each forward receives (its maximum, so Wan 2.2
TI2V's per-token timesteps count once): the first forward is step 0, a smaller timestep
than the last one is the next step, the same timestep stays on the step (classifier-free
guidance run as separate calls, as diffusers' Wan and HunyuanVideo 1.5 pipelines do), and a
larger one starts a new run. This fits schedulers that evaluate the model once per step
(flow-matching Euler, UniPC, DPM++ multistep: the pipelines' defaults). :meth:`set_step`
switches to explicit steps (Heun-type schedulers, several experts as in Wan 2.2 A14B); a
step below the current one starts a new run; ``set_step(None)`` returns to automatic mode,
starting a new run at the next forward.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable

import torch

from sparsecore.ir.validation import check_int


class StepTracker:
    """The current step and run; ``on_new_run`` is called whenever a run starts over."""

    def __init__(self, num_steps: int, on_new_run: Callable[[], None]) -> None:
        self.num_steps = num_steps
        self.step: int | None = None
        self.run = 0
        self._manual = False
        self._last_timestep: float | None = None
        self._on_new_run = on_new_run

    def set_step(self, step: int | None) -> None:
        if step is None:
            self._manual, self._last_timestep = False, None
            self._new_run()
            return
        step = check_int(step, "step", 0)
        if step >= self.num_steps:
            raise ValueError(f"step: expected 0 <= step < num_steps={self.num_steps}, got {step}; "
                             f"pass num_steps= to apply() to run more steps")
        if self.step is not None and step < self.step:
            self._new_run()
        self._manual, self.step = True, step

    def observe(self, timestep: Any) -> None:
        """Advance from a forward's timestep (automatic mode; explicit steps ignore it)."""
        if self._manual:
            return
        value = _timestep_value(timestep)
        if value is None:                                # no timestep: stay on the step
            self.step = 0 if self.step is None else self.step
            return
        last = self._last_timestep
        if last is None or value > last:
            if last is not None:
                self._new_run()
            self.step = 0
        elif value < last:
            if self.step + 1 >= self.num_steps:
                raise ValueError(f"num_steps: the transformer got more than num_steps={self.num_steps} distinct "
                                 f"timesteps in one run (timestep {value} after {last}); pass num_steps= equal to "
                                 f"the pipeline's num_inference_steps to apply(), or drive steps with set_step")
            self.step += 1
        self._last_timestep = value

    def _new_run(self) -> None:
        self._on_new_run()
        if self.step is not None:
            self.run += 1
        self.step = self.step if self._manual else None


def _timestep_value(timestep: Any) -> float | None:
    """One number per forward: the timestep's maximum."""
    if timestep is None:
        return None
    if isinstance(timestep, torch.Tensor):
        return float(timestep.detach().max()) if timestep.numel() else None
    if isinstance(timestep, numbers.Real) and not isinstance(timestep, bool):
        return float(timestep)
    raise TypeError(f"timestep: expected a tensor or a number, got {type(timestep).__name__}")
