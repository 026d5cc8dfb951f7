"""An invalidation channel over PostgreSQL LISTEN/NOTIFY, through psycopg 3."""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from ..errors import ChannelError, ConfigurationError
from ..messages import MalformedMessage, Message, decode_message

log = logging.getLogger(__name__)

# PostgreSQL rejects a NOTIFY payload of NOTIFY_PAYLOAD_MAX_LENGTH bytes or
# more, defined in src/backend/commands/async.c as BLCKSZ - NAMEDATALEN - 128:
# 8000 with the default 8192-byte blocks and 64-byte names.
DEFAULT_MAX_PAYLOAD = 7999
_PAYLOAD_MAX_QUERY = (
    "SELECT current_setting('block_size')::int"
    " - (current_setting('max_identifier_length')::int + 1) - 128 - 1"
)
# A channel name is an identifier: at most NAMEDATALEN - 1 bytes by default.
_MAX_NAME_BYTES = 63

_BACKOFF_FIRST = 0.05
_BACKOFF_MAX = 2.0
# Seconds that the listener waits for notifications before it checks for close().
_POLL_INTERVAL = 0.2

# Connections that a forked child inherited, with their sockets closed in the
# child. Keeping the objects avoids a ResourceWarning when they are collected.
# psycopg 3.3 checks the process id and never ends a session from a child.
_INHERITED_CONNECTIONS: list[psycopg.Connection[Any]] = []


