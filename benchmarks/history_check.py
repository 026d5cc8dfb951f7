"""Check that reads across processes are never staler than the local TTL allows.

The script starts its own memcached and Redis on free loopback ports and an
SQLite origin in a temporary directory, then runs several worker processes
that read and write a shared key set through TieredCache for a fixed time.
The origin numbers every write of a key 0, 1, 2, ... inside the write's own
transaction, so version order is commit order. Each worker logs every write
(key, version, time its transaction began, time its commit returned) and
every read (key, version read, start, end).

Afterwards the checker replays the logs. A read is stale if a version newer
than the one it returned had committed before the read started, and its
staleness is the read's start minus the commit time of the first newer
version. Every stale read must fall within the bound: ``local_ttl`` (the
hard limit on how long an L1 entry lives) plus a margin for the memcached
commands that can separate a commit from the start of that TTL.

Modes: ``--drop-rate`` makes every worker's channel lose that fraction of
its messages, and ``--restart-redis-at`` restarts Redis on the same port
mid-run. The script prints a fixed table (or JSON with ``--json``) and exits
with status 1 if any stale read is past the bound or the history is invalid.

Run it as ``python benchmarks/history_check.py --duration 10``.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import dataclasses
import json
import logging
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import orjson
import redis
from pymemcache.client.base import Client as MemcacheClient

from tiercache import MISSING, Settings, TieredCache
from tiercache.adapters import key_bytes
from tiercache.adapters.redis_channel import RedisChannel
from tiercache.adapters.sqlite import SQLiteOrigin
from tiercache.demo.zipf import ZipfSampler
from tiercache.testing import MemcachedServer, RedisServer

log = logging.getLogger("history_check")

DEFAULT_LOCAL_TTL = 2.0

# An L1 entry's TTL starts when it is stored, which can be after the commit it
# missed. The writer deletes the key in L2 only after its commit, and a reader
# that loaded the old row makes a gets and a cas before it stores the row in
# L1. Each of these three memcached commands gives up after read_timeout
# (0.25 s by default), so the default bound adds three read_timeouts to
# local_ttl. NOTE: CPU scheduling delays are not covered: a reader that is
# descheduled for longer could exceed the bound without a bug in tiercache.
DEFAULT_MARGIN = 3 * Settings().read_timeout

NAMESPACE = "history"
# Seconds a worker waits for its subscription, and for the start signal.
WORKER_READY_TIMEOUT = 30.0
# Seconds the parent waits for workers after the run should have ended.
WORKER_EXIT_TIMEOUT = 60.0
# Time between the start signal and the first operation, so that every worker
# has seen the signal before any of them begins.
START_DELAY = 0.3


class VersionedOrigin(SQLiteOrigin):
    """An SQLite origin that numbers the writes of each key in commit order.

    ``store`` ignores any ``"v"`` in the value it is given. It takes the next
    number from a counter row inside the ``BEGIN IMMEDIATE`` transaction that
    writes the value, so two writes of a key get their numbers in the order
    they commit. Each committed write is appended to :attr:`commits`.
    """

    def __init__(self, path: str) -> None:
        super().__init__(path)
        with self.transaction() as conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS history_versions "
                "(key BLOB PRIMARY KEY, version INTEGER NOT NULL)"
            )
        self.commits: list[tuple[str, int, float, float]] = []
        """``(key, version, began_at, committed_at)`` in wall-clock seconds."""

    def store(self, key: str | bytes, value: Any) -> None:
        if not isinstance(key, str) or not isinstance(value, dict):
            raise TypeError(
                f"VersionedOrigin stores dict values under str keys, "
                f"got {type(key).__name__} key {key!r} and {type(value).__name__}"
            )
        began_at = time.time()
        with self.transaction() as conn:
            (version,) = conn.execute(
                "INSERT INTO history_versions (key, version) VALUES (?, 0) "
                "ON CONFLICT (key) DO UPDATE SET version = version + 1 "
                "RETURNING version",
                (key_bytes(key),),
            ).fetchone()
            conn.execute(
                f"INSERT INTO {self.table} (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key_bytes(key), orjson.dumps({**value, "v": version})),
            )
        committed_at = time.time()
        self.commits.append((key, version, began_at, committed_at))
        self.stores += 1


class DroppingChannel:
    """A channel that silently loses a random fraction of the messages it publishes.

    A dropped message reaches no process, including the publisher itself.
    """

    def __init__(self, inner: RedisChannel, drop_rate: float, rng: random.Random):
        self.inner = inner
        self.drop_rate = drop_rate
        self.rng = rng
        self.dropped = 0

    @property
    def max_payload(self) -> int | None:
        return self.inner.max_payload

    def publish(self, payload: bytes) -> None:
        if self.rng.random() < self.drop_rate:
            self.dropped += 1
            return
        self.inner.publish(payload)

    def subscribe(
        self, receiver: Callable[[bytes], None], on_state: Callable[[bool], None]
    ) -> None:
        self.inner.subscribe(receiver, on_state)

    def after_fork(self) -> None:
        self.inner.after_fork()

    def close(self) -> None:
        self.inner.close()


# -- the worker process ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker process needs, written as JSON by the parent."""

    memcached_address: str
    redis_url: str
    database_path: str
    run_dir: str
    keys: int
    zipf_exponent: float
    write_ratio: float
    max_delay: float
    local_ttl: float
    remote_ttl: float
    stale_ttl: float
    early_refresh_beta: float
    drop_rate: float
    seed: int

    def key_names(self) -> list[str]:
        return [f"key:{index}" for index in range(self.keys)]


