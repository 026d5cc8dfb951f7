"""Command-line options of the demo and their validation."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from tiercache.demo.report import DEFAULT_ZIPF_CLUSTER
from tiercache.settings import parse_server

MEMCACHED_ENV = "TIERCACHE_MEMCACHED_SERVERS"
CHANNEL_ENV = "TIERCACHE_CHANNEL_URL"
CHANNEL_SCHEMES = ("redis", "rediss", "postgresql", "postgres")
# The data set is generated in memory before seeding, at roughly 1 KB per
# subscriber with its events (an estimate), so a million takes about 1 GB.
MAX_SUBSCRIBERS = 1_000_000

EXIT_OK = 0
EXIT_STALE_SENDS = 1
EXIT_USAGE = 2
EXIT_FAILED = 3
EXIT_INTERRUPTED = 130

_DESCRIPTION = """\
Send an email campaign through tiercache against real memcached and Redis
while an editor unsubscribes popular subscribers, then the same send against
the origin alone. Report throughput, tier hit ratios, read latency and the
observed staleness after each unsubscribe."""

_EPILOG = f"""\
Without --memcached or {MEMCACHED_ENV}, the demo starts its own
memcached on a free loopback port, and without --channel or
{CHANNEL_ENV} its own Redis. It stops them when it ends. The binaries
come from the Debian packages memcached and redis-server.

exit status: {EXIT_OK} when no email went out past the staleness bound,
{EXIT_STALE_SENDS} when some did, {EXIT_USAGE} for invalid options, \
{EXIT_FAILED} when the demo could not run,
{EXIT_INTERRUPTED} on Ctrl-C or SIGTERM."""


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of the demo's options."""
    parser = argparse.ArgumentParser(
        prog="python -m tiercache.demo",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_workload_options(parser.add_argument_group("workload"))
    _add_data_options(parser.add_argument_group("data set and origin"))
    _add_server_options(parser.add_argument_group("servers"))
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="print only the report and errors, no progress",
    )
    return parser


def _add_workload_options(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--workers",
        type=_integer(1, 256),
        default=4,
        metavar="N",
        help="number of sender processes (default: 4)",
    )
    group.add_argument(
        "--duration",
        type=_number(0.1, 3600.0),
        default=10.0,
        metavar="SECONDS",
        help="seconds of sending in each of the two runs (default: 10)",
    )
    group.add_argument(
        "--zipf",
        type=_number(0.0, 10.0),
        default=1.0,
        metavar="ALPHA",
        help="Zipf exponent of subscriber popularity; the default 1.0 imitates "
        f"{DEFAULT_ZIPF_CLUSTER.replace('%', '%%')}; 0 is uniform (default: 1.0)",
    )
    group.add_argument(
        "--write-rate",
        type=_number(0.0, 10_000.0),
        default=30.0,
        metavar="PER_SECOND",
        help="editor write-throughs per second, half of them status changes "
        "(default: 30)",
    )
    group.add_argument(
        "--staleness-bound",
        type=_number(0.001, 3600.0),
        default=1.0,
        metavar="SECONDS",
        help="an email rendered from a profile older than an unsubscribe "
        "committed more than this long ago is a failure (default: 1.0)",
    )
    group.add_argument(
        "--seed",
        type=_integer(-(2**63), 2**63 - 1),
        default=1,
        metavar="N",
        help="seed of the data set and of the workload (default: 1)",
    )


def _add_data_options(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--subscribers",
        type=_integer(1, MAX_SUBSCRIBERS),
        default=20_000,
        metavar="N",
        help="number of subscribers in the generated data set (default: 20000)",
    )
    group.add_argument(
        "--templates",
        type=_template_dir,
        metavar="DIR",
        help="load the HTML templates from DIR/*.html instead of generating them",
    )
    group.add_argument(
        "--data-dir",
        type=_data_dir,
        metavar="DIR",
        help="keep the SQLite files in DIR and reuse the seeded data set on the "
        "next run with the same seed, size and templates (default: a temporary "
        "directory, removed at exit)",
    )
    group.add_argument(
        "--origin",
        type=_origin_url,
        metavar="URL",
        help="origin database as sqlite:///ABSOLUTE/PATH; the data set is seeded "
        "there and each run works on a copy (default: DATA_DIR/campaign.sqlite3)",
    )


