"""Tests of the Prometheus collector against real memcached and a memory channel."""

from __future__ import annotations

import gc
import math
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tiercache import Settings, TieredCache
from tiercache.adapters.sqlite import SQLiteOrigin
from tiercache.invalidation import DELAY_BUCKETS
from tiercache.prometheus import TierCacheCollector, register
from tiercache.testing import MemcachedServer

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
def make_cache(
    memcached: MemcachedServer, tmp_path: Path
) -> Iterator[Callable[..., TieredCache]]:
    """Build caches that share one memcached, one SQLite origin and one channel."""
    origin = SQLiteOrigin(str(tmp_path / "origin.db"))
    channel_url = f"memory://{uuid.uuid4().hex}"
    caches: list[TieredCache] = []

    def make(**overrides: Any) -> TieredCache:
        settings = Settings(
            memcached_servers=(memcached.address,),
            channel_url=channel_url,
            ttl_jitter=0.0,
        ).replace(**overrides)
        cache = TieredCache(settings, origin=origin)
        caches.append(cache)
        return cache

    yield make
    for cache in caches:
        cache.close()


def scrape(registry: CollectorRegistry) -> Samples:
    """Return every sample of the text exposition, by name and sorted labels."""
    text = generate_latest(registry).decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            samples[(sample.name, labels)] = sample.value
    return samples


def value(samples: Samples, name: str, cache: str, **labels: str) -> float:
    key = (name, tuple(sorted({"cache": cache, **labels}.items())))
    assert key in samples, f"{name} {labels} for cache {cache!r} not exposed"
    return samples[key]


def run_traffic(a: TieredCache, b: TieredCache) -> None:
    """Write and read one key through two caches that share memcached."""
    a.set("k1", {"v": 1})
    assert a.get("k1") == {"v": 1}
    assert a.get("k1") == {"v": 1}
    assert b.get("k1") == {"v": 1}
    assert b.get("k1") == {"v": 1}
    a.set("k1", {"v": 2})
    assert b.get("k2", default=None) is None


def test_counters_match_known_traffic(
    make_cache: Callable[..., TieredCache],
) -> None:
    a, b = make_cache(), make_cache()
    registry = CollectorRegistry()
    register(a, registry, name="a")
    register(b, registry, name="b")
    run_traffic(a, b)

    samples = scrape(registry)

    assert value(samples, "tiercache_local_hits_total", "a") == 1
    assert value(samples, "tiercache_local_misses_total", "a") == 1
    assert value(samples, "tiercache_local_fills_total", "a") == 1
    assert value(samples, "tiercache_origin_loads_total", "a") == 1
    assert value(samples, "tiercache_origin_stores_total", "a") == 2
    assert value(samples, "tiercache_invalidations_sent_total", "a") == 2
    assert value(samples, "tiercache_invalidations_received_total", "a") == 0
    assert value(samples, "tiercache_local_hits_total", "b") == 1
    assert value(samples, "tiercache_remote_hits_total", "b") == 1
    # k2 is not in the origin: one more load, cached as absent.
    assert value(samples, "tiercache_origin_loads_total", "b") == 1
    assert value(samples, "tiercache_invalidations_received_total", "b") == 2
    assert value(samples, "tiercache_invalidations_gaps_total", "b") == 0
    assert value(samples, "tiercache_channel_trusted", "b") == 1