def run_worker(config_path: Path, index: int) -> None:
    """Run one worker: get ready, wait for the start signal, operate, save logs."""
    config = WorkerConfig(**json.loads(config_path.read_text()))
    run_dir = Path(config.run_dir)
    rng = random.Random(config.seed * 1000 + index)
    origin = VersionedOrigin(config.database_path)
    channel: RedisChannel | DroppingChannel = RedisChannel(config.redis_url)
    if config.drop_rate > 0:
        channel = DroppingChannel(
            channel, config.drop_rate, random.Random(rng.random())
        )
    cache = TieredCache(_cache_settings(config), origin=origin, channel=channel)

    try:
        _wait_until_subscribed(cache)
        (run_dir / f"ready-{index}").touch()
        started_at, deadline = _wait_for_start(run_dir / "start")
        _sleep_until(started_at)
        reads = _operate(cache, config, rng, deadline)
        stats = cache.stats()
    finally:
        cache.close()

    dropped = channel.dropped if isinstance(channel, DroppingChannel) else 0
    result = {
        "reads": reads,
        "writes": origin.commits,
        "stats": stats,
        "dropped": dropped,
    }
    (run_dir / f"worker-{index}.json").write_bytes(orjson.dumps(result))


def _cache_settings(config: WorkerConfig) -> Settings:
    # Built in code, not from TIERCACHE_* variables, so runs are comparable.
    return Settings(
        memcached_servers=(config.memcached_address,),
        namespace=NAMESPACE,
        local_ttl=config.local_ttl,
        remote_ttl=config.remote_ttl,
        stale_ttl=config.stale_ttl,
        early_refresh_beta=config.early_refresh_beta,
    )


def _wait_until_subscribed(cache: TieredCache) -> None:
    assert cache.bus is not None
    deadline = time.monotonic() + WORKER_READY_TIMEOUT
    while not cache.bus.is_trusted:
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"channel subscription not confirmed within {WORKER_READY_TIMEOUT} s"
            )
        time.sleep(0.01)


def _wait_for_start(path: Path) -> tuple[float, float]:
    deadline = time.monotonic() + WORKER_READY_TIMEOUT
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"no start signal at {path} within {WORKER_READY_TIMEOUT} s"
            )
        time.sleep(0.005)
    started_at, run_deadline = json.loads(path.read_text())
    return float(started_at), float(run_deadline)


def _sleep_until(wall_time: float) -> None:
    pause = wall_time - time.time()
    if pause > 0:
        time.sleep(pause)


