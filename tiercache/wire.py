"""Connections to memcached: sockets with command deadlines and reply parsing.

pymemcache manages the connections. This module adds what the remote tier
needs beyond it: a socket whose reads give up at a whole command's
deadline, the serializer that tags tiercache's items with their memcached
flags, and a parser for ``get`` replies that several requests can share.
"""

from __future__ import annotations

import math
import socket
import struct
import threading
import time
import types
from collections.abc import Callable
from typing import Any, Final

from pymemcache.client.base import Client
from pymemcache.exceptions import MemcacheError, MemcacheUnexpectedCloseError

from .codec import WIRE_FLAGS
from .settings import MEMCACHED_RELATIVE_TTL_MAX

# Bytes per second a reply must keep up to extend its command's deadline:
# 1 MiB (a full memcached item) may take one extra second.
MIN_TRANSFER_RATE = 1024 * 1024

# The last expiry memcached can store: a signed 32-bit Unix time.
MEMCACHED_EXPIRY_MAX = 2**31 - 1


class Down:
    def __repr__(self) -> str:
        return "DOWN"


DOWN: Final = Down()
"""Returned by reads whose server is marked down, so callers skip leases."""


class BadFlags:
    __slots__ = ("flags",)

    def __init__(self, flags: int) -> None:
        self.flags = flags


class Serde:
    """Store bytes with tiercache's flags; hand back foreign flags as BadFlags."""

    def serialize(self, key: str, value: bytes) -> tuple[bytes, int]:
        return value, WIRE_FLAGS

    def deserialize(self, key: str, value: bytes, flags: int) -> Any:
        if flags != WIRE_FLAGS:
            return BadFlags(flags)
        return value


SERDE = Serde()

FAULTS = (OSError, socket.timeout, MemcacheError)
# Errors of a socket the server closed, for example because it restarted.
# A command that gets one on a socket opened before it never reached the
# new server process, so it can be retried once on a fresh socket.
CLOSED_ERRORS = (MemcacheUnexpectedCloseError, ConnectionResetError, BrokenPipeError)


def memcached_expire(ttl: float | None, *, now: float | None = None) -> int:
    """Convert a TTL in seconds into memcached's expiry field.

    ``None`` means no expiry (0). Fractions round up, so 0.5 s never becomes
    0, which memcached reads as "never expire". A TTL above 30 days is sent
    as an absolute Unix time, because memcached reads it that way.
    """
    if ttl is None:
        return 0
    if ttl <= 0:
        raise ValueError(f"ttl must be positive to store, got {ttl!r}")
    seconds = math.ceil(ttl)
    if seconds > MEMCACHED_RELATIVE_TTL_MAX:
        # memcached keeps the expiry as a signed 32-bit Unix time: later
        # moments (past January 2038) would wrap to the past, so clamp.
        absolute = int(time.time() if now is None else now) + seconds
        return min(absolute, MEMCACHED_EXPIRY_MAX)
    return seconds


command_deadline = threading.local()


