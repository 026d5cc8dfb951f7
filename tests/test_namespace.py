"""Tests of namespaces: keys kept apart by name and invalidated together by version.

Tests run against real memcached. Tests that span OS processes start a child
(see procs.py) with a Redis channel and read through the namespace operations
this module adds to the child.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from procs import (
    OPERATIONS,
    SPAWN,
    CacheProcess,
    CacheSpec,
    ChildState,
    build_cache,
    serve,
    wait_until,
)
from pymemcache.client.base import Client as MemcacheClient

from tiercache import MISSING, Settings, TieredCache
from tiercache.adapters.sqlite import SQLiteOrigin
from tiercache.testing import MemcachedServer, RedisServer

# Seconds within which another process must see an invalidation.
INVALIDATION_WAIT = 1.0

# The four entries whose names and keys would collide if joined with ":".
ENTRIES = {
    ("subscriber", "1"): "A",
    ("template", "1"): "B",
    ("tmpl", "a:b"): "C",
    ("tmpl:a", "b"): "D",
}


def fail_loader(key: Any) -> Any:
    raise AssertionError(f"loader called for {key!r}; expected a hit")


class CountingLoader:
    """A loader of namespaced keys from an origin that counts calls per (name, key)."""

    def __init__(self, origin: SQLiteOrigin) -> None:
        self.origin = origin
        self.calls: Counter[tuple[str, str]] = Counter()
        self.lock = threading.Lock()

    def for_namespace(self, name: str) -> Callable[[str], Any]:
        def load(key: str) -> Any:
            with self.lock:
                self.calls[(name, key)] += 1
            return self.origin.load(f"{name}/{key}")

        return load


# -- child-process operations --------------------------------------------------
#
# procs.serve runs the operations listed in procs.OPERATIONS. This module adds
# its own at import, and a child imports this module to find run_child.

_child_loads: Counter[tuple[str, str]] = Counter()


def _ns_get(state: ChildState, name: str, key: str) -> Any:
    """Read ``key`` of namespace ``name``, loading from the origin on a miss."""
    namespace = state.cache.namespace(name)
    origin = state.cache.origin
    assert origin is not None

    def load(load_key: str) -> Any:
        _child_loads[(name, load_key)] += 1
        return origin.load(namespace.origin_key(load_key))

    return namespace.get(key, load)


def _ns_loads(state: ChildState) -> dict[tuple[str, str], int]:
    return dict(_child_loads)


OPERATIONS.update({"ns_get": _ns_get, "ns_loads": _ns_loads})


def run_child(spec: CacheSpec, conn: Any, shared: dict[str, Any]) -> None:
    """Serve requests in a child, with this module's operations available."""
    serve(spec, conn, shared)


class _ChildContext:
    """The spawn context, except that children run :func:`run_child`."""

    def Pipe(self) -> Any:  # noqa: N802 - mirrors multiprocessing's name
        return SPAWN.Pipe()

    def Process(self, *, target: Any, args: Any, daemon: bool) -> Any:  # noqa: N802
        return SPAWN.Process(target=run_child, args=args, daemon=daemon)


# -- fixtures ------------------------------------------------------------------


@pytest.fixture
def spec(memcached: MemcachedServer, redis: RedisServer, tmp_path: Path) -> CacheSpec:
    """A cache on the session memcached and Redis, with a fresh namespace."""
    tag = uuid.uuid4().hex[:10]
    return CacheSpec(
        memcached_servers=(memcached.address,),
        origin_path=str(tmp_path / "origin.sqlite3"),
        namespace=f"t{tag}",
        channel_url=redis.url,
        channel_name=f"invalidations-{tag}",
    )


@pytest.fixture
def child(spec: CacheSpec) -> Iterator[CacheProcess]:
    """One child process whose cache shares the test's servers and origin."""
    process = CacheProcess(spec, context=_ChildContext())
    try:
        process.wait_ready()
        yield process
    finally:
        process.close()


@pytest.fixture
def parent_cache(spec: CacheSpec) -> Iterator[TieredCache]:
    """A cache in the test process, built like the child's."""
    cache = build_cache(spec)
    assert cache.wait_ready()
    yield cache
    cache.close()


@pytest.fixture
def origin(tmp_path: Path) -> SQLiteOrigin:
    return SQLiteOrigin(str(tmp_path / "local-origin.db"))


@pytest.fixture
def make_cache(
    memcached: MemcachedServer, origin: SQLiteOrigin
) -> Iterator[Callable[..., TieredCache]]:
    """Build caches in this process that share memcached, an origin and a channel.

    Keyword arguments override settings, except ``origin``.
    """
    channel_url = f"memory://{uuid.uuid4().hex}"
    caches: list[TieredCache] = []

    def make(*, origin: Any = origin, **overrides: Any) -> TieredCache:
        settings = Settings(
            memcached_servers=(memcached.address,),
            channel_url=channel_url,
            ttl_jitter=0.0,
        ).replace(**overrides)
        cache = TieredCache(settings, origin=origin)
        caches.append(cache)
        return cache

    yield make
    for cache in caches:
        cache.close()


