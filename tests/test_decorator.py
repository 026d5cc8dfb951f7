"""Tests of the cached() decorator: one entry per distinct call, in every process.

Tests run against real memcached. The cross-process test starts a child (see
procs.py) with a Redis channel, and calls the decorated function there through
the operations this module adds to the child.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import functools
import math
import operator
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from procs import (
    OPERATIONS,
    SPAWN,
    CacheProcess,
    CacheSpec,
    ChildState,
    build_cache,
    serve,
    wait_until,
)

from tiercache import MISSING, Settings, TieredCache
from tiercache.adapters.sqlite import SQLiteOrigin
from tiercache.decorator import CachedFunction
from tiercache.testing import MemcachedServer, RedisServer

# Seconds within which another process must see an invalidation.
INVALIDATION_WAIT = 1.0


class CallCounter:
    """A function wrapper that counts calls per argument tuple."""

    def __init__(self, function: Callable[..., Any]) -> None:
        self.function = function
        self.calls: Counter[Any] = Counter()
        self.lock = threading.Lock()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            self.calls[(args, tuple(sorted(kwargs.items())))] += 1
        return self.function(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.calls.values())


class TotalsReader:
    """A reader of ``total:<a>:<b>`` rows from an origin that counts calls per (a, b).

    Decorating the bound method gives the same default key prefix in every
    process, this module's name and ``TotalsReader.read_total``.
    """

    def __init__(self, origin: SQLiteOrigin) -> None:
        self.origin = origin
        self.calls: Counter[tuple[int, int]] = Counter()

    def read_total(self, a: int, b: int) -> Any:
        self.calls[(a, b)] += 1
        return self.origin.load(f"total:{a}:{b}")


# -- child-process operations --------------------------------------------------
#
# procs.serve runs the operations listed in procs.OPERATIONS. This module adds
# its own at import, and a child imports this module to find run_child.

_child_totals: list[tuple[TotalsReader, CachedFunction]] = []


def _child_function(state: ChildState) -> tuple[TotalsReader, CachedFunction]:
    if not _child_totals:
        origin = state.cache.origin
        assert isinstance(origin, SQLiteOrigin)
        reader = TotalsReader(origin)
        _child_totals.append((reader, state.cache.cached()(reader.read_total)))
    return _child_totals[0]


def _cached_total(state: ChildState, a: int, b: int) -> Any:
    _reader, function = _child_function(state)
    return function(a, b)


def _total_calls(state: ChildState) -> dict[tuple[int, int], int]:
    reader, _function = _child_function(state)
    return dict(reader.calls)


OPERATIONS.update({"cached_total": _cached_total, "total_calls": _total_calls})


def run_child(spec: CacheSpec, conn: Any, shared: dict[str, Any]) -> None:
    """Serve requests in a child, with this module's operations available."""
    serve(spec, conn, shared)


class _ChildContext:
    """The spawn context, except that children run :func:`run_child`."""

    def Pipe(self) -> Any:  # noqa: N802 - mirrors multiprocessing's name
        return SPAWN.Pipe()

    def Process(self, *, target: Any, args: Any, daemon: bool) -> Any:  # noqa: N802
        return SPAWN.Process(target=run_child, args=args, daemon=daemon)


# -- fixtures ------------------------------------------------------------------


@pytest.fixture
def make_cache(
    memcached: MemcachedServer, tmp_path: Path
) -> Iterator[Callable[..., TieredCache]]:
    """Build caches in this process that share memcached, an origin and a channel."""
    channel_url = f"memory://{uuid.uuid4().hex}"
    origin = SQLiteOrigin(str(tmp_path / "origin.db"))
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
def spec(memcached: MemcachedServer, redis: RedisServer, tmp_path: Path) -> CacheSpec:
    """A cache on the session memcached and Redis, with a fresh namespace."""
    tag = uuid.uuid4().hex[:10]
    return CacheSpec(
        memcached_servers=(memcached.address,),
        origin_path=str(tmp_path / "origin.sqlite3"),
        namespace=f"t{tag}",
        channel_url=redis.url,
        channel_name=f"invalidations-{tag}",
    )


@pytest.fixture
def child(spec: CacheSpec) -> Iterator[CacheProcess]:
    """One child process whose cache shares the test's servers and origin."""
    process = CacheProcess(spec, context=_ChildContext())
    try:
        process.wait_ready()
        yield process
    finally:
        process.close()


# -- one entry per distinct call -----------------------------------------------


def test_cached_split_arguments_distinct(
    make_cache: Callable[..., TieredCache],
) -> None:
    cache = make_cache()
    add = CallCounter(lambda a, b: f"{a}+{b}={a + b}")
    function = cache.cached(prefix="add")(add)

    assert function(1, 23) == "1+23=24"
    assert function(12, 3) == "12+3=15"
    assert add.total == 2
    assert function.key_for(1, 23) != function.key_for(12, 3)


