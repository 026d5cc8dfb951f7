"""Tests of the demo's command line, from option checks to a full run."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import pytest

from tiercache.demo import __main__ as demo_main
from tiercache.demo.__main__ import main
from tiercache.demo.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, build_parser
from tiercache.testing import ServerNotInstalledError

SMALL_RUN = ["--subscribers", "2000", "--workers", "2", "--duration", "2", "--quiet"]


def report_value(output: str, label: str) -> list[str]:
    """Return the two value columns of the report row ``label``."""
    pattern = rf"^\s*{re.escape(label)}\s+(\S+)\s+(\S+)$"
    match = re.search(pattern, output, re.MULTILINE)
    assert match is not None, f"no row {label!r} in:\n{output}"
    return [match.group(1), match.group(2)]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--subscribers", "0"], "argument --subscribers: invalid value 0"),
        (["--workers", "many"], "argument --workers: invalid value 'many'"),
        (["--duration", "-1"], "argument --duration: invalid value '-1'"),
        (["--zipf", "nan"], "argument --zipf: invalid value 'nan'"),
        (["--write-rate", "1e9"], "argument --write-rate: invalid value '1e9'"),
        (["--staleness-bound", "0"], "argument --staleness-bound: invalid value '0'"),
        (["--memcached", "localhost"], "invalid memcached server 'localhost'"),
        (["--memcached", "127.0.0.1:99999"], "invalid memcached server"),
        (["--channel", "http://127.0.0.1:6379"], "invalid channel URL"),
        (["--origin", "sqlite:///"], "is a directory"),
        (["--origin", "sqlite://relative.db"], "expected sqlite:///ABSOLUTE/PATH"),
        (["--origin", "postgresql://127.0.0.1/db"], "SQLite only"),
        (["--templates", "/nonexistent/templates"], "not found"),
    ],
)
def test_cli_rejects_invalid_option(
    options: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(options)

    assert exit_info.value.code == EXIT_USAGE
    assert message in capsys.readouterr().err


def test_cli_rejects_template_dir_without_html(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "readme.txt").write_text("no templates here")

    with pytest.raises(SystemExit):
        main(["--templates", str(tmp_path)])

    assert "no *.html file found" in capsys.readouterr().err


def test_cli_rejects_invalid_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TIERCACHE_MEMCACHED_SERVERS", "not-a-server")

    with pytest.raises(SystemExit):
        main(["--quiet"])

    assert "TIERCACHE_MEMCACHED_SERVERS" in capsys.readouterr().err


def test_cli_defaults() -> None:
    args = build_parser().parse_args([])

    assert args.subscribers == 20_000
    assert args.workers == 4
    assert args.duration == 10.0
    assert args.zipf == 1.0
    assert args.staleness_bound == 1.0
    assert args.memcached is None
    assert args.channel is None


def test_cli_help_names_cluster(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])

    help_text = " ".join(capsys.readouterr().out.split())
    assert "Twitter 2020 cache traces, cluster25" in help_text


def test_demo_reports_missing_server(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def missing_server(*args: object, **kwargs: object) -> None:
        raise ServerNotInstalledError(
            "memcached not found on PATH: install the Debian package 'memcached'"
        )

    monkeypatch.delenv("TIERCACHE_MEMCACHED_SERVERS", raising=False)
    monkeypatch.setattr(demo_main, "MemcachedServer", missing_server)

    status = main(["--quiet"])

    assert status == EXIT_FAILED
    assert "install the Debian package 'memcached'" in caplog.text


def test_demo_rejects_foreign_origin_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    foreign = tmp_path / "customers.sqlite3"
    connection = sqlite3.connect(foreign)
    connection.execute("CREATE TABLE customers (id INTEGER)")
    connection.close()

    status = main([*SMALL_RUN, "--origin", f"sqlite://{foreign}"])

    assert status == EXIT_FAILED
    assert "is not a database seeded by the demo" in caplog.text
    assert foreign.exists()


@pytest.mark.slow
def test_demo_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = main([*SMALL_RUN, "--data-dir", str(tmp_path), "--write-rate", "40"])
    output = capsys.readouterr().out

    assert status == EXIT_OK, output
    assert report_value(output, "stale sends past bound") == ["0", "0"]
    assert "result: PASS" in output
    cached_sends, origin_sends = report_value(output, "emails sent")
    assert int(cached_sends.replace(",", "")) > 0
    assert int(origin_sends.replace(",", "")) > 0
    cached_l1, origin_l1 = report_value(output, "L1 hits")
    assert int(cached_l1.replace(",", "")) > 0
    assert origin_l1 == "-"
    published, _ = report_value(output, "invalidations published")
    received, _ = report_value(output, "invalidations received (all processes)")
    assert int(published.replace(",", "")) > 0
    assert int(received.replace(",", "")) > 0
    assert re.search(r"^speed-up \(cached / origin only throughput\): \d", output, re.M)
    assert (tmp_path / "campaign.sqlite3").is_file()


@pytest.mark.slow
def test_demo_reuses_seeded_data(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    options = [
        "--subscribers",
        "500",
        "--workers",
        "1",
        "--duration",
        "0.3",
        "--data-dir",
        str(tmp_path),
    ]

    with caplog.at_level("INFO", logger="tiercache.demo"):
        assert main(options) == EXIT_OK
        assert main(options) == EXIT_OK

    seeded = [message for message in caplog.messages if message.startswith("seeded ")]
    reused = [message for message in caplog.messages if message.startswith("reusing ")]
    assert len(seeded) == 1
    assert len(reused) == 1
