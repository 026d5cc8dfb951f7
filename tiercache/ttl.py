"""The ``ttl`` argument of reads: its default marker and its validation."""

from __future__ import annotations

import math
from typing import Final, TypeAlias


class _Default:
    def __repr__(self) -> str:
        return "DEFAULT_TTL"


DEFAULT_TTL: Final = _Default()
"""Use the configured TTLs (``remote_ttl`` in L2, ``local_ttl`` in L1)."""

TtlArg: TypeAlias = float | None | _Default


def check_ttl(ttl: object) -> None:
    """Raise if ``ttl`` is not ``DEFAULT_TTL``, ``None`` or a finite number.

    :raises TypeError: for another type (``bool`` included).
    :raises ValueError: for NaN or infinity.
    """
    if ttl is DEFAULT_TTL or ttl is None:
        return
    if not isinstance(ttl, int | float) or isinstance(ttl, bool):
        raise TypeError(
            f"ttl must be a number of seconds, None (no expiry) or DEFAULT_TTL, "
            f"not {type(ttl).__name__}: {ttl!r}"
        )
    if not math.isfinite(ttl):
        raise ValueError(
            f"ttl must be a finite number of seconds, got {ttl!r}; "
            f"use None for no expiry"
        )
