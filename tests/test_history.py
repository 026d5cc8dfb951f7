"""Tests of the cross-process history checker in benchmarks/history_check.py.

The end-to-end tests run the checker's ``main`` for 3 seconds with four
worker processes against a real memcached and Redis; each takes about 6 s.
The others feed ``check_history`` hand-made histories.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

CHECKER_PATH = (
    Path(__file__).resolve().parent.parent / "benchmarks" / "history_check.py"
)

# These runs checked about 2,500 reads and 350 writes per second on a 2-vCPU
# VM. The minimums are far lower, so that a slower machine passes but a run
# that barely did anything fails.
MIN_READS = 1000
MIN_WRITES = 100
RUN_SECONDS = "3"


def load_checker() -> ModuleType:
    """Import benchmarks/history_check.py, which is a script, not a package."""
    spec = importlib.util.spec_from_file_location("history_check", CHECKER_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses looks the module up in sys.modules while it builds a class.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def checker() -> ModuleType:
    return load_checker()


def run_checker(
    checker: ModuleType, capsys: pytest.CaptureFixture[str], *options: str
) -> tuple[int, dict[str, Any]]:
    code = checker.main(["--duration", RUN_SECONDS, "--json", *options])
    report = json.loads(capsys.readouterr().out)
    return code, report


def assert_consistent(code: int, report: dict[str, Any]) -> None:
    assert report["stale_reads_past_bound"] == 0, report
    assert report["invalid_reads"] == 0, report
    assert report["version_gaps"] == 0, report
    assert report["reads_checked"] > MIN_READS, report
    assert report["writes_committed"] > MIN_WRITES, report
    # Without L1 hits no read could be stale, and the check would prove nothing.
    assert report["local_hits"] > 0, report
    assert report["passed"] is True
    assert code == 0


def test_history_clean(checker: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    code, report = run_checker(checker, capsys)
    assert_consistent(code, report)
    assert report["mode"] == "clean"
    assert report["processes"] == 4
    assert report["messages_dropped"] == 0
    assert report["channel_losses"] == 0


def test_history_dropped_messages(
    checker: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    code, report = run_checker(checker, capsys, "--drop-rate", "0.05")
    assert_consistent(code, report)
    assert report["messages_dropped"] > 0
    # Receivers notice lost messages by the senders' sequence numbers.
    assert report["sequence_gaps"] > 0


def test_history_redis_restarted(
    checker: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    code, report = run_checker(checker, capsys, "--restart-redis-at", "1.5")
    assert_consistent(code, report)
    assert report["redis_restart"] is not None
    # Every worker's subscription was lost and reported.
    assert report["channel_losses"] >= report["processes"]


def test_main_exits_1_past_bound(
    checker: ModuleType,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def run_check(options: Any) -> dict[str, Any]:
        return {"stale_reads_past_bound": 1, "passed": False}

    monkeypatch.setattr(checker, "run_check", run_check)
    assert checker.main(["--json"]) == 1
    assert json.loads(capsys.readouterr().out)["passed"] is False


@pytest.mark.parametrize(
    "options",
    [
        ["--processes", "1"],
        ["--duration", "0"],
        ["--drop-rate", "1"],
        ["--restart-redis-at", "10", "--duration", "5"],
    ],
)
def test_main_rejects_invalid_option(
    checker: ModuleType, capsys: pytest.CaptureFixture[str], options: list[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        checker.main(options)
    assert exit_info.value.code == 2
    assert "invalid" in capsys.readouterr().err


# -- check_history on hand-made histories -------------------------------------


def test_check_fresh_read_not_stale(checker: ModuleType) -> None:
    writes = [("a", 0, 0.0, 1.0), ("a", 1, 5.0, 6.0)]
    reads = [("a", 0, 2.0, 2.1), ("a", 1, 7.0, 7.1), ("a", 0, 5.5, 6.5)]
    figures = checker.check_history(writes, reads, bound=1.0)
    assert figures.reads_checked == 3
    assert figures.stale_within_bound == 0
    assert figures.stale_past_bound == 0
    assert figures.max_staleness == 0.0


def test_check_staleness_from_read_start(checker: ModuleType) -> None:
    writes = [("a", 0, 0.0, 1.0), ("a", 1, 5.0, 6.0)]
    reads = [("a", 0, 6.5, 9.0), ("a", 0, 8.0, 8.1)]
    figures = checker.check_history(writes, reads, bound=1.0)
    assert figures.stale_within_bound == 1
    assert figures.stale_past_bound == 1
    assert figures.max_staleness == pytest.approx(2.0)


def test_check_earliest_newer_commit(checker: ModuleType) -> None:
    # Version 2's commit returned before version 1's logged time, so version
    # 1 must have committed by then too.
    writes = [("a", 0, 0.0, 1.0), ("a", 1, 2.0, 9.0), ("a", 2, 2.5, 3.0)]
    figures = checker.check_history(writes, [("a", 0, 4.0, 4.1)], bound=10.0)
    assert figures.stale_within_bound == 1
    assert figures.max_staleness == pytest.approx(1.0)


def test_check_invalid_reads(checker: ModuleType) -> None:
    writes = [("a", 0, 0.0, 1.0), ("a", 1, 5.0, 6.0)]
    reads = [
        ("a", 2, 7.0, 7.1),  # no such version
        ("a", -1, 7.0, 7.1),  # the key was missing
        ("b", 0, 7.0, 7.1),  # no such key
        ("a", 1, 3.0, 4.0),  # ended before version 1's write began
    ]
    figures = checker.check_history(writes, reads, bound=1.0)
    assert figures.invalid_reads == 4
    assert figures.stale_within_bound == 0


def test_check_version_gaps(checker: ModuleType) -> None:
    writes = [("a", 0, 0.0, 1.0), ("a", 2, 2.0, 3.0), ("b", 0, 0.0, 1.0)]
    writes.append(("b", 0, 0.0, 1.0))
    # Reads are still judged by version, not by position in the log.
    reads = [("a", 1, 5.0, 5.1), ("a", 0, 3.5, 3.6), ("a", 2, 5.0, 5.1)]
    figures = checker.check_history(writes, reads, bound=1.0)
    assert figures.version_gaps == 2
    assert figures.writes_committed == 4
    assert figures.invalid_reads == 1
    assert figures.stale_within_bound == 1
    assert figures.max_staleness == pytest.approx(0.5)


def test_check_p99_nearest_rank(checker: ModuleType) -> None:
    writes = [("a", 0, 0.0, 0.0), ("a", 1, 0.0, 10.0)]
    reads = [("a", 0, 10.0 + n / 100, 20.0) for n in range(1, 201)]
    figures = checker.check_history(writes, reads, bound=5.0)
    assert figures.stale_within_bound == 200
    assert figures.p99_staleness == pytest.approx(1.98)
    assert figures.max_staleness == pytest.approx(2.0)
