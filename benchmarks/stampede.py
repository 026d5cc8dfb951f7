"""Campaign-start stampede: many threads in many processes miss the same cold keys.

Run ``python benchmarks/stampede.py [--quick] [--threads N] [--processes M]``.
M processes of N threads each (default 4 x 8) wait for one start signal.
Then every thread reads the same handful of cold keys (templates and
segments of the campaign) in the same order, so every thread misses every
key at about the same moment. The loader sleeps 50 ms, standing in
for an expensive query, and counts its calls. The same burst runs through:

* ``tiercache``: ``TieredCache.get`` (per-process fill sharing, then an L2
  lease across processes) with a Redis invalidation channel.
* ``look-aside``: pymemcache get; on a miss, load and set.
* ``dogpile process lock``: dogpile.cache 1.5 region on its
  ``dogpile.cache.pymemcache`` backend with default arguments, whose
  ``get_or_create`` lock is a per-key mutex inside each process.
* ``dogpile distributed_lock``: the same with ``distributed_lock=True``,
  which takes a lock key in memcached with ``add`` and retries with a sleep.

Each round uses keys no earlier round used. The table reports the median
origin loads per round and the latency of every read of every round.
"""

from __future__ import annotations

import argparse
import multiprocessing
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import _common
from pymemcache.client.base import Client

from tiercache import Settings, TieredCache
from tiercache.adapters import redis_channel  # noqa: F401 (imported once, before fork)

LOAD_SECONDS = 0.05
HOT_KEYS = (
    "template:welcome",
    "template:promo",
    "template:footer",
    "segment:vip",
    "segment:active",
)
CONTENDERS = (
    "tiercache",
    "look-aside",
    "dogpile process lock",
    "dogpile distributed_lock",
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="run 2 rounds instead of 7 (under 30 s)"
    )
    parser.add_argument(
        "--threads", type=int, default=8, help="threads per process (default 8)"
    )
    parser.add_argument(
        "--processes", type=int, default=4, help="processes (default 4)"
    )
    args = parser.parse_args()
    if args.threads < 1 or args.processes < 1:
        parser.error("--threads and --processes must be at least 1")
    return args


def make_value(key: str) -> dict[str, Any]:
    """Return a template of about 20 KB or a segment of 2,000 subscriber ids."""
    if key.startswith("template:"):
        return {"key": key, "html": "<p>" + "x" * 20_000 + "</p>"}
    return {"key": key, "members": list(range(2000))}


class Loader:
    """A stand-in for a slow query that counts its calls in this process."""

    def __init__(self) -> None:
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, key: str) -> dict[str, Any]:
        with self._lock:
            self.calls += 1
        time.sleep(LOAD_SECONDS)
        return make_value(key)


def make_reader(
    contender: str, prefix: str, loader: Loader, servers: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], None]]:
    """Return ``(read, close)`` for one contender in this process."""
    address = servers["memcached"]
    if contender == "tiercache":
        cache = TieredCache(
            Settings(
                memcached_servers=(address,),
                channel_url=servers["redis_url"],
                namespace="stampede",
            )
        )
        _common.wait_until(lambda: cache.bus.is_trusted, 10, "channel subscribe")
        # The loader gets the key without the round prefix, as elsewhere.
        return (
            lambda key: cache.get(prefix + key, lambda _wire: loader(key)),
            cache.close,
        )
    if contender == "look-aside":
        host, port = address.rsplit(":", 1)
        local = threading.local()

        def read(key: str) -> Any:
            # pymemcache's Client is not thread-safe: one per thread.
            client = getattr(local, "client", None)
            if client is None:
                client = local.client = Client(
                    (host, int(port)), no_delay=True, connect_timeout=1, timeout=1
                )
            value = client.get(prefix + key)
            if value is not None:
                return value
            value = loader(key)
            client.set(prefix + key, str(value).encode(), expire=3600, noreply=True)
            return value

        return read, lambda: None
    from dogpile.cache import make_region

    arguments: dict[str, Any] = {"url": [address]}
    if contender == "dogpile distributed_lock":
        # lock_timeout expires a lock whose holder died, so a crash can't
        # block later rounds for ever.
        arguments.update(distributed_lock=True, lock_timeout=10)
    region = make_region().configure(
        "dogpile.cache.pymemcache", expiration_time=3600, arguments=arguments
    )
    return (
        lambda key: region.get_or_create(prefix + key, lambda: loader(key)),
        lambda: None,
    )


def worker_main(
    contender: str,
    prefix: str,
    threads: int,
    index: int,
    servers: dict[str, Any],
    ready: Any,
    go: Any,
    results: Any,
) -> None:
    try:
        loader = Loader()
        read, close = make_reader(contender, prefix, loader, servers)
        latencies: list[int] = []
        latencies_lock = threading.Lock()
        start = threading.Event()

        def run() -> None:
            start.wait()
            own = []
            for key in HOT_KEYS:
                began = time.perf_counter_ns()
                read(key)
                own.append(time.perf_counter_ns() - began)
            with latencies_lock:
                latencies.extend(own)

        pool = [threading.Thread(target=run) for _ in range(threads)]
        for thread in pool:
            thread.start()
        ready.put(index)
        if not go.wait(60):
            raise TimeoutError("the start signal did not arrive within 60 s")
        start.set()
        for thread in pool:
            thread.join()
        results.put((index, {"loads": loader.calls, "latencies": latencies}))
        close()
    except BaseException as exc:
        results.put((index, f"{type(exc).__name__}: {exc}"))
        raise


