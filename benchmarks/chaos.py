"""Send the demo's campaign through tiercache while its servers fail on a schedule.

The script starts three memcached servers and a Redis on free loopback
ports and seeds the demo's SQLite origin (:mod:`tiercache.demo.data`).
Worker processes then send the demo's campaign: for each email they read a
profile, a template and a segment through :class:`~tiercache.TieredCache`
and render the email with :func:`tiercache.demo.campaign.render_email`. An
editor process writes profile edits and unsubscribes through write-through
all the while. Meanwhile the parent process injects one fault per phase:

===================  ==================================================
phase                what the parent does as the phase begins
===================  ==================================================
warm-up              nothing (the tiers fill from cold)
baseline             nothing
node killed          SIGKILL one memcached
node restarted       start it again, empty, on the same port
node frozen          SIGSTOP another memcached
node thawed          SIGCONT it
redis restarted      stop Redis and start it again on the same port
all nodes down       SIGKILL every memcached
all nodes restarted  start them again, empty
recovered            nothing
===================  ==================================================

A phase runs until the next one begins, so a repaired phase includes the
recovery that follows the repair. Phase lengths are fixed shares of
``--duration``: with the default 40 s, the baseline lasts 5 s, a node is
killed for 4 s and frozen for 3.5 s, and all nodes are down for 2 s.

Every read is logged with its start time (which places it in a phase),
latency, outcome and the tier that served it, and every profile read with
the version it returned. A read fails if ``get`` raises, returns no row,
or its email fails to render. A read is stale past the bound if it
returned a profile version older than one whose commit returned more than
``--bound`` seconds before the read started. ``check_history`` of
history_check.py finds those reads.

Exit status: 0 when no read or write failed and no read was stale past the
bound or returned a version not yet committed, 1 otherwise, 2 when the run
itself could not be carried out.

Run it as ``python benchmarks/chaos.py`` (40 s) or with ``--quick`` (15 s).
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import dataclasses
import json
import logging
import multiprocessing
import queue
import random
import secrets
import signal
import sys
import tempfile
import time
import traceback
from array import array
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import _common
from history_check import check_history

from tiercache import MISSING, Settings, TieredCache, signals
from tiercache.demo.campaign import render_email
from tiercache.demo.data import generate_dataset
from tiercache.demo.database import DataSetIdentity, digest_templates, seed_database
from tiercache.demo.origin import CampaignOrigin
from tiercache.demo.templates import generate_templates
from tiercache.demo.workers import _write_once
from tiercache.demo.zipf import ZipfSampler, rank_subscribers
from tiercache.testing import MemcachedServer, RedisServer, ServerNotInstalledError

log = logging.getLogger("chaos")

# Short timeouts, so that a dead or frozen memcached costs a bounded wait.
CACHE_TIMEOUT = 0.2
NODE_RETRY_TIMEOUT = 1.0
REMOTE_TTL = 300.0
DEFAULT_LOCAL_TTL = 2.0
# An L1 entry lives local_ttl seconds from the moment it is stored, which
# can come after the commit it missed. A reader that loaded the old row
# still makes a gets and a cas before it fills L1. A reader of L2 can get
# the old value until the writer's delete lands, after the commit. Under
# these faults each of those three memcached commands can wait for a
# connect and a read timeout before it gives up.
# NOTE: CPU scheduling delays are not covered. On an overloaded machine a
# process descheduled for longer could exceed the bound without a bug.
STALENESS_MARGIN = 3 * (CACHE_TIMEOUT + CACHE_TIMEOUT)

DEFAULT_DURATION = 40.0
QUICK_DURATION = 15.0
DEFAULT_SUBSCRIBERS = 20_000
QUICK_SUBSCRIBERS = 5_000
MEMCACHED_COUNT = 3
# Seconds to wait for every process to start and subscribe, and for the
# results after the run ends.
READY_TIMEOUT = 90.0
RESULT_TIMEOUT = 60.0
# Delay between the start signal and the first request, so that every
# process is waiting when the clock starts.
START_DELAY = 0.2
# Distinct failure messages counted per process. Messages first seen after
# that many are counted together under OTHER_ERRORS.
ERRORS_KEPT = 20
OTHER_ERRORS = "(other messages)"

OK = 0
FAILED = 1
MISSING_ROW = 2
RENDER_FAILED = 3
TIER_UNKNOWN = 0
TIER_LOCAL = 1
TIER_REMOTE = 2
TIER_ORIGIN = 3
TIER_NAMES = ("unknown", "L1", "L2", "origin")


@dataclasses.dataclass(frozen=True)
class Phase:
    """One fault of the schedule, with its share of the run and its repair."""

    name: str
    share: float
    """Fraction of ``--duration``, the repaired phase included."""
    fault: str | None
    """``"kill"``, ``"freeze"``, ``"restart redis"``, ``"kill all"`` or None."""
    repaired: str | None = None
    """Name of the phase that begins with the repair, if the fault has one."""
    repair_at: float = 0.0
    """Fraction of ``share`` after which the fault is repaired."""


PHASES = (
    Phase("warm-up", 0.075, None),
    Phase("baseline", 0.125, None),
    Phase("node killed", 0.2, "kill", "node restarted", repair_at=0.5),
    Phase("node frozen", 0.175, "freeze", "node thawed", repair_at=0.5),
    Phase("redis restarted", 0.15, "restart redis"),
    Phase("all nodes down", 0.125, "kill all", "all nodes restarted", repair_at=0.4),
    Phase("recovered", 0.15, None),
)
ALL_DOWN = "all nodes down"


@dataclasses.dataclass(frozen=True)
class ProcessConfig:
    """Everything a worker or the editor needs, picklable for spawning."""

    database: Path
    subscriber_count: int
    zipf_exponent: float
    seed: int
    write_rate: float
    year: int
    cache_settings: dict[str, Any]


@dataclasses.dataclass
class RequestLog:
    """One row per read of a worker, in order, and one per profile read.

    ``started`` is wall-clock seconds, which places the read in its phase,
    and ``latency`` is seconds measured with ``perf_counter``. ``outcome``
    is ``OK``, ``FAILED``, ``MISSING_ROW`` or ``RENDER_FAILED``, and
    ``tier`` is the ``TIER_*`` code of the tier that served the read.
    """

    name: str
    started: array[float] = dataclasses.field(default_factory=lambda: array("d"))
    latency: array[float] = dataclasses.field(default_factory=lambda: array("d"))
    outcome: array[int] = dataclasses.field(default_factory=lambda: array("b"))
    tier: array[int] = dataclasses.field(default_factory=lambda: array("b"))
    profile_ids: array[int] = dataclasses.field(default_factory=lambda: array("q"))
    profile_versions: array[int] = dataclasses.field(default_factory=lambda: array("q"))
    profile_started: array[float] = dataclasses.field(
        default_factory=lambda: array("d")
    )
    profile_ended: array[float] = dataclasses.field(default_factory=lambda: array("d"))
    profile_tiers: array[int] = dataclasses.field(default_factory=lambda: array("b"))
    emails_sent: int = 0
    errors: Counter[str] = dataclasses.field(default_factory=Counter)
    cache_stats: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class EditorLog:
    """The editor's writes: one row per attempt, and the commits the origin made."""

    started: array[float] = dataclasses.field(default_factory=lambda: array("d"))
    latency: array[float] = dataclasses.field(default_factory=lambda: array("d"))
    failed: array[int] = dataclasses.field(default_factory=lambda: array("b"))
    commits: list[tuple[str, int, float, float]] = dataclasses.field(
        default_factory=list
    )
    """``(key, version, began_at, committed_at)``, wall-clock seconds."""
    unsubscribes: int = 0
    errors: Counter[str] = dataclasses.field(default_factory=Counter)
    cache_stats: dict[str, Any] = dataclasses.field(default_factory=dict)


