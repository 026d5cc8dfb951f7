"""Tests of TieredCache: the read path, write-through, batches, TTLs and races.

Every test runs against real memcached (and Redis where a channel crosses
processes). Threads that block on an Event make races deterministic.
"""

from __future__ import annotations

import math
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pymemcache.client.base import Client as MemcacheClient

from tiercache import MISSING, Settings, TieredCache, codec, signals
from tiercache.adapters import key_bytes
from tiercache.adapters.sqlite import SQLiteOrigin
from tiercache.testing import MemcachedServer, RedisServer

DAY = 24 * 3600


class FakeClock:
    """A monotonic clock that moves only when a test advances it."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class CountingLoader:
    """A loader that returns values from a mapping and counts calls per key."""

    def __init__(self, values: dict[Any, Any] | None = None) -> None:
        self.values = values or {}
        self.calls: Counter[Any] = Counter()
        self.lock = threading.Lock()

    def __call__(self, key: Any) -> Any:
        with self.lock:
            self.calls[key] += 1
        return self.values.get(key, MISSING)

    def many(self, keys: list[Any]) -> dict[Any, Any]:
        with self.lock:
            self.calls.update(keys)
        return {key: self.values[key] for key in keys if key in self.values}


class OriginStoreFailed(Exception):
    """The origin's write failed after the transaction began."""


class FailingStoreOrigin:
    """An SQLite origin whose ``store`` writes the row, then fails and rolls back."""

    def __init__(self, inner: SQLiteOrigin) -> None:
        self.inner = inner
        self.error = OriginStoreFailed("disk full")

    def load(self, key: Any) -> Any:
        return self.inner.load(key)

    def load_many(self, keys: Iterable[Any]) -> dict[Any, Any]:
        return self.inner.load_many(keys)

    def store(self, key: Any, value: Any) -> None:
        with self.inner.transaction() as conn:
            conn.execute(
                f"UPDATE {self.inner.table} SET value = ? WHERE key = ?",
                (b'"half-written"', key_bytes(key)),
            )
            raise self.error

    def delete(self, key: Any) -> None:
        self.inner.delete(key)


def fail_loader(key: Any) -> Any:
    raise AssertionError(f"loader called for {key!r}; expected a hit")


def fail_many_loader(keys: list[Any]) -> dict[Any, Any]:
    raise AssertionError(
        f"loader called for {len(keys)} keys, first {keys[:3]!r}; expected hits"
    )


def same(left: Any, right: Any) -> bool:
    """Tell whether two values are equal and of the same type (0 is not False)."""
    return type(left) is type(right) and left == right


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {condition}")
        time.sleep(0.005)


# fixtures


@pytest.fixture
def origin(tmp_path: Path) -> SQLiteOrigin:
    return SQLiteOrigin(str(tmp_path / "origin.db"))


@pytest.fixture
def make_cache(
    memcached: MemcachedServer, origin: SQLiteOrigin
) -> Iterator[Callable[..., TieredCache]]:
    """Build caches that share one memcached, one SQLite origin and one channel.

    Keyword arguments override settings, except ``origin`` and ``clock``,
    which go to TieredCache.
    """
    channel_url = f"memory://{uuid.uuid4().hex}"
    caches: list[TieredCache] = []

    def make(
        *,
        origin: Any = origin,
        clock: Callable[[], float] = time.monotonic,
        **overrides: Any,
    ) -> TieredCache:
        settings = Settings(
            memcached_servers=(memcached.address,),
            channel_url=channel_url,
            ttl_jitter=0.0,
        ).replace(**overrides)
        cache = TieredCache(settings, origin=origin, clock=clock)
        caches.append(cache)
        return cache

    yield make
    for cache in caches:
        cache.close()


@pytest.fixture
def raw_memcached(memcached: MemcachedServer) -> Iterator[MemcacheClient]:
    client = MemcacheClient(
        (memcached.host, memcached.port), timeout=2, default_noreply=False
    )
    yield client
    client.close()


def raw_value(raw: MemcacheClient, wire: str) -> Any:
    """Return the value stored in memcached under ``wire``, ``MISSING``, or its kind."""
    payload = raw.get(wire)
    if payload is None:
        return MISSING
    envelope = codec.unpack(payload)
    if envelope.kind != codec.KIND_JSON:
        return envelope.kind
    return codec.load_body(envelope.body)


def remaining_ttl(raw: MemcacheClient, wire: str) -> int | None:
    """Return memcached's remaining TTL of ``wire`` (-1: none), or None if absent."""
    reply = raw.raw_command(b"mg " + wire.encode("ascii") + b" t")
    if reply == b"EN":
        return None
    flags = dict((part[:1], part[1:]) for part in reply.split()[1:])
    return int(flags[b"t"])


# read path


def test_get_loads_from_origin(
    make_cache: Callable[..., TieredCache], origin: SQLiteOrigin
) -> None:
    origin.store("subscriber:1", {"email": "a@example.com"})
    cache = make_cache()
    assert cache.get("subscriber:1") == {"email": "a@example.com"}
    assert origin.loads == 1