@pytest.fixture
def raw(memcached: MemcachedServer) -> Iterator[MemcacheClient]:
    """A plain pymemcache client on the session memcached, bypassing tiercache."""
    client = MemcacheClient(
        (memcached.host, memcached.port), timeout=2, default_noreply=False
    )
    yield client
    client.close()


# -- names and keys kept apart -------------------------------------------------


def test_namespace_entries_distinct_elsewhere(
    parent_cache: TieredCache, child: CacheProcess
) -> None:
    for (name, key), value in ENTRIES.items():
        parent_cache.namespace(name).set(key, value)

    # The child reads first, and L2 is empty after the writes, so it loads.
    for (name, key), value in ENTRIES.items():
        assert child.call("ns_get", name, key) == value, (name, key)
    # The parent (cold L1 after its own writes) now reads the child's fills.
    for (name, key), value in ENTRIES.items():
        assert parent_cache.namespace(name).get(key, fail_loader) == value

    assert child.call("ns_loads") == dict.fromkeys(ENTRIES, 1)


def test_namespace_entries_distinct_from_remote(
    make_cache: Callable[..., TieredCache],
) -> None:
    writer = make_cache()
    for (name, key), value in ENTRIES.items():
        writer.namespace(name).set(key, value)
    for name, key in ENTRIES:
        writer.namespace(name).get(key)
    reader = make_cache()

    found = {
        (name, key): reader.namespace(name).get(key, fail_loader)
        for name, key in ENTRIES
    }
    batches = {
        name: reader.namespace(name).get_many([key], lambda keys: {})
        for name, key in ENTRIES
    }

    assert found == ENTRIES
    assert batches == {name: {key: value} for (name, key), value in ENTRIES.items()}


def test_namespace_not_plain_key(make_cache: Callable[..., TieredCache]) -> None:
    cache = make_cache()
    cache.namespace("tmpl").get("a:b", lambda key: "namespaced")

    assert cache.get("tmpl:a:b", lambda key: "plain") == "plain"
    assert cache.get("tmpl/a:b", lambda key: "plain slash") == "plain slash"
    assert cache.namespace("tmpl").get("a:b", fail_loader) == "namespaced"


# -- invalidating a namespace --------------------------------------------------


def test_invalidate_namespace_reloads_elsewhere(
    parent_cache: TieredCache, child: CacheProcess, spec: CacheSpec
) -> None:
    origin = SQLiteOrigin(spec.origin_path)
    entries = {**ENTRIES, ("tmpl", "x"): "E"}
    for (name, key), value in entries.items():
        parent_cache.namespace(name).set(key, value)
    for name, key in entries:
        child.call("ns_get", name, key)
    # New rows are written behind the cache's back, so only a reload returns them.
    for name, key in entries:
        origin.store(f"{name}/{key}", entries[(name, key)] + "2")

    parent_cache.invalidate_namespace("tmpl")

    assert wait_until(
        lambda: child.call("ns_get", "tmpl", "a:b") == "C2", INVALIDATION_WAIT
    )
    assert child.call("ns_get", "tmpl", "x") == "E2"
    assert child.call("ns_get", "tmpl:a", "b") == "D"
    assert child.call("ns_get", "template", "1") == "B"
    assert child.call("ns_get", "subscriber", "1") == "A"
    loads = child.call("ns_loads")
    assert loads[("tmpl", "a:b")] == 2
    assert loads[("tmpl", "x")] == 2
    assert loads[("tmpl:a", "b")] == 1
    assert loads[("template", "1")] == 1
    assert loads[("subscriber", "1")] == 1
    assert parent_cache.namespace("tmpl").get("a:b") == "C2"
    assert parent_cache.namespace("tmpl:a").get("b", fail_loader) == "D"


def test_invalidate_namespace_same_process(
    make_cache: Callable[..., TieredCache], origin: SQLiteOrigin
) -> None:
    first, second = make_cache(), make_cache()
    loader = CountingLoader(origin)
    for (name, key), value in ENTRIES.items():
        origin.store(f"{name}/{key}", value)
    for cache in (first, second):
        for name, key in ENTRIES:
            cache.namespace(name).get(key, loader.for_namespace(name))

    first.invalidate_namespace("tmpl")

    for cache in (first, second):
        for (name, key), value in ENTRIES.items():
            assert cache.namespace(name).get(key, loader.for_namespace(name)) == value
    assert loader.calls[("tmpl", "a:b")] == 2
    assert loader.calls[("tmpl:a", "b")] == 1
    assert loader.calls[("template", "1")] == 1
    assert loader.calls[("subscriber", "1")] == 1


# -- invalid names -------------------------------------------------------------

INVALID_NAMES = ["", "/", "a/b", "tmpl/"]


