"""The read path of a batch: L1, one multi-get per server, one origin query."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import orjson

from . import codec, signals
from .codec import HEADER_SIZE, KIND_JSON, KIND_LEASE
from .fill import _LEASE_POLL_FIRST, _LEASE_POLL_MAX, NEGATIVE, FillMixin
from .sentinel import MISSING
from .ttl import TtlArg


class BatchMixin(FillMixin):
    """The steps of :meth:`TieredCache.get_many` below L1."""

    def _get_many_below(
        self,
        wires: dict[str, str | bytes],
        missing: list[str],
        loader: Callable[[list[Any]], Mapping[Any, Any]] | None,
        ttl: TtlArg,
        token: int,
        use_local: bool,
        result: dict[Any, Any],
    ) -> None:
        leases: dict[str, bytes | None] = {}
        if self.remote is not None:
            found, down = self.remote.get_many(missing)
            to_load = self._use_remote_many(
                wires, missing, found, loader, ttl, token, use_local, result
            )
            # NOTE: one add per key; a batch that misses everywhere costs a
            # round trip per key here, on top of the origin's single query.
            leased_elsewhere: list[str] = []
            for wire in to_load:
                lease = None
                if wire not in down:
                    lease, added = self._try_lease(wire)
                    if added is False:
                        leased_elsewhere.append(wire)
                leases[wire] = lease
            arrived = self._wait_for_fills(
                leased_elsewhere, wires, token, use_local, result
            )
            missing = [wire for wire in to_load if wire not in arrived]
        for wire in missing:
            signals.send_robust(signals.miss, self, key=wires[wire])
        if not missing:
            return
        keys = [wires[wire] for wire in missing]
        self.loads += len(keys)
        filled = 0
        try:
            loaded = self._load_many(keys, loader)
            for wire in missing:
                key = wires[wire]
                value = loaded.get(key, MISSING)
                lease = leases.get(wire)
                item, value = self._fill(key, wire, value, ttl, lease, token, use_local)
                filled += 1
                if item is not NEGATIVE:
                    result[key] = value
        except BaseException:
            # Release every lease the batch still holds; releasing one that
            # is already gone does nothing.
            for wire in missing[filled:]:
                self._release_lease(wire, leases.get(wire))
            raise

    def _use_remote_many(
        self,
        wires: dict[str, str | bytes],
        missing: list[str],
        found: dict[str, bytes],
        loader: Callable[[list[Any]], Mapping[Any, Any]] | None,
        ttl: TtlArg,
        token: int,
        use_local: bool,
        result: dict[Any, Any],
    ) -> list[str]:
        """Serve the keys found in L2 and fill L1 with them.

        A fresh JSON value with no refresh due, nearly every value of a
        batch, is decoded in this loop without the per-key method calls and
        objects of the single-key steps. Every other payload (compressed,
        negative, lease, stale, expired, undecodable, or due for an early
        refresh) goes through :meth:`_use_remote_one`.

        :returns: the keys to load: not in L2, undecodable, or leased.
        """
        now = time.time()
        settings = self.settings
        local_ttl = settings.local_ttl
        early_refresh = bool(settings.early_refresh_beta)
        local_copy = settings.local_copy
        charged_size = self._charged_size
        unpack_header = codec.HEADER.unpack_from
        loads = orjson.loads
        hit = signals.hit
        to_load: list[str] = []
        backfill: list[tuple[str, Any, int, float]] = []
        for wire in missing:
            raw = found.get(wire)
            if raw is None:
                to_load.append(wire)
                continue
            # The checks of FillMixin._decode, _refresh_if_due and
            # _remote_local_ttl for the case where each takes its shortest
            # path. A change to those methods must be made here too.
            if len(raw) >= HEADER_SIZE:
                magic, kind, fresh_ms, expires_ms, load_ms = unpack_header(raw)
                common = (
                    magic == codec.MAGIC
                    and kind == KIND_JSON
                    and (not expires_ms or now < expires_ms / 1000.0)
                    and (not fresh_ms or now < fresh_ms / 1000.0)
                    and not (early_refresh and load_ms)
                )
            else:
                common = False
            if common:
                body = raw[HEADER_SIZE:]
                try:
                    value = loads(body)
                except orjson.JSONDecodeError:
                    common = False
            if not common:
                if not self._use_remote_one(
                    wires, wire, raw, loader, ttl, use_local, result, backfill, now
                ):
                    to_load.append(wire)
                continue
            key = wires[wire]
            if hit.receivers:
                signals.send_robust(hit, self, key=key, tier="remote")
            if use_local:
                if fresh_ms:
                    item_ttl = fresh_ms / 1000.0 - now
                elif expires_ms:
                    item_ttl = expires_ms / 1000.0 - now
                else:
                    item_ttl = local_ttl
                if item_ttl > local_ttl:
                    item_ttl = local_ttl
                if item_ttl > 0:
                    item = body if local_copy else value
                    backfill.append((wire, item, charged_size(len(body)), item_ttl))
            result[key] = value
        if backfill:
            self.local.fill_many(backfill, token)
        return to_load

    def _use_remote_one(
        self,
        wires: dict[str, str | bytes],
        wire: str,
        raw: bytes,
        loader: Callable[[list[Any]], Mapping[Any, Any]] | None,
        ttl: TtlArg,
        use_local: bool,
        result: dict[Any, Any],
        backfill: list[tuple[str, Any, int, float]],
        now: float,
    ) -> bool:
        """Serve one L2 payload with the single-key steps.

        :returns: whether it was a value (or a cached absence) to serve;
            ``False`` when the key must be loaded.
        """
        decoded = self._decode(wire, raw)
        if decoded is MISSING or decoded.kind is KIND_LEASE:
            return False
        key = wires[wire]
        if signals.hit.receivers:
            signals.send_robust(signals.hit, self, key=key, tier="remote")
        stale = self._refresh_if_due(
            key, wire, _single_loader(loader), ttl, decoded, now
        )
        if use_local and not stale:
            local_ttl = self._remote_local_ttl(decoded, now)
            if local_ttl > 0:
                backfill.append((wire, decoded.item, decoded.size, local_ttl))
        if decoded.item is not NEGATIVE:
            result[key] = decoded.value
        return True

    def _wait_for_fills(
        self,
        leased_elsewhere: list[str],
        wires: dict[str, str | bytes],
        token: int,
        use_local: bool,
        result: dict[Any, Any],
    ) -> set[str]:
        """Poll L2 for keys whose lease another caller holds, up to ``lease_wait``.

        :returns: the keys whose fill arrived; their values are in ``result``.
        """
        assert self.remote is not None
        arrived: set[str] = set()
        if not leased_elsewhere:
            return arrived
        self.lease_waits += 1
        deadline = time.monotonic() + self.settings.lease_wait
        pause = _LEASE_POLL_FIRST
        waiting = list(leased_elsewhere)
        while waiting and time.monotonic() < deadline:
            time.sleep(pause)
            pause = min(pause * 2, _LEASE_POLL_MAX)
            found, _down = self.remote.get_many(waiting)
            now = time.time()
            for wire, raw in found.items():
                decoded = self._decode(wire, raw)
                if decoded is MISSING or decoded.kind is KIND_LEASE:
                    continue
                arrived.add(wire)
                if use_local:
                    self._fill_local_from_remote(wire, decoded, token, now)
                if decoded.item is not NEGATIVE:
                    result[wires[wire]] = decoded.value
            waiting = [wire for wire in waiting if wire not in arrived]
        if waiting:
            self.lease_wait_timeouts += 1
        return arrived

    def _load_many(
        self,
        keys: list[Any],
        loader: Callable[[list[Any]], Mapping[Any, Any]] | None,
    ) -> Mapping[Any, Any]:
        if loader is not None:
            return loader(keys)
        if self.origin is not None:
            return self.origin.load_many(keys)
        return {}


def _single_loader(
    loader: Callable[[list[Any]], Mapping[Any, Any]] | None,
) -> Callable[[Any], Any] | None:
    """Adapt a batch loader to the one-key loader a background refresh calls."""
    if loader is None:
        return None
    many = loader

    def load_one(key: Any) -> Any:
        return many([key]).get(key, MISSING)

    return load_one
