"""Process memory of a full L1 bounded to 64 MiB, in both ``local_copy`` modes.

Run ``python benchmarks/memory.py [--quick]``. A ``TieredCache`` with
``local_max_bytes`` of 64 MiB and no entry limit to speak of (no memcached,
no channel: only L1 is measured) reads, in a shuffled order, more values
than fit:

* subscriber profiles, about 1 KB of JSON each (nested dicts, strings);
* email templates, about 20 KB each (one long HTML string and some blocks);
* segment member lists, about 2 MB each (a list of about 250,000 ints),
  which fit the bound and may be stored;
* exports of 70 MiB, larger than the whole bound, which must never be stored.

Each variant runs twice in a fresh child process: once under tracemalloc,
which counts the bytes Python allocated and has not freed after the fill, and
once without it, reading the resident set size from ``/proc/self/statm``,
also after ``malloc_trim(0)`` returns freed heap pages to the system. Growth
is measured from just before the fill to just after it. The fill keeps the
cache's entries and the key memo of ``TieredCache.keys`` (up to 65,536 recent
keys with their memcached keys), which is not part of L1 and which the
traced run measures on its own by clearing it. The target is growth of at
most the bound plus 15%. The traced peak includes the loader's 70 MiB
exports and their JSON while they pass through.

L1 charges each entry its item, ``sys.getsizeof`` of its key, a fixed
``ENTRY_OVERHEAD`` for the entry's tuple, float and int, and the hash tables
and order list of the cachetools LRU. With ``local_copy=True`` the item is
the JSON body, charged its ``sys.getsizeof``: ``codec.dump_body`` copies
orjson's output into a ``bytes`` object of its own length, because orjson
3.13 returns ``bytes`` that keep its whole output buffer (4 KiB for a 0.8 KB
profile, 254 KiB for a 20 KB template, 63 MiB for a 2 MB segment, measured
with tracemalloc). With ``local_copy=False`` it stores the decoded Python
objects and charges five times the JSON length, an estimate.

The RSS run also reports how much pymalloc's free pools grew: pools that
contain no object but stay resident in an arena that still contains one.
CPython 3.11 returns an arena to the system only when all of its pools are
free, and ``malloc_trim`` does not reach them.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import multiprocessing
import os
import queue
import random
import re
import sys
import tempfile
import tracemalloc
from typing import Any

import _common

from tiercache import Settings, TieredCache

MIB = 1024 * 1024
BOUND = 64 * MIB
TARGET_RATIO = 1.15
EXPORT_BYTES = 70 * MIB
SEGMENT_MEMBERS = 250_000
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# (label, local_copy)
VARIANTS = (
    ("local_copy=True", True),
    ("local_copy=False", False),
)


def make_profile(index: int) -> dict[str, Any]:
    return {
        "id": index,
        "email": f"subscriber{index}@example.com",
        "name": f"Subscriber {index}",
        "status": "active",
        "locale": "en_GB",
        "timezone": "Europe/London",
        "created_at": "2023-05-17T10:00:00Z",
        "preferences": {"frequency": "weekly", "format": "html", "topics": [3, 9, 21]},
        "fields": {
            f"field_{j:02d}": f"value {j} of subscriber {index}" for j in range(12)
        },
        "segments": [{"id": s, "name": f"Segment {s}"} for s in (4, 17, 88, 150)],
    }


def make_template(index: int) -> dict[str, Any]:
    paragraph = f"<p>Template {index}: hello {{{{first_name}}}}, news of the week.</p>"
    return {
        "id": index,
        "subject": f"Newsletter {index}",
        "html": paragraph * (19_000 // len(paragraph)),
        "blocks": [
            {"kind": "text", "position": i, "style": "plain"} for i in range(20)
        ],
    }


def make_segment(index: int) -> dict[str, Any]:
    start = 1_000_000 + index * SEGMENT_MEMBERS
    return {"id": index, "members": list(range(start, start + SEGMENT_MEMBERS))}


def make_export(index: int) -> dict[str, Any]:
    return {"id": index, "csv": "x" * EXPORT_BYTES}


MAKERS = {
    "profile": make_profile,
    "template": make_template,
    "segment": make_segment,
    "export": make_export,
}


def plan(quick: bool) -> list[tuple[str, int]]:
    """Return the (kind, index) reads of one fill, shuffled the same way each run."""
    # About 70 MB (quick) or 95 MB of JSON besides the exports: more than
    # the bound, with few small values, because tracemalloc slows every
    # allocation down and a profile costs about 50 of them.
    counts = (
        {"profile": 10_000, "template": 2_800, "segment": 3, "export": 1}
        if quick
        else {"profile": 20_000, "template": 3_000, "segment": 6, "export": 2}
    )
    reads = [(kind, index) for kind, count in counts.items() for index in range(count)]
    random.Random(3).shuffle(reads)
    return reads


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE_SIZE


def malloc_trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def fill(cache: TieredCache, reads: list[tuple[str, int]]) -> None:
    for kind, index in reads:
        cache.get(
            f"{kind}:{index}", lambda key, kind=kind, index=index: MAKERS[kind](index)
        )


def pymalloc_free_pool_bytes() -> int:
    """Return the bytes of empty pymalloc pools in arenas still in use.

    The figure comes from ``sys._debugmallocstats``, which writes to file
    descriptor 2. It includes the pools not yet used in the newest arena,
    less than 1 MiB.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as output:
        os.dup2(output.fileno(), 2)
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        output.seek(0)
        text = output.read().decode("ascii", "replace")
    found = re.search(r"^(\d+) unused pools \* (\d+) bytes", text, re.MULTILINE)
    if found is None:
        raise RuntimeError(
            "sys._debugmallocstats output has no 'unused pools' line: "
            "is pymalloc disabled (PYTHONMALLOC set)?"
        )
    return int(found[1]) * int(found[2])


