"""Tests of tiercache when memcached or the Redis channel fails, with real servers.

Tests that kill, freeze or stop a server start their own servers, so the
session servers stay healthy for the other tests. memcached faults use 200 ms
timeouts and a 1 s retry interval, so each fault costs a bounded wait.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from procs import (
    CacheProcess,
    CacheSpec,
    is_trusted,
    raw_memcached_value,
    start_processes,
    wait_until,
)

from tiercache import Settings, TieredCache
from tiercache.adapters.redis_channel import RedisChannel
from tiercache.adapters.sqlite import SQLiteOrigin
from tiercache.channel import MemoryChannel
from tiercache.messages import Message
from tiercache.testing import MemcachedServer, RedisServer, free_port

CONNECT_TIMEOUT = 0.2
READ_TIMEOUT = 0.2
NODE_RETRY_TIMEOUT = 1.0
FAULT_OPTIONS: dict[str, Any] = {
    "connect_timeout": CONNECT_TIMEOUT,
    "read_timeout": READ_TIMEOUT,
    "node_retry_timeout": NODE_RETRY_TIMEOUT,
}
# Upper bound on one call that meets a fault: a timeout plus a quick loader.
FAULT_CALL_MAX = 1.0

MakeCache = Callable[..., TieredCache]


@pytest.fixture
def origin_path(tmp_path: Path) -> str:
    return str(tmp_path / "origin.sqlite3")


@pytest.fixture
def namespace() -> str:
    return f"f{uuid.uuid4().hex[:10]}"


@pytest.fixture
def make_cache(origin_path: str, namespace: str) -> Iterator[MakeCache]:
    """Build in-process caches on the test's origin file; closed after the test."""
    caches: list[TieredCache] = []

    def make(
        servers: tuple[str, ...], *, channel: Any = None, **options: Any
    ) -> TieredCache:
        settings = Settings(
            memcached_servers=servers, namespace=namespace, **FAULT_OPTIONS | options
        )
        cache = TieredCache(settings, origin=SQLiteOrigin(origin_path), channel=channel)
        caches.append(cache)
        return cache

    yield make
    for cache in caches:
        cache.close()


@pytest.fixture
def memcached_pair() -> Iterator[list[MemcachedServer]]:
    """Two memcached servers of the test's own, free to kill and freeze."""
    servers = [MemcachedServer().start(), MemcachedServer().start()]
    yield servers
    for server in servers:
        server.stop()


