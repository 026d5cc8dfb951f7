"""Throughput, origin reads, latency and freshness of tiercache and its peers.

Run ``python benchmarks/peers.py [--quick] [--processes 2]``. Every set-up
runs the same workload: subscriber profiles (about 0.9 KB of JSON, three
indexed SQLite queries over four tables, about 35 µs here) read with Zipf
1.0 popularity over 100,000 subscribers (10,000 with ``--quick``), 95% reads
and 5% writes. A write updates the subscriber row in SQLite and then
invalidates the key the way each library documents:

* ``origin only``: every read queries SQLite. The reference row.
* ``tiercache``: ``TieredCache.get(key, loader)`` with L1 of 10,000 entries,
  one memcached server and a Redis invalidation channel. A write calls
  ``cache.invalidate(key)`` after the commit. ``tiercache no-copy`` is the
  same with ``local_copy=False``: L1 hands out its own objects instead of
  decoding a fresh copy of the JSON on each hit.
* ``dogpile memcached``: a dogpile.cache region on ``dogpile.cache.pymemcache``
  with the documented arguments (``url`` only: pickle serde, pymemcache's
  ``HashClient``, no timeouts) and ``get_or_create``. A write calls
  ``region.delete(key)``.
* ``dogpile memory+memcached``: dogpile has no two-tier region, so a
  ``dogpile.cache.memory`` region whose ``cache_dict`` is a
  ``cachetools.LRUCache(10,000)``, ``expiration_time`` 60 s, creates its
  values with ``get_or_create`` on the memcached region above. A write
  deletes the key in both regions, which reaches this process's memory
  region only.
* ``cashews mem``: cashews' ``await cache.get(key)``, and on a miss the
  query and ``await cache.set(key, value, expire=...)``, on
  ``mem://?size=10000`` (an in-process LRU). A write calls
  ``await cache.delete(key)``. Each process has its own copy.
* ``cashews redis``: the same on ``redis://`` (pickled values).
* ``cashews redis client-side``: ``redis://...?client_side=true``, cashews'
  two-tier mode: an LRU of 10,000 entries per process, invalidated by Redis
  client tracking (``CLIENT TRACKING ... BCAST``).
* ``cachetools+pymemcache``: the hand-written look-aside many applications
  have: a ``cachetools.TTLCache(10,000, ttl=60)`` in front of a pymemcache
  ``Client`` (``no_delay=True``, 1 s timeouts) storing orjson bytes. A write
  deletes the key in memcached and in this process's TTLCache.

The cashews set-ups run in an asyncio event loop, and their loader calls
SQLite synchronously inside it, as the other set-ups do.

Every set-up starts as a new worker process would during a campaign: its
shared tier (memcached or Redis) contains every profile, written in that
set-up's own format, and its in-process tier is empty. Each then runs the
same key sequence: a warm-up, then the measured operations. The table
reports operations per second (reads and writes), origin reads per
1,000 reads, the read latency percentiles, and stale reads: a read that
returned a version older than the last write committed to that key before
the read started. Writers record each key's last committed version in
memory shared by every worker process, so with ``--processes 2`` a read
that missed another process's write is counted too.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import multiprocessing
import os
import queue
import sqlite3
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _common
import cachetools
import numpy as np
import orjson
import tiers
from pymemcache.client.base import Client

from tiercache import Settings, TieredCache, codec
from tiercache.adapters import redis_channel  # noqa: F401 (imported once, before fork)
from tiercache.keys import KeyCodec

PEERS = (
    "origin only",
    "tiercache",
    "tiercache no-copy",
    "dogpile memcached",
    "dogpile memory+memcached",
    "cashews mem",
    "cashews redis",
    "cashews redis client-side",
    "cachetools+pymemcache",
)
ASYNC_PEERS = frozenset({"cashews mem", "cashews redis", "cashews redis client-side"})
SCHEMA_VERSION = 1
LOCAL_ENTRIES = 10_000
LOCAL_TTL = 60
REMOTE_TTL = 3600
WRITE_FRACTION = 0.05
ZIPF_EXPONENT = 1.0
NAMESPACE = "peers"


# -- the origin ------------------------------------------------------------------------


class ProfileOrigin:
    """An origin that reads profiles with the queries of ``tiers.py``.

    It also records, for every write it commits, the version committed.

    :param committed: shared ``int64`` array, indexed by subscriber id, of
        the ``updated_at`` of the last committed write. ``updated_at`` is
        taken inside the write transaction, so it grows with commit order
        even when two processes write one row.
    """

    def __init__(self, path: Path, committed: Any, lock: Any) -> None:
        self.conn = tiers.connect(path)
        self.committed = committed
        self.lock = lock
        self.loads = 0
        self.written: set[int] = set()
        self._edits = 0
        self._tag = os.getpid()

    def load(self, sid: int) -> dict[str, Any]:
        self.loads += 1
        execute = self.conn.execute
        row = execute(tiers.SUBSCRIBER_SQL + " WHERE s.id = ?", (sid,)).fetchone()
        fields = execute(tiers.FIELDS_SQL, (sid,)).fetchall()
        segments = execute(tiers.SEGMENTS_SQL, (sid,)).fetchall()
        return tiers.assemble(row, fields, segments)

    def write(self, sid: int) -> None:
        self._edits += 1
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            updated_at = time.time_ns()
            self.conn.execute(
                "UPDATE subscribers SET name = ?, updated_at = ?, edits = edits + 1 "
                "WHERE id = ?",
                (f"Subscriber {sid} edit {self._tag}.{self._edits}", updated_at, sid),
            )
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")
        self.written.add(sid)
        with self.lock:
            if updated_at > self.committed[sid]:
                self.committed[sid] = updated_at


# -- the set-ups -----------------------------------------------------------------------


@dataclass
class Shared:
    """Inputs of every worker, inherited through fork and never pickled."""

    db_path: Path
    memcached: Any
    redis_url: str
    subscribers: int
    warm_ops: int
    measured_ops: int
    permutation: Any
    cdf: Any
    committed: Any
    lock: Any


@dataclass
class SyncPeer:
    """The read and write paths of a set-up called from plain code."""

    read: Callable[[int], Any]
    write: Callable[[int], None]


@dataclass
class AsyncPeer:
    """The read and write paths of a set-up called from an event loop."""

    read: Callable[[int], Awaitable[Any]]
    write: Callable[[int], Awaitable[None]]


def make_tiercache(origin: ProfileOrigin, shared: Shared, copy: bool) -> SyncPeer:
    cache = TieredCache(
        Settings(
            memcached_servers=(shared.memcached.address,),
            channel_url=shared.redis_url,
            namespace=NAMESPACE,
            local_max_entries=LOCAL_ENTRIES,
            local_ttl=LOCAL_TTL,
            remote_ttl=REMOTE_TTL,
            local_copy=copy,
        )
    )
    if not cache.wait_ready(10):
        raise TimeoutError("tiercache's Redis channel did not subscribe within 10 s")

    def loader(key: str) -> Any:
        return origin.load(int(key[4:]))

    def read(sid: int) -> Any:
        return cache.get(f"sub:{sid}", loader)

    def write(sid: int) -> None:
        origin.write(sid)
        cache.invalidate(f"sub:{sid}")

    return SyncPeer(read, write)


def make_dogpile(origin: ProfileOrigin, shared: Shared, two_tier: bool) -> SyncPeer:
    from dogpile.cache import make_region

    remote = make_region().configure(
        "dogpile.cache.pymemcache",
        expiration_time=REMOTE_TTL,
        arguments={"url": [shared.memcached.address]},
    )
    if not two_tier:

        def read_remote(sid: int) -> Any:
            return remote.get_or_create(f"sub:{sid}", lambda: origin.load(sid))

        def write_remote(sid: int) -> None:
            origin.write(sid)
            remote.delete(f"sub:{sid}")

        return SyncPeer(read_remote, write_remote)

    local = make_region().configure(
        "dogpile.cache.memory",
        expiration_time=LOCAL_TTL,
        arguments={"cache_dict": cachetools.LRUCache(maxsize=LOCAL_ENTRIES)},
    )

    def read(sid: int) -> Any:
        key = f"sub:{sid}"
        return local.get_or_create(
            key, lambda: remote.get_or_create(key, lambda: origin.load(sid))
        )

    def write(sid: int) -> None:
        origin.write(sid)
        remote.delete(f"sub:{sid}")
        local.delete(f"sub:{sid}")

    return SyncPeer(read, write)


def make_look_aside(origin: ProfileOrigin, shared: Shared) -> SyncPeer:
    server = shared.memcached
    client = Client(
        (server.host, server.port), no_delay=True, connect_timeout=1, timeout=1
    )
    local: cachetools.TTLCache[int, Any] = cachetools.TTLCache(
        maxsize=LOCAL_ENTRIES, ttl=LOCAL_TTL
    )

    def read(sid: int) -> Any:
        value = local.get(sid)
        if value is not None:
            return value
        key = f"sub:{sid}"
        raw = client.get(key)
        if raw is not None:
            value = orjson.loads(raw)
        else:
            value = origin.load(sid)
            client.set(key, orjson.dumps(value), expire=REMOTE_TTL, noreply=True)
        local[sid] = value
        return value

    def write(sid: int) -> None:
        origin.write(sid)
        client.delete(f"sub:{sid}", noreply=False)
        local.pop(sid, None)

    return SyncPeer(read, write)


async def make_cashews(origin: ProfileOrigin, url: str) -> AsyncPeer:
    # cashews' get and set, rather than its @cache decorator: with cashews
    # 7.6 on mem:// a decorated hit took 66 µs here against 5 µs for get,
    # because it binds the call's arguments and formats the key template.
    from cashews import Cache

    cache = Cache()
    cache.setup(url)
    await cache.init()

    async def read(sid: int) -> Any:
        key = f"sub:{sid}"
        value = await cache.get(key)
        if value is None:
            value = origin.load(sid)
            await cache.set(key, value, expire=REMOTE_TTL)
        return value

    async def write(sid: int) -> None:
        origin.write(sid)
        await cache.delete(f"sub:{sid}")

    return AsyncPeer(read, write)


def make_sync_peer(name: str, origin: ProfileOrigin, shared: Shared) -> SyncPeer:
    if name == "origin only":
        return SyncPeer(origin.load, origin.write)
    if name == "tiercache":
        return make_tiercache(origin, shared, copy=True)
    if name == "tiercache no-copy":
        return make_tiercache(origin, shared, copy=False)
    if name == "dogpile memcached":
        return make_dogpile(origin, shared, two_tier=False)
    if name == "dogpile memory+memcached":
        return make_dogpile(origin, shared, two_tier=True)
    if name == "cachetools+pymemcache":
        return make_look_aside(origin, shared)
    raise ValueError(f"unknown set-up {name!r}; expected one of {PEERS}")


async def make_async_peer(
    name: str, origin: ProfileOrigin, shared: Shared
) -> AsyncPeer:
    if name == "cashews mem":
        return await make_cashews(origin, f"mem://?size={LOCAL_ENTRIES}")
    if name == "cashews redis":
        return await make_cashews(origin, shared.redis_url)
    if name == "cashews redis client-side":
        return await make_cashews(origin, shared.redis_url + "?client_side=true")
    raise ValueError(f"unknown set-up {name!r}; expected one of {sorted(ASYNC_PEERS)}")


# -- running one worker ----------------------------------------------------------------


class Tally:
    """The measured window's counts of one worker."""

    def __init__(self, origin: ProfileOrigin) -> None:
        self.origin = origin
        self.latencies = array.array("q")
        self.write_latencies = array.array("q")
        self.stale = 0
        self.stale_age_max_ns = 0
        self.loads_before = origin.loads
        self.started = time.perf_counter_ns()

    def check(self, expected: int, value: Any, began_wall: int) -> None:
        """Count ``value`` as stale if older than ``expected``, read at read start."""
        if value["updated_at"] < expected:
            self.stale += 1
            self.stale_age_max_ns = max(self.stale_age_max_ns, began_wall - expected)

    def result(self) -> dict[str, Any]:
        seconds = (time.perf_counter_ns() - self.started) / 1e9
        return {
            "reads": len(self.latencies),
            "writes": len(self.write_latencies),
            "seconds": seconds,
            "origin_loads": self.origin.loads - self.loads_before,
            "stale": self.stale,
            "stale_age_max_ns": self.stale_age_max_ns,
            "latencies": self.latencies.tobytes(),
            "write_latencies": self.write_latencies.tobytes(),
            "written": sorted(self.origin.written),
        }


