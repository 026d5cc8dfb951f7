"""Tests of the memcached wire helpers: kernel timeouts and the reply parsers.

The parsers are fed by a scripted socket; the timeouts use real loopback sockets.
"""

from __future__ import annotations

import socket
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from typing import cast

import pytest

from tiercache import wire
from tiercache.wire import _TIMEVAL, DeadlineSocket, _read_one, read_values

# A value containing what looks like the end of a reply, an empty value, and
# a value larger than one 64 KiB read.
VALUES = {
    "ns|=tricky": (29795, b"x\r\nEND\r\nVALUE ns|=fake 0 1\r\ny"),
    "ns|=empty": (0, b""),
    "ns|=large": (1, bytes(range(256)) * 1000),
}


def reply(values: dict[str, tuple[int, bytes]]) -> bytes:
    """Return a memcached ``get`` reply carrying ``values``."""
    blocks = [
        b"VALUE %s %d %d\r\n%s\r\n" % (key.encode(), flags, len(data), data)
        for key, (flags, data) in values.items()
    ]
    return b"".join(blocks) + b"END\r\n"


class ScriptedSocket:
    """A fake socket whose recv returns the given chunks, ``size`` bytes at most.

    Once the chunks run out, recv returns b"", as for a closed connection.
    """

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self.chunks = deque(chunks)
        self.reads = 0

    def recv(self, size: int) -> bytes:
        self.reads += 1
        if not self.chunks:
            return b""
        chunk = self.chunks.popleft()
        if len(chunk) > size:
            self.chunks.appendleft(chunk[size:])
            chunk = chunk[:size]
        return chunk


def as_socket(fake: ScriptedSocket) -> socket.socket:
    return cast(socket.socket, fake)


def split_every(data: bytes, size: int) -> list[bytes]:
    return [data[start : start + size] for start in range(0, len(data), size)]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000, 65536])
def test_read_values_chunk_sizes(size: int) -> None:
    fake = ScriptedSocket(split_every(reply(VALUES), size))
    assert read_values(as_socket(fake)) == VALUES
    assert not fake.chunks


def test_read_values_every_split_point() -> None:
    small = {key: VALUES[key] for key in ("ns|=tricky", "ns|=empty")}
    data = reply(small)
    for cut in range(1, len(data)):
        fake = ScriptedSocket([data[:cut], data[cut:]])
        assert read_values(as_socket(fake)) == small, cut


def test_read_values_empty_reply() -> None:
    assert read_values(as_socket(ScriptedSocket([b"END\r\n"]))) == {}


@pytest.mark.parametrize(
    "data",
    [
        b"SERVER_ERROR out of memory\r\n",
        b"VALUE ns|=k 0\r\nx\r\nEND\r\n",
        b"VALUE ns|=k 0 x\r\nx\r\nEND\r\n",
        b"STORED\r\n",
    ],
    ids=["server-error", "short-header", "bad-size", "other-reply"],
)
def test_read_values_invalid_line(data: bytes) -> None:
    with pytest.raises(ValueError):
        read_values(as_socket(ScriptedSocket([data])))


def test_read_values_value_without_crlf() -> None:
    fake = ScriptedSocket([b"VALUE ns|=k 0 3\r\nabcdEND\r\n"])
    with pytest.raises(ValueError, match="CRLF"):
        read_values(as_socket(fake))


def test_read_values_line_without_end() -> None:
    # A stream with no line end fails after a bounded read, not at the deadline.
    fake = ScriptedSocket([b"x" * 1000] * 100)
    with pytest.raises(ValueError, match="no line end"):
        read_values(as_socket(fake))
    assert fake.reads <= 3


@pytest.mark.parametrize("cut", [0, 10, 30, 100_000, len(reply(VALUES)) - 1])
def test_read_values_closed_midway(cut: int) -> None:
    fake = ScriptedSocket([reply(VALUES)[:cut]] if cut else [])
    with pytest.raises(ConnectionResetError):
        read_values(as_socket(fake))


def read(*chunks: bytes, key: str = "k") -> tuple[int, bytes] | None:
    return _read_one(as_socket(ScriptedSocket(chunks)), key)


def test_read_one_miss() -> None:
    assert read(b"END\r\n") is None


def test_read_one_hit() -> None:
    assert read(b"VALUE k 7 3\r\nabc\r\nEND\r\n") == (7, b"abc")


def test_read_one_value_in_pieces() -> None:
    body = bytes(range(256)) * 1000
    reply = b"VALUE k 0 %d\r\n" % len(body) + body + b"\r\nEND\r\n"
    pieces = [reply[i : i + 7000] for i in range(0, len(reply), 7000)]
    assert read(*pieces) == (0, body)


