"""Tests of the blinker signals: receivers that raise never break the cache."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from blinker import ANY, Signal

from tiercache import Settings, TieredCache, signals
from tiercache.adapters.sqlite import SQLiteOrigin
from tiercache.testing import MemcachedServer


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


@pytest.fixture
def connect(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., None]]:
    """Connect receivers for one test, and disconnect them after it.

    The failure count that rate-limits the log is reset to zero, so the
    errors of each test's receivers are logged.
    """
    monkeypatch.setattr(signals, "_failures", 0)
    connected: list[tuple[Signal, Callable[..., Any]]] = []

    def add(signal: Signal, receiver: Callable[..., Any], sender: Any = ANY) -> None:
        signal.connect(receiver, sender=sender, weak=False)
        connected.append((signal, receiver))

    yield add
    for signal, receiver in connected:
        signal.disconnect(receiver)


class Recorder:
    """A receiver that records the keyword arguments of each call."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, sender: Any, **kwargs: Any) -> None:
        self.calls.append({"sender": sender, **kwargs})


def broken(sender: Any, **kwargs: Any) -> None:
    raise RuntimeError("receiver bug")


def fail_loader(key: Any) -> Any:
    raise AssertionError(f"loader called for {key!r}; expected a hit")


def signal_errors(
    caplog: pytest.LogCaptureFixture, name: str
) -> list[logging.LogRecord]:
    return [
        record
        for record in caplog.records
        if record.name == "tiercache.signals"
        and record.levelno >= logging.ERROR
        and name in record.getMessage()
    ]


# a raising receiver on invalidated


def test_invalidated_receiver_error_set_succeeds(
    make_cache: Callable[..., TieredCache], connect: Callable[..., None]
) -> None:
    connect(signals.invalidated, broken)
    cache = make_cache()
    cache.set("k", "new")
    assert cache.get("k") == "new"


def test_invalidated_receiver_error_others_run(
    make_cache: Callable[..., TieredCache], connect: Callable[..., None]
) -> None:
    before, after = Recorder(), Recorder()
    connect(signals.invalidated, before)
    connect(signals.invalidated, broken)
    connect(signals.invalidated, after)
    cache = make_cache()
    cache.set("k", "v")
    assert [call["keys"] for call in before.calls] == [("k",)]
    assert [call["keys"] for call in after.calls] == [("k",)]


