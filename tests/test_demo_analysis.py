"""Tests of the demo's staleness measurement and percentiles."""

from __future__ import annotations

import pytest

from tiercache.demo.analysis import measure_staleness, percentile
from tiercache.demo.workers import WorkerResult, WriteRecord

BOUND = 1.0


def unsubscribe(subscriber_id: int, version: int, at: float) -> WriteRecord:
    return WriteRecord(
        subscriber_id, version, "unsubscribed", "unsubscribe", at, at + 0.001
    )


def edit(subscriber_id: int, version: int, at: float) -> WriteRecord:
    return WriteRecord(subscriber_id, version, "subscribed", "edit", at, at + 0.001)


def worker(*reads: tuple[int, int, float, bool]) -> WorkerResult:
    result = WorkerResult("worker-0")
    for subscriber_id, version, at, is_sent in reads:
        result.profile_ids.append(subscriber_id)
        result.profile_versions.append(version)
        result.profile_times.append(at)
        result.profile_sent.append(is_sent)
    return result


def test_staleness_none_without_writes() -> None:
    staleness = measure_staleness([], [worker((1, 1, 10.0, True))], bound=BOUND)

    assert staleness.unsubscribes == 0
    assert staleness.unsubscribe_max == 0.0
    assert staleness.stale_sends_past_bound == []


def test_staleness_read_before_write_is_fresh() -> None:
    writes = [unsubscribe(1, 2, at=100.0)]
    reads = worker((1, 1, 99.9, True), (1, 2, 100.5, False))

    staleness = measure_staleness(writes, [reads], bound=BOUND)

    assert staleness.unsubscribes == 1
    assert staleness.unsubscribes_with_stale_reads == 0
    assert staleness.unsubscribe_max == 0.0


def test_staleness_within_bound() -> None:
    writes = [unsubscribe(1, 2, at=100.0)]
    reads = worker((1, 1, 100.2, True), (1, 1, 100.4, True), (1, 2, 100.5, False))

    staleness = measure_staleness(writes, [reads], bound=BOUND)

    assert staleness.unsubscribes_with_stale_reads == 1
    assert staleness.unsubscribe_max == pytest.approx(0.4)
    assert staleness.stale_sends_past_bound == []


def test_staleness_send_past_bound() -> None:
    writes = [unsubscribe(7, 4, at=100.0)]
    reads = worker((7, 3, 101.5, True), (7, 3, 102.0, False))

    staleness = measure_staleness(writes, [reads], bound=BOUND)

    assert len(staleness.stale_sends_past_bound) == 1
    stale = staleness.stale_sends_past_bound[0]
    assert stale.subscriber_id == 7
    assert stale.version_read == 3
    assert stale.unsubscribe_version == 4
    assert stale.delay == pytest.approx(1.5)
    assert staleness.unsubscribe_max == pytest.approx(2.0)


def test_staleness_old_version_after_resubscribe_counts() -> None:
    writes = [
        unsubscribe(2, 2, at=100.0),
        WriteRecord(2, 3, "subscribed", "resubscribe", 101.0, 101.001),
    ]
    reads = worker((2, 1, 103.0, True), (2, 3, 103.0, True))

    staleness = measure_staleness(writes, [reads], bound=BOUND)

    assert len(staleness.stale_sends_past_bound) == 1
    assert staleness.stale_sends_past_bound[0].version_read == 1


def test_staleness_edits_are_not_stale_sends() -> None:
    writes = [edit(3, 2, at=100.0)]
    reads = worker((3, 1, 105.0, True))

    staleness = measure_staleness(writes, [reads], bound=BOUND)

    assert staleness.stale_sends_past_bound == []
    assert staleness.write_max == pytest.approx(5.0)
    assert staleness.unsubscribe_max == 0.0


def test_staleness_across_workers() -> None:
    writes = [unsubscribe(1, 2, at=100.0), unsubscribe(5, 2, at=200.0)]
    first = worker((1, 1, 100.1, True))
    second = worker((5, 1, 200.3, True))

    staleness = measure_staleness(writes, [first, second], bound=BOUND)

    assert staleness.unsubscribes_with_stale_reads == 2
    assert staleness.unsubscribe_max == pytest.approx(0.3)
    assert staleness.unsubscribe_p99 == pytest.approx(0.3)


def test_percentile_nearest_rank() -> None:
    values = [float(value) for value in range(1, 101)]

    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([3.0], 99) == 3.0
    assert percentile([], 99) == 0.0