class CommitLoggingOrigin(CampaignOrigin):
    """The demo's origin, logging when each write's commit returned.

    The editor is the only writer and reads the row just before it writes
    it, so the version the store commits is the version read plus one.
    """

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.commits: list[tuple[str, int, float, float]] = []

    def store(self, key: str, value: Any) -> None:
        began_at = time.time()
        super().store(key, value)
        self.commits.append((key, int(value["version"]) + 1, began_at, time.time()))


# -- the worker and editor processes ---------------------------------------------


class _TierProbe:
    """The tier that served the latest read, from the cache's hit and miss signals."""

    def __init__(self, cache: TieredCache) -> None:
        self.tier = TIER_UNKNOWN
        signals.hit.connect(self._on_hit, sender=cache, weak=False)
        signals.miss.connect(self._on_miss, sender=cache, weak=False)

    def _on_hit(self, sender: Any, *, key: Any, tier: str) -> None:
        self.tier = TIER_LOCAL if tier == "local" else TIER_REMOTE

    def _on_miss(self, sender: Any, *, key: Any) -> None:
        self.tier = TIER_ORIGIN


def worker_main(
    name: str, config: ProcessConfig, start: Any, start_time: Any, results: Any
) -> None:
    """Send emails until the run ends, then put the worker's :class:`RequestLog`."""
    _run_process(name, results, lambda: _send(name, config, start, start_time, results))


def editor_main(
    name: str, config: ProcessConfig, start: Any, start_time: Any, results: Any
) -> None:
    """Write profiles at ``config.write_rate`` until the run ends; put an EditorLog.

    The result is put on ``results`` as for :func:`worker_main`.
    """
    _run_process(name, results, lambda: _edit(name, config, start, start_time, results))


def _run_process(name: str, results: Any, body: Callable[[], Any]) -> None:
    # The parent handles Ctrl-C and terminates this process.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(
        level=logging.WARNING, format=f"{name} %(name)s %(levelname)s: %(message)s"
    )
    try:
        results.put(("result", name, body()))
    except BaseException:
        results.put(("failed", name, traceback.format_exc()))


def _open_cache(origin: CampaignOrigin, config: ProcessConfig) -> TieredCache:
    cache = TieredCache(Settings(**config.cache_settings), origin=origin)
    if not cache.wait_ready(READY_TIMEOUT / 2):
        cache.close()
        raise TimeoutError(
            f"no invalidation subscription on {config.cache_settings['channel_url']} "
            f"after {READY_TIMEOUT / 2:.0f} s; check that Redis is reachable"
        )
    return cache


