"""The local tier (L1): a per-process LRU bounded by entry count, bytes and TTL."""

from __future__ import annotations

import collections
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from cachetools import LRUCache

from .sentinel import MISSING


def _pymalloc_block(size: int) -> int:
    """Return the bytes pymalloc reserves for an object of ``size`` bytes."""
    return -(-size // 16) * 16


# Bytes charged per entry besides its item, its key and the LRU's hash
# tables, which are counted at their real size. They cover the entry's
# tuple and the float and int in it, in pymalloc's 16-byte blocks. The last
# 24 bytes are the mean allocator rounding: 8 for the key in pymalloc, and 16
# for a body over 512 bytes in glibc malloc. From sys.getsizeof and
# tracemalloc on CPython 3.11, x86-64.
ENTRY_OVERHEAD = (
    _pymalloc_block(sys.getsizeof((0.0, None, 0)))
    + _pymalloc_block(sys.getsizeof(0.0))
    + _pymalloc_block(sys.getsizeof(2**20))
    + 24
)
# The size of a str beyond its length when every character is ASCII, as
# memcached keys are.
_ASCII_STR_HEADER = sys.getsizeof("")
# Hash-table bytes per entry assumed when cachetools' tables can't be sized.
_TABLE_BYTES_ESTIMATE = 250

# Keys of recent invalidations kept for the fill guard (an estimated 2 MB at most).
_PRUNE_AT = 10_000


class _CountingLRU(LRUCache[str, tuple[float, Any, int]]):
    """cachetools' LRU with an eviction count and a lookup that returns None on a miss.

    :meth:`peek` and :meth:`touch` read cachetools' own entry dict and
    recency order directly. A miss then costs one dict lookup instead of two
    KeyErrors raised and caught inside cachetools (about 1 µs), and a hit
    skips two Python-level calls. ``peek`` followed by ``touch`` is what
    ``self[key]`` does.
    """

    evictions = 0

    def __init__(
        self, maxsize: int, getsizeof: Callable[[tuple[float, Any, int]], int]
    ) -> None:
        super().__init__(maxsize, getsizeof)
        # NOTE: private attributes of cachetools 5.3 to 8.0 (name-mangled
        # Cache.__data and LRUCache.__order). Should a release rename them,
        # the slower public lookup below takes over, and a test fails to say so.
        data: dict[str, Any] | None = getattr(self, "_Cache__data", None)
        sizes: dict[str, int] | None = getattr(self, "_Cache__size", None)
        order: collections.OrderedDict[str, None] | None = getattr(
            self, "_LRUCache__order", None
        )
        self.direct = (
            isinstance(data, dict)
            and isinstance(sizes, dict)
            and isinstance(order, collections.OrderedDict)
        )
        if self.direct:
            assert data is not None
            assert sizes is not None
            assert order is not None
            self.peek: Callable[[str], tuple[float, Any, int] | None] = data.get
            self.touch: Callable[[str], None] = order.move_to_end
            self._sizeof_tables = (data.__sizeof__, sizes.__sizeof__, order.__sizeof__)
        else:
            self.peek = self.get
            self.touch = _touched_by_get

    def table_bytes(self) -> int:
        """Return the bytes of the hash tables and order list behind the entries.

        They count against the byte bound: a dict does not shrink when
        entries are evicted, only when a later insertion resizes it, so a
        table grown by many small entries stays while large ones follow.
        """
        if self.direct:
            data, sizes, order = self._sizeof_tables
            return data() + sizes() + order()
        return len(self) * _TABLE_BYTES_ESTIMATE

    def popitem(self) -> tuple[str, tuple[float, Any, int]]:
        self.evictions += 1
        return super().popitem()


def _touched_by_get(key: str) -> None:
    """Do nothing: without direct access, ``peek`` already moved the key."""


def _entry_size(entry: tuple[float, Any, int]) -> int:
    return entry[2]


class LocalTier:
    """A thread-safe LRU of ``key -> (expires_at, item, size)``.

    Fill guard: a caller takes a token with :meth:`begin_fill` before it
    reads a lower tier, and :meth:`fill` stores only if no invalidation of
    that key (and no :meth:`clear`) happened since the token was taken. A
    reader that loaded the old row before a write committed, and stores it
    after this process heard of the write, is dropped here, so L1 can't hold
    a value older than the last invalidation it received.

    The per-key record of invalidations is bounded: when it grows past
    :data:`_PRUNE_AT` keys, its older half is dropped, and every fill whose
    token predates the dropped records is voided as a whole. A fill that
    is dropped needlessly only costs a later read; none is stored wrongly.
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
        self._peek = self._lru.peek
        self._touch = self._lru.touch
        self._table_bytes = self._lru.table_bytes()
        self._lock = threading.Lock()
        self._seq = 0
        # Fills whose token is below this are void: set by clear() and by
        # pruning the record of invalidations.
        self._void_before = 0
        self._invalidated: dict[str, int] = {}
        self.hits = 0
        self.misses = 0
        self.fills = 0
        self.dropped_fills = 0
        self.oversized = 0
        self.expirations = 0

    def get(self, key: str) -> Any:
        """Return the stored item for ``key`` or ``MISSING``; drop it if expired."""
        with self._lock:
            entry = self._peek(key)
            if entry is None:
                self.misses += 1
                return MISSING
            if entry[0] <= self._clock():
                del self._lru[key]
                self.expirations += 1
                self.misses += 1
                return MISSING
            self._touch(key)
            self.hits += 1
            return entry[1]

    def begin_fill(self) -> int:
        """Return a fill token to pass to :meth:`fill`. Nothing needs releasing.

        Read without the lock: an invalidation in progress has already
        incremented the sequence, and its keys were deleted from L2 before this
        process received it (or, for deletes a server missed, queued for replay
        before that server is read again), so a caller holding the new token
        reads them fresh.
        """
        return self._seq

    def is_voided(self, key: str, token: int) -> bool:
        """Tell whether ``key`` was invalidated (or L1 cleared) after ``token``.

        Exact while the token's fill is in flight, which keeps the record.
        """
        with self._lock:
            return token < self._void_before or self._invalidated.get(key, -1) > token

    def fill(self, key: str, item: Any, size: int, ttl: float, token: int) -> bool:
        """Store ``item`` unless ``key`` was invalidated after ``token`` was taken.

        :param size: bytes charged for the item; the key and
            :data:`ENTRY_OVERHEAD` are added here, and the LRU's hash tables
            count against ``max_bytes`` too.
        :param ttl: seconds; the caller caps it at the local TTL.
        :returns: whether the item was stored.
        """
        with self._lock:
            stored = self._store_locked(
                key, item, size, self._clock() + ttl, token, self._table_bytes
            )
            if stored:
                self._evict_locked()
            return stored

    def fill_many(self, entries: list[tuple[str, Any, int, float]], token: int) -> None:
        """Store ``(key, item, size, ttl)`` entries like :meth:`fill`, in one lock.

        Evicts once, after the last entry, to the same result as evicting
        after each: the oldest entries go first either way.
        """
        with self._lock:
            now = self._clock()
            for key, item, size, ttl in entries:
                self._store_locked(key, item, size, now + ttl, token, self._table_bytes)
            self._evict_locked()

    def _store_locked(
        self,
        key: str,
        item: Any,
        size: int,
        expires_at: float,
        token: int,
        table_bytes: int,
    ) -> bool:
        """Store an entry unless its fill is void or it can't fit beside the tables."""
        if token < self._void_before or self._invalidated.get(key, -1) > token:
            self.dropped_fills += 1
            return False
        charged = size + len(key) + _ASCII_STR_HEADER + ENTRY_OVERHEAD
        if charged + table_bytes > self.max_bytes:
            self.oversized += 1
            if self._peek(key) is not None:
                del self._lru[key]
            return False
        # cachetools evicts until the entries' charges fit max_bytes, and
        # _evict_locked then applies the entry bound and the tables' bytes.
        self._lru[key] = (expires_at, item, charged)
        self.fills += 1
        return True

    def _evict_locked(self) -> None:
        lru = self._lru
        while len(lru) > self.max_entries:
            lru.popitem()
        max_bytes = self.max_bytes
        while True:
            tables = lru.table_bytes()
            if lru.currsize + tables <= max_bytes or len(lru) <= 1:
                break
            lru.popitem()
        # The tables' size as of the last fill, for the next entry's check
        # against the whole bound.
        self._table_bytes = tables

    def get_many(self, keys: list[str]) -> list[Any]:
        """Return the item or ``MISSING`` for each key, under one lock."""
        items: list[Any] = []
        with self._lock:
            now = self._clock()
            peek = self._peek
            touch = self._touch
            for key in keys:
                entry = peek(key)
                if entry is None:
                    self.misses += 1
                    items.append(MISSING)
                    continue
                if entry[0] <= now:
                    del self._lru[key]
                    self.expirations += 1
                    self.misses += 1
                    items.append(MISSING)
                    continue
                touch(key)
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
            seq = self._seq
            lru = self._lru
            invalidated = self._invalidated
            for key in keys:
                # Most invalidated keys are not in this process's L1:
                # peek first, since a failed pop raises inside cachetools.
                if self._peek(key) is not None:
                    del lru[key]
                    removed += 1
                invalidated[key] = seq
            if len(invalidated) > _PRUNE_AT:
                self._prune()
        return removed

    def clear(self) -> None:
        """Drop every entry and void every fill in flight."""
        with self._lock:
            self._seq += 1
            self._void_before = self._seq
            self._lru.clear()
            self._invalidated.clear()

    def reset_after_fork(self) -> None:
        """Recreate the lock in a forked child, where it may have been held."""
        self._lock = threading.Lock()
        self.clear()

    def _prune(self) -> None:
        # Drop the older half of the records. A fill whose token is below
        # the cutoff might have been voided by a dropped record, so it is
        # voided outright. Later tokens lose nothing.
        cutoff = sorted(self._invalidated.values())[len(self._invalidated) // 2]
        self._invalidated = {k: s for k, s in self._invalidated.items() if s > cutoff}
        self._void_before = max(self._void_before, cutoff)

    def __len__(self) -> int:
        return len(self._lru)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._lru

    @property
    def current_bytes(self) -> int:
        """Bytes charged for the entries held now, plus the LRU's hash tables."""
        return int(self._lru.currsize) + self._lru.table_bytes()

    @property
    def evictions(self) -> int:
        """Entries evicted to stay within the bounds."""
        return self._lru.evictions
