"""Settings of a :class:`~tiercache.TieredCache`, from ``TIERCACHE_*`` variables."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from .errors import ConfigurationError

ENV_PREFIX = "TIERCACHE_"

# memcached reads an expiry above 30 days as an absolute Unix time.
MEMCACHED_RELATIVE_TTL_MAX = 30 * 24 * 3600

_NAMESPACE_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
# A hostname (RFC 1123 letters, digits, "-" and ".") or an IPv4 address.
_HOST_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.\-]{0,252}[A-Za-z0-9])?")
_IPV6_RE = re.compile(r"[0-9A-Fa-f:.]+(?:%[A-Za-z0-9_.\-]+)?")
_CHANNEL_SCHEMES = ("redis", "rediss", "postgresql", "postgres", "memory")
_ORIGIN_SCHEMES = ("sqlite", "postgresql", "postgres")


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    """Settings of one cache; every field has a ``TIERCACHE_<FIELD>`` variable.

    Durations are seconds and sizes are bytes. ``stale_ttl`` is how long
    past its fresh TTL an L2 entry may still be served while one caller
    refreshes it. ``early_refresh_beta`` turns on probabilistic early
    refresh (XFetch; 1.0 is the usual value). An empty
    ``memcached_servers`` runs without a remote tier, and an empty
    ``channel_url`` without cross-process invalidation, which only suits a
    single process.
    """

    memcached_servers: tuple[str, ...] = ("127.0.0.1:11211",)
    namespace: str = "tc"
    local_max_entries: int = 10_000
    local_max_bytes: int = 64 * 1024 * 1024
    local_ttl: float = 60.0
    local_copy: bool = True
    remote_ttl: float | None = 3600.0
    negative_ttl: float = 30.0
    stale_ttl: float = 0.0
    early_refresh_beta: float = 0.0
    ttl_jitter: float = 0.1
    connect_timeout: float = 0.25
    read_timeout: float = 0.25
    node_retry_timeout: float = 5.0
    lease_ttl: float = 10.0
    lease_wait: float = 0.5
    fill_wait: float = 10.0
    compress_threshold: int = 16 * 1024
    max_item_size: int = 1024 * 1024
    channel_url: str = ""
    heartbeat_interval: float = 1.0
    heartbeat_misses: int = 3
    on_channel_loss: Literal["flush", "bypass"] = "bypass"
    origin_url: str = ""

    def __post_init__(self) -> None:
        _validate(self, _FIELD_SOURCES.get(id(self), {}))
        _FIELD_SOURCES.pop(id(self), None)

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, **overrides: Any
    ) -> Settings:
        """Build settings from ``TIERCACHE_*`` variables, then apply ``overrides``.

        :param environ: the variables to read; ``os.environ`` when omitted.
        :param overrides: field values set in code; they win over variables.
        :raises ConfigurationError: naming the variable, its value and what
            is expected, when a value is invalid.
        """
        environ = os.environ if environ is None else environ
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(
                f"unknown setting(s) {', '.join(unknown)}; "
                f"expected some of: {', '.join(sorted(names))}"
            )
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}
        for field in dataclasses.fields(cls):
            variable = ENV_PREFIX + field.name.upper()
            if field.name in overrides:
                values[field.name] = overrides[field.name]
            elif variable in environ:
                values[field.name] = _parse(field, variable, environ[variable])
                sources[field.name] = f"{variable}={environ[variable]!r}"
        return _build(cls, values, sources)

    def replace(self, **changes: Any) -> Settings:
        """Return a copy with ``changes`` applied and validated."""
        return dataclasses.replace(self, **changes)


# Source of each field's value (the variable and its text) while a Settings
# is validated, so an error can name the environment variable.
_FIELD_SOURCES: dict[int, dict[str, str]] = {}


def _build(
    cls: type[Settings], values: dict[str, Any], sources: dict[str, str]
) -> Settings:
    # __post_init__ looks the sources up by the new object's id; object.__new__
    # lets us register them before __init__ runs.
    obj = object.__new__(cls)
    _FIELD_SOURCES[id(obj)] = sources
    try:
        obj.__init__(**values)  # type: ignore[misc]
    finally:
        _FIELD_SOURCES.pop(id(obj), None)
    return obj


def _parse(field: dataclasses.Field[Any], variable: str, raw: str) -> Any:
    text = raw.strip()
    kind = str(field.type)
    try:
        if field.name == "memcached_servers":
            return tuple(part.strip() for part in text.split(",") if part.strip())
        if kind == "bool":
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind == "int":
            return int(text.replace("_", ""))
        if kind.startswith("float | None"):
            return None if text.lower() in ("", "none") else float(text)
        if kind == "float":
            return float(text)
    except ValueError:
        expected = {"bool": "true or false", "int": "an integer"}.get(
            kind, "a number of seconds"
        )
        raise ConfigurationError(
            f"invalid {variable}={raw!r}: expected {expected}"
        ) from None
    return text


def _validate(settings: Settings, sources: Mapping[str, str]) -> None:
    def fail(name: str, expected: str) -> None:
        where = sources.get(name) or f"{name}={getattr(settings, name)!r}"
        raise ConfigurationError(f"invalid {where}: expected {expected}")

    if isinstance(settings.memcached_servers, str) or not isinstance(
        settings.memcached_servers, Sequence
    ):
        fail("memcached_servers", "a sequence of 'host:port' or unix socket paths")
    object.__setattr__(settings, "memcached_servers", tuple(settings.memcached_servers))
    seen: dict[object, str] = {}
    for server in settings.memcached_servers:
        try:
            parsed = parse_server(server)
        except ValueError as exc:
            fail("memcached_servers", f"'host:port' or a unix socket path ({exc})")
        if parsed in seen:
            fail(
                "memcached_servers",
                f"each server once ({server!r} repeats {seen[parsed]!r})",
            )
        seen[parsed] = server
    if not isinstance(settings.namespace, str) or not _NAMESPACE_RE.fullmatch(
        settings.namespace
    ):
        fail("namespace", "1-64 characters from A-Z a-z 0-9 _ . -")
    for name in ("local_max_entries", "local_max_bytes", "heartbeat_misses"):
        value = getattr(settings, name)
        if type(value) is not int or value < 1:
            fail(name, "a positive integer")
    for name in ("compress_threshold", "max_item_size"):
        value = getattr(settings, name)
        if type(value) is not int or value < 1:
            fail(name, "a positive number of bytes")
    positive = (
        "local_ttl", "negative_ttl", "connect_timeout", "read_timeout",
        "node_retry_timeout", "lease_ttl", "lease_wait", "fill_wait",
        "heartbeat_interval",
    )  # fmt: skip
    for name in positive:
        value = getattr(settings, name)
        if not _is_number(value) or not math.isfinite(value) or value <= 0:
            fail(name, "a positive, finite number of seconds")
    if settings.remote_ttl is not None and (
        not _is_number(settings.remote_ttl)
        or not math.isfinite(settings.remote_ttl)
        or settings.remote_ttl <= 0
    ):
        fail("remote_ttl", "a positive number of seconds, or none for no expiry")
    for name in ("stale_ttl", "early_refresh_beta"):
        value = getattr(settings, name)
        if not _is_number(value) or not math.isfinite(value) or value < 0:
            fail(name, "a finite number, 0 or more (0 turns it off)")
    if not _is_number(settings.ttl_jitter) or not 0 <= settings.ttl_jitter < 1:
        fail("ttl_jitter", "a fraction from 0 up to, not including, 1")
    if type(settings.local_copy) is not bool:
        fail("local_copy", "true or false")
    if settings.on_channel_loss not in ("flush", "bypass"):
        fail("on_channel_loss", "'flush' or 'bypass'")
    _check_url(settings.channel_url, _CHANNEL_SCHEMES, "channel_url", fail)
    _check_url(settings.origin_url, _ORIGIN_SCHEMES, "origin_url", fail)


def _check_url(url: object, schemes: tuple[str, ...], name: str, fail: Any) -> None:
    if not isinstance(url, str):
        fail(name, "a URL string")
        return
    if url and url.split("://", 1)[0] not in schemes or url and "://" not in url:
        fail(
            name,
            "empty or a URL starting with " + ", ".join(s + "://" for s in schemes),
        )


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def parse_server(server: str) -> tuple[str, int] | str:
    """Split ``'host:port'``, ``'[v6]:port'`` or a unix socket path.

    :returns: ``(host, port)`` for TCP, the path for a unix socket.
    :raises ValueError: for anything else.
    """
    if not isinstance(server, str) or not server:
        raise ValueError(f"{server!r} is not a server address")
    if server.startswith("/") or server.startswith("unix:"):
        path = server.removeprefix("unix:")
        if not path:
            raise ValueError(f"{server!r} has an empty socket path")
        return path
    host, sep, port_text = server.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{server!r} has no port")
    bracketed = host.startswith("[") and host.endswith("]")
    host = host.removeprefix("[").removesuffix("]")
    pattern = _IPV6_RE if bracketed else _HOST_RE
    if not pattern.fullmatch(host):
        raise ValueError(
            f"{server!r} has an invalid host {host!r}; separate servers with "
            f"commas and give IPv6 addresses in brackets, like [::1]:11211"
        )
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{server!r} has an invalid port")
    return host, int(port_text)
