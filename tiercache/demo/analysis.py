"""Figures of one send: throughput, tier hits, read latency and observed staleness.

Staleness is measured from the editor's write log and the workers' profile
reads. A read of subscriber ``s`` at time ``t`` that returned version ``v``
is stale with respect to a write of ``s`` to a version above ``v`` that
started before ``t``, and its delay is ``t`` minus the write's start. The
write starts no later than the origin commits, and ``t`` is taken after the
email was rendered, so every delay here is an upper bound of the real one.
All times come from ``time.time()``, the wall clock that the processes on
one machine share.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from tiercache.demo.runner import RunResult
from tiercache.demo.workers import WorkerResult, WriteRecord


@dataclass(frozen=True, slots=True)
class StaleSend:
    """An email rendered from a profile older than a committed unsubscribe."""

    subscriber_id: int
    version_read: int
    unsubscribe_version: int
    delay: float
    """Seconds from the unsubscribe's start to the render."""


@dataclass(frozen=True, slots=True)
class Staleness:
    """Observed staleness of one send.

    For each write, the staleness is the delay from the write's start to the
    last read that still returned an older version, or 0 if there was none.
    """

    unsubscribes: int
    unsubscribes_with_stale_reads: int
    unsubscribe_max: float
    """Seconds, maximum over unsubscribes."""
    unsubscribe_p99: float
    """Seconds, 99th percentile over unsubscribes."""
    write_max: float
    """Seconds, maximum over all writes."""
    write_p99: float
    """Seconds, 99th percentile over all writes."""
    bound: float
    stale_sends_past_bound: list[StaleSend]
    """Sends from a profile older than an unsubscribe that started more than
    ``bound`` seconds before the render."""


@dataclass(frozen=True, slots=True)
class RunFigures:
    """The figures of one send that the report prints."""

    mode: str
    elapsed: float
    load_average: float
    sends: int
    skipped_unsubscribed: int
    missing_rows: int
    reads: int
    local_hits: int | None
    remote_hits: int | None
    remote_errors: int | None
    origin_loads: int
    """Keys loaded from the origin by the workers."""
    read_p50_us: float
    read_p99_us: float
    writes: int
    unsubscribes: int
    invalidations_sent: int | None
    invalidations_received: int | None
    invalidation_delay_max: float | None
    stale_fills_dropped: int | None
    staleness: Staleness

    @property
    def throughput(self) -> float:
        """Emails sent per second."""
        return self.sends / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def origin_loads_per_1000_reads(self) -> float:
        """Origin loads per 1000 reads."""
        return 1000.0 * self.origin_loads / self.reads if self.reads else 0.0


def summarize_run(run: RunResult, *, staleness_bound: float) -> RunFigures:
    """Return the figures of ``run``."""
    workers = run.workers
    latencies = sorted(
        value for worker in workers for value in worker.read_latencies_us
    )
    worker_stats = [worker.cache_stats for worker in workers if worker.cache_stats]
    editor_stats = run.editor.cache_stats
    all_stats = worker_stats + ([editor_stats] if editor_stats else [])
    is_cached = bool(worker_stats)
    return RunFigures(
        mode=run.spec.mode,
        elapsed=run.elapsed,
        load_average=run.load_average,
        sends=sum(worker.sends for worker in workers),
        skipped_unsubscribed=sum(worker.skipped_unsubscribed for worker in workers),
        missing_rows=sum(worker.missing_rows for worker in workers),
        reads=len(latencies),
        local_hits=_sum_stat(worker_stats, "local", "hits") if is_cached else None,
        remote_hits=_sum_stat(worker_stats, "remote", "hits") if is_cached else None,
        remote_errors=(
            _sum_stat(worker_stats, "remote", "errors") if is_cached else None
        ),
        origin_loads=sum(worker.origin_counters.loads for worker in workers),
        read_p50_us=percentile(latencies, 50),
        read_p99_us=percentile(latencies, 99),
        writes=len(run.editor.writes),
        unsubscribes=sum(
            1 for write in run.editor.writes if write.kind == "unsubscribe"
        ),
        invalidations_sent=(
            _sum_stat(all_stats, "invalidations", "sent") if is_cached else None
        ),
        invalidations_received=(
            _sum_stat(all_stats, "invalidations", "received") if is_cached else None
        ),
        invalidation_delay_max=(
            max(stats["invalidations"]["delay"]["max"] for stats in all_stats)
            if is_cached
            else None
        ),
        stale_fills_dropped=(
            _sum_stat(worker_stats, "leases", "stale_fills_dropped")
            if is_cached
            else None
        ),
        staleness=measure_staleness(run.editor.writes, workers, bound=staleness_bound),
    )


