"""Tests of tiercache across OS processes, against real memcached and Redis.

Each child process builds its own cache (see procs.py) on the session memcached
server, a Redis channel named for the test, and one SQLite origin file shared
by all processes of the test, as the worker processes of one deployment would.
"""

from __future__ import annotations

import multiprocessing
import queue
import random
import string
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from procs import (
    SPAWN,
    CacheProcess,
    CacheSpec,
    build_cache,
    is_trusted,
    raw_memcached_value,
    start_processes,
    wait_until,
)

from tiercache import codec
from tiercache.adapters.sqlite import SQLiteOrigin
from tiercache.keys import KeyCodec
from tiercache.remote import ITEM_OVERHEAD
from tiercache.testing import MemcachedServer, RedisServer

# Seconds within which another process must drop its L1 copy after a write.
INVALIDATION_WAIT = 1.0

StartChildren = Callable[..., list[CacheProcess]]


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
def origin(spec: CacheSpec) -> SQLiteOrigin:
    """The origin file that every child of the test writes through to."""
    return SQLiteOrigin(spec.origin_path)


@pytest.fixture
def start_children(spec: CacheSpec) -> Iterator[StartChildren]:
    """Start child processes with caches; all are closed after the test."""
    started: list[CacheProcess] = []

    def start(
        count: int = 1,
        *,
        child_spec: CacheSpec | None = None,
        shared: dict[str, Any] | None = None,
    ) -> list[CacheProcess]:
        children = start_processes(child_spec or spec, count, shared=shared)
        started.extend(children)
        return children

    yield start
    for child in started:
        child.close()


def poll_get(child: CacheProcess, key: str, expected: Any, timeout: float) -> Any:
    """Read ``key`` in ``child`` until it returns ``expected`` or time runs out."""
    value = child.call("get", key)
    deadline = time.monotonic() + timeout
    while value != expected and time.monotonic() < deadline:
        time.sleep(0.005)
        value = child.call("get", key)
    return value


def stat(child: CacheProcess, section: str, name: str) -> Any:
    return child.call("stats")[section][name]


# -- invalidation across processes ------------------------------------------------


def test_write_evicts_other_process_l1(
    start_children: StartChildren, origin: SQLiteOrigin
) -> None:
    origin.store("subscriber:5", {"status": "subscribed"})
    writer, reader = start_children(2)
    assert writer.call("get", "subscriber:5") == {"status": "subscribed"}
    assert reader.call("get", "subscriber:5") == {"status": "subscribed"}
    assert reader.call("is_local", "subscriber:5")

    started = time.monotonic()
    writer.call("set", "subscriber:5", {"status": "unsubscribed"})
    seen = poll_get(
        reader, "subscriber:5", {"status": "unsubscribed"}, INVALIDATION_WAIT
    )
    elapsed = time.monotonic() - started

    assert seen == {"status": "unsubscribed"}
    assert elapsed < INVALIDATION_WAIT
    assert writer.call("get", "subscriber:5") == {"status": "unsubscribed"}
    assert stat(reader, "invalidations", "received") >= 1


