"""Origins and channels that need a driver, installed as ``tiercache.adapters``.

Each module imports its driver (psycopg, redis-py) itself, so the core never
does. ``sqlite`` needs only the standard library.
"""

from __future__ import annotations

from ..contracts import Origin


def origin_from_url(url: str) -> Origin:
    """Build the key-value origin for ``sqlite:///path`` or ``postgresql://...``."""
    scheme = url.split("://", 1)[0]
    if scheme == "sqlite":
        from .sqlite import SQLiteOrigin

        return SQLiteOrigin(url.split("://", 1)[1])
    if scheme in ("postgresql", "postgres"):
        from .postgres import PostgresOrigin

        return PostgresOrigin(url)
    raise ValueError(f"unknown origin URL {url!r}; use sqlite:///path or postgresql://")


def key_bytes(key: str | bytes) -> bytes:
    """Encode a cache key for a database column, keeping str and bytes keys apart."""
    if isinstance(key, str):
        return b"s" + key.encode("utf-8", "surrogatepass")
    if isinstance(key, bytes):
        return b"b" + key
    raise TypeError(f"key must be str or bytes, not {type(key).__name__}: {key!r}")


def key_from_bytes(data: bytes) -> str | bytes:
    """Invert :func:`key_bytes`."""
    if data[:1] == b"s":
        return data[1:].decode("utf-8", "surrogatepass")
    return data[1:]
