"""The cache front: the read path through the tiers, and write-through."""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import math
import os
import random
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Final, NamedTuple, cast

import orjson

from . import codec, signals
from .channel import make_channel
from .codec import KIND_JSON, KIND_LEASE, KIND_NEGATIVE, UndecodableValue
from .contracts import Channel, Origin
from .decorator import CachedFunction
from .invalidation import InvalidationBus
from .keys import KeyCodec
from .local import LocalTier
from .namespace import Namespace, NamespaceVersions
from .remote import DOWN, ITEM_OVERHEAD, RemoteTier
from .sentinel import MISSING
from .settings import Settings
from .stats import snapshot
from .transaction import PendingInvalidation
from .ttl import DEFAULT_TTL, TtlArg, _Default, check_ttl

log = logging.getLogger(__name__)


class _Negative:
    """The L1 item for "the origin has no such row"."""

    def __repr__(self) -> str:
        return "NEGATIVE"


NEGATIVE: Final = _Negative()

_LEASE_POLL_FIRST = 0.002
_LEASE_POLL_MAX = 0.05
_REFRESH_WORKERS = 4


class _Flight:
    """One fill of one key in this process, shared by the threads that miss it."""

    __slots__ = ("done", "item", "error", "token")

    def __init__(self, token: int) -> None:
        self.done = threading.Event()
        self.item: Any = None
        self.error: BaseException | None = None
        self.token = token


class _Found(NamedTuple):
    """A value read from L2: its kind, its L1 item, the body size, its header."""

    kind: bytes
    item: Any
    size: int
    envelope: codec.Envelope


class _Ttl(NamedTuple):
    """The TTLs of one fill, in seconds: fresh in L2 (None: no expiry), L1."""

    remote: float | None
    local: float
    cacheable: bool