def test_fill_begun_before_write_never_lands(
    spec: CacheSpec, start_children: StartChildren, origin: SQLiteOrigin
) -> None:
    """A reader that loaded the old row before a write commits can't cache it."""
    origin.store("subscriber:5", {"status": "subscribed"})
    loaded, release = SPAWN.Event(), SPAWN.Event()
    (writer,) = start_children(1)
    (reader,) = start_children(1, shared={"loaded": loaded, "release": release})
    in_flight = reader.submit("get_with_blocking_loader", "subscriber:5")
    assert loaded.wait(5), "the reader's loader never read the origin"

    writer.call("set", "subscriber:5", {"status": "unsubscribed"})
    # Release only once the reader has heard of the write, so the L1 guard
    # (not the later eviction) is what keeps the old row out of L1.
    assert wait_until(
        lambda: stat(reader, "invalidations", "received") >= 1, INVALIDATION_WAIT
    )
    release.set()
    # The call that was in flight may return the old row; it must not cache it.
    assert in_flight.result() in (
        {"status": "subscribed"},
        {"status": "unsubscribed"},
    )

    reader_stats = reader.call("stats")
    assert reader_stats["local"]["dropped_fills"] >= 1
    assert reader_stats["leases"]["stale_fills_dropped"] >= 1
    assert not reader.call("is_local", "subscriber:5")
    address = spec.memcached_servers[0]
    assert raw_memcached_value(address, spec.namespace, "subscriber:5") is None

    (fresh,) = start_children(1)
    assert writer.call("get", "subscriber:5") == {"status": "unsubscribed"}
    assert reader.call("get", "subscriber:5") == {"status": "unsubscribed"}
    assert fresh.call("get", "subscriber:5") == {"status": "unsubscribed"}
    assert raw_memcached_value(address, spec.namespace, "subscriber:5") == (
        "value",
        {"status": "unsubscribed"},
    )


# -- signal receivers ---------------------------------------------------------------


def test_raising_receiver_does_not_break_write(
    start_children: StartChildren, origin: SQLiteOrigin
) -> None:
    origin.store("tmpl:3", "v1")
    writer, reader = start_children(2)
    for child in (writer, reader):
        child.call("connect_receivers")
        assert child.call("get", "tmpl:3") == "v1"
        assert child.call("is_local", "tmpl:3")
    # The cache's own eviction must not rest on weakly held receivers.
    reader.call("collect_garbage")

    writer.call("set", "tmpl:3", "v2")

    assert origin.load("tmpl:3") == "v2"
    assert writer.call("get", "tmpl:3") == "v2"
    assert poll_get(reader, "tmpl:3", "v2", INVALIDATION_WAIT) == "v2"
    # The receiver connected after the raising one still ran, in both processes.
    assert writer.call("invalidated_keys") == [("tmpl:3",)]
    assert wait_until(lambda: len(reader.call("invalidated_keys")) == 1, 1.0)
    for child in (writer, reader):
        assert stat(child, "errors", "receiver_failures") >= 1
        logs = child.call("logs")
        assert any("receiver failed on purpose" in line for line in logs), logs


# -- values over memcached's item size ----------------------------------------------


def incompressible_text(size: int) -> str:
    """Return ``size`` random printable characters, which zlib can't shrink much."""
    alphabet = string.ascii_letters + string.digits + string.punctuation
    return "".join(random.choices(alphabet, k=size))


def test_value_over_item_size_never_serves_old(
    spec: CacheSpec, start_children: StartChildren, origin: SQLiteOrigin
) -> None:
    small_html = "<p>" + "small " * 20 + "</p>"
    big_html = "<p>" + incompressible_text(1_500_000) + "</p>"
    writer, reader = start_children(2)
    writer.call("set", "tmpl:42", small_html)
    assert writer.call("get", "tmpl:42") == small_html
    remote_hits = stat(reader, "remote", "hits")
    assert reader.call("get", "tmpl:42") == small_html
    assert stat(reader, "remote", "hits") == remote_hits + 1

    received = stat(reader, "invalidations", "received")
    writer.call("set", "tmpl:42", big_html)
    assert origin.load("tmpl:42") == big_html
    assert wait_until(
        lambda: stat(reader, "invalidations", "received") > received, INVALIDATION_WAIT
    )

    assert reader.call("get", "tmpl:42") == big_html
    assert reader.call("get", "tmpl:42") == big_html
    assert writer.call("get", "tmpl:42") == big_html
    address = spec.memcached_servers[0]
    assert raw_memcached_value(address, spec.namespace, "tmpl:42") is None
    reader_stats = reader.call("stats")
    writer_stats = writer.call("stats")
    too_large = (
        reader_stats["errors"]["too_large"] + writer_stats["errors"]["too_large"]
    )
    assert too_large >= 1

    # memcached stays in rotation: a small key is still an L2 hit.
    writer.call("set", "tmpl:43", small_html)
    assert writer.call("get", "tmpl:43") == small_html
    remote_hits = stat(reader, "remote", "hits")
    assert reader.call("get", "tmpl:43") == small_html
    reader_stats = reader.call("stats")
    assert reader_stats["remote"]["hits"] == remote_hits + 1
    assert reader_stats["remote"]["node_downs"] == 0
    assert reader_stats["remote"]["errors"] == 0


