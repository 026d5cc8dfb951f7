"""Mapping of cache keys to memcached keys.

memcached's text protocol ends a key at a space or a control character and
limits it to 250 bytes. A ``str`` key made only of printable ASCII that fits
in that limit after the namespace prefix travels as it is, behind ``=``.
Every other key (non-ASCII, spaces, CR/LF, NUL, too long, or ``bytes``) is
hashed whole with BLAKE2b, behind ``#``, so two distinct keys never share a
memcached key and nothing is ever truncated. The ``=``/``#`` marker keeps the
two forms apart, and ``str`` and ``bytes`` keys hash with different tags.
"""

from __future__ import annotations

import base64
import hashlib
import re
from functools import lru_cache

MEMCACHED_KEY_MAX = 250

_PLAIN_RE = re.compile(r"[\x21-\x7e]*")
_DIGEST_SIZE = 30  # 240 bits: 40 base64 characters


class KeyCodec:
    """Turns keys into namespaced memcached keys, memoizing recent ones."""

    __slots__ = ("namespace", "_prefix", "_memo", "encode_str")

    def __init__(self, namespace: str, *, memo_size: int = 65_536) -> None:
        self.namespace = namespace
        self._prefix = namespace + "|"
        self._memo = lru_cache(maxsize=memo_size)(self._encode)
        # The memo itself, for callers that already know the key is a str.
        self.encode_str = self._memo

    def encode(self, key: str | bytes) -> str:
        """Return the memcached key of ``key``.

        :raises TypeError: if ``key`` is neither ``str`` nor ``bytes``.
        """
        if not isinstance(key, str | bytes):
            raise TypeError(
                f"cache key must be str or bytes, not {type(key).__name__}: "
                f"{key!r}; convert it with str() or build it with a key function"
            )
        return self._memo(key)

    def encode_namespaced(self, name: str, version: str, key: str | bytes) -> str:
        """Return the memcached key of ``key`` in version ``version`` of a namespace.

        The parts are length-prefixed and hashed under their own tag, so a
        namespaced key never equals a plain key or one of another namespace.
        """
        if not isinstance(key, str | bytes):
            raise TypeError(
                f"cache key must be str or bytes, not {type(key).__name__}: {key!r}"
            )
        raw = key.encode("utf-8", "surrogatepass") if isinstance(key, str) else key
        parts = [name.encode("utf-8", "surrogatepass"), version.encode(), raw]
        data = b"n" + (b"s" if isinstance(key, str) else b"b")
        for part in parts:
            data += len(part).to_bytes(4, "big") + part
        digest = hashlib.blake2b(data, digest_size=_DIGEST_SIZE).digest()
        return self._prefix + "#" + base64.urlsafe_b64encode(digest).decode("ascii")

    def version_key(self, name: str) -> str:
        """Return the memcached key that stores namespace ``name``'s version."""
        digest = hashlib.blake2b(
            name.encode("utf-8", "surrogatepass"), digest_size=_DIGEST_SIZE
        ).digest()
        return self._prefix + "!ns:" + base64.urlsafe_b64encode(digest).decode("ascii")

    def refresh_key(self, wire: str) -> str:
        """Return the memcached key of the refresh marker of memcached key ``wire``.

        The ``!`` form is one :meth:`encode` never produces, so no cache key
        can be a marker.
        """
        digest = hashlib.blake2b(
            wire.encode("ascii"), digest_size=_DIGEST_SIZE
        ).digest()
        return self._prefix + "!refresh:" + base64.urlsafe_b64encode(digest).decode()

    def _encode(self, key: str | bytes) -> str:
        if isinstance(key, str) and type(key) is not str:
            key = key[:]  # a str subclass (StrEnum) keys like its plain text
        if type(key) is str:
            if len(self._prefix) + 1 + len(
                key
            ) <= MEMCACHED_KEY_MAX and _PLAIN_RE.fullmatch(key):
                return self._prefix + "=" + key
            data = b"s" + key.encode("utf-8", "surrogatepass")
        else:
            data = b"b" + bytes(key)  # type: ignore[arg-type]
        digest = hashlib.blake2b(data, digest_size=_DIGEST_SIZE).digest()
        return self._prefix + "#" + base64.urlsafe_b64encode(digest).decode("ascii")
