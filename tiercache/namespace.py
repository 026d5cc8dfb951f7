"""Namespaces: groups of keys that are invalidated together, without a scan.

Each namespace has a version, a random token stored in memcached under
:meth:`KeyCodec.version_key`. Keys of a namespace are hashed together with
the current version, so changing the version makes every entry of the old
one unreachable at once. Those entries are never read again and leave
memcached by TTL or eviction, and L1 by LRU. A random token rather than a
counter means a version key that memcached evicted can't be recreated with
an old value. Each process keeps the versions it read for at most
``local_ttl`` seconds, and an ``ns`` message on the channel makes the
others read the new version at once.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from . import codec
from .errors import RemoteTierError
from .remote import DOWN
from .sentinel import MISSING
from .ttl import DEFAULT_TTL, TtlArg, check_ttl

if TYPE_CHECKING:
    from .cache import TieredCache

log = logging.getLogger(__name__)

_SEPARATOR = "/"


def _new_version() -> str:
    return os.urandom(8).hex()


class NamespaceVersions:
    """The namespace versions this process has read from memcached."""

    def __init__(self, cache: TieredCache) -> None:
        self._cache = cache
        self._lock = threading.Lock()
        # version key -> (name, version, monotonic time it was read)
        self._known: dict[str, tuple[str, str, float]] = {}
        # Bumped whenever a known version is dropped or replaced, so a read
        # that raced such a change doesn't store the version it replaced.
        self._generation = 0

    def current(self, name: str) -> str:
        """Return the version of ``name``, reading or creating it in memcached."""
        cache = self._cache
        version_key = cache.keys.version_key(name)
        while True:
            now = time.monotonic()
            with self._lock:
                known = self._known.get(version_key)
                generation = self._generation
            if known is not None and now - known[2] < cache.settings.local_ttl:
                return known[1]
            version = self._read(name, version_key)
            if version is None:
                # memcached is unreachable: a version of this process's own
                # keeps entries apart, and nothing is filled under it in L2.
                return _new_version()
            with self._lock:
                if self._generation == generation:
                    self._known[version_key] = (name, version, now)
                    return version

    def _read(self, name: str, version_key: str) -> str | None:
        """Read ``name``'s version from memcached, creating it if missing.

        :returns: the version, or ``None`` when memcached can't be reached.
        """
        remote = self._cache.remote
        if remote is None:
            # NOTE: without memcached, versions live in this process only.
            with self._lock:
                known = self._known.get(version_key)
            return known[1] if known is not None else _new_version()
        for _attempt in range(3):
            raw = remote.get(version_key)
            if isinstance(raw, bytes):
                return raw.decode("ascii")
            if raw is DOWN:
                return None
            version = _new_version()
            if remote.add(version_key, version.encode("ascii"), None) is True:
                # A missing version key (first use, eviction, a memcached
                # restart) may leave other processes on an older version:
                # tell them to read this one.
                self._announce(version_key)
                return version
        return None

    def versions_for_write(self, name: str) -> set[str] | None:
        """Return every version a reader may still use for ``name``.

        That is the one this process has cached and the one in memcached
        now, read afresh. ``None`` when memcached can't be reached.
        """
        version_key = self._cache.keys.version_key(name)
        with self._lock:
            known = self._known.get(version_key)
        versions = set() if known is None else {known[1]}
        fresh = self._read(name, version_key)
        if fresh is None:
            return None
        versions.add(fresh)
        return versions

    def existing_versions(self, name: str) -> set[str] | None:
        """Return the versions of ``name`` in use, creating none.

        That is the one this process has cached and the one memcached
        stores, if either exists. ``None`` when memcached can't be reached.
        """
        version_key = self._cache.keys.version_key(name)
        with self._lock:
            known = self._known.get(version_key)
        versions = set() if known is None else {known[1]}
        remote = self._cache.remote
        if remote is not None:
            raw = remote.get(version_key)
            if raw is DOWN:
                return None
            if isinstance(raw, bytes):
                versions.add(raw.decode("ascii"))
        return versions

    def bump(self, name: str) -> None:
        """Give ``name`` a new version here, in memcached and in every process.

        If memcached can't store the new version, the version key is
        deleted the way a lost delete is (queued, recorded and broadcast),
        so every process creates a fresh version once the server is back.
        """
        cache = self._cache
        version_key = cache.keys.version_key(name)
        version = _new_version()
        with self._lock:
            self._generation += 1
            self._known[version_key] = (name, version, time.monotonic())
        remote = cache.remote
        if remote is not None and not remote.set(
            version_key, version.encode("ascii"), None
        ):
            recorded = remote.can_record_tombstone(version_key)
            cache._after_commit([version_key], [])
            self._announce(version_key)
            if not recorded:
                raise RemoteTierError(
                    f"namespace {name!r} was invalidated in this process and "
                    f"announced, but memcached could not store its new version "
                    f"and no other server can record that: processes that "
                    f"start before it is back may read the old entries; retry "
                    f"invalidate_namespace() once memcached is reachable"
                )
            return
        self._announce(version_key)

    def _announce(self, version_key: str) -> None:
        if self._cache.bus is not None:
            self._cache.bus.publish_namespace([version_key])

    def forget(self, version_keys: Iterable[str]) -> None:
        """Drop versions another process changed; they are read again on use."""
        with self._lock:
            self._generation += 1
            for version_key in version_keys:
                self._known.pop(version_key, None)

    def forget_all(self) -> None:
        """Drop every known version, after messages may have been lost."""
        with self._lock:
            self._generation += 1
            self._known.clear()


_failures = 0


def _warn_failure(message: str, name: str, exc: Exception) -> None:
    # Logged for the first failure and every 1000th, with the count, so an
    # outage during a stream of writes doesn't flood the log.
    global _failures
    _failures += 1
    if _failures == 1 or _failures % 1000 == 0:
        log.warning(message + " (%d such failures so far)", name, exc, _failures)


def namespaced_wires(cache: TieredCache, key: str | bytes) -> list[str]:
    """Return the namespaced keys that share the origin row of plain ``key``.

    The origin stores key ``k`` of namespace ``n`` as ``n/k``, so a plain
    write of ``"n/k"`` must also invalidate the entry of ``("n", "k")``
    under every version in use.
    """
    if isinstance(key, str):
        name, separator, rest = key.partition(_SEPARATOR)
        inner: str | bytes = rest
    else:
        raw_name, separator_bytes, raw_rest = key.partition(b"/")
        separator = separator_bytes.decode()
        try:
            name = raw_name.decode("utf-8")
        except UnicodeDecodeError:
            return []
        inner = raw_rest
    if not separator or not name:
        return []
    # NOTE: a key with "/" costs one memcached read of the namespace version.
    versions = cache.namespaces.existing_versions(name)
    if versions is None:
        # The version can't be read: drop the whole namespace instead.
        try:
            cache.invalidate_namespace(name)
        except (RemoteTierError, ValueError) as exc:
            cache.invalidations_failed += 1
            _warn_failure("invalidating namespace %r failed: %s", name, exc)
        return []
    return [cache.keys.encode_namespaced(name, v, inner) for v in sorted(versions)]


class Namespace:
    """A view of a :class:`TieredCache` whose keys live under one name.

    ``cache.namespace("tmpl").get("a:b")`` and ``cache.namespace("tmpl:a")
    .get("b")`` are different entries, and
    ``cache.invalidate_namespace("tmpl")`` drops every entry of ``tmpl``
    in every process while leaving ``tmpl:a`` alone. The origin stores the
    key as ``"<name>/<key>"``. A loader passed here receives the key without
    the name.

    :raises ValueError: if ``name`` is empty or contains ``/``.
    """

    def __init__(self, cache: TieredCache, name: str) -> None:
        if not isinstance(name, str) or not name or _SEPARATOR in name:
            raise ValueError(
                f"invalid namespace name {name!r}: use a non-empty str without '/'"
            )
        self.cache = cache
        self.name = name

    def origin_key(self, key: str | bytes) -> str | bytes:
        """Return the key the origin stores ``key`` of this namespace under."""
        if isinstance(key, bytes):
            return self.name.encode("utf-8", "surrogatepass") + b"/" + key
        return self.name + _SEPARATOR + key

    def _wire(self, key: str | bytes, version: str) -> str:
        return self.cache.keys.encode_namespaced(self.name, version, key)

    def get(
        self,
        key: str | bytes,
        loader: Callable[[Any], Any] | None = None,
        *,
        ttl: TtlArg = DEFAULT_TTL,
        default: Any = MISSING,
    ) -> Any:
        """Read ``key`` of this namespace, like :meth:`TieredCache.get`."""
        check_ttl(ttl)
        wire = self._wire(key, self.cache.namespaces.current(self.name))
        wrapped = None if loader is None else (lambda _key: loader(key))
        return self.cache._get(self.origin_key(key), wire, wrapped, ttl, default)

    def get_many(
        self,
        keys: Iterable[str | bytes],
        loader: Callable[[list[Any]], Mapping[Any, Any]] | None = None,
    ) -> dict[Any, Any]:
        """Read many keys of this namespace, like :meth:`TieredCache.get_many`."""
        version = self.cache.namespaces.current(self.name)
        wires: dict[str, str | bytes] = {}
        user_keys: dict[str | bytes, str | bytes] = {}
        for key in keys:
            origin_key = self.origin_key(key)
            user_keys[origin_key] = key
            wires.setdefault(self._wire(key, version), origin_key)
        wrapped = None
        if loader is not None:

            def wrapped(origin_keys: list[Any]) -> Mapping[Any, Any]:
                loaded = loader([user_keys[origin_key] for origin_key in origin_keys])
                return {self.origin_key(key): value for key, value in loaded.items()}

        found = self.cache._get_many(wires, wrapped, DEFAULT_TTL)
        return {user_keys[origin_key]: value for origin_key, value in found.items()}

    def set(self, key: str | bytes, value: Any) -> None:
        """Write ``key`` of this namespace through, like :meth:`TieredCache.set`."""
        cache = self.cache
        origin = cache._require_origin("set")
        codec.check_value(key, value)
        origin.store(self.origin_key(key), value)  # type: ignore[arg-type]
        cache.stores += 1
        self._invalidate_written(key)

    def delete(self, key: str | bytes) -> None:
        """Delete ``key`` of this namespace in the origin and every tier."""
        cache = self.cache
        origin = cache._require_origin("delete")
        origin.delete(self.origin_key(key))  # type: ignore[arg-type]
        cache.stores += 1
        self._invalidate_written(key)

    def invalidate(self, key: str | bytes) -> None:
        """Drop ``key`` of this namespace from every tier in every process."""
        self._invalidate_written(key)

    def _invalidate_written(self, key: str | bytes) -> None:
        # A reader may still use the version this process knows or the one
        # in memcached now, so both keys are invalidated. If memcached can't
        # tell the current version, the whole namespace is bumped instead.
        versions = self.cache.namespaces.versions_for_write(self.name)
        if versions is None:
            try:
                self.cache.invalidate_namespace(self.name)
            except RemoteTierError as exc:
                # The origin committed, so the write is kept and every running
                # process received the bump. Only processes started later are
                # at risk (see the message), and a committed write is not
                # reported as failed.
                self.cache.invalidations_failed += 1
                _warn_failure("namespace write of %r: %s", self.name, exc)
            return
        wires = [self._wire(key, version) for version in sorted(versions)]
        # The same origin row is also the plain key "<name>/<key>".
        wires.append(self.cache.keys.encode(self.origin_key(key)))
        self.cache._after_commit(wires, [key] * len(wires))

    def invalidate_all(self) -> None:
        """Drop every entry of this namespace, in every process."""
        self.cache.invalidate_namespace(self.name)