class TieredCache:
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
        self.local = LocalTier(
            max_entries=self.settings.local_max_entries,
            max_bytes=self.settings.local_max_bytes,
            clock=clock,
        )
        self.namespaces = NamespaceVersions(self)
        self.remote = (
            RemoteTier(self.settings) if self.settings.memcached_servers else None
        )
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
                clock=clock,
            )
            self.bus.start()
        self._flights: dict[str, _Flight] = {}
        self._flights_lock = threading.Lock()
        self._refresher: concurrent.futures.ThreadPoolExecutor | None = None
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
        self._closed = False
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
            ``MISSING`` when the origin has no such row (that answer is
            cached for ``negative_ttl``). Defaults to ``origin.load``.
        :param ttl: seconds to keep a value loaded now; ``None`` for no
            expiry in L2 (L1 still expires after ``local_ttl``, the bound on
            staleness); 0 or less to load without caching. Fractions round
            up to whole seconds in both tiers.
        :param default: returned instead of ``MISSING`` on a miss.
        :raises UnsupportedTypeError: if the loaded value can't be cached.
        :raises TypeError: for a ``ttl`` that is not a number or ``None``.
        """
        check_ttl(ttl)
        return self._get(key, self.keys.encode(key), loader, ttl, default)

    def _get(
        self,
        key: str | bytes,
        wire: str,
        loader: Callable[[Any], Any] | None,
        ttl: TtlArg,
        default: Any,
    ) -> Any:
        use_local = self.bus is None or not self.bus.bypass_local
        if use_local:
            item = self.local.get(wire)
            if item is not MISSING:
                signals.send_robust(signals.hit, self, key=key, tier="local")
                return default if item is NEGATIVE else self._hand_out(item)
        item = self._load_shared(key, wire, loader, ttl, use_local)
        return default if item is NEGATIVE else self._hand_out(item)

    def _hand_out(self, item: Any) -> Any:
        # In copy mode L1 holds the JSON body, so every caller gets its own
        # objects and can't corrupt what others read.
        if self.settings.local_copy:
            return orjson.loads(item)
        return item

    def _load_shared(
        self,
        key: str | bytes,
        wire: str,
        loader: Callable[[Any], Any] | None,
        ttl: TtlArg,
        use_local: bool,
    ) -> Any:
        """Fill ``wire`` once per process however many threads miss it at once.

        A caller joins a flight only if the key was not invalidated since the
        flight began: that flight may be loading the row a write has since
        replaced, and a caller that arrives after the write must see it.
        Such a caller starts a new flight in the old one's place.
        """
        token = self.local.begin_fill()
        try:
            with self._flights_lock:
                flight = self._flights.get(wire)
                leader = flight is None or self.local.is_voided(wire, flight.token)
                if leader:
                    flight = self._flights[wire] = _Flight(token)
            assert flight is not None
            if not leader:
                if flight.done.wait(self.settings.fill_wait):
                    if flight.error is not None:
                        raise flight.error
                    return flight.item
                # NOTE: the leader is slower than fill_wait; load without sharing.
                return self._fetch(key, wire, loader, ttl, use_local, token)
            try:
                flight.item = self._fetch(key, wire, loader, ttl, use_local, token)
                return flight.item
            except BaseException as exc:
                flight.error = exc
                raise
            finally:
                with self._flights_lock:
                    if self._flights.get(wire) is flight:
                        del self._flights[wire]
                flight.done.set()
        finally:
            self.local.end_fill(token)

    def _fetch(
        self,
        key: str | bytes,
        wire: str,
        loader: Callable[[Any], Any] | None,
        ttl: TtlArg,
        use_local: bool,
        token: int,
    ) -> Any:
        """Read L2, then load through a lease; return the L1 item (body or object).

        ``token`` was taken before L2 is read: an invalidation that arrives
        after that voids the L1 fill below, even if L2 answered with a value
        the invalidation was about.
        """
        lease: bytes | None = None
        if self.remote is not None:
            found = self._read_remote(wire)
            if found is not MISSING and found.kind is not KIND_LEASE:
                return self._use_remote(key, wire, loader, ttl, found, token, use_local)
            lease, found = self._acquire_lease(wire, found)
            if found is not MISSING:
                return self._use_remote(key, wire, loader, ttl, found, token, use_local)
        signals.send_robust(signals.miss, self, key=key)
        started = time.monotonic()
        try:
            value = self._call_loader(key, loader)
        except BaseException:
            self._release_lease(wire, lease)
            raise
        load_seconds = time.monotonic() - started
        return self._fill(key, wire, value, ttl, lease, token, use_local, load_seconds)

    def _use_remote(
        self,
        key: str | bytes,
        wire: str,
        loader: Callable[[Any], Any] | None,
        ttl: TtlArg,
        found: _Found,
        token: int,
        use_local: bool,
    ) -> Any:
        """Serve an L2 value, refreshing it in the background when due."""
        signals.send_robust(signals.hit, self, key=key, tier="remote")
        fresh_until = found.envelope.fresh_until
        now = time.time()
        if fresh_until and found.kind is KIND_JSON:
            stale = now >= fresh_until and self.settings.stale_ttl > 0
            if stale or self._refresh_early(found.envelope, now):
                self._start_refresh(key, wire, loader, ttl)
            if stale:
                # Served at once, but not kept in L1: the refresh replaces it.
                self.stale_served += 1
                return found.item
        if use_local:
            self._fill_local_from_remote(wire, found, token, now)
        return found.item

    def _refresh_early(self, envelope: codec.Envelope, now: float) -> bool:
        # XFetch (Vattani et al., VLDB 2015): refresh before expiry with a
        # probability that grows as expiry nears and with the load's cost.
        beta = self.settings.early_refresh_beta
        if not beta or not envelope.load_seconds:
            return False
        gap = -envelope.load_seconds * beta * math.log(1.0 - random.random())
        return now + gap >= envelope.fresh_until

    def _read_remote(self, wire: str) -> Any:
        """Return the :class:`_Found` value of ``wire`` in L2, or ``MISSING``."""
        assert self.remote is not None
        raw = self.remote.get(wire)
        if raw is None or raw is DOWN:
            return MISSING
        return self._decode(wire, raw)  # type: ignore[arg-type]

    def _decode(self, wire: str, raw: bytes) -> Any:
        try:
            envelope = codec.unpack(raw)
            if envelope.kind == KIND_JSON:
                value = orjson.loads(envelope.body)
                item = envelope.body if self.settings.local_copy else value
                return _Found(KIND_JSON, item, len(envelope.body), envelope)
        except (UndecodableValue, orjson.JSONDecodeError) as exc:
            self.undecodable += 1
            if self.undecodable == 1 or self.undecodable % 1000 == 0:
                log.warning(
                    "%d undecodable remote values read as misses, latest: %s",
                    self.undecodable,
                    exc,
                )
            log.debug("undecodable remote value for %s", wire)
            assert self.remote is not None
            self.remote.delete_many([wire])
            return MISSING
        if envelope.kind == KIND_NEGATIVE:
            return _Found(KIND_NEGATIVE, NEGATIVE, 0, envelope)
        return _Found(KIND_LEASE, envelope.body, 0, envelope)

    def _acquire_lease(self, wire: str, found: Any) -> tuple[bytes | None, Any]:
        """Take the right to fill ``wire`` in L2, or wait for whoever has it.

        :returns: ``(lease, MISSING)`` when this caller must load (``lease``
            is ``None`` if it may not fill L2), or ``(None, found)`` when
            another caller's fill arrived while waiting.
        """
        assert self.remote is not None
        if found is MISSING:
            lease = codec.pack(KIND_LEASE, os.urandom(12))
            added = self.remote.add(wire, lease, self.settings.lease_ttl)
            if added is DOWN:
                return None, MISSING
            if added:
                return lease, MISSING
        self.lease_waits += 1
        deadline = time.monotonic() + self.settings.lease_wait
        pause = _LEASE_POLL_FIRST
        while time.monotonic() < deadline:
            time.sleep(pause)
            pause = min(pause * 2, _LEASE_POLL_MAX)
            found = self._read_remote(wire)
            if found is not MISSING and found.kind is not KIND_LEASE:
                return None, found
            if found is MISSING:
                # The holder gave up or a write voided its lease: try again.
                lease = codec.pack(KIND_LEASE, os.urandom(12))
                added = self.remote.add(wire, lease, self.settings.lease_ttl)
                if added is DOWN:
                    return None, MISSING
                if added:
                    return lease, MISSING
        # Waited long enough: load without filling L2 rather than fail.
        self.lease_wait_timeouts += 1
        return None, MISSING

    def _fill_local_from_remote(
        self, wire: str, found: _Found, token: int, now: float
    ) -> None:
        ttl = self.settings.local_ttl
        envelope = found.envelope
        if envelope.fresh_until:
            ttl = min(ttl, envelope.fresh_until - now)
        elif envelope.expires_at:
            ttl = min(ttl, envelope.expires_at - now)
        if ttl > 0:
            self.local.fill(wire, found.item, found.size, ttl, token)

    def _call_loader(
        self, key: str | bytes, loader: Callable[[Any], Any] | None
    ) -> Any:
        self.loads += 1
        if loader is not None:
            return loader(key)
        if self.origin is not None:
            return self.origin.load(key)  # type: ignore[arg-type]
        return MISSING

    def _ttls(self, ttl: TtlArg, negative: bool) -> _Ttl:
        settings = self.settings
        remote: float | None
        if isinstance(ttl, _Default):
            remote = settings.remote_ttl
        else:
            remote = ttl
        if negative and (remote is None or remote > 0):
            # "No such row" keeps its own, usually shorter, TTL.
            remote = (
                settings.negative_ttl
                if remote is None
                else min(remote, settings.negative_ttl)
            )
        if remote is None:
            return _Ttl(None, settings.local_ttl, True)
        if remote <= 0:
            return _Ttl(0, 0, False)
        if settings.ttl_jitter and not negative:
            # Entries written together (a campaign's first wave) would
            # otherwise expire together and stampede together.
            remote *= 1 - settings.ttl_jitter * random.random()
        remote = float(math.ceil(remote))
        return _Ttl(remote, min(remote, settings.local_ttl), True)

    def _encode_fill(
        self, key: str | bytes, value: Any, ttl: TtlArg, load_seconds: float
    ) -> tuple[Any, int, _Ttl, bytes]:
        """Check and encode a loaded value: ``(L1 item, size, TTLs, L2 payload)``.

        :raises UnsupportedTypeError: if the value can't be cached.
        """
        negative = value is MISSING
        ttls = self._ttls(ttl, negative)
        now = time.time()
        if negative:
            expires_at = now + ttls.remote if ttls.remote else 0.0
            return (
                NEGATIVE,
                0,
                ttls,
                codec.pack(KIND_NEGATIVE, b"", expires_at=expires_at),
            )
        codec.check_value(key, value)
        body = codec.dump_body(value)
        item = body if self.settings.local_copy else orjson.loads(body)
        fresh_until = expires_at = 0.0
        if ttls.remote:
            fresh_until = now + ttls.remote
            expires_at = fresh_until + self.settings.stale_ttl
        payload = codec.pack_value(
            body,
            compress_threshold=self.settings.compress_threshold,
            fresh_until=fresh_until,
            expires_at=expires_at,
            load_seconds=load_seconds,
        )
        return item, len(body), ttls, payload

    def _remote_expire(self, ttls: _Ttl, negative: bool) -> float | None:
        if ttls.remote is None:
            return None
        return ttls.remote if negative else ttls.remote + self.settings.stale_ttl

    def _fill(
        self,
        key: str | bytes,
        wire: str,
        value: Any,
        ttl: TtlArg,
        lease: bytes | None,
        token: int,
        use_local: bool,
        load_seconds: float = 0.0,
    ) -> Any:
        """Store a loaded value in L2 (through the lease) and L1; return the L1 item."""
        try:
            item, size, ttls, payload = self._encode_fill(key, value, ttl, load_seconds)
        except Exception:
            self._release_lease(wire, lease)
            raise
        if not ttls.cacheable:
            self._release_lease(wire, lease)
            return item
        if lease is not None:
            expire = self._remote_expire(ttls, item is NEGATIVE)
            self._fill_remote(wire, lease, payload, expire)
        if use_local:
            self.local.fill(wire, item, size, ttls.local, token)
        signals.send_robust(signals.fill, self, key=key, tier="local")
        return item

    def _fill_remote(
        self, wire: str, lease: bytes, payload: bytes, ttl: float | None
    ) -> None:
        assert self.remote is not None
        if self._too_large(wire, payload):
            self._release_lease(wire, lease)
            return
        current = self.remote.gets(wire)
        if current is DOWN:
            return
        held, cas = current  # type: ignore[misc]
        if held != lease or cas is None:
            # A write deleted the lease after this load began: the loaded
            # value may predate the write, so it must not land in L2.
            self.stale_fills_dropped += 1
            return
        self.remote.cas(wire, payload, cas, ttl)

    def _too_large(self, wire: str, payload: bytes) -> bool:
        if len(payload) + len(wire) + ITEM_OVERHEAD <= self.settings.max_item_size:
            return False
        self.too_large += 1
        if self.too_large == 1 or self.too_large % 1000 == 0:
            log.warning(
                "%d values too large for memcached kept out of L2 (latest %d bytes)",
                self.too_large,
                len(payload),
            )
        log.debug("value of %s too large for memcached", wire)
        return True

    def _release_lease(self, wire: str, lease: bytes | None) -> None:
        if lease is None or self.remote is None:
            return
        current = self.remote.gets(wire)
        if current is not DOWN and current[0] == lease:  # type: ignore[index]
            self.remote.delete_many([wire])

    # -- background refresh --------------------------------------------------------

    def _start_refresh(
        self,
        key: str | bytes,
        wire: str,
        loader: Callable[[Any], Any] | None,
        ttl: TtlArg,
    ) -> None:
        """Refresh ``wire`` in the background unless another caller already does."""
        assert self.remote is not None
        marker = self.keys.encode(b"refresh\0" + wire.encode("ascii"))
        if self.remote.add(marker, b"", self.settings.lease_ttl) is not True:
            return
        if self._refresher is None:
            self._refresher = concurrent.futures.ThreadPoolExecutor(
                _REFRESH_WORKERS, thread_name_prefix="tiercache-refresh"
            )
        self._refresher.submit(self._refresh, key, wire, loader, ttl, marker)

    def _refresh(
        self,
        key: str | bytes,
        wire: str,
        loader: Callable[[Any], Any] | None,
        ttl: TtlArg,
        marker: str,
    ) -> None:
        assert self.remote is not None
        token = self.local.begin_fill()
        try:
            # The cas token is read before loading: a write-through deletes
            # the key, so a refresh that loaded the old row can't store it.
            current = self.remote.gets(wire)
            if current is DOWN or current[1] is None:  # type: ignore[index]
                return
            cas = current[1]  # type: ignore[index]
            started = time.monotonic()
            value = self._call_loader(key, loader)
            load_seconds = time.monotonic() - started
            item, size, ttls, payload = self._encode_fill(key, value, ttl, load_seconds)
            if not ttls.cacheable or self._too_large(wire, payload):
                return
            expire = self._remote_expire(ttls, item is NEGATIVE)
            if not self.remote.cas(wire, payload, cas, expire):
                self.stale_fills_dropped += 1
                return
            self.refreshes += 1
            if self.bus is None or not self.bus.bypass_local:
                self.local.fill(wire, item, size, ttls.local, token)
        except Exception:  # noqa: BLE001 - nobody waits on a background refresh
            self.refresh_errors += 1
            log.exception("background refresh failed; the stale value stays")
        finally:
            self.local.end_fill(token)
            self.remote.delete_many([marker])

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
        for key in keys:
            wires.setdefault(self.keys.encode(key), key)
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
        for wire, key in wires.items():
            item = self.local.get(wire) if use_local else MISSING
            if item is MISSING:
                missing.append(wire)
                continue
            signals.send_robust(signals.hit, self, key=key, tier="local")
            if item is not NEGATIVE:
                result[key] = self._hand_out(item)
        if not missing:
            return result
        token = self.local.begin_fill()
        try:
            self._get_many_below(wires, missing, loader, ttl, token, use_local, result)
        finally:
            self.local.end_fill(token)
        return result

    def _get_many_below(
        self,
        wires: dict[str, str | bytes],
        missing: list[str],
        loader: Callable[[list[Any]], Mapping[Any, Any]] | None,
        ttl: TtlArg,
        token: int,
        use_local: bool,
        result: dict[Any, Any],
    ) -> None:
        leases: dict[str, bytes | None] = {}
        if self.remote is not None:
            found, down = self.remote.get_many(missing)
            now = time.time()
            to_load: list[str] = []
            for wire in missing:
                raw = found.get(wire)
                decoded = self._decode(wire, raw) if raw is not None else MISSING
                if decoded is MISSING or decoded.kind is KIND_LEASE:
                    to_load.append(wire)
                    continue
                signals.send_robust(signals.hit, self, key=wires[wire], tier="remote")
                if use_local:
                    self._fill_local_from_remote(wire, decoded, token, now)
                if decoded.item is not NEGATIVE:
                    result[wires[wire]] = self._hand_out(decoded.item)
            # NOTE: one add per key; a batch that misses everywhere costs a
            # round trip per key here, on top of the origin's single query.
            held: list[str] = []
            for wire in to_load:
                lease = None
                if wire not in down:
                    lease = codec.pack(KIND_LEASE, os.urandom(12))
                    added = self.remote.add(wire, lease, self.settings.lease_ttl)
                    if added is not True:
                        lease = None
                        if added is False:
                            held.append(wire)
                leases[wire] = lease
            arrived = self._wait_for_fills(held, wires, token, use_local, result)
            missing = [wire for wire in to_load if wire not in arrived]
        for wire in missing:
            signals.send_robust(signals.miss, self, key=wires[wire])
        if not missing:
            return
        keys = [wires[wire] for wire in missing]
        self.loads += len(keys)
        filled = 0
        try:
            loaded = self._load_many(keys, loader)
            for wire in missing:
                key = wires[wire]
                value = loaded.get(key, MISSING)
                lease = leases.get(wire)
                item = self._fill(key, wire, value, ttl, lease, token, use_local)
                filled += 1
                if item is not NEGATIVE:
                    result[key] = self._hand_out(item)
        except BaseException:
            # Release every lease the batch still holds; releasing one that
            # is already gone does nothing.
            for wire in missing[filled:]:
                self._release_lease(wire, leases.get(wire))
            raise

    def _wait_for_fills(
        self,
        held: list[str],
        wires: dict[str, str | bytes],
        token: int,
        use_local: bool,
        result: dict[Any, Any],
    ) -> set[str]:
        """Poll L2 for keys whose lease another caller holds, up to ``lease_wait``.

        :returns: the keys whose fill arrived; their values are in ``result``.
        """
        assert self.remote is not None
        arrived: set[str] = set()
        if not held:
            return arrived
        self.lease_waits += 1
        deadline = time.monotonic() + self.settings.lease_wait
        pause = _LEASE_POLL_FIRST
        waiting = list(held)
        while waiting and time.monotonic() < deadline:
            time.sleep(pause)
            pause = min(pause * 2, _LEASE_POLL_MAX)
            found, _down = self.remote.get_many(waiting)
            now = time.time()
            for wire, raw in found.items():
                decoded = self._decode(wire, raw)
                if decoded is MISSING or decoded.kind is KIND_LEASE:
                    continue
                arrived.add(wire)
                if use_local:
                    self._fill_local_from_remote(wire, decoded, token, now)
                if decoded.item is not NEGATIVE:
                    result[wires[wire]] = self._hand_out(decoded.item)
            waiting = [wire for wire in waiting if wire not in arrived]
        if waiting:
            self.lease_wait_timeouts += 1
        return arrived

    def _load_many(
        self,
        keys: list[Any],
        loader: Callable[[list[Any]], Mapping[Any, Any]] | None,
    ) -> Mapping[Any, Any]:
        if loader is not None:
            return loader(keys)
        if self.origin is not None:
            return self.origin.load_many(keys)
        return {}

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
        """
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
            name = prefix or f"{function.__module__}.{function.__qualname__}"
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
        origin.store(key, value)  # type: ignore[arg-type]
        self.stores += 1
        self._after_commit([wire], [key])

    def delete(self, key: str | bytes) -> None:
        """Delete ``key`` in the origin, then invalidate it everywhere."""
        origin = self._require_origin("delete")
        wire = self.keys.encode(key)
        origin.delete(key)  # type: ignore[arg-type]
        self.stores += 1
        self._after_commit([wire], [key])

    def invalidate(self, key: str | bytes) -> None:
        """Drop ``key`` from every tier in every process, without writing the origin.

        Use it after writing the origin yourself.
        """
        self.invalidate_many([key])

    def invalidate_many(self, keys: Iterable[str | bytes]) -> None:
        """Drop ``keys`` from every tier in every process."""
        keys = list(keys)
        wires = [self.keys.encode(key) for key in keys]
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
        signals.send_robust(signals.invalidated, self, keys=wires, origin=sender)

    def _on_lost_deletes(self, wires: tuple[str, ...]) -> None:
        if self.remote is not None:
            self.remote.queue_lost_deletes(wires)

    def _on_resync(self) -> None:
        self.namespaces.forget_all()
        if self.remote is not None:
            self.remote.recheck_tombstones()

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