def _wait_for_start(name: str, start: Any, start_time: Any, results: Any) -> float:
    """Report ready, wait for the start signal and time, and return the end time."""
    results.put(("ready", name, None))
    if not start.wait(READY_TIMEOUT):
        raise TimeoutError(f"no start signal within {READY_TIMEOUT:.0f} s")
    begin, end = start_time[0], start_time[1]
    time.sleep(max(0.0, begin - time.time()))
    return float(end)


def _send(
    name: str, config: ProcessConfig, start: Any, start_time: Any, results: Any
) -> RequestLog:
    origin = CampaignOrigin(config.database)
    cache = _open_cache(origin, config)
    try:
        campaigns = origin.load_campaigns()
        ranking = rank_subscribers(config.subscriber_count, config.seed)
        rng = random.Random(f"chaos-{config.seed}-{name}")
        sampler = ZipfSampler(len(ranking), config.zipf_exponent, rng=rng)
        requests = RequestLog(name)
        probe = _TierProbe(cache)
        deadline = _wait_for_start(name, start, start_time, results)
        while time.time() < deadline:
            campaign = campaigns[rng.randrange(len(campaigns))]
            subscriber_id = ranking[sampler.sample()]
            profile = _read(cache, probe, requests, f"subscriber:{subscriber_id}")
            profile_row = len(requests.outcome) - 1
            if profile is not None:
                _log_profile(requests, profile_row, subscriber_id, profile)
            template = _read(cache, probe, requests, campaign.template_key)
            segment = _read(cache, probe, requests, campaign.segment_key)
            if profile is None or template is None or segment is None:
                continue
            if profile["status"] != "subscribed":
                continue
            try:
                render_email(template, profile, campaign, segment, year=config.year)
            except Exception as exc:  # noqa: BLE001 - counted as a failed request
                requests.outcome[profile_row] = RENDER_FAILED
                _count_error(requests.errors, f"render: {_describe_error(exc)}")
                continue
            requests.emails_sent += 1
        requests.cache_stats = cache.stats()
        return requests
    finally:
        cache.close()
        origin.close()


def _read(cache: TieredCache, probe: _TierProbe, requests: RequestLog, key: str) -> Any:
    """Read ``key``, log the request and return the value (None if the read failed)."""
    probe.tier = TIER_UNKNOWN
    started = time.time()
    began = time.perf_counter()
    value: Any = None
    try:
        value = cache.get(key)
        outcome = MISSING_ROW if value is MISSING else OK
    except Exception as exc:  # noqa: BLE001 - any exception is a failed request
        outcome = FAILED
        _count_error(requests.errors, f"get: {_describe_error(exc)}")
    requests.latency.append(time.perf_counter() - began)
    requests.started.append(started)
    requests.outcome.append(outcome)
    requests.tier.append(probe.tier)
    if outcome == MISSING_ROW:
        _count_error(requests.errors, "get: no row, but the origin has one")
    return value if outcome == OK else None


def _log_profile(
    requests: RequestLog, row: int, subscriber_id: int, profile: dict[str, Any]
) -> None:
    started = requests.started[row]
    requests.profile_ids.append(subscriber_id)
    requests.profile_versions.append(int(profile["version"]))
    requests.profile_started.append(started)
    requests.profile_ended.append(started + requests.latency[row])
    requests.profile_tiers.append(requests.tier[row])


def _edit(
    name: str, config: ProcessConfig, start: Any, start_time: Any, results: Any
) -> EditorLog:
    origin = CommitLoggingOrigin(config.database)
    cache = _open_cache(origin, config)
    try:
        ranking = rank_subscribers(config.subscriber_count, config.seed)
        rng = random.Random(f"chaos-editor-{config.seed}")
        sampler = ZipfSampler(len(ranking), config.zipf_exponent, rng=rng)
        writes = EditorLog()
        deadline = _wait_for_start(name, start, start_time, results)
        first = time.time()
        interval = 1.0 / config.write_rate
        while True:
            due = first + len(writes.started) * interval
            if due >= deadline:
                break
            time.sleep(max(0.0, due - time.time()))
            _write(cache, origin, writes, ranking[sampler.sample()], rng)
        writes.commits = origin.commits
        writes.cache_stats = cache.stats()
        return writes
    finally:
        cache.close()
        origin.close()


def _write(
    cache: TieredCache,
    origin: CampaignOrigin,
    writes: EditorLog,
    subscriber_id: int,
    rng: random.Random,
) -> None:
    """Change one profile through write-through with the demo editor's own step."""
    started = time.time()
    began = time.perf_counter()
    failed = 0
    try:
        record = _write_once(subscriber_id, origin, cache.set, rng)
        if record is not None and record.kind == "unsubscribe":
            writes.unsubscribes += 1
    except Exception as exc:  # noqa: BLE001 - any exception is a failed write
        failed = 1
        _count_error(writes.errors, f"set: {_describe_error(exc)}")
    writes.latency.append(time.perf_counter() - began)
    writes.started.append(started)
    writes.failed.append(failed)


def _count_error(errors: Counter[str], message: str) -> None:
    if message in errors or len(errors) < ERRORS_KEPT:
        errors[message] += 1
    else:
        errors[OTHER_ERRORS] += 1


