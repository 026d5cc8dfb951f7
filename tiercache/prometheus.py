"""A prometheus_client collector that exposes :meth:`TieredCache.stats` figures.

Install the extra with ``pip install 'tiercache[prometheus]'``. Only this
module imports prometheus_client. The collector reads
``cache.stats()`` at every scrape, so it adds nothing to the read path::

    from tiercache.prometheus import register

    register(cache, name="profiles")  # on prometheus_client.REGISTRY

Every series carries the label ``cache``. Counters are named
``tiercache_<tier>_<thing>_total`` (``tiercache_local_hits_total``,
``tiercache_remote_node_downs_total``, ``tiercache_invalidations_gaps_total``
and so on). The error counters of ``stats()["errors"]`` share
``tiercache_errors_total`` with a ``kind`` label. Gauges report L1 entries
and bytes, whether the channel is trusted, and the largest invalidation
delay seen. ``tiercache_invalidation_delay_seconds`` is a histogram of the
delay from publishing an invalidation to evicting it here, with the bucket
edges of :data:`tiercache.invalidation.DELAY_BUCKETS`. A cache without a
remote tier exposes no ``tiercache_remote_*`` series, and one without a
channel no ``tiercache_invalidation*`` or ``tiercache_channel_*`` series.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from .invalidation import DELAY_BUCKETS

if TYPE_CHECKING:
    from .cache import TieredCache

__all__ = ["TierCacheCollector", "register"]


class _Figure(NamedTuple):
    """One figure of ``stats()``: its section and field, and its metric."""

    section: str
    field: str
    metric: str
    documentation: str


_COUNTERS = (
    _Figure("local", "hits", "tiercache_local_hits", "Reads served by L1."),
    _Figure(
        "local",
        "misses",
        "tiercache_local_misses",
        "L1 reads that found nothing or an expired entry.",
    ),
    _Figure("local", "fills", "tiercache_local_fills", "Values stored in L1."),
    _Figure(
        "local",
        "evictions",
        "tiercache_local_evictions",
        "L1 entries evicted to stay within the entry and byte bounds.",
    ),
    _Figure(
        "local",
        "expirations",
        "tiercache_local_expirations",
        "L1 entries dropped when read after their TTL.",
    ),
    _Figure(
        "local",
        "dropped_fills",
        "tiercache_local_dropped_fills",
        "L1 fills dropped because the key was invalidated while they loaded.",
    ),
    _Figure(
        "local",
        "oversized",
        "tiercache_local_oversized",
        "Values kept out of L1 because they exceed its byte bound.",
    ),
    _Figure("remote", "hits", "tiercache_remote_hits", "Reads served by memcached."),
    _Figure(
        "remote",
        "misses",
        "tiercache_remote_misses",
        "memcached reads that found nothing.",
    ),
    _Figure(
        "remote",
        "errors",
        "tiercache_remote_errors",
        "memcached commands that failed or timed out.",
    ),
    _Figure(
        "remote",
        "node_downs",
        "tiercache_remote_node_downs",
        "Times a memcached server was marked down.",
    ),
    _Figure(
        "remote",
        "skipped_down",
        "tiercache_remote_skipped_down",
        "Commands skipped because their server was marked down.",
    ),
    _Figure(
        "remote",
        "deletes_queued",
        "tiercache_remote_deletes_queued",
        "Deletes queued for a server that was down, replayed before it serves again.",
    ),
    _Figure(
        "remote",
        "tombstones_unverified",
        "tiercache_remote_tombstones_unverified",
        "Servers used again before their record of missed deletes could be read.",
    ),
    _Figure(
        "remote",
        "refused_stores",
        "tiercache_remote_refused_stores",
        "Stores that memcached rejected as too large.",
    ),
    _Figure(
        "remote",
        "undecodable_flags",
        "tiercache_remote_undecodable_flags",
        "memcached items with flags tiercache does not write, read as misses.",
    ),
    _Figure(
        "origin",
        "loads",
        "tiercache_origin_loads",
        "Keys loaded from the origin on a miss.",
    ),
    _Figure(
        "origin",
        "stores",
        "tiercache_origin_stores",
        "Writes and deletes committed to the origin through the cache.",
    ),
    _Figure(
        "invalidations",
        "sent",
        "tiercache_invalidations_sent",
        "Invalidation messages published.",
    ),
    _Figure(
        "invalidations",
        "received",
        "tiercache_invalidations_received",
        "Invalidation messages received from other processes.",
    ),
    _Figure(
        "invalidations",
        "publish_errors",
        "tiercache_invalidations_publish_errors",
        "Invalidation messages the channel failed to publish.",
    ),
    _Figure(
        "invalidations",
        "gaps",
        "tiercache_invalidations_gaps",
        "Gaps in a sender's sequence numbers, each followed by an L1 flush.",
    ),
    _Figure(
        "invalidations",
        "channel_losses",
        "tiercache_invalidations_channel_losses",
        "Times the channel subscription was lost or went silent.",
    ),
    _Figure(
        "invalidations",
        "local_flushes",
        "tiercache_invalidations_local_flushes",
        "Whole-L1 flushes caused by channel events.",
    ),
    _Figure(
        "invalidations",
        "malformed",
        "tiercache_invalidations_malformed",
        "Channel messages dropped as malformed.",
    ),
    _Figure(
        "leases",
        "waits",
        "tiercache_lease_waits",
        "Misses that waited for another caller's lease.",
    ),
    _Figure(
        "leases",
        "wait_timeouts",
        "tiercache_lease_wait_timeouts",
        "Lease waits that ran out and loaded without filling memcached.",
    ),
    _Figure(
        "leases",
        "stale_fills_dropped",
        "tiercache_lease_stale_fills_dropped",
        "memcached fills dropped because a write voided their lease.",
    ),
    _Figure(
        "refresh",
        "stale_served",
        "tiercache_stale_served",
        "Stale memcached values served while one caller refreshes them.",
    ),
    _Figure("refresh", "refreshes", "tiercache_refreshes", "Background refreshes run."),
    _Figure(
        "refresh",
        "errors",
        "tiercache_refresh_errors",
        "Background refreshes whose loader raised.",
    ),
)

_GAUGES = (
    _Figure("local", "entries", "tiercache_local_entries", "Entries in L1 now."),
    _Figure(
        "local",
        "bytes",
        "tiercache_local_bytes",
        "Bytes charged for the entries in L1 now (an estimate).",
    ),
    _Figure(
        "invalidations",
        "trusted",
        "tiercache_channel_trusted",
        "1 while the channel is subscribed and hears its own heartbeats, else 0.",
    ),
)

_ERRORS_METRIC = "tiercache_errors"
_ERRORS_DOCUMENTATION = (
    "Errors counted by the cache, by kind. receiver_failures counts every "
    "signal receiver that raised in this process, whichever cache sent it."
)
_DELAY_METRIC = "tiercache_invalidation_delay_seconds"
_DELAY_DOCUMENTATION = (
    "Seconds from publishing an invalidation in another process to evicting "
    "it here, measured with the wall clocks of both processes."
)
_DELAY_MAX_METRIC = "tiercache_invalidation_delay_max_seconds"
_DELAY_MAX_DOCUMENTATION = "The largest invalidation delay seen, in seconds."
_LABELS = ["cache"]


class TierCacheCollector:
    """A custom collector that reports the figures of one or more caches.

    Register it with a ``prometheus_client`` registry, or use
    :func:`register`. One collector serves every cache registered on one
    registry, because a registry rejects two collectors that expose the same
    metric names. The collector keeps only weak references, so a cache that
    is garbage collected drops out of the next scrape.

    :param cache: the first cache to report.
    :param name: the value of the ``cache`` label for it.
    :raises ValueError: if ``name`` is empty.
    """

    def __init__(self, cache: TieredCache, *, name: str = "default") -> None:
        self._lock = threading.Lock()
        self._caches: dict[str, weakref.ref[TieredCache]] = {}
        self.add(cache, name=name)

    def add(self, cache: TieredCache, *, name: str) -> None:
        """Report ``cache`` too, labelled ``cache=name``.

        :raises ValueError: if ``name`` is empty or already labels another
            live cache of this collector.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"invalid cache name {name!r}: expected a non-empty str")
        with self._lock:
            current = self._caches.get(name)
            known = current() if current is not None else None
            if known is not None and known is not cache:
                raise ValueError(
                    f"cache name {name!r} already labels another cache of this "
                    "collector: pass a different name="
                )
            self._caches[name] = weakref.ref(cache)

    def remove(self, name: str) -> None:
        """Stop reporting the cache labelled ``name``, if there is one."""
        with self._lock:
            self._caches.pop(name, None)

    @property
    def names(self) -> list[str]:
        """The ``cache`` label values of the live caches reported, sorted."""
        return [name for name, _cache in self._live()]

    def describe(self) -> list[Metric]:
        """Return every metric family this collector can expose, without samples.

        A registry calls this to reject a second collector with the same
        names, so it needs no scrape to do so.
        """
        families = _new_families()
        return list(families.values())

    def collect(self) -> Iterator[Metric]:
        """Yield the metric families of every live cache, read from ``stats()``."""
        families = _new_families()
        used: set[str] = set()
        for name, cache in self._live():
            used.update(_add_samples(families, name, cache.stats()))
        for metric, family in families.items():
            if metric in used:
                yield family

    def _live(self) -> list[tuple[str, TieredCache]]:
        with self._lock:
            items = list(self._caches.items())
        live = []
        for name, reference in sorted(items):
            cache = reference()
            if cache is not None:
                live.append((name, cache))
        return live


