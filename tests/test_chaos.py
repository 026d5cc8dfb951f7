"""Tests of the chaos run in benchmarks/chaos.py.

The end-to-end tests share one ``--quick`` run: 15 s of the demo's campaign
with four workers and the editor, against three real memcached servers and
Redis. During the run one node is killed, another is frozen, Redis restarts
and every node goes down. With setup the run took 26 s on a 2-CPU VM.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
PHASE_NAMES = [
    "warm-up",
    "baseline",
    "node killed",
    "node restarted",
    "node frozen",
    "node thawed",
    "redis restarted",
    "all nodes down",
    "all nodes restarted",
    "recovered",
]
FAULT_ACTIONS = [
    "SIGKILL memcached",
    "restart memcached",
    "SIGSTOP memcached",
    "SIGCONT memcached",
    "restart Redis",
    "SIGKILL every memcached",
    "restart every memcached",
]


def load_chaos() -> ModuleType:
    """Import benchmarks/chaos.py, a script that imports its sibling modules.

    The benchmarks directory stays on ``sys.path``: the worker processes are
    spawned, and they import ``chaos`` again by name.
    """
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module("chaos")


@pytest.fixture(scope="module")
def chaos() -> ModuleType:
    return load_chaos()


@pytest.fixture(scope="module")
def quick_run(chaos: ModuleType) -> tuple[int, dict[str, Any]]:
    """Run ``chaos.py --quick --json`` once; return its exit code and report."""
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        code = chaos.main(["--quick", "--json"])
    assert code != 2, "the chaos run could not be carried out; see the log above"
    return code, json.loads(output.getvalue())


def phase(report: dict[str, Any], name: str) -> dict[str, Any]:
    return next(row for row in report["phases"] if row["phase"] == name)


@pytest.mark.slow
def test_chaos_passes(quick_run: tuple[int, dict[str, Any]]) -> None:
    code, report = quick_run

    assert code == 0, report
    assert report["passed"] is True


@pytest.mark.slow
def test_chaos_no_request_failed(quick_run: tuple[int, dict[str, Any]]) -> None:
    _, report = quick_run

    assert report["failed"] == 0, report["errors"]
    for row in report["phases"]:
        assert row["failed"] == 0, row
        assert row["write_failures"] == 0, row


@pytest.mark.slow
def test_chaos_no_read_stale_past_bound(
    quick_run: tuple[int, dict[str, Any]],
) -> None:
    _, report = quick_run

    assert report["stale_past_bound"] == 0, report["phases"]
    assert report["invalid_reads"] == 0, report["phases"]
    for row in report["phases"]:
        assert row["max_staleness_s"] <= report["bound_s"], row


@pytest.mark.slow
def test_chaos_every_phase_served(quick_run: tuple[int, dict[str, Any]]) -> None:
    _, report = quick_run

    assert [row["phase"] for row in report["phases"]] == PHASE_NAMES
    for row in report["phases"]:
        assert row["served"] > 0, row
        assert row["profile_reads"] > 0, row
        assert row["writes"] > 0, row


@pytest.mark.slow
def test_chaos_every_fault_injected(quick_run: tuple[int, dict[str, Any]]) -> None:
    _, report = quick_run
    actions = [event["action"] for event in report["events"]]

    for fault in FAULT_ACTIONS:
        assert any(action.startswith(fault) for action in actions), actions


@pytest.mark.slow
def test_chaos_faults_reached_caches(quick_run: tuple[int, dict[str, Any]]) -> None:
    _, report = quick_run
    counters = report["counters"]

    # One node killed, one frozen, then all three down: each marks a node
    # down in at least one process.
    assert counters["memcached nodes marked down"] >= 3, counters
    assert counters["channel losses noticed"] >= 1, counters
    assert counters["memcached deletes queued for replay"] >= 1, counters
    all_down = phase(report, "all nodes down")["l2_hit_ratio"]
    assert all_down < phase(report, "baseline")["l2_hit_ratio"], report["phases"]


@pytest.mark.slow
def test_chaos_recovers(quick_run: tuple[int, dict[str, Any]]) -> None:
    _, report = quick_run
    recovered = phase(report, "recovered")

    assert report["channel_trusted_at_end"] is True
    assert recovered["l1_hit_ratio"] > 0, recovered
    assert recovered["l2_hit_ratio"] > 0, recovered


@pytest.mark.slow
def test_chaos_table_lists_phases(
    chaos: ModuleType, quick_run: tuple[int, dict[str, Any]]
) -> None:
    _, report = quick_run

    table = chaos.format_report(report)

    assert "| phase" in table
    for name in PHASE_NAMES:
        assert f"| {name}" in table
    assert table.rstrip().endswith(f"no read was stale past {report['bound_s']:.2f} s")


@pytest.mark.parametrize(
    "options",
    [
        ["--duration", "0"],
        ["--duration", "nan"],
        ["--workers", "0"],
        ["--write-rate", "-1"],
        ["--bound", "inf"],
    ],
)
def test_chaos_rejects_invalid_option(
    chaos: ModuleType, options: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        chaos.main(options)

    assert exit_info.value.code == 2
    assert "invalid" in capsys.readouterr().err