def _operate(
    cache: TieredCache, config: WorkerConfig, rng: random.Random, deadline: float
) -> list[tuple[str, int, float, float]]:
    """Read and write random keys until ``deadline`` and return the read log.

    The write log is kept by the origin. A read of a missing key is logged
    with version -1, which the checker counts as invalid, because every key
    is written before the run starts.
    """
    keys = config.key_names()
    sampler = ZipfSampler(len(keys), config.zipf_exponent, rng=rng)
    reads: list[tuple[str, int, float, float]] = []
    while time.time() < deadline:
        key = keys[sampler.sample()]
        if rng.random() < config.write_ratio:
            cache.set(key, {"writer": os.getpid()})
        else:
            started = time.time()
            value = cache.get(key)
            ended = time.time()
            version = -1 if value is MISSING else int(value["v"])
            reads.append((key, version, started, ended))
        if config.max_delay > 0:
            time.sleep(rng.uniform(0, config.max_delay))
    return reads


# -- the checker ----------------------------------------------------------------


@dataclasses.dataclass
class HistoryFigures:
    """Counts and staleness figures of one run's history, in seconds."""

    reads_checked: int
    writes_committed: int
    stale_within_bound: int
    stale_past_bound: int
    max_staleness: float
    p99_staleness: float
    invalid_reads: int
    version_gaps: int


def check_history(
    writes: Iterable[Sequence[Any]],
    reads: Iterable[Sequence[Any]],
    bound: float,
) -> HistoryFigures:
    """Find the stale reads in a history and measure how stale they were.

    :param writes: ``(key, version, began_at, committed_at)`` for every
        committed write, versions numbered from 0 per key in commit order.
    :param reads: ``(key, version, started_at, ended_at)`` for every read.
    :param bound: seconds of staleness allowed.

    Commit times are taken after the commit returns, so a version's true
    commit is no later than the smallest logged commit time of it or any
    later version. That minimum is used as "the first newer version
    committed", which never overstates staleness.

    A read is invalid if it returned a version that no write logged, or one
    whose write began only after the read ended. ``version_gaps`` counts
    versions missing from, or repeated in, the write log.
    """
    by_key: dict[str, list[tuple[int, float, float]]] = {}
    for key, version, began_at, committed_at in writes:
        by_key.setdefault(key, []).append((int(version), began_at, committed_at))
    versions: dict[str, list[int]] = {}
    began: dict[str, list[float]] = {}
    newer_committed: dict[str, list[float]] = {}
    version_gaps = 0
    writes_committed = 0
    for key, entries in by_key.items():
        entries.sort()
        writes_committed += len(entries)
        key_versions = [version for version, _, _ in entries]
        if key_versions != list(range(len(key_versions))):
            expected = set(range(max(key_versions) + 1))
            version_gaps += len(expected ^ set(key_versions))
            version_gaps += len(key_versions) - len(set(key_versions))
        versions[key] = key_versions
        began[key] = [began_at for _, began_at, _ in entries]
        # Slot i is the earliest logged commit time of the entries from
        # position i on; the last slot (nothing newer) is infinity.
        suffix = [math.inf] * (len(entries) + 1)
        for position in range(len(entries) - 1, -1, -1):
            suffix[position] = min(entries[position][2], suffix[position + 1])
        newer_committed[key] = suffix

    reads_checked = 0
    invalid_reads = 0
    staleness: list[float] = []
    for key, version, started_at, ended_at in reads:
        reads_checked += 1
        key_versions = versions.get(key, [])
        position = bisect.bisect_left(key_versions, version)
        if position == len(key_versions) or key_versions[position] != version:
            invalid_reads += 1
            continue
        if began[key][position] > ended_at:
            invalid_reads += 1
            continue
        first_newer = newer_committed[key][bisect.bisect_right(key_versions, version)]
        if first_newer < started_at:
            staleness.append(started_at - first_newer)

    staleness.sort()
    past = len(staleness) - bisect.bisect_right(staleness, bound)
    return HistoryFigures(
        reads_checked=reads_checked,
        writes_committed=writes_committed,
        stale_within_bound=len(staleness) - past,
        stale_past_bound=past,
        max_staleness=staleness[-1] if staleness else 0.0,
        p99_staleness=_nearest_rank(staleness, 0.99),
        invalid_reads=invalid_reads,
        version_gaps=version_gaps,
    )