def test_every_figure_matches_stats(make_cache: Callable[..., TieredCache]) -> None:
    a, b = make_cache(), make_cache()
    registry = CollectorRegistry()
    register(a, registry, name="a")
    run_traffic(a, b)
    assert a.get("k1") == {"v": 2}
    stats = a.stats()

    samples = scrape(registry)

    expected = {
        "tiercache_local_evictions_total": stats["local"]["evictions"],
        "tiercache_local_expirations_total": stats["local"]["expirations"],
        "tiercache_local_dropped_fills_total": stats["local"]["dropped_fills"],
        "tiercache_local_entries": stats["local"]["entries"],
        "tiercache_local_bytes": stats["local"]["bytes"],
        "tiercache_remote_hits_total": stats["remote"]["hits"],
        "tiercache_remote_misses_total": stats["remote"]["misses"],
        "tiercache_remote_errors_total": stats["remote"]["errors"],
        "tiercache_remote_node_downs_total": stats["remote"]["node_downs"],
        "tiercache_invalidations_channel_losses_total": stats["invalidations"][
            "channel_losses"
        ],
        "tiercache_lease_waits_total": stats["leases"]["waits"],
        "tiercache_stale_served_total": stats["refresh"]["stale_served"],
        "tiercache_refreshes_total": stats["refresh"]["refreshes"],
        "tiercache_refresh_errors_total": stats["refresh"]["errors"],
    }
    for name, figure in expected.items():
        assert value(samples, name, "a") == figure, name
    for kind, count in stats["errors"].items():
        assert value(samples, "tiercache_errors_total", "a", kind=kind) == count
    assert stats["local"]["entries"] == 1
    assert stats["local"]["bytes"] > 0


def test_every_stats_figure_exposed(
    make_cache: Callable[..., TieredCache],
) -> None:
    """Each number of stats() has a series, so new figures can't be forgotten."""
    a = make_cache()
    registry = CollectorRegistry()
    register(a, registry, name="a")
    a.set("k1", {"v": 1})
    stats = a.stats()

    exposed = {name for name, _labels in scrape(registry)}

    for section, figures in stats.items():
        for field in figures:
            if section == "invalidations" and field == "delay":
                continue
            candidates = {
                f"tiercache_{section}_{field}_total",
                f"tiercache_{section.rstrip('s')}_{field}_total",
                f"tiercache_{field}_total",
                f"tiercache_{section}_{field}",
                f"tiercache_channel_{field}",
            }
            if section == "errors":
                candidates = {"tiercache_errors_total"}
            if section == "refresh" and field == "errors":
                candidates = {"tiercache_refresh_errors_total"}
            assert candidates & exposed, f"stats()[{section!r}][{field!r}]"


def test_histogram_is_cumulative(make_cache: Callable[..., TieredCache]) -> None:
    b = make_cache()
    registry = CollectorRegistry()
    register(b, registry, name="b")
    assert b.bus is not None
    # Delays on both sides of some edges, and two on an edge, which
    # Prometheus counts in that edge's bucket (le means "at most").
    for seconds in (0.0003, 0.001, 0.001, 0.02, 0.3, 5.0):
        b.bus.delay.observe(seconds)

    samples = scrape(registry)

    name = "tiercache_invalidation_delay_seconds"
    exposed = {
        edge: value(samples, f"{name}_bucket", "b", le=repr(float(edge)))
        for edge in DELAY_BUCKETS
    }
    assert exposed == {
        0.0005: 1,
        0.001: 3,
        0.0025: 3,
        0.005: 3,
        0.01: 3,
        0.025: 4,
        0.05: 4,
        0.1: 4,
        0.25: 4,
        1.0: 5,
    }
    assert value(samples, f"{name}_bucket", "b", le="+Inf") == 6
    assert value(samples, f"{name}_count", "b") == 6
    assert math.isclose(value(samples, f"{name}_sum", "b"), 5.3223)
    assert value(samples, "tiercache_invalidation_delay_max_seconds", "b") == 5.0


def test_histogram_matches_buckets_of_stats(
    make_cache: Callable[..., TieredCache],
) -> None:
    a, b = make_cache(), make_cache()
    registry = CollectorRegistry()
    register(b, registry, name="b")
    for number in range(20):
        a.set(f"k{number}", number)
    delay = b.stats()["invalidations"]["delay"]

    samples = scrape(registry)

    assert delay["count"] == 20
    running = 0
    for edge in DELAY_BUCKETS:
        running += delay["buckets"][str(edge)]
        exposed = value(
            samples, "tiercache_invalidation_delay_seconds_bucket", "b", le=str(edge)
        )
        assert exposed == running, edge
    infinite = value(
        samples, "tiercache_invalidation_delay_seconds_bucket", "b", le="+Inf"
    )
    assert infinite == running + delay["buckets"]["+Inf"] == 20
    assert value(samples, "tiercache_invalidation_delay_seconds_count", "b") == 20
    assert math.isclose(
        value(samples, "tiercache_invalidation_delay_seconds_sum", "b"), delay["sum"]
    )


