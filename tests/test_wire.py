"""Tests of the memcached wire helpers: kernel timeouts and the single-get parser."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from tiercache import wire
from tiercache.wire import _TIMEVAL, DeadlineSocket, _read_one


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


class ScriptedSocket:
    """Return the given chunks from recv, one per call."""

    def __init__(self, *chunks: bytes) -> None:
        self.chunks = list(chunks)

    def recv(self, size: int) -> bytes:
        return self.chunks.pop(0) if self.chunks else b""


def read(*chunks: bytes, key: str = "k") -> tuple[int, bytes] | None:
    return _read_one(ScriptedSocket(*chunks), key)  # type: ignore[arg-type]


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