def _nearest_rank(ordered: Sequence[float], fraction: float) -> float:
    """Return the nearest-rank percentile of sorted values, 0 when empty."""
    if not ordered:
        return 0.0
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


# -- the parent process ---------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse and validate the command line; exit with status 2 if it is invalid."""
    parser = build_parser()
    options = parser.parse_args(argv)
    if options.worker is None:
        _validate(parser, options)
    return options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=(
            "Run worker processes against a real memcached, Redis and SQLite "
            "origin, log every read and write, and check that no read was "
            "staler than the bound."
        )
    )
    _add_workload_options(parser)
    _add_cache_options(parser)

    parser.add_argument(
        "--drop-rate",
        type=float,
        default=0.0,
        help="fraction of channel messages each worker silently drops (default 0)",
    )
    parser.add_argument(
        "--restart-redis-at",
        type=float,
        default=None,
        metavar="SECONDS",
        help="restart Redis on the same port this many seconds into the run",
    )

    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    parser.add_argument(
        "--json", action="store_true", help="print the figures as JSON, not a table"
    )
    # Internal: run as worker INDEX with the configuration file CONFIG.
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    return parser


def _add_workload_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--processes", type=int, default=4, help="worker processes (default 4)"
    )
    parser.add_argument(
        "--duration", type=float, default=10.0, help="seconds of load (default 10)"
    )
    parser.add_argument(
        "--keys", type=int, default=200, help="size of the shared key set (default 200)"
    )
    parser.add_argument(
        "--zipf-exponent",
        type=float,
        default=1.0,
        help="Zipf exponent of key popularity, 0 to pick keys uniformly (default 1.0)",
    )
    parser.add_argument(
        "--write-ratio",
        type=float,
        default=0.1,
        help="fraction of operations that are writes (default 0.1)",
    )
    parser.add_argument(
        "--max-delay",
        type=float,
        default=0.002,
        help="maximum random pause after each operation, in seconds (default 0.002)",
    )


def _add_cache_options(parser: argparse.ArgumentParser) -> None:
    defaults = Settings()
    parser.add_argument(
        "--local-ttl",
        type=float,
        default=DEFAULT_LOCAL_TTL,
        help=(
            f"local_ttl of every worker's cache, in seconds "
            f"(default {DEFAULT_LOCAL_TTL})"
        ),
    )
    parser.add_argument(
        "--remote-ttl",
        type=float,
        default=defaults.remote_ttl,
        help=(
            "remote_ttl: seconds an L2 entry stays fresh "
            f"(default {defaults.remote_ttl:g})"
        ),
    )
    parser.add_argument(
        "--stale-ttl",
        type=float,
        default=defaults.stale_ttl,
        help=(
            "stale_ttl: seconds an L2 entry past remote_ttl is still served while "
            f"one caller refreshes it (default {defaults.stale_ttl:g}, off)"
        ),
    )
    parser.add_argument(
        "--early-refresh-beta",
        type=float,
        default=defaults.early_refresh_beta,
        help=(
            "early_refresh_beta of probabilistic early refresh "
            f"(default {defaults.early_refresh_beta:g}, off)"
        ),
    )
    parser.add_argument(
        "--bound",
        type=float,
        default=None,
        help=(
            "staleness allowed, in seconds (default local_ttl + "
            f"{DEFAULT_MARGIN:.2f}: three memcached commands of at most "
            "read_timeout each)"
        ),
    )


