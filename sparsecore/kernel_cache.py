"""What sparsecore keeps between calls, and :func:`clear_cache`, which forgets all of it.

The compiled kernels of host masks live here, found again by content (a pattern that recurs across layers and
steps compiles once): the most recently used first, at most :data:`CACHE_SIZE` of them listing at most
:data:`CACHE_BLOCKS` blocks and :data:`CACHE_KEY_TOKENS` key tokens together (a kernel's device lists and tile
plan grow with its blocks, ``portable``'s gathered key positions with the tokens its rows keep, 9 bytes each: a
method returning new large host masks every step must not pile them up). The other caches are bounded where they live:
uploaded offsets (:mod:`sparsecore.ir.uploads`), the approximation pass's statistics plans
(:mod:`sparsecore.backends.approximation`) and the warm-up records (:mod:`sparsecore.warmup`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Hashable

CACHE_SIZE = 64             # compiled kernels of host masks kept
CACHE_BLOCKS = 1 << 27      # ... listing this many (head, query block, key block) entries together
CACHE_KEY_TOKENS = 1 << 27  # ... and this many key tokens over their rows (portable: about 1.2 GB of positions)
_CACHE: "OrderedDict[Hashable, Any]" = OrderedDict()
_SIZES: dict[Hashable, tuple[int, int]] = {}     # a cached kernel's (listed blocks, listed key tokens)
_LOCK = threading.Lock()    # compile() from several threads (the warm-up worker is one)


def lookup(key: Hashable) -> Any:
    """The kernel cached under ``key``, now the most recently used (None: none)."""
    with _LOCK:
        found = _CACHE.get(key)
        if found is not None:
            _CACHE.move_to_end(key)
    return found


def insert(key: Hashable, kernel: Any) -> None:
    """Cache ``kernel`` (of a host mask); evict the least recently used others past the bounds."""
    mask = kernel.mask
    size = (mask.nnz, int(mask.kv_block_sizes[mask.indices].sum()))   # once per new kernel: O(listed blocks)
    with _LOCK:
        _CACHE[key], _SIZES[key] = kernel, size
        blocks, tokens = (sum(found) for found in zip(*_SIZES.values()))
        while len(_CACHE) > 1 and (len(_CACHE) > CACHE_SIZE or blocks > CACHE_BLOCKS or tokens > CACHE_KEY_TOKENS):
            gone, _ = _CACHE.popitem(last=False)
            gone_blocks, gone_tokens = _SIZES.pop(gone)
            blocks, tokens = blocks - gone_blocks, tokens - gone_tokens


def evict(kernel: Any) -> None:
    """Forget ``kernel`` wherever it is cached (a no-op for kernels not in the cache)."""
    with _LOCK:
        for key in [key for key, found in _CACHE.items() if found is kernel]:
            del _CACHE[key], _SIZES[key]


def clear_cache() -> None:
    """Forget every compiled kernel of host masks, the uploaded offsets, the approximation pass's statistics plans
    and the warm-up records (frees the plans and device buffers they hold; a later call rebuilds what it needs, and
    a slow backend warms up again)."""
    from .backends import approximation          # noqa: PLC0415  (the backends load after the compile API)
    from .ir import uploads                      # noqa: PLC0415
    from . import warmup
    with _LOCK:
        _CACHE.clear()
        _SIZES.clear()
    approximation.clear_plans()
    uploads.clear()
    warmup.forget_records()
