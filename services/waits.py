"""How many ``?wait=`` requests may sleep at once, per API process and per key.

The routes are plain functions run in Starlette's thread pool (about 40 threads): one clinic's 45
uploads with ``wait=30`` held every thread and another clinic's ``GET /v1/models`` took 26 s (the
security review). A request that finds no free slot does not wait: it answers 202 at once, as a
wait that timed out does, and the client polls, as the contract allows.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class WaitSlots:
    """``total`` sleeping requests per process, at most ``per_key`` of them for one key."""

    def __init__(self, total: int, per_key: int) -> None:
        self.total, self.per_key = total, per_key
        self._lock = threading.Lock()
        self._by_key: dict[int, int] = {}

    @contextmanager
    def slot(self, key_id: int) -> Iterator[bool]:
        """Yields whether the caller may wait (and holds the slot until the block ends)."""
        with self._lock:
            granted = sum(self._by_key.values()) < self.total and self._by_key.get(key_id, 0) < self.per_key
            if granted:
                self._by_key[key_id] = self._by_key.get(key_id, 0) + 1
        try:
            yield granted
        finally:
            if granted:
                with self._lock:
                    self._by_key[key_id] -= 1
                    if not self._by_key[key_id]:
                        del self._by_key[key_id]