def _validate(parser: argparse.ArgumentParser, options: argparse.Namespace) -> None:
    # Comparisons are written so that NaN fails them.
    restart_at = options.restart_redis_at
    checks = [
        ("--processes", options.processes, options.processes >= 2, "at least 2"),
        ("--duration", options.duration, options.duration > 0, "seconds > 0"),
        ("--keys", options.keys, options.keys >= 1, "at least 1"),
        ("--zipf-exponent", options.zipf_exponent, options.zipf_exponent >= 0, ">= 0"),
        (
            "--write-ratio",
            options.write_ratio,
            0 < options.write_ratio < 1,
            "a fraction between 0 and 1, both excluded",
        ),
        ("--max-delay", options.max_delay, options.max_delay >= 0, "seconds >= 0"),
        ("--local-ttl", options.local_ttl, options.local_ttl > 0, "seconds > 0"),
        ("--remote-ttl", options.remote_ttl, options.remote_ttl > 0, "seconds > 0"),
        ("--stale-ttl", options.stale_ttl, options.stale_ttl >= 0, "seconds >= 0"),
        (
            "--early-refresh-beta",
            options.early_refresh_beta,
            options.early_refresh_beta >= 0,
            ">= 0",
        ),
        (
            "--bound",
            options.bound,
            options.bound is None or options.bound > 0,
            "seconds > 0",
        ),
        (
            "--drop-rate",
            options.drop_rate,
            0 <= options.drop_rate < 1,
            "a fraction from 0 up to, not including, 1",
        ),
        (
            "--restart-redis-at",
            restart_at,
            restart_at is None or 0 < restart_at < options.duration,
            f"seconds between 0 and --duration {options.duration}",
        ),
    ]
    for flag, value, is_valid, expected in checks:
        if not is_valid:
            parser.error(f"invalid {flag} {value}: expected {expected}")


def run_check(options: argparse.Namespace) -> dict[str, Any]:
    """Start the servers and workers, run the load, and return the report.

    :raises RuntimeError: if a worker fails or does not finish in time.
    """
    bound = options.bound
    if bound is None:
        bound = options.local_ttl + DEFAULT_MARGIN
    with contextlib.ExitStack() as stack:
        run_dir = Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="history-"))
        )
        memcached = stack.enter_context(MemcachedServer())
        redis_server = stack.enter_context(RedisServer())
        log.info(
            "memcached on %s, redis on %s", memcached.address, redis_server.address
        )
        database_path = run_dir / "origin.sqlite3"
        config = WorkerConfig(
            memcached_address=memcached.address,
            redis_url=redis_server.url,
            database_path=str(database_path),
            run_dir=str(run_dir),
            keys=options.keys,
            zipf_exponent=options.zipf_exponent,
            write_ratio=options.write_ratio,
            max_delay=options.max_delay,
            local_ttl=options.local_ttl,
            remote_ttl=options.remote_ttl,
            stale_ttl=options.stale_ttl,
            early_refresh_beta=options.early_refresh_beta,
            drop_rate=options.drop_rate,
            seed=options.seed,
        )
        initial_writes = _write_initial_versions(config)
        machine = _describe_machine(memcached, redis_server)
        workers = _start_workers(config, options.processes, run_dir, stack)
        restart = _drive_run(options, run_dir, workers, redis_server)
        results = _collect_results(workers, run_dir)

    writes = list(initial_writes)
    reads: list[Sequence[Any]] = []
    for result in results:
        writes.extend(result["writes"])
        reads.extend(result["reads"])
    figures = check_history(writes, reads, bound)
    return _build_report(options, bound, machine, figures, results, restart)


def _write_initial_versions(
    config: WorkerConfig,
) -> list[tuple[str, int, float, float]]:
    """Write version 0 of every key, so that no read can find a key missing."""
    origin = VersionedOrigin(config.database_path)
    for key in config.key_names():
        origin.store(key, {"writer": 0})
    return origin.commits


def _describe_machine(memcached: MemcachedServer, redis_server: RedisServer) -> str:
    client = MemcacheClient((memcached.host, memcached.port), timeout=2)
    try:
        memcached_version = client.version().decode()
    finally:
        client.close()
    redis_client = redis.Redis.from_url(redis_server.url, socket_timeout=2)
    try:
        redis_version = redis_client.info("server")["redis_version"]
    finally:
        redis_client.close()
    return (
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, memcached {memcached_version}, "
        f"Redis {redis_version}"
    )


def _start_workers(
    config: WorkerConfig, processes: int, run_dir: Path, stack: contextlib.ExitStack
) -> list[subprocess.Popen[bytes]]:
    config_path = run_dir / "config.json"
    config_path.write_text(json.dumps(dataclasses.asdict(config)))
    workers: list[subprocess.Popen[bytes]] = []
    stack.callback(_kill_unfinished, workers)
    for index in range(processes):
        stderr = stack.enter_context(open(run_dir / f"worker-{index}.log", "wb"))
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--worker",
            str(config_path),
            str(index),
        ]
        workers.append(
            subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr
            )
        )
    log.info("started %d workers: pids %s", processes, [w.pid for w in workers])
    return workers


