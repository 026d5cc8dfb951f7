"""blinker signals that report cache events inside a process.

Connect a receiver to any of them; ``sender`` is the :class:`TieredCache`.
A receiver that raises is logged and skipped: it never breaks a read or a
write, and the remaining receivers still run (blinker's own ``send`` would
stop at the first exception). Signals carry keys, never values.

* ``hit`` (``key``, ``tier``: ``"local"`` or ``"remote"``)
* ``miss`` (``key``): no tier held the key
* ``fill`` (``key``, ``tier``)
* ``invalidated`` (``keys``, ``origin``: ``"local"`` or a sender id)
* ``degraded`` (``event``, ``detail``): a node marked down, the channel lost
"""

from __future__ import annotations

import logging
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