def measure_staleness(
    writes: Sequence[WriteRecord], workers: Iterable[WorkerResult], *, bound: float
) -> Staleness:
    """Match every profile read against the writes it missed.

    See the module docstring for the definitions.
    """
    writes_by_subscriber: dict[int, list[WriteRecord]] = {}
    for write in sorted(writes, key=lambda record: record.version):
        writes_by_subscriber.setdefault(write.subscriber_id, []).append(write)
    versions_by_subscriber = {
        subscriber_id: [write.version for write in records]
        for subscriber_id, records in writes_by_subscriber.items()
    }
    last_stale_delay: dict[tuple[int, int], float] = {}
    past_bound: list[StaleSend] = []

    for worker in workers:
        for subscriber_id, version, read_at, is_sent in zip(
            worker.profile_ids,
            worker.profile_versions,
            worker.profile_times,
            worker.profile_sent,
            strict=True,
        ):
            records = writes_by_subscriber.get(subscriber_id)
            if records is None:
                continue
            first_newer = bisect.bisect_right(
                versions_by_subscriber[subscriber_id], version
            )
            stale_send: StaleSend | None = None
            for write in records[first_newer:]:
                # Writes of one subscriber start in version order, so the
                # first one that started after this read ends the search.
                if write.started_at >= read_at:
                    break
                delay = read_at - write.started_at
                write_key = (subscriber_id, write.version)
                last_stale_delay[write_key] = max(
                    last_stale_delay.get(write_key, 0.0), delay
                )
                if (
                    is_sent
                    and write.kind == "unsubscribe"
                    and delay > bound
                    and stale_send is None
                ):
                    stale_send = StaleSend(subscriber_id, version, write.version, delay)
            if stale_send is not None:
                past_bound.append(stale_send)

    unsubscribe_delays = [
        last_stale_delay.get((write.subscriber_id, write.version), 0.0)
        for write in writes
        if write.kind == "unsubscribe"
    ]
    write_delays = [
        last_stale_delay.get((write.subscriber_id, write.version), 0.0)
        for write in writes
    ]
    return Staleness(
        unsubscribes=len(unsubscribe_delays),
        unsubscribes_with_stale_reads=sum(
            1 for delay in unsubscribe_delays if delay > 0
        ),
        unsubscribe_max=max(unsubscribe_delays, default=0.0),
        unsubscribe_p99=percentile(sorted(unsubscribe_delays), 99),
        write_max=max(write_delays, default=0.0),
        write_p99=percentile(sorted(write_delays), 99),
        bound=bound,
        stale_sends_past_bound=past_bound,
    )


def percentile(sorted_values: Sequence[float], percent: float) -> float:
    """Return the nearest-rank percentile of ``sorted_values``, 0 if it is empty."""
    if not sorted_values:
        return 0.0
    rank = math.ceil(percent / 100.0 * len(sorted_values))
    return sorted_values[max(rank, 1) - 1]


def _sum_stat(snapshots: list[dict[str, Any]], section: str, name: str) -> int:
    return sum(int(snapshot.get(section, {}).get(name, 0)) for snapshot in snapshots)
