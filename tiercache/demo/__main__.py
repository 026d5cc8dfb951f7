"""Entry point of ``python -m tiercache.demo`` and the ``tiercache-demo`` script.

The demo seeds an SQLite origin with an email-marketing data set, sends a
campaign for ``--duration`` seconds through tiercache while an editor
unsubscribes popular subscribers, sends again against the origin alone, and
prints a report. It fails when an email was rendered from a profile older
than an unsubscribe committed more than ``--staleness-bound`` seconds before.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import platform
import secrets
import signal
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

from tiercache import ConfigurationError, Settings
from tiercache.demo import cli
from tiercache.demo.analysis import RunFigures, summarize_run
from tiercache.demo.data import generate_dataset
from tiercache.demo.database import (
    DataSetIdentity,
    copy_database,
    digest_templates,
    is_demo_database,
    read_identity,
    seed_database,
)
from tiercache.demo.origin import CampaignOrigin
from tiercache.demo.report import DemoDescription, format_report
from tiercache.demo.runner import RunFailedError, run_send
from tiercache.demo.templates import generate_templates, load_template_dir
from tiercache.demo.workers import CACHED, ORIGIN_ONLY, RunSpec
from tiercache.testing import MemcachedServer, RedisServer, ServerNotInstalledError

logger = logging.getLogger("tiercache.demo")

BASE_DATABASE_NAME = "campaign.sqlite3"
LOCAL_TTL = 60.0
REMOTE_TTL = 300.0
LOCAL_MAX_ENTRIES = 10_000
LOCAL_MAX_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class _Servers:
    memcached: tuple[str, ...]
    channel: str
    memcached_note: str
    channel_note: str


@dataclass(frozen=True, slots=True)
class _Origin:
    path: Path
    template_count: int
    templates_source: str
    campaign_count: int


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo and print its report to stdout.

    :param argv: the options, ``sys.argv[1:]`` when omitted.
    :returns: the exit status, see ``--help``.
    """
    args = cli.parse_args(argv)
    with _progress_logging(quiet=args.quiet), _sigterm_as_interrupt():
        try:
            return _run_demo(args)
        except KeyboardInterrupt:
            logger.error(
                "interrupted; stopped the processes and servers the demo started"
            )
            return cli.EXIT_INTERRUPTED
        except ServerNotInstalledError as exc:
            logger.error("cannot start a server: %s", exc)
            return cli.EXIT_FAILED
        except ConfigurationError as exc:
            logger.error("invalid cache configuration: %s", exc)
            return cli.EXIT_USAGE
        except (RunFailedError, sqlite3.Error, OSError, ValueError) as exc:
            logger.error("demo failed: %s", exc)
            return cli.EXIT_FAILED


@contextlib.contextmanager
def _progress_logging(*, quiet: bool) -> Iterator[None]:
    """Send the demo's log lines to stderr for the duration of one ``main`` call."""
    package_logger = logging.getLogger("tiercache")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    )
    previous_level = package_logger.level
    package_logger.addHandler(handler)
    package_logger.setLevel(logging.WARNING if quiet else logging.INFO)
    try:
        yield
    finally:
        package_logger.removeHandler(handler)
        package_logger.setLevel(previous_level)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Handle SIGTERM like Ctrl-C, so the demo stops what it started.

    Only the main thread can set signal handlers, so in other threads this
    does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_demo(args: argparse.Namespace) -> int:
    with contextlib.ExitStack() as stack:
        servers = _start_servers(args, stack)
        cache_overrides: dict[str, Any] = {
            "memcached_servers": servers.memcached,
            "channel_url": servers.channel,
            # A new namespace per demo run, so that a configured memcached
            # serves no value from an earlier run and needs no flush.
            "namespace": f"demo-{secrets.token_hex(4)}",
            "local_ttl": LOCAL_TTL,
            "remote_ttl": REMOTE_TTL,
            "local_max_entries": LOCAL_MAX_ENTRIES,
            "local_max_bytes": LOCAL_MAX_BYTES,
        }
        settings = Settings.from_env(**cache_overrides)

        if args.data_dir is not None:
            data_dir = args.data_dir
            data_dir.mkdir(parents=True, exist_ok=True)
        else:
            temporary = tempfile.TemporaryDirectory(prefix="tiercache-demo-")
            data_dir = Path(stack.enter_context(temporary))
        origin = _prepare_origin(args, data_dir)

        figures = {
            mode: _run_once(args, mode, origin, data_dir, cache_overrides)
            for mode in (CACHED, ORIGIN_ONLY)
        }
        description = _describe(args, origin, servers, settings)
        cached, origin_only = figures[CACHED], figures[ORIGIN_ONLY]
        print(format_report(description, cached, origin_only), end="")
        return _verdict(cached, origin_only, args.staleness_bound)


def _run_once(
    args: argparse.Namespace,
    mode: str,
    origin: _Origin,
    data_dir: Path,
    cache_overrides: dict[str, Any],
) -> RunFigures:
    """Run one send on a fresh copy of the seeded database."""
    run_path = data_dir / f"run-{mode.replace(' ', '-')}.sqlite3"
    copy_database(origin.path, run_path)
    spec = RunSpec(
        mode=mode,
        database=run_path,
        subscriber_count=args.subscribers,
        zipf_exponent=args.zipf,
        seed=args.seed,
        duration=args.duration,
        write_rate=args.write_rate,
        year=datetime.now().year,
        cache_overrides=cache_overrides if mode == CACHED else {},
    )
    run = run_send(spec, workers=args.workers, show_progress=not args.quiet)
    return summarize_run(run, staleness_bound=args.staleness_bound)