def draw_operations(shared: Shared, seed: int) -> tuple[list[int], list[bool]]:
    """Return Zipf-distributed subscriber ids and which operations write."""
    rng = np.random.default_rng(seed)
    count = shared.warm_ops + shared.measured_ops
    ranks = np.searchsorted(shared.cdf, rng.random(count))
    ids = (shared.permutation[ranks] + 1).tolist()
    writes = (rng.random(count) < WRITE_FRACTION).tolist()
    return ids, writes


def drive_sync(
    peer: SyncPeer, origin: ProfileOrigin, ops: tuple[list[int], list[bool]], warm: int
) -> dict[str, Any]:
    ids, writes = ops
    read, write = peer.read, peer.write
    committed = origin.committed
    for sid, is_write in zip(ids[:warm], writes[:warm], strict=True):
        if is_write:
            write(sid)
        else:
            read(sid)
    tally = Tally(origin)
    perf, wall = time.perf_counter_ns, time.time_ns
    latencies = tally.latencies
    for sid, is_write in zip(ids[warm:], writes[warm:], strict=True):
        if is_write:
            began = perf()
            write(sid)
            tally.write_latencies.append(perf() - began)
            continue
        expected = committed[sid]
        began_wall = wall()
        began = perf()
        value = read(sid)
        latencies.append(perf() - began)
        tally.check(expected, value, began_wall)
    return tally.result()


