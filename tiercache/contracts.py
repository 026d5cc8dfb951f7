"""Protocols that origins, channels and tiers implement."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Origin(Protocol):
    """The system of record that a :class:`~tiercache.TieredCache` reads on a miss.

    ``load`` returns :data:`tiercache.MISSING` when the origin has no row for
    the key; ``load_many`` leaves such keys out of its result. ``store``
    and ``delete`` commit before they return, and raise on failure, so the
    cache touches no tier after a failed write.
    """

    def load(self, key: str) -> Any: ...

    def load_many(self, keys: Iterable[str]) -> dict[str, Any]: ...

    def store(self, key: str, value: Any) -> None: ...

    def delete(self, key: str) -> None: ...


@runtime_checkable
class Channel(Protocol):
    """A cross-process pub/sub channel that carries invalidation messages.

    ``subscribe`` registers the receiver for every message published by any
    process, including this one. ``on_state`` is called with ``True`` when
    the subscription is (re)established and with ``False`` when it is lost,
    so the cache can flush its local tier for the time it was deaf.
    ``after_fork`` runs in a child process: it must drop the connections
    inherited from the parent without closing them; the cache then calls
    ``subscribe`` again.
    A channel may also set ``max_payload`` (bytes per message) and offer
    ``notify_in_transaction(connection, payload)``.
    """

    def publish(self, payload: bytes) -> None: ...

    def subscribe(
        self,
        receiver: Callable[[bytes], None],
        on_state: Callable[[bool], None],
    ) -> None: ...

    def after_fork(self) -> None: ...

    def close(self) -> None: ...


class Loader(Protocol):
    """A callable that reads one key from the origin on a miss."""

    def __call__(self, key: str) -> Any: ...


class ManyLoader(Protocol):
    """A callable that reads several keys from the origin in one query."""

    def __call__(self, keys: list[str]) -> Mapping[str, Any]: ...