def test_get_backfills_remote(
    make_cache: Callable[..., TieredCache],
    origin: SQLiteOrigin,
    raw_memcached: MemcacheClient,
) -> None:
    origin.store("k", "v")
    cache = make_cache()
    cache.get("k")
    assert raw_value(raw_memcached, cache.keys.encode("k")) == "v"


def test_get_backfills_local(
    make_cache: Callable[..., TieredCache],
    origin: SQLiteOrigin,
    raw_memcached: MemcacheClient,
) -> None:
    origin.store("k", "v")
    cache = make_cache()
    cache.get("k")
    raw_memcached.delete(cache.keys.encode("k"))
    assert cache.get("k", fail_loader) == "v"


def test_get_remote_hit_in_second_cache(
    make_cache: Callable[..., TieredCache], origin: SQLiteOrigin
) -> None:
    origin.store("k", "v")
    first, second = make_cache(), make_cache()
    first.get("k")
    assert second.get("k", fail_loader) == "v"
    assert second.stats()["remote"]["hits"] == 1


def test_get_remote_hit_fills_local(
    make_cache: Callable[..., TieredCache],
    origin: SQLiteOrigin,
    raw_memcached: MemcacheClient,
) -> None:
    origin.store("k", "v")
    first, second = make_cache(), make_cache()
    first.get("k")
    second.get("k")
    raw_memcached.delete(second.keys.encode("k"))
    assert second.get("k", fail_loader) == "v"


def test_get_loader_gets_original_key(make_cache: Callable[..., TieredCache]) -> None:
    cache = make_cache()
    seen: list[Any] = []
    cache.get(b"bytes key", lambda key: seen.append(key) or 1)
    assert seen == [b"bytes key"]


def test_get_loader_error_unchanged(make_cache: Callable[..., TieredCache]) -> None:
    cache = make_cache()
    error = LookupError("row locked")

    def loader(key: Any) -> Any:
        raise error

    with pytest.raises(LookupError) as info:
        cache.get("k", loader)
    assert info.value is error


def test_set_read_your_writes(make_cache: Callable[..., TieredCache]) -> None:
    cache = make_cache()
    cache.set("subscriber:5", "subscribed")
    assert cache.get("subscriber:5") == "subscribed"
    cache.set("subscriber:5", "unsubscribed")
    assert cache.get("subscriber:5") == "unsubscribed"


def test_set_seen_by_other_cache(make_cache: Callable[..., TieredCache]) -> None:
    writer, reader = make_cache(), make_cache()
    writer.set("k", "old")
    assert reader.get("k") == "old"
    writer.set("k", "new")
    assert reader.get("k") == "new"


def test_set_writes_origin(
    make_cache: Callable[..., TieredCache], origin: SQLiteOrigin
) -> None:
    make_cache().set("k", {"a": [1]})
    assert origin.load("k") == {"a": [1]}


def test_set_deletes_remote(
    make_cache: Callable[..., TieredCache], raw_memcached: MemcacheClient
) -> None:
    cache = make_cache()
    cache.set("k", "old")
    cache.get("k")
    cache.set("k", "new")
    assert raw_memcached.get(cache.keys.encode("k")) is None


def test_delete_then_missing(make_cache: Callable[..., TieredCache]) -> None:
    writer, reader = make_cache(), make_cache()
    writer.set("k", "v")
    reader.get("k")
    writer.delete("k")
    assert reader.get("k") is MISSING
    assert writer.get("k") is MISSING


@pytest.mark.parametrize("operation", ["set", "delete"])
def test_write_without_origin_raises(
    make_cache: Callable[..., TieredCache], operation: str
) -> None:
    cache = make_cache(origin=None)
    with pytest.raises(TypeError) as info:
        if operation == "set":
            cache.set("k", "v")
        else:
            cache.delete("k")
    assert "origin=" in str(info.value)
    assert "invalidate()" in str(info.value)


def test_get_without_origin_or_loader_missing(
    make_cache: Callable[..., TieredCache],
) -> None:
    assert make_cache(origin=None).get("k") is MISSING


class TestOriginStoreFails:
    """A failed origin write leaves every tier and the origin as they were."""

    @pytest.fixture
    def setup(
        self,
        make_cache: Callable[..., TieredCache],
        origin: SQLiteOrigin,
    ) -> tuple[TieredCache, TieredCache, FailingStoreOrigin]:
        failing = FailingStoreOrigin(origin)
        writer = make_cache(origin=failing)
        reader = make_cache(origin=failing)
        origin.store("k", "old")
        writer.get("k")
        reader.get("k")
        return writer, reader, failing

    def test_raises_origin_error(self, setup: Any) -> None:
        writer, _reader, failing = setup
        with pytest.raises(OriginStoreFailed) as info:
            writer.set("k", "new")
        assert info.value is failing.error

    def test_origin_unchanged(self, setup: Any, origin: SQLiteOrigin) -> None:
        writer, _reader, _failing = setup
        with pytest.raises(OriginStoreFailed):
            writer.set("k", "new")
        assert origin.load("k") == "old"

    def test_remote_unchanged(self, setup: Any, raw_memcached: MemcacheClient) -> None:
        writer, _reader, _failing = setup
        with pytest.raises(OriginStoreFailed):
            writer.set("k", "new")
        assert raw_value(raw_memcached, writer.keys.encode("k")) == "old"

    def test_local_unchanged(self, setup: Any) -> None:
        writer, reader, _failing = setup
        with pytest.raises(OriginStoreFailed):
            writer.set("k", "new")
        assert writer.keys.encode("k") in writer.local
        assert writer.get("k", fail_loader) == "old"
        assert reader.get("k", fail_loader) == "old"

    def test_nothing_published(self, setup: Any) -> None:
        writer, reader, _failing = setup
        before = reader.stats()["invalidations"]["received"]
        with pytest.raises(OriginStoreFailed):
            writer.set("k", "new")
        assert reader.stats()["invalidations"]["received"] == before


