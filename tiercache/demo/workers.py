"""The processes of one send: sender workers that render emails, and the editor.

Each process builds its own :class:`~tiercache.demo.origin.CampaignOrigin`
connection and, in a cached run, its own :class:`~tiercache.TieredCache`
after it starts, so no socket or SQLite handle crosses a process boundary.
Processes report on a shared queue with ``(kind, name, payload)`` tuples:
``("ready", name, None)`` when set up, then ``("result", name, result)`` or
``("failed", name, traceback_text)``.
"""

from __future__ import annotations

import logging
import random
import signal
import time
import traceback
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tiercache import MISSING, Settings, TieredCache
from tiercache.demo.campaign import render_email
from tiercache.demo.data import FIRST_NAMES
from tiercache.demo.origin import CampaignOrigin, OriginCounters
from tiercache.demo.zipf import ZipfSampler, rank_subscribers

logger = logging.getLogger(__name__)

CACHED = "cached"
ORIGIN_ONLY = "origin only"
# Seconds a cached process waits for its invalidation subscription before it
# reports failure. Until the subscription is up, reads bypass L1.
SUBSCRIBE_TIMEOUT = 10.0
# Sends between two updates of the shared progress counter.
PROGRESS_EVERY = 64
# Shares of editor writes that flip the subscription status. The other
# writes edit profile fields.
UNSUBSCRIBE_SHARE = 0.5
RESUBSCRIBE_SHARE = 0.5


class _Queue(Protocol):
    def put(self, item: Any) -> None: ...


class _Event(Protocol):
    def wait(self, timeout: float | None = None) -> bool: ...


class _StartTime(Protocol):
    value: float


class _Counters(Protocol):
    def __setitem__(self, index: int, value: int) -> None: ...


@dataclass(frozen=True, slots=True)
class RunSpec:
    """Settings of one send for every process of it, picklable for spawning."""

    mode: str
    """:data:`CACHED` or :data:`ORIGIN_ONLY`."""
    database: Path
    subscriber_count: int
    zipf_exponent: float
    seed: int
    duration: float
    """Seconds of sending, from the common start time."""
    write_rate: float
    """Editor writes per second. At 0 the editor writes nothing."""
    year: int
    """Value of ``*|CURRENT_YEAR|*``."""
    cache_overrides: dict[str, Any] = field(default_factory=dict)
    """Keyword overrides for :meth:`tiercache.Settings.from_env`."""


@dataclass(slots=True)
class WorkerResult:
    """Measurements of one sender worker.

    ``profile_*`` arrays have one entry per profile read, in order: the
    subscriber id, the profile version read, the wall-clock time after the
    email was rendered or skipped, and whether an email was sent.
    """

    name: str
    sends: int = 0
    skipped_unsubscribed: int = 0
    missing_rows: int = 0
    rendered_bytes: int = 0
    elapsed: float = 0.0
    read_latencies_us: array[float] = field(default_factory=lambda: array("d"))
    profile_ids: array[int] = field(default_factory=lambda: array("q"))
    profile_versions: array[int] = field(default_factory=lambda: array("q"))
    profile_times: array[float] = field(default_factory=lambda: array("d"))
    profile_sent: array[int] = field(default_factory=lambda: array("b"))
    cache_stats: dict[str, Any] | None = None
    origin_counters: OriginCounters = field(default_factory=OriginCounters)


@dataclass(frozen=True, slots=True)
class WriteRecord:
    """One write-through of the editor.

    ``started_at`` is the wall-clock time just before the write began, which
    is no later than the origin commit, so staleness measured from it is an
    upper bound. ``finished_at`` is the time after the write returned.
    """

    subscriber_id: int
    version: int
    status: str
    kind: str
    """``"unsubscribe"``, ``"resubscribe"`` or ``"edit"``."""
    started_at: float
    finished_at: float


@dataclass(slots=True)
class EditorResult:
    """Write log of the editor."""

    name: str
    writes: list[WriteRecord] = field(default_factory=list)
    cache_stats: dict[str, Any] | None = None
    origin_counters: OriginCounters = field(default_factory=OriginCounters)


