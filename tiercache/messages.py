"""Invalidation messages that one process sends the others, and their numbering.

A message is a small JSON object: ``{"v": 1, "k": kind, "s": sender, "n":
sequence, "t": sent_at, "keys": [...]}``. Each sender numbers its
invalidation and flush messages 1, 2, 3, ... and repeats its last number in
every heartbeat, so a receiver that sees a number jump (or a heartbeat ahead
of the last message it got) knows it lost a message. Keys are memcached
keys: printable ASCII, at most 250 bytes, so a message's size in bytes is
known before it is sent.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Final, Literal

import orjson

MESSAGE_VERSION: Final = 1

# inv: evict these keys. hb: heartbeat. flush: evict everything. lost: evict
# these keys and delete them in memcached before using their server again,
# because the sender's deletes could not reach it. ns: the versions stored
# under these memcached keys changed (namespace invalidation).
Kind = Literal["inv", "hb", "flush", "lost", "ns"]
_KINDS: Final = ("inv", "hb", "flush", "lost", "ns")

# Bytes of a message besides its keys, with room for long sender ids and
# large numbers; each key adds its JSON-encoded length plus a comma.
_ENVELOPE_BYTES = 160


class MalformedMessage(ValueError):
    """A payload on the channel that is not a tiercache message."""


@dataclasses.dataclass(frozen=True, slots=True)
class Message:
    """One message on the channel."""

    kind: Kind
    sender: str
    seq: int
    sent_at: float
    keys: tuple[str, ...] = ()

    def encode(self) -> bytes:
        """Serialize to the bytes sent on the channel."""
        return orjson.dumps(
            {
                "v": MESSAGE_VERSION,
                "k": self.kind,
                "s": self.sender,
                "n": self.seq,
                "t": self.sent_at,
                "keys": list(self.keys),
            }
        )


def decode_message(payload: bytes | str) -> Message:
    """Parse a payload from the channel.

    :raises MalformedMessage: for anything that is not a message of this
        version.
    """
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise MalformedMessage(f"not JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("v") != MESSAGE_VERSION:
        raise MalformedMessage("not a tiercache message of this version")
    kind, sender, seq = data.get("k"), data.get("s"), data.get("n")
    sent_at, keys = data.get("t"), data.get("keys", [])
    if (
        kind not in _KINDS
        or not isinstance(sender, str)
        or type(seq) is not int
        or not isinstance(sent_at, int | float)
        or not isinstance(keys, list)
        or not all(isinstance(key, str) for key in keys)
    ):
        raise MalformedMessage("a field is missing or has the wrong type")
    return Message(kind, sender, seq, float(sent_at), tuple(keys))


def batch_keys(keys: Sequence[str], max_bytes: int | None) -> Iterator[list[str]]:
    """Split keys into batches whose encoded message stays under ``max_bytes``."""
    if max_bytes is None:
        yield list(keys)
        return
    batch: list[str] = []
    size = _ENVELOPE_BYTES
    for key in keys:
        # JSON escapes '"' and '\\' (allowed in plain keys) to two bytes each.
        cost = len(orjson.dumps(key)) + 1
        if batch and size + cost >= max_bytes:
            yield batch
            batch, size = [], _ENVELOPE_BYTES
        batch.append(key)
        size += cost
    if batch:
        yield batch