@pytest.fixture
def silent_listener() -> Iterator[str]:
    """Address of a loopback listener that accepts connections and never replies."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept_until_stopped() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            accepted.append(connection)

    thread = threading.Thread(target=accept_until_stopped, daemon=True)
    thread.start()
    yield f"127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join(2)
    listener.close()
    for connection in accepted:
        connection.close()


class PartitionProxy:
    """A loopback TCP proxy to one server that can drop all traffic both ways.

    memcached frozen with SIGSTOP still receives what clients send (the
    kernel buffers it) and executes it once thawed, so a freeze can't lose a
    delete. While :attr:`partitioned` is set this proxy reads and discards
    every byte instead, as a network partition would: requests time out and
    never reach the server, which keeps its old items.
    """

    def __init__(self, upstream: str) -> None:
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.partitioned = False
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._sockets: list[socket.socket] = []
        self._stop = threading.Event()
        threading.Thread(target=self._accept_until_stopped, daemon=True).start()

    def close(self) -> None:
        """Stop accepting and close every proxied connection."""
        self._stop.set()
        self._listener.close()
        for sock in list(self._sockets):
            _shut(sock)

    def _accept_until_stopped(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=2)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            client.settimeout(None)
            self._sockets += [client, server]
            for source, target in ((client, server), (server, client)):
                threading.Thread(
                    target=self._pump, args=(source, target), daemon=True
                ).start()

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                break
            if not data:
                break
            if self.partitioned:
                continue
            try:
                target.sendall(data)
            except OSError:
                break
        _shut(source)
        _shut(target)


def _shut(sock: socket.socket) -> None:
    # shutdown() wakes a thread blocked in recv() on the socket; close() alone
    # would not.
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


class CountingLoader:
    """A loader that returns ``value`` and counts its calls."""

    def __init__(self, value: Any) -> None:
        self.value = value
        self.calls = 0

    def __call__(self, key: Any) -> Any:
        self.calls += 1
        return self.value


def key_owned_by(cache: TieredCache, address: str, prefix: str) -> str:
    """Return the first ``prefix:N`` key that the ring places on ``address``."""
    assert cache.remote is not None
    for number in range(10_000):
        key = f"{prefix}:{number}"
        if cache.remote.node_for(cache.keys.encode(key)).address == address:
            return key
    raise AssertionError(f"no key with prefix {prefix!r} maps to {address}")


def timed(call: Callable[[], Any]) -> tuple[Any, float]:
    started = time.monotonic()
    result = call()
    return result, time.monotonic() - started


def assert_degraded_calls_work(cache: TieredCache, origin_path: str) -> None:
    """Check get and set against an unreachable L2: fast, loader value, no raise."""
    loader = CountingLoader("<h1>template 1</h1>")
    value, seconds = timed(lambda: cache.get("tmpl:1", loader))
    assert value == "<h1>template 1</h1>"
    assert seconds < FAULT_CALL_MAX
    assert loader.calls == 1

    local_hits = cache.local.hits
    assert cache.get("tmpl:1", loader) == "<h1>template 1</h1>"
    assert loader.calls == 1
    assert cache.local.hits == local_hits + 1

    _, seconds = timed(lambda: cache.set("tmpl:1", "<h1>template 1, v2</h1>"))
    assert seconds < FAULT_CALL_MAX
    assert SQLiteOrigin(origin_path).load("tmpl:1") == "<h1>template 1, v2</h1>"
    value, seconds = timed(lambda: cache.get("tmpl:1"))
    assert value == "<h1>template 1, v2</h1>"
    assert seconds < FAULT_CALL_MAX
    assert cache.stats()["remote"]["deletes_queued"] >= 1


def poll_remote_hits(cache: TieredCache, keys: list[str], timeout: float) -> set[str]:
    """Read ``keys`` around L1, in turn, until L2 serves each or time runs out.

    :returns: the keys that L2 served.
    """
    assert cache.remote is not None
    served: set[str] = set()
    deadline = time.monotonic() + timeout
    while served != set(keys) and time.monotonic() < deadline:
        for key in set(keys) - served:
            hits = cache.remote.hits
            cache.clear_local()
            cache.get(key, CountingLoader(f"reloaded {key}"))
            if cache.remote.hits > hits:
                served.add(key)
        time.sleep(0.02)
    return served


# -- memcached unreachable -------------------------------------------------------


def test_refused_port_falls_back_to_loader(
    make_cache: MakeCache, origin_path: str
) -> None:
    cache = make_cache((f"127.0.0.1:{free_port()}",))
    assert_degraded_calls_work(cache, origin_path)
    assert cache.stats()["remote"]["node_downs"] == 1


def test_silent_listener_times_out_fast(
    make_cache: MakeCache, origin_path: str, silent_listener: str
) -> None:
    cache = make_cache((silent_listener,))
    assert_degraded_calls_work(cache, origin_path)
    assert cache.stats()["remote"]["node_downs"] == 1
    # While the server is marked down, a cold key costs no timeout at all.
    value, seconds = timed(lambda: cache.get("tmpl:2", CountingLoader("two")))
    assert value == "two"
    assert seconds < READ_TIMEOUT


def test_all_nodes_killed_then_restarted(
    make_cache: MakeCache, origin_path: str, memcached_pair: list[MemcachedServer]
) -> None:
    cache = make_cache(tuple(server.address for server in memcached_pair))
    keys = [key_owned_by(cache, server.address, "warm") for server in memcached_pair]
    for key in keys:
        cache.get(key, CountingLoader(f"value of {key}"))

    for server in memcached_pair:
        server.kill()
    assert_degraded_calls_work(cache, origin_path)
    for key in keys:
        cache.clear_local()
        loader = CountingLoader("from origin")
        value, seconds = timed(lambda key=key, loader=loader: cache.get(key, loader))
        assert value == "from origin"
        assert seconds < FAULT_CALL_MAX
    assert cache.stats()["remote"]["node_downs"] == 2

    for server in memcached_pair:
        server.restart()
    assert poll_remote_hits(cache, keys, NODE_RETRY_TIMEOUT + 1.0) == set(keys)
    assert cache.get("tmpl:1") == "<h1>template 1, v2</h1>"


def test_restarted_node_serves_without_retry_wait(
    make_cache: MakeCache, memcached_pair: list[MemcachedServer]
) -> None:
    """A server restarted while idle is used at once, not marked down again.

    The cache's socket to the old server process is dead after the restart.
    The first command fails on it, and that must not count as a server failure.
    """
    server = memcached_pair[0]
    cache = make_cache((server.address,))
    assert cache.get("tmpl:1", CountingLoader("one")) == "one"
    server.kill()
    server.restart()

    cache.clear_local()
    assert cache.get("tmpl:1", CountingLoader("one, reloaded")) == "one, reloaded"
    cache.clear_local()
    assert cache.get("tmpl:1", CountingLoader("one, loaded again")) == "one, reloaded"
    remote = cache.stats()["remote"]
    assert remote["node_downs"] == 0
    assert remote["hits"] == 1


def test_frozen_node_times_out_then_thaws(
    make_cache: MakeCache, origin_path: str, memcached_pair: list[MemcachedServer]
) -> None:
    server = memcached_pair[0]
    cache = make_cache((server.address,))
    cache.get("tmpl:warm", CountingLoader("warm"))

    server.pause()
    try:
        loader = CountingLoader("warm, from the loader")
        cache.clear_local()
        value, seconds = timed(lambda: cache.get("tmpl:warm", loader))
        assert value == "warm, from the loader"
        assert seconds < FAULT_CALL_MAX
        assert_degraded_calls_work(cache, origin_path)
    finally:
        server.resume()

    assert poll_remote_hits(cache, ["tmpl:warm"], NODE_RETRY_TIMEOUT + 1.0)
    # The delete queued during the freeze was replayed: L2 has no old value.
    assert cache.get("tmpl:1") == "<h1>template 1, v2</h1>"


def test_down_node_keys_not_rehashed(
    make_cache: MakeCache, namespace: str, memcached_pair: list[MemcachedServer]
) -> None:
    node_a, node_b = memcached_pair
    cache = make_cache((node_a.address, node_b.address))
    key_on_a = key_owned_by(cache, node_a.address, "subscriber")
    key_on_b = key_owned_by(cache, node_b.address, "subscriber")

    node_a.kill()
    assert cache.get(key_on_a, CountingLoader("on a")) == "on a"
    cache.set(key_on_a, "on a, v2")
    cache.clear_local()
    assert cache.get(key_on_a, CountingLoader("on a, v3")) == "on a, v3"
    assert cache.get(key_on_b, CountingLoader("on b")) == "on b"

    assert raw_memcached_value(node_b.address, namespace, key_on_a) is None
    assert raw_memcached_value(node_b.address, namespace, key_on_b) == ("value", "on b")


def test_timed_out_reply_never_read_later(
    make_cache: MakeCache, memcached_pair: list[MemcachedServer]
) -> None:
    server = memcached_pair[0]
    single = make_cache((server.address,))
    batch = make_cache((server.address,))
    keys = [f"tmpl:{number}" for number in range(40)]
    expected = {key: f"value {number}" for number, key in enumerate(keys)}
    for key, value in expected.items():
        single.get(key, CountingLoader(value))
    assert batch.get_many(keys, lambda missing: {}) == expected

    # A get and a pipelined multi-get each time out with their request sent,
    # so memcached writes replies to those sockets once it is thawed.
    server.pause()
    try:
        single.clear_local()
        batch.clear_local()
        assert single.get(keys[0], CountingLoader("from loader")) == "from loader"
        loaded = batch.get_many(
            keys[:5], lambda missing: {k: "loaded" for k in missing}
        )
        assert loaded == {key: "loaded" for key in keys[:5]}
    finally:
        server.resume()
    time.sleep(NODE_RETRY_TIMEOUT)

    assert single.remote is not None
    hits = single.remote.hits
    for key in keys[5:]:
        single.clear_local()
        assert single.get(key, CountingLoader(f"reloaded {key}")) == expected[key]
    assert single.remote.hits == hits + len(keys) - 5
    for start in range(5, len(keys), 5):
        batch.clear_local()
        chunk = keys[start : start + 5]
        found = batch.get_many(chunk, lambda missing: {k: "reloaded" for k in missing})
        assert found == {key: expected[key] for key in chunk}


# -- lost deletes -------------------------------------------------------------------


class LostDeleteSetup:
    """A writer cache in this process, node A behind a proxy, and a key on A."""

    def __init__(
        self,
        make_cache: MakeCache,
        memcached_pair: list[MemcachedServer],
        redis_url: str,
        origin_path: str,
        namespace: str,
    ) -> None:
        self.node_a, node_b = memcached_pair
        self.proxy = PartitionProxy(self.node_a.address)
        channel_name = f"invalidations-{uuid.uuid4().hex[:8]}"
        servers = (self.proxy.address, node_b.address)
        channel = RedisChannel(redis_url, name=channel_name)
        self.writer = make_cache(servers, channel=channel)
        assert wait_until(lambda: is_trusted(self.writer), 5)
        self.key = key_owned_by(self.writer, self.proxy.address, "subscriber")
        self.spec = CacheSpec(
            memcached_servers=servers,
            origin_path=origin_path,
            namespace=namespace,
            channel_url=redis_url,
            channel_name=channel_name,
            options=dict(FAULT_OPTIONS),
        )
        self.children: list[CacheProcess] = []

    def start_reader(self) -> CacheProcess:
        (reader,) = start_processes(self.spec, 1)
        self.children.append(reader)
        return reader

    def close(self) -> None:
        for child in self.children:
            child.close()
        self.proxy.close()


@pytest.fixture
def lost_delete_setup(
    make_cache: MakeCache,
    memcached_pair: list[MemcachedServer],
    redis: RedisServer,
    origin_path: str,
    namespace: str,
) -> Iterator[LostDeleteSetup]:
    setup = LostDeleteSetup(
        make_cache, memcached_pair, redis.url, origin_path, namespace
    )
    yield setup
    setup.close()


def write_while_node_cut_off(setup: LostDeleteSetup) -> None:
    """Cache the key on node A, cut A off, write the key, then reconnect A."""
    writer, key, node_a = setup.writer, setup.key, setup.node_a
    SQLiteOrigin(setup.spec.origin_path).store(key, {"status": "subscribed"})
    assert writer.get(key) == {"status": "subscribed"}
    namespace = writer.settings.namespace
    old_item = ("value", {"status": "subscribed"})
    assert raw_memcached_value(node_a.address, namespace, key) == old_item

    setup.proxy.partitioned = True
    try:
        _, seconds = timed(lambda: writer.set(key, {"status": "unsubscribed"}))
    finally:
        setup.proxy.partitioned = False
    assert seconds < FAULT_CALL_MAX
    stats = writer.stats()
    assert stats["remote"]["deletes_queued"] >= 1
    assert stats["errors"]["invalidations_failed"] >= 1
    assert SQLiteOrigin(setup.spec.origin_path).load(key) == {"status": "unsubscribed"}
    # The delete never reached A, which still contains the old value.
    assert raw_memcached_value(node_a.address, namespace, key) == old_item


def test_lost_delete_replayed_by_writer(lost_delete_setup: LostDeleteSetup) -> None:
    setup = lost_delete_setup
    write_while_node_cut_off(setup)
    time.sleep(NODE_RETRY_TIMEOUT + 0.1)

    setup.writer.clear_local()
    assert setup.writer.get(setup.key) == {"status": "unsubscribed"}
    reader = setup.start_reader()
    assert reader.call("get", setup.key) == {"status": "unsubscribed"}


def test_lost_delete_replayed_by_subscribed_reader(
    lost_delete_setup: LostDeleteSetup,
) -> None:
    """A process that heard the writer's lost delete replays it before reading A."""
    setup = lost_delete_setup
    reader = setup.start_reader()
    write_while_node_cut_off(setup)
    time.sleep(NODE_RETRY_TIMEOUT + 0.1)

    assert reader.call("get", setup.key) == {"status": "unsubscribed"}
    namespace = setup.writer.settings.namespace
    assert raw_memcached_value(setup.node_a.address, namespace, setup.key) != (
        "value",
        {"status": "subscribed"},
    )


