"""Commit-to-eviction delay of an invalidation in another process, per channel.

Run ``python benchmarks/invalidation.py [--quick]``. A writer process commits
1,000 writes (200 with ``--quick``), one key at a time with a random pause of
1-2 ms between them. A reader process, started first, has every key in its
L1 and records when each one is evicted, through the bus's ``on_evicted``
hook, which the channel's listener thread calls right after it evicts the
keys. The ``invalidated`` signal is not used for this, because it is sent
from a thread of its own after the eviction, and waking that thread is not
part of the delay. The delay of a key is the reader's eviction time minus the
writer's time right after its commit returned, both from ``time.time_ns()``
on the same host. Paths:

* ``redis-py hop``: bare pub/sub for reference, with no cache: redis-py
  ``publish`` in the writer, ``PubSub.get_message`` in a loop in the reader.
  Delay from before ``publish`` to the message read.
* ``psycopg NOTIFY hop``: the same over PostgreSQL, ``SELECT pg_notify`` on
  an autocommit connection and ``Connection.notifies`` in the reader.
* ``tiercache redis``: ``TieredCache.set`` with an SQLite origin (WAL) and
  a Redis channel: the commit, then a memcached delete, the writer's own L1
  eviction and the publish.
* ``tiercache postgres``: ``TieredCache.set`` with a PostgreSQL origin and
  the LISTEN/NOTIFY channel, which notifies on its own connection after the
  commit.
* ``tiercache postgres in-tx``: the writer updates the row in its own
  transaction inside ``cache.after_commit(connection)``, so the NOTIFY goes
  out with the commit itself (the post-commit message follows). The reader
  can evict a key before the writer's commit call returns, so delays here
  can be negative.

The test PostgreSQL server runs with ``fsync`` and ``synchronous_commit``
off, so its commits cost no disk flush. Every path runs with all processes
and servers pinned to one CPU, then unpinned.
"""

from __future__ import annotations

import argparse
import multiprocessing
import queue
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import _common
import orjson
import psycopg
import redis

from tiercache import Settings, TieredCache
from tiercache.adapters import (
    key_bytes,
    postgres_channel,  # noqa: F401 (imported before fork)
    redis_channel,  # noqa: F401 (imported before fork)
)
from tiercache.adapters.postgres import PostgresOrigin
from tiercache.adapters.sqlite import SQLiteOrigin

PATHS = (
    "redis-py hop",
    "psycopg NOTIFY hop",
    "tiercache redis",
    "tiercache postgres",
    "tiercache postgres in-tx",
)
HOP_CHANNEL = "bench_hop"
PAUSE_SECONDS = (0.001, 0.002)
# The target for tiercache's commit-to-eviction delay. The bare hops are
# shown for reference and get no verdict.
TARGET_P99_MS = 1.0
NAMESPACE = "inval"


@dataclass(frozen=True)
class Shared:
    """Inputs of both processes of a path, inherited through fork."""

    writes: int
    memcached_address: str
    redis_url: str
    postgres_url: str
    sqlite_path: str


def key_of(number: int) -> str:
    return f"subscriber:{number}"


# -- the reader ------------------------------------------------------------------------


def read_hops_redis(shared: Shared, ready: Any) -> dict[str, int]:
    """Receive the writer's messages, each carrying its send time."""
    client = redis.Redis.from_url(shared.redis_url)
    pubsub = client.pubsub()
    pubsub.subscribe(HOP_CHANNEL)
    deadline = time.monotonic() + 10
    while True:
        message = pubsub.get_message(timeout=1.0)
        if message is not None and message["type"] == "subscribe":
            break
        if time.monotonic() > deadline:
            raise TimeoutError("redis-py did not confirm SUBSCRIBE within 10 s")
    ready.put("ready")
    received: dict[str, int] = {}
    deadline = time.monotonic() + 30 + shared.writes * 0.01
    while len(received) < shared.writes and time.monotonic() < deadline:
        message = pubsub.get_message(timeout=1.0)
        if message is None or message["type"] != "message":
            continue
        now = time.time_ns()
        number, _sent = message["data"].split(b" ")
        received[number.decode()] = now
    pubsub.close()
    client.close()
    return received


