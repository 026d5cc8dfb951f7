"""The ``MISSING`` sentinel that marks a miss, distinct from a cached ``None``."""

from __future__ import annotations

import enum
from typing import Final, Literal


class _Missing(enum.Enum):
    MISSING = "MISSING"

    def __repr__(self) -> str:
        return "tiercache.MISSING"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return False


MISSING: Final = _Missing.MISSING
"""Returned for a key that no tier and no origin holds."""

MissingType = Literal[_Missing.MISSING]