def _new_families() -> dict[str, Metric]:
    families: dict[str, Metric] = {}
    for figure in _COUNTERS:
        families[figure.metric] = CounterMetricFamily(
            figure.metric, figure.documentation, labels=_LABELS
        )
    families[_ERRORS_METRIC] = CounterMetricFamily(
        _ERRORS_METRIC, _ERRORS_DOCUMENTATION, labels=[*_LABELS, "kind"]
    )
    for figure in _GAUGES:
        families[figure.metric] = GaugeMetricFamily(
            figure.metric, figure.documentation, labels=_LABELS
        )
    families[_DELAY_MAX_METRIC] = GaugeMetricFamily(
        _DELAY_MAX_METRIC, _DELAY_MAX_DOCUMENTATION, labels=_LABELS
    )
    families[_DELAY_METRIC] = HistogramMetricFamily(
        _DELAY_METRIC, _DELAY_DOCUMENTATION, labels=_LABELS
    )
    return families


def _add_samples(
    families: Mapping[str, Metric], name: str, stats: Mapping[str, Any]
) -> set[str]:
    """Add one cache's samples to ``families`` and return the metrics it filled."""
    used: set[str] = set()
    for figure in (*_COUNTERS, *_GAUGES):
        section = stats.get(figure.section)
        if section is None or figure.field not in section:
            continue
        family = families[figure.metric]
        assert isinstance(family, CounterMetricFamily | GaugeMetricFamily)
        family.add_metric([name], float(section[figure.field]))
        used.add(figure.metric)
    errors = stats.get("errors")
    if errors:
        family = families[_ERRORS_METRIC]
        assert isinstance(family, CounterMetricFamily)
        for kind, count in sorted(errors.items()):
            family.add_metric([name, kind], float(count))
        used.add(_ERRORS_METRIC)
    invalidations = stats.get("invalidations")
    if invalidations is not None and "delay" in invalidations:
        delay = invalidations["delay"]
        histogram = families[_DELAY_METRIC]
        assert isinstance(histogram, HistogramMetricFamily)
        histogram.add_metric(
            [name], _cumulative_buckets(delay["buckets"]), float(delay["sum"])
        )
        maximum = families[_DELAY_MAX_METRIC]
        assert isinstance(maximum, GaugeMetricFamily)
        maximum.add_metric([name], float(delay["max"]))
        used.update((_DELAY_METRIC, _DELAY_MAX_METRIC))
    return used