def test_lost_delete_seen_by_later_process(lost_delete_setup: LostDeleteSetup) -> None:
    """A process started after the outage, reading first, must not get the old value."""
    setup = lost_delete_setup
    write_while_node_cut_off(setup)
    time.sleep(NODE_RETRY_TIMEOUT + 0.1)

    reader = setup.start_reader()
    assert reader.call("get", setup.key) == {"status": "unsubscribed"}


def test_lost_delete_seen_by_process_deaf_at_write(
    make_cache: MakeCache,
    memcached_pair: list[MemcachedServer],
    origin_path: str,
    namespace: str,
) -> None:
    """A process that lost the channel while the delete was lost must not read it."""
    with RedisServer() as redis_server:
        setup = LostDeleteSetup(
            make_cache, memcached_pair, redis_server.url, origin_path, namespace
        )
        try:
            reader = setup.start_reader()
            redis_server.stop()
            assert wait_until(lambda: not is_child_trusted(reader), 2.0)
            write_while_node_cut_off(setup)
            redis_server.restart()
            assert wait_until(lambda: is_child_trusted(reader), 5.0)
            time.sleep(NODE_RETRY_TIMEOUT + 0.1)

            assert reader.call("get", setup.key) == {"status": "unsubscribed"}
        finally:
            setup.close()


