"""What each row of the end-to-end benchmark (``bench/e2e_benchmark.py``) runs: the 50-step schedule a method's
generation is composed from, the steps timed for each kind of step, the parameters and variants each method's rows
run with, and the composition of a generation's time from the timed kinds (:func:`generation`)."""

from __future__ import annotations

import sparsecore
from sparsecore import VideoGeometry

NUM_STEPS = 50
SCHEDULES = {   # method -> (kind of step, how many of the 50)
    "dense": [("dense", 50)],
    "lvsa": [("sparse", 50)],
    "adaspa": [("dense", 9), ("dense+lse", 1), ("search", 1), ("cached search", 1), ("reuse", 38)],
    "adaspa-fused-first": [("dense", 10), ("search", 1), ("cached search", 1), ("reuse", 38)],
    "pasa": [("dense", 10), ("sparse", 40)],
    "radial": [("dense", 12), ("sparse", 38)],
    "sta": [("dense", 12), ("sparse", 38)],
    "sta-file": [("dense", 15), ("sparse", 35)],
    "dense-sparsecore": [("dense", 50)],
}
METHOD_PARAMS = {   # method -> parameters its rows run with: Radial Attention's released Wan 2.1 script (1x length)
    "radial": {"dense_steps": 12, "dense_layers": 1, "decay_factor": 0.2},
    "sta": {"dense_steps": 12, "window": (3, 3, 3)},              # FastVideo's Wan search: 12 dense steps
}
TINY_PARAMS = {     # method -> parameters added under --tiny, whose frames (4 x 4 tokens) are smaller than its blocks
    "radial": {"block_size": 16},
}
VARIANTS = {    # row name -> (method, parameters)
    "pasa-drop": ("pasa", {"approximation": "drop"}),          # without its approximation of unkept blocks
    "adaspa-device": ("adaspa", {"store": "device"}),          # searched masks wait on the GPU
    "adaspa-fused-first": ("adaspa", {"first_search": "fused"}),     # the paper's first search: step 10 dense
    "sta-file": ("sta", {"dense_steps": 0}),         # windows from --sta-strategy (FastVideo's Hunyuan file)
}
WARM_UP = "warm-up"      # a forward that compiles a kind's kernels, not timed into it
STEPS = {       # method -> (kind, step index) forwards, in order (step 0, untimed, compiles the dense path)
    "lvsa": [(WARM_UP, 20), ("sparse", 21), ("sparse", 22), ("sparse", 23)],
    "adaspa": [("dense", 1), ("dense", 2), ("dense", 3), ("dense+lse", 9), ("search", 10), ("first reuse", 11),
               ("reuse", 12), ("reuse", 13), ("reuse", 14), ("cached search", 30)],
    "pasa": [("dense", 1), ("dense", 2), ("dense", 3), (WARM_UP, 10), ("sparse", 11), ("sparse", 12),
             ("sparse", 13)],
    "radial": [("dense", 1), ("dense", 2), ("dense", 3), (WARM_UP, 12), ("sparse", 13), ("sparse", 14),
               ("sparse", 15)],
    "sta": [("dense", 1), ("dense", 2), ("dense", 3), (WARM_UP, 12), ("sparse", 13), ("sparse", 14), ("sparse", 15)],
    "sta-file": [("dense", 1), ("dense", 2), ("dense", 3), (WARM_UP, 15), ("sparse", 16), ("sparse", 32),
                 ("sparse", 48)],                    # the file's windows differ per step: three steps apart
    "dense-sparsecore": [("dense", 1), ("dense", 2), ("dense", 3)],     # every step dense, through sparsecore
    "adaspa-fused-first": [("dense", 1), ("dense", 2), ("dense", 3), ("search", 10), ("first reuse", 11),
                           ("reuse", 12), ("reuse", 13), ("reuse", 14), ("cached search", 30)],
}
DENSE_REPEATS = 3           # the dense baseline's timed forwards, after one that compiles
# a further step of the kind that repeats, run with timing on
PLAN_PROBE = {"lvsa": 24, "adaspa": 31, "pasa": 14, "radial": 16, "sta": 16, "dense-sparsecore": 4}
ROWS = list(dict.fromkeys([*STEPS, *VARIANTS]))


def full_attention(geometry: VideoGeometry, num_heads: int, step: int, layer: int) -> sparsecore.BlockMask:
    """The ``dense-sparsecore`` row's method: every pair kept, so every step takes the dense path, which runs
    sparsecore's dense kernel where one was measured faster than cuDNN (``apply(..., dense_attention="auto")``)."""
    return sparsecore.BlockMask.full(num_heads, geometry.tokens, geometry.tokens, geometry.tokens, geometry.tokens)


def by_kind(seconds: list[tuple[str, float]]) -> dict[str, list[float]]:
    """The timed forwards of each kind of step (warm-ups left out)."""
    kinds: dict[str, list[float]] = {}
    for kind, s in seconds:
        if kind != WARM_UP:
            kinds.setdefault(kind, []).append(s)
    return kinds


def generation(method: str, times: dict[str, float]) -> float:
    """A 50-step generation's time for ``method``: its schedule's count of each kind of step times that kind's
    seconds in ``times``. A variant without a schedule of its own (``pasa-drop``) takes its method's."""
    schedule = SCHEDULES.get(method) or SCHEDULES[VARIANTS.get(method, (method,))[0]]
    return sum(count * times[kind] for kind, count in schedule)
