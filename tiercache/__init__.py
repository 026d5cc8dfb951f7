"""tiercache: an in-process LRU in front of a shared memcached pool, kept fresh.

Reads go L1 (this process), then L2 (memcached), then the origin; writes go
to the origin first and then invalidate every tier in every process.
"""

from __future__ import annotations

import logging

from .cache import TieredCache
from .contracts import Channel, Origin
from .errors import (
    ChannelError,
    ConfigurationError,
    LeaseWaitTimeout,
    RemoteTierError,
    SerializationError,
    TierCacheError,
    UnsupportedTypeError,
)
from .sentinel import MISSING
from .settings import Settings
from .ttl import DEFAULT_TTL

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "DEFAULT_TTL",
    "MISSING",
    "Channel",
    "ChannelError",
    "ConfigurationError",
    "LeaseWaitTimeout",
    "Origin",
    "RemoteTierError",
    "SerializationError",
    "Settings",
    "TierCacheError",
    "TieredCache",
    "UnsupportedTypeError",
]
