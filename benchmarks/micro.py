"""Per-operation cost of tiercache's read paths against the bare libraries below them.

Run ``python benchmarks/micro.py [--quick]``. Every figure is the median,
over several repeats, of the mean cost of one operation in a tight loop, in
microseconds, minus the cost of an empty loop over the same keys. The repeats
of all cases are interleaved, so a slow moment of the shared machine hits
every case alike, and each ratio compares two medians from this one run.

Each case runs in two CPU modes. "pinned" puts this process, its threads and
every server on one CPU (as ``taskset -c 0`` would), so a loopback round trip
does not wait for an idle CPU to wake up. "unpinned" lets everything use
every CPU, as a deployment does. Targets are judged in both modes. The
client CPU column is this thread's CPU time, which leaves out waiting.

Every TieredCache here uses a Redis invalidation channel, as a deployment
with several processes would. Bare pymemcache clients use ``no_delay=True``.
How each read path is isolated:

* L1 hit: 100 keys already in L1, read in rotation.
* L2 hit: a cache with an L1 of one entry (``local_max_entries=1``) reads
  100 keys in rotation, so every read misses L1, hits memcached and then
  fills L1, evicting the previous key. That is the whole cost a read pays
  when L2 serves it, L1 bookkeeping included; the bare client pays none of it.
* get_many: two disjoint batches of 100 keys alternate, so no key of a batch
  is still in the one-entry L1 when the batch is read again.
* Miss to the origin: every read uses a key that no tier holds yet, so it
  pays a get, the lease (an add), the origin read, and the fill (a gets and
  a cas).
"""

from __future__ import annotations

import asyncio
import gc
import threading
from collections.abc import Callable
from typing import Any

import _common
import orjson
from cachetools import LRUCache
from dogpile.cache import make_region
from pymemcache.client.base import Client
from pymemcache.client.hash import HashClient

from tiercache import Settings, TieredCache
from tiercache.adapters.postgres import PostgresOrigin
from tiercache.adapters.sqlite import SQLiteOrigin

L1_KEYS = 100
BATCH = 100


def make_profile(number: int) -> dict[str, Any]:
    """Return a subscriber profile of about 1 KB of JSON."""
    return {
        "id": number,
        "email": f"subscriber{number}@example.com",
        "name": f"Subscriber Number {number}",
        "status": "active",
        "locale": "en_GB",
        "timezone": "Europe/London",
        "created_at": "2023-05-04T10:11:12Z",
        "preferences": {"frequency": "weekly", "format": "html", "topics": [1, 4, 9]},
        "fields": {
            f"field_{i}": f"value {i} of subscriber {number}" for i in range(18)
        },
        "segments": [number % 7, number % 11, number % 13, 42],
    }


def make_template(number: int) -> dict[str, Any]:
    """Return an email template of about 20 KB of JSON, mostly one HTML string."""
    row = f"<tr><td class='cell'>Block {{i}} of template {number}</td></tr>\n"
    html = "".join(row.format(i=i) for i in range(400))[:19_500]
    return {"id": number, "subject": f"Campaign {number}", "version": 3, "html": html}


SIZES: dict[str, Callable[[int], dict[str, Any]]] = {
    "1 KB": make_profile,
    "20 KB": make_template,
}


class Bench:
    """Cases to time, each a function that runs its loop and returns the op count."""

    def __init__(self, repeats: int) -> None:
        self.repeats = repeats
        self.cases: dict[str, Callable[[], int]] = {}
        self.overheads: dict[str, Callable[[], int]] = {}
        # wall[mode][case] and cpu[case]: ns per operation, one per repeat.
        self.wall: dict[str, dict[str, list[float]]] = {}
        self.cpu: dict[str, list[float]] = {}

    def add(self, name: str, run: Callable[[], int], empty: Callable[[], int]) -> None:
        self.cases[name] = run
        self.overheads[name] = empty

    def run(self, placement: _common.Placement, wait_ready: Callable[[], None]) -> None:
        """Time every case in both CPU modes, alternating modes between repeats."""
        self.wall = {
            mode: {name: [] for name in self.cases} for mode in _common.CPU_MODES
        }
        self.cpu = {name: [] for name in self.cases}
        for run in self.cases.values():
            run()  # warm-up: connections, memo tables, CPU caches
        for _ in range(self.repeats):
            for mode in _common.CPU_MODES:
                with placement.mode(mode):
                    wait_ready()
                    for name, run in self.cases.items():
                        gc.collect()
                        empty_wall, empty_cpu = _common.time_ns_per_op(
                            self.overheads[name]
                        )
                        wall, cpu = _common.time_ns_per_op(run)
                        self.wall[mode][name].append(wall - empty_wall)
                        self.cpu[name].append(cpu - empty_cpu)

    def median(self, mode: str, name: str) -> float:
        """Return the median wall-clock ns per operation of ``name`` in ``mode``."""
        return _common.median(self.wall[mode][name])

    def median_cpu(self, name: str) -> float:
        """Return the median CPU ns per operation of ``name``, over both modes."""
        return _common.median(self.cpu[name])


