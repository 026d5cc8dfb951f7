"""Tests of InvalidationBus.on_evicted, the hook that times evictions."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tiercache import Settings, TieredCache
from tiercache.adapters.sqlite import SQLiteOrigin
from tiercache.testing import MemcachedServer

Call = tuple[tuple[str, ...], str]


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


def record_calls(cache: TieredCache) -> list[Call]:
    """Set a hook on ``cache`` that records its calls, and return the record."""
    assert cache.bus is not None
    calls: list[Call] = []

    def hook(keys: tuple[str, ...], sender: str) -> None:
        calls.append((keys, sender))

    cache.bus.on_evicted = hook
    return calls


def test_hook_gets_keys_and_sender(make_cache: Callable[..., TieredCache]) -> None:
    writer, reader = make_cache(), make_cache()
    calls = record_calls(reader)
    writer.set("k", "v")
    assert writer.bus is not None
    assert calls == [((reader.keys.encode("k"),), writer.bus.sender_id)]


def test_hook_runs_after_eviction(make_cache: Callable[..., TieredCache]) -> None:
    writer, reader = make_cache(), make_cache()
    writer.set("k", "old")
    assert reader.get("k") == "old"
    wire = reader.keys.encode("k")
    assert wire in reader.local
    held_during_hook: list[bool] = []
    assert reader.bus is not None
    reader.bus.on_evicted = lambda keys, sender: held_during_hook.append(
        wire in reader.local
    )
    writer.set("k", "new")
    assert held_during_hook == [False]


def test_hook_not_called_for_own_writes(
    make_cache: Callable[..., TieredCache],
) -> None:
    writer, _reader = make_cache(), make_cache()
    calls = record_calls(writer)
    writer.set("k", "v")
    writer.invalidate("k")
    assert calls == []


def test_hook_called_for_lost_deletes(
    make_cache: Callable[..., TieredCache],
) -> None:
    writer, reader = make_cache(), make_cache()
    calls = record_calls(reader)
    wire = writer.keys.encode("k")
    assert writer.bus is not None
    assert writer.bus.publish_lost_deletes([wire])
    assert calls == [((wire,), writer.bus.sender_id)]


def test_hook_not_called_for_heartbeats(
    make_cache: Callable[..., TieredCache],
) -> None:
    writer, reader = make_cache(), make_cache()
    calls = record_calls(reader)
    assert writer.bus is not None
    writer.bus._send("hb", [])
    assert writer.bus.publish_flush()
    assert calls == []


def test_raising_hook_logged(
    make_cache: Callable[..., TieredCache], caplog: pytest.LogCaptureFixture
) -> None:
    writer, reader = make_cache(), make_cache()
    assert reader.bus is not None

    def broken(keys: tuple[str, ...], sender: str) -> None:
        raise RuntimeError("hook broke")

    reader.bus.on_evicted = broken
    with caplog.at_level(logging.ERROR, logger="tiercache.invalidation"):
        writer.set("k", "v")
    messages = [record.getMessage() for record in caplog.records]
    assert any("on_evicted hook failed" in message for message in messages)


def test_raising_hook_message_still_applied(
    make_cache: Callable[..., TieredCache],
) -> None:
    writer, reader = make_cache(), make_cache()
    writer.set("k", "old")
    assert reader.get("k") == "old"
    assert reader.bus is not None

    def broken(keys: tuple[str, ...], sender: str) -> None:
        raise RuntimeError("hook broke")

    reader.bus.on_evicted = broken
    received = reader.bus.received
    observed = reader.bus.delay.snapshot()["count"]
    writer.set("k", "new")
    assert reader.get("k") == "new"
    assert reader.bus.received == received + 1
    assert reader.bus.delay.snapshot()["count"] == observed + 1


def test_read_during_lost_message_not_stale(
    make_cache: Callable[..., TieredCache],
) -> None:
    """A read while a "lost" message applies can't refill L1 from the missed delete.

    The hook runs right after the message's eviction, which is where another
    thread of the reader can miss L1 and read L2.
    """
    writer, reader = make_cache(), make_cache()
    writer.set("k", "old")
    assert reader.get("k") == "old"
    # A write commits, but its delete never reaches memcached: L2 still
    # contains the old value, and the writer announces the missed delete.
    assert writer.origin is not None
    writer.origin.store("k", "new")
    reads_during_hook: list[Any] = []
    assert reader.bus is not None
    reader.bus.on_evicted = lambda keys, sender: reads_during_hook.append(
        reader.get("k")
    )
    assert writer.bus is not None
    writer.bus.publish_lost_deletes([writer.keys.encode("k")])

    assert reads_during_hook == ["new"]
    assert reader.get("k") == "new"
