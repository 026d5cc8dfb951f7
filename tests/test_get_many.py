"""Tests of the batch read path: placement, payload kinds in one batch, L1 TTLs.

get_many decodes the common payload (fresh JSON, no refresh due) in its own
loop and hands every other payload to the single-key steps. These tests mix
all kinds in one batch and check that both paths give what ``get`` gives.
"""

from __future__ import annotations

import os
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pymemcache.client.base import Client as MemcacheClient

from tiercache import MISSING, Settings, TieredCache, codec, signals
from tiercache.remote import RemoteTier
from tiercache.testing import MemcachedServer


class FakeClock:
    """A monotonic clock for L1 that moves only when a test advances it."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class RecordingLoader:
    """A batch loader that returns ``"loaded <key>"`` and records each call."""

    def __init__(self) -> None:
        self.calls: list[list[Any]] = []

    def __call__(self, keys: list[Any]) -> dict[Any, Any]:
        self.calls.append(list(keys))
        return {key: f"loaded {key}" for key in keys}


@pytest.fixture
def make_cache(memcached: MemcachedServer) -> Iterator[Callable[..., TieredCache]]:
    """Build caches on one memcached. Keyword arguments override settings."""
    channel_url = f"memory://{uuid.uuid4().hex}"
    caches: list[TieredCache] = []

    def make(*, clock: Callable[[], float] = time.monotonic, **overrides: Any) -> Any:
        settings = Settings(
            memcached_servers=(memcached.address,),
            channel_url=channel_url,
            ttl_jitter=0.0,
        ).replace(**overrides)
        cache = TieredCache(settings, clock=clock)
        caches.append(cache)
        return cache

    yield make
    for cache in caches:
        cache.close()


@pytest.fixture
def raw(memcached: MemcachedServer) -> Iterator[MemcacheClient]:
    client = MemcacheClient(
        (memcached.host, memcached.port), timeout=2, default_noreply=False
    )
    yield client
    client.close()


def json_payload(
    value: Any,
    *,
    fresh_in: float | None = None,
    expires_in: float | None = None,
    compress: bool = False,
) -> bytes:
    """Return a JSON payload whose header times are this many seconds from now."""
    now = time.time()
    return codec.pack_value(
        codec.dump_body(value),
        compress_threshold=0 if compress else 1 << 20,
        fresh_until=now + fresh_in if fresh_in is not None else 0.0,
        expires_at=now + expires_in if expires_in is not None else 0.0,
    )


def store(raw: MemcacheClient, wire: str, payload: bytes, flags: int) -> None:
    assert raw.set(wire, payload, flags=flags)


# -- placement -------------------------------------------------------------------


def test_group_by_node_matches_node_for() -> None:
    remote = RemoteTier(
        Settings(memcached_servers=("127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"))
    )
    keys = [f"tc|=key:{index}" for index in range(5000)]
    groups = remote._group_by_node(keys)

    assert len(groups) == 3
    assert sum(len(group) for group in groups.values()) == len(keys)
    for node, group in groups.items():
        assert all(remote.node_for(key) is node for key in group), node.address
        # Each group keeps the order of the keys it was given.
        assert group == [key for key in keys if key in set(group)], node.address


def test_node_for_wraps_past_last_point() -> None:
    remote = RemoteTier(
        Settings(memcached_servers=("127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"))
    )
    last_point = remote._ring[-1]
    key = next(
        key
        for key in (f"tc|=wrap:{index}" for index in range(1_000_000))
        if zlib.crc32(key.encode("ascii")) > last_point
    )
    first_owner = remote._ring_nodes[0]
    assert remote.node_for(key) is first_owner
    assert remote._group_by_node([key]) == {first_owner: [key]}


def test_group_by_node_one_server() -> None:
    remote = RemoteTier(Settings(memcached_servers=("127.0.0.1:1",)))
    assert remote._group_by_node(iter(["a", "b"])) == {remote.nodes[0]: ["a", "b"]}
    assert remote._group_by_node([]) == {}


# -- payload kinds in one batch ---------------------------------------------------


def test_get_many_every_payload_kind(
    make_cache: Callable[..., TieredCache], raw: MemcacheClient
) -> None:
    cache = make_cache(lease_wait=0.05)
    flags = codec.WIRE_FLAGS
    # (key, payload, memcached flags, value expected from L2 or MISSING)
    entries: list[tuple[str, bytes | None, int, Any]] = [
        (
            "fresh",
            json_payload("fresh v", fresh_in=100, expires_in=100),
            flags,
            "fresh v",
        ),
        ("no-times", json_payload({"a": [1]}), flags, {"a": [1]}),
        ("expires-only", json_payload(0, expires_in=100), flags, 0),
        ("compressed", json_payload("z" * 500, compress=True), flags, "z" * 500),
        ("negative", codec.pack(codec.KIND_NEGATIVE, b""), flags, MISSING),
        ("lease", codec.pack(codec.KIND_LEASE, os.urandom(12)), flags, None),
        ("expired", json_payload("old", fresh_in=-5, expires_in=-5), flags, None),
        ("expired-only", json_payload("old", expires_in=-5), flags, None),
        ("not-json", codec.pack(codec.KIND_JSON, b"{not json"), flags, None),
        ("short", b"TC", flags, None),
        ("foreign", json_payload("other program"), 0, None),
        ("absent", None, flags, None),
    ]
    # A plain hit between every two special keys, so the common path resumes
    # after each payload that the single-key steps handle.
    batch: list[str] = []
    expected: dict[str, Any] = {}
    to_load: list[str] = []
    for index, (key, payload, payload_flags, value) in enumerate(entries):
        plain = f"plain:{index}"
        store(raw, cache.keys.encode(plain), json_payload(plain), flags)
        batch += [plain, key]
        expected[plain] = plain
        if payload is not None:
            store(raw, cache.keys.encode(key), payload, payload_flags)
        if value is None:
            to_load.append(key)
            expected[key] = f"loaded {key}"
        elif value is not MISSING:
            expected[key] = value
    loader = RecordingLoader()

    found = cache.get_many(batch, loader)

    assert found == expected
    assert loader.calls == [to_load]
    for key in batch:
        cached = cache.keys.encode(key) in cache.local
        assert cached, f"{key} is not in L1 after the batch"
    assert cache.get_many(batch, RecordingLoader()) == expected


def test_get_many_hit_signal_each_key(
    make_cache: Callable[..., TieredCache], raw: MemcacheClient
) -> None:
    cache = make_cache()
    keys = ["a", "negative", "b"]
    store(raw, cache.keys.encode("a"), json_payload(1), codec.WIRE_FLAGS)
    store(
        raw,
        cache.keys.encode("negative"),
        codec.pack(codec.KIND_NEGATIVE, b""),
        codec.WIRE_FLAGS,
    )
    store(raw, cache.keys.encode("b"), json_payload(2), codec.WIRE_FLAGS)
    hits: list[tuple[Any, str]] = []

    def on_hit(sender: Any, *, key: Any, tier: str) -> None:
        hits.append((key, tier))

    signals.hit.connect(on_hit, sender=cache)
    try:
        assert cache.get_many(keys, RecordingLoader()) == {"a": 1, "b": 2}
    finally:
        signals.hit.disconnect(on_hit, sender=cache)
    assert hits == [(key, "remote") for key in keys]


# -- L1 TTLs of values read from L2 ----------------------------------------------


@pytest.mark.parametrize(
    ("fresh_in", "expires_in", "l1_ttl"),
    [(5, 5, 5), (None, 7, 7), (None, None, 10), (50, 50, 10)],
    ids=["fresh-until", "expires-only", "no-times", "local-ttl-shorter"],
)
@pytest.mark.parametrize("read", ["get", "get_many"])
def test_l1_ttl_from_l2_header(
    make_cache: Callable[..., TieredCache],
    raw: MemcacheClient,
    read: str,
    fresh_in: float | None,
    expires_in: float | None,
    l1_ttl: float,
) -> None:
    clock = FakeClock()
    cache = make_cache(clock=clock, local_ttl=10)
    wire = cache.keys.encode("k")
    flags = codec.WIRE_FLAGS
    store(
        raw, wire, json_payload("v1", fresh_in=fresh_in, expires_in=expires_in), flags
    )

    if read == "get":
        assert cache.get("k") == "v1"
    else:
        assert cache.get_many(["k"]) == {"k": "v1"}
    # Change L2 behind the cache's back: only an expired L1 entry reveals it.
    store(raw, wire, json_payload("v2", fresh_in=100, expires_in=100), flags)

    clock.now += l1_ttl - 0.5
    assert cache.get("k") == "v1"
    clock.now += 1.0
    assert cache.get("k") == "v2"
