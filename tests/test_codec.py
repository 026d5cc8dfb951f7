"""Tests of the value codec, alone and through caches sharing a real memcached."""

from __future__ import annotations

import datetime
import decimal
import enum
import math
import pickle
import secrets
import sqlite3
import uuid
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pymemcache.client.base import Client as MemcacheClient

from tiercache import (
    MISSING,
    SerializationError,
    Settings,
    TieredCache,
    UnsupportedTypeError,
    codec,
)
from tiercache.adapters.sqlite import SQLiteOrigin
from tiercache.testing import MemcachedServer


class Color(enum.StrEnum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


class Name(str):
    pass


def nested_lists(depth: int) -> list[Any]:
    """Return ``depth`` lists nested in one another."""
    outer: list[Any] = []
    inner = outer
    for _ in range(depth - 1):
        child: list[Any] = []
        inner.append(child)
        inner = child
    return outer


# (case id, value, exception class, text the message must contain)
BAD_VALUES: list[tuple[str, Any, type[Exception], str]] = [
    ("set", {1, 2}, UnsupportedTypeError, "set"),
    ("frozenset", frozenset({1}), UnsupportedTypeError, "frozenset"),
    ("tuple", (1, 2), UnsupportedTypeError, "tuple"),
    ("decimal", decimal.Decimal("1.5"), UnsupportedTypeError, "Decimal"),
    (
        "datetime",
        datetime.datetime(2024, 5, 1, 12, 0),
        UnsupportedTypeError,
        "datetime",
    ),
    ("date", datetime.date(2024, 5, 1), UnsupportedTypeError, "date"),
    ("uuid", uuid.UUID(int=5), UnsupportedTypeError, "UUID"),
    ("bytes", b"raw", UnsupportedTypeError, "bytes"),
    ("bytearray", bytearray(b"raw"), UnsupportedTypeError, "bytearray"),
    ("int-too-big", 2**64, SerializationError, "int"),
    ("int-too-small", -(2**63) - 1, SerializationError, "int"),
    ("nan", math.nan, SerializationError, "nan"),
    ("inf", math.inf, SerializationError, "inf"),
    ("minus-inf", -math.inf, SerializationError, "inf"),
    ("int-dict-key", {1: "a"}, UnsupportedTypeError, "int"),
    ("str-enum", Color.RED, UnsupportedTypeError, "Color"),
    ("int-enum", Level.HIGH, UnsupportedTypeError, "Level"),
    ("str-subclass", Name("x"), UnsupportedTypeError, "Name"),
    ("str-enum-dict-key", {Color.RED: 1}, UnsupportedTypeError, "Color"),
    ("object", object(), UnsupportedTypeError, "object"),
    ("nested-bad", {"a": [1, {"b": (2,)}]}, UnsupportedTypeError, "tuple"),
    ("too-deep", nested_lists(255), SerializationError, "nested"),
    ("lone-surrogate", "\ud800", SerializationError, "surrogate"),
    ("surrogate-dict-key", {"\udfff": 1}, SerializationError, "surrogate"),
]

BAD_IDS = [case[0] for case in BAD_VALUES]
BAD_PARAMS = [case[1:] for case in BAD_VALUES]


def same(left: Any, right: Any) -> bool:
    """Tell whether two JSON-model values are equal in type and content."""
    if type(left) is not type(right):
        return False
    if isinstance(left, float):
        return repr(left) == repr(right)
    if isinstance(left, list):
        return len(left) == len(right) and all(map(same, left, right))
    if isinstance(left, dict):
        return left.keys() == right.keys() and all(
            same(value, right[name]) for name, value in left.items()
        )
    return bool(left == right)


JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=20,
)


# check_value alone


@pytest.mark.parametrize(("value", "error", "text"), BAD_PARAMS, ids=BAD_IDS)
def test_check_value_rejects(value: Any, error: type[Exception], text: str) -> None:
    with pytest.raises(error) as info:
        codec.check_value("bad:key", value)
    assert "bad:key" in str(info.value)
    assert text in str(info.value)


def test_check_value_accepts_max_depth() -> None:
    codec.check_value("k", nested_lists(254))


@pytest.mark.parametrize("value", [2**64 - 1, -(2**63), 0.0, -0.0, 1e308, 5e-324])
def test_check_value_accepts_edges(value: Any) -> None:
    codec.check_value("k", value)


@given(value=JSON_VALUES)
def test_body_round_trip(value: Any) -> None:
    codec.check_value("k", value)
    assert same(codec.load_body(codec.dump_body(value)), value)