def test_cached_repeated_calls_hit(make_cache: Callable[..., TieredCache]) -> None:
    cache, cold = make_cache(), make_cache()
    add = CallCounter(lambda a, b: a + b)
    function = cache.cached(prefix="add")(add)
    cold_function = cold.cached(prefix="add")(add)

    results = [function(1, 23) for _ in range(10)]
    results += [function(12, 3) for _ in range(10)]
    from_remote = [cold_function(1, 23), cold_function(12, 3)]

    assert results == [24] * 10 + [15] * 10
    assert from_remote == [24, 15]
    assert add.total == 2


def test_cached_kwargs_order_same_entry(make_cache: Callable[..., TieredCache]) -> None:
    cache = make_cache()
    render = CallCounter(lambda *, template, locale: f"{template}/{locale}")
    function = cache.cached(prefix="render")(render)

    assert function(template="welcome", locale="de") == "welcome/de"
    assert function(locale="de", template="welcome") == "welcome/de"
    assert render.total == 1
    assert function.key_for(template="welcome", locale="de") == function.key_for(
        locale="de", template="welcome"
    )


def test_cached_default_prefix_names_function(
    make_cache: Callable[..., TieredCache],
) -> None:
    cache = make_cache()
    reader = TotalsReader(SQLiteOrigin(":memory:"))
    function = cache.cached()(reader.read_total)

    key = function.key_for(1, 23)

    assert isinstance(key, str)
    assert key.startswith(f"{__name__}.TotalsReader.read_total:")


def test_cached_none_result_called_once(make_cache: Callable[..., TieredCache]) -> None:
    cache, cold = make_cache(), make_cache()
    lookup = CallCounter(lambda subscriber_id: None)
    function = cache.cached(prefix="subscriber")(lookup)
    cold_function = cold.cached(prefix="subscriber")(lookup)

    results = [function(404) for _ in range(3)] + [cold_function(404)]

    assert results == [None, None, None, None]
    assert lookup.total == 1
    assert cache.get(function.key_for(404)) is None


@pytest.mark.parametrize("falsy", [0, False, "", [], {}], ids=repr)
def test_cached_falsy_result_called_once(
    make_cache: Callable[..., TieredCache], falsy: Any
) -> None:
    cache = make_cache()
    lookup = CallCounter(lambda key: falsy)
    function = cache.cached(prefix="falsy")(lookup)

    results = [function("k") for _ in range(3)]

    assert results == [falsy] * 3
    assert all(type(result) is type(falsy) for result in results)
    assert lookup.total == 1


def test_cached_ttl_zero_calls_each_time(
    make_cache: Callable[..., TieredCache],
) -> None:
    cache = make_cache()
    lookup = CallCounter(lambda key: key.upper())
    function = cache.cached(prefix="upper", ttl=0)(lookup)

    assert [function("a") for _ in range(3)] == ["A", "A", "A"]
    assert lookup.total == 3


# -- invalidation --------------------------------------------------------------


def test_cached_invalidate_one_call_everywhere(
    spec: CacheSpec, child: CacheProcess
) -> None:
    origin = SQLiteOrigin(spec.origin_path)
    origin.store("total:1:23", "v1")
    origin.store("total:12:3", "w1")
    cache = build_cache(spec)
    try:
        assert cache.wait_ready()
        reader = TotalsReader(origin)
        function = cache.cached()(reader.read_total)
        assert function(1, 23) == "v1"
        assert function(12, 3) == "w1"
        # The child's first calls are L2 hits on the parent's fills.
        assert child.call("cached_total", 1, 23) == "v1"
        assert child.call("cached_total", 12, 3) == "w1"
        assert child.call("total_calls") == {}
        # New rows are written behind the cache's back, so only a reload returns them.
        origin.store("total:1:23", "v2")
        origin.store("total:12:3", "w2")

        function.invalidate(1, 23)

        assert wait_until(
            lambda: child.call("cached_total", 1, 23) == "v2", INVALIDATION_WAIT
        )
        assert child.call("cached_total", 12, 3) == "w1"
        assert child.call("total_calls") == {(1, 23): 1}
        assert function(1, 23) == "v2"
        assert function(12, 3) == "w1"
        assert reader.calls == Counter({(1, 23): 1, (12, 3): 1})
    finally:
        cache.close()


def test_cached_invalidate_with_kwargs(make_cache: Callable[..., TieredCache]) -> None:
    cache = make_cache()
    render = CallCounter(lambda template, *, locale: f"{template}/{locale}")
    function = cache.cached(prefix="render")(render)
    function("welcome", locale="de")
    function("welcome", locale="fr")

    function.invalidate("welcome", locale="de")
    function("welcome", locale="de")
    function("welcome", locale="fr")

    assert render.calls[(("welcome",), (("locale", "de"),))] == 2
    assert render.calls[(("welcome",), (("locale", "fr"),))] == 1


# -- keys the caller builds ----------------------------------------------------