def edge_value(spec: CacheSpec, key: str, max_item_size: int, extra: int) -> str:
    """Return a str whose memcached item is ``extra`` bytes over the cache's limit.

    memcached's limit (``-I``, 1 MiB by default) counts the key and an item
    header as well as the value, so the cache keeps the payload plus the
    key plus ``ITEM_OVERHEAD`` bytes within ``max_item_size``.
    """
    wire = KeyCodec(spec.namespace).encode(key)
    quotes = 2
    size = max_item_size - len(wire) - ITEM_OVERHEAD - codec.HEADER_SIZE - quotes
    return "x" * (size + extra)


def test_value_at_item_size_limit_cached(
    spec: CacheSpec, start_children: StartChildren
) -> None:
    max_item_size = 1024 * 1024
    # No compression, so the item is exactly the header plus the JSON body.
    child_spec = spec.replace(
        options={"max_item_size": max_item_size, "compress_threshold": 2**30}
    )
    value = edge_value(spec, "tmpl:edge", max_item_size, 0)
    writer, reader = start_children(2, child_spec=child_spec)

    writer.call("set", "tmpl:edge", value)
    assert writer.call("get", "tmpl:edge") == value
    remote_hits = stat(reader, "remote", "hits")
    assert reader.call("get", "tmpl:edge") == value

    assert stat(writer, "remote", "refused_stores") == 0
    assert stat(reader, "remote", "hits") == remote_hits + 1


def test_value_over_item_size_limit_kept_out(
    spec: CacheSpec, start_children: StartChildren
) -> None:
    max_item_size = 1024 * 1024
    child_spec = spec.replace(
        options={"max_item_size": max_item_size, "compress_threshold": 2**30}
    )
    value = edge_value(spec, "tmpl:edge", max_item_size, 1)
    writer, reader = start_children(2, child_spec=child_spec)

    writer.call("set", "tmpl:edge", value)
    assert writer.call("get", "tmpl:edge") == value
    assert reader.call("get", "tmpl:edge") == value

    assert stat(writer, "remote", "refused_stores") == 0
    assert stat(writer, "errors", "too_large") == 1
    assert stat(reader, "errors", "too_large") == 1


# -- fork ---------------------------------------------------------------------------

FORK = multiprocessing.get_context("fork")
FORKED_CHILDREN = 4
ROUNDS_PER_CHILD = 300


def run_forked_child(
    cache: Any,
    index: int,
    results: Any,
    key_cached: Any,
    key_written: Any,
) -> None:
    """Write and read back own keys, then take part in the L1 hand-over check.

    Child 2 caches ``shared`` in L1 and waits for child 1 to write it. Every
    outcome goes to ``results`` as ``(index, name, value)``.
    """
    started = time.monotonic()
    trusted = wait_until(lambda: is_trusted(cache), 5)
    results.put((index, "trusted", trusted))
    wrong: list[tuple[str, Any]] = []
    for n in range(ROUNDS_PER_CHILD):
        key = f"child:{index}:{n}"
        cache.set(key, f"{index}-{n}")
        value = cache.get(key)
        if value != f"{index}-{n}":
            wrong.append((key, value))
    results.put((index, "wrong", wrong))
    if index == 2:
        first = cache.get("shared")
        cache.get("shared")
        is_cached = cache.keys.encode("shared") in cache.local
        results.put((index, "cached shared", (first, is_cached)))
        key_cached.set()
        key_written.wait(5)
        seen = wait_until(lambda: cache.get("shared") == "v2", INVALIDATION_WAIT)
        results.put((index, "saw new value", seen))
    if index == 1:
        key_cached.wait(5)
        cache.set("shared", "v2")
        key_written.set()
    results.put((index, "seconds", time.monotonic() - started))


