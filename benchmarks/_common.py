"""Helpers shared by the benchmark scripts: servers, CPU pinning, timing, output.

The scripts import this module as ``_common`` from their own directory. Every
server they use is started here through :mod:`tiercache.testing`, on a free
loopback port, and stopped when the script ends.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import math
import os
import platform
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from tiercache.testing import (  # noqa: E402
    MemcachedServer,
    PostgresServer,
    RedisServer,
    find_postgres_bin_dir,
)

ROOT = Path(__file__).resolve().parent.parent
PLOTS_DIR = ROOT / "benchmarks" / "plots"
# Scratch space for databases and logs; ignored by git.
OUT_DIR = ROOT / "benchmarks" / "out"

PACKAGES = (
    "tiercache",
    "cachetools",
    "pymemcache",
    "orjson",
    "blinker",
    "dogpile.cache",
    "cashews",
    "redis",
    "psycopg",
    "numpy",
    "matplotlib",
)

# The CPUs this process may use when it starts; "unpinned" runs use all of them.
ALL_CPUS = frozenset(os.sched_getaffinity(0))
PINNED_CPUS = frozenset({min(ALL_CPUS)})
CPU_MODES = ("pinned", "unpinned")


def parse_args(description: str) -> argparse.Namespace:
    """Parse the options every script takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="run fewer repeats and smaller workloads (under 30 s)",
    )
    return parser.parse_args()


# -- statistics -----------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    """Return the median, averaging the two middle values of an even count."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("median of an empty sequence")
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return float(ordered[middle])
    return (ordered[middle - 1] + ordered[middle]) / 2


