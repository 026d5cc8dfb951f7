"""Tests of the PostgreSQL LISTEN/NOTIFY channel against real servers."""

from __future__ import annotations

import gc
import multiprocessing
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from tiercache import ChannelError, ConfigurationError, Settings, TieredCache
from tiercache.adapters.postgres import PostgresOrigin
from tiercache.adapters.postgres_channel import PostgresChannel
from tiercache.channel import make_channel
from tiercache.invalidation import InvalidationBus
from tiercache.messages import Message, batch_keys, decode_message
from tiercache.testing import MemcachedServer

CHANNEL = "tiercache_invalidations"
# PostgreSQL rejects NOTIFY payloads of this many bytes or more (default build).
PAYLOAD_LIMIT = 8000
# Seconds that any wait for a message or a reconnect may take in these tests.
WAIT = 5.0


def wait_until(condition: Callable[[], bool], timeout: float = WAIT) -> bool:
    """Poll ``condition`` until it is true or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def collect_until(
    conn: psycopg.Connection[Any],
    payloads: list[str],
    done: Callable[[list[str]], bool],
    timeout: float = WAIT,
) -> bool:
    """Append notifications received on ``conn`` until ``done(payloads)``."""
    deadline = time.monotonic() + timeout
    while not done(payloads):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        for notify in conn.notifies(timeout=min(remaining, 0.1)):
            payloads.append(notify.payload)
    return True


def bus(cache: TieredCache) -> InvalidationBus:
    assert cache.bus is not None
    return cache.bus


def channel_of(cache: TieredCache) -> PostgresChannel:
    channel = bus(cache).channel
    assert isinstance(channel, PostgresChannel)
    return channel


def messages_of(payloads: list[str], kind: str) -> list[Message]:
    messages = [decode_message(payload) for payload in payloads]
    return [message for message in messages if message.kind == kind]


def backend_pids(admin: psycopg.Connection[Any], application_name: str) -> set[int]:
    rows = admin.execute(
        "SELECT pid FROM pg_stat_activity WHERE application_name = %s",
        (application_name,),
    )
    return {int(row[0]) for row in rows}


def terminate(admin: psycopg.Connection[Any], pid: int) -> None:
    # The second argument waits, in milliseconds, until the session has ended.
    admin.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))


# -- fixtures --------------------------------------------------------------------


@pytest.fixture
def namespace() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def origin(postgres_url: str) -> PostgresOrigin:
    return PostgresOrigin(postgres_url)


@pytest.fixture
def admin(postgres_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def raw_listener(postgres_url: str) -> Iterator[psycopg.Connection[Any]]:
    """A plain LISTEN connection that receives every payload sent on the channel."""
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(CHANNEL)))
        yield conn


@pytest.fixture
def make_cache(
    postgres_url: str,
    memcached: MemcachedServer,
    namespace: str,
    origin: PostgresOrigin,
) -> Iterator[Callable[[str], TieredCache]]:
    """Build caches on one namespace whose channels are named by application."""
    caches: list[TieredCache] = []

    def make(application_name: str) -> TieredCache:
        channel = PostgresChannel(
            postgres_url, application_name=application_name, socket_timeout=1.0
        )
        settings = Settings(memcached_servers=(memcached.address,), namespace=namespace)
        cache = TieredCache(settings, origin=origin, channel=channel)
        caches.append(cache)
        assert wait_until(lambda: bus(cache).is_trusted)
        return cache

    yield make
    for cache in caches:
        cache.close()


@pytest.fixture
def members(admin: psycopg.Connection[Any]) -> list[str]:
    """400 member keys of segment 12, some with non-ASCII characters, and their rows."""
    admin.execute(
        "CREATE TABLE members (id uuid PRIMARY KEY, segment int, name text NOT NULL)"
    )
    keys = []
    for i in range(400):
        member = uuid.uuid4()
        admin.execute(
            "INSERT INTO members VALUES (%s, 12, %s)", (member, f"member {i}")
        )
        suffix = ":Zoë-名前" if i % 3 == 0 else ""
        keys.append(f"segment:12:member:{member}{suffix}")
    return keys


def load_member(admin: psycopg.Connection[Any]) -> Callable[[Any], Any]:
    def load(key: Any) -> Any:
        member = key.split(":")[3]
        row = admin.execute("SELECT name FROM members WHERE id = %s", (member,))
        found = row.fetchone()
        assert found is not None
        return found[0]

    return load


def fill_local(cache: TieredCache, keys: list[str], loader: Any) -> list[str]:
    """Read ``keys`` through ``cache`` and return their wire keys, now in its L1."""
    for key in keys:
        cache.get(key, loader)
    wires = [cache.keys.encode(key) for key in keys]
    assert all(wire in cache.local for wire in wires)
    return wires


# -- two caches in one process -----------------------------------------------------


def test_set_evicts_peer_copy(
    make_cache: Callable[[str], TieredCache],
    postgres_url: str,
    memcached: MemcachedServer,
    namespace: str,
    origin: PostgresOrigin,
) -> None:
    a = make_cache("a")
    settings = Settings(
        memcached_servers=(memcached.address,),
        namespace=namespace,
        channel_url=postgres_url,
    )
    with TieredCache(settings, origin=origin) as b:
        assert isinstance(bus(b).channel, PostgresChannel)
        assert wait_until(lambda: bus(b).is_trusted)
        origin.store("user:1", "v1")
        assert b.get("user:1") == "v1"
        wire = b.keys.encode("user:1")

        a.set("user:1", "v2")

        assert wait_until(lambda: wire not in b.local)
        assert b.get("user:1") == "v2"
        assert a.stats()["invalidations"]["publish_errors"] == 0


def test_max_payload_read_from_server(
    make_cache: Callable[[str], TieredCache],
) -> None:
    a = make_cache("a")
    # The test server is a default build: 8192-byte blocks, 63-byte names.
    assert channel_of(a).max_payload == PAYLOAD_LIMIT - 1


# -- two caches in two processes ---------------------------------------------------


def _run_spawned_peer(
    url: str,
    memcached_address: str,
    namespace: str,
    to_parent: Any,
    from_parent: Any,
) -> None:
    """Hold ``user:1`` in L1, report when it is evicted, then write ``user:2``."""
    settings = Settings(memcached_servers=(memcached_address,), namespace=namespace)
    channel = PostgresChannel(url, application_name="spawned", socket_timeout=1.0)
    with TieredCache(settings, origin=PostgresOrigin(url), channel=channel) as cache:
        if not wait_until(lambda: bus(cache).is_trusted, 10):
            to_parent.put(("error", "channel never subscribed"))
            return
        to_parent.put(("filled", cache.get("user:1")))
        wire = cache.keys.encode("user:1")
        from_parent.get(timeout=20)
        evicted = wait_until(lambda: wire not in cache.local)
        to_parent.put(("evicted", evicted, cache.get("user:1")))
        cache.set("user:2", "from child")
        to_parent.put(("written",))


def test_set_evicts_copy_in_spawned_process(
    make_cache: Callable[[str], TieredCache],
    postgres_url: str,
    memcached: MemcachedServer,
    namespace: str,
    origin: PostgresOrigin,
) -> None:
    a = make_cache("a")
    origin.store("user:1", "v1")
    origin.store("user:2", "v1")
    assert a.get("user:2") == "v1"
    context = multiprocessing.get_context("spawn")
    to_parent, from_parent = context.Queue(), context.Queue()
    peer = context.Process(
        target=_run_spawned_peer,
        args=(postgres_url, memcached.address, namespace, to_parent, from_parent),
    )
    peer.start()
    try:
        assert to_parent.get(timeout=20) == ("filled", "v1")

        a.set("user:1", "v2")
        from_parent.put("written")

        assert to_parent.get(timeout=10) == ("evicted", True, "v2")
        assert to_parent.get(timeout=10) == ("written",)
        assert wait_until(lambda: a.keys.encode("user:2") not in a.local)
        assert a.get("user:2") == "from child"
    finally:
        peer.join(timeout=10)
        if peer.is_alive():
            peer.kill()
    assert peer.exitcode == 0


# -- after_commit with the caller's connection -----------------------------------------


def test_after_commit_evicts_400_keys(
    make_cache: Callable[[str], TieredCache],
    postgres_url: str,
    admin: psycopg.Connection[Any],
    raw_listener: psycopg.Connection[Any],
    members: list[str],
) -> None:
    a = make_cache("a")
    b = make_cache("b")
    wires = fill_local(b, members, load_member(admin))

    with psycopg.connect(postgres_url, autocommit=True) as conn:
        with a.after_commit(conn) as pending:
            with conn.transaction():
                conn.execute(
                    "UPDATE members SET name = name || ' v2' WHERE segment = 12"
                )
                pending.add(*members[:390])
                for key in members[390:]:
                    pending.add(key)

    renamed = admin.execute("SELECT count(*) FROM members WHERE name LIKE '% v2'")
    assert renamed.fetchone() == (400,)
    assert wait_until(lambda: not any(wire in b.local for wire in wires))
    assert b.get(members[0], load_member(admin)) == "member 0 v2"

    def both_kinds_cover_all(payloads: list[str]) -> bool:
        inv = messages_of(payloads, "inv")
        sent = [m for m in inv if m.sender == bus(a).sender_id]
        in_transaction = {key for m in sent if m.seq == 0 for key in m.keys}
        after_commit = {key for m in sent if m.seq > 0 for key in m.keys}
        return in_transaction >= set(wires) and after_commit >= set(wires)

    payloads: list[str] = []
    assert collect_until(raw_listener, payloads, both_kinds_cover_all)
    sizes = [len(payload.encode("utf-8")) for payload in payloads]
    assert max(sizes) < PAYLOAD_LIMIT
    in_transaction = [m for m in messages_of(payloads, "inv") if m.seq == 0]
    batches = list(batch_keys(wires[:390], channel_of(a).max_payload))
    assert len(batches) >= 3
    assert len(in_transaction) == len(batches) + 10
    assert messages_of(payloads, "flush") == []
    assert a.stats()["errors"]["invalidations_failed"] == 0


def test_rollback_sends_nothing(
    make_cache: Callable[[str], TieredCache],
    postgres_url: str,
    admin: psycopg.Connection[Any],
    raw_listener: psycopg.Connection[Any],
    members: list[str],
) -> None:
    a = make_cache("a")
    b = make_cache("b")
    wires = fill_local(b, members, load_member(admin))
    marker = fill_local(b, ["segment:12:marker"], lambda key: "marker")[0]

    with psycopg.connect(postgres_url, autocommit=True) as conn:
        with pytest.raises(RuntimeError, match="abort the transaction"):
            with a.after_commit(conn) as pending:
                with conn.transaction():
                    conn.execute("UPDATE members SET name = 'changed'")
                    pending.add(*members)
                    raise RuntimeError("abort the transaction")

    # Notifications arrive in commit order, so once the marker sent after the
    # rollback has arrived, anything the transaction sent would have too.
    a.invalidate("segment:12:marker")
    payloads: list[str] = []
    assert collect_until(
        raw_listener,
        payloads,
        lambda seen: any(marker in m.keys for m in messages_of(seen, "inv")),
    )
    assert wait_until(lambda: marker not in b.local)
    sent_keys = {key for m in messages_of(payloads, "inv") for key in m.keys}
    assert sent_keys == {marker}
    assert all(wire in b.local for wire in wires)
    changed = admin.execute("SELECT count(*) FROM members WHERE name = 'changed'")
    assert changed.fetchone() == (0,)


def test_escaped_keys_batched_under_limit(
    make_cache: Callable[[str], TieredCache],
    postgres_url: str,
    raw_listener: psycopg.Connection[Any],
) -> None:
    # JSON escapes each '"' with a backslash, so these keys take about twice
    # their own bytes in a message; batches must count the escaped length.
    a = make_cache("a")
    b = make_cache("b")
    keys = ['"' * 200 + str(i) for i in range(60)]
    wires = fill_local(b, keys, lambda key: "v1")

    with psycopg.connect(postgres_url, autocommit=True) as conn:
        with a.after_commit(conn) as pending:
            with conn.transaction():
                conn.execute("CREATE TABLE written (id int)")
                pending.add(*keys)

    assert wait_until(lambda: not any(wire in b.local for wire in wires))
    payloads: list[str] = []
    expected = set(wires)
    assert collect_until(
        raw_listener,
        payloads,
        lambda seen: {k for m in messages_of(seen, "inv") for k in m.keys} >= expected,
    )
    assert max(len(payload.encode("utf-8")) for payload in payloads) < PAYLOAD_LIMIT
    assert messages_of(payloads, "flush") == []
    assert a.stats()["errors"]["invalidations_failed"] == 0
    assert a.stats()["invalidations"]["publish_errors"] == 0
    with psycopg.connect(postgres_url) as check:
        assert check.execute("SELECT count(*) FROM written").fetchone() == (0,)


def test_oversized_message_in_transaction(
    make_cache: Callable[[str], TieredCache],
    postgres_url: str,
    raw_listener: psycopg.Connection[Any],
) -> None:
    a = make_cache("a")
    b = make_cache("b")
    wire = fill_local(b, ["user:1"], lambda key: "v1")[0]
    channel = channel_of(a)
    keys = tuple(f"{a.keys.namespace}|=user:{i:05d}" for i in range(1000))
    oversized = Message("inv", bus(a).sender_id, 0, time.time(), keys).encode()
    assert len(oversized) >= PAYLOAD_LIMIT

    with psycopg.connect(postgres_url) as conn:
        with conn.transaction():
            conn.execute("CREATE TABLE written (id int)")
            conn.execute("INSERT INTO written VALUES (1)")
            channel.notify_in_transaction(conn, oversized)

    with psycopg.connect(postgres_url) as check:
        assert check.execute("SELECT id FROM written").fetchall() == [(1,)]
    payloads: list[str] = []
    assert collect_until(
        raw_listener, payloads, lambda seen: bool(messages_of(seen, "flush"))
    )
    flush = messages_of(payloads, "flush")[0]
    assert (flush.sender, flush.seq, flush.keys) == (bus(a).sender_id, 0, ())
    assert max(len(payload.encode("utf-8")) for payload in payloads) < PAYLOAD_LIMIT
    assert wait_until(lambda: wire not in b.local)
    assert channel.oversized == 1


def test_oversized_publish_keeps_sequence(
    postgres_url: str, raw_listener: psycopg.Connection[Any]
) -> None:
    channel = PostgresChannel(postgres_url)
    try:
        keys = tuple(f"ns|=user:{i:05d}" for i in range(1000))
        channel.publish(Message("inv", "peer-1", 7, 1.5, keys).encode())
        channel.publish(b"x" * PAYLOAD_LIMIT)
        payloads: list[str] = []
        assert collect_until(raw_listener, payloads, lambda seen: len(seen) == 2)
    finally:
        channel.close()
    replaced, malformed = (decode_message(payload) for payload in payloads)
    assert replaced == Message("flush", "peer-1", 7, 1.5)
    assert malformed.kind == "flush"
    assert malformed.sender == f"postgres-channel-{os.getpid()}"
    assert malformed.seq == 0
    assert channel.oversized == 2


def test_batch_keys_counts_utf8_bytes() -> None:
    # Keys on the wire are ASCII memcached keys, but the byte count must hold
    # for any text: each "é" is 2 bytes and each "名" 3 in UTF-8.
    keys = [f"{i}:" + "é名" * (i % 50) for i in range(2000)]
    sender = "f" * 12 + "-" + "4194304"
    batches = list(batch_keys(keys, PAYLOAD_LIMIT - 1))
    assert [key for batch in batches for key in batch] == keys
    for batch in batches:
        message = Message("inv", sender, 2**63 - 1, time.time(), tuple(batch))
        assert len(message.encode()) < PAYLOAD_LIMIT - 1


def test_batch_keys_counts_json_escapes() -> None:
    keys = ['"' * 200 + str(i) for i in range(60)]
    for batch in batch_keys(keys, PAYLOAD_LIMIT - 1):
        message = Message("inv", "sender", 1, time.time(), tuple(batch))
        assert len(message.encode()) < PAYLOAD_LIMIT - 1


def test_notify_in_transaction_rejects_other_connections(postgres_url: str) -> None:
    channel = PostgresChannel(postgres_url)
    with pytest.raises(TypeError, match="psycopg 3 Connection"):
        channel.notify_in_transaction(object(), b"{}")
    channel.close()


# -- channel loss ---------------------------------------------------------------------


def test_terminated_listener_resubscribes(
    make_cache: Callable[[str], TieredCache],
    admin: psycopg.Connection[Any],
    origin: PostgresOrigin,
) -> None:
    a = make_cache("a")
    b = make_cache("b")
    origin.store("user:1", "v1")
    assert b.get("user:1") == "v1"
    wire = b.keys.encode("user:1")
    losses = b.stats()["invalidations"]["channel_losses"]
    (old_pid,) = backend_pids(admin, "b listener")

    terminate(admin, old_pid)

    assert wait_until(lambda: b.stats()["invalidations"]["channel_losses"] > losses)
    assert wire not in b.local
    assert wait_until(lambda: bus(b).is_trusted)
    assert len(backend_pids(admin, "b listener") - {old_pid}) == 1
    assert b.get("user:1") == "v1"
    assert wire in b.local

    a.set("user:1", "v2")

    assert wait_until(lambda: wire not in b.local)
    assert b.get("user:1") == "v2"


def test_terminated_publisher_reconnects(
    make_cache: Callable[[str], TieredCache],
    admin: psycopg.Connection[Any],
) -> None:
    a = make_cache("a")
    # The heartbeat thread opens the publisher connection within a second.
    assert wait_until(lambda: len(backend_pids(admin, "a publisher")) == 1)
    (old_pid,) = backend_pids(admin, "a publisher")

    terminate(admin, old_pid)
    a.invalidate("user:1")

    assert a.stats()["invalidations"]["publish_errors"] == 0
    assert len(backend_pids(admin, "a publisher") - {old_pid}) == 1


def test_frozen_listener_found_by_ping(
    postgres_url: str, admin: psycopg.Connection[Any]
) -> None:
    # A stopped backend's kernel still acknowledges packets, so keepalives
    # see nothing and only the ping's own timeout finds the dead session.
    states: list[bool] = []
    received: list[bytes] = []
    channel = PostgresChannel(
        postgres_url,
        application_name="frozen",
        socket_timeout=0.5,
        ping_interval=0.3,
    )
    try:
        channel.subscribe(received.append, states.append)
        assert wait_until(lambda: states == [True])
        (frozen,) = backend_pids(admin, "frozen listener")
        os.kill(frozen, signal.SIGSTOP)
        try:
            assert wait_until(lambda: False in states)
        finally:
            os.kill(frozen, signal.SIGCONT)
        assert wait_until(lambda: states[-1:] == [True])
        assert states == [True, False, True]
        assert len(backend_pids(admin, "frozen listener") - {frozen}) == 1
        channel.publish(b'"after the freeze"')
        assert wait_until(lambda: received == [b'"after the freeze"'])
    finally:
        channel.close()


# -- fork ------------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_after_fork_keeps_parent_sessions(
    make_cache: Callable[[str], TieredCache],
    admin: psycopg.Connection[Any],
    origin: PostgresOrigin,
) -> None:
    a = make_cache("a")
    b = make_cache("b")
    assert wait_until(lambda: len(backend_pids(admin, "b publisher")) == 1)
    (listener,) = backend_pids(admin, "b listener")
    (publisher,) = backend_pids(admin, "b publisher")
    origin.store("user:1", "v1")
    assert a.get("user:1") == "v1"
    wire = a.keys.encode("user:1")

    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        # The at-fork hook has already called after_fork() on every channel.
        status = 1
        try:
            if wait_until(lambda: bus(b).is_trusted):
                bus(b).publish([wire])
                gc.collect()
                status = 0
        finally:
            os._exit(status)

    assert wait_until(lambda: wire not in a.local)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # The child's own sessions may still be ending, so look only for ours.
    assert listener in backend_pids(admin, "b listener")
    assert publisher in backend_pids(admin, "b publisher")
    assert b.stats()["invalidations"]["channel_losses"] == 0
    assert b.get("user:1") == "v1"

    a.set("user:1", "v2")

    assert wait_until(lambda: wire not in b.local)
    assert a.get("user:1") == "v2"

    b.invalidate("user:1")

    assert wait_until(lambda: wire not in a.local)
    assert b.stats()["invalidations"]["publish_errors"] == 0
    assert publisher in backend_pids(admin, "b publisher")
    assert channel_of(b).reconnects == 0


# -- configuration ---------------------------------------------------------------------


def test_make_channel_builds_postgres(postgres_url: str) -> None:
    channel = make_channel(postgres_url)
    assert isinstance(channel, PostgresChannel)
    channel.close()
    with pytest.raises(ChannelError, match="closed"):
        channel.publish(b"{}")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"name": ""}, "non-empty"),
        ({"name": "n" * 64}, "at most 63 bytes"),
        ({"socket_timeout": 0}, "socket_timeout"),
        ({"ping_interval": float("nan")}, "ping_interval"),
    ],
)
def test_invalid_options_rejected(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PostgresChannel("postgresql://127.0.0.1/db", **options)


def test_invalid_url_rejected() -> None:
    with pytest.raises(ConfigurationError, match="invalid PostgreSQL channel URL"):
        PostgresChannel("postgresql://127.0.0.1/db?no_such_option=1")


def test_url_parameters_win() -> None:
    channel = PostgresChannel(
        "postgresql://127.0.0.1/db?keepalives_idle=30&application_name=web",
        socket_timeout=1.5,
    )
    params = channel.connect_params("listener")
    assert "keepalives_idle" not in params
    assert "application_name" not in params
    assert params["keepalives"] == 1
    assert params["keepalives_interval"] == 2
    assert params["tcp_user_timeout"] == 1500
    assert params["connect_timeout"] == 2