def test_value_over_local_bound_served(
    make_cache: Callable[..., TieredCache], raw_memcached: MemcacheClient
) -> None:
    cache = make_cache(local_max_bytes=10_000)
    value = "x" * 50_000
    assert cache.get("big", lambda key: value) == value
    assert cache.keys.encode("big") not in cache.local
    assert cache.stats()["local"]["oversized"] == 1
    assert raw_value(raw_memcached, cache.keys.encode("big")) == value
    assert cache.get("big", fail_loader) == value


# cached falsy values and misses

FALSY = {"f:none": None, "f:list": [], "f:zero": 0, "f:false": False, "f:empty": ""}


def test_falsy_values_loaded_once(make_cache: Callable[..., TieredCache]) -> None:
    loader = CountingLoader(FALSY)
    first, second = make_cache(), make_cache()
    for cache in (first, first, second, second, first):
        for key in FALSY:
            cache.get(key, loader)
    assert loader.calls == Counter({key: 1 for key in FALSY})


@pytest.mark.parametrize("key", sorted(FALSY))
def test_falsy_value_returned_exactly(
    make_cache: Callable[..., TieredCache], key: str
) -> None:
    loader = CountingLoader(FALSY)
    first, second = make_cache(), make_cache()
    assert same(first.get(key, loader), FALSY[key]), "from the loader"
    assert same(first.get(key, loader), FALSY[key]), "from L1"
    assert same(second.get(key, loader), FALSY[key]), "from L2"


def test_falsy_values_get_many_exact(make_cache: Callable[..., TieredCache]) -> None:
    loader = CountingLoader(FALSY)
    first, second = make_cache(), make_cache()
    for key in FALSY:
        first.get(key, loader)
    found = second.get_many(FALSY, fail_many_loader)
    assert found.keys() == FALSY.keys()
    for key, value in FALSY.items():
        assert same(found[key], value), key


def test_cached_none_not_missing(make_cache: Callable[..., TieredCache]) -> None:
    cache = make_cache()
    cache.get("k", lambda key: None)
    assert cache.get("k") is None
    assert cache.get("k", default="fallback") is None


def test_unknown_key_missing(make_cache: Callable[..., TieredCache]) -> None:
    cache = make_cache()
    assert cache.get("absent") is MISSING
    assert cache.get("absent", default="fallback") == "fallback"


def test_missing_is_falsy_and_not_none() -> None:
    assert MISSING is not None
    assert not MISSING


def test_negative_entry_loaded_once(make_cache: Callable[..., TieredCache]) -> None:
    loader = CountingLoader()
    first, second = make_cache(), make_cache()
    for cache in (first, first, second, second):
        assert cache.get("absent", loader) is MISSING
    assert loader.calls["absent"] == 1


def test_negative_entry_remote_ttl(
    make_cache: Callable[..., TieredCache], raw_memcached: MemcacheClient
) -> None:
    cache = make_cache(negative_ttl=7.0)
    cache.get("absent", CountingLoader())
    wire = cache.keys.encode("absent")
    assert raw_value(raw_memcached, wire) == codec.KIND_NEGATIVE
    remaining = remaining_ttl(raw_memcached, wire)
    assert remaining is not None
    assert 6 <= remaining <= 7


def test_negative_entry_local_ttl(make_cache: Callable[..., TieredCache]) -> None:
    clock = FakeClock()
    cache = make_cache(negative_ttl=7.0, clock=clock)
    cache.get("absent", CountingLoader())
    wire = cache.keys.encode("absent")
    clock.now += 6.999
    assert wire in cache.local
    cache.get("absent", fail_loader)
    assert cache.stats()["local"]["expirations"] == 0
    clock.now += 0.001
    cache.get("absent", fail_loader)
    assert cache.stats()["local"]["expirations"] == 1


def test_negative_entry_cleared_by_set(make_cache: Callable[..., TieredCache]) -> None:
    writer, reader = make_cache(), make_cache()
    assert writer.get("k") is MISSING
    assert reader.get("k") is MISSING
    writer.set("k", "created")
    assert writer.get("k") == "created"
    assert reader.get("k") == "created"


def test_negative_entry_get_many_omitted(
    make_cache: Callable[..., TieredCache],
) -> None:
    loader = CountingLoader({"a": 1})
    first, second = make_cache(), make_cache()
    assert first.get_many(["a", "b"], loader.many) == {"a": 1}
    assert first.get_many(["a", "b"], loader.many) == {"a": 1}
    assert second.get_many(["a", "b"], loader.many) == {"a": 1}
    assert loader.calls == Counter({"a": 1, "b": 1})


# TTLs


