"""Which denoising step (and which run) a transformer forward belongs to.

Automatic mode reads the ``timestep`` each forward receives (its maximum, so Wan 2.2
TI2V's per-token timesteps count once): the first forward is step 0, a smaller timestep than
the last one is the next step, the same timestep stays on the step (classifier-free guidance
run as separate calls, as diffusers' Wan and HunyuanVideo 1.5 pipelines do, on the same
latents), and a larger one starts a new run, as do latents of another sample shape at any timestep (another
video: a cancelled request, then one at another resolution starting mid-schedule). A 16-bit timestep may repeat across
steps:
HunyuanVideo 1.5's pipeline casts it to the latents' dtype, and bf16 holds the values near 1000
only 4 apart (at 50 steps and shift 7 two steps collide). So a timestep tensor equal to the last
one is told apart by the latents (``hidden_states``: each sample's shape and a strided sample of :data:`SAMPLE` of
its values, read with the timestep in one host read; a batch of another size is the same latents only where the
larger batch repeats the smaller one sample for sample, as LTX-2's pipeline runs its classifier-free guidance on its
``B`` latents twice, then its spatio-temporal and modality guidance on the ``B``): fresh ones (a relative change
above :data:`FRESH_LATENTS`, or another shape) start a new run, whatever the timestep's dtype (a new ``pipe()`` call
whose first timestep equals the last forward's, after a 1-step warm-up or a cancelled request, must not plan from
that request's state; but on the same latents, a fixed seed's, it cannot be told from another guidance call of that
step and continues that run: call ``set_step(None)`` before it); the same latents stay on the step; latents moved a
little after a completed forward are the next step at a 16-bit timestep and stay on the step at a wider one (timesteps
of two steps do not collide there). This fits schedulers that evaluate the model once per step (flow-matching Euler,
UniPC, DPM++ multistep: the pipelines' defaults). A model's spec may narrow what is read (``ModelSpec.step_view``:
Cosmos's last latent frame, its timestep as bfloat16). A timestep given as a Python number is read alone (no latents).
A run that ends before ``num_steps`` steps warns (the methods' schedules assumed ``num_steps``).
:meth:`set_step` switches to explicit steps (Heun-type schedulers, several experts as in Wan 2.2
A14B, pipelines that start mid-schedule); a step below the current one starts a new run;
``set_step(None)`` returns to automatic mode, starting a new run at the next forward.
"""

from __future__ import annotations

import numbers
import warnings
from typing import Any, Callable

import numpy as np
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
        self._last_latents: tuple | None = None     # shape and sample of the last latents (timestep tensors)
        self._completed = False                     # whether the last forward returned (a failed one may be retried)
        self._on_new_run = on_new_run

    def set_step(self, step: int | None) -> None:
        if step is None:
            message = self._new_run()                    # the run ends in the mode it ran in
            self._manual, self._last_timestep, self.step = False, None, None
            _warn(message)
            return
        step = check_int(step, "step", 0)
        if step >= self.num_steps:
            raise ValueError(f"step: expected 0 <= step < num_steps={self.num_steps}, got {step}; "
                             f"pass num_steps= to apply() to run more steps")
        message = self._new_run() if self.step is not None and step < self.step else None
        self._manual, self.step = True, step
        _warn(message)

    def observe(self, timestep: Any, latents: Any = None) -> None:
        """Advance from a forward's timestep and latents (automatic mode; explicit steps ignore them)."""
        if self._manual:
            return
        value, sample, sixteen_bit = _read(timestep, latents)
        if value is None:                                # no timestep: stay on the step
            self.step = 0 if self.step is None else self.step
            return
        last, seen = self._last_timestep, self._last_latents
        new_run = last is None or value > last
        if sample is not None and seen is not None and sample[0] != seen[0]:
            new_run = True                               # latents of another sample shape: another video
        advance = not new_run and value < last
        if value == last and sample is not None and seen is not None and not new_run:
            change = _relative_change(sample, seen)     # None: batch sizes that do not divide: another request
            new_run = change is None or change > FRESH_LATENTS
            # 16-bit timesteps of two steps collided
            advance = not new_run and change > 0 and self._completed and sixteen_bit
        message = None
        if new_run:
            message = self._new_run() if last is not None else None
            self.step = 0
        elif advance:
            if self.step + 1 >= self.num_steps:
                raise ValueError(f"num_steps: the transformer got more than num_steps={self.num_steps} steps in one "
                                 f"run (timestep {value} after {last}, or the same 16-bit timestep with other "
                                 "latents); pass num_steps= equal to the pipeline's num_inference_steps to apply(), "
                                 "or drive steps with set_step (Heun-type schedulers, guidance calls on different "
                                 "latents)")
            self.step += 1
        self._last_timestep, self._last_latents, self._completed = value, sample, False
        _warn(message)

    def completed(self) -> None:
        """The last forward returned (called by the handle's post-forward hook)."""
        self._completed = True

    def short_run(self) -> str | None:
        """Why the run now ending (a new one starts, or the handle is removed) is shorter than ``num_steps`` in
        automatic mode, where the methods' schedules (dense steps, searches, budgets) assumed ``num_steps``; None
        when it is not, or when its last forward did not return (an interrupted run)."""
        if self._manual or self.step is None or self.step + 1 >= self.num_steps or not self._completed:
            return None
        # one text per handle (no run or step number): Python's default filter then shows it once, not once a run
        return (f"sparsecore: a run ended before num_steps={self.num_steps} steps (handle.stats() counts its "
                "steps), so the method's schedule (its dense steps, searches and budgets) was laid out for a longer "
                "run; pass num_steps= equal to the pipeline's num_inference_steps to apply(), or drive steps with "
                "set_step (several experts as in Wan 2.2 A14B, a pipeline that starts mid-schedule such as "
                "video-to-video with strength < 1)")

    def _new_run(self) -> str | None:
        """Ends the run (callers warn with the returned message after their own updates: warnings may raise)."""
        message = self.short_run()
        self._on_new_run()
        if self.step is not None:
            self.run += 1
        self.step = self.step if self._manual else None
        self._last_latents = None
        return message


