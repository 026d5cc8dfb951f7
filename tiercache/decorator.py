"""Read-through of a function's results: :meth:`TieredCache.cached`."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from . import codec

if TYPE_CHECKING:
    from .cache import TieredCache
    from .ttl import TtlArg


class CachedFunction:
    """A function whose results are read through a :class:`TieredCache`.

    The default key is the prefix, a colon and the JSON object of the call's
    arguments bound to the function's parameters with defaults applied, so
    ``f(5)``, ``f(5, verbose=False)`` and ``f(subscriber_id=5)`` name one
    entry, and distinct calls never share one. Arguments must be of the
    types the value codec accepts (JSON keeps them distinct); pass ``key=``
    to :meth:`TieredCache.cached` for others. Used on a method, it binds
    the instance like a function would.
    """

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
        try:
            self._signature: inspect.Signature | None = inspect.signature(function)
        except (TypeError, ValueError):
            self._signature = None
        functools.update_wrapper(self, function)

    def key_for(self, *args: Any, **kwargs: Any) -> str | bytes:
        """Return the cache key of one call."""
        if self._key is not None:
            return self._key(*args, **kwargs)
        arguments = self._bind(args, kwargs)
        try:
            codec.check_value(self._prefix, arguments)
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"can't build a cache key for {self._prefix} from its arguments "
                f"({exc}); pass key= to cached() to build keys yourself"
            ) from None
        encoded = orjson.dumps(arguments, option=orjson.OPT_SORT_KEYS)
        return self._prefix + ":" + encoded.decode("utf-8")

    def _bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self._signature is None:
            return [list(args), kwargs]
        bound = self._signature.bind(*args, **kwargs)
        parameters = self._signature.parameters
        arguments: dict[str, Any] = {}
        for name, value in bound.arguments.items():
            parameter = parameters[name]
            default = parameter.default
            # An argument passed with its default value names the same call
            # as one left out, and a default (a tuple, an Enum) need not be
            # JSON-encodable when the caller doesn't pass it.
            if default is not inspect.Parameter.empty and (
                type(value) is type(default) and value == default
            ):
                continue
            if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
                # *args arrives as a tuple; the codec accepts lists only.
                value = list(value)
            arguments[name] = value
        return arguments

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._cache.get(
            self.key_for(*args, **kwargs),
            lambda _key: self._function(*args, **kwargs),
            ttl=self._ttl,
        )

    def __get__(self, instance: object, owner: type | None = None) -> Any:
        if instance is None:
            return self
        return BoundCachedFunction(self, instance)

    def invalidate(self, *args: Any, **kwargs: Any) -> None:
        """Drop the cached result of one call from every tier in every process."""
        self._cache.invalidate(self.key_for(*args, **kwargs))


class BoundCachedFunction:
    """A cached method bound to its instance, as a method object would be."""

    def __init__(self, function: CachedFunction, instance: object) -> None:
        self._function = function
        self._instance = instance

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._function(self._instance, *args, **kwargs)

    def key_for(self, *args: Any, **kwargs: Any) -> str | bytes:
        """Return the cache key of one call on this instance."""
        return self._function.key_for(self._instance, *args, **kwargs)

    def invalidate(self, *args: Any, **kwargs: Any) -> None:
        """Drop the cached result of one call on this instance, everywhere."""
        self._function.invalidate(self._instance, *args, **kwargs)
