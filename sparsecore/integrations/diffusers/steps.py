"""Which denoising step (and which run) a transformer forward belongs to.

Automatic mode reads the ``timestep`` each forward receives (its maximum, so Wan 2.2
TI2V's per-token timesteps count once) and the latents (``hidden_states``, by their sum): the
first forward is step 0, a smaller timestep than the last one is the next step, the same
timestep stays on the step when the latents are the same (classifier-free guidance run as
separate calls, as diffusers' Wan and HunyuanVideo 1.5 pipelines do) and is the next step when
they changed (HunyuanVideo 1.5's pipeline casts the timestep to the latents' dtype, and bf16
holds the values near 1000 only 4 apart: at 50 steps and shift 7, two steps' timesteps collide),
and a larger timestep starts a new run. This fits schedulers that evaluate the model once per
step (flow-matching Euler, UniPC, DPM++ multistep: the pipelines' defaults). A run that ends
before ``num_steps`` steps warns (the methods' schedules assumed ``num_steps``). :meth:`set_step`
switches to explicit steps (Heun-type schedulers, several experts as in Wan 2.2 A14B, pipelines
that start mid-schedule); a step below the current one starts a new run; ``set_step(None)``
returns to automatic mode, starting a new run at the next forward.
"""

from __future__ import annotations

import math
import numbers
import warnings
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
        self._last_latents: float | None = None
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

    def observe(self, timestep: Any, latents: Any = None) -> None:
        """Advance from a forward's timestep and latents (automatic mode; explicit steps ignore them)."""
        if self._manual:
            return
        value, content = _read(timestep, latents)
        if value is None:                                # no timestep: stay on the step
            self.step = 0 if self.step is None else self.step
            return
        last = self._last_timestep
        same_latents = content is None or _same(content, self._last_latents)
        if last is None or value > last:
            if last is not None:
                self._new_run()
            self.step = 0
        elif value < last or not same_latents:
            if self.step + 1 >= self.num_steps:
                raise ValueError(f"num_steps: the transformer got more than num_steps={self.num_steps} steps in one "
                                 f"run (timestep {value} after {last}); pass num_steps= equal to the pipeline's "
                                 "num_inference_steps to apply(), or drive steps with set_step")
            self.step += 1
        self._last_timestep, self._last_latents = value, content

    def finish(self) -> None:
        """The run is over (a new one starts, or the handle is removed): warns if it stopped short of ``num_steps``
        in automatic mode, where the methods' schedules (dense steps, searches, budgets) assumed ``num_steps``."""
        if self._manual or self.step is None or self.step + 1 >= self.num_steps:
            return
        warnings.warn(f"sparsecore: run {self.run} ended after {self.step + 1} of num_steps={self.num_steps} steps, "
                      "so the method's schedule (its dense steps, searches and budgets) was laid out for a longer run; "
                      "pass num_steps= equal to the pipeline's num_inference_steps to apply() (a pipeline that starts "
                      "mid-schedule, e.g. video-to-video with strength < 1, needs set_step)", stacklevel=3)

    def _new_run(self) -> None:
        self.finish()
        self._on_new_run()
        if self.step is not None:
            self.run += 1
        self.step = self.step if self._manual else None
        self._last_latents = None


def _read(timestep: Any, latents: Any) -> tuple[float | None, float | None]:
    """The timestep's maximum and the latents' sum, in one host read where the timestep is a tensor (the latents
    are then read with it; with a number, they are not read at all: that would add a wait)."""
    if timestep is None:
        return None, None
    if isinstance(timestep, torch.Tensor):
        if not timestep.numel():
            return None, None
        value = timestep.detach().max().float().reshape(1)
        if isinstance(latents, torch.Tensor) and latents.numel():
            read = torch.cat([value, latents.detach().float().sum().reshape(1).to(value.device)]).tolist()
            return read[0], read[1]
        return value.item(), None
    if isinstance(timestep, numbers.Real) and not isinstance(timestep, bool):
        return float(timestep), None
    raise TypeError(f"timestep: expected a tensor or a number, got {type(timestep).__name__}")


def _same(content: float, last: float | None) -> bool:
    """Whether two latents' sums are equal (NaN latents count as unchanged: they give no step signal)."""
    return last is None or content == last or (math.isnan(content) and math.isnan(last))