def _describe_error(exc: BaseException) -> str:
    """Return the exception with the file and line where it was raised."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" ({Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


# -- the parent: servers, processes and the fault schedule -----------------------


class RunFailedError(RuntimeError):
    """A process of the run failed, died or timed out, or a fault step failed."""


@dataclasses.dataclass
class Event:
    """One step the scheduler took, in seconds from the start of the run."""

    at: float
    took: float | None
    """Seconds the step took, or None for a phase that begins without a fault."""
    action: str


class Scheduler:
    """Injects the faults of :data:`PHASES` into the servers at their times."""

    def __init__(
        self,
        phases: Sequence[Phase],
        duration: float,
        memcached: list[MemcachedServer],
        redis_server: RedisServer,
    ) -> None:
        self.phases = phases
        self.duration = duration
        self.memcached = memcached
        self.redis = redis_server
        total = sum(phase.share for phase in phases)
        self.lengths = [duration * phase.share / total for phase in phases]
        self.planned_starts = [sum(self.lengths[:i]) for i in range(len(phases))]
        self.phase_starts: list[tuple[str, float]] = []
        """``(name, seconds from the start)`` of each phase as it began."""
        self.events: list[Event] = []

    def run(self, began_at: float) -> None:
        """Take every step at its planned time and record when each phase began."""
        for phase, planned, length in zip(
            self.phases, self.planned_starts, self.lengths, strict=True
        ):
            _sleep_until(began_at + planned)
            start = time.time() - began_at
            self.phase_starts.append((phase.name, start))
            if phase.fault is None:
                self.events.append(Event(start, None, f"{phase.name} begins"))
                continue
            self._inject(phase.fault, began_at)
            if phase.repaired is not None:
                _sleep_until(began_at + planned + length * phase.repair_at)
                self.phase_starts.append((phase.repaired, time.time() - began_at))
                self._repair(phase.fault, began_at)
        _sleep_until(began_at + self.duration)

    def _inject(self, fault: str, began_at: float) -> None:
        killed, frozen = self.memcached[0], self.memcached[1]
        if fault == "kill":
            self._record(began_at, f"SIGKILL memcached {killed.address}", killed.kill)
        elif fault == "freeze":
            self._record(began_at, f"SIGSTOP memcached {frozen.address}", frozen.pause)
        elif fault == "restart redis":
            self._record(
                began_at, f"restart Redis {self.redis.address}", self.redis.restart
            )
        elif fault == "kill all":
            self._record(began_at, "SIGKILL every memcached", self._kill_all)
        else:
            raise ValueError(f"unknown fault {fault!r} in PHASES")

    def _repair(self, fault: str, began_at: float) -> None:
        killed, frozen = self.memcached[0], self.memcached[1]
        if fault == "kill":
            self._record(
                began_at, f"restart memcached {killed.address}", killed.restart
            )
        elif fault == "freeze":
            self._record(began_at, f"SIGCONT memcached {frozen.address}", frozen.resume)
        elif fault == "kill all":
            self._record(began_at, "restart every memcached", self._restart_all)
        else:
            raise ValueError(f"fault {fault!r} in PHASES has no repair step")

    def _kill_all(self) -> None:
        for server in self.memcached:
            server.kill()

    def _restart_all(self) -> None:
        for server in self.memcached:
            server.restart()

    def _record(self, began_at: float, action: str, step: Callable[[], Any]) -> None:
        at = time.time()
        try:
            step()
        except (OSError, RuntimeError, TimeoutError) as exc:
            raise RunFailedError(f"fault step {action!r} failed: {exc}") from exc
        took = time.time() - at
        self.events.append(Event(at - began_at, took, action))
        log.info("%6.2f s  %s (%.3f s)", at - began_at, action, took)


def _sleep_until(wall_time: float) -> None:
    pause = wall_time - time.time()
    if pause > 0:
        time.sleep(pause)


@dataclasses.dataclass
class RunResult:
    """The logs of every process and what the scheduler did."""

    workers: list[RequestLog]
    editor: EditorLog
    phase_starts: list[tuple[str, float]]
    """``(name, seconds from the start)`` of each phase as it began."""
    events: list[Event]
    began_at: float


def run_processes(
    options: argparse.Namespace,
    config: ProcessConfig,
    scheduler: Scheduler,
) -> RunResult:
    """Start the workers and the editor, run the schedule, collect their logs.

    Every process is terminated when this returns or raises.

    :raises RunFailedError: if a process fails, dies or times out.
    """
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    start = context.Event()
    start_time = context.Array("d", 2, lock=False)
    processes: dict[str, Any] = {}
    try:
        names = [f"worker-{index}" for index in range(options.workers)] + ["editor"]
        for name in names:
            target = editor_main if name == "editor" else worker_main
            process = context.Process(
                target=target,
                args=(name, config, start, start_time, results),
                name=f"chaos {name}",
                daemon=True,
            )
            process.start()
            processes[name] = process
        _collect(results, processes, "ready", time.monotonic() + READY_TIMEOUT)
        began_at = time.time() + START_DELAY
        start_time[0] = began_at
        start_time[1] = began_at + options.duration
        start.set()
        log.info("sending for %.0f s with faults", options.duration)
        scheduler.run(began_at)
        logs = _collect(results, processes, "result", time.monotonic() + RESULT_TIMEOUT)
    finally:
        _stop_processes(processes)
    return RunResult(
        workers=[logs[name] for name in names if name != "editor"],
        editor=logs["editor"],
        phase_starts=scheduler.phase_starts,
        events=scheduler.events,
        began_at=began_at,
    )


def _collect(
    results: Any, processes: dict[str, Any], kind: str, deadline: float
) -> dict[str, Any]:
    """Wait for a ``kind`` message from every process and return them by name."""
    payloads: dict[str, Any] = {}
    while len(payloads) < len(processes):
        try:
            message_kind, name, payload = results.get(timeout=0.2)
        except queue.Empty:
            for name, process in processes.items():
                if name not in payloads and process.exitcode is not None:
                    raise RunFailedError(
                        f"{name} (pid {process.pid}) exited with code "
                        f"{process.exitcode} before sending its {kind} message"
                    ) from None
            if time.monotonic() > deadline:
                waiting = ", ".join(sorted(set(processes) - set(payloads)))
                raise RunFailedError(
                    f"timed out waiting for the {kind} message of {waiting}"
                ) from None
            continue
        if message_kind == "failed":
            log.error("%s failed:\n%s", name, payload.rstrip())
            summary = payload.strip().splitlines()[-1]
            raise RunFailedError(f"{name} failed: {summary}")
        if message_kind == kind:
            payloads[name] = payload
    return payloads


def _stop_processes(processes: dict[str, Any]) -> None:
    for process in processes.values():
        process.join(timeout=5.0)
    for name, process in processes.items():
        if process.is_alive():
            log.warning("%s (pid %d) still running; terminating it", name, process.pid)
            process.terminate()
            process.join(timeout=5.0)
        if process.is_alive():
            log.warning("%s (pid %d) ignored SIGTERM; killing it", name, process.pid)
            process.kill()
            process.join(timeout=5.0)


def seed_origin(path: Path, subscribers: int, seed: int) -> None:
    """Seed the demo's data set at ``path`` with the demo's own generators."""
    templates = generate_templates(seed)
    identity = DataSetIdentity(
        seed=seed,
        subscriber_count=subscribers,
        templates_digest=digest_templates((row.name, row.html) for row in templates),
    )
    began = time.perf_counter()
    seed_database(path, generate_dataset(subscribers, seed, templates), identity)
    log.info(
        "seeded %d subscribers in %.1f s", subscribers, time.perf_counter() - began
    )


def cache_settings(
    options: argparse.Namespace, memcached: list[MemcachedServer], redis_url: str
) -> dict[str, Any]:
    """Return the keyword arguments of every process's :class:`Settings`.

    Built in code, not from ``TIERCACHE_*`` variables, so runs are comparable.
    """
    return {
        "memcached_servers": tuple(server.address for server in memcached),
        "channel_url": redis_url,
        "namespace": f"chaos-{secrets.token_hex(4)}",
        "local_ttl": options.local_ttl,
        "remote_ttl": REMOTE_TTL,
        "connect_timeout": CACHE_TIMEOUT,
        "read_timeout": CACHE_TIMEOUT,
        "node_retry_timeout": NODE_RETRY_TIMEOUT,
    }


def run_chaos(options: argparse.Namespace) -> dict[str, Any]:
    """Start the servers, seed the origin, run the schedule and return the report."""
    phases = [phase for phase in PHASES if options.all_down or phase.name != ALL_DOWN]
    with contextlib.ExitStack() as stack:
        servers = stack.enter_context(_common.Servers())
        memcached = servers.memcached(MEMCACHED_COUNT)
        redis_server = servers.redis()
        log.info(
            "memcached on %s; Redis on %s",
            ", ".join(server.address for server in memcached),
            redis_server.address,
        )
        run_dir = Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="chaos-"))
        )
        database = run_dir / "campaign.sqlite3"
        seed_origin(database, options.subscribers, options.seed)
        settings = cache_settings(options, memcached, redis_server.url)
        config = ProcessConfig(
            database=database,
            subscriber_count=options.subscribers,
            zipf_exponent=options.zipf,
            seed=options.seed,
            write_rate=options.write_rate,
            year=datetime.now().year,
            cache_settings=settings,
        )
        header = _common.header_lines("tiercache chaos run", options.quick)
        scheduler = Scheduler(phases, options.duration, memcached, redis_server)
        run = run_processes(options, config, scheduler)
    return build_report(options, header, run)


# -- analysis and output ------------------------------------------------------------


def build_report(
    options: argparse.Namespace, header: list[str], run: RunResult
) -> dict[str, Any]:
    """Summarize the logs per phase and decide whether the run passed."""
    writes = _history_writes(run)
    rows = _phase_rows(options, run, writes)
    # A version missing from the commit log would make the stale check blind.
    version_gaps = check_history(writes, [], options.bound).version_gaps

    errors = Counter(run.editor.errors)
    for worker in run.workers:
        errors.update(worker.errors)
    stats = [worker.cache_stats for worker in run.workers] + [run.editor.cache_stats]

    failed = sum(row["failed"] + row["write_failures"] for row in rows)
    stale_past = sum(row["stale_past_bound"] for row in rows)
    invalid = sum(row["invalid_reads"] for row in rows)
    passed = failed == 0 and stale_past == 0 and invalid == 0 and version_gaps == 0
    return {
        "header": header,
        "workers": options.workers,
        "duration_s": options.duration,
        "subscribers": options.subscribers,
        "zipf_exponent": options.zipf,
        "write_rate": options.write_rate,
        "local_ttl_s": options.local_ttl,
        "timeout_s": CACHE_TIMEOUT,
        "node_retry_timeout_s": NODE_RETRY_TIMEOUT,
        "bound_s": options.bound,
        "events": [dataclasses.asdict(event) for event in run.events],
        "phases": rows,
        "emails_sent": sum(worker.emails_sent for worker in run.workers),
        "unsubscribes": run.editor.unsubscribes,
        "errors": [f"{count} x {error}" for error, count in errors.most_common(5)],
        "counters": _sum_counters(stats),
        "channel_trusted_at_end": all(s["invalidations"]["trusted"] for s in stats),
        "failed": failed,
        "stale_past_bound": stale_past,
        "invalid_reads": invalid,
        "version_gaps": version_gaps,
        "worst_stale_read": _worst_stale_read(run),
        "passed": passed,
    }


def _phase_rows(
    options: argparse.Namespace,
    run: RunResult,
    writes: list[tuple[str, int, float, float]],
) -> list[dict[str, Any]]:
    """Place every read and write in its phase and summarize each phase."""
    names = [name for name, _ in run.phase_starts]
    starts = [start for _, start in run.phase_starts]
    bounds = [run.began_at + start for start in starts]
    ends = [*starts[1:], options.duration]
    seconds = [end - start for start, end in zip(starts, ends, strict=True)]
    tallies = [_PhaseTally() for _ in names]
    for worker in run.workers:
        _tally_requests(worker, bounds, tallies)
    for started, failed in zip(run.editor.started, run.editor.failed, strict=True):
        tally = tallies[_phase_index(bounds, started)]
        tally.writes += 1
        tally.write_failures += failed

    return [
        tally.summarize(name, start, length, writes, options.bound)
        for name, start, length, tally in zip(
            names, starts, seconds, tallies, strict=True
        )
    ]


def _phase_index(bounds: list[float], started: float) -> int:
    return max(0, bisect.bisect_right(bounds, started) - 1)


@dataclasses.dataclass
class _PhaseTally:
    latencies: list[float] = dataclasses.field(default_factory=list)
    failed: int = 0
    tiers: Counter[int] = dataclasses.field(default_factory=Counter)
    profile_reads: list[tuple[str, int, float, float]] = dataclasses.field(
        default_factory=list
    )
    writes: int = 0
    write_failures: int = 0

    def summarize(
        self,
        name: str,
        start: float,
        seconds: float,
        writes: list[tuple[str, int, float, float]],
        bound: float,
    ) -> dict[str, Any]:
        history = check_history(writes, self.profile_reads, bound)
        latencies = sorted(self.latencies)
        past_l1 = self.tiers[TIER_REMOTE] + self.tiers[TIER_ORIGIN]
        requests = len(latencies)
        return {
            "phase": name,
            "start_s": start,
            "seconds": seconds,
            "served": requests - self.failed,
            "failed": self.failed,
            "p50_ms": _percentile_ms(latencies, 0.50),
            "p99_ms": _percentile_ms(latencies, 0.99),
            "max_ms": _percentile_ms(latencies, 1.0),
            "origin_loads_per_s": self.tiers[TIER_ORIGIN] / seconds,
            "l1_hit_ratio": _ratio(self.tiers[TIER_LOCAL], requests),
            "l2_hit_ratio": _ratio(self.tiers[TIER_REMOTE], past_l1),
            "profile_reads": history.reads_checked,
            "stale_reads": history.stale_within_bound + history.stale_past_bound,
            "stale_past_bound": history.stale_past_bound,
            "max_staleness_s": history.max_staleness,
            "invalid_reads": history.invalid_reads,
            "writes": self.writes,
            "write_failures": self.write_failures,
        }


def _tally_requests(
    worker: RequestLog, bounds: list[float], tallies: list[_PhaseTally]
) -> None:
    for started, latency, outcome, tier in zip(
        worker.started, worker.latency, worker.outcome, worker.tier, strict=True
    ):
        tally = tallies[_phase_index(bounds, started)]
        tally.latencies.append(latency)
        if outcome != OK:
            tally.failed += 1
        tally.tiers[tier] += 1
    for subscriber_id, version, started, ended in zip(
        worker.profile_ids,
        worker.profile_versions,
        worker.profile_started,
        worker.profile_ended,
        strict=True,
    ):
        # check_history numbers versions from 0; the seeded rows are version 1.
        read = (f"subscriber:{subscriber_id}", version - 1, started, ended)
        tallies[_phase_index(bounds, started)].profile_reads.append(read)


def _history_writes(run: RunResult) -> list[tuple[str, int, float, float]]:
    """Return the editor's commits in check_history's form, seeded rows included.

    Every profile was seeded at version 1 before the run, which becomes
    version 0 committed at minus infinity.
    """
    keys = {
        f"subscriber:{subscriber_id}"
        for worker in run.workers
        for subscriber_id in set(worker.profile_ids)
    }
    keys.update(key for key, _, _, _ in run.editor.commits)
    writes = [(key, 0, -float("inf"), -float("inf")) for key in keys]
    writes.extend(
        (key, version - 1, began_at, committed_at)
        for key, version, began_at, committed_at in run.editor.commits
    )
    return writes


def _worst_stale_read(run: RunResult) -> dict[str, Any] | None:
    """Return the profile read with the largest staleness, to tell where it came from.

    Staleness is measured as in ``check_history``: from the earliest
    logged commit of any newer version to the start of the read.
    """
    versions: dict[int, list[int]] = {}
    committed: dict[int, list[float]] = {}
    for key, version, _, committed_at in sorted(
        run.editor.commits, key=lambda commit: (commit[0], commit[1])
    ):
        subscriber_id = int(key.partition(":")[2])
        versions.setdefault(subscriber_id, []).append(version)
        committed.setdefault(subscriber_id, []).append(committed_at)
    # Suffix minimums: the earliest commit of the versions from position i on.
    for times in committed.values():
        for position in range(len(times) - 2, -1, -1):
            times[position] = min(times[position], times[position + 1])

    worst: dict[str, Any] | None = None
    for worker in run.workers:
        for subscriber_id, version, started, tier in zip(
            worker.profile_ids,
            worker.profile_versions,
            worker.profile_started,
            worker.profile_tiers,
            strict=True,
        ):
            newer = bisect.bisect_right(versions.get(subscriber_id, []), version)
            if newer == len(versions.get(subscriber_id, [])):
                continue
            staleness = started - committed[subscriber_id][newer]
            if staleness > 0 and (worst is None or staleness > worst["staleness_s"]):
                worst = {
                    "worker": worker.name,
                    "subscriber_id": subscriber_id,
                    "version_read": version,
                    "newer_version": versions[subscriber_id][newer],
                    "staleness_s": staleness,
                    "started_s": started - run.began_at,
                    "tier": TIER_NAMES[tier],
                }
    return worst


def _percentile_ms(ordered: list[float], fraction: float) -> float | None:
    if not ordered:
        return None
    return 1000 * _common.percentile(ordered, fraction)


def _ratio(part: int, whole: int) -> float | None:
    return part / whole if whole else None


# Counters of cache.stats(), summed over every process, for the report.
_COUNTERS = (
    ("remote", "node_downs", "memcached nodes marked down"),
    ("remote", "errors", "memcached command errors"),
    ("remote", "skipped_down", "memcached commands skipped, node down"),
    ("remote", "deletes_queued", "memcached deletes queued for replay"),
    ("invalidations", "channel_losses", "channel losses noticed"),
    ("invalidations", "gaps", "sequence gaps noticed"),
    ("invalidations", "local_flushes", "L1 flushes"),
    ("invalidations", "publish_errors", "invalidation publishes failed"),
    ("leases", "wait_timeouts", "lease waits timed out"),
    ("leases", "stale_fills_dropped", "stale L2 fills dropped"),
    ("local", "dropped_fills", "voided L1 fills"),
)


def _sum_counters(stats: list[dict[str, Any]]) -> dict[str, int]:
    return {
        label: sum(int(s.get(section, {}).get(name, 0)) for s in stats)
        for section, name, label in _COUNTERS
    }


TABLE_HEADERS = (
    "phase",
    "s",
    "served",
    "failed",
    "p50 ms",
    "p99 ms",
    "max ms",
    "origin loads/s",
    "L2 hit %",
    "stale",
    "max stale s",
    "stale past bound",
    "writes",
    "write fails",
)


TABLE_NOTES = (
    "served, failed: reads (get) per phase; a read fails if get raises, returns",
    "  no row, or its email fails to render. Latency is per read.",
    "origin loads/s: reads that missed L1 and L2 and called the loader.",
    "L2 hit %: reads answered by L2 among the reads that missed L1.",
    "stale: profile reads that returned a version older than one whose commit",
    "  returned before the read started; max stale s: the largest such gap.",
    "writes, write fails: editor write-throughs (origin commit, L2 delete,",
    "  invalidation) begun in the phase.",
)


def format_report(report: dict[str, Any]) -> str:
    """Format the report as the header, the schedule and a fixed table."""
    table_rows = [_table_row(row) for row in report["phases"]]
    lines = [
        *report["header"],
        *_settings_lines(report),
        "",
        "schedule (seconds from the start):",
        *(_event_line(event) for event in report["events"]),
        "",
        _common.format_table(TABLE_HEADERS, table_rows),
        "",
        *TABLE_NOTES,
        "",
        f"emails sent: {report['emails_sent']}; "
        f"unsubscribes written: {report['unsubscribes']}",
        *(f"{label}: {value}" for label, value in report["counters"].items()),
        f"channel trusted again in every process at the end: "
        f"{'yes' if report['channel_trusted_at_end'] else 'no'}",
        _worst_stale_line(report["worst_stale_read"]),
    ]
    if report["errors"]:
        lines += ["most frequent failures:", *(f"  {e}" for e in report["errors"])]
    lines += ["", _verdict_line(report)]
    return "\n".join(lines)


def _worst_stale_line(worst: dict[str, Any] | None) -> str:
    if worst is None:
        return "worst stale read: none"
    return (
        f"worst stale read: {worst['staleness_s']:.3f} s, subscriber "
        f"{worst['subscriber_id']} version {worst['version_read']} (newer: "
        f"{worst['newer_version']}) from {worst['tier']}, read by {worst['worker']} "
        f"at {worst['started_s']:.2f} s"
    )


def _event_line(event: dict[str, Any]) -> str:
    line = f"  {event['at']:6.2f}  {event['action']}"
    if event["took"] is not None:
        line += f" (took {event['took']:.3f} s)"
    return line


def _settings_lines(report: dict[str, Any]) -> list[str]:
    return [
        f"run:      {report['workers']} workers and 1 editor "
        f"({report['write_rate']:g} writes/s), {report['duration_s']:g} s, "
        f"{report['subscribers']} subscribers (Zipf {report['zipf_exponent']:g}), "
        f"{MEMCACHED_COUNT} memcached and Redis",
        f"cache:    local_ttl {report['local_ttl_s']:g} s, connect and read "
        f"timeouts {report['timeout_s']:g} s, node_retry_timeout "
        f"{report['node_retry_timeout_s']:g} s",
        f"bound:    a read is stale past the bound if a newer version committed "
        f"more than {report['bound_s']:.2f} s before it started",
    ]


def _table_row(row: dict[str, Any]) -> list[str]:
    return [
        row["phase"],
        f"{row['seconds']:.1f}",
        str(row["served"]),
        str(row["failed"]),
        _format_ms(row["p50_ms"]),
        _format_ms(row["p99_ms"]),
        _format_ms(row["max_ms"]),
        f"{row['origin_loads_per_s']:.0f}",
        "-" if row["l2_hit_ratio"] is None else f"{100 * row['l2_hit_ratio']:.1f}",
        str(row["stale_reads"]),
        f"{row['max_staleness_s']:.3f}",
        str(row["stale_past_bound"]),
        str(row["writes"]),
        str(row["write_failures"]),
    ]


def _format_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _verdict_line(report: dict[str, Any]) -> str:
    if report["passed"]:
        return (
            "result: PASS, no request failed and no read was stale past "
            f"{report['bound_s']:.2f} s"
        )
    return (
        f"result: FAIL, {report['failed']} failed reads and writes, "
        f"{report['stale_past_bound']} reads stale past {report['bound_s']:.2f} s, "
        f"{report['invalid_reads']} reads of a version not committed before they "
        f"ended, {report['version_gaps']} versions missing from the commit log"
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line and fill in the ``--quick`` and ``--bound`` defaults.

    Exits with status 2 and a message naming the invalid value on error.
    """
    parser = build_parser()
    options = parser.parse_args(argv)
    if options.duration is None:
        options.duration = QUICK_DURATION if options.quick else DEFAULT_DURATION
    if options.subscribers is None:
        quick = options.quick
        options.subscribers = QUICK_SUBSCRIBERS if quick else DEFAULT_SUBSCRIBERS
    if options.bound is None:
        options.bound = options.local_ttl + STALENESS_MARGIN

    if options.workers < 1:
        parser.error(f"invalid --workers {options.workers}: expected at least 1")
    if options.subscribers < 1:
        parser.error(
            f"invalid --subscribers {options.subscribers}: expected at least 1"
        )
    if not options.zipf >= 0:
        parser.error(f"invalid --zipf {options.zipf}: expected 0 or more")
    return options


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of the command line; see :func:`parse_args`."""
    parser = argparse.ArgumentParser(
        description=(
            "Send the demo's campaign through tiercache with worker processes "
            "while memcached nodes and Redis are killed, frozen and restarted, "
            "and report failures, latency and staleness per phase."
        )
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"run {QUICK_DURATION:g} s with {QUICK_SUBSCRIBERS} subscribers, "
        "unless --duration or --subscribers sets them",
    )
    parser.add_argument(
        "--duration", type=_positive, help=f"seconds (default {DEFAULT_DURATION:g})"
    )
    parser.add_argument(
        "--workers", type=int, default=4, help="worker processes (default 4)"
    )
    parser.add_argument(
        "--subscribers",
        type=int,
        help=f"subscribers in the data set (default {DEFAULT_SUBSCRIBERS})",
    )
    parser.add_argument(
        "--zipf", type=float, default=1.0, help="Zipf exponent (default 1.0)"
    )
    parser.add_argument(
        "--write-rate",
        type=_positive,
        default=30.0,
        help="editor write-throughs per second (default 30)",
    )
    parser.add_argument(
        "--local-ttl",
        type=_positive,
        default=DEFAULT_LOCAL_TTL,
        help=f"local_ttl in seconds (default {DEFAULT_LOCAL_TTL:g})",
    )
    parser.add_argument(
        "--bound",
        type=_positive,
        help="staleness allowed, in seconds (default local_ttl + "
        f"{STALENESS_MARGIN:.1f}: three memcached commands that each wait a "
        "connect and a read timeout)",
    )
    parser.add_argument(
        "--all-down",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="include the phase with every memcached down (default on)",
    )
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    parser.add_argument(
        "--json", action="store_true", help="print the report as JSON, not a table"
    )
    return parser


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(
            f"invalid value {text!r}: expected a positive number"
        )
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Run the campaign under faults and print its report.

    :returns: 0 if it passed, 1 if a request failed or a read was stale past
        the bound, 2 if the run could not be carried out.
    """
    options = parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        report = run_chaos(options)
    except (RunFailedError, ServerNotInstalledError, TimeoutError, OSError) as exc:
        print(f"the chaos run could not be carried out: {exc}", file=sys.stderr)
        return 2
    if options.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
