"""blinker signals that report cache events inside a process.

Connect a receiver to any of them; ``sender`` is the :class:`TieredCache`.
A receiver that raises is logged and skipped: it never breaks a read or a
write, and the remaining receivers still run (blinker's own ``send`` would
stop at the first exception). Signals carry keys, never values.

* ``hit`` (``key``, ``tier``: ``"local"`` or ``"remote"``)
* ``miss`` (``key``): no tier held the key
* ``fill`` (``key``, ``tier``)
* ``invalidated`` (``keys``, ``origin``: ``"local"`` or a sender id). For
  invalidations from other processes it is sent from a thread of its own
  after the eviction, so a slow receiver can't delay evictions. To time
  the eviction itself, set ``cache.bus.on_evicted`` instead (see
  :class:`~tiercache.invalidation.InvalidationBus`).
* ``degraded`` (``event``: ``"node_down"`` or ``"channel_lost"``,
  ``detail``: the server address or the reason), once per state change
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from typing import Any

from blinker import Namespace, Signal

log = logging.getLogger(__name__)

signals = Namespace()

hit = signals.signal("tiercache.hit")
miss = signals.signal("tiercache.miss")
fill = signals.signal("tiercache.fill")
invalidated = signals.signal("tiercache.invalidated")
degraded = signals.signal("tiercache.degraded")

_failures = 0


def send_robust(signal: Signal, sender: Any, **kwargs: Any) -> None:
    """Call every receiver of ``signal``, logging and skipping any that raise."""
    global _failures
    if not signal.receivers:
        return
    for receiver in signal.receivers_for(sender):
        try:
            receiver(sender, **kwargs)
        except Exception:  # noqa: BLE001 - a receiver must not break the cache
            _failures += 1
            if _failures <= 10 or _failures % 1000 == 0:
                log.exception(
                    "receiver %r of signal %s raised (%d failures so far)",
                    receiver,
                    getattr(signal, "name", signal),
                    _failures,
                )


def receiver_failures() -> int:
    """Return how many receiver calls have raised in this process."""
    return _failures


# Signals about invalidations received from other processes are sent from a
# thread of their own: the channel's listener evicts L1 and goes on to the
# next message at once, so a slow receiver can't hold back evictions.
_QUEUE_MAX = 10_000
_queue: queue.Queue[tuple[Signal, Any, dict[str, Any]]] = queue.Queue(_QUEUE_MAX)
_worker: threading.Thread | None = None
_worker_lock = threading.Lock()
_dropped = 0


def send_later(signal: Signal, sender: Any, **kwargs: Any) -> None:
    """Queue a :func:`send_robust` for the signal thread, or drop it if full."""
    global _worker, _dropped
    if not signal.receivers:
        return
    if _worker is None or not _worker.is_alive():
        with _worker_lock:
            if _worker is None or not _worker.is_alive():
                _worker = threading.Thread(
                    target=_send_queued, name="tiercache-signals", daemon=True
                )
                _worker.start()
    try:
        _queue.put_nowait((signal, sender, kwargs))
    except queue.Full:
        _dropped += 1
        if _dropped == 1 or _dropped % 1000 == 0:
            log.warning(
                "signal queue full: %d signals dropped; receivers are too slow",
                _dropped,
            )


def _send_queued() -> None:
    while True:
        signal, sender, kwargs = _queue.get()
        send_robust(signal, sender, **kwargs)


def dropped_signals() -> int:
    """Return how many queued signals were dropped because the queue was full."""
    return _dropped


def _after_fork_in_child() -> None:
    global _worker, _queue, _worker_lock
    _worker = None
    _worker_lock = threading.Lock()
    _queue = queue.Queue(_QUEUE_MAX)


os.register_at_fork(after_in_child=_after_fork_in_child)