def percentile(values: Sequence[float], fraction: float) -> float:
    """Return the nearest-rank percentile, for example ``fraction=0.99`` for p99."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of an empty sequence")
    rank = max(1, min(len(ordered), math.ceil(fraction * len(ordered))))
    return float(ordered[rank - 1])


def time_ns_per_op(run: Callable[[], int]) -> tuple[float, float]:
    """Call ``run`` once; return wall-clock and this thread's CPU ns per operation.

    The CPU time leaves out time spent waiting for a server or for a CPU,
    so it shows the client's own work even on a busy machine.

    :param run: performs operations and returns how many it performed.
    """
    wall_start = time.perf_counter_ns()
    cpu_start = time.thread_time_ns()
    count = run()
    cpu = time.thread_time_ns() - cpu_start
    wall = time.perf_counter_ns() - wall_start
    return wall / count, cpu / count


# -- CPU placement ----------------------------------------------------------------


def _thread_ids(pid: int) -> list[int]:
    try:
        return [int(name) for name in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        return []


def process_group_members(pgid: int) -> list[int]:
    """Return the ids of the live processes in process group ``pgid``."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # Fields after the command name, which may contain spaces: state,
        # ppid, pgrp.
        fields = text[text.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid:
            members.append(int(entry))
    return members


def set_cpus(pids: Iterable[int], cpus: Iterable[int]) -> None:
    """Set the CPU affinity of every thread of each process in ``pids``."""
    allowed = set(cpus)
    for pid in pids:
        for tid in _thread_ids(pid):
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(tid, allowed)


class Placement:
    """CPU placement of this process and of the servers it started.

    ``pinned`` puts the benchmark process, its threads and every server
    process on one CPU, as ``taskset -c 0`` on the whole run would, so a
    loopback round trip needs no idle CPU to wake up. ``unpinned`` lets all
    of them use every CPU, as a deployment would. Processes forked later
    inherit the mode in force.
    """

    def __init__(self) -> None:
        self._groups: list[int] = []

    def add_server(self, server: Any) -> None:
        # Each test server leads its own process group (PostgreSQL backends
        # are children in the same group).
        self._groups.append(server.pid)

    def apply(self, mode: str) -> None:
        """Move this process and every server to ``"pinned"`` or ``"unpinned"``."""
        if mode not in CPU_MODES:
            raise ValueError(f"invalid CPU mode {mode!r}: expected one of {CPU_MODES}")
        cpus = PINNED_CPUS if mode == "pinned" else ALL_CPUS
        pids = [os.getpid()]
        for pgid in self._groups:
            pids.extend(process_group_members(pgid))
        set_cpus(pids, cpus)

    @contextlib.contextmanager
    def mode(self, mode: str) -> Iterator[None]:
        """Apply ``mode`` for the block, then return everything to all CPUs."""
        self.apply(mode)
        try:
            yield
        finally:
            self.apply("unpinned")


# -- servers ------------------------------------------------------------------------


class Servers(contextlib.ExitStack):
    """Test servers of one script, stopped when the ``with`` block ends."""

    def __init__(self) -> None:
        super().__init__()
        self.placement = Placement()

    def memcached(
        self, count: int = 1, *, memory_mb: int = 64
    ) -> list[MemcachedServer]:
        """Start ``count`` memcached servers, each with ``memory_mb`` MB for items."""
        servers = []
        for _ in range(count):
            server = self.enter_context(MemcachedServer(memory_mb=memory_mb))
            self.placement.add_server(server)
            servers.append(server)
        return servers

    def redis(self) -> RedisServer:
        """Start a Redis server for the invalidation channel."""
        server = self.enter_context(RedisServer())
        self.placement.add_server(server)
        return server

    def postgres(self) -> PostgresServer:
        """Start a PostgreSQL server (fsync and synchronous_commit off)."""
        server = self.enter_context(PostgresServer())
        self.placement.add_server(server)
        return server


def wait_until(condition: Callable[[], bool], timeout: float, event: str) -> None:
    """Poll ``condition`` every millisecond; raise TimeoutError naming ``event``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{event} did not happen within {timeout} s")
        time.sleep(0.001)


# -- the header ---------------------------------------------------------------------


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _memory_gib() -> str:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    return "unknown"


def _command_version(command: list[str]) -> str:
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return "not found"
    lines = (result.stdout or result.stderr).strip().splitlines()
    return lines[0] if lines else "unknown"


def _server_versions() -> list[str]:
    try:
        postgres = str(find_postgres_bin_dir() / "postgres")
    except RuntimeError:
        postgres = "postgres"
    return [
        _command_version(["memcached", "-V"]),
        _command_version(["redis-server", "--version"]).split(" sha=")[0],
        _command_version([postgres, "--version"]),
    ]


def _git_commit() -> str:
    head = _command_version(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    status = subprocess.run(
        [
            "git",
            "-C",
            str(ROOT),
            "status",
            "--porcelain",
            "--",
            "tiercache",
            "adapters",
        ],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return head + (" (tiercache/ or adapters/ modified)" if status.strip() else "")


def header_lines(title: str, quick: bool) -> list[str]:
    """Return the lines that describe the machine, the software and the run."""
    versions = []
    for name in PACKAGES:
        try:
            versions.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{name} missing")
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return [
        f"# {title}" + (" (--quick)" if quick else ""),
        f"machine:  {_cpu_model()}, {os.cpu_count()} CPUs "
        f"(affinity {sorted(ALL_CPUS)}), {_memory_gib()}, "
        f"Linux {platform.release()}",
        f"load:     {load} (1, 5, 15 min averages at start)",
        f"python:   {platform.python_implementation()} {platform.python_version()}",
        "packages: " + ", ".join(versions[:6]),
        "          " + ", ".join(versions[6:]),
        "servers:  " + "; ".join(_server_versions()),
        f"commit:   {_git_commit()}",
    ]


def print_header(title: str, quick: bool) -> None:
    """Print :func:`header_lines` and a blank line."""
    print("\n".join(header_lines(title, quick)))
    print()


# -- tables and plots -----------------------------------------------------------------


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Lay out rows as a Markdown table with columns padded to a common width.

    The first column is left-aligned and the others right-aligned, so numbers
    line up and a diff of two runs shows only the cells that changed.
    """
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [len(header) for header in headers]
    for row in cells:
        for index, cell in enumerate(row):
            widths[index] = max(widths[index], len(cell))

    def line(values: Sequence[str]) -> str:
        padded = [
            value.ljust(widths[i]) if i == 0 else value.rjust(widths[i])
            for i, value in enumerate(values)
        ]
        return "| " + " | ".join(padded) + " |"

    separator = (
        "|"
        + "|".join(
            "-" * (width + 2) if i == 0 else "-" * (width + 1) + ":"
            for i, width in enumerate(widths)
        )
        + "|"
    )
    return "\n".join([line(headers), separator, *(line(row) for row in cells)])


def print_table(
    title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]
) -> None:
    """Print a titled table followed by a blank line."""
    print(f"## {title}")
    print()
    print(format_table(headers, rows))
    print()


def us(nanoseconds: float) -> str:
    """Format nanoseconds as microseconds with a precision that suits the size."""
    micro = nanoseconds / 1000
    if micro < 10:
        return f"{micro:.2f}"
    if micro < 1000:
        return f"{micro:.1f}"
    return f"{micro:.0f}"


def verdict(ratio: float, target: float) -> str:
    """Return PASS when ``ratio`` is at most ``target``, else MISS."""
    return "PASS" if ratio <= target else "MISS"


def save_plot(figure: Any, name: str) -> Path:
    """Write ``figure`` as ``benchmarks/plots/<name>.png`` and close it."""
    PLOTS_DIR.mkdir(parents=True, exist_ok=True)
    path = PLOTS_DIR / f"{name}.png"
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def new_figure(columns: int = 1, *, width: float = 6.4, height: float = 4.0) -> Any:
    """Return ``(figure, axes)`` with ``columns`` side-by-side axes."""
    return plt.subplots(1, columns, figsize=(width * columns, height), squeeze=False)


def out_path(name: str) -> Path:
    """Return a path under ``benchmarks/out/``, creating the directory."""
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    return OUT_DIR / name
