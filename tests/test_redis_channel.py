"""Tests of the Redis pub/sub channel's publishing connection, against a real server."""

from __future__ import annotations

import multiprocessing
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis as redis_py
from redis.exceptions import ConnectionError as RedisConnectionError

from tiercache.adapters.redis_channel import RedisChannel
from tiercache.testing import RedisServer


@pytest.fixture
def channel(redis: RedisServer) -> Iterator[RedisChannel]:
    channel = RedisChannel(redis.url, name=f"test-{uuid.uuid4().hex}")
    yield channel
    channel.close()


@pytest.fixture
def subscriber(redis: RedisServer, channel: RedisChannel) -> Iterator[Any]:
    """A redis-py PubSub subscribed to the channel's name."""
    client = redis_py.Redis.from_url(redis.url)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(channel.name)
    confirmation = pubsub.get_message(timeout=2.0)
    assert confirmation is None or confirmation["type"] == "subscribe"
    yield pubsub
    pubsub.close()
    client.close()


def next_payload(pubsub: Any, timeout: float = 2.0) -> bytes | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.1)
        if message is not None and message["type"] == "message":
            return message["data"]  # type: ignore[no-any-return]
    return None


def test_publish_reaches_subscriber(channel: RedisChannel, subscriber: Any) -> None:
    channel.publish(b'{"first": 1}')
    channel.publish(b'{"second": 2}')
    assert next_payload(subscriber) == b'{"first": 1}'
    assert next_payload(subscriber) == b'{"second": 2}'


def test_publish_large_payload(channel: RedisChannel, subscriber: Any) -> None:
    # Larger than redis-py's 6,000-byte cutoff, so the command goes out in
    # several buffers.
    payload = b"x" * 100_000
    channel.publish(payload)
    assert next_payload(subscriber) == payload


def test_publish_after_restart_succeeds(
    redis: RedisServer, channel: RedisChannel
) -> None:
    channel.publish(b"before")
    redis.stop()
    redis.restart()
    # The first send goes to the socket the old server closed, and is
    # retried once on a new connection.
    channel.publish(b"after")


def test_publish_server_down_raises(redis: RedisServer, channel: RedisChannel) -> None:
    channel.publish(b"before")
    redis.stop()
    with pytest.raises(RedisConnectionError):
        channel.publish(b"while down")
    redis.restart()
    channel.publish(b"after")


def publish_from_child(channel: RedisChannel) -> None:
    channel.after_fork()
    channel.publish(b"from child")
    channel.close()


def test_publish_after_fork_both_work(channel: RedisChannel, subscriber: Any) -> None:
    channel.publish(b"parent before")
    child = multiprocessing.get_context("fork").Process(
        target=publish_from_child, args=(channel,)
    )
    child.start()
    child.join(timeout=10)
    assert child.exitcode == 0
    # The child closed only its own connection, so the parent's still works.
    channel.publish(b"parent after")
    received = [next_payload(subscriber) for _ in range(3)]
    assert received == [b"parent before", b"from child", b"parent after"]