async def drive_async(
    peer: AsyncPeer, origin: ProfileOrigin, ops: tuple[list[int], list[bool]], warm: int
) -> dict[str, Any]:
    ids, writes = ops
    read, write = peer.read, peer.write
    committed = origin.committed
    for sid, is_write in zip(ids[:warm], writes[:warm], strict=True):
        if is_write:
            await write(sid)
        else:
            await read(sid)
    tally = Tally(origin)
    perf, wall = time.perf_counter_ns, time.time_ns
    latencies = tally.latencies
    for sid, is_write in zip(ids[warm:], writes[warm:], strict=True):
        if is_write:
            began = perf()
            await write(sid)
            tally.write_latencies.append(perf() - began)
            continue
        expected = committed[sid]
        began_wall = wall()
        began = perf()
        value = await read(sid)
        latencies.append(perf() - began)
        tally.check(expected, value, began_wall)
    return tally.result()


def run_worker(
    name: str, index: int, seed: int, shared: Shared, ready: Any, go: Any
) -> dict[str, Any]:
    origin = ProfileOrigin(shared.db_path, shared.committed, shared.lock)
    ops = draw_operations(shared, seed)
    if name in ASYNC_PEERS:

        async def run_async() -> dict[str, Any]:
            peer = await make_async_peer(name, origin, shared)
            await asyncio.to_thread(_wait_for_start, index, ready, go)
            return await drive_async(peer, origin, ops, shared.warm_ops)

        return asyncio.run(run_async())
    peer = make_sync_peer(name, origin, shared)
    _wait_for_start(index, ready, go)
    return drive_sync(peer, origin, ops, shared.warm_ops)


