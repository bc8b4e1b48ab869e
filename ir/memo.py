"""A bounded memo shared by threads: the last ``entries`` values by key, the least recently used leaving first.

``compile()`` may warm a backend up in a thread (:mod:`sparsecore.warmup`) while callers plan and run, and callers
may share a compiled kernel: a memo read with ``get`` and then reordered with ``move_to_end`` in two steps raised
``KeyError`` when another thread evicted the key in between. Lookups, reordering and eviction happen under one lock
here; the value is built outside it (a build may copy to a device), and of two threads that built the same key at
once, both return the first stored. Values that leave (evicted, replaced or cleared) go to ``on_drop``, outside the
lock: a memo of device copies releases them there (:func:`.stream_readers.retire`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Any


class LruMemo:
    """At most ``entries`` values by key (:meth:`get`), least recently used evicted first; safe between threads."""

    def __init__(self, entries: int, on_drop: Callable[[Any], None] | None = None) -> None:
        self.entries = entries
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._on_drop = on_drop

    def get(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """The value kept for ``key`` (now the most recent), else ``build()``'s, kept."""
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
                return found
        built = build()
        with self._lock:
            found = self._items.setdefault(key, built)
            self._items.move_to_end(key)
            dropped = self._evict()
        self._drop(dropped)
        return found

    def put(self, key: Hashable, value: Any) -> None:
        """Keep ``value`` for ``key`` in place of what was kept (a session's newer plan for the same place)."""
        with self._lock:
            replaced = self._items.get(key)
            self._items[key] = value
            self._items.move_to_end(key)
            dropped = self._evict() + ([replaced] if replaced is not None and replaced is not value else [])
        self._drop(dropped)

    def clear(self) -> None:
        with self._lock:
            dropped = list(self._items.values())
            self._items.clear()
        self._drop(dropped)

    def _evict(self) -> list[Any]:
        """Removes the least recently used values past ``entries`` (under the lock) and returns them."""
        dropped = []
        while len(self._items) > self.entries:
            dropped.append(self._items.popitem(last=False)[1])
        return dropped

    def _drop(self, values: list[Any]) -> None:
        if self._on_drop is not None:
            for value in values:
                self._on_drop(value)

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Hashable]:
        """The keys, least recently used first (a copy: safe while other threads use the memo)."""
        with self._lock:
            return iter(list(self._items))