def _kill_unfinished(workers: list[subprocess.Popen[bytes]]) -> None:
    for worker in workers:
        if worker.poll() is None:
            log.warning("killing unfinished worker pid %d", worker.pid)
            worker.kill()
            worker.wait()


def _drive_run(
    options: argparse.Namespace,
    run_dir: Path,
    workers: list[subprocess.Popen[bytes]],
    redis_server: RedisServer,
) -> dict[str, float] | None:
    """Wait until every worker is ready, start them, and restart Redis if asked.

    :returns: when Redis was restarted (seconds into the run) and how long
        the restart took, or None without a restart.
    """
    deadline = time.monotonic() + WORKER_READY_TIMEOUT
    for index, worker in enumerate(workers):
        while not (run_dir / f"ready-{index}").exists():
            if worker.poll() is not None:
                raise RuntimeError(_worker_failure(run_dir, index, worker, "at start"))
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"worker {index} (pid {worker.pid}) not ready within "
                    f"{WORKER_READY_TIMEOUT} s"
                )
            time.sleep(0.01)
    started_at = time.time() + START_DELAY
    run_deadline = started_at + options.duration
    start_file = run_dir / "start"
    start_file.with_suffix(".tmp").write_text(json.dumps([started_at, run_deadline]))
    start_file.with_suffix(".tmp").rename(start_file)
    log.info("run started for %.1f s", options.duration)
    if options.restart_redis_at is None:
        return None
    _sleep_until(started_at + options.restart_redis_at)
    restart_began = time.time()
    redis_server.restart()
    restart_took = time.time() - restart_began
    log.info("redis restarted in %.3f s", restart_took)
    return {"at": restart_began - started_at, "took": restart_took}


def _collect_results(
    workers: list[subprocess.Popen[bytes]], run_dir: Path
) -> list[dict[str, Any]]:
    results = []
    for index, worker in enumerate(workers):
        try:
            worker.wait(timeout=WORKER_EXIT_TIMEOUT + START_DELAY)
        except subprocess.TimeoutExpired:
            raise RuntimeError(
                f"worker {index} (pid {worker.pid}) did not finish within "
                f"{WORKER_EXIT_TIMEOUT} s of the end of the run"
            ) from None
        if worker.returncode != 0:
            raise RuntimeError(
                _worker_failure(run_dir, index, worker, "during the run")
            )
        results.append(orjson.loads((run_dir / f"worker-{index}.json").read_bytes()))
    return results


def _worker_failure(
    run_dir: Path, index: int, worker: subprocess.Popen[bytes], when: str
) -> str:
    output = (run_dir / f"worker-{index}.log").read_text(errors="replace")
    tail = "\n".join(output.splitlines()[-20:])
    return (
        f"worker {index} (pid {worker.pid}) exited with code {worker.returncode} "
        f"{when}. Its last output:\n{tail}"
    )


def _build_report(
    options: argparse.Namespace,
    bound: float,
    machine: str,
    figures: HistoryFigures,
    results: list[dict[str, Any]],
    restart: dict[str, float] | None,
) -> dict[str, Any]:
    def total(*path: str) -> int:
        count = 0
        for result in results:
            value: Any = result["stats"]
            for part in path:
                value = value[part]
            count += value
        return count

    passed = (
        figures.stale_past_bound == 0
        and figures.invalid_reads == 0
        and figures.version_gaps == 0
    )
    return {
        "machine": machine,
        "mode": _mode_name(options),
        "processes": options.processes,
        "duration_s": options.duration,
        "keys": options.keys,
        "zipf_exponent": options.zipf_exponent,
        "write_ratio": options.write_ratio,
        "local_ttl_s": options.local_ttl,
        "remote_ttl_s": options.remote_ttl,
        "stale_ttl_s": options.stale_ttl,
        "early_refresh_beta": options.early_refresh_beta,
        "bound_s": bound,
        "reads_checked": figures.reads_checked,
        # Version 0 of every key is written before the run and not counted.
        "writes_committed": figures.writes_committed - options.keys,
        "stale_reads_within_bound": figures.stale_within_bound,
        "stale_reads_past_bound": figures.stale_past_bound,
        "max_staleness_s": figures.max_staleness,
        "p99_staleness_s": figures.p99_staleness,
        "invalid_reads": figures.invalid_reads,
        "version_gaps": figures.version_gaps,
        "local_hits": total("local", "hits"),
        "remote_hits": total("remote", "hits"),
        "origin_loads": total("origin", "loads"),
        "messages_dropped": sum(result["dropped"] for result in results),
        "sequence_gaps": total("invalidations", "gaps"),
        "channel_losses": total("invalidations", "channel_losses"),
        "local_flushes": total("invalidations", "local_flushes"),
        "publish_errors": total("invalidations", "publish_errors"),
        "stale_served": total("refresh", "stale_served"),
        "refreshes": total("refresh", "refreshes"),
        "redis_restart": restart,
        "passed": passed,
    }


