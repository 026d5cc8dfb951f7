"""Read-through of a function's results: :meth:`TieredCache.cached`."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from .cache import TieredCache
    from .ttl import TtlArg


class CachedFunction:
    """A function whose results are read through a :class:`TieredCache`."""

    def __init__(
        self,
        cache: TieredCache,
        function: Callable[..., Any],
        prefix: str,
        key: Callable[..., str | bytes] | None,
        ttl: TtlArg,
    ) -> None:
        self._cache = cache
        self._function = function
        self._prefix = prefix
        self._key = key
        self._ttl = ttl
        functools.update_wrapper(self, function)

    def key_for(self, *args: Any, **kwargs: Any) -> str | bytes:
        """Return the cache key of one call.

        The default key is the prefix, a colon and the JSON array of the
        positional and keyword arguments, so distinct calls never share one.
        """
        if self._key is not None:
            return self._key(*args, **kwargs)
        try:
            encoded = orjson.dumps([list(args), kwargs], option=orjson.OPT_SORT_KEYS)
        except TypeError as exc:
            raise TypeError(
                f"can't build a cache key for {self._prefix} from its arguments "
                f"({exc}); pass key= to cached() to build keys yourself"
            ) from None
        return self._prefix + ":" + encoded.decode("utf-8")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._cache.get(
            self.key_for(*args, **kwargs),
            lambda _key: self._function(*args, **kwargs),
            ttl=self._ttl,
        )

    def invalidate(self, *args: Any, **kwargs: Any) -> None:
        """Drop the cached result of one call from every tier in every process."""
        self._cache.invalidate(self.key_for(*args, **kwargs))