# -- channel loss -------------------------------------------------------------------


def channel_spec(
    memcached: MemcachedServer,
    redis_server: RedisServer,
    origin_path: str,
    **options: Any,
) -> CacheSpec:
    tag = uuid.uuid4().hex[:10]
    return CacheSpec(
        memcached_servers=(memcached.address,),
        origin_path=origin_path,
        namespace=f"c{tag}",
        channel_url=redis_server.url,
        channel_name=f"invalidations-{tag}",
        options=options,
    )


def stats_of(child: CacheProcess) -> dict[str, Any]:
    return child.call("stats")  # type: ignore[no-any-return]


def is_child_trusted(child: CacheProcess) -> bool:
    return stats_of(child)["invalidations"]["trusted"]  # type: ignore[no-any-return]


def test_channel_loss_bypasses_l1_until_back(
    memcached: MemcachedServer, origin_path: str
) -> None:
    origin = SQLiteOrigin(origin_path)
    origin.store("subscriber:5", {"status": "subscribed"})
    origin.store("subscriber:6", {"plan": "free"})
    with RedisServer() as redis_server:
        spec = channel_spec(memcached, redis_server, origin_path)
        writer, reader = start_processes(spec, 2)
        try:
            for key in ("subscriber:5", "subscriber:6"):
                writer.call("get", key)
                reader.call("get", key)
                assert reader.call("is_local", key)

            redis_server.stop()
            assert wait_until(lambda: not is_child_trusted(reader), 2.0)
            _, seconds = timed(
                lambda: writer.call("set", "subscriber:5", {"status": "unsubscribed"})
            )
            assert seconds < FAULT_CALL_MAX
            assert origin.load("subscriber:5") == {"status": "unsubscribed"}
            writer_errors = stats_of(writer)
            assert writer_errors["invalidations"]["publish_errors"] >= 1
            assert writer_errors["errors"]["invalidations_failed"] >= 1

            # While the channel is down, reads go around L1 to L2 and the origin.
            before = stats_of(reader)
            assert reader.call("get", "subscriber:5") == {"status": "unsubscribed"}
            assert reader.call("get", "subscriber:6") == {"plan": "free"}
            assert reader.call("get", "subscriber:6") == {"plan": "free"}
            after = stats_of(reader)
            assert after["local"]["hits"] == before["local"]["hits"]
            assert after["remote"]["hits"] >= before["remote"]["hits"] + 2
            assert not reader.call("is_local", "subscriber:6")

            redis_server.restart()
            assert wait_until(lambda: is_child_trusted(reader), 5.0)
            assert wait_until(lambda: is_child_trusted(writer), 5.0)
            assert reader.call("get", "subscriber:5") == {"status": "unsubscribed"}
            reader.call("get", "subscriber:6")
            assert reader.call("is_local", "subscriber:6")

            started = time.monotonic()
            writer.call("set", "subscriber:6", {"plan": "pro"})
            assert wait_until(
                lambda: reader.call("get", "subscriber:6") == {"plan": "pro"}, 1.0
            )
            assert time.monotonic() - started < 1.0
        finally:
            for child in (writer, reader):
                child.close()


