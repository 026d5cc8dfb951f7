"""Throughput and read latency of the origin alone, memcached look-aside, and L1 + L2.

Run ``python benchmarks/tiers.py [--quick]``. Worker processes read subscriber
profiles with Zipf-distributed popularity over 100,000 subscribers (10,000
with ``--quick``) and edit some of them, through one of three set-ups:

* ``origin``: every read queries SQLite.
* ``look-aside``: hand-written memcached look-aside with pymemcache
  (``no_delay=True``) and orjson: get, and on a miss query SQLite and set.
  A write updates SQLite and then deletes the memcached key.
* ``tiercache``: ``TieredCache.get`` with the query as the loader, L1 of a
  tenth of the keys, one memcached server, a Redis invalidation channel.
  A write updates SQLite and then calls ``TieredCache.invalidate``.

Two origin queries are measured. ``profile`` assembles a profile from four
tables (subscribers joined with preferences, custom fields, segment
membership joined with segments): three indexed queries, standing in for the
per-recipient read of a mail platform. ``pk`` reads one stored JSON row by
primary key, which a local SQLite returns faster than a loopback memcached
round trip.
Every write changes its row (a new name and an edit counter), because SQLite
skips writing a page whose bytes did not change.

The main table runs unpinned with 1 and 2 worker processes. A second table
compares both queries at Zipf 1.0 and 95/5 with everything pinned to CPU 0
(one process) and unpinned (one and two processes), as _common.Placement
describes.

Every measurement starts with every key in memcached, in each set-up's own
format and as the database has it: the keys a measurement wrote are stored
again before the next one. Each worker process starts with an empty L1 and
fills it during a short warm-up before measuring. The database is built once
into ``benchmarks/out/`` and reused by later runs.
"""

from __future__ import annotations

import array
import multiprocessing
import os
import queue
import random
import sqlite3
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _common
import numpy as np
import orjson
from pymemcache.client.base import Client

from tiercache import Settings, TieredCache, codec
from tiercache.adapters import redis_channel  # noqa: F401 (imported once, before fork)
from tiercache.keys import KeyCodec

CONFIGS = ("origin", "look-aside", "tiercache")
ZIPF_EXPONENTS = (0.8, 1.0, 1.2)
WRITE_FRACTIONS = {"95/5": 0.05, "80/20": 0.20}
SCHEMA_VERSION = 1
SEGMENT_COUNT = 200
FIELDS_PER_SUBSCRIBER = 12
SEGMENTS_PER_SUBSCRIBER = 4
REMOTE_TTL = 3600
NAMESPACES = {
    ("look-aside", "profile"): "la-profile",
    ("look-aside", "pk"): "la-pk",
    ("tiercache", "profile"): "tc-profile",
    ("tiercache", "pk"): "tc-pk",
}


# -- the database ---------------------------------------------------------------------


SCHEMA = """
CREATE TABLE subscribers (
    id INTEGER PRIMARY KEY, email TEXT NOT NULL, name TEXT NOT NULL,
    status TEXT NOT NULL, locale TEXT NOT NULL, timezone TEXT NOT NULL,
    created_at TEXT NOT NULL, updated_at INTEGER NOT NULL, edits INTEGER NOT NULL
);
CREATE TABLE preferences (
    subscriber_id INTEGER PRIMARY KEY REFERENCES subscribers (id),
    frequency TEXT NOT NULL, format TEXT NOT NULL, topics TEXT NOT NULL,
    double_opt_in INTEGER NOT NULL
);
CREATE TABLE custom_fields (
    subscriber_id INTEGER NOT NULL, name TEXT NOT NULL, value TEXT NOT NULL,
    PRIMARY KEY (subscriber_id, name)
) WITHOUT ROWID;
CREATE TABLE segments (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL, description TEXT NOT NULL
);
CREATE TABLE segment_members (
    subscriber_id INTEGER NOT NULL, segment_id INTEGER NOT NULL,
    PRIMARY KEY (subscriber_id, segment_id)
) WITHOUT ROWID;
CREATE TABLE profile_kv (id INTEGER PRIMARY KEY, value TEXT NOT NULL);
"""