def _add_server_options(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--memcached",
        type=_memcached_servers,
        metavar="HOST:PORT[,HOST:PORT...]",
        help=f"memcached servers of L2 (default: {MEMCACHED_ENV}, else start one)",
    )
    group.add_argument(
        "--channel",
        type=_channel_url,
        metavar="URL",
        help=f"invalidation channel, such as redis://127.0.0.1:6379/0 (default: "
        f"{CHANNEL_ENV}, else start a Redis)",
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``argv`` and fill the server options from the environment.

    Exits with status 2 and a message naming the invalid value on error.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.memcached is None and os.environ.get(MEMCACHED_ENV, "").strip():
        try:
            args.memcached = _memcached_servers(os.environ[MEMCACHED_ENV])
        except argparse.ArgumentTypeError as exc:
            parser.error(f"{MEMCACHED_ENV}: {exc}")
    if args.channel is None and os.environ.get(CHANNEL_ENV, "").strip():
        try:
            args.channel = _channel_url(os.environ[CHANNEL_ENV])
        except argparse.ArgumentTypeError as exc:
            parser.error(f"{CHANNEL_ENV}: {exc}")
    return args


def _integer(minimum: int, maximum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        expected = f"expected an integer from {minimum} to {maximum}"
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"invalid value {text!r}: {expected}"
            ) from None
        if not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"invalid value {value}: {expected}")
        return value

    return parse


def _number(minimum: float, maximum: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(
                f"invalid value {text!r}: expected a number from {minimum:g} "
                f"to {maximum:g}"
            )
        return value

    return parse


def _template_dir(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.is_dir():
        raise argparse.ArgumentTypeError(
            f"directory {text!r} not found; give a directory of *.html templates"
        )
    if not any(path.glob("*.html")):
        raise argparse.ArgumentTypeError(
            f"no *.html file found in {text!r}; give a directory of *.html templates"
        )
    return path.resolve()


def _data_dir(text: str) -> Path:
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(
            f"{text!r} exists and is not a directory; give a directory path"
        )
    return path.resolve()


def _memcached_servers(text: str) -> tuple[str, ...]:
    servers = tuple(part.strip() for part in text.split(",") if part.strip())
    if not servers:
        raise argparse.ArgumentTypeError(
            f"invalid value {text!r}: expected HOST:PORT[,HOST:PORT...]"
        )
    for server in servers:
        try:
            parse_server(server)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(
                f"invalid memcached server {server!r} ({exc}): expected HOST:PORT, "
                "such as 127.0.0.1:11211"
            ) from None
    return servers


def _channel_url(text: str) -> str:
    scheme, separator, rest = text.partition("://")
    if not separator or scheme not in CHANNEL_SCHEMES or not rest:
        schemes = ", ".join(f"{name}://" for name in CHANNEL_SCHEMES)
        raise argparse.ArgumentTypeError(
            f"invalid channel URL {text!r}: expected a URL starting with {schemes}, "
            "such as redis://127.0.0.1:6379/0"
        )
    return text


def _origin_url(text: str) -> Path:
    scheme, separator, rest = text.partition("://")
    if scheme in ("postgresql", "postgres"):
        raise argparse.ArgumentTypeError(
            f"unsupported origin {text!r}: the demo's origin is SQLite only; "
            "use sqlite:///ABSOLUTE/PATH"
        )
    if scheme != "sqlite" or not separator or not rest.startswith("/"):
        raise argparse.ArgumentTypeError(
            f"invalid origin URL {text!r}: expected sqlite:///ABSOLUTE/PATH, such as "
            "sqlite:///tmp/campaign.sqlite3"
        )
    path = Path("/" + rest.lstrip("/"))
    if path.is_dir():
        raise argparse.ArgumentTypeError(
            f"origin path {str(path)!r} is a directory; give a file path"
        )
    return path