class PostgresChannel:
    """Publishes and listens on one PostgreSQL notification channel.

    ``publish`` runs ``pg_notify`` on an autocommit connection of its own.
    :meth:`notify_in_transaction` runs it on the caller's connection instead,
    inside the caller's transaction, so PostgreSQL delivers the message only
    if that transaction commits. Notifications are scoped to one database, so
    every process must connect to the same database.

    A background thread runs ``LISTEN`` on another connection of its own.
    When that connection fails, the thread reports the loss (the cache then
    flushes its local tier, because PostgreSQL keeps no message for a session
    that is not listening), reconnects with exponential backoff from 50 ms to
    2 s, listens again and reports the subscription back. A connection that
    dies without an error is found by TCP keepalives, by ``tcp_user_timeout``
    and by a ``SELECT 1`` sent after ``ping_interval`` seconds without
    notifications. A ping that gets no reply within ``socket_timeout`` seconds
    is aborted by shutting down the socket.

    :attr:`max_payload` is computed from the server's block size and name
    length at each listener connect, and is 7999 bytes until then.

    :param url: a ``postgresql://`` connection URL. Connection parameters in
        the URL win over the defaults set here.
    :param name: the notification channel name, at most 63 bytes.
    :param socket_timeout: seconds for connecting (libpq's
        ``connect_timeout``, whole seconds, at least 2), for unacknowledged
        sends (``tcp_user_timeout``, Linux only), for the keepalive idle time
        and interval, and for a ping's reply.
    :param application_name: shown in ``pg_stat_activity``, with
        `` listener`` or `` publisher`` appended.
    :param ping_interval: seconds without notifications after which the
        listener pings the server.
    :raises ConfigurationError: if the URL is not a valid connection string.
    :raises ValueError: if the name or a duration is invalid.
    """

    max_payload: int = DEFAULT_MAX_PAYLOAD

    def __init__(
        self,
        url: str,
        *,
        name: str = "tiercache_invalidations",
        socket_timeout: float = 2.0,
        application_name: str = "tiercache",
        ping_interval: float = 5.0,
    ) -> None:
        _check_name(name)
        _check_seconds("socket_timeout", socket_timeout)
        _check_seconds("ping_interval", ping_interval)
        try:
            self._url_params = conninfo_to_dict(url)
        except psycopg.ProgrammingError as exc:
            raise ConfigurationError(f"invalid PostgreSQL channel URL: {exc}") from None
        self.url = url
        self.name = name
        self.socket_timeout = socket_timeout
        self.application_name = application_name
        self.ping_interval = ping_interval
        self.reconnects = 0
        self.oversized = 0
        self._receiver: Callable[[bytes], None] | None = None
        self._on_state: Callable[[bool], None] | None = None
        self._closed = False
        self._reset_process_state()

    def _reset_process_state(self) -> None:
        self._pid = os.getpid()
        self._publisher: psycopg.Connection[Any] | None = None
        self._publish_lock = threading.Lock()
        self._listener: psycopg.Connection[Any] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- connections -------------------------------------------------------------

    def connect_params(self, role: str) -> dict[str, Any]:
        """Return the libpq parameters added to the URL for the ``role`` connection.

        Parameters already in the URL are left out, so the URL's values win.
        """
        seconds = max(1, math.ceil(self.socket_timeout))
        defaults: dict[str, Any] = {
            "application_name": f"{self.application_name} {role}",
            "connect_timeout": max(2, seconds),
            "keepalives": 1,
            "keepalives_idle": seconds,
            "keepalives_interval": seconds,
            "keepalives_count": 3,
            "tcp_user_timeout": int(self.socket_timeout * 1000),
            "client_encoding": "UTF8",
        }
        return {k: v for k, v in defaults.items() if k not in self._url_params}

    def _connect(self, role: str) -> psycopg.Connection[Any]:
        return psycopg.connect(self.url, autocommit=True, **self.connect_params(role))

    def _describe_server(self) -> str:
        # The URL may contain a password, so logs name only the server.
        params = self._url_params
        host = params.get("host") or "default host"
        return f"{host}:{params.get('port') or 5432}/{params.get('dbname') or ''}"

    # -- sending -----------------------------------------------------------------

    def publish(self, payload: bytes) -> None:
        """Send ``payload`` now, on this channel's own connection.

        A payload longer than :attr:`max_payload` bytes is replaced by a
        ``flush`` message (see :meth:`fit_payload`).

        :raises ChannelError: after :meth:`close`.
        :raises psycopg.Error: if the send fails on a fresh connection too.
        """
        if self._closed:
            raise ChannelError("PostgreSQL channel is closed: build a new one")
        if self._pid != os.getpid():
            # Forked without a call to after_fork(): never send on the
            # parent's socket.
            self.after_fork()
        text = self.fit_payload(payload)
        with self._publish_lock:
            try:
                self._notify(self._publisher_connection(), text)
            except psycopg.OperationalError as exc:
                # One retry on a fresh connection: the first send after a
                # server restart or a terminated session fails on the old one.
                log.debug("PostgreSQL channel publish failed, reconnecting: %s", exc)
                self._close_publisher()
                self._notify(self._publisher_connection(), text)

    def notify_in_transaction(self, connection: Any, payload: bytes) -> None:
        """Send ``payload`` through ``connection``, inside its open transaction.

        PostgreSQL delivers the notification when that transaction commits,
        and never if it rolls back. On an autocommit connection outside a
        transaction block it is delivered at once. A payload that is too long
        is replaced by a ``flush`` message, so its size never fails the
        caller's transaction.

        :param connection: a psycopg 3 :class:`psycopg.Connection` on the
            database that this channel listens on.
        :raises TypeError: if ``connection`` is not a psycopg 3 connection.
        :raises psycopg.Error: if the statement fails; the transaction is then
            in an error state, as after any failed statement.
        """
        if not isinstance(connection, psycopg.Connection):
            raise TypeError(
                "notify_in_transaction() needs a psycopg 3 Connection, not "
                f"{type(connection).__name__}; pass the driver connection of "
                "your transaction"
            )
        self._notify(connection, self.fit_payload(payload))

    def _notify(self, connection: psycopg.Connection[Any], text: str) -> None:
        # A plain Cursor, whatever cursor_factory the caller's connection
        # has, so that the %s placeholders work.
        with psycopg.Cursor(connection) as cursor:
            cursor.execute("SELECT pg_notify(%s, %s)", (self.name, text))

    def fit_payload(self, payload: bytes) -> str:
        """Return ``payload`` as text, or a ``flush`` message if it is too long.

        The bus splits keys into messages that fit, so a long payload means
        its size estimate was wrong. A flush makes every process drop its
        whole local tier, which covers any keys. It keeps the sender and
        sequence number of the message it replaces, so receivers count no
        gap.
        """
        # NOTE: the server counts bytes in the database encoding and this
        # counts UTF-8 bytes. They agree for ASCII, which tiercache's messages are.
        if len(payload) > self.max_payload:
            self.oversized += 1
            if self.oversized == 1 or self.oversized % 1000 == 0:
                log.warning(
                    "%d invalidation messages over the %d-byte NOTIFY limit sent "
                    "as flush messages, latest %d bytes",
                    self.oversized,
                    self.max_payload,
                    len(payload),
                )
            payload = self._flush_message(payload)
        return payload.decode("utf-8")

    def _flush_message(self, payload: bytes) -> bytes:
        own = Message("flush", f"postgres-channel-{os.getpid()}", 0, time.time())
        try:
            replaced = decode_message(payload)
        except MalformedMessage:
            return own.encode()
        flush = Message("flush", replaced.sender, replaced.seq, replaced.sent_at)
        encoded = flush.encode()
        return encoded if len(encoded) <= self.max_payload else own.encode()

    def _publisher_connection(self) -> psycopg.Connection[Any]:
        conn = self._publisher
        if conn is None or conn.closed or conn.broken:
            if conn is not None:
                conn.close()
            conn = self._publisher = self._connect("publisher")
        return conn

    def _close_publisher(self) -> None:
        conn, self._publisher = self._publisher, None
        if conn is not None:
            conn.close()

    # -- listening ---------------------------------------------------------------

    def subscribe(
        self, receiver: Callable[[bytes], None], on_state: Callable[[bool], None]
    ) -> None:
        """Deliver every notification on the channel to ``receiver``, as bytes.

        ``on_state(True)`` is called after each successful ``LISTEN`` and
        ``on_state(False)`` when that connection is lost. Both run in the
        listener thread. Calling it again replaces the receivers.

        :raises ChannelError: after :meth:`close`.
        """
        if self._closed:
            raise ChannelError("PostgreSQL channel is closed: build a new one")
        self._receiver, self._on_state = receiver, on_state
        if self._thread is None or not self._thread.is_alive():
            self._start_thread()

    def _start_thread(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._listen_forever, name="tiercache-postgres-channel", daemon=True
        )
        self._thread.start()

    def _listen_forever(self) -> None:
        backoff = _BACKOFF_FIRST
        failures = 0
        while not self._stop.is_set():
            try:
                self._listener = self._connect("listener")
            except Exception as exc:  # noqa: BLE001 - keep retrying, and say why
                failures += 1
                self._log_connect_failure(failures, exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)
                continue
            if failures:
                log.info(
                    "PostgreSQL channel %s connected after %d failed attempts",
                    self._describe_server(),
                    failures,
                )
            failures = 0
            if self._listen(self._listener):
                backoff = _BACKOFF_FIRST
            if not self._stop.is_set():
                self.reconnects += 1
                self._stop.wait(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)

    def _listen(self, conn: psycopg.Connection[Any]) -> bool:
        """Listen on ``conn`` until it fails or close() is called.

        :returns: whether ``LISTEN`` succeeded.
        """
        listening = False
        try:
            row = conn.execute(_PAYLOAD_MAX_QUERY).fetchone()
            if row is not None:
                self.max_payload = int(row[0])
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.name)))
            listening = True
            self._report(True)
            self._receive_until_stopped(conn)
        except (psycopg.Error, OSError) as exc:
            if listening:
                log.warning(
                    "PostgreSQL channel %s listener lost: %s: %s; reconnecting",
                    self._describe_server(),
                    type(exc).__name__,
                    exc,
                )
                self._report(False)
            else:
                log.debug("PostgreSQL channel LISTEN failed: %s", exc)
        except Exception:  # noqa: BLE001 - the listener thread must survive
            log.exception("PostgreSQL channel listener failed; reconnecting")
            if listening:
                self._report(False)
        finally:
            self._listener = None
            conn.close()
        return listening

    def _receive_until_stopped(self, conn: psycopg.Connection[Any]) -> None:
        last_traffic = time.monotonic()
        while not self._stop.is_set():
            for notify in conn.notifies(timeout=_POLL_INTERVAL):
                last_traffic = time.monotonic()
                self._deliver(notify.payload.encode("utf-8"))
            if time.monotonic() - last_traffic >= self.ping_interval:
                self._ping(conn)
                last_traffic = time.monotonic()

    def _ping(self, conn: psycopg.Connection[Any]) -> None:
        """Run ``SELECT 1``, shutting the socket down if no reply comes in time.

        A server that is frozen, or a peer that acknowledges packets but never
        replies, leaves a query waiting forever, and keepalives can't see it.
        shutdown() on a duplicate of the socket's descriptor wakes the waiting
        read with end-of-file, so psycopg raises in this thread, which owns the
        connection and closes it. The lock makes sure the shutdown only
        happens while this thread is still inside the query.
        """
        lock = threading.Lock()
        pending = [True]

        def abort() -> None:
            with lock:
                if pending[0]:
                    log.debug("PostgreSQL channel ping timed out; aborting connection")
                    _shutdown_socket(conn)

        timer = threading.Timer(self.socket_timeout, abort)
        timer.daemon = True
        timer.start()
        try:
            conn.execute("SELECT 1")
        finally:
            with lock:
                pending[0] = False
            timer.cancel()

    def _deliver(self, payload: bytes) -> None:
        receiver = self._receiver
        if receiver is None:
            return
        try:
            receiver(payload)
        except Exception:  # noqa: BLE001 - the listener thread must survive
            log.exception("invalidation receiver failed on a message")

    def _report(self, connected: bool) -> None:
        on_state = self._on_state
        if on_state is None:
            return
        try:
            on_state(connected)
        except Exception:  # noqa: BLE001 - the listener thread must survive
            log.exception("channel state receiver failed")

    def _log_connect_failure(
        self, failures: int, exc: Exception, backoff: float
    ) -> None:
        level = logging.WARNING if failures == 1 else logging.DEBUG
        log.log(
            level,
            "PostgreSQL channel %s: connection attempt %d failed: %s; retrying in "
            "%.2fs, up to every %.0fs",
            self._describe_server(),
            failures,
            exc,
            backoff,
            _BACKOFF_MAX,
        )

    # -- lifecycle ---------------------------------------------------------------

    def after_fork(self) -> None:
        """Drop the parent's connections in a forked child and listen again.

        The child shares the parent's sockets. ``close()`` here would send
        PostgreSQL's Terminate message on them and end the parent's sessions,
        so the child only closes its own copies of the file descriptors, which
        leaves the parent's connections untouched. The parent's threads don't
        exist in the child, and its locks may be held, so both are replaced.
        """
        for conn in (self._publisher, self._listener):
            if conn is not None:
                _forget_inherited(conn)
        was_listening = self._thread is not None
        self._reset_process_state()
        if was_listening and not self._closed:
            self._start_thread()

    def close(self) -> None:
        """Stop the listener thread and close this process's connections."""
        self._closed = True
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            # The thread may be inside a connect attempt or a ping.
            thread.join(timeout=max(2, math.ceil(self.socket_timeout)) + 1)
        if self._pid == os.getpid():
            with self._publish_lock:
                self._close_publisher()


def _shutdown_socket(conn: psycopg.Connection[Any]) -> None:
    try:
        duplicate = socket.socket(fileno=os.dup(conn.fileno()))
    except (psycopg.Error, OSError):
        return
    with duplicate:
        try:
            duplicate.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _forget_inherited(conn: psycopg.Connection[Any]) -> None:
    # Closing the child's descriptor matters: if the parent is killed, the
    # server notices only once no process has the socket open, and until then
    # a listening session that no client reads holds back the notification
    # queue.
    try:
        os.close(conn.pgconn.socket)
    except (psycopg.Error, OSError):
        pass
    _INHERITED_CONNECTIONS.append(conn)


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"invalid channel name {name!r}: expected a non-empty str")
    if len(name.encode("utf-8")) > _MAX_NAME_BYTES:
        raise ValueError(
            f"invalid channel name {name!r}: PostgreSQL channel names are at most "
            f"{_MAX_NAME_BYTES} bytes"
        )


def _check_seconds(option: str, value: float) -> None:
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(
            f"invalid {option}={value!r}: expected a positive number of seconds"
        )
