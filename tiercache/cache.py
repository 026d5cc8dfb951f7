"""The cache front: the public read and write-through API of :class:`TieredCache`."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, cast

import orjson

from . import codec, signals
from .batch import BatchMixin
from .channel import make_channel
from .contracts import Channel, Origin
from .decorator import CachedFunction
from .fill import NEGATIVE, UNPARSED, _Flight
from .invalidation import InvalidationBus
from .keys import KeyCodec
from .local import LocalTier
from .namespace import Namespace, NamespaceVersions, namespaced_wires
from .refresh import RefreshMixin
from .remote import RemoteTier
from .sentinel import MISSING
from .settings import Settings
from .stats import snapshot
from .transaction import PendingInvalidation
from .ttl import DEFAULT_TTL, TtlArg, check_ttl


class TieredCache(BatchMixin, RefreshMixin):
    """A read-through, write-through cache over L1, L2 (memcached) and an origin.

    :param settings: the settings; read from ``TIERCACHE_*`` variables when
        omitted.
    :param origin: the system of record that :meth:`get` loads from on a
        miss and that :meth:`set` and :meth:`delete` write through.
    :param channel: the cross-process channel; built from
        ``settings.channel_url`` when omitted.
    :param clock: monotonic seconds for L1 expiry, replaceable in tests.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        origin: Origin | None = None,
        channel: Channel | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings if settings is not None else Settings.from_env()
        self.origin = origin if origin is not None else _origin_from_url(self.settings)
        self.keys = KeyCodec(self.settings.namespace)
        self._encode_str = self.keys.encode_str
        self._local_copy = self.settings.local_copy

        self.loads = 0
        self.stores = 0
        self.stale_fills_dropped = 0
        self.lease_waits = 0
        self.lease_wait_timeouts = 0
        self.stale_served = 0
        self.refreshes = 0
        self.refresh_errors = 0
        self.undecodable = 0
        self.too_large = 0
        self.invalidations_failed = 0
        self._flights: dict[str, _Flight] = {}
        self._flights_lock = threading.Lock()
        self._refresher: concurrent.futures.ThreadPoolExecutor | None = None
        self._closed = False

        self.local = LocalTier(
            max_entries=self.settings.local_max_entries,
            max_bytes=self.settings.local_max_bytes,
            clock=clock,
        )
        self.namespaces = NamespaceVersions(self)
        self.remote = (
            RemoteTier(self.settings, on_degraded=self._on_degraded)
            if self.settings.memcached_servers
            else None
        )

        # The channel starts last: its callbacks use everything above.
        if channel is None and self.settings.channel_url:
            channel = make_channel(self.settings.channel_url)
        self.bus: InvalidationBus | None = None
        if channel is not None:
            self.bus = InvalidationBus(
                channel,
                self.settings,
                self.local,
                on_invalidated=self._on_remote_invalidation,
                on_lost_deletes=self._on_lost_deletes,
                on_resync=self._on_resync,
                on_namespace=self._on_namespace_message,
                on_degraded=self._on_degraded,
                clock=clock,
            )
            self.bus.start()
        _CACHES.add(self)

    # -- reading -----------------------------------------------------------------

    def get(
        self,
        key: str | bytes,
        loader: Callable[[Any], Any] | None = None,
        *,
        ttl: TtlArg = DEFAULT_TTL,
        default: Any = MISSING,
    ) -> Any:
        """Return the value of ``key`` from L1, L2 or, on a miss, the loader.

        :param loader: called with ``key`` on a miss; returns the value, or
            ``MISSING`` when the origin has no such row (that result is
            cached for ``negative_ttl``). Defaults to ``origin.load``.
        :param ttl: seconds to keep a value loaded now; ``None`` for no
            expiry in L2 (L1 still expires after ``local_ttl``, the bound on
            staleness); 0 or less to load without caching. Fractions round
            up to whole seconds in both tiers.
        :param default: returned instead of ``MISSING`` on a miss.
        :raises UnsupportedTypeError: if the loaded value can't be cached.
        :raises TypeError: for a ``ttl`` that is not a number or ``None``.
        """
        if ttl is not DEFAULT_TTL:
            check_ttl(ttl)
        # The memoized encoder is called directly for str keys: this is the
        # L1 hit path, where every call counts.
        wire = self._encode_str(key) if type(key) is str else self.keys.encode(key)
        # The L1 hit path of _get, repeated here because the call it saves is
        # about 7% of an L1 hit's instructions (callgrind, CPython 3.11).
        bus = self.bus
        if bus is None or not bus.bypass_local:
            item = self.local.get(wire)
            if item is not MISSING:
                if signals.hit.receivers:
                    signals.send_robust(signals.hit, self, key=key, tier="local")
                if item is NEGATIVE:
                    return default
                return orjson.loads(item) if self._local_copy else item
            return self._get_below(key, wire, loader, ttl, default, True)
        return self._get_below(key, wire, loader, ttl, default, False)

    def _get(
        self,
        key: str | bytes,
        wire: str,
        loader: Callable[[Any], Any] | None,
        ttl: TtlArg,
        default: Any,
    ) -> Any:
        bus = self.bus
        use_local = bus is None or not bus.bypass_local
        if use_local:
            item = self.local.get(wire)
            if item is not MISSING:
                if signals.hit.receivers:
                    signals.send_robust(signals.hit, self, key=key, tier="local")
                if item is NEGATIVE:
                    return default
                return orjson.loads(item) if self._local_copy else item
        return self._get_below(key, wire, loader, ttl, default, use_local)

    def _get_below(
        self,
        key: str | bytes,
        wire: str,
        loader: Callable[[Any], Any] | None,
        ttl: TtlArg,
        default: Any,
        use_local: bool,
    ) -> Any:
        """Read ``wire`` from L2 or load it, after L1 missed or was bypassed."""
        if self.remote is not None and wire not in self._flights:
            item, value = self._read_through(key, wire, loader, ttl, use_local)
        else:
            item, value = self._load_shared(key, wire, loader, ttl, use_local)
        if item is NEGATIVE:
            return default
        return self._hand_out(item) if value is UNPARSED else value

    # -- batches -----------------------------------------------------------------

    def get_many(
        self,
        keys: Iterable[str | bytes],
        loader: Callable[[list[Any]], Mapping[Any, Any]] | None = None,
        *,
        ttl: TtlArg = DEFAULT_TTL,
    ) -> dict[Any, Any]:
        """Return the values of ``keys`` that exist, reading each tier once.

        L1 first, then one multi-get per memcached server (all sent before
        any reply is read), then one ``loader`` call (default
        ``origin.load_many``) for the rest. Keys the loader doesn't return
        are cached as absent and left out of the result. Duplicate keys and
        any iterable are accepted.
        """
        check_ttl(ttl)
        wires: dict[str, str | bytes] = {}
        encode_str = self._encode_str
        encode = self.keys.encode
        for key in keys:
            wires.setdefault(encode_str(key) if type(key) is str else encode(key), key)
        return self._get_many(wires, loader, ttl)

    def _get_many(
        self,
        wires: dict[str, str | bytes],
        loader: Callable[[list[Any]], Mapping[Any, Any]] | None,
        ttl: TtlArg,
    ) -> dict[Any, Any]:
        """Read ``wire -> key`` pairs; the loader and the result use the keys."""
        result: dict[Any, Any] = {}
        use_local = self.bus is None or not self.bus.bypass_local
        missing: list[str] = []
        if not use_local:
            missing = list(wires)
        else:
            items = self.local.get_many(list(wires))
            for (wire, key), item in zip(wires.items(), items, strict=True):
                if item is MISSING:
                    missing.append(wire)
                    continue
                if signals.hit.receivers:
                    signals.send_robust(signals.hit, self, key=key, tier="local")
                if item is not NEGATIVE:
                    result[key] = self._hand_out(item)
        if not missing:
            return result
        token = self.local.begin_fill()
        self._get_many_below(wires, missing, loader, ttl, token, use_local, result)
        return result

    # -- namespaces ----------------------------------------------------------------

    def namespace(self, name: str) -> Namespace:
        """Return a view whose keys live under ``name``, invalidated together.

        See :class:`~tiercache.namespace.Namespace`.
        """
        return Namespace(self, name)

    def invalidate_namespace(self, name: str) -> None:
        """Make every entry of namespace ``name`` unreachable, in every process.

        No memcached scan: the namespace's version changes, and keys of the
        old version are never read again (they expire or are evicted).

        :raises ValueError: if ``name`` is empty or contains ``/``.
        """
        Namespace(self, name)  # validates the name
        self.namespaces.bump(name)

    # -- decorator -----------------------------------------------------------------

    def cached(
        self,
        *,
        key: Callable[..., str | bytes] | None = None,
        prefix: str | None = None,
        ttl: TtlArg = DEFAULT_TTL,
    ) -> Callable[[Callable[..., Any]], CachedFunction]:
        """Decorate a function so its results are read through this cache.

        The key is ``prefix`` (the function's module and qualified name by
        default) followed by the JSON array of its arguments, so ``f(1, 23)``
        and ``f(12, 3)`` never share an entry. Pass ``key`` to build keys
        yourself, for arguments JSON can't encode. The wrapper has
        ``invalidate(*args, **kwargs)`` and ``key_for(*args, **kwargs)``.
        """

        def decorate(function: Callable[..., Any]) -> CachedFunction:
            name = prefix if prefix is not None else _default_prefix(function, key)
            return CachedFunction(self, function, name, key, ttl)

        return decorate

    # -- writing -----------------------------------------------------------------

    def set(self, key: str | bytes, value: Any) -> None:
        """Write ``value`` through to the origin, then invalidate ``key`` everywhere.

        The origin commits first. If it raises, no tier is touched and the
        exception reaches the caller. After the commit the key is deleted
        in L2 (a delete, not a set, so concurrent writers can't leave the
        older value behind), evicted from this process's L1, and an
        invalidation is published for the other processes.

        :raises UnsupportedTypeError: before anything is written, if the
            value can't be cached.
        """
        origin = self._require_origin("set")
        wire = self.keys.encode(key)
        codec.check_value(key, value)
        # NOTE: if store() raises after the database committed (a lost
        # acknowledgement), the tiers keep the old value until their TTLs.
        origin.store(key, value)  # type: ignore[arg-type]
        self.stores += 1
        self._after_commit([wire, *namespaced_wires(self, key)], [key])

    def delete(self, key: str | bytes) -> None:
        """Delete ``key`` in the origin, then invalidate it everywhere."""
        origin = self._require_origin("delete")
        wire = self.keys.encode(key)
        origin.delete(key)  # type: ignore[arg-type]
        self.stores += 1
        self._after_commit([wire, *namespaced_wires(self, key)], [key])

    def invalidate(self, key: str | bytes) -> None:
        """Drop ``key`` from every tier in every process, without writing the origin.

        Use it after writing the origin yourself.
        """
        self.invalidate_many([key])

    def invalidate_many(self, keys: Iterable[str | bytes]) -> None:
        """Drop ``keys`` from every tier in every process."""
        keys = list(keys)
        wires = [self.keys.encode(key) for key in keys]
        for key in keys:
            wires.extend(namespaced_wires(self, key))
        if wires:
            self._after_commit(wires, keys)

    @contextlib.contextmanager
    def after_commit(self, connection: Any = None) -> Iterator[PendingInvalidation]:
        """Collect the keys a transaction of your own touches; invalidate on commit.

        Put the block around your database transaction, so that it ends
        after the commit::

            with cache.after_commit() as pending:
                with conn.transaction():
                    conn.execute("UPDATE ...")
                    pending.add("subscriber:5")

        When the block ends normally the keys are deleted in L2, evicted from
        L1 and published. When it raises (a rollback, a failed commit) nothing
        is sent, and the exception propagates.

        :param connection: a psycopg connection inside the transaction. With
            a PostgreSQL channel, each :meth:`PendingInvalidation.add` also
            sends a NOTIFY on it, which PostgreSQL delivers only if the
            transaction commits.
        """
        pending = PendingInvalidation(self, connection)
        yield pending
        if pending.wires:
            self._after_commit(pending.wires, pending.keys)

    def clear_local(self) -> None:
        """Drop every entry of this process's L1."""
        self.local.clear()

    def _after_commit(self, wires: list[str], keys: list[Any]) -> None:
        # A delete that can't reach its server now is queued and replayed
        # before that server serves again, in this process and, through a
        # "lost" message, in every other: it is counted, not raised.
        delivered = True
        if self.remote is not None:
            delivered = self.remote.delete_many(wires)
            if not delivered:
                self.invalidations_failed += 1
        self.local.invalidate(wires)
        if self.bus is not None:
            if not self.bus.publish(wires):
                self.invalidations_failed += 1
            if not delivered:
                self.bus.publish_lost_deletes(wires)
        signals.send_robust(signals.invalidated, self, keys=tuple(keys), origin="local")

    def _on_remote_invalidation(self, wires: tuple[str, ...], sender: str) -> None:
        signals.send_later(signals.invalidated, self, keys=wires, origin=sender)

    def _on_lost_deletes(self, wires: tuple[str, ...]) -> None:
        if self.remote is not None:
            self.remote.queue_lost_deletes(wires)

    def _on_resync(self) -> None:
        self.namespaces.forget_all()
        if self.remote is not None:
            self.remote.recheck_tombstones()

    def _on_degraded(self, event: str, detail: str) -> None:
        signals.send_robust(signals.degraded, self, event=event, detail=detail)

    def _on_namespace_message(self, version_keys: tuple[str, ...]) -> None:
        self.namespaces.forget(version_keys)

    def _require_origin(self, operation: str) -> Origin:
        if self.origin is None:
            raise TypeError(
                f"{operation}() writes through to an origin, and this cache has "
                f"none: pass origin= to TieredCache, or write the database "
                f"yourself and call invalidate()"
            )
        return self.origin

    # -- lifecycle and figures -----------------------------------------------------

    def wait_ready(self, timeout: float = 5.0) -> bool:
        """Wait until the channel subscription is up and L1 is in use.

        Until then reads skip L1 (with ``on_channel_loss="bypass"``).

        :returns: ``True`` when ready, ``False`` if ``timeout`` seconds passed.
        """
        deadline = time.monotonic() + timeout
        while self.bus is not None and not self.bus.is_trusted:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return True

    def stats(self) -> dict[str, Any]:
        """Return a snapshot of counters for each tier and the channel."""
        return snapshot(self)

    def close(self) -> None:
        """Stop the subscription, background refreshes and this thread's sockets."""
        if self._closed:
            return
        self._closed = True
        if self.bus is not None:
            self.bus.close()
        if self._refresher is not None:
            self._refresher.shutdown(wait=True)
        if self.remote is not None:
            self.remote.close()

    def __enter__(self) -> TieredCache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _after_fork(self) -> None:
        self._flights = {}
        self._flights_lock = threading.Lock()
        self._refresher = None
        self.local.reset_after_fork()
        if self.bus is not None and not self._closed:
            self.bus.after_fork()