def test_channel_loss_flush_mode_flushes_on_return(
    memcached: MemcachedServer, origin_path: str
) -> None:
    """With on_channel_loss="flush", L1 filled while deaf is flushed on resubscribe."""
    origin = SQLiteOrigin(origin_path)
    origin.store("subscriber:5", {"status": "subscribed"})
    with RedisServer() as redis_server:
        spec = channel_spec(
            memcached, redis_server, origin_path, on_channel_loss="flush"
        )
        writer, reader = start_processes(spec, 2)
        try:
            redis_server.stop()
            assert wait_until(lambda: not is_child_trusted(reader), 2.0)
            assert reader.call("get", "subscriber:5") == {"status": "subscribed"}
            assert reader.call("is_local", "subscriber:5")
            writer.call("set", "subscriber:5", {"status": "unsubscribed"})

            redis_server.restart()
            assert wait_until(lambda: is_child_trusted(reader), 5.0)
            assert reader.call("get", "subscriber:5") == {"status": "unsubscribed"}
            assert stats_of(reader)["invalidations"]["local_flushes"] >= 2
        finally:
            for child in (writer, reader):
                child.close()


# -- lost messages ------------------------------------------------------------------


def memory_pair(
    make_cache: MakeCache, memcached: MemcachedServer, heartbeat_interval: float
) -> tuple[TieredCache, TieredCache]:
    """Return a writer and a reader cache on one new in-process channel."""
    name = f"memory-{uuid.uuid4().hex}"
    reader = make_cache(
        (memcached.address,),
        channel=MemoryChannel(name),
        heartbeat_interval=heartbeat_interval,
    )
    writer = make_cache(
        (memcached.address,),
        channel=MemoryChannel(name),
        heartbeat_interval=heartbeat_interval,
    )
    return writer, reader