def _describe(
    args: argparse.Namespace, origin: _Origin, servers: _Servers, settings: Settings
) -> DemoDescription:
    return DemoDescription(
        subscribers=args.subscribers,
        templates=origin.template_count,
        templates_source=origin.templates_source,
        campaigns=origin.campaign_count,
        workers=args.workers,
        duration=args.duration,
        zipf_exponent=args.zipf,
        write_rate=args.write_rate,
        staleness_bound=args.staleness_bound,
        seed=args.seed,
        origin=f"SQLite (WAL) {origin.path}, each run on its own copy",
        memcached=f"{','.join(servers.memcached)} ({servers.memcached_note})",
        channel=f"{servers.channel} ({servers.channel_note})",
        cache_settings=(
            f"namespace {settings.namespace}, local_ttl {settings.local_ttl:g} s,"
            f" remote_ttl {settings.remote_ttl:g} s, L1 at most "
            f"{settings.local_max_entries:,} entries per process"
        ),
        cpu_count=os.cpu_count() or 1,
        versions=(
            f"Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}"
        ),
    )


def _start_servers(args: argparse.Namespace, stack: contextlib.ExitStack) -> _Servers:
    """Return the configured servers, starting memcached or Redis where none is."""
    memcached: tuple[str, ...] = args.memcached or ()
    memcached_note = "configured"
    if not memcached:
        server = stack.enter_context(MemcachedServer())
        memcached = (server.address,)
        memcached_note = f"started by the demo, pid {server.pid}"
        logger.info("started memcached on %s", server.address)
    channel: str = args.channel or ""
    channel_note = "configured"
    if not channel:
        redis = stack.enter_context(RedisServer())
        channel = redis.url
        channel_note = f"started by the demo, pid {redis.pid}"
        logger.info("started Redis on %s", redis.address)
    return _Servers(memcached, channel, memcached_note, channel_note)


def _prepare_origin(args: argparse.Namespace, data_dir: Path) -> _Origin:
    """Seed the base database, or reuse one seeded earlier with the same identity."""
    if args.templates is not None:
        templates = load_template_dir(args.templates)
        source = f"loaded from {args.templates}"
    else:
        templates = generate_templates(args.seed)
        source = "generated, 10 to 30 KB each"
    identity = DataSetIdentity(
        seed=args.seed,
        subscriber_count=args.subscribers,
        templates_digest=digest_templates((row.name, row.html) for row in templates),
    )
    path: Path = (
        args.origin if args.origin is not None else data_dir / BASE_DATABASE_NAME
    )
    if read_identity(path) == identity:
        logger.info("reusing the data set seeded at %s", path)
    else:
        if path.exists() and not is_demo_database(path):
            raise ValueError(
                f"{path} exists and is not a database seeded by the demo; "
                "give another --origin path or remove the file"
            )
        began = time.perf_counter()
        dataset = generate_dataset(args.subscribers, args.seed, templates)
        path.parent.mkdir(parents=True, exist_ok=True)
        seed_database(path, dataset, identity)
        logger.info(
            "seeded %s with %d subscribers, %d events, %d templates and %d segments "
            "in %.1f s",
            path,
            len(dataset.subscribers),
            len(dataset.events),
            len(dataset.templates),
            len(dataset.segments),
            time.perf_counter() - began,
        )
    origin = CampaignOrigin(path)
    try:
        campaign_count = len(origin.load_campaigns())
    finally:
        origin.close()
    return _Origin(path, len(templates), source, campaign_count)


def _verdict(cached: RunFigures, origin_only: RunFigures, bound: float) -> int:
    """Print the result lines and return the exit status."""
    problems: list[str] = []
    for figures in (cached, origin_only):
        stale = figures.staleness.stale_sends_past_bound
        if stale:
            worst = max(stale, key=lambda send: send.delay)
            problems.append(
                f"{figures.mode} run: {len(stale)} emails rendered from a profile "
                f"older than an unsubscribe committed more than {bound:g} s earlier; "
                "worst: "
                f"subscriber {worst.subscriber_id}, version {worst.version_read} read "
                f"{worst.delay:.3f} s after version {worst.unsubscribe_version} "
                "(unsubscribe) started"
            )
        if figures.missing_rows:
            problems.append(
                f"{figures.mode} run: {figures.missing_rows} reads found no row "
                "in the origin"
            )
        if figures.sends == 0:
            problems.append(f"{figures.mode} run: no email was sent")
    if problems:
        print("result: FAIL")
        for problem in problems:
            print(f"  {problem}")
        stale_total = len(cached.staleness.stale_sends_past_bound) + len(
            origin_only.staleness.stale_sends_past_bound
        )
        return cli.EXIT_STALE_SENDS if stale_total else cli.EXIT_FAILED
    print(
        f"result: PASS, no email was rendered from a profile older than an "
        f"unsubscribe committed more than {bound:g} s earlier"
    )
    return cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