def measure(local_copy: bool, traced: bool, quick: bool) -> dict[str, Any]:
    """Fill one cache in this (child) process; return its figures and growth."""
    reads = plan(quick)
    settings = Settings(
        memcached_servers=(),
        channel_url="",
        local_max_bytes=BOUND,
        local_max_entries=10_000_000,
        local_ttl=3600,
        local_copy=local_copy,
    )
    cache = TieredCache(settings)

    gc.collect()
    malloc_trim()
    if traced:
        tracemalloc.start()
    traced_before = tracemalloc.get_traced_memory()[0] if traced else 0
    rss_before = rss_bytes()
    # sys._debugmallocstats prints nothing while tracemalloc wraps pymalloc.
    free_pools_before = 0 if traced else pymalloc_free_pool_bytes()
    fill(cache, reads)

    gc.collect()
    result: dict[str, Any] = {"rss": rss_bytes() - rss_before}
    malloc_trim()
    result["rss_trimmed"] = rss_bytes() - rss_before
    if not traced:
        result["free_pools"] = pymalloc_free_pool_bytes() - free_pools_before

    local = cache.stats()["local"]
    result.update(
        entries=local["entries"],
        charged=local["bytes"],
        oversized=local["oversized"],
        evictions=local["evictions"],
        kept=count_kept(cache, reads),
    )
    if traced:
        current, peak = tracemalloc.get_traced_memory()
        result["traced"] = current - traced_before
        result["traced_peak"] = peak - traced_before
        # The memo's own bytes: its links, the callers' keys, and the
        # memcached keys that no L1 entry shares.
        cache.keys._memo.cache_clear()
        gc.collect()
        result["key_memo"] = current - tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
    return result


def count_kept(cache: TieredCache, reads: list[tuple[str, int]]) -> dict[str, int]:
    kept = dict.fromkeys(MAKERS, 0)
    for kind, index in reads:
        if cache.keys.encode(f"{kind}:{index}") in cache.local:
            kept[kind] += 1
    return kept


def child_main(local_copy: bool, traced: bool, quick: bool, results: Any) -> None:
    try:
        results.put(measure(local_copy, traced, quick))
    except BaseException as exc:
        results.put(f"{type(exc).__name__}: {exc}")
        raise