def read_hops_postgres(shared: Shared, ready: Any) -> dict[str, int]:
    conn = psycopg.connect(shared.postgres_url, autocommit=True)
    conn.execute(f"LISTEN {HOP_CHANNEL}")
    ready.put("ready")
    received: dict[str, int] = {}
    deadline = time.monotonic() + 30 + shared.writes * 0.01
    while len(received) < shared.writes and time.monotonic() < deadline:
        for notify in conn.notifies(timeout=1.0):
            now = time.time_ns()
            received[notify.payload.split(" ")[0]] = now
            if len(received) >= shared.writes:
                break
    conn.close()
    return received


def read_evictions(
    shared: Shared, ready: Any, make_cache: Callable[[], TieredCache]
) -> dict[str, int]:
    """Fill L1 with every key, then record when each is evicted."""
    cache = make_cache()
    if not cache.wait_ready(10):
        raise TimeoutError("the reader's channel did not subscribe within 10 s")
    assert cache.bus is not None
    wires = {cache.keys.encode(key_of(n)): str(n) for n in range(shared.writes)}
    evicted: dict[str, int] = {}

    def on_evicted(keys: tuple[str, ...], sender: str) -> None:
        now = time.time_ns()
        for wire in keys:
            number = wires.get(wire)
            if number is not None and number not in evicted:
                evicted[number] = now

    cache.bus.on_evicted = on_evicted
    for number in range(shared.writes):
        cache.get(key_of(number))
    cached = sum(1 for wire in wires if wire in cache.local)
    if cached != shared.writes:
        raise RuntimeError(
            f"the reader's L1 contains {cached} of {shared.writes} keys after "
            "reading them all: raise local_max_entries or lower the writes"
        )
    ready.put("ready")
    deadline = time.monotonic() + 30 + shared.writes * 0.01
    while len(evicted) < shared.writes and time.monotonic() < deadline:
        time.sleep(0.01)
    still_held = sum(1 for wire in wires if wire in cache.local)
    if still_held:
        raise RuntimeError(f"{still_held} keys are still in the reader's L1")
    return dict(evicted)


# -- the writer ------------------------------------------------------------------------


def pause() -> None:
    time.sleep(random.uniform(*PAUSE_SECONDS))


def write_hops_redis(shared: Shared) -> dict[str, int]:
    client = redis.Redis.from_url(shared.redis_url)
    sent: dict[str, int] = {}
    for number in range(shared.writes):
        pause()
        now = time.time_ns()
        client.publish(HOP_CHANNEL, f"{number} {now}")
        sent[str(number)] = now
    client.close()
    return sent


def write_hops_postgres(shared: Shared) -> dict[str, int]:
    conn = psycopg.connect(shared.postgres_url, autocommit=True)
    sent: dict[str, int] = {}
    for number in range(shared.writes):
        pause()
        now = time.time_ns()
        conn.execute("SELECT pg_notify(%s, %s)", (HOP_CHANNEL, f"{number} {now}"))
        sent[str(number)] = now
    conn.close()
    return sent


