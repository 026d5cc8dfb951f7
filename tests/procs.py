"""Child processes that each run a TieredCache, for tests that span OS processes.

The test process starts a child with :class:`CacheProcess`. The child builds
its own cache from a :class:`CacheSpec` (its own memcached sockets, Redis
subscription and SQLite connection), then serves requests sent over a pipe.
Each request runs one function of ``OPERATIONS`` against the child's cache and
returns its result, or raises :class:`ChildError` with the child's traceback.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import multiprocessing
import os
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from pymemcache.client.base import Client as MemcacheClient

from tiercache import Settings, TieredCache, codec, signals
from tiercache.adapters.redis_channel import RedisChannel
from tiercache.adapters.sqlite import SQLiteOrigin
from tiercache.keys import KeyCodec

SPAWN = multiprocessing.get_context("spawn")

# Seconds a child waits for its channel subscription before it reports ready.
SUBSCRIBE_TIMEOUT = 10.0


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """Servers, channel and origin of the cache that a child process builds."""

    memcached_servers: tuple[str, ...]
    origin_path: str
    namespace: str
    channel_url: str = ""
    channel_name: str = "tiercache:invalidations"
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def settings(self) -> Settings:
        """Build the cache settings; ``options`` override the defaults."""
        return Settings(
            memcached_servers=self.memcached_servers,
            namespace=self.namespace,
            **self.options,
        )

    def replace(self, **changes: Any) -> CacheSpec:
        """Return a copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)


def build_cache(spec: CacheSpec) -> TieredCache:
    """Build a cache with an SQLite origin and, if configured, a Redis channel."""
    channel = None
    if spec.channel_url:
        channel = RedisChannel(spec.channel_url, name=spec.channel_name)
    origin = SQLiteOrigin(spec.origin_path)
    return TieredCache(spec.settings(), origin=origin, channel=channel)


def is_trusted(cache: TieredCache) -> bool:
    """Tell whether ``cache`` has a channel and currently trusts its L1."""
    return cache.bus is not None and cache.bus.is_trusted


def wait_until(
    predicate: Callable[[], bool], timeout: float, interval: float = 0.01
) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def raw_memcached_value(address: str, namespace: str, key: str) -> Any:
    """Read ``key`` straight from one memcached server, bypassing tiercache.

    :returns: ``None`` when the server has no item, ``("lease", None)`` for a
        fill lease, or ``(kind, value)`` with the decoded JSON value.
    """
    host, port = address.rsplit(":", 1)
    client = MemcacheClient((host, int(port)), connect_timeout=2, timeout=2)
    try:
        raw = client.get(KeyCodec(namespace).encode(key))
    finally:
        client.close()
    if raw is None:
        return None
    envelope = codec.unpack(raw)
    if envelope.kind == codec.KIND_LEASE:
        return ("lease", None)
    if envelope.kind == codec.KIND_NEGATIVE:
        return ("negative", None)
    return ("value", codec.load_body(envelope.body))


# -- the child's side ------------------------------------------------------------