SUBSCRIBER_SQL = """
SELECT s.id, s.email, s.name, s.status, s.locale, s.timezone, s.created_at,
       s.updated_at, s.edits, p.frequency, p.format, p.topics, p.double_opt_in
FROM subscribers s JOIN preferences p ON p.subscriber_id = s.id
"""
FIELDS_SQL = (
    "SELECT name, value FROM custom_fields WHERE subscriber_id = ? ORDER BY name"
)
SEGMENTS_SQL = """
SELECT g.id, g.name FROM segment_members m JOIN segments g ON g.id = m.segment_id
WHERE m.subscriber_id = ? ORDER BY g.id
"""


def assemble(
    row: tuple[Any, ...], fields: list[Any], segments: list[Any]
) -> dict[str, Any]:
    """Build the profile dict from a subscriber row, its fields and its segments."""
    return {
        "id": row[0],
        "email": row[1],
        "name": row[2],
        "status": row[3],
        "locale": row[4],
        "timezone": row[5],
        "created_at": row[6],
        "updated_at": row[7],
        "edits": row[8],
        "preferences": {
            "frequency": row[9],
            "format": row[10],
            "topics": orjson.loads(row[11]),
            "double_opt_in": bool(row[12]),
        },
        "fields": {name: value for name, value in fields},
        "segments": [{"id": sid, "name": name} for sid, name in segments],
    }