def test_read_one_header_in_pieces() -> None:
    assert read(b"VALUE k", b" 1 2\r", b"\nxy\r\nEND\r\n") == (1, b"xy")


def test_read_one_miss_in_pieces() -> None:
    assert read(b"EN", b"D\r\n") is None


@pytest.mark.parametrize(
    "reply",
    [
        b"VALUE other 0 1\r\nx\r\nEND\r\n",
        b"VALUE k 0 1\r\nx\r\nEND\r\nEND\r\n",
        b"VALUE k 0 1\r\nxy\r\nEND\r\n",
        b"SERVER_ERROR out of memory\r\n",
        b"END\r\nEND\r\n",
    ],
)
def test_read_one_rejects_bad_reply(reply: bytes) -> None:
    with pytest.raises(ValueError):
        read(reply)


def test_read_one_closed_connection() -> None:
    with pytest.raises(ConnectionResetError):
        read(b"VALUE k 0 10\r\nabc")


def test_read_one_line_without_end() -> None:
    fake = ScriptedSocket([b"x" * 1000] * 100)
    with pytest.raises(ValueError, match="no line end"):
        _read_one(as_socket(fake), "k")
    assert fake.reads <= 3


# kernel timeouts


@pytest.fixture
def silent_pair() -> Iterator[tuple[DeadlineSocket, socket.socket]]:
    """Yield a connected DeadlineSocket and the server end, which never replies."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = DeadlineSocket(socket.AF_INET, socket.SOCK_STREAM)
    client.settimeout(1.0)
    client.connect(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    try:
        yield client, server
    finally:
        client.close()
        server.close()


def kernel_timeout(sock: socket.socket, option: int) -> tuple[int, int]:
    raw = sock.getsockopt(socket.SOL_SOCKET, option, _TIMEVAL.size)
    seconds, micros = _TIMEVAL.unpack(raw)
    return seconds, micros


def test_timeouts_move_to_kernel_after_send(
    silent_pair: tuple[DeadlineSocket, socket.socket],
) -> None:
    client, _ = silent_pair
    client.settimeout(0.25)
    client.sendall(b"version\r\n")
    assert client.gettimeout() is None
    assert kernel_timeout(client, socket.SO_RCVTIMEO)[1] >= 240_000
    assert kernel_timeout(client, socket.SO_SNDTIMEO)[1] >= 240_000


def test_silent_server_raises_timeout_error(
    silent_pair: tuple[DeadlineSocket, socket.socket],
) -> None:
    client, _ = silent_pair
    client.settimeout(0.05)
    client.sendall(b"get k\r\n")
    with pytest.raises(TimeoutError):
        client.recv(100)


def test_deadline_shortens_receive_timeout(
    silent_pair: tuple[DeadlineSocket, socket.socket],
) -> None:
    client, server = silent_pair
    client.sendall(b"get k\r\n")
    wire.command_deadline.at = wire.time.monotonic() + 0.05
    try:
        with pytest.raises(TimeoutError):
            client.recv(100)
        assert kernel_timeout(client, socket.SO_RCVTIMEO) < (0, 60_000)
    finally:
        wire.command_deadline.at = None
    # The next command gets the whole read timeout back.
    client.sendall(b"get k\r\n")
    assert kernel_timeout(client, socket.SO_RCVTIMEO) == (1, 0)
    server.sendall(b"END\r\n")
    assert client.recv(100) == b"END\r\n"


def test_tiny_timeout_never_means_forever(
    silent_pair: tuple[DeadlineSocket, socket.socket],
) -> None:
    client, _ = silent_pair
    client.sendall(b"x")
    client._set_kernel_timeout(socket.SO_RCVTIMEO, 1e-9)
    assert kernel_timeout(client, socket.SO_RCVTIMEO) != (0, 0)
    client._set_kernel_timeout(socket.SO_RCVTIMEO, None)
    assert kernel_timeout(client, socket.SO_RCVTIMEO) == (0, 0)


def test_slow_reader_store_hits_deadline(
    silent_pair: tuple[DeadlineSocket, socket.socket],
) -> None:
    # The server reads steadily, so no single send() stalls for the socket
    # timeout, but at about 640 KB/s: below the transfer rate that extends
    # a command's deadline, so a 24 MB request must time out.
    client, server = silent_pair
    stop = threading.Event()

    def read_slowly() -> None:
        while not stop.is_set():
            try:
                if not server.recv(65536):
                    return
            except OSError:
                return
            stop.wait(0.1)

    reader = threading.Thread(target=read_slowly)
    reader.start()
    wire.command_deadline.at = wire.time.monotonic() + 0.2
    try:
        with pytest.raises(TimeoutError):
            client.sendall(b"x" * (24 * 1024 * 1024))
    finally:
        wire.command_deadline.at = None
        stop.set()
        client.close()
        reader.join()