class DeadlineSocket(socket.socket):
    """A socket whose reads give up at the deadline of the current command.

    A per-read timeout alone lets a server that trickles a reply one byte
    at a time hold a command far longer than ``read_timeout``. Each byte
    received extends the deadline at :data:`MIN_TRANSFER_RATE`, so a large
    value on a busy host still arrives while a trickle does not.

    Once connected, the socket is in Python's blocking mode, and the
    kernel enforces the timeouts (``SO_RCVTIMEO`` and ``SO_SNDTIMEO``).
    Python's own timeout mode polls before every send and receive, which
    costs two more system calls per command. A kernel timeout is raised
    as ``TimeoutError``, as Python's would be.
    """

    _base_timeout: float | None = None
    # Whether the timeouts are the kernel's (after the first send).
    _kernel_timeouts = False
    # The SO_RCVTIMEO in force: set again only when it must change, near a
    # command's deadline and once after it.
    _receive_timeout: float | None = None

    def settimeout(self, value: float | None) -> None:
        self._base_timeout = value
        if self._kernel_timeouts:
            self._set_kernel_timeout(socket.SO_SNDTIMEO, value)
            self._set_kernel_timeout(socket.SO_RCVTIMEO, value)
            self._receive_timeout = value
        else:
            # connect() honours Python's timeout.
            super().settimeout(value)

    def _use_kernel_timeouts(self) -> None:
        base = self._base_timeout
        super().settimeout(None)
        self._set_kernel_timeout(socket.SO_SNDTIMEO, base)
        self._set_kernel_timeout(socket.SO_RCVTIMEO, base)
        self._receive_timeout = base
        self._kernel_timeouts = True

    def _set_kernel_timeout(self, option: int, seconds: float | None) -> None:
        if seconds is None:
            whole, micros = 0, 0  # a zero timeval means no timeout
        else:
            whole = int(seconds)
            # At least 1 µs: a zero timeval would mean "wait forever".
            micros = max(int((seconds - whole) * 1_000_000), 0 if whole else 1)
        self.setsockopt(socket.SOL_SOCKET, option, _TIMEVAL.pack(whole, micros))

    def sendall(self, data: Any, flags: int = 0) -> None:
        if not self._kernel_timeouts:
            self._use_kernel_timeouts()
        elif self._receive_timeout != self._base_timeout:
            self._set_kernel_timeout(socket.SO_RCVTIMEO, self._base_timeout)
            self._receive_timeout = self._base_timeout
        try:
            if len(data) <= _SEND_PIECE:
                super().sendall(data, flags)
            else:
                self._send_in_pieces(data, flags)
        except BlockingIOError:
            raise TimeoutError("memcached send timed out") from None

    def _send_in_pieces(self, data: Any, flags: int) -> None:
        # SO_SNDTIMEO bounds each send() call, not the whole request, so a
        # server that keeps reading slowly could hold a large store forever.
        # The command's deadline is checked between pieces and extended at
        # MIN_TRANSFER_RATE for the bytes sent, as receiving does.
        view = memoryview(data).cast("B")
        while view:
            deadline: float | None = getattr(command_deadline, "at", None)
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError("memcached command deadline passed")
            sent = super().send(view[:_SEND_PIECE], flags)
            view = view[sent:]
            if deadline is not None:
                command_deadline.at = deadline + sent / MIN_TRANSFER_RATE

    def recv(self, size: int, flags: int = 0) -> bytes:
        if not self._kernel_timeouts:
            self._use_kernel_timeouts()
        deadline: float | None = getattr(command_deadline, "at", None)
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("memcached command deadline passed")
            base = self._base_timeout
            timeout = remaining if base is None or remaining < base else base
            if timeout != self._receive_timeout:
                self._set_kernel_timeout(socket.SO_RCVTIMEO, timeout)
                self._receive_timeout = timeout
        try:
            data = super().recv(size, flags)
        except BlockingIOError:
            raise TimeoutError("memcached read timed out") from None
        if deadline is not None:
            command_deadline.at = deadline + len(data) / MIN_TRANSFER_RATE
        return data


# Requests up to this size go out in one sendall. Larger ones go out in
# pieces of this size, with the command's deadline checked between them.
_SEND_PIECE = 65536

# struct timeval for SO_RCVTIMEO and SO_SNDTIMEO: two C longs.
_TIMEVAL = struct.Struct("@ll")


# The socket module as pymemcache uses it, with the socket class replaced.
SOCKET_MODULE = types.SimpleNamespace(**vars(socket))
SOCKET_MODULE.socket = DeadlineSocket


def delete_chunk(keys: list[str]) -> Callable[[Client], None]:
    def delete(client: Client) -> None:
        client.delete_many(keys, noreply=False)

    return delete