def drop_once(reader: TieredCache, wire_key: str) -> list[bytes]:
    """Make the reader's channel lose the next invalidation of ``wire_key``."""
    dropped: list[bytes] = []

    def drop(payload: bytes) -> bool:
        if dropped or b'"inv"' not in payload or wire_key.encode() not in payload:
            return False
        dropped.append(payload)
        return True

    reader.bus.channel.drop = drop  # type: ignore[union-attr]
    return dropped


def test_dropped_message_noticed_by_next_message(
    make_cache: MakeCache, memcached: MemcachedServer, origin_path: str
) -> None:
    SQLiteOrigin(origin_path).store("subscriber:5", {"status": "subscribed"})
    writer, reader = memory_pair(make_cache, memcached, heartbeat_interval=3600)
    writer.set("subscriber:7", "first message, delivered")
    assert reader.get("subscriber:5") == {"status": "subscribed"}
    dropped = drop_once(reader, reader.keys.encode("subscriber:5"))

    writer.set("subscriber:5", {"status": "unsubscribed"})
    assert len(dropped) == 1
    assert reader.get("subscriber:5") == {"status": "subscribed"}
    before = reader.stats()["invalidations"]
    writer.set("subscriber:8", "next message")

    after = reader.stats()["invalidations"]
    assert after["gaps"] == before["gaps"] + 1
    assert after["local_flushes"] > before["local_flushes"]
    assert reader.get("subscriber:5") == {"status": "unsubscribed"}