def test_forked_children_keep_own_sockets(spec: CacheSpec) -> None:
    origin = SQLiteOrigin(spec.origin_path)
    origin.store("warm", "warm value")
    origin.store("shared", "v1")
    cache = build_cache(spec)
    try:
        assert wait_until(lambda: is_trusted(cache), 5)
        assert cache.get("warm") == "warm value"
        parent_keys = {f"parent:{j}": f"parent value {j}" for j in range(20)}
        for key, value in parent_keys.items():
            assert cache.get(key, lambda _key, value=value: value) == value

        results = FORK.Queue()
        key_cached, key_written = FORK.Event(), FORK.Event()
        started = time.monotonic()
        children = [
            FORK.Process(
                target=run_forked_child,
                args=(cache, index, results, key_cached, key_written),
                daemon=True,
            )
            for index in range(1, FORKED_CHILDREN + 1)
        ]
        for child in children:
            child.start()

        # The parent keeps reading through its own sockets: L2 and the origin.
        parent_wrong: list[tuple[str, Any]] = []
        parent_reads = 0
        while any(child.is_alive() for child in children):
            if time.monotonic() - started > 15:
                break
            cache.clear_local()
            for key, expected in [("warm", "warm value"), *parent_keys.items()]:
                value = cache.get(key)
                parent_reads += 1
                if value != expected:
                    parent_wrong.append((key, value))
        for child in children:
            child.join(5)
        elapsed = time.monotonic() - started
        alive = [child.pid for child in children if child.is_alive()]
        for child in children:
            if child.is_alive():
                child.kill()
                child.join(5)

        outcomes: dict[tuple[int, str], Any] = {}
        while True:
            try:
                index, name, value = results.get(timeout=0.5)
            except queue.Empty:
                break
            outcomes[(index, name)] = value
    finally:
        cache.close()

    assert alive == []
    assert elapsed < 10
    assert parent_reads > 0
    assert parent_wrong == []
    for index in range(1, FORKED_CHILDREN + 1):
        assert outcomes.get((index, "trusted")) is True, f"child {index} not subscribed"
        assert outcomes.get((index, "wrong")) == [], f"child {index} read wrong values"
    assert [child.exitcode for child in children] == [0] * FORKED_CHILDREN
    assert outcomes.get((2, "cached shared")) == ("v1", True)
    assert outcomes.get((2, "saw new value")) is True
    assert origin.load("shared") == "v2"


# -- stampede -------------------------------------------------------------------------

STAMPEDE_PROCESSES = 4
STAMPEDE_THREADS = 8


def run_stampede(
    children: list[CacheProcess], key: str, loads: Any
) -> tuple[int, list[Any]]:
    before = loads.value
    replies = [
        child.submit("get_in_stampede", key, STAMPEDE_THREADS) for child in children
    ]
    values = [value for reply in replies for value in reply.result(timeout=15)]
    return loads.value - before, values


def test_stampede_across_processes_loads_once(start_children: StartChildren) -> None:
    loads = SPAWN.Value("i", 0)
    start = SPAWN.Barrier(STAMPEDE_PROCESSES)
    children = start_children(
        STAMPEDE_PROCESSES, shared={"loads": loads, "start": start}
    )

    load_count, values = run_stampede(children, "tmpl:hot", loads)

    assert load_count == 1
    assert len(values) == STAMPEDE_PROCESSES * STAMPEDE_THREADS
    assert len(set(values)) == 1, set(values)
    assert str(values[0]).startswith("loaded by pid")

    # After an invalidation every process misses again, and still loads once.
    children[0].call("invalidate", "tmpl:hot")
    for child in children[1:]:
        assert wait_until(
            lambda child=child: not child.call("is_local", "tmpl:hot"),
            INVALIDATION_WAIT,
        )
    load_count, values = run_stampede(children, "tmpl:hot", loads)
    assert load_count == 1
    assert len(set(values)) == 1, set(values)