@given(
    body=st.binary(max_size=3000),
    threshold=st.integers(min_value=1, max_value=2000),
    expires_at=st.floats(min_value=0, max_value=4e9),
)
def test_pack_unpack_round_trip(body: bytes, threshold: int, expires_at: float) -> None:
    payload = codec.pack_value(
        body, compress_threshold=threshold, expires_at=expires_at
    )
    envelope = codec.unpack(payload)
    assert envelope.kind == codec.KIND_JSON
    assert envelope.body == body
    assert abs(envelope.expires_at - expires_at) < 0.001


# through caches sharing a real memcached


@pytest.fixture
def origin(tmp_path: Path) -> SQLiteOrigin:
    return SQLiteOrigin(str(tmp_path / "origin.db"))


@pytest.fixture
def make_cache(
    memcached: MemcachedServer, origin: SQLiteOrigin
) -> Iterator[Callable[..., TieredCache]]:
    """Build caches that share one memcached, one SQLite origin and one channel."""
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
def raw_memcached(memcached: MemcachedServer) -> Iterator[MemcacheClient]:
    client = MemcacheClient(
        (memcached.host, memcached.port), timeout=2, default_noreply=False
    )
    yield client
    client.close()


def fail_loader(key: Any) -> Any:
    raise AssertionError(f"loader called for {key!r}; expected a hit")


def origin_rows(origin: SQLiteOrigin) -> list[tuple[bytes, bytes]]:
    with sqlite3.connect(origin.path) as conn:
        return sorted(conn.execute(f"SELECT key, value FROM {origin.table}"))


def raw_kind(raw: MemcacheClient, wire: str) -> bytes | None:
    """Return the kind byte of the tiercache payload under ``wire``, if any."""
    payload = raw.get(wire)
    if payload is None:
        return None
    return codec.unpack(payload).kind


def raw_value(raw: MemcacheClient, wire: str) -> Any:
    """Return the value stored in memcached under ``wire``, or ``MISSING``."""
    payload = raw.get(wire)
    if payload is None:
        return MISSING
    envelope = codec.unpack(payload)
    assert envelope.kind == codec.KIND_JSON, envelope.kind
    return codec.load_body(envelope.body)


@pytest.mark.parametrize(("value", "error", "text"), BAD_PARAMS, ids=BAD_IDS)
def test_set_rejects_bad_value(
    make_cache: Callable[..., TieredCache],
    origin: SQLiteOrigin,
    raw_memcached: MemcacheClient,
    value: Any,
    error: type[Exception],
    text: str,
) -> None:
    cache = make_cache()
    key = "bad:key"
    wire = cache.keys.encode(key)
    cache.set(key, "old")
    cache.get(key)
    rows = origin_rows(origin)
    with pytest.raises(error) as info:
        cache.set(key, value)
    assert "bad:key" in str(info.value)
    assert text in str(info.value)
    assert origin_rows(origin) == rows
    assert raw_value(raw_memcached, wire) == "old"
    assert wire in cache.local
    assert cache.get(key, fail_loader) == "old"


@pytest.mark.parametrize(("value", "error", "text"), BAD_PARAMS, ids=BAD_IDS)
def test_loader_bad_value_raises(
    make_cache: Callable[..., TieredCache],
    origin: SQLiteOrigin,
    raw_memcached: MemcacheClient,
    value: Any,
    error: type[Exception],
    text: str,
) -> None:
    cache = make_cache()
    key = "bad:key"
    wire = cache.keys.encode(key)
    with pytest.raises(error) as info:
        cache.get(key, lambda _key: value)
    assert "bad:key" in str(info.value)
    assert text in str(info.value)
    assert origin_rows(origin) == []
    assert raw_memcached.get(wire) is None
    assert wire not in cache.local


def test_loader_bad_value_next_get_loads(
    make_cache: Callable[..., TieredCache], raw_memcached: MemcacheClient
) -> None:
    cache = make_cache()
    with pytest.raises(UnsupportedTypeError):
        cache.get("k", lambda _key: (1, 2))
    assert cache.get("k", lambda _key: [1, 2]) == [1, 2]
    assert raw_value(raw_memcached, cache.keys.encode("k")) == [1, 2]