def _mode_name(options: argparse.Namespace) -> str:
    parts = []
    if options.drop_rate > 0:
        parts.append(f"{options.drop_rate:.0%} of channel messages dropped")
    if options.restart_redis_at is not None:
        parts.append(f"Redis restarted at {options.restart_redis_at:g} s")
    return ", ".join(parts) or "clean"


def format_table(report: dict[str, Any]) -> str:
    """Format the report as a fixed, diff-friendly table."""
    rows = [
        ("reads checked", str(report["reads_checked"])),
        ("writes committed", str(report["writes_committed"])),
        ("stale reads within bound", str(report["stale_reads_within_bound"])),
        ("stale reads past bound", str(report["stale_reads_past_bound"])),
        ("max staleness (s)", f"{report['max_staleness_s']:.4f}"),
        ("p99 staleness of stale reads (s)", f"{report['p99_staleness_s']:.4f}"),
        ("invalid reads", str(report["invalid_reads"])),
        ("version gaps in write log", str(report["version_gaps"])),
        ("local tier hits", str(report["local_hits"])),
        ("remote tier hits", str(report["remote_hits"])),
        ("origin loads", str(report["origin_loads"])),
        ("channel messages dropped", str(report["messages_dropped"])),
        ("sequence gaps noticed", str(report["sequence_gaps"])),
        ("channel losses", str(report["channel_losses"])),
        ("local tier flushes", str(report["local_flushes"])),
        ("publish errors", str(report["publish_errors"])),
        ("stale L2 values served", str(report["stale_served"])),
        ("background refreshes", str(report["refreshes"])),
    ]
    restart = report["redis_restart"]
    if restart is not None:
        rows.append(("redis restart at (s)", f"{restart['at']:.3f}"))
        rows.append(("redis restart took (s)", f"{restart['took']:.3f}"))
    lines = [
        "tiercache history check",
        f"machine: {report['machine']}",
        (
            f"run: {report['processes']} processes, {report['duration_s']:g} s, "
            f"{report['keys']} keys (Zipf exponent {report['zipf_exponent']:g}), "
            f"{report['write_ratio']:.0%} writes, "
            f"local_ttl {report['local_ttl_s']:g} s, "
            f"bound {report['bound_s']:.2f} s"
        ),
        (
            f"L2: remote_ttl {report['remote_ttl_s']:g} s, "
            f"stale_ttl {report['stale_ttl_s']:g} s, "
            f"early_refresh_beta {report['early_refresh_beta']:g}"
        ),
        f"mode: {report['mode']}",
        "",
        f"{'figure':<34} {'value':>12}",
    ]
    lines += [f"{name:<34} {value:>12}" for name, value in rows]
    verdict = "PASS" if report["passed"] else "FAIL"
    lines += ["", f"result: {verdict}"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check and print its report.

    :returns: 0 if every read was within the bound and the history is valid,
        1 if not, 2 if the run itself failed.
    """
    options = parse_args(argv)
    if options.worker is not None:
        logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
        run_worker(Path(options.worker[0]), int(options.worker[1]))
        return 0
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        report = run_check(options)
    except (RuntimeError, TimeoutError) as exc:
        print(f"history check failed to run: {exc}", file=sys.stderr)
        return 2
    if options.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_table(report))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
