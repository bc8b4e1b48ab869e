"""What sparsecore keeps between calls, and :func:`clear_cache`, which forgets all of it.

The compiled kernels of host masks live here, found again by content (a pattern that recurs across layers and
steps compiles once): the most recently used first, at most :data:`CACHE_SIZE` of them listing at most
:data:`CACHE_BLOCKS` blocks together (a kernel's device lists and tile plan grow with its blocks: a method
returning new large host masks every step must not pile them up). The other caches are bounded where they live:
uploaded offsets (:mod:`sparsecore.ir.uploads`), the approximation pass's statistics plans
(:mod:`sparsecore.backends.approximation`) and the warm-up records (:mod:`sparsecore.warmup`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Hashable

CACHE_SIZE = 64             # compiled kernels of host masks kept
CACHE_BLOCKS = 1 << 27      # ... listing this many (head, query block, key block) entries together
_CACHE: "OrderedDict[Hashable, Any]" = OrderedDict()
_LOCK = threading.Lock()    # compile() from several threads (the warm-up worker is one)


def lookup(key: Hashable) -> Any:
    """The kernel cached under ``key``, now the most recently used (None: none)."""
    with _LOCK:
        found = _CACHE.get(key)
        if found is not None:
            _CACHE.move_to_end(key)
    return found


def insert(key: Hashable, kernel: Any) -> None:
    """Cache ``kernel`` (whose ``mask.nnz`` counts its blocks); evict the least recently used others past the bounds."""
    with _LOCK:
        _CACHE[key] = kernel
        listed = sum(k.mask.nnz for k in _CACHE.values())
        while len(_CACHE) > 1 and (len(_CACHE) > CACHE_SIZE or listed > CACHE_BLOCKS):
            listed -= _CACHE.popitem(last=False)[1].mask.nnz


def evict(kernel: Any) -> None:
    """Forget ``kernel`` wherever it is cached (a no-op for kernels not in the cache)."""
    with _LOCK:
        for key in [key for key, found in _CACHE.items() if found is kernel]:
            del _CACHE[key]


def clear_cache() -> None:
    """Forget every compiled kernel of host masks, the uploaded offsets, the approximation pass's statistics plans
    and the warm-up records (frees the plans and device buffers they hold; a later call rebuilds what it needs, and
    a slow backend warms up again)."""
    from .backends import approximation          # noqa: PLC0415  (the backends load after the compile API)
    from .ir import uploads                      # noqa: PLC0415
    from . import warmup
    with _LOCK:
        _CACHE.clear()
    approximation.clear_plans()
    uploads.clear()
    warmup.forget_records()
