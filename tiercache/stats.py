"""The snapshot of counters that :meth:`TieredCache.stats` returns."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import signals

if TYPE_CHECKING:
    from .cache import TieredCache


def snapshot(cache: TieredCache) -> dict[str, Any]:
    """Collect the counters of each tier, the leases and the channel.

    Counters are plain integers bumped without a lock, so under heavy
    threading a snapshot may undercount by a few. They are for monitoring,
    not for accounting.
    """
    local = cache.local
    figures: dict[str, Any] = {
        "local": {
            "hits": local.hits,
            "misses": local.misses,
            "fills": local.fills,
            "evictions": local.evictions,
            "expirations": local.expirations,
            "dropped_fills": local.dropped_fills,
            "oversized": local.oversized,
            "entries": len(local),
            "bytes": local.current_bytes,
        },
        "origin": {"loads": cache.loads, "stores": cache.stores},
        "leases": {
            "waits": cache.lease_waits,
            "wait_timeouts": cache.lease_wait_timeouts,
            "stale_fills_dropped": cache.stale_fills_dropped,
        },
        "refresh": {
            "stale_served": cache.stale_served,
            "refreshes": cache.refreshes,
            "errors": cache.refresh_errors,
        },
        "errors": {
            "undecodable": cache.undecodable,
            "too_large": cache.too_large,
            "invalidations_failed": cache.invalidations_failed,
            "receiver_failures": signals.receiver_failures(),
        },
    }
    remote = cache.remote
    if remote is not None:
        figures["remote"] = {
            "hits": remote.hits,
            "misses": remote.misses,
            "errors": remote.errors,
            "node_downs": remote.node_downs,
            "skipped_down": remote.skipped_down,
            "deletes_queued": remote.deletes_queued,
            "tombstones_unverified": remote.tombstones_unverified,
            "refused_stores": remote.too_large,
            "undecodable_flags": remote.undecodable,
        }
    bus = cache.bus
    if bus is not None:
        figures["invalidations"] = {
            "sent": bus.sent,
            "received": bus.received,
            "publish_errors": bus.publish_errors,
            "gaps": bus.gaps,
            "channel_losses": bus.losses,
            "local_flushes": bus.flushes,
            "malformed": bus.malformed,
            "trusted": bus.is_trusted,
            "delay": bus.delay.snapshot(),
        }
    return figures
