"""Tests of expiry: stale-while-revalidate, early refresh, jitter, negative entries.

Every test runs against real memcached. A stale entry is written straight into
memcached with a fresh-until time in the past, so most tests need no sleep.
Loaders that block on an Event show that a caller never waits for a refresh.
Only the tests of memcached's own expiry wait 1 to 2 s, because memcached
counts TTLs in whole seconds.
"""

from __future__ import annotations

import math
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from procs import CacheProcess, CacheSpec, build_cache, start_processes, wait_until
from pymemcache.client.base import Client as MemcacheClient

from tiercache import MISSING, Settings, TieredCache, codec
from tiercache.adapters.sqlite import SQLiteOrigin
from tiercache.testing import MemcachedServer, RedisServer

# Seconds within which another process must see a write-through.
INVALIDATION_WAIT = 1.0


class FakeClock:
    """A monotonic clock for L1 expiry that moves only when a test advances it."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class BlockingLoader:
    """A loader that counts its calls, then waits until the test releases it.

    It reads its value from ``origin`` before blocking when one is given, so
    it returns the row as it was before any write the test makes meanwhile.
    """

    def __init__(self, value: Any = None, origin: SQLiteOrigin | None = None) -> None:
        self.value = value
        self.origin = origin
        self.calls = 0
        self.lock = threading.Lock()
        self.started = threading.Event()
        self.release = threading.Event()

    def __call__(self, key: Any) -> Any:
        with self.lock:
            self.calls += 1
        value = self.origin.load(key) if self.origin is not None else self.value
        self.started.set()
        if not self.release.wait(10):
            raise TimeoutError("the test did not release the loader within 10 s")
        return value


class CountingOrigin:
    """An SQLite origin that counts loads per key."""

    def __init__(self, inner: SQLiteOrigin) -> None:
        self.inner = inner
        self.loads: Counter[Any] = Counter()
        self.lock = threading.Lock()

    def load(self, key: Any) -> Any:
        with self.lock:
            self.loads[key] += 1
        return self.inner.load(key)

    def load_many(self, keys: Iterable[Any]) -> dict[Any, Any]:
        keys = list(keys)
        with self.lock:
            self.loads.update(keys)
        return self.inner.load_many(keys)

    def store(self, key: Any, value: Any) -> None:
        self.inner.store(key, value)

    def delete(self, key: Any) -> None:
        self.inner.delete(key)


def fail_loader(key: Any) -> Any:
    raise AssertionError(f"loader called for {key!r}; expected a hit")


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` until it holds, and fail the test after ``timeout`` s."""
    if not wait_until(condition, timeout, interval=0.005):
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# -- fixtures ------------------------------------------------------------------


@pytest.fixture
def origin(tmp_path: Path) -> SQLiteOrigin:
    return SQLiteOrigin(str(tmp_path / "origin.db"))


@pytest.fixture
def make_cache(
    memcached: MemcachedServer, origin: SQLiteOrigin
) -> Iterator[Callable[..., TieredCache]]:
    """Build caches that share one memcached, one SQLite origin and one channel.

    Keyword arguments override settings, except ``origin`` and ``clock``,
    which go to TieredCache. Jitter is off unless a test sets it.
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
def raw(memcached: MemcachedServer) -> Iterator[MemcacheClient]:
    """A plain pymemcache client on the session memcached, bypassing tiercache."""
    client = MemcacheClient(
        (memcached.host, memcached.port), timeout=2, default_noreply=False
    )
    yield client
    client.close()


def write_entry(
    raw: MemcacheClient,
    wire: str,
    value: Any,
    *,
    fresh_for: float,
    stale_for: float,
    load_seconds: float = 0.0,
    memcached_ttl: int = 60,
) -> None:
    """Store ``value`` under ``wire`` as tiercache would, with chosen header times.

    :param fresh_for: seconds from now until fresh-until, negative for an
        entry that is already stale.
    :param stale_for: seconds from fresh-until until expires-at.
    """
    now = time.time()
    fresh_until = now + fresh_for
    payload = codec.pack_value(
        codec.dump_body(value),
        compress_threshold=1 << 20,
        fresh_until=fresh_until,
        expires_at=fresh_until + stale_for,
        load_seconds=load_seconds,
    )
    assert raw.set(wire, payload, expire=memcached_ttl, flags=codec.WIRE_FLAGS)


def read_envelope(raw: MemcacheClient, wire: str) -> codec.Envelope | None:
    payload = raw.get(wire)
    return None if payload is None else codec.unpack(payload)


def read_value(raw: MemcacheClient, wire: str) -> Any:
    """Return the JSON value stored under ``wire``, ``MISSING``, or the entry kind."""
    envelope = read_envelope(raw, wire)
    if envelope is None:
        return MISSING
    if envelope.kind != codec.KIND_JSON:
        return envelope.kind
    return codec.load_body(envelope.body)


def remaining_ttl(raw: MemcacheClient, wire: str) -> int | None:
    """Return memcached's remaining TTL of ``wire`` (-1: none), or None if absent."""
    reply = raw.raw_command(b"mg " + wire.encode("ascii") + b" t")
    if reply == b"EN":
        return None
    flags = {part[:1]: part[1:] for part in reply.split()[1:]}
    return int(flags[b"t"])