def run_child(local_copy: bool, traced: bool, quick: bool) -> dict[str, Any]:
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    child = context.Process(
        target=child_main,
        args=(local_copy, traced, quick, results),
        daemon=True,
    )
    child.start()
    try:
        outcome = results.get(timeout=600)
    except queue.Empty:
        raise TimeoutError("the measuring process sent nothing within 600 s") from None
    child.join(timeout=30)
    if isinstance(outcome, str):
        raise RuntimeError(f"local_copy={local_copy}: {outcome}")
    return outcome  # type: ignore[no-any-return]


def mib(value: float) -> str:
    return f"{value / MIB:.1f}"


def report(results: dict[str, dict[str, Any]]) -> None:
    rows = []
    target = BOUND * TARGET_RATIO
    for label, result in results.items():
        kept = result["kept"]
        rows.append(
            [
                label,
                f"{result['entries']:,}",
                f"{kept['profile']:,}/{kept['template']:,}/{kept['segment']}/"
                f"{kept['export']}",
                result["oversized"],
                mib(result["charged"]),
                mib(result["traced"]),
                f"{result['traced'] / BOUND:.2f}",
                mib(result["key_memo"]),
                mib(result["rss"]),
                mib(result["rss_trimmed"]),
                mib(result["free_pools"]),
                mib(result["traced_peak"]),
                _common.verdict(result["traced"], target),
                _common.verdict(result["rss_trimmed"], target),
            ]
        )
    _common.print_table(
        f"Growth of a process whose L1 is full (bound {mib(BOUND)} MiB, "
        f"target {mib(target)} MiB)",
        [
            "mode",
            "entries",
            "kept profile/template/segment/export",
            "rejected as oversized",
            "L1 charged MiB",
            "traced MiB",
            "traced / bound",
            "of which key memo MiB",
            "RSS MiB",
            "RSS after trim MiB",
            "pymalloc free pools MiB",
            "traced peak MiB",
            "traced ≤ target",
            "RSS after trim ≤ target",
        ],
        rows,
    )


def plot(results: dict[str, dict[str, Any]]) -> None:
    figure, axes = _common.new_figure(width=7.0, height=4.0)
    axis = axes[0][0]
    labels = ["L1 charged", "traced", "RSS", "RSS after trim"]
    keys = ["charged", "traced", "rss", "rss_trimmed"]
    width = 0.8 / len(results)
    for offset, (label, result) in enumerate(results.items()):
        axis.bar(
            [i + offset * width for i in range(len(keys))],
            [result[key] / MIB for key in keys],
            width,
            label=label,
        )
    axis.axhline(BOUND / MIB, color="k", linestyle="--", label="bound")
    axis.axhline(BOUND * TARGET_RATIO / MIB, color="r", linestyle=":", label="target")
    axis.set_xticks([i + 0.4 - width / 2 for i in range(len(keys))], labels)
    axis.set_ylabel("MiB")
    axis.set_title("memory of a full L1 (64 MiB bound)")
    axis.legend(fontsize=8)
    _common.save_plot(figure, "memory")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="read about 70 MB of values besides the exports, not 95 MB",
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    _common.print_header("memory.py: memory of a full L1", args.quick)
    results: dict[str, dict[str, Any]] = {}
    for label, local_copy in VARIANTS:
        traced = run_child(local_copy, traced=True, quick=args.quick)
        untraced = run_child(local_copy, traced=False, quick=args.quick)
        for key in ("rss", "rss_trimmed", "free_pools"):
            traced[key] = untraced[key]
        results[label] = traced
    reads = plan(args.quick)
    counts = {kind: sum(1 for k, _ in reads if k == kind) for kind in MAKERS}
    print(
        f"Reads: {counts['profile']:,} profiles (~1 KB), {counts['template']:,} "
        f"templates (~20 KB), {counts['segment']} segments (~2 MB), "
        f"{counts['export']} exports (70 MiB). Growth is measured from before the "
        "fill to after it; RSS comes from a second run without tracemalloc."
    )
    print()
    report(results)
    plot(results)


if __name__ == "__main__":
    main()