def keyed_loop(call: Callable[[Any], Any], keys: list[Any]) -> Callable[[], int]:
    def run() -> int:
        for key in keys:
            call(key)
        return len(keys)

    return run


def empty_loop(keys: list[Any]) -> Callable[[], int]:
    def run() -> int:
        for _key in keys:
            pass
        return len(keys)

    return run


# -- the cases ----------------------------------------------------------------------


def add_l1_cases(bench: Bench, servers: Any, rounds: int, caches: list[Any]) -> None:
    memcached = servers.memcached_one
    for size, make in SIZES.items():
        values = {f"l1:{size[:-3]}k:{i}": make(i) for i in range(L1_KEYS)}
        keys = list(values) * rounds

        lru: LRUCache[str, Any] = LRUCache(maxsize=10_000)
        lock = threading.Lock()
        lru.update(values)

        def read_bare(key: str, lru: Any = lru, lock: Any = lock) -> Any:
            with lock:
                return lru[key]

        bench.add(
            f"L1 hit {size}: cachetools LRU + Lock",
            keyed_loop(read_bare, keys),
            empty_loop(keys),
        )
        for copy in (False, True):
            cache = TieredCache(
                Settings(
                    memcached_servers=(memcached.address,),
                    channel_url=servers.redis_url,
                    local_copy=copy,
                    namespace=f"l1{int(copy)}",
                )
            )
            caches.append(cache)
            for key, value in values.items():
                cache.get(key, loader=lambda _key, value=value: value)
            bench.add(
                f"L1 hit {size}: TieredCache local_copy={copy}",
                keyed_loop(cache.get, keys),
                empty_loop(keys),
            )

        region = make_region().configure("dogpile.cache.memory", expiration_time=3600)
        for key, value in values.items():
            region.set(key, value)
        bench.add(
            f"L1 hit {size}: dogpile.cache memory region",
            keyed_loop(region.get, keys),
            empty_loop(keys),
        )
        bench.add(
            f"L1 hit {size}: cashews mem://",
            cashews_loop(values, keys),
            empty_loop(keys),
        )


def cashews_loop(values: dict[str, Any], keys: list[str]) -> Callable[[], int]:
    from cashews import Cache

    cache = Cache()
    cache.setup("mem://")

    async def fill() -> None:
        for key, value in values.items():
            await cache.set(key, value, expire=3600)

    asyncio.run(fill())

    async def read_all() -> None:
        get = cache.get
        for key in keys:
            await get(key)

    def run() -> int:
        # One event loop run per repeat; its start-up cost is spread over
        # every read of the loop.
        asyncio.run(read_all())
        return len(keys)

    return run


def add_l2_cases(bench: Bench, servers: Any, rounds: int, caches: list[Any]) -> None:
    memcached = servers.memcached_one
    bare = Client(
        (memcached.host, memcached.port), no_delay=True, connect_timeout=1, timeout=1
    )
    for size, make in SIZES.items():
        values = {f"l2:{size[:-3]}k:{i}": make(i) for i in range(L1_KEYS)}
        keys = list(values) * rounds
        for key, value in values.items():
            bare.set(key, orjson.dumps(value), noreply=False)

        def read_bare(key: str) -> Any:
            return orjson.loads(bare.get(key))

        bench.add(
            f"L2 hit {size}: pymemcache get + orjson.loads",
            keyed_loop(read_bare, keys),
            empty_loop(keys),
        )
        for copy in (True, False):
            cache = TieredCache(
                Settings(
                    memcached_servers=(memcached.address,),
                    channel_url=servers.redis_url,
                    local_copy=copy,
                    local_max_entries=1,
                    namespace=f"l2{int(copy)}",
                )
            )
            caches.append(cache)
            for key, value in values.items():
                cache.get(key, loader=lambda _key, value=value: value)
            bench.add(
                f"L2 hit {size}: TieredCache local_copy={copy}",
                keyed_loop(cache.get, keys),
                empty_loop(keys),
            )


