"""Filling the tiers after a miss: single flight, leases, TTLs.

:class:`FillMixin` holds the steps below L1 of :class:`~tiercache.TieredCache`'s
read path, each a method testable alone: read L2, take or wait for a lease,
call the loader, encode, and fill L2 through the lease and L1 through the
fill guard. ``refresh.py`` refreshes stale entries in the background, and
``batch.py`` runs the same steps for a batch.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import os
import random
import threading
import time
from collections.abc import Callable
from typing import Any, Final, NamedTuple

import orjson

from . import codec, signals
from .codec import KIND_JSON, KIND_LEASE, KIND_NEGATIVE, UndecodableValue
from .contracts import Origin
from .invalidation import InvalidationBus
from .keys import KeyCodec
from .local import LocalTier
from .remote import DOWN, ITEM_OVERHEAD, RemoteTier
from .sentinel import MISSING
from .settings import Settings
from .ttl import TtlArg, _Default

log = logging.getLogger(__name__)


class _Negative:
    """The L1 item for "the origin has no such row"."""

    def __repr__(self) -> str:
        return "NEGATIVE"


NEGATIVE: Final = _Negative()


class _Unparsed:
    def __repr__(self) -> str:
        return "UNPARSED"


UNPARSED: Final = _Unparsed()
"""Marks a read whose caller must still parse the L1 item for its own copy."""

_UNREAD: Final = object()
"""Passed as ``found`` when L2 has not been read yet."""

_LEASE_POLL_FIRST = 0.002
# Waiters poll L2 at most this far apart, so they see a fill soon after it lands.
_LEASE_POLL_MAX = 0.01
SHARED_SIZE_FACTOR = 5
# Bytes of a bytes object beyond its length (its header): 33 on CPython 3.11.
_BYTES_HEADER = b"".__sizeof__()


class _Flight:
    """One fill of one key in this process, shared by the threads that miss it.

    ``done`` is created by the first thread that joins, under the flights
    lock, so a fill without waiters costs no Event.
    """

    __slots__ = ("done", "item", "error", "token")

    def __init__(self, token: int) -> None:
        self.done: threading.Event | None = None
        self.item: Any = None
        self.error: BaseException | None = None
        self.token = token


class _Found(NamedTuple):
    """A value read from L2: its kind, L1 item, body size, header, parsed value."""

    kind: bytes
    item: Any
    size: int
    envelope: codec.Envelope
    value: Any


class _Ttl(NamedTuple):
    """The TTLs of one fill, in seconds: fresh in L2 (None: no expiry), L1."""

    remote: float | None
    local: float
    cacheable: bool


class FillMixin:
    """The read path below L1; :class:`~tiercache.TieredCache` provides the state."""

    settings: Settings
    origin: Origin | None
    keys: KeyCodec
    local: LocalTier
    remote: RemoteTier | None
    bus: InvalidationBus | None
    _flights: dict[str, _Flight]
    _flights_lock: threading.Lock
    _refresher: concurrent.futures.ThreadPoolExecutor | None
    loads: int
    stale_fills_dropped: int
    lease_waits: int
    lease_wait_timeouts: int
    stale_served: int
    refreshes: int
    refresh_errors: int
    undecodable: int
    too_large: int

    def _hand_out(self, item: Any) -> Any:
        # In copy mode L1 stores the JSON body, so every caller gets its own
        # objects and can't corrupt what others read.
        if self.settings.local_copy:
            return orjson.loads(item)
        return item

    def _read_through(
        self,
        key: str | bytes,
        wire: str,
        loader: Callable[[Any], Any] | None,
        ttl: TtlArg,
        use_local: bool,
    ) -> Any:
        """Serve an L2 hit at once, or load on a miss as :meth:`_load_shared` does.

        Threads that miss L1 together each read L2 (one round trip, which
        is what waiting for another thread's read would cost). Only the
        load from the origin is shared, and leases share it between
        processes. Returns ``(item, value)`` like :meth:`_load_shared`.
        """
        token = self.local.begin_fill()
        found = self._read_remote(wire)
        if found is not MISSING and found.kind is not KIND_LEASE:
            return self._use_remote(key, wire, loader, ttl, found, token, use_local)
        return self._load_shared(key, wire, loader, ttl, use_local, (token, found))

    def _load_shared(
        self,
        key: str | bytes,
        wire: str,
        loader: Callable[[Any], Any] | None,
        ttl: TtlArg,
        use_local: bool,
        read: tuple[int, Any] | None = None,
    ) -> Any:
        """Fill ``wire`` once per process however many threads miss it at once.

        Returns ``(item, value)``: the L1 item and the caller's value, or
        ``UNPARSED`` when the caller shares another thread's fill and must
        take its own copy of the item. ``read`` is ``(token, found)`` of an
        L2 read the caller made already, with the token taken before it.

        A caller joins a flight only if the key was not invalidated since the
        flight began: that flight may be loading the row a write has since
        replaced, and a caller that arrives after the write must see it.
        Such a caller starts a new flight in the old one's place.
        """
        token, found = (self.local.begin_fill(), _UNREAD) if read is None else read
        with self._flights_lock:
            flight = self._flights.get(wire)
            leader = flight is None or self.local.is_voided(wire, flight.token)
            if leader:
                flight = self._flights[wire] = _Flight(token)
            elif flight is not None and flight.done is None:
                flight.done = threading.Event()
        assert flight is not None
        if not leader:
            assert flight.done is not None
            if flight.done.wait(self.settings.fill_wait):
                if flight.error is not None:
                    raise flight.error
                return flight.item, UNPARSED
            # NOTE: the leader is slower than fill_wait; load without sharing.
            return self._fetch(key, wire, loader, ttl, use_local, token, found)
        try:
            item, value = self._fetch(key, wire, loader, ttl, use_local, token, found)
            flight.item = item
            return item, value
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            with self._flights_lock:
                if self._flights.get(wire) is flight:
                    del self._flights[wire]
                done = flight.done
            if done is not None:
                done.set()

    def _fetch(
        self,
        key: str | bytes,
        wire: str,
        loader: Callable[[Any], Any] | None,
        ttl: TtlArg,
        use_local: bool,
        token: int,
        found: Any = _UNREAD,
    ) -> Any:
        """Read L2, then load through a lease; return ``(L1 item, value)``.

        ``token`` was taken before L2 is read: an invalidation that arrives
        after that voids the L1 fill below, even if L2 returned a value
        the invalidation was about. ``found`` is what an earlier L2 read
        with this token returned, or ``_UNREAD``.
        """
        lease: bytes | None = None
        if self.remote is not None:
            if found is _UNREAD:
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
        if signals.hit.receivers:
            signals.send_robust(signals.hit, self, key=key, tier="remote")
        now = time.time()
        if found.envelope.fresh_until and self._refresh_if_due(
            key, wire, loader, ttl, found, now
        ):
            # Served at once, but not kept in L1: the refresh replaces it.
            return found.item, found.value
        if use_local:
            self._fill_local_from_remote(wire, found, token, now)
        return found.item, found.value

    def _refresh_if_due(
        self,
        key: str | bytes,
        wire: str,
        loader: Callable[[Any], Any] | None,
        ttl: TtlArg,
        found: _Found,
        now: float,
    ) -> bool:
        """Start a background refresh of a stale or soon-stale value.

        :returns: whether the value is stale (past fresh, inside the window).
        """
        fresh_until = found.envelope.fresh_until
        if not fresh_until or found.kind is not KIND_JSON:
            return False
        stale = now >= fresh_until and self.settings.stale_ttl > 0
        if stale or self._refresh_early(found.envelope, now):
            self._start_refresh(key, wire, loader, ttl)
        if stale:
            self.stale_served += 1
        return stale

    def _refresh_early(self, envelope: codec.Envelope, now: float) -> bool:
        # XFetch: refresh before expiry with a probability that grows as
        # expiry nears and with the load's cost (gap = -load * beta * ln(u)).
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
            if envelope.expires_at and time.time() >= envelope.expires_at:
                # memcached counts whole seconds and may keep an item up to
                # a second past its expiry: past the header's time, it's gone.
                assert self.remote is not None
                self.remote.delete_many([wire])
                return MISSING
            if envelope.kind == KIND_JSON:
                body = envelope.body
                value = orjson.loads(body)
                item = body if self.settings.local_copy else value
                size = self._charged_size(len(body))
                return _Found(KIND_JSON, item, size, envelope, value)
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
            return _Found(KIND_NEGATIVE, NEGATIVE, 0, envelope, NEGATIVE)
        return _Found(KIND_LEASE, envelope.body, 0, envelope, None)

    def _acquire_lease(self, wire: str, found: Any) -> tuple[bytes | None, Any]:
        """Take the right to fill ``wire`` in L2, or wait for the caller that has it.

        :returns: ``(lease, MISSING)`` when this caller must load (``lease``
            is ``None`` if it may not fill L2), or ``(None, found)`` when
            another caller's fill arrived while waiting.
        """
        if found is MISSING:
            lease, added = self._try_lease(wire)
            if added is not False:
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
                lease, added = self._try_lease(wire)
                if added is not False:
                    return lease, MISSING
        # Waited long enough: load without filling L2 rather than fail.
        self.lease_wait_timeouts += 1
        return None, MISSING

    def _try_lease(self, wire: str) -> tuple[bytes | None, bool | Any]:
        """Add a lease marker for ``wire`` in L2.

        :returns: ``(lease, True)`` if this caller holds the lease now,
            ``(None, False)`` if another caller does, and ``(None, DOWN)``
            if the server is down (load, but don't fill L2).
        """
        assert self.remote is not None
        lease = codec.pack(KIND_LEASE, os.urandom(12))
        added = self.remote.add(wire, lease, self.settings.lease_ttl)
        if added is True:
            return lease, True
        return None, added

    def _fill_local_from_remote(
        self, wire: str, found: _Found, token: int, now: float
    ) -> None:
        ttl = self._remote_local_ttl(found, now)
        if ttl > 0:
            self.local.fill(wire, found.item, found.size, ttl, token)

    def _remote_local_ttl(self, found: _Found, now: float) -> float:
        """Return the L1 TTL of a value read from L2: never past its L2 life."""
        envelope = found.envelope
        if not envelope.fresh_until:
            ttl = self.settings.local_ttl
            if envelope.expires_at:
                ttl = min(ttl, envelope.expires_at - now)
            return ttl
        return self._local_ttl(
            self.settings.local_ttl, envelope.fresh_until, envelope.load_seconds, now
        )

    def _local_ttl(
        self, ttl: float, fresh_until: float, load_seconds: float, now: float
    ) -> float:
        """Cap an L1 TTL so L1 keeps no entry past its fresh time.

        With early refresh on, L1 also lets go a little before that (three
        times the expected early-refresh lead), so reads reach L2, where
        the early-refresh draw happens, while a refresh is still likely.
        """
        if not fresh_until:
            return ttl
        ttl = min(ttl, fresh_until - now)
        beta = self.settings.early_refresh_beta
        if beta and load_seconds:
            ttl = min(ttl, fresh_until - now - 3 * beta * load_seconds)
        return ttl

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
            local = self._local_ttl(ttls.local, fresh_until, load_seconds, now)
            ttls = _Ttl(ttls.remote, local, ttls.cacheable)
        payload = codec.pack_value(
            body,
            compress_threshold=self.settings.compress_threshold,
            fresh_until=fresh_until,
            expires_at=expires_at,
            load_seconds=load_seconds,
        )
        return item, self._charged_size(len(body)), ttls, payload

    def _charged_size(self, body_size: int) -> int:
        """Return the L1 bytes to charge for a value whose JSON is ``body_size``."""
        if self.settings.local_copy:
            return body_size + _BYTES_HEADER
        # Shared mode keeps the parsed objects, so this is an estimate. With
        # orjson 3.13 on CPython 3.11 they take 1.1x (templates) to 4.5x
        # (lists of large ints) their JSON size, measured with tracemalloc.
        # Lists of small dicts or short strings take 8x, and lists of empty
        # containers 21x.
        return body_size * SHARED_SIZE_FACTOR

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
        """Store a loaded value in L2 (through the lease) and L1.

        :returns: ``(L1 item, value)``; the loader's own object is the
            caller's value, since L1 keeps a separate copy.
        """
        try:
            item, size, ttls, payload = self._encode_fill(key, value, ttl, load_seconds)
        except Exception:
            self._release_lease(wire, lease)
            raise
        caller_value = NEGATIVE if item is NEGATIVE else value
        if not ttls.cacheable:
            self._release_lease(wire, lease)
            return item, caller_value
        if lease is not None:
            expire = self._remote_expire(ttls, item is NEGATIVE)
            self._fill_remote(wire, lease, payload, expire)
        if use_local and ttls.local > 0:
            self.local.fill(wire, item, size, ttls.local, token)
        signals.send_robust(signals.fill, self, key=key, tier="local")
        return item, caller_value

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
        stored, cas = current  # type: ignore[misc]
        if stored != lease or cas is None:
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

    def _start_refresh(
        self,
        key: str | bytes,
        wire: str,
        loader: Callable[[Any], Any] | None,
        ttl: TtlArg,
    ) -> None:
        """Refresh ``wire`` in the background; see :class:`RefreshMixin`."""
        raise NotImplementedError
