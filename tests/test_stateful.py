"""Stateful tests of two caches that share memcached, an origin and a channel.

Both caches live in this process, on one ``memory://`` channel (which
delivers each message synchronously inside ``publish``), a real memcached
and one SQLite origin. A dict models the origin. Time in L1 comes from a
fake clock that only the rules move, and heartbeats are effectively off
(one per hour), so a message is lost only when a rule drops it.
"""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule, run_state_machine_as_test

from tiercache import MISSING, Settings, TieredCache
from tiercache.adapters.sqlite import SQLiteOrigin
from tiercache.channel import MemoryChannel, make_channel
from tiercache.messages import decode_message
from tiercache.testing import MemcachedServer

# Multiples of a power of two, so that clock arithmetic is exact and a read
# is never judged on a rounding error at the TTL boundary.
LOCAL_TTL = 4.0
CLOCK_STEP = 0.25

INSTANCES = ("A", "B")
# Two keys, so that rules often meet on one key.
KEYS = ("k0", "k1")
VALUES = st.one_of(st.none(), st.integers(-3, 3), st.text(max_size=3))

MACHINE_SETTINGS = settings(
    max_examples=100,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def module_memcached() -> Iterator[MemcachedServer]:
    with MemcachedServer() as server:
        yield server


class FakeClock:
    """Monotonic seconds that move only when a rule advances them."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def same_value(left: Any, right: Any) -> bool:
    """Compare values by type too, so that 1 and True or 0 and False differ."""
    if left is MISSING or right is MISSING:
        return left is right
    return type(left) is type(right) and left == right


class TwoCachesMachine(RuleBasedStateMachine):
    """Reads, writes, deletes, lost messages and clock steps on caches A and B.

    Every read must return the model's value, except that an instance may
    return an older value of a key while a message that would have
    invalidated it there was dropped less than ``LOCAL_TTL`` ago on the
    fake clock.
    """

    def __init__(self, server: MemcachedServer) -> None:
        super().__init__()
        server.flush()
        run_id = uuid.uuid4().hex[:12]
        self.directory = tempfile.TemporaryDirectory(prefix="tiercache-stateful-")
        self.origin = SQLiteOrigin(str(Path(self.directory.name) / "origin.sqlite3"))
        self.clock = FakeClock()
        cache_settings = Settings(
            memcached_servers=(server.address,),
            namespace=f"stateful-{run_id}",
            local_ttl=LOCAL_TTL,
            heartbeat_interval=3600.0,
        )
        self.channels: dict[str, MemoryChannel] = {}
        self.caches: dict[str, TieredCache] = {}
        for name in INSTANCES:
            channel = make_channel(f"memory://stateful-{run_id}")
            assert isinstance(channel, MemoryChannel)
            self.channels[name] = channel
            self.caches[name] = TieredCache(
                cache_settings, origin=self.origin, channel=channel, clock=self.clock
            )
        self.model: dict[str, Any] = {}
        # (instance, key) -> [(older value, fake time its invalidation was lost)]
        self.tolerated: dict[tuple[str, str], list[tuple[Any, float]]] = {}
        # (receiving instance, payload) of messages dropped by drop_next_message
        self.dropped: list[tuple[str, bytes]] = []

    @rule(instance=st.sampled_from(INSTANCES), key=st.sampled_from(KEYS))
    def read(self, instance: str, key: str) -> None:
        self.check_read(instance, key)

    @rule(instance=st.sampled_from(INSTANCES), key=st.sampled_from(KEYS), value=VALUES)
    def write(self, instance: str, key: str, value: Any) -> None:
        previous = self.model.get(key, MISSING)
        self.caches[instance].set(key, value)
        self.model[key] = value
        self.after_write(instance, key, previous)

    @rule(instance=st.sampled_from(INSTANCES), key=st.sampled_from(KEYS))
    def delete(self, instance: str, key: str) -> None:
        previous = self.model.get(key, MISSING)
        self.caches[instance].delete(key)
        self.model.pop(key, None)
        self.after_write(instance, key, previous)

    @rule(instance=st.sampled_from(INSTANCES))
    def drop_next_message(self, instance: str) -> None:
        """Lose the next message that reaches ``instance``, from either sender."""
        channel = self.channels[instance]

        def drop_once(payload: bytes) -> bool:
            channel.drop = None
            self.dropped.append((instance, payload))
            return True

        channel.drop = drop_once

    @rule(steps=st.integers(1, int(LOCAL_TTL / CLOCK_STEP) - 1))
    def advance_clock(self, steps: int) -> None:
        self.clock.now += steps * CLOCK_STEP

    @rule()
    def advance_clock_past_local_ttl(self) -> None:
        self.clock.now += LOCAL_TTL + CLOCK_STEP
        self.tolerated.clear()
        for instance in INSTANCES:
            for key in KEYS:
                got = self.caches[instance].get(key)
                expected = self.model.get(key, MISSING)
                assert same_value(got, expected), (
                    f"{instance} read {key!r} as {got!r} more than local_ttl "
                    f"after any lost message, but the origin has {expected!r}"
                )

    def after_write(self, writer: str, key: str, previous: Any) -> None:
        """Record what the write's lost messages allow, then check read-your-writes."""
        received_by = set(INSTANCES)
        for receiver, payload in self.dropped:
            received_by.discard(receiver)
            message = decode_message(payload)
            assert message.kind == "inv", f"unexpected {message.kind} message dropped"
            if receiver != writer:
                entry = (previous, self.clock.now)
                self.tolerated.setdefault((receiver, key), []).append(entry)
        self.dropped.clear()
        self.on_message_received(writer, received_by - {writer})
        # The writer evicts its own L1 copy whether or not its message is lost.
        self.tolerated.pop((writer, key), None)
        got = self.caches[writer].get(key)
        expected = self.model.get(key, MISSING)
        assert same_value(got, expected), (
            f"{writer} wrote {key!r} = {expected!r} but read back {got!r}"
        )

    def on_message_received(self, sender: str, receivers: set[str]) -> None:
        """Hook for a message from ``sender`` that reached ``receivers``."""

    def check_read(self, instance: str, key: str) -> None:
        got = self.caches[instance].get(key)
        expected = self.model.get(key, MISSING)
        if same_value(got, expected):
            return
        allowed = [
            value
            for value, lost_at in self.tolerated.get((instance, key), [])
            if self.clock.now - lost_at < LOCAL_TTL
        ]
        assert any(same_value(got, value) for value in allowed), (
            f"{instance} read {key!r} as {got!r}; the origin has {expected!r}, "
            f"and the only older values allowed now are {allowed!r}"
        )

    def teardown(self) -> None:
        for cache in self.caches.values():
            cache.close()
        self.origin.connection().close()
        self.directory.cleanup()


class NoticedLossMachine(TwoCachesMachine):
    """The same, but a lost message must be noticed at the sender's next message.

    Each sender numbers its messages, so once a receiver gets a later message
    from the sender of a lost one it has seen the gap and flushed its L1, and
    from then on it must read the model's values.
    """

    def on_message_received(self, sender: str, receivers: set[str]) -> None:
        for receiver in receivers:
            # With two instances, every message that reaches this receiver
            # from another instance comes from the same sender.
            for key in KEYS:
                self.tolerated.pop((receiver, key), None)


def test_two_caches_within_local_ttl(module_memcached: MemcachedServer) -> None:
    run_state_machine_as_test(
        lambda: TwoCachesMachine(module_memcached), settings=MACHINE_SETTINGS
    )


def test_two_caches_notice_lost_message(module_memcached: MemcachedServer) -> None:
    run_state_machine_as_test(
        lambda: NoticedLossMachine(module_memcached), settings=MACHINE_SETTINGS
    )


def test_first_lost_message_noticed(module_memcached: MemcachedServer) -> None:
    # The random rules rarely lose a sender's very first message, which a
    # receiver can only notice if it counts an unknown sender from 0.
    machine = NoticedLossMachine(module_memcached)
    try:
        machine.write("B", "k0", 1)
        machine.drop_next_message("B")
        machine.write("A", "k0", 2)
        machine.write("A", "k1", 3)
        machine.read("B", "k0")
    finally:
        machine.teardown()
