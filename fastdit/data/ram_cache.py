"""RamCache: a thread-safe, byte-capped LRU of fetched bodies (url -> bytes) for one process.

Multi-epoch training over a URL table fetches every image again each epoch; a cache in RAM keeps the
most recently used encoded images (JPEG bytes are ~10x smaller than decoded pixels) so a small table or
a hot subset is not fetched over and over.

One cache per process. Each ``DataLoader`` worker builds its own (``UrlImages.worker_init``), and the
workers read disjoint parts of the data, so a shared cache would rarely hit anyway.
"""
from __future__ import annotations

import collections
import threading
from typing import Optional

# Why not share one cache between worker processes: that needs shared memory plus a cross-process lock
# (or a manager process) on every lookup, i.e. serialisation and IPC in the hot path of every sample,
# and a lock that a killed worker can leave held. Workers own disjoint slots of the data, so the hit
# rate a shared cache would add is small; a per-process LRU needs no coordination at all.


class RamCache:
    """Least-recently-used map ``url -> bytes`` holding at most ``max_bytes`` of values.

    ``put`` of a value larger than ``max_bytes`` stores nothing (it would evict everything else for one
    item). ``get`` counts :attr:`hits` and :attr:`misses`. All methods are safe to call from several
    threads. ``max_bytes=0`` disables caching (every ``get`` misses).
    """

    def __init__(self, max_bytes: int):
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 0:
            raise ValueError(f"RamCache max_bytes must be an int >= 0, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self._items: "collections.OrderedDict[str, bytes]" = collections.OrderedDict()
        self._nbytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> Optional[bytes]:
        """The cached value of ``key`` (now the most recently used) or None."""
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: str, value: bytes) -> bool:
        """Cache ``value`` under ``key``, evicting least recently used items to stay under the cap.
        Returns False (and caches nothing) for a value larger than the cap."""
        if not isinstance(value, (bytes, bytearray)):
            raise TypeError(f"RamCache stores bytes, got {type(value).__name__}")
        value = bytes(value)
        size = len(value)
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._nbytes -= len(old)
            if size > self.max_bytes:
                return False
            while self._items and self._nbytes + size > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self._nbytes -= len(evicted)
            self._items[key] = value
            self._nbytes += size
            return True

    def clear(self) -> None:
        """Drop every item (the hit/miss counters stay)."""
        with self._lock:
            self._items.clear()
            self._nbytes = 0

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    @property
    def nbytes(self) -> int:
        """Bytes held (sum of the cached values' lengths)."""
        with self._lock:
            return self._nbytes

    def __repr__(self) -> str:
        return (f"RamCache({len(self)} items, {self.nbytes}/{self.max_bytes} bytes, "
                f"{self.hits} hits, {self.misses} misses)")
