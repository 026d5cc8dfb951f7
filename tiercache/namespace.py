"""Namespaces: groups of keys that are invalidated together, without a scan.

Each namespace has a version, a random token stored in memcached under
:meth:`KeyCodec.version_key`. Keys of a namespace are hashed together with
the current version, so changing the version makes every entry of the old
one unreachable at once; those entries are never read again and leave
memcached by TTL or eviction, and L1 by LRU. A random token rather than a
counter means a version key that memcached evicted can't be recreated with
an old value. Each process keeps the versions it read for at most
``local_ttl`` seconds; an ``ns`` message on the channel makes the others
read the new version at once.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from . import codec
from .remote import DOWN
from .sentinel import MISSING
from .ttl import DEFAULT_TTL, TtlArg, check_ttl

if TYPE_CHECKING:
    from .cache import TieredCache

_SEPARATOR = "/"


def _new_version() -> str:
    return os.urandom(8).hex()


class NamespaceVersions:
    """The namespace versions this process knows, read from memcached."""

    def __init__(self, cache: TieredCache) -> None:
        self._cache = cache
        self._lock = threading.Lock()
        # version key -> (name, version, monotonic time it was read)
        self._known: dict[str, tuple[str, str, float]] = {}

    def current(self, name: str) -> str:
        """Return the version of ``name``, reading or creating it in memcached."""
        cache = self._cache
        version_key = cache.keys.version_key(name)
        now = time.monotonic()
        with self._lock:
            known = self._known.get(version_key)
        if known is not None and now - known[2] < cache.settings.local_ttl:
            return known[1]
        version = self._read(version_key)
        with self._lock:
            self._known[version_key] = (name, version, now)
        return version

    def _read(self, version_key: str) -> str:
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
                break
            version = _new_version()
            if remote.add(version_key, version.encode("ascii"), None) is True:
                return version
        # memcached is unreachable: a version of this process's own keeps
        # entries apart until the server is back.
        return _new_version()

    def bump(self, name: str) -> None:
        """Give ``name`` a new version here, in memcached and in every process."""
        cache = self._cache
        version_key = cache.keys.version_key(name)
        version = _new_version()
        with self._lock:
            self._known[version_key] = (name, version, time.monotonic())
        if cache.remote is not None:
            cache.remote.set(version_key, version.encode("ascii"), None)
        if cache.bus is not None:
            cache.bus.publish_namespace([version_key])

    def forget(self, version_keys: Iterable[str]) -> None:
        """Drop versions another process changed; they are read again on use."""
        with self._lock:
            for version_key in version_keys:
                self._known.pop(version_key, None)

    def forget_all(self) -> None:
        """Drop every known version, after messages may have been lost."""
        with self._lock:
            self._known.clear()


class Namespace:
    """A view of a :class:`TieredCache` whose keys live under one name.

    ``cache.namespace("tmpl").get("a:b")`` and ``cache.namespace("tmpl:a")
    .get("b")`` are different entries, and
    ``cache.invalidate_namespace("tmpl")`` drops every entry of ``tmpl``
    in every process while leaving ``tmpl:a`` alone. The origin sees the key
    as ``"<name>/<key>"``; a loader passed here receives the key without
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
        wire = self._wire(key, cache.namespaces.current(self.name))
        origin.store(self.origin_key(key), value)  # type: ignore[arg-type]
        cache.stores += 1
        cache._after_commit([wire], [key])

    def delete(self, key: str | bytes) -> None:
        """Delete ``key`` of this namespace in the origin and every tier."""
        cache = self.cache
        origin = cache._require_origin("delete")
        wire = self._wire(key, cache.namespaces.current(self.name))
        origin.delete(self.origin_key(key))  # type: ignore[arg-type]
        cache.stores += 1
        cache._after_commit([wire], [key])

    def invalidate(self, key: str | bytes) -> None:
        """Drop ``key`` of this namespace from every tier in every process."""
        wire = self._wire(key, self.cache.namespaces.current(self.name))
        self.cache._after_commit([wire], [key])

    def invalidate_all(self) -> None:
        """Drop every entry of this namespace, in every process."""
        self.cache.invalidate_namespace(self.name)