def test_dropped_message_noticed_by_heartbeat(
    make_cache: MakeCache, memcached: MemcachedServer, origin_path: str
) -> None:
    SQLiteOrigin(origin_path).store("subscriber:5", {"status": "subscribed"})
    writer, reader = memory_pair(make_cache, memcached, heartbeat_interval=0.1)
    writer.set("subscriber:7", "first message, delivered")
    assert reader.get("subscriber:5") == {"status": "subscribed"}
    dropped = drop_once(reader, reader.keys.encode("subscriber:5"))
    gaps = reader.stats()["invalidations"]["gaps"]

    writer.set("subscriber:5", {"status": "unsubscribed"})
    assert len(dropped) == 1

    assert wait_until(lambda: reader.stats()["invalidations"]["gaps"] > gaps, 1.0)
    assert reader.get("subscriber:5") == {"status": "unsubscribed"}


def test_sequence_jump_over_redis_flushes(
    make_cache: MakeCache, memcached: MemcachedServer, redis: RedisServer
) -> None:
    """A number skipped by a sender on Redis makes a receiver flush its L1."""
    import redis as redis_py

    channel_name = f"invalidations-{uuid.uuid4().hex[:8]}"
    reader = make_cache(
        (memcached.address,), channel=RedisChannel(redis.url, name=channel_name)
    )
    assert wait_until(lambda: is_trusted(reader), 5)
    assert reader.get("tmpl:1", CountingLoader("one")) == "one"
    publisher = redis_py.Redis.from_url(redis.url)
    sender = "other-process-1"

    def publish(seq: int, keys: tuple[str, ...]) -> None:
        message = Message("inv", sender, seq, time.time(), keys)
        publisher.publish(channel_name, message.encode())

    try:
        publish(1, (reader.keys.encode("tmpl:other"),))
        assert wait_until(lambda: reader.stats()["invalidations"]["received"] >= 1, 1)
        assert reader.keys.encode("tmpl:1") in reader.local
        before = reader.stats()["invalidations"]
        publish(3, (reader.keys.encode("tmpl:other"),))
        assert wait_until(
            lambda: reader.stats()["invalidations"]["gaps"] > before["gaps"], 1
        )
    finally:
        publisher.close()
    after = reader.stats()["invalidations"]
    assert after["gaps"] == before["gaps"] + 1
    assert after["local_flushes"] > before["local_flushes"]
    assert reader.keys.encode("tmpl:1") not in reader.local