class TimedOrigin:
    """An origin wrapper that records when each store's commit returned."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.committed: dict[str, int] = {}

    def load(self, key: str) -> Any:
        return self.inner.load(key)

    def load_many(self, keys: Any) -> dict[str, Any]:
        return self.inner.load_many(keys)  # type: ignore[no-any-return]

    def store(self, key: str, value: Any) -> None:
        self.inner.store(key, value)
        self.committed[key] = time.time_ns()

    def delete(self, key: str) -> None:
        self.inner.delete(key)


def write_through_cache(
    shared: Shared, make_cache: Callable[[Any], TieredCache], origin: Any
) -> dict[str, int]:
    timed = TimedOrigin(origin)
    cache = make_cache(timed)
    if not cache.wait_ready(10):
        raise TimeoutError("the writer's channel did not subscribe within 10 s")
    for number in range(shared.writes):
        pause()
        cache.set(key_of(number), {"number": number, "version": 2})
    return {key.split(":")[1]: ns for key, ns in timed.committed.items()}


def write_in_transaction(
    shared: Shared, make_cache: Callable[[Any], TieredCache]
) -> dict[str, int]:
    origin = PostgresOrigin(shared.postgres_url)
    cache = make_cache(origin)
    if not cache.wait_ready(10):
        raise TimeoutError("the writer's channel did not subscribe within 10 s")
    conn = psycopg.connect(shared.postgres_url, autocommit=True)
    committed: dict[str, int] = {}
    for number in range(shared.writes):
        pause()
        key = key_of(number)
        value = orjson.dumps({"number": number, "version": 2})
        with cache.after_commit(conn) as pending:
            with conn.transaction():
                conn.execute(
                    "UPDATE tiercache_kv SET value = %s WHERE key = %s",
                    (value, key_bytes(key)),
                )
                pending.add(key)
            committed[str(number)] = time.time_ns()
    conn.close()
    return committed


# -- one path --------------------------------------------------------------------------


def cache_maker(shared: Shared, channel_url: str, origin_factory: Any) -> Any:
    def make(origin: Any = None) -> TieredCache:
        settings = Settings(
            memcached_servers=(shared.memcached_address,),
            channel_url=channel_url,
            namespace=NAMESPACE,
        )
        return TieredCache(
            settings, origin=origin if origin is not None else origin_factory()
        )

    return make


def reader_for(path: str, shared: Shared) -> Callable[[Any], dict[str, int]]:
    if path == "redis-py hop":
        return lambda ready: read_hops_redis(shared, ready)
    if path == "psycopg NOTIFY hop":
        return lambda ready: read_hops_postgres(shared, ready)
    if path == "tiercache redis":
        make = cache_maker(
            shared, shared.redis_url, lambda: SQLiteOrigin(shared.sqlite_path)
        )
    else:
        make = cache_maker(
            shared, shared.postgres_url, lambda: PostgresOrigin(shared.postgres_url)
        )
    return lambda ready: read_evictions(shared, ready, make)


def writer_for(path: str, shared: Shared) -> Callable[[], dict[str, int]]:
    if path == "redis-py hop":
        return lambda: write_hops_redis(shared)
    if path == "psycopg NOTIFY hop":
        return lambda: write_hops_postgres(shared)
    if path == "tiercache redis":
        make = cache_maker(shared, shared.redis_url, None)
        return lambda: write_through_cache(
            shared, make, SQLiteOrigin(shared.sqlite_path)
        )
    make = cache_maker(shared, shared.postgres_url, None)
    if path == "tiercache postgres":
        return lambda: write_through_cache(
            shared, make, PostgresOrigin(shared.postgres_url)
        )
    return lambda: write_in_transaction(shared, make)


def child_main(role: str, path: str, shared: Shared, ready: Any, results: Any) -> None:
    try:
        if role == "reader":
            outcome: Any = reader_for(path, shared)(ready)
        else:
            outcome = writer_for(path, shared)()
        results.put((role, outcome))
    except BaseException as exc:
        results.put((role, f"{type(exc).__name__}: {exc}"))
        raise


def seed_origins(shared: Shared) -> None:
    """Store version 1 of every key in both origins, before any cache exists."""
    values = {key_of(n): {"number": n, "version": 1} for n in range(shared.writes)}
    sqlite = SQLiteOrigin(shared.sqlite_path)
    with sqlite.transaction() as conn:
        conn.execute(f"DELETE FROM {sqlite.table}")
    for key, value in values.items():
        sqlite.store(key, value)
    postgres = PostgresOrigin(shared.postgres_url)
    with postgres.transaction() as conn:
        conn.execute(f"TRUNCATE {postgres.table}")
    for key, value in values.items():
        postgres.store(key, value)
    postgres.connection().close()
    sqlite.connection().close()


def run_path(path: str, shared: Shared) -> list[float]:
    """Run one path; return the delays in microseconds."""
    context = multiprocessing.get_context("fork")
    ready, results = context.Queue(), context.Queue()
    reader = context.Process(
        target=child_main, args=("reader", path, shared, ready, results), daemon=True
    )
    reader.start()
    try:
        ready.get(timeout=60)
    except queue.Empty:
        raise RuntimeError(f"{path}: the reader was not ready within 60 s") from None
    writer = context.Process(
        target=child_main, args=("writer", path, shared, ready, results), daemon=True
    )
    writer.start()
    outcomes: dict[str, dict[str, int]] = {}
    for _ in range(2):
        role, outcome = results.get(timeout=120)
        if isinstance(outcome, str):
            raise RuntimeError(f"{path}: the {role} failed: {outcome}")
        outcomes[role] = outcome
    reader.join(timeout=30)
    writer.join(timeout=30)
    sent, received = outcomes["writer"], outcomes["reader"]
    missing = sorted(set(sent) - set(received), key=int)
    if missing:
        raise RuntimeError(f"{path}: {len(missing)} writes never reached the reader")
    return [(received[number] - sent[number]) / 1000 for number in sent]


# -- report ----------------------------------------------------------------------------


def report(delays: dict[tuple[str, str], list[float]]) -> None:
    rows = []
    for (path, cpus), values in delays.items():
        p99_ms = _common.percentile(values, 0.99) / 1000
        target = (
            _common.verdict(p99_ms, TARGET_P99_MS)
            if path.startswith("tiercache")
            else ""
        )
        rows.append(
            [
                path,
                cpus,
                len(values),
                f"{min(values):.0f}",
                f"{_common.percentile(values, 0.50):.0f}",
                f"{_common.percentile(values, 0.90):.0f}",
                f"{_common.percentile(values, 0.99):.0f}",
                f"{max(values):.0f}",
                target,
            ]
        )
    _common.print_table(
        "Delay from commit (or send) to eviction (or receipt) in another process",
        [
            "path",
            "CPUs",
            "writes",
            "min µs",
            "p50 µs",
            "p90 µs",
            "p99 µs",
            "max µs",
            f"p99 < {TARGET_P99_MS:g} ms",
        ],
        rows,
    )


def plot(delays: dict[tuple[str, str], list[float]]) -> None:
    figure, axes = _common.new_figure(2, width=5.8, height=4.2)
    for column, cpus in enumerate(_common.CPU_MODES):
        axis = axes[0][column]
        for path in PATHS:
            values = sorted(delays[(path, cpus)])
            fractions = [(i + 1) / len(values) for i in range(len(values))]
            axis.plot([max(v, 1.0) for v in values], fractions, label=path)
        axis.set_xscale("log")
        axis.set_xlabel("delay, µs (log; values under 1 µs drawn at 1)")
        axis.set_ylabel("fraction of writes")
        axis.set_title(f"commit to eviction in another process, {cpus}")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7)
    _common.save_plot(figure, "invalidation_delay")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="run 200 writes per path, not 1,000"
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    writes = 200 if args.quick else 1000
    _common.print_header("invalidation.py: commit-to-eviction delay", args.quick)
    delays: dict[tuple[str, str], list[float]] = {}
    with _common.Servers() as servers:
        (memcached,) = servers.memcached(1)
        postgres = servers.postgres()
        shared = Shared(
            writes=writes,
            memcached_address=memcached.address,
            redis_url=servers.redis().url,
            postgres_url=postgres.url,
            sqlite_path=str(_common.out_path("invalidation.sqlite")),
        )
        seed_origins(shared)
        for cpus in _common.CPU_MODES:
            with servers.placement.mode(cpus):
                for path in PATHS:
                    memcached.flush()
                    seed_origins(shared)
                    delays[(path, cpus)] = run_path(path, shared)
    print(
        f"{writes:,} writes per path, one key each, 1-2 ms apart. Delays in µs; "
        "hops are send to receipt, tiercache paths are the writer's commit "
        "returning to the reader's L1 eviction."
    )
    print()
    report(delays)
    plot(delays)


if __name__ == "__main__":
    main()
