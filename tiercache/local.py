"""The local tier (L1): a per-process LRU bounded by entry count, bytes and TTL."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from cachetools import LRUCache

from .sentinel import MISSING

# Bytes charged per entry on top of the key's and value's lengths. Measured
# with tracemalloc on CPython 3.11: about 230 bytes of entry tuple, dict
# slots and LRU links, plus about 80 bytes of object headers. An estimate.
ENTRY_OVERHEAD = 300

_PRUNE_AT = 100_000


class _CountingLRU(LRUCache[str, tuple[float, Any, int]]):
    evictions = 0

    def popitem(self) -> tuple[str, tuple[float, Any, int]]:
        self.evictions += 1
        return super().popitem()


def _entry_size(entry: tuple[float, Any, int]) -> int:
    return entry[2]


class LocalTier:
    """A thread-safe LRU of ``key -> (expires_at, item, size)``.

    Fill guard: a caller takes a token with :meth:`begin_fill` before it
    reads a lower tier, and :meth:`fill` stores only if no invalidation of
    that key (and no :meth:`clear`) happened since the token was taken. A
    reader that loaded the old row before a write committed, and stores it
    after this process heard of the write, is dropped here, so L1 can't hold
    a value older than the last invalidation it received. The per-key record
    of invalidations is kept only while fills are in flight, so it stays
    small.
    """

    def __init__(
        self,
        *,
        max_entries: int,
        max_bytes: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._clock = clock
        self._lru = _CountingLRU(maxsize=max_bytes, getsizeof=_entry_size)
        self._lock = threading.Lock()
        self._seq = 0
        self._flushed_at = 0
        self._invalidated: dict[str, int] = {}
        self._fills: dict[int, int] = {}
        self.hits = 0
        self.misses = 0
        self.fills = 0
        self.dropped_fills = 0
        self.oversized = 0
        self.expirations = 0

    def get(self, key: str) -> Any:
        """Return the stored item for ``key`` or ``MISSING``; drop it if expired."""
        with self._lock:
            try:
                entry = self._lru[key]
            except KeyError:
                self.misses += 1
                return MISSING
            if entry[0] <= self._clock():
                del self._lru[key]
                self.expirations += 1
                self.misses += 1
                return MISSING
            self.hits += 1
            return entry[1]

    def begin_fill(self) -> int:
        """Take a fill token; pass it to :meth:`fill` and then :meth:`end_fill`."""
        with self._lock:
            token = self._seq
            self._fills[token] = self._fills.get(token, 0) + 1
            return token

    def end_fill(self, token: int) -> None:
        """Release a token from :meth:`begin_fill`, stored or not."""
        with self._lock:
            left = self._fills[token] - 1
            if left:
                self._fills[token] = left
            else:
                del self._fills[token]
            if not self._fills:
                self._invalidated.clear()

    def is_voided(self, key: str, token: int) -> bool:
        """Tell whether ``key`` was invalidated (or L1 cleared) after ``token``.

        Exact while the token's fill is in flight, which keeps the record.
        """
        with self._lock:
            return self._flushed_at > token or self._invalidated.get(key, -1) > token

    def fill(self, key: str, item: Any, size: int, ttl: float, token: int) -> bool:
        """Store ``item`` unless ``key`` was invalidated after ``token`` was taken.

        :param size: bytes charged for the item; the key and
            :data:`ENTRY_OVERHEAD` are added here.
        :param ttl: seconds; the caller caps it at the local TTL.
        :returns: whether the item was stored.
        """
        with self._lock:
            return self._fill_locked(key, item, size, self._clock() + ttl, token)

    def fill_many(self, entries: list[tuple[str, Any, int, float]], token: int) -> None:
        """Store ``(key, item, size, ttl)`` entries like :meth:`fill`, in one lock."""
        with self._lock:
            now = self._clock()
            for key, item, size, ttl in entries:
                self._fill_locked(key, item, size, now + ttl, token)

    def _fill_locked(
        self, key: str, item: Any, size: int, expires_at: float, token: int
    ) -> bool:
        charged = size + len(key) + ENTRY_OVERHEAD
        if self._flushed_at > token or self._invalidated.get(key, -1) > token:
            self.dropped_fills += 1
            return False
        if charged > self.max_bytes:
            self.oversized += 1
            self._lru.pop(key, None)
            return False
        self._lru[key] = (expires_at, item, charged)
        while len(self._lru) > self.max_entries:
            self._lru.popitem()
        self.fills += 1
        return True

    def get_many(self, keys: list[str]) -> list[Any]:
        """Return the item or ``MISSING`` for each key, under one lock."""
        items: list[Any] = []
        with self._lock:
            now = self._clock()
            lru = self._lru
            for key in keys:
                try:
                    entry = lru[key]
                except KeyError:
                    self.misses += 1
                    items.append(MISSING)
                    continue
                if entry[0] <= now:
                    del lru[key]
                    self.expirations += 1
                    self.misses += 1
                    items.append(MISSING)
                    continue
                self.hits += 1
                items.append(entry[1])
        return items

    def invalidate(self, keys: Iterable[str]) -> int:
        """Evict ``keys`` and void fills of them that are in flight.

        :returns: how many of them were present.
        """
        removed = 0
        with self._lock:
            self._seq += 1
            track = bool(self._fills)
            for key in keys:
                if self._lru.pop(key, None) is not None:
                    removed += 1
                if track:
                    self._invalidated[key] = self._seq
            if len(self._invalidated) > _PRUNE_AT:
                self._prune()
        return removed

    def clear(self) -> None:
        """Drop every entry and void every fill in flight."""
        with self._lock:
            self._seq += 1
            self._flushed_at = self._seq
            self._lru.clear()
            self._invalidated.clear()

    def reset_after_fork(self) -> None:
        """Recreate the lock in a forked child, where it may have been held."""
        self._lock = threading.Lock()
        self._fills.clear()
        self.clear()

    def _prune(self) -> None:
        oldest = min(self._fills, default=self._seq)
        self._invalidated = {k: s for k, s in self._invalidated.items() if s > oldest}

    def __len__(self) -> int:
        return len(self._lru)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._lru

    @property
    def current_bytes(self) -> int:
        """Bytes charged for the entries held now."""
        return int(self._lru.currsize)

    @property
    def evictions(self) -> int:
        """Entries evicted to stay within the bounds."""
        return self._lru.evictions