def connect(path: Path) -> sqlite3.Connection:
    """Open a connection configured like ``SQLiteOrigin``: WAL, autocommit."""
    conn = sqlite3.connect(path, timeout=30, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def generate_rows(subscribers: int) -> dict[str, list[tuple[Any, ...]]]:
    """Return the rows of every table, generated from a fixed seed."""
    rng = random.Random(7)
    segment_names = {i: f"Segment {i}" for i in range(1, SEGMENT_COUNT + 1)}
    statuses = ("active",) * 8 + ("unsubscribed", "bounced")
    zones = ("Europe/London", "Europe/Berlin", "America/New_York", "Asia/Tokyo")
    tables: dict[str, list[tuple[Any, ...]]] = {
        "segments": [
            (i, name, f"Subscribers matching rule set {i}")
            for i, name in segment_names.items()
        ],
        "subscribers": [],
        "preferences": [],
        "custom_fields": [],
        "segment_members": [],
        "profile_kv": [],
    }
    for sid in range(1, subscribers + 1):
        row = (
            sid,
            f"subscriber{sid}@example.com",
            f"Subscriber {sid}",
            rng.choice(statuses),
            rng.choice(("en_GB", "de_DE", "en_US", "ja_JP")),
            rng.choice(zones),
            f"2023-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T10:00:00Z",
            0,
            0,
        )
        topics = sorted(rng.sample(range(1, 30), 3))
        prefs = (
            rng.choice(("daily", "weekly", "monthly")),
            "html",
            orjson.dumps(topics).decode(),
            1,
        )
        own_fields = [
            (f"field_{j:02d}", f"value {j} of subscriber {sid}")
            for j in range(FIELDS_PER_SUBSCRIBER)
        ]
        own_segments = sorted(
            rng.sample(range(1, SEGMENT_COUNT + 1), SEGMENTS_PER_SUBSCRIBER)
        )

        tables["subscribers"].append(row)
        tables["preferences"].append((sid, *prefs))
        tables["custom_fields"].extend((sid, name, value) for name, value in own_fields)
        tables["segment_members"].extend((sid, seg) for seg in own_segments)
        segments = [(seg, segment_names[seg]) for seg in own_segments]
        profile = assemble(row + prefs, own_fields, segments)
        tables["profile_kv"].append((sid, orjson.dumps(profile).decode()))
    return tables


def build_database(path: Path, subscribers: int) -> None:
    """Create the schema in a new file and fill it with generated rows."""
    tmp = path.with_suffix(".building")
    tmp.unlink(missing_ok=True)
    conn = sqlite3.connect(tmp)
    conn.executescript(SCHEMA)
    for table, rows in generate_rows(subscribers).items():
        marks = ", ".join("?" * len(rows[0]))
        conn.executemany(f"INSERT INTO {table} VALUES ({marks})", rows)
    conn.commit()
    conn.execute("PRAGMA journal_mode=WAL")
    conn.close()
    tmp.rename(path)


class ProfileOrigin:
    """The profile query: three indexed queries over four tables, and a read count."""

    def __init__(self, path: Path) -> None:
        self.conn = connect(path)
        self.loads = 0
        self._edits = 0
        self._tag = os.getpid()

    def load(self, sid: int) -> dict[str, Any]:
        self.loads += 1
        execute = self.conn.execute
        row = execute(SUBSCRIBER_SQL + " WHERE s.id = ?", (sid,)).fetchone()
        fields = execute(FIELDS_SQL, (sid,)).fetchall()
        segments = execute(SEGMENTS_SQL, (sid,)).fetchall()
        return assemble(row, fields, segments)

    def load_all(self) -> dict[int, dict[str, Any]]:
        """Return every profile, read with one scan per table (for warming L2)."""
        fields: dict[int, list[Any]] = {}
        for sid, name, value in self.conn.execute(
            "SELECT subscriber_id, name, value FROM custom_fields "
            "ORDER BY subscriber_id, name"
        ):
            fields.setdefault(sid, []).append((name, value))
        segments: dict[int, list[Any]] = {}
        for sid, gid, name in self.conn.execute(
            "SELECT m.subscriber_id, g.id, g.name FROM segment_members m "
            "JOIN segments g ON g.id = m.segment_id ORDER BY m.subscriber_id, g.id"
        ):
            segments.setdefault(sid, []).append((gid, name))
        return {
            row[0]: assemble(row, fields.get(row[0], []), segments.get(row[0], []))
            for row in self.conn.execute(SUBSCRIBER_SQL)
        }

    def write(self, sid: int) -> None:
        self._edits += 1
        self.conn.execute(
            "UPDATE subscribers SET name = ?, updated_at = ?, edits = edits + 1 "
            "WHERE id = ?",
            (f"Subscriber {sid} edit {self._tag}.{self._edits}", time.time_ns(), sid),
        )


class KeyValueOrigin:
    """A one-row primary-key read of a stored profile, like ``SQLiteOrigin.load``."""

    def __init__(self, path: Path) -> None:
        self.conn = connect(path)
        self.loads = 0
        self._edits = 0
        self._tag = os.getpid()

    def load(self, sid: int) -> dict[str, Any]:
        self.loads += 1
        row = self.conn.execute(
            "SELECT value FROM profile_kv WHERE id = ?", (sid,)
        ).fetchone()
        return orjson.loads(row[0])  # type: ignore[no-any-return]

    def load_all(self) -> dict[int, dict[str, Any]]:
        return {
            sid: orjson.loads(value)
            for sid, value in self.conn.execute("SELECT id, value FROM profile_kv")
        }

    def write(self, sid: int) -> None:
        self._edits += 1
        self.conn.execute(
            "UPDATE profile_kv SET value = json_set(value, '$.name', ?, "
            "'$.updated_at', ?) WHERE id = ?",
            (f"Subscriber {sid} edit {self._tag}.{self._edits}", time.time_ns(), sid),
        )


ORIGINS: dict[str, Callable[[Path], Any]] = {
    "profile": ProfileOrigin,
    "pk": KeyValueOrigin,
}


# -- one worker process ---------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """One workload; each scenario runs once per set-up in every repeat."""

    query: str
    cpus: str
    procs: int
    zipf: float
    mix: str


@dataclass
class Shared:
    """Settings and data every worker needs, inherited through fork, never pickled."""

    db_path: Path
    memcached: Any
    redis_url: str
    subscribers: int
    warm_ns: int
    measure_ns: int
    permutation: Any
    cdfs: dict[float, Any]
    # Key draws generated per worker; a faster worker wraps around and reuses them.
    draws: int


class SetUp:
    """The read and write paths of one set-up, and its count of memcached reads."""

    def __init__(
        self,
        read: Callable[[int], Any],
        write: Callable[[int], None],
        l2_reads: Callable[[], int],
    ) -> None:
        self.read = read
        self.write = write
        self.l2_reads = l2_reads


def make_set_up(config: str, query: str, origin: Any, shared: Shared) -> SetUp:
    if config == "origin":
        return SetUp(origin.load, origin.write, lambda: 0)
    namespace = NAMESPACES[(config, query)]
    server = shared.memcached
    if config == "look-aside":
        return make_look_aside(namespace, origin, server)
    cache = TieredCache(
        Settings(
            memcached_servers=(server.address,),
            channel_url=shared.redis_url,
            namespace=namespace,
            local_max_entries=max(shared.subscribers // 10, 1),
        )
    )
    _common.wait_until(lambda: cache.bus.is_trusted, 10, "channel subscribe")

    def loader(key: str) -> Any:
        return origin.load(int(key[4:]))

    def read(sid: int) -> Any:
        return cache.get(f"sub:{sid}", loader)

    def write(sid: int) -> None:
        origin.write(sid)
        cache.invalidate(f"sub:{sid}")

    def l2_reads() -> int:
        return cache.remote.hits + cache.remote.misses  # type: ignore[union-attr]

    return SetUp(read, write, l2_reads)


def make_look_aside(namespace: str, origin: Any, server: Any) -> SetUp:
    client = Client(
        (server.host, server.port), no_delay=True, connect_timeout=1, timeout=1
    )
    gets = [0]

    def read(sid: int) -> Any:
        key = f"{namespace}:{sid}"
        gets[0] += 1
        raw = client.get(key)
        if raw is not None:
            return orjson.loads(raw)
        value = origin.load(sid)
        client.set(key, orjson.dumps(value), expire=REMOTE_TTL, noreply=True)
        return value

    def write(sid: int) -> None:
        origin.write(sid)
        client.delete(f"{namespace}:{sid}", noreply=False)

    return SetUp(read, write, lambda: gets[0])


def draw_operations(
    shared: Shared, scenario: Scenario, seed: int
) -> tuple[list[int], list[bool]]:
    """Return the subscriber ids to use, Zipf-distributed, and which ops write."""
    rng = np.random.default_rng(seed)
    ranks = np.searchsorted(shared.cdfs[scenario.zipf], rng.random(shared.draws))
    ids = (shared.permutation[ranks] + 1).tolist()
    writes = (rng.random(shared.draws) < WRITE_FRACTIONS[scenario.mix]).tolist()
    return ids, writes


def drive(
    client: SetUp, origin: Any, ids: list[int], writes: list[bool], shared: Shared
) -> dict[str, Any]:
    """Run reads and writes, warm-up first; return the measured window's counts.

    Every key written, in the warm-up too, is listed in ``written``.
    """
    perf = time.perf_counter_ns
    read, write = client.read, client.write
    latencies = array.array("q")
    written: set[int] = set()
    count = len(ids)

    start = perf()
    warm_end = start + shared.warm_ns
    end = warm_end + shared.measure_ns
    measuring = False
    measured_from = start
    writes_done = loads_before = l2_before = 0
    i = 0
    while True:
        sid = ids[i % count]
        if writes[i % count]:
            write(sid)
            written.add(sid)
            writes_done += 1
            now = perf()
        else:
            began = perf()
            read(sid)
            now = perf()
            if measuring:
                latencies.append(now - began)
        i += 1

        if measuring:
            if now >= end:
                break
        elif now >= warm_end:
            measuring = True
            measured_from = now
            writes_done = 0
            loads_before = origin.loads
            l2_before = client.l2_reads()

    return {
        "reads": len(latencies),
        "writes": writes_done,
        "seconds": (now - measured_from) / 1e9,
        "latencies": latencies.tobytes(),
        "origin_loads": origin.loads - loads_before,
        "l2_reads": client.l2_reads() - l2_before,
        "written": sorted(written),
    }


def worker_main(
    scenario: Scenario,
    config: str,
    index: int,
    seed: int,
    shared: Shared,
    ready: Any,
    go: Any,
    results: Any,
) -> None:
    try:
        origin = ORIGINS[scenario.query](shared.db_path)
        client = make_set_up(config, scenario.query, origin, shared)
        ids, writes = draw_operations(shared, scenario, seed)
        ready.put(index)
        if not go.wait(60):
            raise TimeoutError("the start signal did not arrive within 60 s")
        outcome = drive(client, origin, ids, writes, shared)
        # No close(): the process exits now, which closes every socket, and
        # TieredCache.close() would first wait for the channel's thread to stop.
        results.put((index, outcome))
    except BaseException as exc:
        results.put((index, f"{type(exc).__name__}: {exc}"))
        raise


# -- the parent: warm memcached, run scenarios, report ---------------------------------


def zipf_cdf(subscribers: int, exponent: float) -> Any:
    weights = np.arange(1, subscribers + 1, dtype=np.float64) ** -exponent
    cdf = np.cumsum(weights)
    return cdf / cdf[-1]


def store_in_memcached(shared: Shared, query: str, sids: Any = None) -> None:
    """Store the current profiles of ``sids`` (default all) for both set-ups.

    tiercache's entries are written as its codec writes a fill (header,
    expiry, flags) under its key mapping. Filling through ``get_many`` would
    cost three round trips per key (add a lease, gets, cas), which is
    minutes for 100,000 keys here.
    """
    origin = ORIGINS[query](shared.db_path)
    if sids is None:
        profiles = origin.load_all()
    else:
        profiles = {sid: origin.load(sid) for sid in sids}
    look_aside = NAMESPACES[("look-aside", query)]
    keys = KeyCodec(NAMESPACES[("tiercache", query)])
    compress_threshold = Settings().compress_threshold
    now = time.time()
    raw: dict[str, bytes] = {}
    packed: dict[str, bytes] = {}
    for sid, profile in profiles.items():
        body = orjson.dumps(profile)
        raw[f"{look_aside}:{sid}"] = body
        packed[keys.encode(f"sub:{sid}")] = codec.pack_value(
            body,
            compress_threshold=compress_threshold,
            fresh_until=now + REMOTE_TTL,
            expires_at=now + REMOTE_TTL,
        )
    server = shared.memcached
    client = Client((server.host, server.port), no_delay=True, timeout=10)
    for values, flags in ((raw, None), (packed, codec.WIRE_FLAGS)):
        items = list(values.items())
        for start in range(0, len(items), 1000):
            chunk = dict(items[start : start + 1000])
            client.set_many(chunk, expire=REMOTE_TTL, noreply=False, flags=flags)
    client.close()


def run_cell(
    scenario: Scenario,
    config: str,
    seed: int,
    shared: Shared,
    placement: _common.Placement,
) -> dict[str, Any]:
    context = multiprocessing.get_context("fork")
    ready, results, go = context.Queue(), context.Queue(), context.Event()
    with placement.mode(scenario.cpus):
        workers = [
            context.Process(
                target=worker_main,
                args=(
                    scenario,
                    config,
                    index,
                    seed + index,
                    shared,
                    ready,
                    go,
                    results,
                ),
                daemon=True,
            )
            for index in range(scenario.procs)
        ]
        for worker in workers:
            worker.start()
        for _ in workers:
            ready.get(timeout=60)
        go.set()
        outcomes = []
        for _ in workers:
            try:
                index, outcome = results.get(timeout=60)
            except queue.Empty:
                raise TimeoutError(
                    f"{config} worker sent no result within 60 s"
                ) from None
            if isinstance(outcome, str):
                raise RuntimeError(f"{config} worker {index} failed: {outcome}")
            outcomes.append(outcome)
        for worker in workers:
            worker.join(timeout=30)
    # Every cell starts with every key in memcached, as the database has it.
    written = set().union(*(outcome["written"] for outcome in outcomes))
    store_in_memcached(shared, scenario.query, sorted(written))
    return summarize(outcomes)


def summarize(outcomes: list[dict[str, Any]]) -> dict[str, float]:
    reads = sum(outcome["reads"] for outcome in outcomes)
    latencies: list[int] = []
    for outcome in outcomes:
        latencies.extend(array.array("q", outcome["latencies"]))
    return {
        "ops": sum(
            (outcome["reads"] + outcome["writes"]) / outcome["seconds"]
            for outcome in outcomes
        ),
        "origin": 1000 * sum(outcome["origin_loads"] for outcome in outcomes) / reads,
        "l2": 1000 * sum(outcome["l2_reads"] for outcome in outcomes) / reads,
        "p50": _common.percentile(latencies, 0.50),
        "p99": _common.percentile(latencies, 0.99),
    }


def scenarios() -> list[Scenario]:
    found = [
        Scenario("profile", "unpinned", procs, zipf, mix)
        for procs in (1, 2)
        for zipf in ZIPF_EXPONENTS
        for mix in WRITE_FRACTIONS
    ]
    found.append(Scenario("profile", "pinned", 1, 1.0, "95/5"))
    for cpus, procs in (("pinned", 1), ("unpinned", 1), ("unpinned", 2)):
        found.append(Scenario("pk", cpus, procs, 1.0, "95/5"))
    return found


def prepare_database(subscribers: int) -> Path:
    path = _common.out_path(f"tiers-{subscribers}-v{SCHEMA_VERSION}.sqlite")
    if not path.exists():
        started = time.monotonic()
        build_database(path, subscribers)
        seconds = time.monotonic() - started
        print(f"built {path.name} in {seconds:.1f} s", file=sys.stderr)
    return path


Results = dict[tuple[Scenario, str], list[dict[str, float]]]
METRICS = ("ops/s", "vs origin", "origin/1k reads", "L2/1k reads", "p50 µs", "p99 µs")


def metric_cells(results: Results, scenario: Scenario, config: str) -> list[str]:
    """Return the median of each metric over the repeats, and the speed-up.

    The speed-up divides the median ops/s by the origin-only median of the
    same workload, so it matches the ops/s column.
    """
    runs = results[(scenario, config)]
    value = {name: _common.median([run[name] for run in runs]) for name in runs[0]}
    base = _common.median([run["ops"] for run in results[(scenario, "origin")]])
    return [
        f"{value['ops']:,.0f}",
        f"{value['ops'] / base:.2f}x",
        f"{value['origin']:.1f}",
        f"{value['l2']:.0f}",
        _common.us(value["p50"]),
        _common.us(value["p99"]),
    ]


def report(results: Results, all_scenarios: list[Scenario]) -> None:
    main_rows = []
    for scenario in all_scenarios:
        if scenario.query != "profile" or scenario.cpus != "unpinned":
            continue
        for config in CONFIGS:
            cells = metric_cells(results, scenario, config)
            main_rows.append(
                [config, scenario.procs, scenario.zipf, scenario.mix, *cells]
            )
    _common.print_table(
        "Profile query (3 queries over 4 tables), unpinned",
        ["set-up", "procs", "zipf", "reads/writes", *METRICS],
        main_rows,
    )
    side_rows = []
    for scenario in sorted(
        (s for s in all_scenarios if s.zipf == 1.0 and s.mix == "95/5"),
        key=lambda s: (s.query != "profile", s.cpus != "pinned", s.procs),
    ):
        for config in CONFIGS:
            cells = metric_cells(results, scenario, config)
            side_rows.append(
                [config, scenario.query, scenario.cpus, scenario.procs, *cells]
            )
    _common.print_table(
        "Profile query and primary-key row, pinned and unpinned (zipf 1.0, 95/5)",
        ["set-up", "query", "CPUs", "procs", *METRICS],
        side_rows,
    )


def plot(results: Results, all_scenarios: list[Scenario]) -> None:
    figure, axes = _common.new_figure(2, width=5.5, height=4.2)
    for column, procs in enumerate((1, 2)):
        axis = axes[0][column]
        for config in CONFIGS:
            for mix, style in zip(WRITE_FRACTIONS, ("-", "--"), strict=True):
                points = [
                    _common.median([run["ops"] for run in results[(s, config)]])
                    for s in all_scenarios
                    if (s.query, s.cpus, s.procs, s.mix)
                    == ("profile", "unpinned", procs, mix)
                ]
                axis.plot(
                    ZIPF_EXPONENTS, points, style, marker="o", label=f"{config} {mix}"
                )
        axis.set_yscale("log")
        axis.set_xlabel("Zipf exponent")
        axis.set_ylabel("operations/s (median)")
        axis.set_title(f"profile query, {procs} process{'es' if procs > 1 else ''}")
        axis.legend(fontsize=7)
    _common.save_plot(figure, "tiers_profile")

    figure, axes = _common.new_figure(width=8.0, height=4.2)
    axis = axes[0][0]
    side = sorted(
        (s for s in all_scenarios if s.zipf == 1.0 and s.mix == "95/5"),
        key=lambda s: (s.query != "profile", s.cpus != "pinned", s.procs),
    )
    width = 0.27
    for offset, config in enumerate(CONFIGS):
        values = [
            _common.median([run["ops"] for run in results[(s, config)]]) for s in side
        ]
        axis.bar(
            [i + offset * width for i in range(len(side))], values, width, label=config
        )
    axis.set_xticks(
        [i + width for i in range(len(side))],
        [f"{s.query}\n{s.cpus}\n{s.procs} proc" for s in side],
        fontsize=8,
    )
    axis.set_ylabel("operations/s (median)")
    axis.set_yscale("log")
    axis.set_title("zipf 1.0, 95/5: when does memcached pay?")
    axis.legend(fontsize=8)
    _common.save_plot(figure, "tiers_when_l2_pays")


def main() -> None:
    args = _common.parse_args(__doc__.splitlines()[0])
    quick = args.quick
    subscribers = 10_000 if quick else 100_000
    repeats = 1 if quick else 3
    warm, measure = (0.08, 0.15) if quick else (0.25, 0.4)
    _common.print_header("tiers.py: origin, look-aside and L1 + L2", quick)

    db_path = prepare_database(subscribers)
    all_scenarios = scenarios()
    results: Results = {}
    with _common.Servers() as servers:
        (memcached,) = servers.memcached(1, memory_mb=1024)
        shared = Shared(
            db_path=db_path,
            memcached=memcached,
            redis_url=servers.redis().url,
            subscribers=subscribers,
            warm_ns=int(warm * 1e9),
            measure_ns=int(measure * 1e9),
            permutation=np.random.default_rng(11).permutation(subscribers),
            cdfs={z: zipf_cdf(subscribers, z) for z in ZIPF_EXPONENTS},
            draws=100_000 if quick else 400_000,
        )
        for query in ORIGINS:
            store_in_memcached(shared, query)

        for repeat in range(repeats):
            # Rotate the order of the set-ups, so none always runs first.
            order = CONFIGS[repeat % 3 :] + CONFIGS[: repeat % 3]
            for number, scenario in enumerate(all_scenarios):
                seed = 1000 * repeat + 10 * number
                for config in order:
                    summary = run_cell(
                        scenario, config, seed, shared, servers.placement
                    )
                    results.setdefault((scenario, config), []).append(summary)

    print(
        f"{subscribers:,} subscribers, L1 of {max(subscribers // 10, 1):,} entries "
        f"per process, median of {repeats} repeat(s) of {measure} s each after "
        f"{warm} s of warm-up. ops/s counts reads and writes of all processes. "
        "vs origin divides ops/s by the origin-only ops/s of the same workload."
    )
    print()
    report(results, all_scenarios)
    plot(results, all_scenarios)


if __name__ == "__main__":
    main()