@pytest.mark.parametrize("ttl", [0, 0.0, -1, -0.5])
def test_ttl_not_positive_caches_nothing(
    make_cache: Callable[..., TieredCache],
    raw_memcached: MemcacheClient,
    ttl: float,
) -> None:
    cache = make_cache()
    loader = CountingLoader({"k": "v"})
    assert cache.get("k", loader, ttl=ttl) == "v"
    assert cache.get("k", loader, ttl=ttl) == "v"
    assert loader.calls["k"] == 2
    assert raw_memcached.get(cache.keys.encode("k")) is None
    assert cache.keys.encode("k") not in cache.local


@pytest.mark.parametrize("ttl", [0, -1])
def test_ttl_not_positive_get_many(
    make_cache: Callable[..., TieredCache],
    raw_memcached: MemcacheClient,
    ttl: float,
) -> None:
    cache = make_cache()
    loader = CountingLoader({"k": "v"})
    assert cache.get_many(["k"], loader.many, ttl=ttl) == {"k": "v"}
    assert cache.get_many(["k"], loader.many, ttl=ttl) == {"k": "v"}
    assert loader.calls["k"] == 2
    assert raw_memcached.get(cache.keys.encode("k")) is None


def test_ttl_zero_no_negative_entry(
    make_cache: Callable[..., TieredCache], raw_memcached: MemcacheClient
) -> None:
    cache = make_cache()
    assert cache.get("k", lambda key: MISSING, ttl=0) is MISSING
    assert raw_memcached.get(cache.keys.encode("k")) is None
    assert cache.keys.encode("k") not in cache.local
    assert cache.get("k", lambda key: "created") == "created"


def test_ttl_zero_get_many_no_negative(
    make_cache: Callable[..., TieredCache],
) -> None:
    cache = make_cache()
    assert cache.get_many(["k"], lambda keys: {}, ttl=0) == {}
    assert cache.get_many(["k"], lambda keys: {"k": "created"}) == {"k": "created"}


@pytest.mark.parametrize("ttl", [math.nan, math.inf, "60", b"60"], ids=repr)
def test_ttl_invalid_raises_before_load(
    make_cache: Callable[..., TieredCache],
    raw_memcached: MemcacheClient,
    ttl: Any,
) -> None:
    cache = make_cache()
    loader = CountingLoader({"k": "v"})
    with pytest.raises((TypeError, ValueError)) as info:
        cache.get("k", loader, ttl=ttl)
    assert repr(ttl) in str(info.value)
    assert loader.calls["k"] == 0
    assert raw_memcached.get(cache.keys.encode("k")) is None


# (ttl argument, remaining TTL memcached reports, L1 lifetime) with local_ttl 60
TTL_CASES = [
    (None, -1, 60),
    (0.5, 1, 1),
    (1, 1, 1),
    (2, 2, 2),
    (2.2, 3, 3),
    (2592000, 2592000, 60),
    (2592001, 2592001, 60),
    (31 * DAY, 31 * DAY, 60),
    (365 * DAY, 365 * DAY, 60),
]


@pytest.mark.parametrize(("ttl", "remote_ttl", "local_ttl"), TTL_CASES)
def test_ttl_remote_expiry(
    make_cache: Callable[..., TieredCache],
    raw_memcached: MemcacheClient,
    ttl: float | None,
    remote_ttl: int,
    local_ttl: float,
) -> None:
    cache = make_cache(local_ttl=60.0)
    cache.get("k", lambda key: "v", ttl=ttl)
    remaining = remaining_ttl(raw_memcached, cache.keys.encode("k"))
    if remote_ttl == -1:
        assert remaining == -1
    elif remote_ttl > 30 * DAY:
        # A TTL over 30 days travels as a Unix time, which memcached converts
        # to its own clock in whole seconds, so allow two seconds either way.
        assert remaining is not None
        assert abs(remaining - remote_ttl) <= 2, remaining
    else:
        # memcached keeps time in whole seconds, so one may pass before the read.
        assert remaining in (remote_ttl - 1, remote_ttl) or (
            remote_ttl == 1 and remaining is None
        ), remaining


@pytest.mark.parametrize(("ttl", "remote_ttl", "local_ttl"), TTL_CASES)
def test_ttl_local_expiry(
    make_cache: Callable[..., TieredCache],
    ttl: float | None,
    remote_ttl: int,
    local_ttl: float,
) -> None:
    clock = FakeClock()
    cache = make_cache(local_ttl=60.0, clock=clock)
    cache.get("k", lambda key: "v", ttl=ttl)
    wire = cache.keys.encode("k")
    clock.now += local_ttl - 0.001
    assert cache.local.get(wire) is not MISSING
    clock.now += 0.001
    assert cache.local.get(wire) is MISSING


@pytest.mark.parametrize(("ttl", "remote_ttl", "local_ttl"), TTL_CASES)
def test_ttl_local_expiry_get_many(
    make_cache: Callable[..., TieredCache],
    ttl: float | None,
    remote_ttl: int,
    local_ttl: float,
) -> None:
    clock = FakeClock()
    cache = make_cache(local_ttl=60.0, clock=clock)
    cache.get_many(["k"], lambda keys: {"k": "v"}, ttl=ttl)
    wire = cache.keys.encode("k")
    clock.now += local_ttl - 0.001
    assert cache.local.get(wire) is not MISSING
    clock.now += 0.001
    assert cache.local.get(wire) is MISSING