class _CapturedLog(logging.Handler):
    """Log handler that stores WARNING and higher records of tiercache as text."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        line = f"{record.levelname} {record.name}: {record.getMessage()}"
        if record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            line += f" [{type(error).__name__}: {error}]"
        self.lines.append(line)


@dataclasses.dataclass
class ChildState:
    """The cache of one child and what its operations record."""

    cache: TieredCache
    shared: dict[str, Any]
    log: _CapturedLog
    receivers: list[Callable[..., None]] = dataclasses.field(default_factory=list)
    invalidated_keys: list[tuple[str, ...]] = dataclasses.field(default_factory=list)


def _get(state: ChildState, key: str) -> Any:
    return state.cache.get(key)


def _get_with_loader_value(state: ChildState, key: str, value: Any) -> Any:
    return state.cache.get(key, lambda _key: value)


def _set(state: ChildState, key: str, value: Any) -> None:
    state.cache.set(key, value)


def _invalidate(state: ChildState, key: str) -> None:
    state.cache.invalidate(key)


def _stats(state: ChildState) -> dict[str, Any]:
    return state.cache.stats()


def _clear_local(state: ChildState) -> None:
    state.cache.clear_local()


def _is_local(state: ChildState, key: str) -> bool:
    return state.cache.keys.encode(key) in state.cache.local


def _logs(state: ChildState) -> list[str]:
    return list(state.log.lines)


def _collect_garbage(state: ChildState) -> int:
    return gc.collect()


def _wait_trusted(state: ChildState, timeout: float) -> bool:
    bus = state.cache.bus
    return bus is not None and wait_until(lambda: bus.is_trusted, timeout)


def _get_with_blocking_loader(state: ChildState, key: str) -> Any:
    """Read ``key`` with a loader that reads the origin, then blocks.

    The loader sets the shared event ``loaded`` once it has read the row and
    returns only after the shared event ``release`` is set, so the test can
    commit a write between the read and the fill.
    """
    origin = state.cache.origin
    assert origin is not None

    def load_then_block(load_key: str) -> Any:
        row = origin.load(load_key)
        state.shared["loaded"].set()
        if not state.shared["release"].wait(10):
            raise TimeoutError("the test did not set the release event within 10 s")
        return row

    return state.cache.get(key, load_then_block)


def _connect_receivers(state: ChildState) -> None:
    """Connect a receiver that raises, then one that records the keys."""

    def raise_error(sender: Any, **kwargs: Any) -> None:
        raise RuntimeError("receiver failed on purpose")

    def record_keys(sender: Any, *, keys: tuple[str, ...], **kwargs: Any) -> None:
        state.invalidated_keys.append(tuple(keys))

    # blinker keeps only weak references to receivers by default, so the state
    # stores strong ones.
    state.receivers += [raise_error, record_keys]
    signals.invalidated.connect(raise_error)
    signals.invalidated.connect(record_keys)


def _invalidated_keys(state: ChildState) -> list[tuple[str, ...]]:
    return list(state.invalidated_keys)


def _get_in_stampede(state: ChildState, key: str, threads: int) -> list[Any]:
    """Read a cold ``key`` from ``threads`` threads at once, with a slow loader.

    Every process waits on the shared barrier ``start``, so the threads of
    all processes miss together. The loader sleeps 0.2 s and counts its
    calls in the shared integer ``loads``.
    """
    loads = state.shared["loads"]

    def slow_loader(load_key: str) -> str:
        time.sleep(0.2)
        with loads.get_lock():
            loads.value += 1
        return f"loaded by pid {os.getpid()} thread {threading.get_ident()}"

    go = threading.Event()
    results: list[Any] = [None] * threads

    def read(index: int) -> None:
        go.wait()
        try:
            results[index] = state.cache.get(key, slow_loader)
        except Exception as exc:  # noqa: BLE001 - returned to the test as text
            results[index] = f"raised {type(exc).__name__}: {exc}"

    workers = [threading.Thread(target=read, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    state.shared["start"].wait(10)
    go.set()
    for worker in workers:
        worker.join(10)
    return results


OPERATIONS: dict[str, Callable[..., Any]] = {
    "get": _get,
    "get_with_loader_value": _get_with_loader_value,
    "set": _set,
    "invalidate": _invalidate,
    "stats": _stats,
    "clear_local": _clear_local,
    "is_local": _is_local,
    "logs": _logs,
    "collect_garbage": _collect_garbage,
    "wait_trusted": _wait_trusted,
    "get_with_blocking_loader": _get_with_blocking_loader,
    "connect_receivers": _connect_receivers,
    "invalidated_keys": _invalidated_keys,
    "get_in_stampede": _get_in_stampede,
}


def serve(spec: CacheSpec, conn: Connection, shared: dict[str, Any]) -> None:
    """Build the cache, report ready, then run requests until ``stop`` or EOF.

    A request is ``(request_id, operation, args, in_thread)``; the reply is
    ``(request_id, succeeded, result or traceback text)``. Requests with
    ``in_thread`` run in their own thread, so the child keeps serving others.
    """
    captured = _CapturedLog()
    logging.getLogger("tiercache").addHandler(captured)
    try:
        cache = build_cache(spec)
        if cache.bus is not None and not wait_until(
            lambda: is_trusted(cache), SUBSCRIBE_TIMEOUT
        ):
            raise TimeoutError(
                f"subscription to {spec.channel_url} timed out after "
                f"{SUBSCRIBE_TIMEOUT} s"
            )
    except BaseException:
        conn.send((0, False, traceback.format_exc()))
        return
    conn.send((0, True, os.getpid()))
    state = ChildState(cache, shared, captured)
    send_lock = threading.Lock()

    def run(request_id: int, operation: str, args: tuple[Any, ...]) -> None:
        try:
            reply = (request_id, True, OPERATIONS[operation](state, *args))
        except BaseException:
            reply = (request_id, False, traceback.format_exc())
        with send_lock:
            conn.send(reply)

    while True:
        try:
            request_id, operation, args, in_thread = conn.recv()
        except EOFError:
            break
        if operation == "stop":
            break
        if in_thread:
            threading.Thread(target=run, args=(request_id, operation, args)).start()
        else:
            run(request_id, operation, args)
    cache.close()


# -- the test's side -------------------------------------------------------------


class ChildError(Exception):
    """An operation raised in a child process; the message has its traceback."""


class Reply:
    """The pending result of a request that runs in a thread of the child."""

    def __init__(self, process: CacheProcess, request_id: int, operation: str) -> None:
        self._process = process
        self._request_id = request_id
        self._operation = operation

    def result(self, timeout: float = 10.0) -> Any:
        """Wait for the child's reply and return its result."""
        return self._process._receive(self._request_id, self._operation, timeout)