def run_worker(
    name: str,
    index: int,
    spec: RunSpec,
    start: _Event,
    start_time: _StartTime,
    progress: _Counters,
    results: _Queue,
) -> None:
    """Render emails until the run's deadline, then put a :class:`WorkerResult`.

    The entry point of a sender process.
    """
    _run_process(
        name,
        results,
        lambda: _send(name, index, spec, start, start_time, progress, results),
    )


def run_editor(
    name: str,
    index: int,
    spec: RunSpec,
    start: _Event,
    start_time: _StartTime,
    progress: _Counters,
    results: _Queue,
) -> None:
    """Write profile edits at ``spec.write_rate`` until the deadline.

    The entry point of the editor process; puts an :class:`EditorResult`.
    """
    _run_process(
        name,
        results,
        lambda: _edit(name, index, spec, start, start_time, progress, results),
    )


def _run_process(name: str, results: _Queue, body: Any) -> None:
    # Ctrl-C reaches the whole process group, and the main process handles it
    # by terminating this one. The runner already starts spawned processes
    # with SIGINT ignored, and this line covers processes started otherwise.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        results.put(("result", name, body()))
    except BaseException:
        results.put(("failed", name, traceback.format_exc()))


def _open(spec: RunSpec) -> tuple[CampaignOrigin, TieredCache | None]:
    origin = CampaignOrigin(spec.database)
    if spec.mode != CACHED:
        return origin, None
    cache = TieredCache(Settings.from_env(**spec.cache_overrides), origin=origin)
    deadline = time.monotonic() + SUBSCRIBE_TIMEOUT
    while not cache.stats()["invalidations"]["trusted"]:
        if time.monotonic() > deadline:
            cache.close()
            channel_url = spec.cache_overrides.get("channel_url")
            raise TimeoutError(
                f"no invalidation subscription on {channel_url} after "
                f"{SUBSCRIBE_TIMEOUT:.0f} s; check that the channel is reachable"
            )
        time.sleep(0.01)
    return origin, cache


def _wait_for_start(
    name: str, start: _Event, start_time: _StartTime, results: _Queue, duration: float
) -> float:
    results.put(("ready", name, None))
    start.wait()
    return start_time.value + duration


def _send(
    name: str,
    index: int,
    spec: RunSpec,
    start: _Event,
    start_time: _StartTime,
    progress: _Counters,
    results: _Queue,
) -> WorkerResult:
    origin, cache = _open(spec)
    try:
        read = cache.get if cache is not None else origin.load
        campaigns = origin.load_campaigns()
        ranking = rank_subscribers(spec.subscriber_count, spec.seed)
        rng = random.Random(f"worker-{spec.seed}-{index}")
        sampler = ZipfSampler(len(ranking), spec.zipf_exponent, rng=rng)
        result = WorkerResult(name)
        deadline = _wait_for_start(name, start, start_time, results, spec.duration)
        began = time.perf_counter()
        _send_until(
            deadline,
            spec,
            read,
            campaigns,
            ranking,
            sampler,
            rng,
            result,
            progress,
            index,
        )
        result.elapsed = time.perf_counter() - began
        result.cache_stats = cache.stats() if cache is not None else None
        result.origin_counters = origin.counters
        return result
    finally:
        if cache is not None:
            cache.close()
        origin.close()


