"""Tests of stampedes and batches: one load per cold key, leases, multi-gets.

Every test runs against real memcached. The cross-process stampede runs two
child processes (see procs.py) that share a Redis channel, and they count their
loads in one multiprocessing integer.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from procs import SPAWN, CacheProcess, CacheSpec, start_processes, wait_until
from pymemcache.client.base import Client as MemcacheClient

from tiercache import Settings, TieredCache, codec
from tiercache.local import _PRUNE_AT
from tiercache.remote import BATCH_KEYS
from tiercache.testing import MemcachedServer, RedisServer

# Seconds within which another process must drop its L1 copy after a write.
INVALIDATION_WAIT = 1.0


def fail_loader(key: Any) -> Any:
    raise AssertionError(f"loader called for {key!r}; expected a hit")


def fail_many_loader(keys: list[Any]) -> dict[Any, Any]:
    raise AssertionError(f"loader called for {len(keys)} keys, first {keys[:3]!r}")


class CountingManyLoader:
    """A batch loader that returns a value per key and records every call."""

    def __init__(self) -> None:
        self.batches: list[list[Any]] = []

    def __call__(self, keys: list[Any]) -> dict[Any, Any]:
        self.batches.append(list(keys))
        return {key: f"value of {key}" for key in keys}


@pytest.fixture
def make_cache(memcached: MemcachedServer) -> Iterator[Callable[..., TieredCache]]:
    """Build caches that share the session memcached and one memory channel."""
    channel_url = f"memory://{uuid.uuid4().hex}"
    caches: list[TieredCache] = []

    def make(**overrides: Any) -> TieredCache:
        settings = Settings(
            memcached_servers=(memcached.address,),
            channel_url=channel_url,
            ttl_jitter=0.0,
        ).replace(**overrides)
        cache = TieredCache(settings)
        caches.append(cache)
        return cache

    yield make
    for cache in caches:
        cache.close()


# -- stampede across processes -------------------------------------------------

STAMPEDE_PROCESSES = 2
STAMPEDE_THREADS = 50


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


def run_stampede(
    children: list[CacheProcess], key: str, loads: Any
) -> tuple[int, list[Any]]:
    """Miss ``key`` from 50 threads in each child at once, and count the loads."""
    before = loads.value
    replies = [
        child.submit("get_in_stampede", key, STAMPEDE_THREADS) for child in children
    ]
    values = [value for reply in replies for value in reply.result(timeout=20)]
    return loads.value - before, values


def test_stampede_two_processes_load_once(spec: CacheSpec) -> None:
    loads = SPAWN.Value("i", 0)
    start = SPAWN.Barrier(STAMPEDE_PROCESSES)
    children = start_processes(
        spec, STAMPEDE_PROCESSES, shared={"loads": loads, "start": start}
    )
    try:
        first_loads, first_values = run_stampede(children, "tmpl:hot", loads)

        children[0].call("invalidate", "tmpl:hot")
        assert wait_until(
            lambda: not children[1].call("is_local", "tmpl:hot"), INVALIDATION_WAIT
        )
        second_loads, second_values = run_stampede(children, "tmpl:hot", loads)
    finally:
        for child in children:
            child.close()

    expected_count = STAMPEDE_PROCESSES * STAMPEDE_THREADS
    assert first_loads == 1
    assert len(first_values) == expected_count
    assert len(set(first_values)) == 1, Counter(first_values)
    assert str(first_values[0]).startswith("loaded by pid")
    assert second_loads == 1
    assert len(second_values) == expected_count
    assert len(set(second_values)) == 1, Counter(second_values)
    assert loads.value == 2


# -- a loader that raises ------------------------------------------------------


class FailsOnce:
    """A loader that sleeps 200 ms, raises on its first call and returns after."""

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


def read_from_threads(
    caches: list[TieredCache], key: str, loader: Callable[[Any], Any], count: int
) -> tuple[list[Any], list[float]]:
    """Read ``key`` from ``count`` threads spread over ``caches``, all at once.

    :returns: each thread's value or exception, and its duration in seconds.
    """
    start = threading.Barrier(count)
    outcomes: list[Any] = [None] * count
    durations = [0.0] * count

    def read(index: int) -> None:
        start.wait()
        began = time.monotonic()
        try:
            outcomes[index] = caches[index % len(caches)].get(key, loader)
        except Exception as exc:  # noqa: BLE001 - compared by the caller
            outcomes[index] = exc
        durations[index] = time.monotonic() - began

    threads = [threading.Thread(target=read, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert not any(thread.is_alive() for thread in threads), "a reader hung"
    return outcomes, durations


def test_stampede_loader_error_reaches_all(
    make_cache: Callable[..., TieredCache],
) -> None:
    cache = make_cache()
    loader = FailsOnce()

    outcomes, durations = read_from_threads([cache], "tmpl:hot", loader, 20)

    assert all(outcome is loader.error for outcome in outcomes), outcomes
    assert max(durations) < 1.0
    assert loader.calls == 1


def test_stampede_loader_error_then_retry(
    make_cache: Callable[..., TieredCache], memcached: MemcachedServer
) -> None:
    cache = make_cache()
    loader = FailsOnce()
    read_from_threads([cache], "tmpl:hot", loader, 20)

    assert cache.get("tmpl:hot", loader) == "loaded"
    assert loader.calls == 2
    assert cache.stats()["leases"]["waits"] == 0
    assert make_cache().get("tmpl:hot", fail_loader) == "loaded"


def test_stampede_two_caches_error_no_hang(
    make_cache: Callable[..., TieredCache],
) -> None:
    # Waiters in the other cache poll the lease. When the holder's load fails,
    # they take the lease themselves (the second call succeeds) or see its error.
    caches = [make_cache(), make_cache()]
    loader = FailsOnce()

    outcomes, durations = read_from_threads(caches, "tmpl:hot", loader, 20)

    assert max(durations) < 1.0
    assert all(outcome in ("loaded", loader.error) for outcome in outcomes), outcomes
    assert loader.calls <= 3


# -- the in-flight table -------------------------------------------------------


def run_many_loads(
    cache: TieredCache, keys: list[str], threads: int, invalidate: bool
) -> Counter[str]:
    """Read every key once from ``threads`` threads, with hot keys interleaved.

    Keys ending in 7 make the loader raise. With ``invalidate``, another thread
    invalidates random keys meanwhile, so some flights are replaced mid-load.
    """
    outcomes: Counter[str] = Counter()
    outcomes_lock = threading.Lock()
    hot = [f"hot:{index}" for index in range(8)]
    done = threading.Event()

    def loader(key: str) -> str:
        if key.endswith("7"):
            raise KeyError(key)
        return key

    def read(offset: int) -> None:
        local: Counter[str] = Counter()
        for index in range(offset, len(keys), threads):
            for key in (keys[index], hot[index % len(hot)]):
                try:
                    cache.get(key, loader)
                    local["value"] += 1
                except KeyError:
                    local["error"] += 1
        with outcomes_lock:
            outcomes.update(local)

    def invalidate_randomly() -> None:
        chooser = random.Random(3)
        while not done.is_set():
            cache.invalidate_many(chooser.sample(keys, 20) + hot[:2])
            time.sleep(0.001)

    workers = [threading.Thread(target=read, args=(i,)) for i in range(threads)]
    invalidator = threading.Thread(target=invalidate_randomly)
    if invalidate:
        invalidator.start()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    done.set()
    if invalidate:
        invalidator.join(10)
    assert not any(worker.is_alive() for worker in workers), "a reader hung"
    return outcomes


def test_flight_table_empty_after_100k_keys(
    make_cache: Callable[..., TieredCache],
) -> None:
    # The flight table is per process, so L2 is left out: 100,000 misses then
    # take ~2.5 s instead of an estimated 20 s, with the same bookkeeping.
    cache = make_cache(memcached_servers=(), local_max_entries=1000)
    keys = [f"subscriber:{index}" for index in range(100_000)]

    outcomes = run_many_loads(cache, keys, threads=8, invalidate=False)

    assert outcomes["value"] + outcomes["error"] == 200_000
    assert outcomes["error"] >= 10_000
    assert cache._flights == {}
    assert cache.local._invalidated == {}
    assert len(cache.local) <= 1000


def test_flight_table_empty_with_memcached(
    make_cache: Callable[..., TieredCache],
) -> None:
    cache = make_cache(local_max_entries=1000)
    keys = [f"subscriber:{index}" for index in range(10_000)]

    outcomes = run_many_loads(cache, keys, threads=8, invalidate=True)

    assert outcomes["value"] + outcomes["error"] == 20_000
    assert cache._flights == {}
    assert len(cache.local._invalidated) <= _PRUNE_AT
    assert len(cache.local) <= 1000


# -- leases between caches -----------------------------------------------------


class BlockingLoader:
    """A loader that returns ``value`` once the test releases it."""

    def __init__(self, value: Any) -> None:
        self.value = value
        self.started = threading.Event()
        self.release = threading.Event()

    def __call__(self, key: Any) -> Any:
        self.started.set()
        if not self.release.wait(10):
            raise TimeoutError("the test did not release the loader within 10 s")
        return self.value


def test_lease_loser_loads_after_wait(
    make_cache: Callable[..., TieredCache], memcached: MemcachedServer
) -> None:
    holder, loser = make_cache(), make_cache(lease_wait=0.3)
    slow = BlockingLoader("holder value")
    results: list[Any] = []
    thread = threading.Thread(target=lambda: results.append(holder.get("k", slow)))
    thread.start()
    try:
        assert slow.started.wait(5)
        began = time.monotonic()
        value = loser.get("k", lambda key: "loser value")
        elapsed = time.monotonic() - began
        raw = MemcacheClient((memcached.host, memcached.port), timeout=2)
        try:
            payload = raw.get(loser.keys.encode("k"))
        finally:
            raw.close()
    finally:
        slow.release.set()
        thread.join(5)

    assert value == "loser value"
    assert 0.3 <= elapsed < 1.0
    assert loser.stats()["leases"]["wait_timeouts"] == 1
    assert payload is not None
    assert codec.unpack(payload).kind == codec.KIND_LEASE
    assert results == ["holder value"]
    assert make_cache().get("k", fail_loader) == "holder value"


def test_lease_loser_gets_holder_value(
    make_cache: Callable[..., TieredCache],
) -> None:
    holder, waiter = make_cache(), make_cache(lease_wait=2.0)
    slow = BlockingLoader("holder value")
    results: list[Any] = []
    thread = threading.Thread(target=lambda: results.append(holder.get("k", slow)))
    thread.start()
    assert slow.started.wait(5)
    timer = threading.Timer(0.2, slow.release.set)
    timer.start()
    try:
        value = waiter.get("k", fail_loader)
    finally:
        slow.release.set()
        timer.cancel()
        thread.join(5)

    assert value == "holder value"
    assert results == ["holder value"]
    assert waiter.stats()["leases"]["waits"] == 1
    assert waiter.stats()["leases"]["wait_timeouts"] == 0


# -- get_many over three servers -----------------------------------------------


def server_stats(server: MemcachedServer) -> dict[bytes, Any]:
    client = MemcacheClient((server.host, server.port), timeout=2)
    try:
        return client.stats()
    finally:
        client.close()


def traffic(servers: list[MemcachedServer]) -> list[tuple[int, int]]:
    """Return ``(cmd_get, bytes_read)`` of each server, from its raw ``stats``."""
    return [
        (int(stats[b"cmd_get"]), int(stats[b"bytes_read"]))
        for stats in map(server_stats, servers)
    ]


def three_server_cache(servers: list[MemcachedServer], **overrides: Any) -> TieredCache:
    settings = Settings(
        memcached_servers=tuple(server.address for server in servers),
        ttl_jitter=0.0,
        read_timeout=2.0,
    ).replace(**overrides)
    return TieredCache(settings)


def wires_by_server(cache: TieredCache, keys: Iterable[str]) -> dict[str, list[str]]:
    """Return the memcached keys of ``keys`` grouped by the server that owns them."""
    assert cache.remote is not None
    by_server: dict[str, list[str]] = {}
    for key in keys:
        wire = cache.keys.encode(key)
        by_server.setdefault(cache.remote.node_for(wire).address, []).append(wire)
    return by_server


def request_sizes(cache: TieredCache, keys: Iterable[str]) -> dict[str, int]:
    """Return the bytes of the ``get`` requests each server receives for ``keys``.

    A batch goes to each server in requests of at most BATCH_KEYS keys.
    """
    sizes: dict[str, int] = {}
    for address, wires in wires_by_server(cache, keys).items():
        sizes[address] = sum(
            len(
                ("get " + " ".join(wires[start : start + BATCH_KEYS]) + "\r\n").encode()
            )
            for start in range(0, len(wires), BATCH_KEYS)
        )
    return sizes


def fill_raw(cache: TieredCache, servers: list[MemcachedServer], values: dict) -> None:
    """Store ``values`` straight into memcached with pipelined sets, as fills would."""
    assert cache.remote is not None
    by_address: dict[str, dict[str, bytes]] = {}
    for key, value in values.items():
        wire = cache.keys.encode(key)
        payload = codec.pack_value(codec.dump_body(value), compress_threshold=1 << 20)
        by_address.setdefault(cache.remote.node_for(wire).address, {})[wire] = payload
    for server in servers:
        client = MemcacheClient((server.host, server.port), timeout=10)
        try:
            failed = client.set_many(
                by_address.get(server.address, {}), flags=codec.WIRE_FLAGS
            )
        finally:
            client.close()
        assert failed == []


def measure_get_many(
    reader: TieredCache,
    servers: list[MemcachedServer],
    keys: Iterable[str],
    loader: Callable[[list[Any]], dict[Any, Any]],
) -> tuple[dict[Any, Any], list[tuple[int, int]], list[tuple[int, int]]]:
    """Run one get_many, and return its result and each server's traffic meanwhile.

    :returns: the result, then ``(cmd_get, bytes_read)`` deltas per server
        during the call, then the same deltas for an idle interval (the
        ``stats`` requests' own bytes), to subtract.
    """
    first = traffic(servers)
    second = traffic(servers)
    found = reader.get_many(keys, loader)
    third = traffic(servers)
    idle = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(first, second, strict=True)]
    busy = [(c[0] - b[0], c[1] - b[1]) for b, c in zip(second, third, strict=True)]
    return found, busy, idle


def warm_up(cache: TieredCache) -> None:
    # A cache's first use of each server replays recorded deletes (a get of
    # another key), so it runs once before any measurement.
    cache.get_many([f"warm:{index}" for index in range(30)], lambda keys: {})


def test_get_many_one_get_per_server(memcached3: list[MemcachedServer]) -> None:
    keys = [f"subscriber:{index}" for index in range(1000)]
    values = {key: {"id": index} for index, key in enumerate(keys)}
    writer = three_server_cache(memcached3)
    reader = three_server_cache(memcached3)
    try:
        writer.get_many(keys, lambda missing: {key: values[key] for key in missing})
        warm_up(reader)
        owned = wires_by_server(reader, keys)
        sizes = request_sizes(reader, keys)

        found, busy, idle = measure_get_many(reader, memcached3, keys, fail_many_loader)
    finally:
        writer.close()
        reader.close()

    assert found == values
    assert len(owned) == 3
    for server, (gets, read), (idle_gets, idle_read) in zip(
        memcached3, busy, idle, strict=True
    ):
        assert gets - idle_gets == len(owned[server.address]), server.address
        # One request: the bytes memcached read are exactly one "get k1 k2 ...".
        assert read - idle_read == sizes[server.address], server.address


def test_get_many_generator_with_duplicates(
    memcached3: list[MemcachedServer],
) -> None:
    unique = [f"segment:{index}" for index in range(300)]
    expected = {key: f"value of {key}" for key in unique}
    writer = three_server_cache(memcached3)
    reader = three_server_cache(memcached3)
    loader = CountingManyLoader()
    try:
        filled = writer.get_many((key for _ in range(3) for key in unique), loader)
        warm_up(reader)
        owned = wires_by_server(reader, unique)
        sizes = request_sizes(reader, unique)
        stream = (key for _ in range(3) for key in unique)

        found, busy, idle = measure_get_many(
            reader, memcached3, stream, fail_many_loader
        )
    finally:
        writer.close()
        reader.close()

    assert filled == expected
    assert len(loader.batches) == 1
    assert sorted(loader.batches[0]) == sorted(unique)
    assert found == expected
    # Each server's single request names each of its keys once.
    for server, (gets, read), (idle_gets, idle_read) in zip(
        memcached3, busy, idle, strict=True
    ):
        assert gets - idle_gets == len(owned[server.address]), server.address
        assert read - idle_read == sizes[server.address], server.address


def test_get_many_twenty_thousand_keys(memcached3: list[MemcachedServer]) -> None:
    keys = [f"segment:12:member:{index}" for index in range(20_000)]
    values = {key: index for index, key in enumerate(keys)}
    reader = three_server_cache(memcached3)
    try:
        fill_raw(reader, memcached3, values)
        warm_up(reader)
        owned = wires_by_server(reader, keys)
        sizes = request_sizes(reader, keys)

        found, busy, idle = measure_get_many(reader, memcached3, keys, fail_many_loader)
        errors = reader.stats()["remote"]["errors"]
    finally:
        reader.close()

    assert found == values
    assert errors == 0
    for server, (gets, read), (idle_gets, idle_read) in zip(
        memcached3, busy, idle, strict=True
    ):
        assert gets - idle_gets == len(owned[server.address]), server.address
        assert read - idle_read == sizes[server.address], server.address


def test_get_many_twenty_thousand_cold(memcached3: list[MemcachedServer]) -> None:
    keys = [f"segment:13:member:{index}" for index in range(20_000)]
    loader = CountingManyLoader()
    # The batch takes its 20,000 leases one add at a time before it loads.
    # On a loaded machine that can take longer than the default lease_ttl,
    # and a fill whose lease expired is dropped (safely, but then L2 lacks
    # the key). A longer lease_ttl keeps this test about batching.
    writer = three_server_cache(memcached3, lease_ttl=120.0)
    reader = three_server_cache(memcached3)
    try:
        filled = writer.get_many(keys, loader)
        from_remote = reader.get_many(keys, fail_many_loader)
    finally:
        writer.close()
        reader.close()

    expected = {key: f"value of {key}" for key in keys}
    assert filled == expected
    assert from_remote == expected
    assert len(loader.batches) == 1
    assert len(loader.batches[0]) == 20_000