def _wait_for_start(index: int, ready: Any, go: Any) -> None:
    ready.put(index)
    if not go.wait(60):
        raise TimeoutError("the start signal did not arrive within 60 s")


def worker_main(
    name: str,
    index: int,
    seed: int,
    shared: Shared,
    ready: Any,
    go: Any,
    results: Any,
) -> None:
    try:
        outcome = run_worker(name, index, seed, shared, ready, go)
        results.put((index, outcome))
    except BaseException as exc:
        results.put((index, f"{type(exc).__name__}: {exc}"))
        raise
    # Flush the result to the parent, then leave at once: the caches'
    # background threads and sockets end with the process, and an orderly
    # close of each library would take longer.
    results.close()
    results.join_thread()
    os._exit(0)


# -- the parent ------------------------------------------------------------------------


class Primer:
    """The profiles to store in each set-up's shared tier before it runs.

    Each set-up starts as a new worker would during a campaign: memcached or
    Redis contains every profile, in that set-up's own format, and the
    process's own L1 is empty. The
    profiles are read from SQLite once; those a run writes are read again
    before the next set-up is primed.
    """

    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self.profiles = tiers.ProfileOrigin(shared.db_path).load_all()
        self._origin = ProfileOrigin(shared.db_path, shared.committed, shared.lock)

    def reload(self, sids: Iterable[int]) -> None:
        """Read the profiles of ``sids`` again, after a run wrote them."""
        for sid in sids:
            self.profiles[sid] = self._origin.load(sid)

    def prime(self, name: str) -> None:
        """Flush memcached and Redis, then store every profile for ``name``."""
        self.shared.memcached.flush()
        _flush_redis(self.shared.redis_url)
        if name in ("tiercache", "tiercache no-copy"):
            self._prime_tiercache()
        elif name == "cachetools+pymemcache":
            self._prime_memcached(
                {f"sub:{sid}": orjson.dumps(p) for sid, p in self.profiles.items()},
                flags=None,
            )
        elif name.startswith("dogpile"):
            self._prime_dogpile()
        elif name == "cashews redis":
            asyncio.run(self._prime_cashews("sub:"))
        elif name == "cashews redis client-side":
            # BcastClientSide stores key K as "cashews:K" in Redis: the
            # default client_side_prefix of cashews 7.6.
            asyncio.run(self._prime_cashews("cashews:sub:"))

    def _prime_tiercache(self) -> None:
        # The entries a fill would write (header, expiry, flags) under
        # tiercache's key mapping, as tiers.py stores them: filling through
        # get_many would cost three round trips per key.
        keys = KeyCodec(NAMESPACE)
        threshold = Settings().compress_threshold
        now = time.time()
        packed = {
            keys.encode(f"sub:{sid}"): codec.pack_value(
                orjson.dumps(profile),
                compress_threshold=threshold,
                fresh_until=now + REMOTE_TTL,
                expires_at=now + REMOTE_TTL,
            )
            for sid, profile in self.profiles.items()
        }
        self._prime_memcached(packed, flags=codec.WIRE_FLAGS)

    def _prime_memcached(self, values: dict[str, bytes], flags: int | None) -> None:
        server = self.shared.memcached
        client = Client((server.host, server.port), no_delay=True, timeout=10)
        for chunk in _chunks(values):
            client.set_many(chunk, expire=REMOTE_TTL, noreply=False, flags=flags)
        client.close()

    def _prime_dogpile(self) -> None:
        from dogpile.cache import make_region

        region = make_region().configure(
            "dogpile.cache.pymemcache",
            expiration_time=REMOTE_TTL,
            arguments={"url": [self.shared.memcached.address]},
        )
        values = {f"sub:{sid}": profile for sid, profile in self.profiles.items()}
        for chunk in _chunks(values):
            region.set_multi(chunk)

    async def _prime_cashews(self, prefix: str) -> None:
        from cashews import Cache

        cache = Cache()
        cache.setup(self.shared.redis_url)
        await cache.init()
        values = {f"{prefix}{sid}": profile for sid, profile in self.profiles.items()}
        for chunk in _chunks(values):
            await cache.set_many(chunk, expire=REMOTE_TTL)
        await cache.close()