def wait_for_refreshes(cache: TieredCache) -> None:
    """Wait until every background refresh that ``cache`` started has finished."""
    refresher = cache._refresher
    if refresher is not None:
        # The cache starts a new pool on its next refresh.
        cache._refresher = None
        refresher.shutdown(wait=True)


# -- stale while revalidate ----------------------------------------------------

STALE_THREADS_PER_CACHE = 20


def read_stale_from_threads(
    caches: list[TieredCache], key: str, loader: BlockingLoader
) -> tuple[list[Any], list[float]]:
    """Read ``key`` from many threads of every cache while ``loader`` is blocked."""
    count = STALE_THREADS_PER_CACHE * len(caches)
    start = threading.Barrier(count)
    results: list[Any] = [None] * count
    durations = [math.inf] * count

    def read(index: int) -> None:
        cache = caches[index % len(caches)]
        start.wait()
        began = time.monotonic()
        results[index] = cache.get(key, loader)
        durations[index] = time.monotonic() - began

    threads = [threading.Thread(target=read, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert not any(thread.is_alive() for thread in threads), "a reader waited"
    return results, durations


def test_stale_served_while_refresh_blocked(
    make_cache: Callable[..., TieredCache], raw: MemcacheClient
) -> None:
    caches = [make_cache(stale_ttl=60), make_cache(stale_ttl=60)]
    wire = caches[0].keys.encode("tmpl:7")
    write_entry(raw, wire, "old", fresh_for=-5, stale_for=60)
    loader = BlockingLoader("new")
    try:
        results, durations = read_stale_from_threads(caches, "tmpl:7", loader)
        assert loader.started.wait(5), "no refresh started"
        calls_while_blocked = loader.calls
    finally:
        loader.release.set()

    assert results == ["old"] * len(results)
    assert max(durations) < 1.0
    assert calls_while_blocked == 1
    assert sum(cache.stale_served for cache in caches) >= 1


def test_stale_refresh_result_served(
    make_cache: Callable[..., TieredCache], raw: MemcacheClient
) -> None:
    caches = [make_cache(stale_ttl=60), make_cache(stale_ttl=60)]
    wire = caches[0].keys.encode("tmpl:7")
    write_entry(raw, wire, "old", fresh_for=-5, stale_for=60)
    loader = BlockingLoader("new")
    try:
        read_stale_from_threads(caches, "tmpl:7", loader)
    finally:
        loader.release.set()
    wait_for(lambda: sum(cache.refreshes for cache in caches) == 1, 5, "the refresh")

    assert [cache.get("tmpl:7", fail_loader) for cache in caches] == ["new", "new"]
    assert read_value(raw, wire) == "new"
    assert loader.calls == 1
    envelope = read_envelope(raw, wire)
    assert envelope is not None
    assert envelope.fresh_until > time.time()


def test_stale_write_during_refresh_wins(
    make_cache: Callable[..., TieredCache], raw: MemcacheClient, origin: SQLiteOrigin
) -> None:
    refresher = make_cache(stale_ttl=60)
    writer = make_cache(stale_ttl=60)
    origin.store("subscriber:5", "subscribed")
    wire = refresher.keys.encode("subscriber:5")
    write_entry(raw, wire, "subscribed", fresh_for=-5, stale_for=60)
    loader = BlockingLoader(origin=origin)

    try:
        assert refresher.get("subscriber:5", loader) == "subscribed"
        assert loader.started.wait(5), "no refresh started"
        writer.set("subscriber:5", "unsubscribed")
    finally:
        loader.release.set()
    wait_for(lambda: refresher.stale_fills_dropped == 1, 5, "the dropped refresh")

    assert refresher.refreshes == 0
    assert refresher.stats()["leases"]["stale_fills_dropped"] == 1
    assert read_value(raw, wire) in (MISSING, "unsubscribed")
    assert refresher.get("subscriber:5") == "unsubscribed"
    assert writer.get("subscriber:5") == "unsubscribed"
    assert make_cache(stale_ttl=60).get("subscriber:5") == "unsubscribed"


def test_stale_refresh_error_keeps_value(
    make_cache: Callable[..., TieredCache], raw: MemcacheClient
) -> None:
    cache = make_cache(stale_ttl=60)
    wire = cache.keys.encode("tmpl:7")
    write_entry(raw, wire, "old", fresh_for=-5, stale_for=60)
    calls = 0

    def failing_loader(key: Any) -> Any:
        nonlocal calls
        calls += 1
        raise ConnectionError("origin down")

    assert cache.get("tmpl:7", failing_loader) == "old"
    wait_for(lambda: cache.refresh_errors == 1, 5, "the failed refresh")
    assert cache.get("tmpl:7", failing_loader) == "old"
    wait_for(lambda: cache.refresh_errors == 2, 5, "the second failed refresh")

    assert calls == 2
    assert cache.refreshes == 0
    assert cache.stats()["refresh"]["errors"] == 2
    assert read_value(raw, wire) == "old"


def test_stale_get_many_refreshed(
    make_cache: Callable[..., TieredCache], raw: MemcacheClient
) -> None:
    # A key read only through get_many must not stay stale for the whole window.
    cache = make_cache(stale_ttl=60)
    write_entry(raw, cache.keys.encode("tmpl:7"), "old", fresh_for=-5, stale_for=60)
    loads: list[list[Any]] = []

    def many_loader(keys: list[Any]) -> dict[Any, Any]:
        loads.append(list(keys))
        return dict.fromkeys(keys, "new")

    first = cache.get_many(["tmpl:7"], many_loader)

    assert first in ({"tmpl:7": "old"}, {"tmpl:7": "new"})
    assert wait_until(
        lambda: cache.get_many(["tmpl:7"], many_loader) == {"tmpl:7": "new"},
        2.0,
        interval=0.05,
    ), f"get_many still serves the stale value; loader calls: {loads}"
    assert len(loads) == 1


def test_stale_from_real_fill_served(
    make_cache: Callable[..., TieredCache], raw: MemcacheClient
) -> None:
    writer = make_cache(stale_ttl=30, remote_ttl=1)
    assert writer.get("tmpl:7", lambda key: "v1") == "v1"
    envelope = read_envelope(raw, writer.keys.encode("tmpl:7"))
    assert envelope is not None
    time.sleep(max(0.0, envelope.fresh_until - time.time()) + 0.05)
    reader = make_cache(stale_ttl=30, remote_ttl=1)
    loader = BlockingLoader("v2")

    try:
        began = time.monotonic()
        value = reader.get("tmpl:7", loader)
        elapsed = time.monotonic() - began
        assert loader.started.wait(5), "no refresh started"
    finally:
        loader.release.set()
    wait_for(lambda: reader.refreshes == 1, 5, "the refresh")

    assert value == "v1"
    assert elapsed < 0.5
    assert reader.get("tmpl:7", fail_loader) == "v2"


def test_stale_past_window_reloads(
    make_cache: Callable[..., TieredCache], raw: MemcacheClient
) -> None:
    cache = make_cache(stale_ttl=1, remote_ttl=1)
    wire = cache.keys.encode("tmpl:7")
    assert cache.get("tmpl:7", lambda key: "v1") == "v1"
    assert remaining_ttl(raw, wire) in (1, 2)
    wait_for(lambda: raw.get(wire) is None, 4, "memcached to expire the entry")
    cache.clear_local()

    assert cache.get("tmpl:7", lambda key: "v2") == "v2"
    assert cache.stale_served == 0
    assert cache.refreshes == 0


def test_stale_past_window_header_miss(
    make_cache: Callable[..., TieredCache], raw: MemcacheClient
) -> None:
    # memcached may keep an item up to a second past its TTL because its clock
    # ticks once a second, and hosts' clocks differ, so the header decides.
    cache = make_cache(stale_ttl=5)
    wire = cache.keys.encode("tmpl:7")
    write_entry(raw, wire, "expired", fresh_for=-10, stale_for=5)
    loads = 0

    def loader(key: Any) -> Any:
        nonlocal loads
        loads += 1
        return "reloaded"

    assert cache.get("tmpl:7", loader) == "reloaded"
    assert loads == 1
    assert cache.stale_served == 0


# -- early refresh (XFetch) ----------------------------------------------------

EARLY_KEYS = 40


def read_near_expiry(cache: TieredCache, raw: MemcacheClient) -> tuple[int, list[Any]]:
    """Read 40 keys due in 5 s whose recorded load took 2 s, and count refreshes.

    With beta 5, each read refreshes with probability exp(-5 / (2 * 5)), about
    0.6, so 40 reads that never refresh would happen about once in 10**16.
    """
    keys = [f"tmpl:{index}" for index in range(EARLY_KEYS)]
    for key in keys:
        wire = cache.keys.encode(key)
        write_entry(raw, wire, "old", fresh_for=5, stale_for=0, load_seconds=2.0)
    calls = 0
    lock = threading.Lock()

    def loader(key: Any) -> Any:
        nonlocal calls
        with lock:
            calls += 1
        return "new"

    values = [cache.get(key, loader) for key in keys]
    wait_for_refreshes(cache)
    return calls, values


def test_early_refresh_high_beta_before_expiry(
    make_cache: Callable[..., TieredCache], raw: MemcacheClient
) -> None:
    cache = make_cache(early_refresh_beta=5.0)
    calls, values = read_near_expiry(cache, raw)

    assert values == ["old"] * EARLY_KEYS
    assert calls >= 1
    assert cache.refreshes == calls
    refreshed = [
        read_value(raw, cache.keys.encode(f"tmpl:{index}"))
        for index in range(EARLY_KEYS)
    ]
    assert refreshed.count("new") == calls


def test_early_refresh_beta_zero_never(
    make_cache: Callable[..., TieredCache], raw: MemcacheClient
) -> None:
    cache = make_cache(early_refresh_beta=0.0)
    calls, values = read_near_expiry(cache, raw)

    assert values == ["old"] * EARLY_KEYS
    assert calls == 0
    assert cache.refreshes == 0


def test_early_refresh_through_local_tier(
    make_cache: Callable[..., TieredCache], raw: MemcacheClient
) -> None:
    # One process reading one hot key: after the first read every read hits
    # L1, so the early refresh must still happen before the entry expires.
    cache = make_cache(early_refresh_beta=4.0, remote_ttl=2)
    load_started: list[float] = []

    def slow_loader(key: Any) -> Any:
        load_started.append(time.time())
        time.sleep(0.3)
        return f"load {len(load_started)}"

    assert cache.get("tmpl:hot", slow_loader) == "load 1"
    envelope = read_envelope(raw, cache.keys.encode("tmpl:hot"))
    assert envelope is not None
    assert envelope.load_seconds >= 0.3
    # With beta 4 and a 0.3 s load, a read 0.5 s before expiry refreshes with
    # probability exp(-0.5 / 1.2), about 0.66, and reads 20 ms apart make about
    # 20 such reads.
    while time.time() < envelope.fresh_until - 0.05:
        cache.get("tmpl:hot", slow_loader)
        time.sleep(0.02)
    wait_for_refreshes(cache)

    early = [when for when in load_started[1:] if when < envelope.fresh_until]
    assert len(early) >= 1, f"no refresh began before expiry; loads at {load_started}"


# -- TTL jitter ----------------------------------------------------------------

JITTER_FILLS = 200


def fill_and_measure(
    cache: TieredCache, raw: MemcacheClient
) -> list[tuple[float, int]]:
    """Fill 200 keys (half by get, half by one get_many) and read their TTLs back.

    :returns: per key, the fresh TTL from the header (fresh-until minus the
        time just before the fill) and memcached's remaining TTL.
    """
    single = [f"subscriber:{index}" for index in range(JITTER_FILLS // 2)]
    batch = [f"segment:{index}" for index in range(JITTER_FILLS // 2)]
    filled_at: dict[str, float] = {}
    for key in single:
        filled_at[key] = time.time()
        cache.get(key, lambda key: {"key": key})
    before_batch = time.time()
    cache.get_many(batch, lambda keys: {key: {"key": key} for key in keys})
    filled_at.update(dict.fromkeys(batch, before_batch))

    measured = []
    for key, began in filled_at.items():
        wire = cache.keys.encode(key)
        envelope = read_envelope(raw, wire)
        assert envelope is not None, key
        ttl = remaining_ttl(raw, wire)
        assert ttl is not None, key
        measured.append((envelope.fresh_until - began, ttl))
    return measured


def test_ttl_jitter_spreads_expiry(
    make_cache: Callable[..., TieredCache], raw: MemcacheClient
) -> None:
    cache = make_cache(ttl_jitter=0.5, remote_ttl=100)
    measured = fill_and_measure(cache, raw)
    header_ttls = [round(fresh) for fresh, _ in measured]
    memcached_ttls = [ttl for _, ttl in measured]

    assert len(measured) == JITTER_FILLS
    assert min(header_ttls) >= 50
    assert max(header_ttls) <= 100
    assert len(set(header_ttls)) >= 10, Counter(header_ttls)
    assert min(memcached_ttls) >= 49
    assert max(memcached_ttls) <= 100
    assert len(set(memcached_ttls)) >= 10, Counter(memcached_ttls)


def test_ttl_jitter_zero_all_equal(
    make_cache: Callable[..., TieredCache], raw: MemcacheClient
) -> None:
    cache = make_cache(ttl_jitter=0.0, remote_ttl=100)
    measured = fill_and_measure(cache, raw)

    assert {round(fresh) for fresh, _ in measured} == {100}
    assert {ttl for _, ttl in measured} <= {99, 100}


# -- negative entries ----------------------------------------------------------


def test_negative_bounce_stream_loads_each_once(
    make_cache: Callable[..., TieredCache], origin: SQLiteOrigin
) -> None:
    counting = CountingOrigin(origin)
    caches = [make_cache(origin=counting), make_cache(origin=counting)]
    unknown = [f"subscriber:bounced-{index}" for index in range(50)]
    stream = random.Random(7)

    results = []
    for index in range(1000):
        cache = caches[index % 2]
        results.append(cache.get(stream.choice(unknown), default="absent"))

    assert results == ["absent"] * 1000
    assert sum(counting.loads.values()) == 50
    assert set(counting.loads) == set(unknown)
    assert set(counting.loads.values()) == {1}


def test_negative_bounce_stream_batches(
    make_cache: Callable[..., TieredCache], origin: SQLiteOrigin
) -> None:
    counting = CountingOrigin(origin)
    caches = [make_cache(origin=counting), make_cache(origin=counting)]
    unknown = [f"subscriber:bounced-{index}" for index in range(50)]
    stream = random.Random(11)

    results = []
    for index in range(50):
        batch = [stream.choice(unknown) for _ in range(20)]
        results.append(caches[index % 2].get_many(batch))

    assert results == [{}] * 50
    assert sum(counting.loads.values()) == 50
    assert set(counting.loads) == set(unknown)
    assert set(counting.loads.values()) == {1}


def test_negative_expires_after_negative_ttl(
    make_cache: Callable[..., TieredCache],
    origin: SQLiteOrigin,
    raw: MemcacheClient,
) -> None:
    counting = CountingOrigin(origin)
    clock = FakeClock()
    cache = make_cache(origin=counting, clock=clock, negative_ttl=1, remote_ttl=3600)
    origin.store("subscriber:5", {"id": 5})
    wire = cache.keys.encode("subscriber:404")

    assert cache.get("subscriber:404") is MISSING
    assert cache.get("subscriber:5") == {"id": 5}
    assert remaining_ttl(raw, wire) in (0, 1)
    assert remaining_ttl(raw, cache.keys.encode("subscriber:5")) in (3599, 3600)
    # The row appears behind the cache's back, and the negative entry hides it
    # until negative_ttl passes in both tiers.
    origin.store("subscriber:404", {"id": 404})
    assert cache.get("subscriber:404") is MISSING
    clock.now += 1.5
    wait_for(lambda: raw.get(wire) is None, 3, "memcached to expire the entry")

    assert cache.get("subscriber:404") == {"id": 404}
    assert counting.loads["subscriber:404"] == 2
    assert cache.get("subscriber:5") == {"id": 5}
    assert counting.loads["subscriber:5"] == 1


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
    """One child process with its own cache on the test's servers."""
    (process,) = start_processes(spec, 1)
    yield process
    process.close()


def test_negative_replaced_by_write_elsewhere(
    spec: CacheSpec, child: CacheProcess
) -> None:
    writer = build_cache(spec)
    try:
        assert writer.wait_ready()
        assert child.call("get", "subscriber:404") is MISSING
        assert child.call("is_local", "subscriber:404")

        writer.set("subscriber:404", {"id": 404, "status": "subscribed"})

        expected = {"id": 404, "status": "subscribed"}
        assert wait_until(
            lambda: child.call("get", "subscriber:404") == expected,
            INVALIDATION_WAIT,
        )
        assert writer.get("subscriber:404") == expected
    finally:
        writer.close()