def _default_prefix(
    function: Callable[..., Any], key: Callable[..., str | bytes] | None
) -> str:
    """Return the key prefix of a decorated function: its module and qualified name.

    :raises TypeError: if ``key`` doesn't build the keys and the function
        has no qualified name, or one other functions can share: a lambda or
        a nested function (closures of one factory, in any process, would
        read each other's results).
    """
    module = getattr(function, "__module__", None)
    qualname = getattr(function, "__qualname__", None)
    if module is None or qualname is None:
        if key is not None:
            return repr(function)
        raise TypeError(
            f"can't derive a cache key prefix for {function!r}, which has no "
            f"qualified name; pass prefix= or key= to cached()"
        )
    if key is None and ("<lambda>" in qualname or "<locals>" in qualname):
        raise TypeError(
            f"can't derive a cache key prefix for {qualname!r}, which other "
            f"functions (lambdas, closures of one factory) share in every "
            f"process; pass prefix= or key= to cached()"
        )
    return f"{module}.{qualname}"


def _origin_from_url(settings: Settings) -> Origin | None:
    if not settings.origin_url:
        return None
    from .adapters import origin_from_url

    return cast(Origin, origin_from_url(settings.origin_url))


_CACHES: weakref.WeakSet[TieredCache] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for cache in list(_CACHES):
        cache._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