def test_ttl_default_uses_remote_ttl(
    make_cache: Callable[..., TieredCache], raw_memcached: MemcacheClient
) -> None:
    cache = make_cache(remote_ttl=90.0)
    cache.get("k", lambda key: "v")
    remaining = remaining_ttl(raw_memcached, cache.keys.encode("k"))
    assert remaining in (89, 90)


def test_ttl_expiry_after_two_seconds(
    make_cache: Callable[..., TieredCache],
) -> None:
    writer, reader = make_cache(), make_cache()
    ttls = {"half": 0.5, "one": 1, "month": 2592001, "31d": 31 * DAY, "year": 365 * DAY}
    for key, ttl in ttls.items():
        writer.get(key, lambda key: "v", ttl=ttl)
    time.sleep(2.1)
    loader = CountingLoader({key: "v" for key in ttls})
    for key in ttls:
        reader.get(key, loader)
    assert loader.calls == Counter({"half": 1, "one": 1})


# get_many


def test_get_many_duplicates(make_cache: Callable[..., TieredCache]) -> None:
    cache = make_cache()
    seen: list[list[Any]] = []

    def loader(keys: list[Any]) -> dict[Any, Any]:
        seen.append(list(keys))
        return {key: key.upper() for key in keys}

    assert cache.get_many(["a", "b", "a", "a"], loader) == {"a": "A", "b": "B"}
    assert seen == [["a", "b"]]


def test_get_many_generator(make_cache: Callable[..., TieredCache]) -> None:
    cache = make_cache()
    keys = (f"k{index}" for index in range(5))
    found = cache.get_many(keys, lambda keys: {key: key for key in keys})
    assert found == {f"k{index}": f"k{index}" for index in range(5)}


def test_get_many_empty(make_cache: Callable[..., TieredCache]) -> None:
    assert make_cache().get_many([], fail_many_loader) == {}


def test_get_many_str_and_bytes(make_cache: Callable[..., TieredCache]) -> None:
    cache = make_cache()
    found = cache.get_many(["a", b"a"], lambda keys: {"a": "str", b"a": "bytes"})
    assert found == {"a": "str", b"a": "bytes"}


def test_get_many_ten_thousand_keys(
    make_cache: Callable[..., TieredCache], origin: SQLiteOrigin
) -> None:
    keys = [f"subscriber:{index}" for index in range(10_000)]
    with origin.transaction() as conn:
        conn.executemany(
            f"INSERT INTO {origin.table} (key, value) VALUES (?, ?)",
            [(key_bytes(key), b'{"id": %d}' % index) for index, key in enumerate(keys)],
        )
    expected = {key: {"id": index} for index, key in enumerate(keys)}
    first, second = make_cache(), make_cache()
    assert first.get_many(keys) == expected
    assert first.get_many(keys, fail_many_loader) == expected
    assert second.get_many(keys, fail_many_loader) == expected


def test_get_many_mixed_tiers(
    make_cache: Callable[..., TieredCache], origin: SQLiteOrigin
) -> None:
    for name in ("local", "remote", "origin"):
        origin.store(name, f"from {name}")
    cache, other = make_cache(), make_cache()
    cache.get("local")
    other.get("remote")
    requested: list[list[Any]] = []

    def loader(keys: list[Any]) -> dict[Any, Any]:
        requested.append(list(keys))
        return origin.load_many(keys)

    found = cache.get_many(["local", "remote", "origin", "absent"], loader)
    assert found == {
        "local": "from local",
        "remote": "from remote",
        "origin": "from origin",
    }
    assert requested == [["origin", "absent"]]


def test_get_many_fills_both_tiers(
    make_cache: Callable[..., TieredCache], raw_memcached: MemcacheClient
) -> None:
    cache = make_cache()
    cache.get_many(["a", "b"], lambda keys: {"a": 1, "b": 2})
    assert raw_value(raw_memcached, cache.keys.encode("a")) == 1
    assert cache.keys.encode("b") in cache.local


def test_get_many_loader_error_unchanged(
    make_cache: Callable[..., TieredCache],
) -> None:
    cache = make_cache()
    error = LookupError("replica lag")

    def loader(keys: list[Any]) -> dict[Any, Any]:
        raise error

    with pytest.raises(LookupError) as info:
        cache.get_many(["a", "b"], loader)
    assert info.value is error


def test_get_many_loader_error_leaves_no_lease(
    make_cache: Callable[..., TieredCache], raw_memcached: MemcacheClient
) -> None:
    cache = make_cache()

    def loader(keys: list[Any]) -> dict[Any, Any]:
        raise LookupError("replica lag")

    with pytest.raises(LookupError):
        cache.get_many(["a", "b"], loader)
    for key in ("a", "b"):
        assert raw_memcached.get(cache.keys.encode(key)) is None, key


