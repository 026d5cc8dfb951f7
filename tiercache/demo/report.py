"""The fixed-width text report that compares the cached run with the origin-only run."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tiercache.demo.analysis import RunFigures

LABEL_WIDTH = 44
# Above this 1-minute load average per CPU, the report warns that the
# machine was busy. The demo's own processes count toward the load: its 4
# busy workers alone add about 4, or 2 per CPU on 2 CPUs (an estimate).
BUSY_LOAD_PER_CPU = 3.0
VALUE_WIDTH = 14
# The default Zipf exponent imitates this cluster, whose fitted exponent is
# the closest to 1.0 among the 54 clusters of Twitter's published per-cluster
# statistics of its March 2020 production cache traces.
DEFAULT_ZIPF_CLUSTER = "Twitter 2020 cache traces, cluster25: alpha 0.99, 95% gets"


@dataclass(frozen=True, slots=True)
class DemoDescription:
    """Setup of the demo, printed in the report's header."""

    subscribers: int
    templates: int
    templates_source: str
    campaigns: int
    workers: int
    duration: float
    zipf_exponent: float
    write_rate: float
    staleness_bound: float
    seed: int
    origin: str
    memcached: str
    channel: str
    cache_settings: str
    cpu_count: int
    versions: str


def format_report(
    description: DemoDescription, cached: RunFigures, origin_only: RunFigures
) -> str:
    """Return the report as one string of lines, each ending with a newline."""
    lines = _header(description)
    lines.append("")
    lines.append(_row("", cached.mode, origin_only.mode))
    lines.append("-" * (LABEL_WIDTH + 2 * VALUE_WIDTH))
    for label, render in _ROWS:
        lines.append(_row(label, render(cached), render(origin_only)))
    lines.append("")
    lines.extend(_summary(cached, origin_only, description.cpu_count))
    return "\n".join(lines) + "\n"


def _header(description: DemoDescription) -> list[str]:
    lines = [
        "tiercache demo: an email campaign send, cached and origin only",
        f"  data set   {description.subscribers:,} subscribers, "
        f"{description.campaigns} campaigns, seed {description.seed}",
        f"  templates  {description.templates} {description.templates_source}",
        f"  workload   {description.workers} sender processes, "
        f"{description.duration:g} s per run, Zipf exponent "
        f"{description.zipf_exponent:.2f}",
    ]
    if description.zipf_exponent == 1.0:
        lines.append(f"             (imitates {DEFAULT_ZIPF_CLUSTER})")
    lines += [
        f"  editor     {description.write_rate:g} write-throughs/s to popular "
        "subscribers, half of them status changes",
        f"  bound      {description.staleness_bound:g} s from an unsubscribe's "
        "commit to the last email that may miss it",
        f"  origin     {description.origin}",
        f"  L2         memcached {description.memcached}",
        f"  channel    {description.channel}",
        f"  cache      {description.cache_settings}",
        f"  machine    {description.cpu_count} CPUs, {description.versions}",
    ]
    return lines


def _row(label: str, cached: str, origin_only: str) -> str:
    return f"{label:<{LABEL_WIDTH}}{cached:>{VALUE_WIDTH}}{origin_only:>{VALUE_WIDTH}}"


def _count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _share(part: int | None, whole: int) -> str:
    if part is None:
        return "-"
    return f"{100.0 * part / whole:.1f}%" if whole else "0.0%"


def _milliseconds(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000.0:.2f}"


_ROWS: list[tuple[str, Callable[[RunFigures], str]]] = [
    ("emails sent", lambda f: _count(f.sends)),
    ("skipped: unsubscribed", lambda f: _count(f.skipped_unsubscribed)),
    ("sending time (s)", lambda f: f"{f.elapsed:.2f}"),
    ("throughput (emails/s)", lambda f: f"{f.throughput:,.0f}"),
    ("machine load average at the end (1 min)", lambda f: f"{f.load_average:.2f}"),
    ("reads (profile, template, segment)", lambda f: _count(f.reads)),
    ("  L1 hits", lambda f: _count(f.local_hits)),
    ("  L1 hit ratio", lambda f: _share(f.local_hits, f.reads)),
    ("  L2 hits", lambda f: _count(f.remote_hits)),
    ("  L2 hit ratio (of all reads)", lambda f: _share(f.remote_hits, f.reads)),
    ("  L2 errors", lambda f: _count(f.remote_errors)),
    ("  origin loads", lambda f: _count(f.origin_loads)),
    ("  origin load ratio", lambda f: _share(f.origin_loads, f.reads)),
    ("origin loads per 1000 reads", lambda f: f"{f.origin_loads_per_1000_reads:.1f}"),
    ("read latency p50 (us)", lambda f: f"{f.read_p50_us:.1f}"),
    ("read latency p99 (us)", lambda f: f"{f.read_p99_us:.1f}"),
    ("editor writes", lambda f: _count(f.writes)),
    ("  of which unsubscribes", lambda f: _count(f.unsubscribes)),
    ("invalidations published", lambda f: _count(f.invalidations_sent)),
    (
        "invalidations received (all processes)",
        lambda f: _count(f.invalidations_received),
    ),
    ("invalidation delay max (ms)", lambda f: _milliseconds(f.invalidation_delay_max)),
    ("L2 fills dropped after a write", lambda f: _count(f.stale_fills_dropped)),
    (
        "unsubscribes followed by a stale read",
        lambda f: _count(f.staleness.unsubscribes_with_stale_reads),
    ),
    (
        "staleness after unsubscribe max (ms)",
        lambda f: _milliseconds(f.staleness.unsubscribe_max),
    ),
    (
        "staleness after unsubscribe p99 (ms)",
        lambda f: _milliseconds(f.staleness.unsubscribe_p99),
    ),
    (
        "staleness after any write max (ms)",
        lambda f: _milliseconds(f.staleness.write_max),
    ),
    (
        "stale sends past bound",
        lambda f: _count(len(f.staleness.stale_sends_past_bound)),
    ),
]


def _summary(cached: RunFigures, origin_only: RunFigures, cpu_count: int) -> list[str]:
    if origin_only.throughput > 0:
        speed_up = f"{cached.throughput / origin_only.throughput:.2f}x"
    else:
        speed_up = "n/a (the origin-only run sent nothing)"
    saved = origin_only.origin_loads_per_1000_reads - cached.origin_loads_per_1000_reads
    lines = [
        f"speed-up (cached / origin only throughput): {speed_up}",
        f"origin reads saved by the cache: {saved:.1f} per 1000 reads",
    ]
    busiest = max(cached.load_average, origin_only.load_average)
    if busiest > BUSY_LOAD_PER_CPU * cpu_count:
        lines.append(
            f"note: the machine was busy (load average up to {busiest:.1f} on "
            f"{cpu_count} CPUs), so throughput and latency include waiting for a "
            "CPU; rerun on an idle machine to compare them"
        )
    return lines