def test_invalidated_receiver_error_logged(
    make_cache: Callable[..., TieredCache],
    connect: Callable[..., None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    connect(signals.invalidated, broken)
    cache = make_cache()
    with caplog.at_level(logging.ERROR, logger="tiercache.signals"):
        cache.set("k", "v")
    errors = signal_errors(caplog, "tiercache.invalidated")
    assert len(errors) == 1
    assert errors[0].exc_info is not None
    assert errors[0].exc_info[0] is RuntimeError


def test_invalidated_receiver_error_counted(
    make_cache: Callable[..., TieredCache], connect: Callable[..., None]
) -> None:
    connect(signals.invalidated, broken)
    cache = make_cache()
    before = cache.stats()["errors"]["receiver_failures"]
    cache.set("k", "v")
    assert cache.stats()["errors"]["receiver_failures"] == before + 1


def test_invalidated_receiver_error_other_cache_evicts(
    make_cache: Callable[..., TieredCache], connect: Callable[..., None]
) -> None:
    connect(signals.invalidated, broken)
    writer, reader = make_cache(), make_cache()
    writer.set("k", "old")
    assert reader.get("k") == "old"
    writer.set("k", "new")
    assert reader.get("k") == "new"


def test_invalidated_from_other_cache_reported(
    make_cache: Callable[..., TieredCache], connect: Callable[..., None]
) -> None:
    writer, reader = make_cache(), make_cache()
    recorder = Recorder()
    connect(signals.invalidated, recorder, sender=reader)
    writer.set("k", "v")
    # Invalidations from other caches are reported from the signal thread.
    deadline = time.monotonic() + 5
    while not recorder.calls and time.monotonic() < deadline:
        time.sleep(0.005)
    assert len(recorder.calls) == 1
    assert recorder.calls[0]["keys"] == (reader.keys.encode("k"),)
    assert recorder.calls[0]["origin"] != "local"


# a raising receiver on hit


def test_hit_receiver_error_local_get_succeeds(
    make_cache: Callable[..., TieredCache], connect: Callable[..., None]
) -> None:
    cache = make_cache()
    cache.get("k", lambda key: "v")
    connect(signals.hit, broken)
    assert cache.get("k", fail_loader) == "v"


def test_hit_receiver_error_remote_get_succeeds(
    make_cache: Callable[..., TieredCache], connect: Callable[..., None]
) -> None:
    writer, reader = make_cache(), make_cache()
    writer.get("k", lambda key: "v")
    connect(signals.hit, broken)
    assert reader.get("k", fail_loader) == "v"
    assert reader.get("k", fail_loader) == "v"


def test_hit_receiver_error_get_many_succeeds(
    make_cache: Callable[..., TieredCache], connect: Callable[..., None]
) -> None:
    writer, reader = make_cache(), make_cache()
    writer.get("k", lambda key: "v")
    connect(signals.hit, broken)
    assert reader.get_many(["k"]) == {"k": "v"}


def test_hit_receiver_error_others_run(
    make_cache: Callable[..., TieredCache], connect: Callable[..., None]
) -> None:
    writer, reader = make_cache(), make_cache()
    writer.get("k", lambda key: "v")
    before, after = Recorder(), Recorder()
    connect(signals.hit, before, sender=reader)
    connect(signals.hit, broken)
    connect(signals.hit, after, sender=reader)
    reader.get("k")
    reader.get("k")
    expected = ["remote", "local"]
    assert [call["tier"] for call in before.calls] == expected
    assert [call["tier"] for call in after.calls] == expected


def test_hit_receiver_error_logged(
    make_cache: Callable[..., TieredCache],
    connect: Callable[..., None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    cache = make_cache()
    cache.get("k", lambda key: "v")
    connect(signals.hit, broken)
    with caplog.at_level(logging.ERROR, logger="tiercache.signals"):
        cache.get("k")
    errors = signal_errors(caplog, "tiercache.hit")
    assert len(errors) == 1
    assert errors[0].exc_info is not None
    assert errors[0].exc_info[0] is RuntimeError


def test_get_many_hits_reported(
    make_cache: Callable[..., TieredCache], connect: Callable[..., None]
) -> None:
    writer, reader = make_cache(), make_cache()
    writer.get("remote", lambda key: 1)
    reader.get("local", lambda key: 2)
    hits, misses = Recorder(), Recorder()
    connect(signals.hit, hits, sender=reader)
    connect(signals.miss, misses, sender=reader)
    reader.get_many(["local", "remote", "origin"], lambda keys: {"origin": 3})
    tiers = {call["key"]: call["tier"] for call in hits.calls}
    assert tiers == {"local": "local", "remote": "remote"}
    assert [call["key"] for call in misses.calls] == ["origin"]


# the other signals


@pytest.mark.parametrize("signal", [signals.miss, signals.fill], ids=["miss", "fill"])
def test_load_receiver_error_get_succeeds(
    make_cache: Callable[..., TieredCache],
    connect: Callable[..., None],
    signal: Signal,
) -> None:
    connect(signal, broken)
    cache = make_cache()
    assert cache.get("k", lambda key: "v") == "v"
    assert cache.get_many(["m"], lambda keys: {"m": 1}) == {"m": 1}


def test_miss_and_fill_reported(
    make_cache: Callable[..., TieredCache], connect: Callable[..., None]
) -> None:
    cache = make_cache()
    misses, fills = Recorder(), Recorder()
    connect(signals.miss, misses, sender=cache)
    connect(signals.fill, fills, sender=cache)
    cache.get("k", lambda key: "v")
    assert [call["key"] for call in misses.calls] == ["k"]
    assert [call["key"] for call in fills.calls] == ["k"]


def test_signals_carry_no_values(
    make_cache: Callable[..., TieredCache], connect: Callable[..., None]
) -> None:
    recorder = Recorder()
    for signal in (signals.hit, signals.miss, signals.fill, signals.invalidated):
        connect(signal, recorder)
    writer, reader = make_cache(), make_cache()
    secret = "jane@example.com"
    writer.set("subscriber:9", secret)
    writer.get("subscriber:9")
    reader.get("subscriber:9")
    reader.get("subscriber:9")
    assert recorder.calls
    for call in recorder.calls:
        for name, value in call.items():
            assert secret not in repr(value), name


def test_receiver_for_one_cache_only(
    make_cache: Callable[..., TieredCache], connect: Callable[..., None]
) -> None:
    first, second = make_cache(), make_cache()
    recorder = Recorder()
    connect(signals.miss, recorder, sender=first)
    second.get("k", lambda key: "v")
    assert recorder.calls == []
