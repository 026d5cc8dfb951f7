"""The remote tier (L2): a pool of memcached servers behind consistent hashing.

Each thread has its own pymemcache ``Client`` per server, created in the
process that uses it: a child after ``fork()`` never writes to a socket its
parent opened, so no reply can cross between processes. Every socket has
connect and read timeouts; a command that fails or times out closes its
socket, so a late reply can't be read by a later command.

A server that fails is marked down for ``node_retry_timeout`` seconds. Its
keys are misses meanwhile: they are not rehashed onto the other servers,
which would move a hot key's whole load onto a neighbour and leave stale
copies behind when the server returns. Deletes meant for a down server are
queued and replayed before the server is used again, so a value that was
invalidated while the server was away is not served when it returns.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import os
import threading
import time
import weakref
import zlib
from collections.abc import Callable, Iterable
from typing import Any, TypeVar, TypeVarTuple

from pymemcache.client.base import Client
from pymemcache.exceptions import (
    MemcacheClientError,
    MemcacheServerError,
    MemcacheUnknownError,
)

from .codec import WIRE_FLAGS
from .settings import Settings, parse_server
from .wire import (
    CLOSED_ERRORS,
    FAULTS,
    SERDE,
    SOCKET_MODULE,
    BadFlags,
    Down,
    command_deadline,
    delete_chunk,
    get_one,
    read_values,
)
from .wire import (
    DOWN as DOWN,
)
from .wire import (
    memcached_expire as memcached_expire,
)

# Joins the keys of a tombstone record; memcached keys never contain it.
_TOMBSTONE_SEPARATOR = b" "
# Stands in a tombstone record for "flush the server"; no cache key starts
# with "!" because every key starts with its namespace.
_TOMBSTONE_FLUSH = b"!flush"
_T = TypeVar("_T")
_Args = TypeVarTuple("_Args")

log = logging.getLogger(__name__)

_POINTS_PER_SERVER = 160
_PENDING_DELETES_MAX = 100_000

# Keys per request to one server in a batch; each request has its own deadline.
BATCH_KEYS = 1000

# Bytes memcached counts against its item size limit beyond the key and the
# value: 59 measured on memcached 1.6.18, rounded up for other versions.
ITEM_OVERHEAD = 96
# Stands in for a queue too long to replay: the server is flushed instead.
_FLUSH_MARK = "\0flush"


class Node:
    """One memcached server with its health and its queued deletes."""

    def __init__(self, address: str, settings: Settings) -> None:
        self.address = address
        self.server = parse_server(address)
        self.down_until = 0.0
        self.failures = 0
        self.pending_deletes: set[str] = set()
        self.lock = threading.Lock()
        self._settings = settings
        digest = hashlib.blake2b(address.encode(), digest_size=12).hexdigest()
        self.tombstone_key = f"{settings.namespace}|!lost:{digest}"
        # Whether this process has replayed the deletes other processes
        # recorded for this server; see RemoteTier._check_tombstones.
        self.tombstones_checked = False

    def make_client(self) -> Client:
        return Client(
            self.server,
            serde=SERDE,
            connect_timeout=self._settings.connect_timeout,
            timeout=self._settings.read_timeout,
            no_delay=True,
            default_noreply=False,
            socket_module=SOCKET_MODULE,
        )

    def is_down(self, now: float) -> bool:
        return now < self.down_until


class RemoteTier:
    """Reads and writes of memcached keys, spread over the servers by hash."""

    def __init__(
        self,
        settings: Settings,
        *,
        on_degraded: Callable[[str, str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.on_degraded = on_degraded
        self.nodes = [Node(address, settings) for address in settings.memcached_servers]
        self._ring: list[int] = []
        self._ring_nodes: list[Node] = []
        self._build_ring()
        self._local = threading.local()
        self._pid = os.getpid()
        # The maximum time a command may take, in seconds: see DeadlineSocket.
        self._command_seconds = settings.read_timeout + settings.connect_timeout
        self.hits = 0
        self.misses = 0
        self.errors = 0
        self.undecodable = 0
        self.node_downs = 0
        self.skipped_down = 0
        self.too_large = 0
        self.deletes_queued = 0
        self.tombstones_unverified = 0
        _INSTANCES.add(self)

    # -- placement ---------------------------------------------------------

    def _build_ring(self) -> None:
        points: list[tuple[int, int]] = []
        for index, node in enumerate(self.nodes):
            for replica in range(_POINTS_PER_SERVER // 4):
                digest = hashlib.md5(f"{node.address}-{replica}".encode()).digest()
                for part in range(4):
                    value = int.from_bytes(digest[part * 4 : part * 4 + 4], "little")
                    points.append((value, index))
        points.sort()
        self._ring = [point for point, _ in points]
        # The owner of each ring point, and the first point's owner again at
        # the end, so a hash past the last point wraps around to the first.
        self._ring_nodes = [self.nodes[index] for _, index in points]
        self._ring_nodes.append(self._ring_nodes[0])

    def node_for(self, key: str) -> Node:
        """Return the server that owns ``key``; it never changes while one is down."""
        if len(self.nodes) == 1:
            return self.nodes[0]
        point = zlib.crc32(key.encode("ascii"))
        return self._ring_nodes[bisect.bisect(self._ring, point)]

    def _group_by_node(self, keys: Iterable[str]) -> dict[Node, list[str]]:
        """Group ``keys`` by owner, as :meth:`node_for` places each of them.

        Each group keeps the order of ``keys``, and only servers that own a
        key appear.
        """
        if len(self.nodes) == 1:
            all_keys = list(keys)
            return {self.nodes[0]: all_keys} if all_keys else {}
        # The body of node_for, inlined because this loop runs for every key.
        ring = self._ring
        owners = self._ring_nodes
        crc32 = zlib.crc32
        bisect_right = bisect.bisect_right
        by_node: dict[Node, list[str]] = {node: [] for node in self.nodes}
        for key in keys:
            by_node[owners[bisect_right(ring, crc32(key.encode("ascii")))]].append(key)
        return {node: group for node, group in by_node.items() if group}

    def _client(self, node: Node) -> Client:
        # A forked child gets a new thread-local in reset_after_fork, so it
        # never reuses a socket of its parent.
        local = self._local
        clients: dict[str, Client] | None = getattr(local, "clients", None)
        if clients is None:
            clients = local.clients = {}
        client = clients.get(node.address)
        if client is None:
            client = clients[node.address] = node.make_client()
        return client

    def _run(
        self, node: Node, command: Callable[[Client, *_Args], _T], *args: *_Args
    ) -> _T:
        """Run ``command(client, *args)`` on this thread's client for ``node``.

        A socket the server closed while idle (a restart) fails the first
        command sent on it. That command is retried once on a fresh socket,
        so a healthy server is not marked down.
        """
        client = self._client(node)
        reused = client.sock is not None
        # Each command, retry included, must finish within read_timeout
        # (plus connect_timeout if it connects): see DeadlineSocket.
        command_deadline.at = time.monotonic() + self._command_seconds
        try:
            return command(client, *args)
        except CLOSED_ERRORS:
            if not reused:
                raise
            self._close(node)
            return command(self._client(node), *args)
        except (KeyError, ValueError) as exc:
            # pymemcache raises these for a reply it can't match to the
            # request; the socket is out of step, so it must not be reused.
            self._close(node)
            raise MemcacheUnknownError(f"unexpected reply: {exc!r}") from exc
        finally:
            command_deadline.at = None

    # -- health -------------------------------------------------------------

    def _usable(self, node: Node) -> bool:
        """Tell whether ``node`` may be used now, replaying queued deletes first."""
        if node.down_until or node.failures or not node.tombstones_checked:
            return self._recheck_usable(node)
        return True

    def _recheck_usable(self, node: Node) -> bool:
        """Check a server that was marked down, failed, or has unread tombstones."""
        now = time.monotonic()
        if node.is_down(now):
            self.skipped_down += 1
            return False
        # Past its retry time: the next check takes the fast path again.
        node.down_until = 0.0
        if node.failures and not self._recover(node):
            self.skipped_down += 1
            return False
        if not node.tombstones_checked and not self._check_tombstones(node):
            self.skipped_down += 1
            return False
        return True

    def _recover(self, node: Node) -> bool:
        with node.lock:
            if not node.failures:
                return True
            pending = list(node.pending_deletes)
            try:
                if _FLUSH_MARK in pending:
                    self._run(node, lambda c: c.flush_all(noreply=False))
                elif pending:
                    self._delete_on(node, pending)
                else:
                    self._run(node, lambda c: c.version())
            except FAULTS as exc:
                self._close(node)
                node.down_until = time.monotonic() + self.settings.node_retry_timeout
                log.debug("memcached %s still down: %s", node.address, exc)
                return False
            node.pending_deletes.difference_update(pending)
            node.failures = 0
        log.warning(
            "memcached %s is back; replayed %d queued deletes",
            node.address,
            len(pending),
        )
        return True

    def _fail(self, node: Node, exc: BaseException) -> None:
        self.errors += 1
        self._close(node)
        with node.lock:
            node.failures += 1
            node.down_until = time.monotonic() + self.settings.node_retry_timeout
            first = node.failures == 1
        if first:
            self.node_downs += 1
            if self.on_degraded is not None:
                self.on_degraded("node_down", node.address)
            log.warning(
                "memcached %s marked down for %.1fs after %s: %s",
                node.address,
                self.settings.node_retry_timeout,
                type(exc).__name__,
                exc,
            )

    def _close(self, node: Node) -> None:
        clients: dict[str, Client] | None = getattr(self._local, "clients", None)
        if clients is not None:
            client = clients.pop(node.address, None)
            if client is not None:
                client.close()

    # -- tombstones -----------------------------------------------------------
    #
    # A delete that can't reach its server is queued in this process and
    # broadcast on the channel, but a process that starts later, or that was
    # not subscribed at the time, hears neither. So the keys are also
    # appended to a tombstone record for that server, kept on the next
    # server of the pool. Before a process first uses a server, and again
    # whenever it may have missed messages, it replays the deletes recorded
    # there. The record expires with remote_ttl, when the values it guards
    # are gone anyway.

    def _tombstone_home(self, node: Node) -> Node | None:
        if len(self.nodes) < 2:
            return None
        index = self.nodes.index(node)
        return self.nodes[(index + 1) % len(self.nodes)]

    def can_record_tombstone(self, key: str) -> bool:
        """Tell whether a missed delete of ``key`` could be recorded now."""
        home = self._tombstone_home(self.node_for(key))
        return home is not None and not home.is_down(time.monotonic())

    def _record_tombstone(self, node: Node, keys: list[str]) -> None:
        home = self._tombstone_home(node)
        if home is None or home.is_down(time.monotonic()):
            # NOTE: with one server, or both down, nothing records the
            # missed deletes for processes that don't hear the broadcast.
            return
        data = _TOMBSTONE_SEPARATOR.join(key.encode("ascii") for key in keys)
        expire = memcached_expire(self._tombstone_ttl())
        key = node.tombstone_key
        try:
            if self._run(
                home, lambda c: c.append(key, _TOMBSTONE_SEPARATOR + data, expire)
            ):
                return
            if self._run(home, lambda c: c.add(key, data, expire)):
                return
            # Another process created the record between the two commands.
            if self._run(
                home, lambda c: c.append(key, _TOMBSTONE_SEPARATOR + data, expire)
            ):
                return
        except MemcacheServerError:
            pass
        except FAULTS as exc:
            self._fail(home, exc)
            return
        # The record exists but took no more, because memcached replies
        # NOT_STORED to an append past its item size. Replace it with the
        # mark that makes every process flush the server before use.
        try:
            self._run(home, lambda c: c.set(key, _TOMBSTONE_FLUSH, expire))
        except FAULTS as exc:
            self._fail(home, exc)

    def _tombstone_ttl(self) -> float | None:
        ttl = self.settings.remote_ttl
        return None if ttl is None else ttl + self.settings.stale_ttl

    def _check_tombstones(self, node: Node) -> bool:
        """Replay deletes recorded for ``node``.

        When the record's server is down, ``node`` is used anyway, unchecked,
        and the record is read on a later use once that server is back. A
        node loses both its own deletes and its record only after two
        failures. Making every neighbour of a dead server unusable would turn
        one dead server into two.

        :returns: ``False`` if ``node`` itself failed while replaying.
        """
        home = self._tombstone_home(node)
        record: Any = None
        if home is not None:
            if home.is_down(time.monotonic()):
                # NOTE: during this window a value the node missed a delete
                # of can be served (a double fault: node and record's server).
                self.tombstones_unverified += 1
                return True
            try:
                record, cas = self._run(home, lambda c: c.gets(node.tombstone_key))
            except FAULTS as exc:
                self._fail(home, exc)
                self.tombstones_unverified += 1
                return True
        if isinstance(record, bytes) and record:
            try:
                self._replay_record(node, record)
            except FAULTS as exc:
                self._fail(node, exc)
                return False
            assert home is not None
            self._clear_record(home, node, cas)
        node.tombstones_checked = True
        return True

    def _clear_record(self, home: Node, node: Node, cas: bytes) -> None:
        # The deletes are done, so later processes needn't replay them (a
        # flush mark would otherwise flush the server again for each). The
        # cas keeps deletes appended since the record was read.
        expire = memcached_expire(self._tombstone_ttl())
        try:
            self._run(home, lambda c: c.cas(node.tombstone_key, b"", cas, expire))
        except FAULTS as exc:
            self._fail(home, exc)

    def _replay_record(self, node: Node, record: bytes) -> None:
        keys = [part for part in record.split(_TOMBSTONE_SEPARATOR) if part]
        if _TOMBSTONE_FLUSH in keys:
            self._run(node, lambda c: c.flush_all(noreply=False))
            log.warning("flushed %s: too many deletes were recorded", node.address)
            return
        names = [key.decode("ascii") for key in keys]
        self._delete_on(node, names)
        log.debug("replayed %d recorded deletes on %s", len(names), node.address)

    def recheck_tombstones(self) -> None:
        """Replay recorded deletes again before each server's next use.

        Called when this process may have missed invalidations (channel lost,
        sequence gap), since it may then also have missed "lost" messages.
        """
        for node in self.nodes:
            node.tombstones_checked = False

    def _queue_delete(self, node: Node, keys: Iterable[str]) -> None:
        with node.lock:
            node.pending_deletes.update(keys)
            if len(node.pending_deletes) > _PENDING_DELETES_MAX:
                # Too many to replay: flush the server when it returns instead.
                node.pending_deletes.clear()
                node.pending_deletes.add(_FLUSH_MARK)
        self.deletes_queued += 1

    # -- reads ---------------------------------------------------------------

    def _decode_flags(self, raw: Any) -> bytes | None:
        if isinstance(raw, BadFlags):
            self.undecodable += 1
            log.debug("memcached value with foreign flags %d read as a miss", raw.flags)
            return None
        return raw  # type: ignore[no-any-return]

    def get(self, key: str) -> bytes | None | Down:
        """Return the stored bytes, ``None`` on a miss, or ``DOWN``."""
        node = self.node_for(key)
        if not self._usable(node):
            return DOWN
        try:
            found = self._run(node, get_one, key)
        except (*FAULTS, ValueError) as exc:
            self._fail(node, exc)
            return DOWN
        if found is None:
            self.misses += 1
            return None
        flags, value = found
        if flags != WIRE_FLAGS:
            # Another program's item: delete it, so this key can be filled.
            self.undecodable += 1
            self.misses += 1
            self.delete_many([key])
            return None
        self.hits += 1
        return value

    def get_many(self, keys: Iterable[str]) -> tuple[dict[str, bytes], set[str]]:
        """Read many keys: one request per server, all sent before any reply is read.

        pymemcache's ``HashClient.get_many`` waits for each server's reply
        before asking the next. Writing every request first overlaps the
        round trips, so three servers cost about as much as one.

        :returns: the values found, and the keys whose server is down.
        """
        by_node = self._group_by_node(keys)
        found: dict[str, bytes] = {}
        down: set[str] = set()
        foreign: list[str] = []
        # Health checks may send commands of their own (tombstone reads on
        # another server), so they all run before any request is pipelined.
        usable = {node: self._usable(node) for node in by_node}
        for node, node_keys in by_node.items():
            if not usable[node]:
                down.update(node_keys)
        # Large batches go in rounds of BATCH_KEYS keys per server, each
        # with its own deadline, so their cost grows with their size
        # instead of timing out a healthy server.
        rounds = max(
            (len(node_keys) + BATCH_KEYS - 1) // BATCH_KEYS
            for node_keys in by_node.values()
        )
        for start in range(0, rounds * BATCH_KEYS, BATCH_KEYS):
            chunk = {
                node: node_keys[start : start + BATCH_KEYS]
                for node, node_keys in by_node.items()
                if usable[node] and node_keys[start : start + BATCH_KEYS]
            }
            try:
                self._get_many_pipelined(chunk, found, down, foreign)
            finally:
                command_deadline.at = None
            now = time.monotonic()
            for node in chunk:
                if node.is_down(now):
                    usable[node] = False
                    down.update(by_node[node][start + BATCH_KEYS :])
        if foreign:
            self.delete_many(foreign)
        self.hits += len(found)
        self.misses += sum(len(k) for k in by_node.values()) - len(found) - len(down)
        return found, down

    def _get_many_pipelined(
        self,
        by_node: dict[Node, list[str]],
        found: dict[str, bytes],
        down: set[str],
        foreign: list[str],
    ) -> None:
        """Send one request to each server of ``by_node``, then read each reply."""
        command_deadline.at = time.monotonic() + self._command_seconds
        sent: list[tuple[Node, Client, list[str], bool]] = []
        for node, node_keys in by_node.items():
            client = self._client(node)
            reused = client.sock is not None
            request = ("get " + " ".join(node_keys) + "\r\n").encode("ascii")
            try:
                if client.sock is None:
                    # NOTE: pymemcache opens sockets lazily in a private method;
                    # a pymemcache release that renames it breaks this line.
                    client._connect()
                assert client.sock is not None
                client.sock.sendall(request)
            except FAULTS as exc:
                self._fail(node, exc)
                down.update(node_keys)
                continue
            sent.append((node, client, node_keys, reused))
        for node, client, node_keys, reused in sent:
            try:
                assert client.sock is not None
                raw = read_values(client.sock)
            except CLOSED_ERRORS as exc:
                retried = self._get_many_again(node, node_keys) if reused else None
                if retried is None:
                    self._fail(node, exc)
                    down.update(node_keys)
                    continue
                raw = retried
            except (*FAULTS, ValueError) as exc:
                self._fail(node, exc)
                down.update(node_keys)
                continue
            for key, (flags, data) in raw.items():
                if flags != WIRE_FLAGS:
                    self.undecodable += 1
                    foreign.append(key)
                else:
                    found[key] = data

    def _get_many_again(
        self, node: Node, keys: list[str]
    ) -> dict[str, tuple[int, bytes]] | None:
        """Repeat a multi-get on a fresh socket after the old one was closed."""
        self._close(node)
        try:
            values = self._client(node).get_many(keys)
        except FAULTS:
            return None
        return {
            key: (value.flags, b"")
            if isinstance(value, BadFlags)
            else (WIRE_FLAGS, value)
            for key, value in values.items()
        }

    def gets(self, key: str) -> tuple[bytes | None, bytes | None] | Down:
        """Return ``(value, cas)``, ``(None, None)`` on a miss, or ``DOWN``."""
        node = self.node_for(key)
        if not self._usable(node):
            return DOWN
        try:
            raw, cas = self._run(node, lambda c: c.gets(key))
        except FAULTS as exc:
            self._fail(node, exc)
            return DOWN
        if raw is None:
            return None, None
        value = self._decode_flags(raw)
        if value is None:
            self.delete_many([key])
            return None, None
        return value, cas

    # -- writes --------------------------------------------------------------

    def add(self, key: str, payload: bytes, ttl: float | None) -> bool | Down:
        """Store ``payload`` only if ``key`` is absent; ``True`` if stored."""
        node = self.node_for(key)
        if not self._usable(node):
            return DOWN
        try:
            expire = memcached_expire(ttl)
            return bool(self._run(node, lambda c: c.add(key, payload, expire)))
        except MemcacheServerError as exc:
            self._handle_rejected_store(node, key, exc)
            return False
        except FAULTS as exc:
            self._fail(node, exc)
            return DOWN

    def cas(self, key: str, payload: bytes, cas: bytes, ttl: float | None) -> bool:
        """Replace ``key`` only if its cas token is still ``cas``."""
        node = self.node_for(key)
        if not self._usable(node):
            return False
        try:
            expire = memcached_expire(ttl)
            stored = self._run(node, lambda c: c.cas(key, payload, cas, expire))
        except MemcacheServerError as exc:
            self._handle_rejected_store(node, key, exc)
            return False
        except FAULTS as exc:
            self._fail(node, exc)
            return False
        return bool(stored)

    def set(self, key: str, payload: bytes, ttl: float | None) -> bool:
        """Store ``payload`` unconditionally; ``False`` if it could not be stored."""
        node = self.node_for(key)
        if not self._usable(node):
            return False
        try:
            expire = memcached_expire(ttl)
            return bool(self._run(node, lambda c: c.set(key, payload, expire)))
        except MemcacheServerError as exc:
            self._handle_rejected_store(node, key, exc)
            return False
        except FAULTS as exc:
            self._fail(node, exc)
            return False

    def _handle_rejected_store(
        self, node: Node, key: str, exc: MemcacheServerError
    ) -> None:
        # The server is healthy but refused the item (too large, out of
        # memory). Delete the key so an older value is not left behind.
        self.too_large += 1
        log.warning("memcached %s rejected a store: %s", node.address, exc)
        self._close(node)
        self.delete_many([key])

    def delete_many(self, keys: Iterable[str]) -> bool:
        """Delete ``keys``; deletes for down servers are queued and replayed.

        :returns: ``True`` if every delete reached its server now.
        """
        by_node = self._group_by_node(keys)
        delivered = True
        for node, node_keys in by_node.items():
            if not self._usable(node):
                self._queue_delete(node, node_keys)
                self._record_tombstone(node, node_keys)
                delivered = False
                continue
            try:
                self._delete_on(node, node_keys)
            except MemcacheClientError:
                raise
            except FAULTS as exc:
                self._fail(node, exc)
                self._queue_delete(node, node_keys)
                self._record_tombstone(node, node_keys)
                delivered = False
        return delivered

    def _delete_on(self, node: Node, keys: list[str]) -> None:
        # In rounds, each with its own deadline, like get_many.
        for start in range(0, len(keys), BATCH_KEYS):
            self._run(node, delete_chunk(keys[start : start + BATCH_KEYS]))

    def queue_lost_deletes(self, keys: Iterable[str]) -> None:
        """Queue deletes another process could not deliver, for replay before use.

        The owning server is treated as just recovered: the next command for
        it first replays the queue, so this process can't read a value that
        the other process meant to delete while the server was away.
        """
        for node, node_keys in self._group_by_node(keys).items():
            self._queue_delete(node, node_keys)
            with node.lock:
                node.failures = max(node.failures, 1)

    def flush_all(self) -> None:
        """Drop everything on every server (tests and namespace resets)."""
        for node in self.nodes:
            try:
                self._run(node, lambda c: c.flush_all(noreply=False))
            except FAULTS as exc:
                self._fail(node, exc)

    def close(self) -> None:
        """Close this thread's sockets."""
        clients: dict[str, Client] | None = getattr(self._local, "clients", None)
        if clients:
            for client in clients.values():
                client.close()
            clients.clear()

    def reset_after_fork(self) -> None:
        """Forget the parent's sockets without closing them: the parent owns them."""
        self._local = threading.local()
        for node in self.nodes:
            node.lock = threading.Lock()


_INSTANCES: weakref.WeakSet[RemoteTier] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for tier in list(_INSTANCES):
        tier.reset_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