def _cumulative_buckets(counts: Mapping[str, int]) -> list[tuple[str, float]]:
    """Turn per-bucket counts keyed by upper edge into Prometheus ``le`` buckets.

    ``DelayHistogram`` counts each delay once, in the first bucket whose
    edge is at least the delay; Prometheus buckets count every observation
    at or below their edge, so each one adds up the buckets before it.
    """
    buckets: list[tuple[str, float]] = []
    total = 0
    for edge in DELAY_BUCKETS:
        total += counts.get(str(edge), 0)
        buckets.append((_format_edge(edge), float(total)))
    total += counts.get("+Inf", 0)
    buckets.append(("+Inf", float(total)))
    return buckets


def _format_edge(edge: float) -> str:
    # prometheus_client's own Histogram writes le with floatToGoString
    # ("0.001", "1.0"), and repr() of a float gives the same text here.
    return repr(float(edge))


# One collector per registry, so register() can add caches to it.
_COLLECTORS: weakref.WeakKeyDictionary[CollectorRegistry, TierCacheCollector] = (
    weakref.WeakKeyDictionary()
)
_COLLECTORS_LOCK = threading.Lock()


def register(
    cache: TieredCache,
    registry: CollectorRegistry | None = None,
    *,
    name: str = "default",
) -> TierCacheCollector:
    """Expose ``cache``'s figures on ``registry``, labelled ``cache=name``.

    The first call for a registry registers a :class:`TierCacheCollector`;
    later calls add their cache to that collector.

    :param registry: ``prometheus_client.REGISTRY`` when omitted.
    :returns: the collector, for ``registry.unregister(collector)``.
    :raises ValueError: if ``name`` is empty or labels another live cache on
        this registry, or if another collector on the registry already
        exposes tiercache's metric names.
    """
    target = REGISTRY if registry is None else registry
    with _COLLECTORS_LOCK:
        collector = TierCacheCollector(cache, name=name)
        try:
            target.register(collector)
        except ValueError:
            # The names are taken, either by this module's collector, which
            # then reports the cache too, or by another collector (an error).
            existing = _COLLECTORS.get(target)
            if existing is None:
                raise
            existing.add(cache, name=name)
            return existing
        _COLLECTORS[target] = collector
        return collector