def add_get_many_cases(
    bench: Bench, servers: Any, calls: int, caches: list[Any]
) -> None:
    pool = servers.memcached_pool
    one = servers.memcached_one
    batches = [[f"gm:{b}:{i}" for i in range(BATCH)] for b in range(2)]
    values = {key: make_profile(i) for batch in batches for i, key in enumerate(batch)}
    sequence = [batches[i % 2] for i in range(calls)]

    bare = Client((one.host, one.port), no_delay=True, connect_timeout=1, timeout=1)
    hashed = HashClient(
        [(server.host, server.port) for server in pool],
        no_delay=True,
        connect_timeout=1,
        timeout=1,
        default_noreply=False,
    )
    for key, value in values.items():
        bare.set(key, orjson.dumps(value), noreply=False)
    hashed.set_many({key: orjson.dumps(value) for key, value in values.items()})

    def read_bare(batch: list[str]) -> Any:
        return {key: orjson.loads(raw) for key, raw in bare.get_many(batch).items()}

    def read_hashed(batch: list[str]) -> Any:
        return {key: orjson.loads(raw) for key, raw in hashed.get_many(batch).items()}

    cache = TieredCache(
        Settings(
            memcached_servers=tuple(server.address for server in pool),
            channel_url=servers.redis_url,
            local_max_entries=1,
            namespace="gm",
        )
    )
    caches.append(cache)
    for batch in batches:
        cache.get_many(batch, loader=lambda keys: {key: values[key] for key in keys})
        found = len(cache.get_many(batch))
        if found != BATCH:
            raise RuntimeError(
                f"get_many warm-up found {found} of {BATCH} keys in L2; remote "
                f"tier counters: {cache.stats()['remote']}"
            )

    def count_keys(read: Callable[[list[str]], Any]) -> Callable[[], int]:
        # One operation is one batch of 100 keys.
        return keyed_loop(read, sequence)

    empty = empty_loop(sequence)
    bench.add("get_many 100: pymemcache Client, 1 server", count_keys(read_bare), empty)
    bench.add(
        "get_many 100: pymemcache HashClient, 3 servers", count_keys(read_hashed), empty
    )
    bench.add("get_many 100: TieredCache, 3 servers", count_keys(cache.get_many), empty)


class KeySlices:
    """Hands out consecutive slices of a key list, so no key is read twice."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = keys
        self.position = 0

    def take(self, count: int) -> list[str]:
        if self.position + count > len(self.keys):
            raise RuntimeError("ran out of fresh origin keys; raise their total")
        chunk = self.keys[self.position : self.position + count]
        self.position += count
        return chunk


def slice_loop(
    call: Callable[[str], Any], slices: KeySlices, count: int
) -> Callable[[], int]:
    def run() -> int:
        for key in slices.take(count):
            call(key)
        return count

    return run


def add_origin_cases(
    bench: Bench, servers: Any, per_repeat: int, caches: list[Any]
) -> None:
    # Fresh keys for the warm-up call and every repeat in both CPU modes.
    total = per_repeat * (bench.repeats * len(_common.CPU_MODES) + 1)
    keys = [f"miss:{i}" for i in range(total)]
    sqlite_path = _common.out_path("micro.sqlite")
    for suffix in ("", "-wal", "-shm"):
        sqlite_path.with_name(sqlite_path.name + suffix).unlink(missing_ok=True)
    origins = {
        "SQLite": SQLiteOrigin(str(sqlite_path)),
        "PostgreSQL": PostgresOrigin(servers.postgres_url),
    }
    empty = empty_loop([""] * per_repeat)
    for name, origin in origins.items():
        for i, key in enumerate(keys):
            origin.store(key, make_profile(i))
        for key in keys:  # warm the database's page cache
            origin.load(key)
        cache = TieredCache(
            Settings(
                memcached_servers=(servers.memcached_one.address,),
                channel_url=servers.redis_url,
                namespace=f"miss{name}",
            ),
            origin=origin,
        )
        caches.append(cache)
        bare_run = slice_loop(origin.load, KeySlices(keys), per_repeat)
        cache_run = slice_loop(cache.get, KeySlices(keys), per_repeat)
        bench.add(f"miss {name}: origin.load", bare_run, empty)
        bench.add(f"miss {name}: TieredCache.get", cache_run, empty)


# -- report -------------------------------------------------------------------------


TARGETS = (
    # (label, case, bare case or None for an absolute bound in µs, goal)
    (
        "L1 hit 1 KB, local_copy=False / cachetools LRU + Lock",
        "L1 hit 1 KB: TieredCache local_copy=False",
        "L1 hit 1 KB: cachetools LRU + Lock",
        2.5,
    ),
    (
        "L1 hit 1 KB, local_copy=True, µs per get",
        "L1 hit 1 KB: TieredCache local_copy=True",
        None,
        3.0,
    ),
    (
        "L2 hit 1 KB, local_copy=True / pymemcache get + orjson.loads",
        "L2 hit 1 KB: TieredCache local_copy=True",
        "L2 hit 1 KB: pymemcache get + orjson.loads",
        1.15,
    ),
    (
        "get_many 100 keys, 3 servers / pymemcache Client, 1 server",
        "get_many 100: TieredCache, 3 servers",
        "get_many 100: pymemcache Client, 1 server",
        1.5,
    ),
)


def case_rows(bench: Bench) -> list[list[str]]:
    """Return one row per case with its cost and its ratio to its group's bare case."""
    rows = []
    bare_of_group: dict[str, str] = {}
    for name in bench.cases:
        bare = bare_of_group.setdefault(name.split(":")[0], name)
        row = [name]
        for mode in _common.CPU_MODES:
            row.append(_common.us(bench.median(mode, name)))
        for mode in _common.CPU_MODES:
            ratio = bench.median(mode, name) / bench.median(mode, bare)
            row.append("bare" if name == bare else f"{ratio:.2f}x")
        row.append(_common.us(bench.median_cpu(name)))
        cpu_ratio = bench.median_cpu(name) / bench.median_cpu(bare)
        row.append("bare" if name == bare else f"{cpu_ratio:.2f}x")
        rows.append(row)
    return rows


