"""Background refresh of stale and soon-stale entries (stale-while-revalidate)."""

from __future__ import annotations

import concurrent.futures
import logging
import time
from collections.abc import Callable
from typing import Any

from .fill import NEGATIVE, FillMixin
from .remote import DOWN
from .ttl import TtlArg

log = logging.getLogger(__name__)

_REFRESH_WORKERS = 4


class RefreshMixin(FillMixin):
    """Reloads entries in a thread pool while callers are served the old value."""

    def _start_refresh(
        self,
        key: str | bytes,
        wire: str,
        loader: Callable[[Any], Any] | None,
        ttl: TtlArg,
    ) -> None:
        """Refresh ``wire`` in the background unless another caller already does."""
        assert self.remote is not None
        marker = self.keys.refresh_key(wire)
        if self.remote.add(marker, b"", self.settings.lease_ttl) is not True:
            return
        if self._refresher is None:
            self._refresher = concurrent.futures.ThreadPoolExecutor(
                _REFRESH_WORKERS, thread_name_prefix="tiercache-refresh"
            )
        self._refresher.submit(self._refresh, key, wire, loader, ttl, marker)

    def _refresh(
        self,
        key: str | bytes,
        wire: str,
        loader: Callable[[Any], Any] | None,
        ttl: TtlArg,
        marker: str,
    ) -> None:
        assert self.remote is not None
        token = self.local.begin_fill()
        try:
            # The stale item and its cas token are read before loading: a
            # write-through deletes the key, so a refresh that loaded the old
            # row can't store it. The item is compared again before the cas,
            # because memcached restarts its cas counter when it restarts,
            # and a new item could get the same token.
            current = self.remote.gets(wire)
            if current is DOWN or current[1] is None:  # type: ignore[index]
                return
            stale, cas = current  # type: ignore[misc]
            assert cas is not None
            started = time.monotonic()
            value = self._call_loader(key, loader)
            load_seconds = time.monotonic() - started
            item, size, ttls, payload = self._encode_fill(key, value, ttl, load_seconds)
            if not ttls.cacheable or self._too_large(wire, payload):
                return
            expire = self._remote_expire(ttls, item is NEGATIVE)
            if self.remote.gets(wire) != (stale, cas) or not self.remote.cas(
                wire, payload, cas, expire
            ):
                self.stale_fills_dropped += 1
                return
            self.refreshes += 1
            if (self.bus is None or not self.bus.bypass_local) and ttls.local > 0:
                self.local.fill(wire, item, size, ttls.local, token)
        except Exception:  # noqa: BLE001 - nobody waits on a background refresh
            self.refresh_errors += 1
            log.exception("background refresh failed; the stale value stays")
        finally:
            self.remote.delete_many([marker])
