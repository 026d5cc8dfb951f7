"""Invalidation of keys that a caller's own database transaction touched."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .cache import TieredCache


class PendingInvalidation:
    """Keys to invalidate once the caller's transaction commits.

    :meth:`TieredCache.after_commit` yields one and sends the collected
    invalidations when its block ends without an exception.
    """

    def __init__(self, cache: TieredCache, connection: Any) -> None:
        self._cache = cache
        self._connection = connection
        self.keys: list[Any] = []
        self.wires: list[str] = []

    def add(self, *keys: str | bytes) -> None:
        """Record ``keys``; with a connection, NOTIFY inside its transaction too."""
        from .namespace import namespaced_wires

        wires = [self._cache.keys.encode(key) for key in keys]
        for key in keys:
            # The same origin row may also be a namespaced entry.
            wires.extend(namespaced_wires(self._cache, key))
        self.keys.extend(keys)
        self.wires.extend(wires)
        bus = self._cache.bus
        if self._connection is not None and bus is not None:
            bus.publish_in_transaction(self._connection, wires)