def _send_until(
    deadline: float,
    spec: RunSpec,
    read: Any,
    campaigns: list[Any],
    ranking: list[int],
    sampler: ZipfSampler,
    rng: random.Random,
    result: WorkerResult,
    progress: _Counters,
    index: int,
) -> None:
    """Pick a subscriber and a campaign, read three keys, render or skip, record.

    Repeat until ``deadline`` (wall-clock seconds).
    """
    perf_counter = time.perf_counter
    wall_clock = time.time
    latencies = result.read_latencies_us
    iterations = 0
    while True:
        campaign = campaigns[rng.randrange(len(campaigns))]
        subscriber_id = ranking[sampler.sample()]
        t0 = perf_counter()
        profile = read(f"subscriber:{subscriber_id}")
        t1 = perf_counter()
        template = read(campaign.template_key)
        t2 = perf_counter()
        segment = read(campaign.segment_key)
        t3 = perf_counter()
        latencies.append((t1 - t0) * 1e6)
        latencies.append((t2 - t1) * 1e6)
        latencies.append((t3 - t2) * 1e6)

        if profile is MISSING or template is MISSING or segment is MISSING:
            result.missing_rows += 1
            is_sent = False
        elif profile["status"] == "unsubscribed":
            result.skipped_unsubscribed += 1
            is_sent = False
        else:
            body = render_email(template, profile, campaign, segment, year=spec.year)
            result.rendered_bytes += len(body)
            result.sends += 1
            is_sent = True

        now = wall_clock()
        if profile is not MISSING:
            result.profile_ids.append(subscriber_id)
            result.profile_versions.append(profile["version"])
            result.profile_times.append(now)
            result.profile_sent.append(is_sent)
        iterations += 1
        if iterations % PROGRESS_EVERY == 0:
            progress[index] = result.sends
        if now >= deadline:
            progress[index] = result.sends
            return


def _edit(
    name: str,
    index: int,
    spec: RunSpec,
    start: _Event,
    start_time: _StartTime,
    progress: _Counters,
    results: _Queue,
) -> EditorResult:
    origin, cache = _open(spec)
    try:
        write = cache.set if cache is not None else origin.store
        ranking = rank_subscribers(spec.subscriber_count, spec.seed)
        rng = random.Random(f"editor-{spec.seed}")
        sampler = ZipfSampler(len(ranking), spec.zipf_exponent, rng=rng)
        result = EditorResult(name)
        deadline = _wait_for_start(name, start, start_time, results, spec.duration)
        if spec.write_rate > 0:
            first = start_time.value
            interval = 1.0 / spec.write_rate
            while True:
                due = first + len(result.writes) * interval
                if due >= deadline:
                    break
                time.sleep(max(0.0, due - time.time()))
                subscriber_id = ranking[sampler.sample()]
                record = _write_once(subscriber_id, origin, write, rng)
                if record is not None:
                    result.writes.append(record)
                    progress[index] = len(result.writes)
        result.cache_stats = cache.stats() if cache is not None else None
        result.origin_counters = origin.counters
        return result
    finally:
        if cache is not None:
            cache.close()
        origin.close()


def _write_once(
    subscriber_id: int, origin: CampaignOrigin, write: Any, rng: random.Random
) -> WriteRecord | None:
    """Read the profile from the origin, change it and write it through.

    The editor is the only writer during a run, so the origin's version
    after the write is the version read plus one.
    """
    key = f"subscriber:{subscriber_id}"
    profile = origin.load(key)
    if profile is MISSING:
        logger.warning("editor found no row for %s; skipped", key)
        return None
    changed, kind = _change_profile(profile, rng)
    started_at = time.time()
    write(key, changed)
    finished_at = time.time()
    return WriteRecord(
        subscriber_id=subscriber_id,
        version=profile["version"] + 1,
        status=changed["status"],
        kind=kind,
        started_at=started_at,
        finished_at=finished_at,
    )


def _change_profile(
    profile: dict[str, Any], rng: random.Random
) -> tuple[dict[str, Any], str]:
    changed = dict(profile)
    if profile["status"] == "subscribed" and rng.random() < UNSUBSCRIBE_SHARE:
        changed["status"] = "unsubscribed"
        return changed, "unsubscribe"
    if profile["status"] == "unsubscribed" and rng.random() < RESUBSCRIBE_SHARE:
        changed["status"] = "subscribed"
        return changed, "resubscribe"
    fields = dict(profile.get("fields") or {})
    preferences = dict(profile.get("preferences") or {})
    choice = rng.randrange(3)
    if choice == 0:
        points = int(fields.get("POINTS", "0")) + rng.randint(10, 500)
        fields["POINTS"] = str(points)
    elif choice == 1:
        preferences["frequency"] = rng.choice(("daily", "weekly", "monthly"))
    else:
        changed["first_name"] = rng.choice(FIRST_NAMES)
    changed["fields"] = fields
    changed["preferences"] = preferences
    return changed, "edit"
