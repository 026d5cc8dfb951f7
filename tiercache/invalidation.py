"""Sending and receiving invalidations, and noticing when some were lost.

A process trusts its local tier only while it is sure it hears every
invalidation. It stops trusting it (flushes it, and with
``on_channel_loss="bypass"`` also reads around it until trust returns) when:

* the channel reports the subscription lost, and again when it is back,
  because messages published in between are gone (Redis pub/sub keeps
  nothing for absent subscribers);
* a sender's sequence number jumps, in a message or a heartbeat;
* the process stops hearing its own heartbeats, which it publishes every
  ``heartbeat_interval`` seconds: a silent subscription looks exactly like
  a quiet system otherwise.

Whatever happens, an L1 entry lives at most ``local_ttl`` seconds, which is
the hard bound on staleness.
"""

from __future__ import annotations

import bisect
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from .contracts import Channel
from .local import LocalTier
from .messages import MalformedMessage, Message, batch_keys, decode_message
from .settings import Settings

log = logging.getLogger(__name__)

# Upper edges, in seconds, of the invalidation delay histogram.
DELAY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class DelayHistogram:
    """Counts of commit-to-eviction delays, by bucket upper edge in seconds."""

    def __init__(self) -> None:
        self.counts = [0] * (len(DELAY_BUCKETS) + 1)
        self.total = 0.0
        self.max = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(DELAY_BUCKETS, seconds)] += 1
        self.total += seconds
        self.max = max(self.max, seconds)

    def snapshot(self) -> dict[str, Any]:
        edges = [str(edge) for edge in DELAY_BUCKETS] + ["+Inf"]
        return {
            "buckets": dict(zip(edges, self.counts, strict=True)),
            "count": sum(self.counts),
            "sum": self.total,
            "max": self.max,
        }


