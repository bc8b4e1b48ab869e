"""A bounded memo shared by threads: the last ``entries`` values by key, the least recently used leaving first.

``compile()`` may warm a backend up in a thread (:mod:`sparsecore.warmup`) while callers plan and run, and callers
may share a compiled kernel: a memo read with ``get`` and then reordered with ``move_to_end`` in two steps raised
``KeyError`` when another thread evicted the key in between. Lookups, reordering and eviction happen under one lock
here; the value is built outside it (a build may copy to a device), and of two threads that built the same key at
once, both return the first stored.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Any


class LruMemo:
    """At most ``entries`` values by key (:meth:`get`), least recently used evicted first; safe between threads."""

    def __init__(self, entries: int) -> None:
        self.entries = entries
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()

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
            while len(self._items) > self.entries:
                self._items.popitem(last=False)
        return found

    def put(self, key: Hashable, value: Any) -> None:
        """Keep ``value`` for ``key`` in place of what was kept (a session's newer plan for the same place)."""
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.entries:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Hashable]:
        """The keys, least recently used first (a copy: safe while other threads use the memo)."""
        with self._lock:
            return iter(list(self._items))