class CountingProxy:
    """A loopback TCP proxy in front of one memcached that counts get requests.

    It parses the client's byte stream into commands, skipping the data
    blocks of storage commands, and counts each ``get``/``gets`` line.
    """

    STORAGE = {b"set", b"add", b"replace", b"append", b"prepend", b"cas"}

    def __init__(self, server: MemcachedServer) -> None:
        self.target = (server.host, server.port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.get_requests = 0
        self.keys_requested = 0
        self._sockets: list[socket.socket] = [self.listener]
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def reset(self) -> None:
        with self._lock:
            self.get_requests = 0
            self.keys_requested = 0

    def close(self) -> None:
        for sock in self._sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sockets += [client, upstream]
            threading.Thread(
                target=self._pump, args=(upstream, client), daemon=True
            ).start()
            threading.Thread(
                target=self._requests, args=(client, upstream), daemon=True
            ).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _requests(self, client: socket.socket, upstream: socket.socket) -> None:
        buffer = b""
        skip = 0
        try:
            while data := client.recv(65536):
                buffer += data
                while True:
                    if skip:
                        consumed = min(skip, len(buffer))
                        buffer, skip = buffer[consumed:], skip - consumed
                        if skip:
                            break
                    end = buffer.find(b"\r\n")
                    if end < 0:
                        break
                    words = buffer[:end].split()
                    buffer = buffer[end + 2 :]
                    if words and words[0] in (b"get", b"gets"):
                        with self._lock:
                            self.get_requests += 1
                            self.keys_requested += len(words) - 1
                    elif words and words[0] in self.STORAGE:
                        skip = int(words[4]) + 2
                upstream.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (client, upstream):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def cmd_get(server: MemcachedServer) -> int:
    client = MemcacheClient((server.host, server.port), timeout=2)
    try:
        return int(client.stats()[b"cmd_get"])
    finally:
        client.close()


def test_get_many_one_request_per_server(
    memcached3: list[MemcachedServer], tmp_path: Path
) -> None:
    proxies = [CountingProxy(server) for server in memcached3]
    settings = Settings(
        memcached_servers=tuple(proxy.address for proxy in proxies),
        ttl_jitter=0.0,
        read_timeout=2.0,
    )
    keys = [f"subscriber:{index}" for index in range(1000)]
    values = {key: index for index, key in enumerate(keys)}
    writer = TieredCache(settings)
    reader = TieredCache(settings)
    try:
        writer.get_many(keys, lambda missing: {key: values[key] for key in missing})
        # The first use of each server runs one-time checks, so warm up first.
        reader.get_many([f"warm:{index}" for index in range(30)], lambda keys: {})
        for proxy in proxies:
            proxy.reset()
        before = [cmd_get(server) for server in memcached3]

        found = reader.get_many(keys, fail_many_loader)

        after = [cmd_get(server) for server in memcached3]
        owners = Counter(
            reader.remote.node_for(reader.keys.encode(key)).address for key in keys
        )
        assert found == values
        for proxy, old, new in zip(proxies, before, after, strict=True):
            assert proxy.get_requests == 1, proxy.address
            assert proxy.keys_requested == owners[proxy.address], proxy.address
            assert new - old == owners[proxy.address], proxy.address
        assert sum(after) - sum(before) == 1000
    finally:
        writer.close()
        reader.close()
        for proxy in proxies:
            proxy.close()


def test_get_many_fresh_cache_three_servers(
    memcached3: list[MemcachedServer],
) -> None:
    settings = Settings(
        memcached_servers=tuple(server.address for server in memcached3),
        ttl_jitter=0.0,
    )
    keys = [f"subscriber:{index}" for index in range(1000)]
    values = {key: index for index, key in enumerate(keys)}
    writer = TieredCache(settings)
    reader = TieredCache(settings)
    try:
        writer.get_many(keys, lambda missing: {key: values[key] for key in missing})
        assert reader.get_many(keys, fail_many_loader) == values
        assert reader.stats()["remote"]["errors"] == 0
    finally:
        writer.close()
        reader.close()


# single flight


def test_single_flight_one_load(make_cache: Callable[..., TieredCache]) -> None:
    cache = make_cache()
    calls = 0
    calls_lock = threading.Lock()

    def slow_loader(key: Any) -> Any:
        nonlocal calls
        with calls_lock:
            calls += 1
        time.sleep(0.2)
        return {"key": key}

    start = threading.Barrier(50)
    results: list[Any] = [None] * 50

    def read(index: int) -> None:
        start.wait()
        results[index] = cache.get("hot", slow_loader)

    threads = [threading.Thread(target=read, args=(index,)) for index in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls == 1
    assert results == [{"key": "hot"}] * 50


def test_get_many_stampede_loads_about_once(
    make_cache: Callable[..., TieredCache],
) -> None:
    caches = [make_cache() for _ in range(5)]
    loader = CountingLoader({"hot": "v"})

    def slow_many(keys: list[Any]) -> dict[Any, Any]:
        time.sleep(0.2)
        return loader.many(keys)

    start = threading.Barrier(20)
    results: list[Any] = [None] * 20

    def read(index: int) -> None:
        start.wait()
        results[index] = caches[index % 5].get_many(["hot"], slow_many)

    threads = [threading.Thread(target=read, args=(index,)) for index in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [{"hot": "v"}] * 20
    assert loader.calls["hot"] <= 2


def test_single_flight_results_are_copies(
    make_cache: Callable[..., TieredCache],
) -> None:
    cache = make_cache()
    started = threading.Event()

    def slow_loader(key: Any) -> Any:
        started.set()
        time.sleep(0.1)
        return {"tags": []}

    results: list[Any] = [None] * 5

    def read(index: int) -> None:
        results[index] = cache.get("hot", slow_loader)

    threads = [threading.Thread(target=read, args=(index,)) for index in range(5)]
    threads[0].start()
    started.wait()
    for thread in threads[1:]:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({id(result) for result in results}) == 5


class FailsOnce:
    """A slow loader that raises on its first call and returns a value after."""

    def __init__(self) -> None:
        self.calls = 0
        self.lock = threading.Lock()
        self.error = ConnectionError("origin restarting")

    def __call__(self, key: Any) -> Any:
        with self.lock:
            self.calls += 1
            first = self.calls == 1
        time.sleep(0.2)
        if first:
            raise self.error
        return "loaded"


def run_readers(
    cache: TieredCache, loader: Callable[[Any], Any], count: int
) -> tuple[list[BaseException | Any], list[float]]:
    start = threading.Barrier(count)
    outcomes: list[Any] = [None] * count
    durations = [0.0] * count

    def read(index: int) -> None:
        start.wait()
        began = time.monotonic()
        try:
            outcomes[index] = cache.get("hot", loader)
        except BaseException as exc:  # noqa: BLE001 - compared by the caller
            outcomes[index] = exc
        durations[index] = time.monotonic() - began

    threads = [threading.Thread(target=read, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes, durations


def test_single_flight_error_reaches_all(
    make_cache: Callable[..., TieredCache],
) -> None:
    cache = make_cache()
    loader = FailsOnce()
    outcomes, durations = run_readers(cache, loader, 20)
    assert all(outcome is loader.error for outcome in outcomes), outcomes
    assert loader.calls == 1
    assert max(durations) < 1.0


def test_single_flight_error_then_retry(make_cache: Callable[..., TieredCache]) -> None:
    cache = make_cache()
    loader = FailsOnce()
    run_readers(cache, loader, 20)
    assert cache.get("hot", loader) == "loaded"
    assert loader.calls == 2


def test_single_flight_error_releases_lease(
    make_cache: Callable[..., TieredCache], raw_memcached: MemcacheClient
) -> None:
    cache = make_cache()
    loader = FailsOnce()
    run_readers(cache, loader, 20)
    assert raw_memcached.get(cache.keys.encode("hot")) is None


def test_single_flight_error_retry_fills_remote(
    make_cache: Callable[..., TieredCache], raw_memcached: MemcacheClient
) -> None:
    cache = make_cache()
    loader = FailsOnce()
    run_readers(cache, loader, 20)
    cache.get("hot", loader)
    assert raw_value(raw_memcached, cache.keys.encode("hot")) == "loaded"
    assert cache.stats()["leases"]["waits"] == 0


def test_single_flight_table_empty_after_loads(
    make_cache: Callable[..., TieredCache],
) -> None:
    cache = make_cache(memcached_servers=())

    def loader(key: str) -> Any:
        if key.endswith("7"):
            raise KeyError(key)
        return key

    def read(offset: int) -> None:
        for index in range(offset, 10_000, 8):
            try:
                cache.get(f"k{index}", loader)
            except KeyError:
                pass

    threads = [threading.Thread(target=read, args=(offset,)) for offset in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert cache.loads == 10_000
    assert cache._flights == {}
    assert cache.local._invalidated == {}


# a fill that began before a write must not land


class BlockingLoader:
    """A loader that reads the origin, then waits until the test releases it."""

    def __init__(self, origin: SQLiteOrigin) -> None:
        self.origin = origin
        self.loaded = threading.Event()
        self.release = threading.Event()

    def __call__(self, key: Any) -> Any:
        value = self.origin.load(key)
        self.loaded.set()
        assert self.release.wait(10), "the test never released the loader"
        return value

    def many(self, keys: list[Any]) -> dict[Any, Any]:
        values = self.origin.load_many(keys)
        self.loaded.set()
        assert self.release.wait(10), "the test never released the loader"
        return values


def start_thread(target: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    outcome: list[Any] = []

    def run() -> None:
        outcome.append(target())

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


KEY = "subscriber:5"


def assert_old_value_gone(
    reader: TieredCache,
    fresh: TieredCache,
    raw: MemcacheClient,
) -> None:
    wire = reader.keys.encode(KEY)
    assert raw_value(raw, wire) != "subscribed"
    assert reader.local.get(wire) is MISSING
    assert reader.get(KEY) == "unsubscribed"
    assert fresh.get(KEY) == "unsubscribed"
    assert raw_value(raw, wire) == "unsubscribed"


def test_stale_fill_same_cache(
    make_cache: Callable[..., TieredCache],
    origin: SQLiteOrigin,
    raw_memcached: MemcacheClient,
) -> None:
    origin.store(KEY, "subscribed")
    cache = make_cache()
    loader = BlockingLoader(origin)
    thread, outcome = start_thread(lambda: cache.get(KEY, loader))
    assert loader.loaded.wait(5)
    cache.set(KEY, "unsubscribed")
    loader.release.set()
    thread.join()
    assert outcome == ["subscribed"]
    assert_old_value_gone(cache, make_cache(), raw_memcached)


def test_stale_fill_other_cache(
    make_cache: Callable[..., TieredCache],
    origin: SQLiteOrigin,
    raw_memcached: MemcacheClient,
) -> None:
    origin.store(KEY, "subscribed")
    reader, writer = make_cache(), make_cache()
    loader = BlockingLoader(origin)
    thread, _outcome = start_thread(lambda: reader.get(KEY, loader))
    assert loader.loaded.wait(5)
    writer.set(KEY, "unsubscribed")
    loader.release.set()
    thread.join()
    assert_old_value_gone(reader, make_cache(), raw_memcached)


def test_stale_fill_get_many(
    make_cache: Callable[..., TieredCache],
    origin: SQLiteOrigin,
    raw_memcached: MemcacheClient,
) -> None:
    origin.store(KEY, "subscribed")
    reader, writer = make_cache(), make_cache()
    loader = BlockingLoader(origin)
    thread, _outcome = start_thread(lambda: reader.get_many([KEY], loader.many))
    assert loader.loaded.wait(5)
    writer.set(KEY, "unsubscribed")
    loader.release.set()
    thread.join()
    assert_old_value_gone(reader, make_cache(), raw_memcached)


def test_stale_remote_hit_not_kept(
    make_cache: Callable[..., TieredCache],
    origin: SQLiteOrigin,
    raw_memcached: MemcacheClient,
) -> None:
    origin.store(KEY, "subscribed")
    reader, writer = make_cache(), make_cache()
    writer.get(KEY)
    reached = threading.Event()
    release = threading.Event()

    def pause_reader(sender: Any, **kwargs: Any) -> None:
        if sender is reader and kwargs["tier"] == "remote":
            reached.set()
            assert release.wait(10), "the test never released the reader"

    signals.hit.connect(pause_reader)
    try:
        thread, outcome = start_thread(lambda: reader.get(KEY))
        assert reached.wait(5)
        writer.set(KEY, "unsubscribed")
        release.set()
        thread.join()
    finally:
        signals.hit.disconnect(pause_reader)
    assert outcome == ["subscribed"]
    assert_old_value_gone(reader, make_cache(), raw_memcached)


def test_stale_fill_over_redis_channel(
    memcached: MemcachedServer,
    redis: RedisServer,
    origin: SQLiteOrigin,
    raw_memcached: MemcacheClient,
) -> None:
    settings = Settings(
        memcached_servers=(memcached.address,),
        channel_url=redis.url,
        ttl_jitter=0.0,
    )
    caches = [TieredCache(settings, origin=origin) for _ in range(3)]
    reader, writer, fresh = caches
    try:
        for cache in caches:
            wait_until(lambda cache=cache: cache.bus.is_trusted)
        origin.store(KEY, "subscribed")
        loader = BlockingLoader(origin)
        thread, _outcome = start_thread(lambda: reader.get(KEY, loader))
        assert loader.loaded.wait(5)
        writer.set(KEY, "unsubscribed")
        wait_until(lambda: reader.stats()["invalidations"]["received"] >= 1)
        loader.release.set()
        thread.join()
        assert_old_value_gone(reader, fresh, raw_memcached)
    finally:
        for cache in caches:
            cache.close()


@pytest.mark.parametrize("writer_is_reader", [True, False], ids=["same", "other"])
def test_stale_flight_not_joined_after_write(
    make_cache: Callable[..., TieredCache],
    origin: SQLiteOrigin,
    writer_is_reader: bool,
) -> None:
    origin.store(KEY, "subscribed")
    reader = make_cache()
    writer = reader if writer_is_reader else make_cache()
    loader = BlockingLoader(origin)
    first, _outcome = start_thread(lambda: reader.get(KEY, loader))
    assert loader.loaded.wait(5)
    writer.set(KEY, "unsubscribed")
    late, late_outcome = start_thread(lambda: reader.get(KEY))
    # Give the late reader time to find the flight begun before the write.
    late.join(0.3)
    loader.release.set()
    first.join()
    late.join()
    assert late_outcome == ["unsubscribed"]


def test_stale_fill_counted(
    make_cache: Callable[..., TieredCache], origin: SQLiteOrigin
) -> None:
    origin.store(KEY, "subscribed")
    cache = make_cache()
    loader = BlockingLoader(origin)
    thread, _outcome = start_thread(lambda: cache.get(KEY, loader))
    assert loader.loaded.wait(5)
    cache.set(KEY, "unsubscribed")
    loader.release.set()
    thread.join()
    stats = cache.stats()
    assert stats["leases"]["stale_fills_dropped"] == 1
    assert stats["local"]["dropped_fills"] == 1


def test_memcached_expire_values() -> None:
    # A guard on the helper the cache uses: 0.5 s must never become 0,
    # which memcached reads as "never expire".
    from tiercache.remote import memcached_expire

    assert memcached_expire(0.5) == 1
    assert memcached_expire(None) == 0
    assert memcached_expire(2592000) == 2592000
    assert memcached_expire(2592001, now=1_700_000_000) == 1_700_000_000 + 2592001
    assert math.isclose(memcached_expire(31 * DAY) - time.time(), 31 * DAY, abs_tol=2)
