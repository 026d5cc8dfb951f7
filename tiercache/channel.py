"""The in-process channel and the factory that builds a channel from its URL."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, cast

from .contracts import Channel
from .errors import ChannelError

Receiver = Callable[[bytes], None]
StateReceiver = Callable[[bool], None]


class MemoryChannel:
    """A channel between the caches of one process, named by ``memory://NAME``.

    Messages are delivered synchronously, in the publishing thread, to every
    cache subscribed under the same name. ``drop`` lets a test lose chosen
    messages on purpose: it is called with each payload and drops it when
    it returns ``True``.
    """

    max_payload: int | None = None
    _hubs: dict[str, list[MemoryChannel]] = {}
    _hubs_lock = threading.Lock()

    def __init__(self, name: str = "default") -> None:
        self.name = name
        self.drop: Callable[[bytes], bool] | None = None
        self._receiver: Receiver | None = None
        self._on_state: StateReceiver | None = None
        self.published = 0

    def publish(self, payload: bytes) -> None:
        self.published += 1
        with self._hubs_lock:
            peers = list(self._hubs.get(self.name, ()))
        for peer in peers:
            if peer.drop is not None and peer.drop(payload):
                continue
            if peer._receiver is not None:
                peer._receiver(payload)

    def subscribe(self, receiver: Receiver, on_state: StateReceiver) -> None:
        self._receiver, self._on_state = receiver, on_state
        with self._hubs_lock:
            self._hubs.setdefault(self.name, []).append(self)
        on_state(True)

    def disconnect(self) -> None:
        """Stop receiving, as a lost connection would, and report it."""
        with self._hubs_lock:
            peers = self._hubs.get(self.name, [])
            if self in peers:
                peers.remove(self)
        if self._on_state is not None:
            self._on_state(False)

    def reconnect(self) -> None:
        """Receive again after :meth:`disconnect`, and report it."""
        with self._hubs_lock:
            self._hubs.setdefault(self.name, []).append(self)
        if self._on_state is not None:
            self._on_state(True)

    def after_fork(self) -> None:
        """Nothing to do: a forked child has its own copy of the hub."""

    def close(self) -> None:
        with self._hubs_lock:
            peers = self._hubs.get(self.name, [])
            if self in peers:
                peers.remove(self)
        self._receiver = None


def make_channel(url: str, **options: Any) -> Channel:
    """Build a channel from ``redis://``, ``postgresql://`` or ``memory://`` URLs.

    Driver-backed channels are imported here, on demand, so the core never
    imports redis-py or psycopg unless such a URL is used.

    :raises ChannelError: if the URL's scheme is unknown or its driver is not
        installed.
    """
    scheme = url.split("://", 1)[0]
    if scheme == "memory":
        return MemoryChannel(url.split("://", 1)[1] or "default")
    if scheme in ("redis", "rediss"):
        try:
            from .adapters.redis_channel import RedisChannel
        except ImportError as exc:
            raise ChannelError(
                f"channel {url!r} needs redis-py: "
                f"pip install 'tiercache[redis]' ({exc})"
            ) from exc
        return cast(Channel, RedisChannel(url, **options))
    if scheme in ("postgresql", "postgres"):
        try:
            from .adapters.postgres_channel import PostgresChannel
        except ImportError as exc:
            raise ChannelError(
                f"channel {url!r} needs psycopg 3: pip install "
                f"'tiercache[postgres]' ({exc})"
            ) from exc
        return cast(Channel, PostgresChannel(url, **options))
    raise ChannelError(
        f"unknown channel URL {url!r}; use redis://, postgresql:// or memory://"
    )
