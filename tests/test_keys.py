"""Tests of the key codec, alone and through caches sharing a real memcached."""

from __future__ import annotations

import enum
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pymemcache.client.base import Client as MemcacheClient

from tiercache import MISSING, Settings, TieredCache
from tiercache.adapters.sqlite import SQLiteOrigin
from tiercache.keys import MEMCACHED_KEY_MAX, KeyCodec
from tiercache.testing import MemcachedServer

NAMESPACES = st.from_regex(r"[A-Za-z0-9_.\-]{1,64}", fullmatch=True)
ANY_KEY = st.one_of(
    st.text(),
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=[])),
    st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)),
    st.binary(),
    st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E)),
    st.text(min_size=240, max_size=400),
    st.binary(min_size=240, max_size=400),
)

INJECTION_KEYS = [
    "segment:VIP customers",
    "tag:a\tb",
    "tag:a b",
    "tag:a_b",
    "tag:\x00",
    "tag:x\r\nset pwned 0 0 1",
]


def is_memcached_safe(wire: str) -> bool:
    data = wire.encode("ascii", "replace")
    return all(0x21 <= byte <= 0x7E for byte in data) and len(data) <= 250


# codec alone


@given(namespace=NAMESPACES, key=ANY_KEY)
def test_encode_memcached_safe(namespace: str, key: str | bytes) -> None:
    wire = KeyCodec(namespace).encode(key)
    assert is_memcached_safe(wire), wire


@given(namespace=NAMESPACES, key=ANY_KEY)
def test_encode_starts_with_namespace(namespace: str, key: str | bytes) -> None:
    assert KeyCodec(namespace).encode(key).startswith(namespace + "|")


@given(namespace=NAMESPACES, first=ANY_KEY, second=ANY_KEY)
def test_encode_injective(
    namespace: str, first: str | bytes, second: str | bytes
) -> None:
    codec = KeyCodec(namespace)
    same_key = type(first) is type(second) and first == second
    assert (codec.encode(first) == codec.encode(second)) == same_key


@given(key=ANY_KEY)
def test_encode_deterministic_across_codecs(key: str | bytes) -> None:
    # Two processes must agree on the memcached key, so nothing may depend
    # on per-instance state such as the memo.
    assert KeyCodec("tc").encode(key) == KeyCodec("tc").encode(key)


def test_encode_str_and_bytes_distinct() -> None:
    codec = KeyCodec("tc")
    assert codec.encode("a") != codec.encode(b"a")


def test_encode_shared_prefix_distinct() -> None:
    codec = KeyCodec("tc")
    prefix = "p" * 250
    first = codec.encode(prefix + "1")
    second = codec.encode(prefix + "2")
    assert first != second


def test_encode_long_keys_distinct() -> None:
    codec = KeyCodec("tc")
    prefix = "x" * 10_000
    assert codec.encode(prefix + "a") != codec.encode(prefix + "b")


def test_encode_long_bytes_keys_distinct() -> None:
    codec = KeyCodec("tc")
    prefix = b"p" * 250
    assert codec.encode(prefix + b"1") != codec.encode(prefix + b"2")


def test_encode_key_of_250_bytes() -> None:
    wire = KeyCodec("tc").encode("k" * 250)
    assert is_memcached_safe(wire), wire


def test_encode_plain_key_at_limit() -> None:
    codec = KeyCodec("tc")
    key = "k" * (MEMCACHED_KEY_MAX - len("tc|="))
    assert codec.encode(key) == "tc|=" + key


def test_encode_plain_key_over_limit_hashed() -> None:
    codec = KeyCodec("tc")
    key = "k" * (MEMCACHED_KEY_MAX - len("tc|=") + 1)
    wire = codec.encode(key)
    assert key not in wire
    assert is_memcached_safe(wire), wire


def test_encode_plain_and_hashed_forms_distinct() -> None:
    codec = KeyCodec("tc")
    hashed = codec.encode("a b")
    plain_lookalike = hashed.removeprefix("tc|")
    assert codec.encode(plain_lookalike) != hashed


def test_encode_namespaces_distinct() -> None:
    assert KeyCodec("one").encode("k") != KeyCodec("two").encode("k")


def test_encode_str_enum_like_plain_text() -> None:
    class Color(enum.StrEnum):
        RED = "red"

    codec = KeyCodec("tc")
    assert codec.encode(Color.RED) == codec.encode("red")


@pytest.mark.parametrize(
    ("key", "shown"),
    [
        (123, "123"),
        (None, "None"),
        (1.5, "1.5"),
        (("a",), "('a',)"),
        (["a"], "['a']"),
        (bytearray(b"a"), "bytearray(b'a')"),
        ({"a": 1}, "{'a': 1}"),
    ],
)
def test_encode_rejects_non_str_key(key: Any, shown: str) -> None:
    with pytest.raises(TypeError) as info:
        KeyCodec("tc").encode(key)
    assert shown in str(info.value)


# through caches sharing a real memcached


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
def raw_memcached(memcached: MemcachedServer) -> Iterator[MemcacheClient]:
    client = MemcacheClient(
        (memcached.host, memcached.port), timeout=2, default_noreply=False
    )
    yield client
    client.close()


def fail_loader(key: Any) -> Any:
    raise AssertionError(f"loader called for {key!r}; expected a hit")


