"""Read-through of a function's results: :meth:`TieredCache.cached`."""

from __future__ import annotations

import functools
import inspect
import types
import weakref
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
        bound.apply_defaults()
        arguments: dict[str, Any] = {}
        for name, value in bound.arguments.items():
            kind = self._signature.parameters[name].kind
            # *args arrives as a tuple; the codec accepts lists only.
            arguments[name] = (
                list(value) if kind is inspect.Parameter.VAR_POSITIONAL else value
            )
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
        return types.MethodType(self, instance)

    def invalidate(self, *args: Any, **kwargs: Any) -> None:
        """Drop the cached result of one call from every tier in every process."""
        self._cache.invalidate(self.key_for(*args, **kwargs))


class PrefixRegistry:
    """The functions decorated on one cache, by key prefix.

    Two different functions with one prefix (two lambdas of a module, two
    closures from one factory) would read each other's results, so the
    second one raises unless it is given its own ``prefix=`` or ``key=``.
    """

    def __init__(self) -> None:
        self._functions: weakref.WeakValueDictionary[str, Any] = (
            weakref.WeakValueDictionary()
        )

    def claim(self, prefix: str, function: Callable[..., Any]) -> None:
        """Record ``function`` under ``prefix``.

        :raises TypeError: if another live function has that prefix.
        """
        try:
            current = self._functions.get(prefix)
        except TypeError:
            return
        if current is not None and current is not function:
            raise TypeError(
                f"another function already caches under the prefix {prefix!r} "
                f"(lambdas and closures share a qualified name); pass prefix= "
                f"or key= to cached()"
            )
        try:
            self._functions[prefix] = function
        except TypeError:
            # NOTE: a callable that can't be weakly referenced is not tracked.
            pass