def target_rows(bench: Bench) -> list[list[str]]:
    """Return each target with its value in both modes and its verdicts.

    The client CPU column is context, not judged: it shows how much of the
    gap is tiercache's own work rather than waiting.
    """
    rows = []
    for label, case, bare, goal in TARGETS:
        if bare is None:
            values = [bench.median(mode, case) / 1000 for mode in _common.CPU_MODES]
            values.append(bench.median_cpu(case) / 1000)
            cells = [f"{value:.2f} µs" for value in values]
            verdicts = ["PASS" if value < goal else "MISS" for value in values[:2]]
            goal_text = f"< {goal} µs"
        else:
            values = [
                bench.median(mode, case) / bench.median(mode, bare)
                for mode in _common.CPU_MODES
            ]
            values.append(bench.median_cpu(case) / bench.median_cpu(bare))
            cells = [f"{value:.2f}x" for value in values]
            verdicts = [_common.verdict(value, goal) for value in values[:2]]
            goal_text = f"<= {goal}x"
        rows.append([label, goal_text, *cells, *verdicts])
    return rows


def plot(bench: Bench) -> None:
    names = list(bench.cases)
    figure, axes = _common.new_figure(width=9.0, height=0.32 * len(names) + 1.5)
    axis = axes[0][0]
    height = 0.4
    for offset, mode in enumerate(_common.CPU_MODES):
        costs = [max(bench.median(mode, name), 1.0) / 1000 for name in names]
        positions = [i + offset * height for i in range(len(names))]
        axis.barh(positions, costs, height=height, label=mode)
    axis.set_yticks([i + height / 2 for i in range(len(names))], names, fontsize=7)
    axis.invert_yaxis()
    axis.set_xscale("log")
    axis.set_xlabel("µs per operation (median, log scale)")
    axis.set_title("tiercache read paths against the bare libraries")
    axis.legend()
    _common.save_plot(figure, "micro_costs")


def main() -> None:
    args = _common.parse_args(__doc__.splitlines()[0])
    quick = args.quick
    repeats = 3 if quick else 9
    _common.print_header("micro.py: cost per operation", quick)

    bench = Bench(repeats)
    caches: list[TieredCache] = []
    with _common.Servers() as started:
        pool = started.memcached(3)
        servers = _ServerSet(pool, started.redis().url, started.postgres().url)
        add_l1_cases(bench, servers, 30 if quick else 100, caches)
        add_l2_cases(bench, servers, 3 if quick else 10, caches)
        add_get_many_cases(bench, servers, 30 if quick else 100, caches)
        add_origin_cases(bench, servers, 50 if quick else 200, caches)

        def wait_ready() -> None:
            # A cache that doubts its channel reads around L1; wait it out.
            for cache in caches:
                _common.wait_until(
                    lambda cache=cache: cache.bus.is_trusted, 10, "channel subscribe"
                )

        bench.run(started.placement, wait_ready)
        for cache in caches:
            cache.close()

    print(
        f"Median of {repeats} repeats, µs per operation (get_many: per call of "
        f"{BATCH} keys), minus an empty loop. Ratios compare with the first row "
        "of the same group, measured in this run. Client CPU is this thread's "
        "CPU time (server time and waits left out), median over both modes."
    )
    print()
    headers = [
        "case",
        "pinned µs",
        "unpinned µs",
        "pinned ratio",
        "unpinned ratio",
        "client CPU µs",
        "CPU ratio",
    ]
    _common.print_table("Costs", headers, case_rows(bench))
    headers = [
        "target",
        "goal",
        "pinned",
        "unpinned",
        "client CPU",
        "pinned verdict",
        "unpinned verdict",
    ]
    _common.print_table("Targets", headers, target_rows(bench))
    plot(bench)


class _ServerSet:
    def __init__(self, pool: list[Any], redis_url: str, postgres_url: str) -> None:
        self.memcached_pool = pool
        self.memcached_one = pool[0]
        self.redis_url = redis_url
        self.postgres_url = postgres_url


if __name__ == "__main__":
    main()
