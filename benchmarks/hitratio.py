"""L1 hit ratio and origin reads against L1 size, on a Zipf 1.0 key space.

Run ``python benchmarks/hitratio.py [--quick]``. One process reads keys drawn
from 100,000 keys with Zipf 1.0 popularity and writes 5% of the time,
through ``TieredCache`` with L1 bounded to 0.1% to 10% of the keys. The
bound is an entry count: the values are about 200 bytes, so the byte bound
never applies. The
origin is a dict, so the run measures the cache's bookkeeping and not query
cost. Two set-ups per size:

* ``L1 only``: no memcached. Every L1 miss is an origin read.
* ``L1 + L2``: one memcached server that starts holding every key, as a
  new process finds it during a campaign. An L1 miss reads memcached, and
  only keys a write deleted there go back to the origin.

Writes go through ``cache.set``, which stores in the origin, deletes the key
in memcached and evicts it from L1. The table also gives the ideal hit
ratio of a cache of that many entries: the summed popularity of the most
popular keys, which no eviction policy beats when requests are independent.
Memcached and this process are pinned to one CPU to shorten the run; the
figures are counts, not times.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterable
from typing import Any

import _common
import numpy as np
import orjson
from pymemcache.client.base import Client

from tiercache import MISSING, Settings, TieredCache, codec
from tiercache.keys import KeyCodec

KEYS = 100_000
ZIPF_EXPONENT = 1.0
WRITE_FRACTION = 0.05
FRACTIONS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.10)
NAMESPACE = "hitratio"
REMOTE_TTL = 3600


class DictOrigin:
    """An origin in a dict that counts loads; values are about 200 bytes of JSON."""

    def __init__(self, keys: int) -> None:
        self.values = {key_of(i): make_value(i, 0) for i in range(keys)}
        self.loads = 0

    def load(self, key: str) -> Any:
        self.loads += 1
        return self.values.get(key, MISSING)

    def load_many(self, keys: Iterable[str]) -> dict[str, Any]:
        found = {}
        for key in keys:
            self.loads += 1
            if key in self.values:
                found[key] = self.values[key]
        return found

    def store(self, key: str, value: Any) -> None:
        self.values[key] = value

    def delete(self, key: str) -> None:
        self.values.pop(key, None)


def key_of(index: int) -> str:
    return f"subscriber:{index}"


def make_value(index: int, version: int) -> dict[str, Any]:
    return {
        "id": index,
        "email": f"subscriber{index}@example.com",
        "status": "active",
        "locale": "en_GB",
        "version": version,
        "segments": [index % 200, (index * 7) % 200, (index * 13) % 200],
        "fields": {"first_name": f"Name {index}", "plan": "pro"},
    }


def zipf_probabilities(keys: int, exponent: float) -> Any:
    weights = np.arange(1, keys + 1, dtype=np.float64) ** -exponent
    return weights / weights.sum()


def draw_operations(count: int, seed: int) -> tuple[list[int], list[bool]]:
    """Return key indexes (rank order shuffled) and which operations write."""
    rng = np.random.default_rng(seed)
    probabilities = zipf_probabilities(KEYS, ZIPF_EXPONENT)
    ranks = np.searchsorted(np.cumsum(probabilities), rng.random(count))
    ranks = np.minimum(ranks, KEYS - 1)
    permutation = np.random.default_rng(11).permutation(KEYS)
    writes = rng.random(count) < WRITE_FRACTION
    return permutation[ranks].tolist(), writes.tolist()


def prime_memcached(memcached: Any, origin: DictOrigin) -> None:
    """Store every key in memcached as a tiercache fill would."""
    keys = KeyCodec(NAMESPACE)
    threshold = Settings().compress_threshold
    now = time.time()
    client = Client((memcached.host, memcached.port), no_delay=True, timeout=10)
    items = list(origin.values.items())
    for start in range(0, len(items), 1000):
        chunk = {
            keys.encode(key): codec.pack_value(
                orjson.dumps(value),
                compress_threshold=threshold,
                fresh_until=now + REMOTE_TTL,
                expires_at=now + REMOTE_TTL,
            )
            for key, value in items[start : start + 1000]
        }
        client.set_many(chunk, expire=REMOTE_TTL, noreply=False, flags=codec.WIRE_FLAGS)
    client.close()


def run_size(
    entries: int,
    memcached: Any,
    ops: tuple[list[int], list[bool]],
    warm: int,
) -> dict[str, float]:
    """Run the operations through a fresh cache; return the measured counts."""
    origin = DictOrigin(KEYS)
    if memcached is not None:
        memcached.flush()
        prime_memcached(memcached, origin)
    settings = Settings(
        memcached_servers=(memcached.address,) if memcached is not None else (),
        channel_url="",
        namespace=NAMESPACE,
        local_max_entries=entries,
        local_ttl=3600,
        remote_ttl=REMOTE_TTL,
    )
    indexes, writes = ops
    with TieredCache(settings, origin=origin) as cache:
        versions = [0] * KEYS

        def step(index: int, is_write: bool) -> None:
            key = key_of(index)
            if is_write:
                versions[index] += 1
                cache.set(key, make_value(index, versions[index]))
            else:
                cache.get(key)

        for index, is_write in zip(indexes[:warm], writes[:warm], strict=True):
            step(index, is_write)
        before = cache.stats()
        for index, is_write in zip(indexes[warm:], writes[warm:], strict=True):
            step(index, is_write)
        after = cache.stats()
    hits = after["local"]["hits"] - before["local"]["hits"]
    reads = hits + after["local"]["misses"] - before["local"]["misses"]
    loads = after["origin"]["loads"] - before["origin"]["loads"]
    remote_reads = 0
    if memcached is not None:
        remote_reads = sum(
            after["remote"][name] - before["remote"][name]
            for name in ("hits", "misses")
        )
    return {
        "reads": reads,
        "hit_ratio": hits / reads,
        "origin": 1000 * loads / reads,
        "remote": 1000 * remote_reads / reads,
    }


def ideal_hit_ratio(entries: int) -> float:
    """Return the summed popularity of the ``entries`` most popular keys."""
    probabilities = zipf_probabilities(KEYS, ZIPF_EXPONENT)
    return float(probabilities[:entries].sum())


def report(results: dict[tuple[int, str], dict[str, float]], sizes: list[int]) -> None:
    rows = []
    for entries in sizes:
        alone = results[(entries, "L1 only")]
        both = results[(entries, "L1 + L2")]
        rows.append(
            [
                f"{entries / KEYS:.2%}",
                f"{entries:,}",
                f"{ideal_hit_ratio(entries):.3f}",
                f"{alone['hit_ratio']:.3f}",
                f"{alone['hit_ratio'] / ideal_hit_ratio(entries):.2f}",
                f"{alone['origin']:.0f}",
                f"{both['hit_ratio']:.3f}",
                f"{both['remote']:.0f}",
                f"{both['origin']:.1f}",
            ]
        )
    _common.print_table(
        "L1 hit ratio and origin reads per 1,000 reads, by L1 size",
        [
            "L1 size",
            "entries",
            "ideal hit ratio",
            "L1 only: hit ratio",
            "vs ideal",
            "origin/1k reads",
            "L1 + L2: hit ratio",
            "L2/1k reads",
            "origin/1k reads",
        ],
        rows,
    )


def plot(results: dict[tuple[int, str], dict[str, float]], sizes: list[int]) -> None:
    figure, axes = _common.new_figure(2, width=5.6, height=4.2)
    percent = [100 * entries / KEYS for entries in sizes]
    left, right = axes[0]

    left.plot(percent, [ideal_hit_ratio(e) for e in sizes], "k--", label="ideal")
    for name, marker in (("L1 only", "o"), ("L1 + L2", "s")):
        left.plot(
            percent,
            [results[(e, name)]["hit_ratio"] for e in sizes],
            marker=marker,
            label=name,
        )
        right.plot(
            percent,
            [results[(e, name)]["origin"] for e in sizes],
            marker=marker,
            label=name,
        )

    left.set_xscale("log")
    left.set_xlabel("L1 size, % of 100,000 keys")
    left.set_ylabel("L1 hit ratio")
    left.set_ylim(0, 1)
    left.set_title("L1 hit ratio, Zipf 1.0, 5% writes")
    left.legend(fontsize=8)

    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("L1 size, % of 100,000 keys")
    right.set_ylabel("origin reads per 1,000 reads")
    right.set_title("origin reads")
    right.legend(fontsize=8)
    _common.save_plot(figure, "hitratio")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="run 60,000 operations per size, not 300,000",
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    warm, measured = (20_000, 40_000) if args.quick else (100_000, 200_000)
    _common.print_header("hitratio.py: L1 hit ratio by L1 size", args.quick)
    sizes = [round(KEYS * fraction) for fraction in FRACTIONS]
    ops = draw_operations(warm + measured, seed=5)
    results: dict[tuple[int, str], dict[str, float]] = {}
    with _common.Servers() as servers:
        (memcached,) = servers.memcached(1, memory_mb=256)
        with servers.placement.mode("pinned"):
            for entries in sizes:
                results[(entries, "L1 only")] = run_size(entries, None, ops, warm)
                results[(entries, "L1 + L2")] = run_size(entries, memcached, ops, warm)
    reads = results[(sizes[0], "L1 only")]["reads"]
    print(
        f"{KEYS:,} keys, Zipf {ZIPF_EXPONENT}, {WRITE_FRACTION:.0%} writes. Each "
        f"size runs {warm:,} operations of warm-up, then {measured:,} measured "
        f"ones ({reads:,.0f} reads), the same sequence for every size and "
        "set-up. L1 + L2 starts with every key in memcached and an empty L1."
    )
    print()
    report(results, sizes)
    plot(results, sizes)


if __name__ == "__main__":
    main()
