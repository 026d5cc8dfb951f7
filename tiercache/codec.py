"""The value codec: orjson bytes behind a small header, identical in every tier.

Only values that read back equal in type and content are accepted: ``None``,
``bool``, ``int`` from -2**63 to 2**64-1, finite ``float``, ``str``, ``list``
and ``dict`` with ``str`` keys, nested up to 254 levels. Anything orjson
would refuse or silently change (tuple to list, datetime or UUID to str, NaN
to null, a ``str`` subclass to ``str``) raises before any tier or the origin
is written. Nothing here unpickles: bytes from memcached are parsed as JSON
or dropped.

On the wire (memcached) a value is ``TC`` + format byte + kind byte +
fresh-until and expires-at (8 bytes each, big-endian milliseconds since the
epoch, 0 for none) + the load's duration (4 bytes, milliseconds) + body,
stored with the memcached flags :data:`WIRE_FLAGS`. The expiry travels with
the value so that a process filling L1 from L2 never keeps an entry longer
than L2 does. Fresh-until and the load duration drive stale-while-revalidate
and early refresh.
"""

from __future__ import annotations

import math
import struct
import zlib
from typing import Any, Final, NamedTuple

import orjson

from .errors import SerializationError, UnsupportedTypeError

WIRE_FLAGS: Final = 0x7463
FORMAT_VERSION: Final = 2

KIND_JSON: Final = b"j"
KIND_ZLIB: Final = b"z"
KIND_NEGATIVE: Final = b"n"
KIND_LEASE: Final = b"l"

MAGIC: Final = b"TC" + bytes([FORMAT_VERSION])
# The header's fields, as :func:`unpack` reads them: magic, kind, then
# fresh-until, expires-at and the load duration, all in milliseconds. Batch
# reads check it directly, without building an Envelope for each payload.
HEADER: Final = struct.Struct(">3scQQI")
HEADER_SIZE: Final = HEADER.size

_INT_MIN = -(2**63)
_INT_MAX = 2**64 - 1
_MAX_DEPTH = 254


class Envelope(NamedTuple):
    """A wire payload split into its parts; times are Unix seconds, 0 for none."""

    kind: bytes
    body: bytes
    fresh_until: float
    expires_at: float
    load_seconds: float


class UndecodableValue(Exception):
    """Bytes in the remote tier that this version can't read (a miss)."""


def check_value(key: object, value: Any) -> None:
    """Raise if ``value`` would not read back equal in type and content.

    :raises UnsupportedTypeError: for a type outside the JSON model.
    :raises SerializationError: for an int out of range, NaN or infinity,
        or nesting deeper than 254 levels.
    """
    stack: list[tuple[Any, str, int]] = [(value, "value", 0)]
    while stack:
        item, path, depth = stack.pop()
        kind = type(item)
        if kind is str:
            _check_text(key, item, path)
            continue
        if kind is bool or item is None:
            continue
        if kind is int:
            if not _INT_MIN <= item <= _INT_MAX:
                raise SerializationError(
                    f"cannot cache key {key!r}: {path} is an int outside the "
                    f"64-bit range; store it as a str"
                )
            continue
        if kind is float:
            if not math.isfinite(item):
                raise SerializationError(
                    f"cannot cache key {key!r}: {path} is {item!r}, which JSON "
                    f"can't carry; store None or a str instead"
                )
            continue
        if depth >= _MAX_DEPTH:
            raise SerializationError(
                f"cannot cache key {key!r}: {path} is nested deeper than "
                f"{_MAX_DEPTH} levels"
            )
        if kind is list:
            for index, child in enumerate(item):
                stack.append((child, f"{path}[{index}]", depth + 1))
            continue
        if kind is dict:
            for name, child in item.items():
                if type(name) is not str:
                    raise UnsupportedTypeError(
                        f"cannot cache key {key!r}: {path} has a "
                        f"{type(name).__name__} dict key {name!r}; only str "
                        f"keys read back unchanged, so convert the keys to str"
                    )
                _check_text(key, name, f"{path} key {name[:40]!r}")
                stack.append((child, f"{path}[{name!r}]", depth + 1))
            continue
        raise UnsupportedTypeError(
            f"cannot cache key {key!r}: {path} is a {kind.__module__}."
            f"{kind.__qualname__}, which would not read back as the same type; "
            f"convert it to str, int, float, bool, None, list or dict first"
        )


def _check_text(key: object, text: str, path: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise SerializationError(
            f"cannot cache key {key!r}: {path} is a str with a lone surrogate, "
            f"which UTF-8 can't encode; decode it with errors='replace' first"
        ) from None


def dump_body(value: Any) -> bytes:
    """Serialize a value already accepted by :func:`check_value`.

    The result is copied into a bytes object of its exact size. orjson 3.13
    returns bytes that keep its whole output buffer (about 8 KiB for a
    0.6 KB profile, measured with tracemalloc), and L1 keeps bodies for a
    long time.
    """
    return bytes(memoryview(orjson.dumps(value)))


def load_body(body: bytes | memoryview) -> Any:
    """Parse a body produced by :func:`dump_body`."""
    return orjson.loads(body)


def _millis(when: float) -> int:
    return int(when * 1000) if when > 0 else 0


def pack(
    kind: bytes,
    body: bytes,
    *,
    fresh_until: float = 0.0,
    expires_at: float = 0.0,
    load_seconds: float = 0.0,
) -> bytes:
    """Put the header in front of ``body``; times are Unix seconds, 0 for none."""
    load_millis = min(int(load_seconds * 1000), 0xFFFFFFFF)
    header = HEADER.pack(
        MAGIC, kind, _millis(fresh_until), _millis(expires_at), load_millis
    )
    return header + body


def pack_value(
    body: bytes,
    *,
    compress_threshold: int,
    fresh_until: float = 0.0,
    expires_at: float = 0.0,
    load_seconds: float = 0.0,
) -> bytes:
    """Pack a JSON body, compressed with zlib when over the threshold and smaller."""
    kind = KIND_JSON
    if len(body) > compress_threshold:
        packed = zlib.compress(body, 1)
        if len(packed) < len(body):
            kind, body = KIND_ZLIB, packed
    return pack(
        kind,
        body,
        fresh_until=fresh_until,
        expires_at=expires_at,
        load_seconds=load_seconds,
    )


def unpack(payload: bytes) -> Envelope:
    """Split a wire payload into its :class:`Envelope`.

    The body is decompressed but not parsed: :func:`load_body` raises
    ``orjson.JSONDecodeError`` (a ``ValueError``) for a body that isn't JSON.

    :raises UndecodableValue: for bytes another version or program wrote.
    """
    if len(payload) < HEADER_SIZE:
        raise UndecodableValue("shorter than the header")
    magic, kind, fresh_millis, expires_millis, load_millis = HEADER.unpack_from(payload)
    if magic != MAGIC:
        raise UndecodableValue("unknown format")
    body = payload[HEADER_SIZE:]
    if kind == KIND_ZLIB:
        try:
            body = zlib.decompress(body)
        except zlib.error as exc:
            raise UndecodableValue(f"corrupt compressed body: {exc}") from None
        kind = KIND_JSON
    elif kind not in (KIND_JSON, KIND_NEGATIVE, KIND_LEASE):
        raise UndecodableValue(f"unknown kind {kind!r}")
    return Envelope(
        kind, body, fresh_millis / 1000.0, expires_millis / 1000.0, load_millis / 1000.0
    )