def test_text_exposition_lines(make_cache: Callable[..., TieredCache]) -> None:
    a, b = make_cache(), make_cache()
    registry = CollectorRegistry()
    register(a, registry, name="a")
    run_traffic(a, b)

    text = generate_latest(registry).decode()

    assert "# TYPE tiercache_local_hits_total counter" in text
    assert 'tiercache_local_hits_total{cache="a"} 1.0\n' in text
    assert "# TYPE tiercache_local_bytes gauge" in text
    assert "# TYPE tiercache_invalidation_delay_seconds histogram" in text
    assert text.count("# TYPE tiercache_local_hits_total") == 1


def test_cache_without_remote_or_channel(tmp_path: Path) -> None:
    origin = SQLiteOrigin(str(tmp_path / "origin.db"))
    settings = Settings(memcached_servers=(), channel_url="")
    with TieredCache(settings, origin=origin) as cache:
        registry = CollectorRegistry()
        register(cache, registry)
        cache.set("k", "v")
        assert cache.get("k") == "v"

        text = generate_latest(registry).decode()

    assert 'tiercache_origin_loads_total{cache="default"} 1.0' in text
    assert "tiercache_remote_" not in text
    assert "tiercache_invalidation" not in text
    assert "tiercache_channel_trusted" not in text


def test_register_adds_to_one_collector(
    make_cache: Callable[..., TieredCache],
) -> None:
    a, b = make_cache(), make_cache()
    registry = CollectorRegistry()

    first = register(a, registry, name="a")
    second = register(b, registry, name="b")

    assert first is second
    assert first.names == ["a", "b"]


def test_register_rejects_taken_name(make_cache: Callable[..., TieredCache]) -> None:
    a, b = make_cache(), make_cache()
    registry = CollectorRegistry()
    register(a, registry, name="a")

    with pytest.raises(ValueError, match="'a' already labels another cache"):
        register(b, registry, name="a")


def test_register_same_cache_twice(make_cache: Callable[..., TieredCache]) -> None:
    a = make_cache()
    registry = CollectorRegistry()

    register(a, registry, name="a")
    collector = register(a, registry, name="a")

    assert collector.names == ["a"]


def test_collector_rejects_empty_name(
    make_cache: Callable[..., TieredCache],
) -> None:
    with pytest.raises(ValueError, match="invalid cache name ''"):
        TierCacheCollector(make_cache(), name="")


def test_second_collector_clashes(make_cache: Callable[..., TieredCache]) -> None:
    registry = CollectorRegistry()
    registry.register(TierCacheCollector(make_cache(), name="a"))

    with pytest.raises(ValueError, match="Duplicated timeseries"):
        registry.register(TierCacheCollector(make_cache(), name="b"))


def test_register_after_unregister(make_cache: Callable[..., TieredCache]) -> None:
    a, b = make_cache(), make_cache()
    registry = CollectorRegistry()
    first = register(a, registry, name="a")
    registry.unregister(first)

    second = register(b, registry, name="b")

    assert second is not first
    assert second.names == ["b"]
    assert 'cache="a"' not in generate_latest(registry).decode()


def test_collected_cache_drops_out(tmp_path: Path) -> None:
    origin = SQLiteOrigin(str(tmp_path / "origin.db"))
    settings = Settings(memcached_servers=(), channel_url="")
    cache = TieredCache(settings, origin=origin)
    registry = CollectorRegistry()
    collector = register(cache, registry, name="gone")
    assert collector.names == ["gone"]

    del cache
    gc.collect()

    assert collector.names == []
    assert "tiercache_" not in generate_latest(registry).decode()