@pytest.mark.parametrize("key", INJECTION_KEYS)
def test_cache_odd_key_round_trip(
    make_cache: Callable[..., TieredCache], key: str
) -> None:
    writer, reader = make_cache(), make_cache()
    writer.set(key, {"key": key})
    assert writer.get(key) == {"key": key}
    assert reader.get(key, fail_loader) == {"key": key}


def test_cache_odd_keys_stay_apart(make_cache: Callable[..., TieredCache]) -> None:
    writer, reader = make_cache(), make_cache()
    for index, key in enumerate(INJECTION_KEYS):
        writer.set(key, index)
        writer.get(key)
    for index, key in enumerate(INJECTION_KEYS):
        assert reader.get(key, fail_loader) == index, key


def test_cache_odd_keys_inject_nothing(
    make_cache: Callable[..., TieredCache], raw_memcached: MemcacheClient
) -> None:
    writer, reader = make_cache(), make_cache()
    for key in INJECTION_KEYS:
        writer.set(key, "v")
        writer.get(key)
        reader.get(key)
    assert raw_memcached.get("pwned") is None
    assert raw_memcached.get(writer.keys.encode("pwned")) is None


def test_cache_odd_keys_stored_under_wire_key(
    make_cache: Callable[..., TieredCache], raw_memcached: MemcacheClient
) -> None:
    writer = make_cache()
    for key in INJECTION_KEYS:
        writer.set(key, "v")
        writer.get(key)
    for key in INJECTION_KEYS:
        assert raw_memcached.get(writer.keys.encode(key)) is not None, key


def test_cache_str_and_bytes_keys_apart(make_cache: Callable[..., TieredCache]) -> None:
    writer, reader = make_cache(), make_cache()
    writer.set("a", "from str")
    writer.set(b"a", "from bytes")
    writer.get("a")
    writer.get(b"a")
    assert reader.get("a", fail_loader) == "from str"
    assert reader.get(b"a", fail_loader) == "from bytes"


def long_keys() -> dict[str, str]:
    shared = "s" * 250
    return {
        "k1": shared + "-first",
        "k2": shared + "-second",
        "k3": "t" * 250,
    }


def test_cache_long_keys_get(make_cache: Callable[..., TieredCache]) -> None:
    writer, reader = make_cache(), make_cache()
    keys = long_keys()
    for name, key in keys.items():
        writer.set(key, name)
        writer.get(key)
    for name, key in keys.items():
        assert reader.get(key, fail_loader) == name


def test_cache_long_keys_get_many(make_cache: Callable[..., TieredCache]) -> None:
    writer, reader = make_cache(), make_cache()
    keys = long_keys()
    for name, key in keys.items():
        writer.set(key, name)
    writer.get_many(keys.values())

    def fail_many_loader(missing: list[Any]) -> dict[Any, Any]:
        raise AssertionError(
            f"loader called for {len(missing)} keys: {missing[:3]!r}; expected hits"
        )

    found = reader.get_many(keys.values(), fail_many_loader)
    assert found == {key: name for name, key in keys.items()}


def test_cache_long_keys_from_origin(make_cache: Callable[..., TieredCache]) -> None:
    writer, reader = make_cache(), make_cache()
    keys = long_keys()
    for name, key in keys.items():
        writer.set(key, name)
    assert reader.get_many(keys.values()) == {key: name for name, key in keys.items()}


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(keys=st.lists(ANY_KEY, min_size=1, max_size=4))
def test_cache_any_key_round_trip(
    make_cache: Callable[..., TieredCache], keys: list[str | bytes]
) -> None:
    writer, reader = make_cache(), make_cache()
    expected: dict[str | bytes, str] = {}
    for key in keys:
        value = uuid.uuid4().hex
        writer.set(key, value)
        expected[key] = value
    for key, value in expected.items():
        assert writer.get(key) == value
    for key, value in expected.items():
        assert reader.get(key, fail_loader) == value
    assert make_cache().get_many(keys) == expected


def test_cache_rejects_non_str_key(make_cache: Callable[..., TieredCache]) -> None:
    cache = make_cache()
    with pytest.raises(TypeError, match="123"):
        cache.get(123)  # type: ignore[arg-type]


def test_cache_rejects_unhashable_key(make_cache: Callable[..., TieredCache]) -> None:
    cache = make_cache()
    with pytest.raises(TypeError) as info:
        cache.get(["a"])  # type: ignore[arg-type]
    assert "['a']" in str(info.value)


# namespaces


def test_namespaces_keep_values_apart(make_cache: Callable[..., TieredCache]) -> None:
    first = make_cache(namespace="first")
    second = make_cache(namespace="second")
    assert first.get("k", lambda key: "one") == "one"
    assert second.get("k", lambda key: "two") == "two"
    first_cold = make_cache(namespace="first")
    second_cold = make_cache(namespace="second")
    assert first_cold.get("k", fail_loader) == "one"
    assert second_cold.get("k", fail_loader) == "two"


def test_namespaces_invalidate_apart(make_cache: Callable[..., TieredCache]) -> None:
    first = make_cache(namespace="first")
    second = make_cache(namespace="second")
    first.get("k", lambda key: "one")
    second.get("k", lambda key: "two")
    first.invalidate("k")
    assert second.get("k", fail_loader) == "two"
    assert make_cache(namespace="second").get("k", fail_loader) == "two"
    assert make_cache(namespace="first").get("k") is MISSING