@pytest.mark.parametrize("name", INVALID_NAMES, ids=repr)
def test_namespace_invalid_name_raises(
    make_cache: Callable[..., TieredCache], name: str
) -> None:
    cache = make_cache()
    with pytest.raises(ValueError, match="invalid namespace name"):
        cache.namespace(name)


@pytest.mark.parametrize("name", INVALID_NAMES, ids=repr)
def test_invalidate_namespace_invalid_name_raises(
    make_cache: Callable[..., TieredCache], name: str
) -> None:
    cache = make_cache()
    with pytest.raises(ValueError, match="invalid namespace name"):
        cache.invalidate_namespace(name)


# -- caches of different applications ------------------------------------------


def test_app_namespaces_keep_own_cfg(
    make_cache: Callable[..., TieredCache], tmp_path: Path
) -> None:
    origins = {
        app: SQLiteOrigin(str(tmp_path / f"{app}.db")) for app in ("billing", "mailer")
    }
    origins["billing"].store("cfg", {"app": "billing"})
    origins["mailer"].store("cfg", {"app": "mailer"})
    first = {app: make_cache(namespace=app, origin=origins[app]) for app in origins}
    assert first["billing"].get("cfg") == {"app": "billing"}
    assert first["mailer"].get("cfg") == {"app": "mailer"}

    cold = {app: make_cache(namespace=app, origin=origins[app]) for app in origins}

    assert cold["billing"].get("cfg", fail_loader) == {"app": "billing"}
    assert cold["mailer"].get("cfg", fail_loader) == {"app": "mailer"}
    cold["billing"].set("cfg", {"app": "billing", "version": 2})
    assert first["mailer"].get("cfg", fail_loader) == {"app": "mailer"}
    assert cold["mailer"].get("cfg", fail_loader) == {"app": "mailer"}
    assert first["billing"].get("cfg") == {"app": "billing", "version": 2}


def test_app_namespaces_invalidate_apart(
    make_cache: Callable[..., TieredCache], tmp_path: Path
) -> None:
    origins = {
        app: SQLiteOrigin(str(tmp_path / f"{app}.db")) for app in ("billing", "mailer")
    }
    caches = {app: make_cache(namespace=app, origin=origins[app]) for app in origins}
    for app, cache in caches.items():
        cache.namespace("tmpl").set("1", f"{app} template")
        assert cache.namespace("tmpl").get("1") == f"{app} template"

    caches["billing"].invalidate_namespace("tmpl")
    cold_mailer = make_cache(namespace="mailer", origin=origins["mailer"])

    assert caches["mailer"].namespace("tmpl").get("1", fail_loader) == "mailer template"
    assert cold_mailer.namespace("tmpl").get("1", fail_loader) == "mailer template"
    assert caches["billing"].namespace("tmpl").get("1") == "billing template"


# -- version key evicted from memcached ----------------------------------------


def test_namespace_version_evicted_reads_miss(
    make_cache: Callable[..., TieredCache],
    origin: SQLiteOrigin,
    raw: MemcacheClient,
) -> None:
    writer = make_cache()
    writer.namespace("cfg").set("limits", {"daily": 100})
    assert writer.namespace("cfg").get("limits") == {"daily": 100}
    version_key = writer.keys.version_key("cfg")
    old_version = raw.get(version_key)
    assert old_version is not None
    # The row changes behind the cache's back, then memcached evicts the version.
    origin.store("cfg/limits", {"daily": 200})
    assert raw.delete(version_key)
    loader = CountingLoader(origin)

    reader = make_cache()
    value = reader.namespace("cfg").get("limits", loader.for_namespace("cfg"))

    assert value == {"daily": 200}
    assert loader.calls[("cfg", "limits")] == 1
    new_version = raw.get(version_key)
    assert new_version is not None
    assert new_version != old_version


def test_namespace_version_evicted_write_seen(
    make_cache: Callable[..., TieredCache], raw: MemcacheClient
) -> None:
    readers = [make_cache(), make_cache()]
    readers[0].namespace("cfg").set("limits", {"daily": 100})
    for reader in readers:
        assert reader.namespace("cfg").get("limits") == {"daily": 100}
    assert raw.delete(readers[0].keys.version_key("cfg"))

    # A cache that starts after the eviction writes through the namespace.
    writer = make_cache()
    writer.namespace("cfg").set("limits", {"daily": 200})

    assert writer.namespace("cfg").get("limits") == {"daily": 200}
    for index, reader in enumerate(readers):
        deadline = time.monotonic() + INVALIDATION_WAIT
        value = reader.namespace("cfg").get("limits")
        while value != {"daily": 200} and time.monotonic() < deadline:
            time.sleep(0.01)
            value = reader.namespace("cfg").get("limits")
        assert value == {"daily": 200}, f"reader {index} still returns {value}"


def test_namespace_missing_key_is_missing(
    make_cache: Callable[..., TieredCache],
) -> None:
    cache = make_cache()

    assert cache.namespace("cfg").get("absent") is MISSING
    assert cache.namespace("cfg").get("absent", default="none") == "none"
