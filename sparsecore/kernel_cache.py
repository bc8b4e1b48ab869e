"""What sparsecore keeps between calls, and :func:`clear_cache`, which forgets it.

The compiled kernels of host masks live here, found again by content (a pattern that recurs across layers and
steps compiles once): the most recently used first, at most :data:`CACHE_SIZE` of them listing at most
:data:`CACHE_BLOCKS` blocks together, and holding at most :data:`CACHE_TOKEN_PLAN_BYTES` of plans that grow with
the tokens their rows list (a kernel's device lists and tile plans grow with its blocks; ``portable``'s gathered
query and key positions with the tokens of its spans, the npu lowering's op schedules and their device copies with
the rows and gathered keys they list, and an approximating mask's block map with its cells: counted once lowered and
again whenever a kernel is cached or lowered, as its runs report them, ``plan_bytes``): a method returning new large
host masks every step must not pile them up.
The other caches are bounded where they live:
uploaded offsets (:mod:`sparsecore.ir.uploads`), the approximation pass's statistics plans
(:mod:`sparsecore.backends.approximation`) and the warm-up records (:mod:`sparsecore.warmup`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Hashable

CACHE_SIZE = 64             # compiled kernels of host masks kept
CACHE_BLOCKS = 1 << 27      # ... listing this many (head, query block, key block) entries together
CACHE_TOKEN_PLAN_BYTES = 1 << 32   # ... holding this much in plans that grow with their rows' tokens
_CACHE: "OrderedDict[Hashable, Any]" = OrderedDict()
_SIZES: dict[Hashable, tuple[int, int]] = {}     # a cached kernel's (listed blocks, bytes of its runs' token plans)
_LOCK = threading.Lock()    # compile() from several threads (the warm-up worker is one)


def lookup(key: Hashable, mask: Any) -> Any:
    """The kernel for host ``mask`` cached under ``key`` (its fingerprint's), now the most recently used (None: none):
    the cached kernel, or one bound to ``mask`` that shares it where their meta or budgets differ
    (:func:`sparsecore.kernel_view.bound_to`)."""
    from .kernel_view import bound_to            # noqa: PLC0415  (it subclasses the kernel, whose module uses this)
    with _LOCK:
        found = _CACHE.get(key)
        if found is not None:
            _CACHE.move_to_end(key)
    return None if found is None else bound_to(found, mask, key)


def insert(key: Hashable, kernel: Any) -> None:
    """Cache ``kernel`` (of a host mask); evict the least recently used others past the bounds."""
    with _LOCK:
        _CACHE[key], _SIZES[key] = kernel, (kernel.mask.nnz, _token_plan_bytes(kernel))
        _fit(keep=key)


def lowered(kernel: Any) -> None:
    """``kernel`` lowered a run (for its preferred backend, or a fallback for some inputs): count what its runs' plans
    hold if the kernel is cached, and evict others past the bounds."""
    with _LOCK:
        for key, found in _CACHE.items():
            if found is kernel:
                _SIZES[key] = (_SIZES[key][0], _token_plan_bytes(kernel))
                _fit(keep=key)
                return


def _token_plan_bytes(kernel: Any) -> int:
    """Bytes of the kernel's lowered runs' plans that grow with tokens, as the runs report them (``plan_bytes``). A
    copy of the runs: another thread's call may lower one meanwhile (``CompiledKernel._run_for`` adds it unlocked)."""
    return sum(getattr(run, "plan_bytes", 0) for run in tuple(kernel._runs.values()))


def _fit(keep: Hashable) -> None:
    """Evict the least recently used kernels but ``keep`` until the bounds hold (under ``_LOCK``), counting each
    kernel's plans afresh: a run may build some after it is lowered (the npu lowering's device copies, at its first
    call)."""
    for key, kernel in _CACHE.items():
        _SIZES[key] = (_SIZES[key][0], _token_plan_bytes(kernel))
    blocks, plan_bytes = (sum(found) for found in zip(*_SIZES.values()))
    for key in list(_CACHE):
        if len(_CACHE) <= CACHE_SIZE and blocks <= CACHE_BLOCKS and plan_bytes <= CACHE_TOKEN_PLAN_BYTES:
            break
        if key != keep:
            del _CACHE[key]
            gone_blocks, gone_bytes = _SIZES.pop(key)
            blocks, plan_bytes = blocks - gone_blocks, plan_bytes - gone_bytes


def clear_cache() -> None:
    """Forget every compiled kernel of host masks, the uploaded offsets, the approximation pass's statistics plans, the
    fa4 conversion's geometry tables (pinned host memory),
    token orders' device indices and the warm-up records (frees the plans and device buffers they hold; a later call
    rebuilds what it needs, and a slow backend warms up again). What stays: FlashInfer's workspace (128 MiB a device,
    which its kernels share) and LVSA's memoized frame patterns (a few KB each)."""
    from .backends import approximation          # noqa: PLC0415  (the backends load after the compile API)
    from .backends.cuda import fa4_geometry      # noqa: PLC0415
    from .ir import uploads                      # noqa: PLC0415
    from . import ordering, warmup
    with _LOCK:
        _CACHE.clear()
        _SIZES.clear()
    approximation.clear_plans()
    fa4_geometry.forget_geometries()
    uploads.clear()
    ordering.forget_device_copies()
    warmup.forget_records()