def _chunks(values: dict[str, Any], size: int = 1000) -> Iterator[dict[str, Any]]:
    items = list(values.items())
    for start in range(0, len(items), size):
        yield dict(items[start : start + size])


def run_peer(
    name: str, processes: int, shared: Shared, primer: Primer
) -> dict[str, Any]:
    """Prime the shared tier, run ``processes`` workers of ``name``, summarize."""
    primer.prime(name)

    context = multiprocessing.get_context("fork")
    ready, results, go = context.Queue(), context.Queue(), context.Event()
    workers = [
        context.Process(
            target=worker_main,
            args=(name, index, 1000 + index, shared, ready, go, results),
            daemon=True,
        )
        for index in range(processes)
    ]
    for worker in workers:
        worker.start()

    # Every worker builds its set-up first, so all of them start together.
    for _ in workers:
        try:
            ready.get(timeout=60)
        except queue.Empty:
            _raise_worker_error(name, results)
            raise TimeoutError(f"{name} worker was not ready within 60 s") from None
    go.set()

    outcomes = [_next_outcome(name, results) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)
    primer.reload(set().union(*(outcome["written"] for outcome in outcomes)))
    return summarize(outcomes)


def _next_outcome(name: str, results: Any) -> dict[str, Any]:
    try:
        index, outcome = results.get(timeout=120)
    except queue.Empty:
        raise TimeoutError(f"{name} worker sent no result within 120 s") from None
    if isinstance(outcome, str):
        raise RuntimeError(f"{name} worker {index} failed: {outcome}")
    return outcome  # type: ignore[no-any-return]