def get_one(client: Client, key: str) -> tuple[int, bytes] | None:
    """Read one key: return its ``(flags, bytes)``, or ``None`` on a miss.

    pymemcache's own ``get`` checks the key and parses the reply line by
    line. The key here is already a valid memcached key, and every L2 hit
    takes this path.

    :raises ValueError: for a reply that isn't one value or ``END`` (the
        socket is closed, so nothing of it is read again).
    """
    if client.sock is None:
        # NOTE: pymemcache opens sockets lazily in a private method.
        client._connect()
    sock = client.sock
    assert sock is not None
    try:
        sock.sendall(b"get " + key.encode("ascii") + b"\r\n")
        return _read_one(sock, key)
    except BaseException:
        client.close()
        raise


_END = b"END\r\n"
_VALUE_END = b"\r\nEND\r\n"


def _read_one(sock: socket.socket, key: str) -> tuple[int, bytes] | None:
    """Parse the reply to ``get key``: one ``VALUE`` block and ``END``, or ``END``."""
    reply = _receive(sock, 65536)
    while True:
        if reply == _END:
            return None
        line_end = reply.find(b"\r\n")
        if line_end >= 0:
            break
        if len(reply) > _REPLY_LINE_MAX:
            raise ValueError(f"invalid memcached reply: no line end in {reply[:40]!r}")
        reply += _receive(sock, 65536)
    parts = reply[:line_end].split()
    if len(parts) != 4 or parts[0] != b"VALUE" or parts[1] != key.encode("ascii"):
        raise ValueError(f"invalid memcached reply {reply[:40]!r}")
    size = int(parts[3])
    start = line_end + 2
    total = start + size + len(_VALUE_END)
    if len(reply) < total:
        # A large value arrives in several chunks.
        reply = _receive_at_least(sock, reply, total)
    if len(reply) != total or not reply.endswith(_VALUE_END):
        raise ValueError(f"invalid memcached reply after {reply[:40]!r}")
    return int(parts[2]), reply[start : start + size]


def read_values(sock: socket.socket) -> dict[str, tuple[int, bytes]]:
    """Read ``VALUE key flags size`` blocks up to ``END`` from a get reply.

    Each value is sliced once from the bytes received, and a value that
    spans several reads is joined once.

    :raises ValueError: for a reply that breaks the protocol (the caller
        closes the socket, so nothing of it is read again).
    """
    values: dict[str, tuple[int, bytes]] = {}
    data = b""
    position = 0
    while True:
        end = data.find(b"\r\n", position)
        if end < 0:
            if len(data) - position > _REPLY_LINE_MAX:
                raise ValueError(
                    f"invalid memcached reply: no line end within "
                    f"{_REPLY_LINE_MAX} bytes of {data[position : position + 40]!r}"
                )
            data = data[position:] + _receive(sock, 65536)
            position = 0
            continue
        if end - position == 3 and data.startswith(b"END", position):
            return values
        parts = data[position:end].split()
        if len(parts) != 4 or parts[0] != b"VALUE":
            raise ValueError(f"invalid memcached reply {data[position:end][:40]!r}")
        start = end + 2
        stop = start + int(parts[3])
        if len(data) < stop + 2:
            data = _receive_at_least(sock, data[start:], stop + 2 - start)
            stop -= start
            start = 0
        if not data.startswith(b"\r\n", stop):
            raise ValueError(
                f"invalid memcached reply: the value of {parts[1][:40]!r} does not "
                f"end with CRLF"
            )
        values[parts[1].decode("ascii")] = (int(parts[2]), data[start:stop])
        position = stop + 2


# The longest reply line read_values accepts. A VALUE line with a 250-byte
# key and two 32-bit numbers takes under 300 bytes.
_REPLY_LINE_MAX = 1024


def _receive(sock: socket.socket, size: int) -> bytes:
    chunk = sock.recv(size)
    if not chunk:
        raise ConnectionResetError("memcached closed the connection")
    return chunk


def _receive_at_least(sock: socket.socket, head: bytes, size: int) -> bytes:
    """Return ``head`` followed by data from ``sock``, ``size`` bytes or more."""
    chunks = [head]
    length = len(head)
    while length < size:
        chunk = _receive(sock, max(65536, size - length))
        chunks.append(chunk)
        length += len(chunk)
    return b"".join(chunks)