class CacheProcess:
    """A TieredCache in a child process, driven through a pipe.

    :param spec: how the child builds its cache.
    :param shared: multiprocessing events, values and barriers that the
        child's operations use; they can only be handed over at start.
    :param context: the multiprocessing start method, spawn by default.
    """

    def __init__(
        self,
        spec: CacheSpec,
        *,
        shared: dict[str, Any] | None = None,
        context: Any = SPAWN,
    ) -> None:
        self._conn, child_conn = context.Pipe()
        self.process = context.Process(
            target=serve, args=(spec, child_conn, shared or {}), daemon=True
        )
        self.process.start()
        child_conn.close()
        self._next_id = 1
        self._replies: dict[int, tuple[bool, Any]] = {}
        self.pid: int | None = None

    def wait_ready(self, timeout: float = 20.0) -> CacheProcess:
        """Wait until the child has built its cache and subscribed."""
        self.pid = self._receive(0, "start", timeout)
        return self

    def call(self, operation: str, *args: Any, timeout: float = 10.0) -> Any:
        """Run ``operation`` in the child and return its result."""
        request_id = self._send(operation, args, in_thread=False)
        return self._receive(request_id, operation, timeout)

    def submit(self, operation: str, *args: Any) -> Reply:
        """Start ``operation`` in a thread of the child and return at once."""
        request_id = self._send(operation, args, in_thread=True)
        return Reply(self, request_id, operation)

    def close(self) -> None:
        """Ask the child to close its cache and exit; kill it after 5 s."""
        if self.process.is_alive():
            try:
                self._conn.send((-1, "stop", (), False))
            except OSError:
                pass
            self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self._conn.close()

    def _send(self, operation: str, args: tuple[Any, ...], *, in_thread: bool) -> int:
        if operation not in OPERATIONS:
            raise ValueError(f"unknown child operation {operation!r}")
        request_id = self._next_id
        self._next_id += 1
        self._conn.send((request_id, operation, args, in_thread))
        return request_id

    def _receive(self, request_id: int, operation: str, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while request_id not in self._replies:
            left = deadline - time.monotonic()
            if left <= 0 or not self._conn.poll(left):
                raise TimeoutError(
                    f"child pid {self.process.pid} did not finish {operation!r} "
                    f"within {timeout} s (alive: {self.process.is_alive()})"
                )
            try:
                reply_id, succeeded, payload = self._conn.recv()
            except EOFError:
                raise ChildError(
                    f"child pid {self.process.pid} exited with code "
                    f"{self.process.exitcode} before finishing {operation!r}"
                ) from None
            self._replies[reply_id] = (succeeded, payload)
        succeeded, payload = self._replies.pop(request_id)
        if not succeeded:
            raise ChildError(f"{operation!r} failed in the child:\n{payload}")
        return payload


def start_processes(
    spec: CacheSpec, count: int, *, shared: dict[str, Any] | None = None
) -> list[CacheProcess]:
    """Start ``count`` children at once and wait until all are ready."""
    processes = [CacheProcess(spec, shared=shared) for _ in range(count)]
    try:
        for process in processes:
            process.wait_ready()
    except BaseException:
        for process in processes:
            process.close()
        raise
    return processes
