"""The few entries a session used last: a small least-recently-used cache over an ``OrderedDict``.

Sessions keep what they build per geometry (window maps, masks and the device copies they hold) so that one
geometry's layers and steps reuse it. A server that sees many resolutions must not keep every one of them, and a
pipeline that alternates a few geometries (classifier-free guidance at two resolutions, two pipelines sharing a
planner) must not rebuild each at every call: :func:`kept` keeps the ``limit`` last used, as
``functools.lru_cache`` does for functions, here for a session's own table.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Hashable


def kept(cache: OrderedDict, key: Hashable, build: Callable[[], Any], limit: int) -> Any:
    """``cache[key]``, built by ``build()`` if missing, now the most recently used; past ``limit`` entries the least
    recently used one is dropped."""
    if key not in cache:
        cache[key] = build()
        if len(cache) > limit:
            cache.popitem(last=False)
    cache.move_to_end(key)
    return cache[key]