class InvalidationBus:
    """Publishes this process's invalidations and applies everyone else's.

    ``on_evicted``, when set, is called with the keys and sender id of each
    ``inv`` and ``lost`` message from another sender, right after its keys
    were evicted from L1. It runs in the channel's listener thread before the
    next message is read, so it must return quickly. It is there to time
    evictions, because the ``invalidated`` signal is sent later, from the
    signal thread. An exception it raises is logged and skipped.
    """

    def __init__(
        self,
        channel: Channel,
        settings: Settings,
        local: LocalTier,
        *,
        on_invalidated: Callable[[tuple[str, ...], str], None] | None = None,
        on_lost_deletes: Callable[[tuple[str, ...]], None] | None = None,
        on_resync: Callable[[], None] | None = None,
        on_namespace: Callable[[tuple[str, ...]], None] | None = None,
        on_degraded: Callable[[str, str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.channel = channel
        self.settings = settings
        self.local = local
        self._on_invalidated = on_invalidated
        self._on_lost_deletes = on_lost_deletes
        self._on_resync = on_resync
        self._on_namespace = on_namespace
        self._on_degraded = on_degraded
        self.on_evicted: Callable[[tuple[str, ...], str], None] | None = None
        self._clock = clock
        self._lock = threading.Lock()
        self._publish_lock = threading.Lock()
        self._failing_until = 0.0
        self._new_identity()
        self.sent = 0
        self.received = 0
        self.publish_errors = 0
        self.gaps = 0
        self.losses = 0
        self.malformed = 0
        self.flushes = 0
        self.delay = DelayHistogram()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _new_identity(self) -> None:
        self.sender_id = f"{uuid.uuid4().hex[:12]}-{os.getpid()}"
        self._seq = 0
        self._last_seen: dict[str, int] = {}
        self._subscribed = False
        self._deaf = False
        self._update_bypass()
        self._last_own = self._clock()
        self._ever_subscribed = False

    # -- state -----------------------------------------------------------------

    @property
    def is_trusted(self) -> bool:
        """Whether L1 may be read and filled: subscribed and hearing itself."""
        return self._subscribed and not self._deaf

    def _update_bypass(self) -> None:
        # Kept as a plain attribute, because every read checks it. Call this
        # after each change of _subscribed or _deaf.
        self.bypass_local = (
            self.settings.on_channel_loss == "bypass" and not self.is_trusted
        )

    def start(self) -> None:
        """Subscribe and start the heartbeat thread."""
        self.channel.subscribe(self._receive, self._on_state)
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._heartbeat_loop, name="tiercache-heartbeat", daemon=True
        )
        self._thread.start()
        # Tell peers this sender's starting number before it sends anything.
        self._send("hb", [])

    def close(self) -> None:
        """Stop the heartbeat thread and close the channel."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self.channel.close()

    def after_fork(self) -> None:
        """Take a new sender id and subscription in a forked child."""
        self._lock = threading.Lock()
        self._publish_lock = threading.Lock()
        self._new_identity()
        self.channel.after_fork()
        self.start()

    # -- sending ---------------------------------------------------------------

    def publish(self, keys: Iterable[str]) -> bool:
        """Send invalidations for ``keys``; ``False`` if any message failed."""
        ok = True
        max_payload = getattr(self.channel, "max_payload", None)
        for batch in batch_keys(list(keys), max_payload):
            ok = self._send("inv", batch) and ok
        return ok

    def publish_in_transaction(self, connection: Any, keys: list[str]) -> None:
        """Send invalidations through ``connection``'s open transaction.

        Only a channel with ``notify_in_transaction`` (PostgreSQL) supports
        this; others ignore it and rely on the message sent after commit.
        These messages carry sequence number 0: a rollback discards them, so
        they must not take a number that receivers would then miss. Errors
        propagate, because the caller's transaction is still open.
        """
        notify = getattr(self.channel, "notify_in_transaction", None)
        if notify is None:
            return
        max_payload = getattr(self.channel, "max_payload", None)
        for batch in batch_keys(keys, max_payload):
            message = Message("inv", self.sender_id, 0, time.time(), tuple(batch))
            notify(connection, message.encode())

    def publish_lost_deletes(self, keys: Iterable[str]) -> bool:
        """Ask every process to replay deletes of ``keys`` that a server missed."""
        ok = True
        max_payload = getattr(self.channel, "max_payload", None)
        for batch in batch_keys(list(keys), max_payload):
            ok = self._send("lost", batch) and ok
        return ok

    def publish_namespace(self, version_keys: list[str]) -> bool:
        """Tell every process that these namespace versions changed."""
        return self._send("ns", version_keys)

    def publish_flush(self) -> bool:
        """Tell every process to flush its whole local tier."""
        return self._send("flush", [])

    def _send(self, kind: str, keys: list[str]) -> bool:
        # Numbering and publishing under one lock keeps this process's
        # messages in number order on the channel: a receiver reads any
        # number out of order as a lost message and flushes its L1.
        with self._publish_lock:
            with self._lock:
                if kind != "hb":
                    self._seq += 1
                message = Message(
                    kind,  # type: ignore[arg-type]
                    self.sender_id,
                    self._seq,
                    time.time(),
                    tuple(keys),
                )
            return self._publish(kind, message)

    def _publish(self, kind: str, message: Message) -> bool:
        # After a failed publish, writers fail fast until the next heartbeat
        # gets through, rather than each waiting out the channel's timeout in
        # line. Their numbers are still taken, so receivers see the gap and
        # flush, as for any lost message.
        if kind != "hb" and self._clock() < self._failing_until:
            self.publish_errors += 1
            return False
        try:
            self.channel.publish(message.encode())
        except Exception as exc:  # noqa: BLE001 - any driver error; the write committed
            self._failing_until = self._clock() + self.settings.heartbeat_interval
            self.publish_errors += 1
            if self.publish_errors == 1 or self.publish_errors % 1000 == 0:
                log.warning(
                    "invalidation publish failed (%d so far): %s: %s",
                    self.publish_errors,
                    type(exc).__name__,
                    exc,
                )
            return False
        self._failing_until = 0.0
        if kind != "hb":
            self.sent += 1
        return True

    # -- receiving -------------------------------------------------------------

    def _receive(self, payload: bytes) -> None:
        try:
            message = decode_message(payload)
        except MalformedMessage as exc:
            self.malformed += 1
            if self.malformed == 1 or self.malformed % 1000 == 0:
                log.warning(
                    "dropped %d malformed channel messages: %s", self.malformed, exc
                )
            return
        if message.sender == self.sender_id:
            self._heard_self()
            return
        if message.seq == 0:
            # Sent inside a transaction: unnumbered, so no gap accounting.
            self._apply(message)
            return
        with self._lock:
            # An unknown sender counts from 0: if its first message this
            # process hears is not its first, something may have been lost.
            # A peer that was already running costs one spurious flush.
            last = self._last_seen.get(message.sender, 0)
            expected = message.seq if message.kind == "hb" else message.seq - 1
            gap = expected > last
            if message.seq > last:
                self._last_seen[message.sender] = message.seq
        if gap:
            self.gaps += 1
            self._distrust(f"sequence gap from {message.sender}")
        self._apply(message)

    def _apply(self, message: Message) -> None:
        if message.kind == "inv":
            self.received += 1
            self.local.invalidate(message.keys)
            self._report_eviction(message)
            self.delay.observe(max(0.0, time.time() - message.sent_at))
            if self._on_invalidated is not None:
                self._on_invalidated(message.keys, message.sender)
        elif message.kind == "lost":
            self.received += 1
            # Queue the deletes before evicting: the server still contains
            # the old values, and a read that misses L1 after the eviction
            # must replay the deletes before it can read the server. The
            # keys are evicted even if queueing raises.
            try:
                if self._on_lost_deletes is not None:
                    self._on_lost_deletes(message.keys)
            finally:
                self.local.invalidate(message.keys)
            self._report_eviction(message)
        elif message.kind == "ns":
            self.received += 1
            if self._on_namespace is not None:
                self._on_namespace(message.keys)
        elif message.kind == "flush":
            self.received += 1
            self.local.clear()
            self.flushes += 1

    def _report_eviction(self, message: Message) -> None:
        hook = self.on_evicted
        if hook is None:
            return
        try:
            hook(message.keys, message.sender)
        except Exception:  # noqa: BLE001 - the rest of the message must still apply
            log.exception("on_evicted hook failed on a message from %s", message.sender)

    def _heard_self(self) -> None:
        self._last_own = self._clock()
        if self._deaf:
            # Trust returns only after a flush: messages may have been lost
            # while this process could not hear itself.
            self.local.clear()
            self._deaf = False
            self._update_bypass()
            log.warning("invalidation channel heard again; local tier flushed")

    def _on_state(self, connected: bool) -> None:
        # Flush on both edges: entries filled before the loss may have missed
        # invalidations published while the subscription was down.
        self.local.clear()
        self.flushes += 1
        if connected:
            self._resync()
            self._last_own = self._clock()
            self._deaf = False
            self._update_bypass()
            self._subscribed = True
            self._update_bypass()
            if self._ever_subscribed:
                log.warning("invalidation channel resubscribed; local tier flushed")
            self._ever_subscribed = True
        else:
            self._subscribed = False
            self._update_bypass()
            self.losses += 1
            if self._on_degraded is not None:
                self._on_degraded("channel_lost", "subscription lost")
            log.warning(
                "invalidation channel lost; local tier flushed%s",
                " and bypassed" if self.settings.on_channel_loss == "bypass" else "",
            )

    def _resync(self) -> None:
        # Messages may have been missed, "lost" ones among them: the cache
        # replays the recorded deletes before it trusts memcached again.
        if self._on_resync is not None:
            self._on_resync()

    def _distrust(self, reason: str) -> None:
        self.local.clear()
        self._resync()
        self.flushes += 1
        log.warning("local tier flushed: %s", reason)

    def _heartbeat_loop(self) -> None:
        interval = self.settings.heartbeat_interval
        limit = interval * self.settings.heartbeat_misses
        while not self._stop.wait(interval):
            try:
                self._send("hb", [])
                if (
                    self._subscribed
                    and not self._deaf
                    and self._clock() - self._last_own > limit
                ):
                    self._deaf = True
                    self._update_bypass()
                    if self._on_degraded is not None:
                        self._on_degraded("channel_lost", "own heartbeats not heard")
                    # A subscription can die without an error when a connection
                    # drops without a reset, so ask the channel to renew it.
                    renew = getattr(self.channel, "reconnect", None)
                    if renew is not None:
                        renew()
                    self.losses += 1
                    self._distrust(f"no heartbeat of its own heard for {limit:.1f}s")
            except Exception:  # noqa: BLE001 - keep the heartbeat alive, but say why
                log.exception("heartbeat iteration failed")