def test_many_loader_bad_value_leaves_no_lease(
    make_cache: Callable[..., TieredCache], raw_memcached: MemcacheClient
) -> None:
    cache = make_cache()
    keys = ["a", "b", "c"]
    with pytest.raises(UnsupportedTypeError):
        cache.get_many(keys, lambda _keys: {"a": 1, "b": {2}, "c": 3})
    for key in keys:
        kind = raw_kind(raw_memcached, cache.keys.encode(key))
        assert kind != codec.KIND_LEASE, key


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(value=JSON_VALUES)
def test_value_round_trip_every_tier(
    make_cache: Callable[..., TieredCache], memcached: MemcachedServer, value: Any
) -> None:
    writer, reader, late = make_cache(), make_cache(), make_cache()
    key = f"value:{uuid.uuid4().hex}"
    writer.set(key, value)
    assert same(writer.get(key), value), "loaded from the origin"
    assert same(writer.get(key, fail_loader), value), "read from L1"
    assert same(reader.get(key, fail_loader), value), "read from L2"
    memcached.flush()
    assert same(late.get(key), value), "loaded after memcached was flushed"


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(value=JSON_VALUES)
def test_value_round_trip_get_many(
    make_cache: Callable[..., TieredCache], value: Any
) -> None:
    writer, reader = make_cache(), make_cache()
    key = f"value:{uuid.uuid4().hex}"
    writer.set(key, value)
    assert same(writer.get_many([key])[key], value), "loaded from the origin"
    assert same(writer.get_many([key])[key], value), "read from L1"
    assert same(reader.get_many([key])[key], value), "read from L2"


def test_value_none_in_dict_round_trip(make_cache: Callable[..., TieredCache]) -> None:
    writer, reader = make_cache(), make_cache()
    value = {"a": None, "b": [None, 0, 0.0, False, ""], "c": -0.0}
    writer.set("k", value)
    writer.get("k")
    assert same(reader.get("k", fail_loader), value)


# copies


def test_mutation_does_not_leak_from_fill(
    make_cache: Callable[..., TieredCache],
) -> None:
    cache = make_cache()
    got = cache.get("k", lambda _key: {"tags": ["a"], "n": 1})
    got["tags"].append("b")
    got["n"] = 2
    assert cache.get("k", fail_loader) == {"tags": ["a"], "n": 1}


def test_mutation_does_not_leak_from_local(
    make_cache: Callable[..., TieredCache],
) -> None:
    cache = make_cache()
    cache.get("k", lambda _key: {"tags": ["a"]})
    got = cache.get("k", fail_loader)
    got["tags"].append("b")
    assert cache.get("k", fail_loader) == {"tags": ["a"]}


def test_mutation_does_not_leak_from_remote(
    make_cache: Callable[..., TieredCache],
) -> None:
    writer, reader = make_cache(), make_cache()
    writer.get("k", lambda _key: {"tags": ["a"]})
    got = reader.get("k", fail_loader)
    got["tags"].append("b")
    assert reader.get("k", fail_loader) == {"tags": ["a"]}


def test_mutation_does_not_leak_from_get_many(
    make_cache: Callable[..., TieredCache],
) -> None:
    cache = make_cache()
    got = cache.get_many(["k"], lambda keys: {"k": {"tags": ["a"]}})
    got["k"]["tags"].append("b")
    again = cache.get_many(["k"])
    again["k"]["tags"].append("c")
    assert cache.get("k", fail_loader) == {"tags": ["a"]}


def test_mutation_of_set_argument_ignored(
    make_cache: Callable[..., TieredCache],
) -> None:
    cache = make_cache()
    value = {"tags": ["a"]}
    cache.set("k", value)
    value["tags"].append("b")
    assert cache.get("k") == {"tags": ["a"]}


# compression and size


def test_large_value_compressed_in_remote(
    make_cache: Callable[..., TieredCache], raw_memcached: MemcacheClient
) -> None:
    writer = make_cache(compress_threshold=1024)
    value = {"html": "<p>Hello subscriber</p>" * 2000}
    writer.get("k", lambda _key: value)
    payload = raw_memcached.get(writer.keys.encode("k"))
    assert payload[3:4] == codec.KIND_ZLIB
    assert len(payload) < len(codec.dump_body(value))


def test_large_value_read_back(make_cache: Callable[..., TieredCache]) -> None:
    writer, reader = make_cache(compress_threshold=1024), make_cache()
    value = {"html": "<p>Hello subscriber</p>" * 2000}
    writer.get("k", lambda _key: value)
    assert reader.get("k", fail_loader) == value


def test_small_value_not_compressed(
    make_cache: Callable[..., TieredCache], raw_memcached: MemcacheClient
) -> None:
    writer = make_cache(compress_threshold=1024)
    writer.get("k", lambda _key: "short")
    assert raw_kind(raw_memcached, writer.keys.encode("k")) == codec.KIND_JSON