def _raise_worker_error(name: str, results: Any) -> None:
    try:
        index, outcome = results.get_nowait()
    except queue.Empty:
        return
    raise RuntimeError(f"{name} worker {index} failed: {outcome}")


def _flush_redis(url: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    client.flushall()
    client.close()


def summarize(outcomes: list[dict[str, Any]]) -> dict[str, float]:
    reads = sum(outcome["reads"] for outcome in outcomes)
    latencies: list[int] = []
    write_latencies: list[int] = []
    for outcome in outcomes:
        latencies.extend(array.array("q", outcome["latencies"]))
        write_latencies.extend(array.array("q", outcome["write_latencies"]))
    return {
        "ops": sum(
            (outcome["reads"] + outcome["writes"]) / outcome["seconds"]
            for outcome in outcomes
        ),
        "origin": 1000 * sum(outcome["origin_loads"] for outcome in outcomes) / reads,
        "p50": _common.percentile(latencies, 0.50),
        "p99": _common.percentile(latencies, 0.99),
        "write_p50": _common.percentile(write_latencies, 0.50),
        "stale": 1000 * sum(outcome["stale"] for outcome in outcomes) / reads,
        "stale_count": sum(outcome["stale"] for outcome in outcomes),
        "stale_age_ms": max(outcome["stale_age_max_ns"] for outcome in outcomes) / 1e6,
    }


def prepare_database(subscribers: int) -> Path:
    """Build this script's own copy of the profile database once."""
    path = _common.out_path(f"peers-{subscribers}-v{SCHEMA_VERSION}.sqlite")
    if not path.exists():
        started = time.monotonic()
        tiers.build_database(path, subscribers)
        seconds = time.monotonic() - started
        print(f"built {path.name} in {seconds:.1f} s", file=sys.stderr)
    # Read the file once, so the first set-up doesn't pay for a cold page cache.
    with open(path, "rb") as file:
        while file.read(1 << 20):
            pass
    return path


def max_subscriber(path: Path) -> int:
    conn = sqlite3.connect(path)
    (count,) = conn.execute("SELECT max(id) FROM subscribers").fetchone()
    conn.close()
    return int(count)


Results = dict[tuple[str, str], dict[str, float]]


def report(results: Results, modes: list[tuple[str, int]]) -> None:
    for cpus, processes in modes:
        base = results[("tiercache", cpus)]["ops"]
        rows = []
        for name in PEERS:
            value = results[(name, cpus)]
            rows.append(
                [
                    name,
                    f"{value['ops']:,.0f}",
                    f"{value['ops'] / base:.2f}x",
                    f"{value['origin']:.1f}",
                    _common.us(value["p50"]),
                    _common.us(value["p99"]),
                    _common.us(value["write_p50"]),
                    f"{value['stale']:.2f}",
                    f"{value['stale_age_ms']:.1f}" if value["stale_count"] else "-",
                ]
            )
        plural = "es" if processes > 1 else ""
        _common.print_table(
            f"{processes} process{plural}, {cpus}",
            [
                "set-up",
                "ops/s",
                "vs tiercache",
                "origin/1k reads",
                "p50 µs",
                "p99 µs",
                "write p50 µs",
                "stale/1k reads",
                "max stale age ms",
            ],
            rows,
        )


def plot(results: Results, modes: list[tuple[str, int]]) -> None:
    figure, axes = _common.new_figure(3, width=4.6, height=4.6)
    panels = (
        ("ops", 1.0, "operations/s (reads and writes)", "throughput"),
        ("p99", 1e-3, "read p99 latency, µs", "read p99 latency"),
        ("stale", 1.0, "stale reads per 1,000 reads", "stale reads"),
    )
    names = list(PEERS)
    width = 0.8 / len(modes)
    for offset, (cpus, processes) in enumerate(modes):
        label = f"{processes} proc, {cpus}"
        positions = [i + offset * width for i in range(len(names))]
        for axis, (metric, scale, _xlabel, _title) in zip(axes[0], panels, strict=True):
            values = [results[(name, cpus)][metric] * scale for name in names]
            axis.barh(positions, values, width, label=label)
    for index, (axis, (_metric, _scale, xlabel, title)) in enumerate(
        zip(axes[0], panels, strict=True)
    ):
        axis.set_yticks(
            [i + width * (len(modes) - 1) / 2 for i in range(len(names))],
            names if index == 0 else [""] * len(names),
            fontsize=8,
        )
        axis.invert_yaxis()
        axis.set_xlabel(xlabel)
        axis.set_title(title)
        # An all-zero panel (no stale read in one process) keeps a 0-1 axis.
        axis.set_xlim(0, max(axis.get_xlim()[1], 1.0))
        axis.legend(fontsize=7)
    figure.suptitle("Zipf 1.0, 95% reads: tiercache and peers")
    processes = modes[0][1]
    _common.save_plot(figure, "peers" if processes == 1 else f"peers_{processes}proc")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help=(
            "use 10,000 subscribers and 30,000 operations per process, "
            "not 100,000 and 90,000"
        ),
    )
    parser.add_argument(
        "--processes",
        type=int,
        choices=(1, 2),
        default=1,
        help="worker processes per set-up; 2 runs unpinned only (default 1)",
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    subscribers = 10_000 if args.quick else 100_000
    warm, measured = (10_000, 20_000) if args.quick else (30_000, 60_000)
    if args.processes == 1:
        modes = [("pinned", 1), ("unpinned", 1)]
    else:
        modes = [("unpinned", args.processes)]
    _common.print_header(
        "peers.py: tiercache, dogpile.cache, cashews, look-aside", args.quick
    )

    db_path = prepare_database(subscribers)
    if max_subscriber(db_path) != subscribers:
        raise RuntimeError(
            f"{db_path} does not contain {subscribers} subscribers: delete it "
            "and run again to rebuild it"
        )

    results: Results = {}
    context = multiprocessing.get_context("fork")
    with _common.Servers() as servers:
        (memcached,) = servers.memcached(1, memory_mb=512)
        shared = Shared(
            db_path=db_path,
            memcached=memcached,
            redis_url=servers.redis().url,
            subscribers=subscribers,
            warm_ops=warm,
            measured_ops=measured,
            permutation=np.random.default_rng(11).permutation(subscribers),
            cdf=tiers.zipf_cdf(subscribers, ZIPF_EXPONENT),
            committed=context.RawArray("q", subscribers + 1),
            lock=context.Lock(),
        )
        primer = Primer(shared)

        for cpus, processes in modes:
            with servers.placement.mode(cpus):
                for name in PEERS:
                    results[(name, cpus)] = run_peer(name, processes, shared, primer)

    print(
        f"{subscribers:,} subscribers, Zipf {ZIPF_EXPONENT}, "
        f"{1 - WRITE_FRACTION:.0%} reads, L1 of {LOCAL_ENTRIES:,} entries where a "
        f"set-up has one. Each process starts with every profile in the shared "
        f"tier and an empty L1, runs {warm:,} operations of warm-up, then "
        f"{measured:,} measured ones (the same sequence for every set-up). ops/s "
        "counts reads and writes of all processes; p50 and p99 are per read; a "
        "stale read returned a version older than the last write committed "
        "before the read began."
    )
    print()
    report(results, modes)
    plot(results, modes)


if __name__ == "__main__":
    main()