# Relative L2 change of the latents' sample above which a timestep tensor equal to the last is a new run (fresh
# noise after the last run's latents: about 1.4) rather than the same or, at 16 bits, the next step (0.004 at most
# between HunyuanVideo 1.5's colliding steps at 50 steps and shifts 7 to 17, simulated).
FRESH_LATENTS = 0.5
SAMPLE = 1024       # elements of each sample of the latents compared, evenly strided


def _warn(message: str | None, stacklevel: int = 3) -> None:
    """Warns ``message`` if any; ``stacklevel`` counts from the tracker's method that calls this (3: its caller's
    caller: the user's ``handle.set_step``, or the handle's pre-forward hook for a forward's new run)."""
    if message:
        warnings.warn(message, stacklevel=stacklevel + 1)


def _relative_change(latents: tuple, seen: tuple) -> float | None:
    """``|sample - seen| / |seen|`` of two ``(sample shape, [batch, n] samples)`` (NaNs count as equal), the smaller
    batch repeated to the larger's size; None for other sample shapes or a batch size that does not divide the
    other."""
    if latents[0] != seen[0]:
        return None
    sample, seen = latents[1], seen[1]
    small, large = sorted((len(sample), len(seen)))
    if large % small:
        return None
    sample, seen = (np.tile(x, (large // len(x), 1)) for x in (sample, seen))
    if np.array_equal(sample, seen, equal_nan=True):
        return 0.0
    both = np.isnan(sample) & np.isnan(seen)                   # equal; a NaN on one side only: a change of 1
    diff = np.where(both, 0.0, np.nan_to_num(sample - seen, nan=1.0))
    return float(np.linalg.norm(diff) / max(float(np.linalg.norm(np.nan_to_num(seen))), 1e-30))


def _read(timestep: Any, latents: Any) -> tuple[float | None, tuple | None, bool]:
    """The timestep's maximum; for a timestep tensor, ``(sample shape, [batch, n] evenly strided values of each
    sample)`` of the latents, copied to the host with the timestep in one read (a number: None, no added read);
    whether the timestep is 16-bit."""
    if timestep is None:
        return None, None, False
    if isinstance(timestep, torch.Tensor):
        if not timestep.numel():
            return None, None, False
        sixteen_bit = timestep.dtype in (torch.bfloat16, torch.float16)
        value = timestep.detach().max().float().reshape(1)
        if not isinstance(latents, torch.Tensor) or not latents.numel() or value.device != latents.device:
            return value.item(), None, sixteen_bit
        samples = latents.detach().reshape(latents.shape[0] if latents.ndim > 1 else 1, -1)
        picked = samples[:, ::max(1, samples.shape[1] // SAMPLE)][:, :SAMPLE].float()
        read = torch.cat([value, picked.reshape(-1)]).cpu().numpy()
        shape = tuple(latents.shape[1:]) if latents.ndim > 1 else tuple(latents.shape)
        return float(read[0]), (shape, read[1:].reshape(picked.shape)), sixteen_bit
    if isinstance(timestep, numbers.Real) and not isinstance(timestep, bool):
        return float(timestep), None, False
    raise TypeError(f"timestep: expected a tensor or a number, got {type(timestep).__name__}")