def test_too_large_value_served_not_stored(
    make_cache: Callable[..., TieredCache], raw_memcached: MemcacheClient
) -> None:
    cache = make_cache(max_item_size=64 * 1024)
    value = secrets.token_hex(160_000)  # 320 kB that zlib can't shrink below 64 kB
    assert cache.get("k", lambda _key: value) == value
    assert raw_memcached.get(cache.keys.encode("k")) is None
    assert cache.stats()["errors"]["too_large"] == 1


# bytes in memcached that this version can't read


class PickleBomb:
    """An object that creates a file when unpickled, to detect any unpickling."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def header(kind: bytes = codec.KIND_JSON) -> bytes:
    return codec.pack(kind, b"")


# "TC" and the format version that this codec writes.
CURRENT_MAGIC = codec.pack(codec.KIND_JSON, b"")[:3]


UNDECODABLE = {
    "pickle": (None, codec.WIRE_FLAGS, ("errors", "undecodable")),
    "not-json": (b"{not json", codec.WIRE_FLAGS, ("errors", "undecodable")),
    "not-json-with-header": (
        header() + b"{not json",
        codec.WIRE_FLAGS,
        ("errors", "undecodable"),
    ),
    "other-version": (
        b"TC" + bytes([(codec.FORMAT_VERSION + 1) % 256]) + header()[3:] + b"1",
        codec.WIRE_FLAGS,
        ("errors", "undecodable"),
    ),
    "wrong-magic": (
        b"XY" + header()[2:] + b"1",
        codec.WIRE_FLAGS,
        ("errors", "undecodable"),
    ),
    "unknown-kind": (header(b"?") + b"1", codec.WIRE_FLAGS, ("errors", "undecodable")),
    "corrupt-zlib": (
        header(codec.KIND_ZLIB) + b"\x78\x9cnot zlib",
        codec.WIRE_FLAGS,
        ("errors", "undecodable"),
    ),
    "short": (b"TC", codec.WIRE_FLAGS, ("errors", "undecodable")),
    "flags-0": (header() + b"1", 0, ("remote", "undecodable_flags")),
}


def undecodable_payload(name: str, marker: Path) -> tuple[bytes, int, tuple[str, str]]:
    payload, flags, counter = UNDECODABLE[name]
    if payload is None:
        payload = pickle.dumps(PickleBomb(marker))
    return payload, flags, counter


@pytest.mark.parametrize("name", sorted(UNDECODABLE))
def test_undecodable_replaced(
    make_cache: Callable[..., TieredCache],
    raw_memcached: MemcacheClient,
    tmp_path: Path,
    name: str,
) -> None:
    cache = make_cache()
    marker = tmp_path / "unpickled"
    payload, flags, (section, counter) = undecodable_payload(name, marker)
    wire = cache.keys.encode("k")
    raw_memcached.set(wire, payload, flags=flags)
    before = cache.stats()[section][counter]
    assert cache.get("k", lambda _key: "fresh") == "fresh"
    assert cache.stats()[section][counter] > before
    assert raw_memcached.get(wire).startswith(CURRENT_MAGIC)
    assert raw_value(raw_memcached, wire) == "fresh"
    assert not marker.exists()


@pytest.mark.parametrize("name", sorted(UNDECODABLE))
def test_undecodable_replaced_by_get_many(
    make_cache: Callable[..., TieredCache],
    raw_memcached: MemcacheClient,
    tmp_path: Path,
    name: str,
) -> None:
    cache = make_cache()
    payload, flags, (section, counter) = undecodable_payload(name, tmp_path / "m")
    wire = cache.keys.encode("k")
    raw_memcached.set(wire, payload, flags=flags)
    before = cache.stats()[section][counter]
    assert cache.get_many(["k"], lambda keys: {"k": "fresh"}) == {"k": "fresh"}
    assert cache.stats()[section][counter] > before
    assert raw_value(raw_memcached, wire) == "fresh"


def test_undecodable_zlib_bomb_read_as_miss(
    make_cache: Callable[..., TieredCache], raw_memcached: MemcacheClient
) -> None:
    cache = make_cache()
    wire = cache.keys.encode("k")
    bomb = zlib.compress(b"[" * 50_000_000, 9)
    raw_memcached.set(wire, header(codec.KIND_ZLIB) + bomb, flags=codec.WIRE_FLAGS)
    assert cache.get("k", lambda _key: "fresh") == "fresh"
    assert raw_value(raw_memcached, wire) == "fresh"
