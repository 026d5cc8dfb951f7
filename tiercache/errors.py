"""Exceptions raised by tiercache.

All of them derive from :class:`TierCacheError`::

    TierCacheError
    ├── ConfigurationError       (also ValueError) a setting is invalid
    ├── SerializationError       (also ValueError) a value can't be stored
    │   └── UnsupportedTypeError (also TypeError)  its type can't be stored
    ├── RemoteTierError          memcached failed where a miss won't do
    ├── ChannelError             the invalidation channel can't be used
    └── LeaseWaitTimeout         a bounded wait for another filler ran out

Misuse at call time (a key that is neither ``str`` nor ``bytes``, a negative
batch size) raises the built-in ``TypeError`` or ``ValueError``. Exceptions
raised by a loader or an origin reach the caller unchanged.
"""

from __future__ import annotations


class TierCacheError(Exception):
    """Base class of every exception tiercache raises itself."""


class ConfigurationError(TierCacheError, ValueError):
    """A setting, from the environment or from code, is invalid."""


class SerializationError(TierCacheError, ValueError):
    """A value can't be stored without changing when it is read back."""


class UnsupportedTypeError(SerializationError, TypeError):
    """A value contains a type that the wire format can't carry."""


class RemoteTierError(TierCacheError):
    """The remote tier failed in a way that can't be turned into a miss."""


class ChannelError(TierCacheError):
    """The invalidation channel can't be built or used."""


class LeaseWaitTimeout(TierCacheError):
    """Waiting for another caller's fill of the same key took too long."""
