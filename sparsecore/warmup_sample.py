"""The sample a warm-up runs, and the warm-up a kernel's call queues (:mod:`sparsecore.warmup` runs it).

A call whose preferred backend is slow to load queues a :class:`Warming` of it: the backend's decisions for the whole
call (``Backend.warmup_options``) and a small sample of the call (:func:`sample_call`), both made in the caller's
call. Where making them fails (a bug or a transient error in a lowering's setup), the call still runs its fallback:
:func:`queued_warming` records the failure as the warm-up's (:func:`sparsecore.warmup.record_failure`: warned once,
the backend then loaded in place), as the worker records one of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Hashable

import torch

from .launch_device import caller_stream
from .warmup import loaded_run, record_failure

SAMPLE_TOKENS = 1024     # a warm-up's sample takes blocks from the start up to this many tokens (and at least
SAMPLE_BLOCKS = 3        # this many), and the last block


def sample_call(mask: Any, call: tuple) -> tuple:
    """A small call with the traits of ``call`` (q, k, v, scale, return_lse) that a compile depends on: the mask cut to
    its first blocks (up to :data:`SAMPLE_TOKENS` tokens, at least :data:`SAMPLE_BLOCKS`) and its last block on each
    side (:func:`sparsecore.ir.slicing.slice_mask`, one host read for a device mask), with copies of those tokens' q,
    k, v. Block sizes and a short last block are kept; rows that keep some blocks of a tile and not others (FA4's
    mask tiles) or differ between heads most likely too. A mask that approximates its unlisted blocks is cut as its
    drop-only mask with the LSE asked for: its exact part (FA4's) compiles so; the approximation's own pass is
    Triton's, which a Triton fallback compiled already. Returns ``(mask, q, k, v, scale, return_lse)``; holds
    nothing of ``call``."""
    from sparsecore.ir.slicing import slice_mask
    from sparsecore.ir.unselected import DROP
    q, k, v, scale, return_lse = call
    if mask.unselected != DROP:
        mask = type(mask).unchecked(mask.num_heads, mask.q_offsets, mask.kv_offsets, mask.indptr, mask.indices,
                                    mask.budgets, mask.meta, DROP)
        return_lse = True
    q_ranges, kv_ranges = _ends(mask.q_offsets), _ends(mask.kv_offsets)
    part = slice_mask(mask, q_ranges, kv_ranges)

    def cut(tensor: Any, ranges: list[tuple[int, int]]) -> Any:
        with torch.no_grad():                       # no autograd graph back to the call's tensors
            return torch.cat([tensor[:, :, a:b] for a, b in ranges], dim=2)
    return part, cut(q, q_ranges), cut(k, kv_ranges), cut(v, kv_ranges), scale, return_lse


def _ends(offsets: Any) -> list[tuple[int, int]]:
    """Token ranges of the first blocks (up to SAMPLE_TOKENS tokens, at least SAMPLE_BLOCKS) and of the last one."""
    first = max(SAMPLE_BLOCKS, int((offsets[1:] <= SAMPLE_TOKENS).sum()))
    if first >= len(offsets) - 2:
        return [(0, int(offsets[-1]))]
    return [(0, int(offsets[first])), (int(offsets[-2]), int(offsets[-1]))]


@dataclass(eq=False)
class Warming:
    """A warm-up of ``backend`` that a kernel queued at one call: a :func:`sample_call` of it (``sample``: the mask and
    the inputs; released when it ends), run with ``options`` (``Backend.warmup_options``); ``key`` is the
    :func:`sparsecore.warmup.warm_key` it is shared by."""

    key: tuple
    backend: Any
    options: Hashable
    sample: tuple | None
    stream: Any                  # the caller's stream (launch_device.caller_stream)

    def run(self, device: str, lower: Callable[[Any, Hashable, Any, Any], Any]) -> None:
        """On the worker: load the backend (``warmup.Unloadable`` if it cannot run here), lower the sample's mask and
        run it once (which compiles what the kernel's calls launch). ``lower(backend, options, q, mask=...)``."""
        try:
            mask, q, k, v, scale, return_lse = self.sample
            loaded_run(lambda: self.backend.unavailable_reason(device), q.device, self.stream,
                        lambda: lower(self.backend, self.options, q, mask=mask)(q, k, v, scale, return_lse))
        finally:
            self.sample = None


def queued_warming(key: tuple, backend: Any, mask: Any, options: Hashable, call: tuple) -> Warming | None:
    """The warm-up of ``backend`` (shared by ``key``, :func:`sparsecore.warmup.warm_key`) for a kernel's ``call``, or
    None where making it failed (recorded as the warm-up's failure): the call runs its fallback either way."""
    try:
        return Warming(key, backend, backend.warmup_options(mask, options, call), sample_call(mask, call),
                       caller_stream(call[0]))
    except Exception as exc:  # noqa: BLE001  (not the call's error: its fallback runs; warned once, then in place)
        record_failure(key, exc)
        return None