def run_round(
    contender: str, prefix: str, args: argparse.Namespace, servers: dict[str, Any]
) -> tuple[int, list[int]]:
    """Run one burst; return the origin loads and every read's latency in ns."""
    context = multiprocessing.get_context("fork")
    ready, results, go = context.Queue(), context.Queue(), context.Event()
    workers = [
        context.Process(
            target=worker_main,
            args=(contender, prefix, args.threads, index, servers, ready, go, results),
            daemon=True,
        )
        for index in range(args.processes)
    ]
    for worker in workers:
        worker.start()
    for _ in workers:
        ready.get(timeout=60)
    go.set()

    loads = 0
    latencies: list[int] = []
    for _ in workers:
        try:
            index, outcome = results.get(timeout=120)
        except queue.Empty:
            raise TimeoutError(f"{contender} worker sent no result in 120 s") from None
        if isinstance(outcome, str):
            raise RuntimeError(f"{contender} worker {index} failed: {outcome}")
        loads += outcome["loads"]
        latencies.extend(outcome["latencies"])

    for worker in workers:
        worker.join(timeout=30)
    return loads, latencies


def ms(nanoseconds: float) -> str:
    return f"{nanoseconds / 1e6:.2f}"


def report(
    loads: dict[str, list[int]], latencies: dict[str, list[int]], args: Any, rounds: int
) -> None:
    """Print the run's parameters and one row per contender."""
    readers = args.processes * args.threads
    print(
        f"{args.processes} processes x {args.threads} threads, {len(HOT_KEYS)} cold "
        f"keys each, loader sleeps {LOAD_SECONDS * 1000:.0f} ms, {rounds} rounds. "
        f"At least {len(HOT_KEYS)} loads per round are needed, at most "
        f"{readers * len(HOT_KEYS)} can happen. Latencies are per read, over all "
        "rounds."
    )
    print()
    base = _common.median(loads["tiercache"])
    rows = []
    for contender in CONTENDERS:
        median_loads = _common.median(loads[contender])
        times = latencies[contender]
        rows.append(
            [
                contender,
                f"{median_loads:.0f}",
                f"{min(loads[contender])}-{max(loads[contender])}",
                f"{median_loads / base:.1f}x",
                ms(_common.percentile(times, 0.50)),
                ms(_common.percentile(times, 0.99)),
                ms(max(times)),
            ]
        )
    headers = ["contender", "loads/round", "range", "loads vs tiercache",
               "p50 ms", "p99 ms", "max ms"]  # fmt: skip
    _common.print_table("Origin loads and read latency", headers, rows)


def main() -> None:
    args = parse_args()
    rounds = 2 if args.quick else 7
    _common.print_header("stampede.py: one burst of cold misses", args.quick)

    loads: dict[str, list[int]] = {name: [] for name in CONTENDERS}
    latencies: dict[str, list[int]] = {name: [] for name in CONTENDERS}
    with _common.Servers() as started:
        (memcached,) = started.memcached(1)
        servers = {"memcached": memcached.address, "redis_url": started.redis().url}
        for round_number in range(rounds):
            # Rotate the order, so no contender always meets a cold machine.
            shift = round_number % len(CONTENDERS)
            for contender in CONTENDERS[shift:] + CONTENDERS[:shift]:
                prefix = f"r{round_number}:{CONTENDERS.index(contender)}:"
                count, times = run_round(contender, prefix, args, servers)
                loads[contender].append(count)
                latencies[contender].extend(times)

    report(loads, latencies, args, rounds)
    plot(loads, latencies)


def plot(loads: dict[str, list[int]], latencies: dict[str, list[int]]) -> None:
    figure, axes = _common.new_figure(2, width=5.0, height=4.0)
    names = list(CONTENDERS)
    labels = [name.replace(" ", "\n", 1) for name in names]
    axes[0][0].bar(labels, [_common.median(loads[name]) for name in names])
    axes[0][0].set_ylabel("origin loads per round (median)")
    axes[0][0].set_title("loads")
    for index, fraction in enumerate((0.50, 0.99)):
        axes[0][1].bar(
            [i + index * 0.4 for i in range(len(names))],
            [_common.percentile(latencies[name], fraction) / 1e6 for name in names],
            0.4,
            label=f"p{round(fraction * 100)}",
        )
    axes[0][1].set_xticks([i + 0.2 for i in range(len(names))], labels)
    axes[0][1].set_yscale("log")
    axes[0][1].set_ylabel("ms per read (log scale)")
    axes[0][1].set_title("read latency")
    axes[0][1].legend()
    for axis in axes[0]:
        axis.tick_params(axis="x", labelsize=7)
    _common.save_plot(figure, "stampede")


if __name__ == "__main__":
    main()