def test_cached_custom_key_builder(make_cache: Callable[..., TieredCache]) -> None:
    cache = make_cache()
    calls = 0

    @dataclasses.dataclass(frozen=True)
    class Subscriber:
        id: int

    def subscriber_key(subscriber: Subscriber, *, fields: object) -> str:
        return f"subscriber:{subscriber.id}"

    @cache.cached(key=subscriber_key)
    def lookup(subscriber: Subscriber, *, fields: object) -> dict[str, int]:
        nonlocal calls
        calls += 1
        return {"id": subscriber.id}

    fields = object()  # JSON can't encode it: only the custom key works here.

    assert lookup.key_for(Subscriber(5), fields=fields) == "subscriber:5"
    assert lookup(Subscriber(5), fields=fields) == {"id": 5}
    assert lookup(Subscriber(5), fields=fields) == {"id": 5}
    assert cache.get("subscriber:5", lambda key: "not cached") == {"id": 5}
    assert calls == 1

    lookup.invalidate(Subscriber(5), fields=fields)

    assert cache.get("subscriber:5", lambda key: MISSING) is MISSING
    assert lookup(Subscriber(5), fields=fields) is MISSING
    assert calls == 1


def test_cached_callable_object_with_key(
    make_cache: Callable[..., TieredCache],
) -> None:
    # A functools.partial has no __qualname__, and with key= no prefix is needed.
    cache = make_cache()
    scale = functools.partial(operator.mul, 3)
    function = cache.cached(key=lambda value: f"scaled:{value}")(scale)

    assert function(5) == 15
    assert cache.get("scaled:5", lambda key: "not cached") == 15


def test_cached_callable_object_needs_prefix(
    make_cache: Callable[..., TieredCache],
) -> None:
    cache = make_cache()
    scale = functools.partial(operator.mul, 3)

    with pytest.raises(TypeError, match="prefix="):
        cache.cached()(scale)


def test_cached_custom_key_not_str_raises(
    make_cache: Callable[..., TieredCache],
) -> None:
    cache = make_cache()
    function = cache.cached(key=lambda subscriber_id: subscriber_id)(lambda _: "x")

    with pytest.raises(TypeError, match="cache key must be str or bytes"):
        function(5)


# -- arguments JSON can't encode faithfully ------------------------------------

UNSERIALIZABLE = [object(), b"raw bytes", {1: "int key"}, 2**70, {"a", "b"}]


@pytest.mark.parametrize(
    "argument", UNSERIALIZABLE, ids=["object", "bytes", "int-key", "big-int", "set"]
)
def test_cached_unserializable_args_raise(
    make_cache: Callable[..., TieredCache], argument: Any
) -> None:
    cache = make_cache()
    lookup = CallCounter(lambda value: "called")
    function = cache.cached(prefix="lookup")(lookup)

    with pytest.raises(TypeError, match="key=") as raised:
        function(argument)

    assert "lookup" in str(raised.value)
    assert lookup.total == 0


class Color(enum.Enum):
    RED = "red"


@dataclasses.dataclass
class Point:
    x: int
    y: int


# Pairs of distinct arguments that orjson encodes to the same JSON text.
JSON_ALIASES = [
    ((1, 2), [1, 2]),
    (datetime.datetime(2024, 1, 1), "2024-01-01T00:00:00"),
    (uuid.UUID(int=5), str(uuid.UUID(int=5))),
    (math.nan, None),
    (Color.RED, "red"),
    (Point(1, 2), {"x": 1, "y": 2}),
]


def describe(value: Any) -> str:
    return f"{type(value).__name__}: {value!r}"


@pytest.mark.parametrize(
    ("first", "second"),
    JSON_ALIASES,
    ids=["tuple-list", "datetime-str", "uuid-str", "nan-none", "enum-str", "dataclass"],
)
def test_cached_json_aliases_not_shared(
    make_cache: Callable[..., TieredCache], first: Any, second: Any
) -> None:
    # Each call returns its own argument's result or raises TypeError naming
    # key=. It never returns the result cached for the other argument.
    cache = make_cache()
    function = cache.cached(prefix="describe")(describe)

    for argument in (first, second):
        try:
            result = function(argument)
        except TypeError as exc:
            assert "key=" in str(exc)
            continue
        assert result == describe(argument)


def make_scaler(factor: int) -> Callable[[int], int]:
    def scale(value: int) -> int:
        return value * factor

    return scale


NAMELESS_PAIRS = [
    (lambda value: value * 2, lambda value: value * 3),
    (make_scaler(2), make_scaler(3)),
]


@pytest.mark.parametrize("pair", NAMELESS_PAIRS, ids=["lambdas", "closures"])
def test_cached_same_qualname_kept_apart(
    make_cache: Callable[..., TieredCache], pair: tuple[Callable[[int], int], ...]
) -> None:
    # Two functions with one module and qualified name must not share entries.
    # Either decorating the second raises, naming prefix=, or the calls stay apart.
    cache = make_cache()
    double, triple = pair
    try:
        cached_double = cache.cached()(double)
        cached_triple = cache.cached()(triple)
    except (TypeError, ValueError) as exc:
        assert "prefix=" in str(exc)
        return

    assert cached_double(5) == 10
    assert cached_triple(5) == 15
