"""The demo's origin: subscriber profiles, templates and segments in SQLite."""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tiercache import MISSING
from tiercache.demo.campaign import Campaign
from tiercache.demo.data import now_timestamp
from tiercache.demo.database import connect

KEY_KINDS = ("subscriber", "template", "segment")
STATUSES = ("subscribed", "unsubscribed")
_PROFILE_KEYS = ("email", "first_name", "last_name", "locale", "status")
_PREFERENCE_KEYS = ("frequency", "content_format", "rewards_member", "timezone")


@dataclass(slots=True)
class OriginCounters:
    """Work done by one :class:`CampaignOrigin` in one process."""

    loads: int = 0
    """Keys requested through ``load`` and ``load_many``."""
    queries: int = 0
    """SQL statements executed, transaction control excluded."""
    stores: int = 0
    deletes: int = 0


def parse_key(key: str) -> tuple[str, int]:
    """Split ``"subscriber:42"`` into ``("subscriber", 42)``.

    :raises ValueError: if the key is not ``subscriber:<id>``,
        ``template:<id>`` or ``segment:<id>`` with a positive integer id.
    """
    kind, _, text_id = key.partition(":")
    if kind in KEY_KINDS and text_id.isdigit() and text_id.isascii():
        return kind, int(text_id)
    raise ValueError(
        f"invalid key {key!r}: expected subscriber:<id>, template:<id> or "
        "segment:<id> with a positive integer id"
    )


class CampaignOrigin:
    """Origin for the keys ``subscriber:<id>``, ``template:<id>`` and ``segment:<id>``.

    Implements :class:`tiercache.contracts.Origin`. As on an email platform,
    a subscriber profile is assembled from five tables with five queries in
    one read transaction. The queries read the subscriber row joined with its
    preferences, the custom fields, the segment memberships, the engagement
    totals over the whole event history, and the latest five events. They are
    what make a profile read expensive enough for caching to pay. Each
    process opens its own connection on first use, so an instance may be
    created before a fork or pickled to a spawned process.
    """

    def __init__(self, path: Path) -> None:
        """Use the SQLite database at ``path``, without opening it yet."""
        self.path = path
        self.counters = OriginCounters()
        self._connection: sqlite3.Connection | None = None
        self._connection_pid = 0
        self._lock = threading.Lock()

    def __reduce__(self) -> tuple[type[CampaignOrigin], tuple[Path]]:
        # Pickle only the path: connections, locks and counters are per process.
        return (CampaignOrigin, (self.path,))

    def load(self, key: str) -> Any:
        """Return the value for ``key``, or ``tiercache.MISSING`` if it has no row.

        :raises ValueError: if ``key`` is malformed, see :func:`parse_key`.
        """
        return self.load_many([key]).get(key, MISSING)

    def load_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """Return the values for ``keys`` in one read transaction.

        Keys without a row are left out of the result.

        :raises ValueError: if a key is malformed, see :func:`parse_key`.
        """
        ids_by_kind: dict[str, list[int]] = {kind: [] for kind in KEY_KINDS}
        for key in keys:
            kind, row_id = parse_key(key)
            ids_by_kind[kind].append(row_id)
            self.counters.loads += 1
        values: dict[str, Any] = {}
        with self._lock:
            connection = self._connect()
            connection.execute("BEGIN")
            try:
                if ids_by_kind["subscriber"]:
                    for row_id, profile in self._select_profiles(
                        connection, ids_by_kind["subscriber"]
                    ).items():
                        values[f"subscriber:{row_id}"] = profile
                if ids_by_kind["template"]:
                    for row_id, template in self._select_templates(
                        connection, ids_by_kind["template"]
                    ).items():
                        values[f"template:{row_id}"] = template
                if ids_by_kind["segment"]:
                    for row_id, segment in self._select_segments(
                        connection, ids_by_kind["segment"]
                    ).items():
                        values[f"segment:{row_id}"] = segment
            finally:
                connection.execute("COMMIT")
        return values

    def store(self, key: str, value: Any) -> None:
        """Write ``value`` for ``key``, bump the row's version and commit.

        A subscriber value is a profile as :meth:`load` returns it. Its
        ``version`` and ``updated_at`` are set here, and its ``engagement``
        is ignored because it is computed from the events table. Every store
        changes the row, because the version always increases.

        :raises ValueError: if ``key`` or ``value`` is malformed.
        :raises sqlite3.Error: if the write fails; nothing is committed then.
        """
        kind, row_id = parse_key(key)
        if not isinstance(value, Mapping):
            raise ValueError(
                f"value for {key!r} must be a dict, got {type(value).__name__}"
            )
        with self._lock:
            connection = self._connect()
            connection.execute("BEGIN IMMEDIATE")
            try:
                if kind == "subscriber":
                    self._store_profile(connection, row_id, value)
                elif kind == "template":
                    self._store_template(connection, row_id, value)
                else:
                    self._store_segment(connection, row_id, value)
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")
            self.counters.stores += 1

    def delete(self, key: str) -> None:
        """Delete the rows of ``key`` and commit. A missing row is no error.

        :raises ValueError: if ``key`` is malformed.
        :raises sqlite3.IntegrityError: if a campaign still uses the template
            or segment.
        """
        kind, row_id = parse_key(key)
        if kind == "subscriber":
            statements = [
                "DELETE FROM events WHERE subscriber_id = ?",
                "DELETE FROM custom_fields WHERE subscriber_id = ?",
                "DELETE FROM segment_members WHERE subscriber_id = ?",
                "DELETE FROM preferences WHERE subscriber_id = ?",
                "DELETE FROM subscribers WHERE id = ?",
            ]
        elif kind == "template":
            statements = ["DELETE FROM templates WHERE id = ?"]
        else:
            statements = [
                "DELETE FROM segment_members WHERE segment_id = ?",
                "DELETE FROM segments WHERE id = ?",
            ]
        with self._lock:
            connection = self._connect()
            connection.execute("BEGIN IMMEDIATE")
            try:
                for statement in statements:
                    self._execute(connection, statement, (row_id,))
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")
            self.counters.deletes += 1

    def load_campaigns(self) -> list[Campaign]:
        """Return every campaign, ordered by id."""
        with self._lock:
            rows = self._execute(
                self._connect(),
                "SELECT id, name, subject, preview_text, template_id, segment_id"
                " FROM campaigns ORDER BY id",
                (),
            ).fetchall()
        return [Campaign(*row) for row in rows]

    def count_subscribers(self) -> int:
        """Return the number of subscriber rows."""
        with self._lock:
            (count,) = self._execute(
                self._connect(), "SELECT COUNT(*) FROM subscribers", ()
            ).fetchone()
        return int(count)

    def close(self) -> None:
        """Close this process's connection. The next call opens a new one."""
        with self._lock:
            if self._connection is not None and self._connection_pid == os.getpid():
                self._connection.close()
            self._connection = None

    def _connect(self) -> sqlite3.Connection:
        # A connection inherited through fork belongs to the parent: SQLite
        # forbids using it in the child, and closing it here could release
        # the parent's locks, so the child drops it and opens its own.
        if self._connection is None or self._connection_pid != os.getpid():
            self._connection = connect(self.path)
            self._connection_pid = os.getpid()
        return self._connection

    def _execute(
        self, connection: sqlite3.Connection, sql: str, parameters: Iterable[object]
    ) -> sqlite3.Cursor:
        self.counters.queries += 1
        return connection.execute(sql, tuple(parameters))

    def _select_profiles(
        self, connection: sqlite3.Connection, ids: list[int]
    ) -> dict[int, dict[str, Any]]:
        marks = _placeholders(ids)
        profiles: dict[int, dict[str, Any]] = {}
        rows = self._execute(
            connection,
            "SELECT s.id, s.email, s.first_name, s.last_name, s.locale, s.status,"
            " s.version, s.created_at, s.updated_at, p.frequency,"
            " p.content_format, p.rewards_member, p.timezone"
            " FROM subscribers AS s"
            " LEFT JOIN preferences AS p ON p.subscriber_id = s.id"
            f" WHERE s.id IN ({marks})",
            ids,
        )
        for row in rows:
            profiles[row[0]] = {
                "id": row[0],
                "email": row[1],
                "first_name": row[2],
                "last_name": row[3],
                "locale": row[4],
                "status": row[5],
                "version": row[6],
                "created_at": row[7],
                "updated_at": row[8],
                "preferences": {
                    "frequency": row[9],
                    "content_format": row[10],
                    "rewards_member": bool(row[11]),
                    "timezone": row[12],
                },
                "fields": {},
                "segments": [],
                "engagement": {
                    "opens": 0,
                    "clicks": 0,
                    "orders": 0,
                    "revenue_cents": 0,
                    "last_open_at": None,
                    "last_activity_at": None,
                    "recent": [],
                },
            }
        if not profiles:
            return profiles
        for subscriber_id, name, value in self._execute(
            connection,
            "SELECT subscriber_id, name, value FROM custom_fields"
            f" WHERE subscriber_id IN ({marks}) ORDER BY subscriber_id, name",
            ids,
        ):
            profiles[subscriber_id]["fields"][name] = value
        for subscriber_id, segment_id in self._execute(
            connection,
            "SELECT m.subscriber_id, m.segment_id FROM segment_members AS m"
            " JOIN segments AS g ON g.id = m.segment_id"
            f" WHERE m.subscriber_id IN ({marks}) ORDER BY m.subscriber_id, g.id",
            ids,
        ):
            profiles[subscriber_id]["segments"].append(segment_id)
        self._select_engagement(connection, ids, marks, profiles)
        return profiles

    def _select_engagement(
        self,
        connection: sqlite3.Connection,
        ids: list[int],
        marks: str,
        profiles: dict[int, dict[str, Any]],
    ) -> None:
        """Add engagement totals and the five latest events to each profile.

        The totals aggregate the subscriber's whole event history, as an
        engagement score does; popular subscribers have the longest ones.
        """
        for row in self._execute(
            connection,
            "SELECT subscriber_id, SUM(kind = 'open'), SUM(kind = 'click'),"
            " SUM(kind = 'purchase'), COALESCE(SUM(amount_cents), 0),"
            " MAX(CASE WHEN kind = 'open' THEN occurred_at END), MAX(occurred_at)"
            f" FROM events WHERE subscriber_id IN ({marks}) GROUP BY subscriber_id",
            ids,
        ):
            engagement = profiles[row[0]]["engagement"]
            engagement["opens"] = row[1]
            engagement["clicks"] = row[2]
            engagement["orders"] = row[3]
            engagement["revenue_cents"] = row[4]
            engagement["last_open_at"] = _iso_time(row[5])
            engagement["last_activity_at"] = _iso_time(row[6])
        for subscriber_id in profiles:
            recent = profiles[subscriber_id]["engagement"]["recent"]
            for occurred_at, kind, campaign_id, amount_cents in self._execute(
                connection,
                "SELECT occurred_at, kind, campaign_id, amount_cents FROM events"
                " WHERE subscriber_id = ? ORDER BY occurred_at DESC LIMIT 5",
                (subscriber_id,),
            ):
                recent.append(
                    {
                        "at": _iso_time(occurred_at),
                        "kind": kind,
                        "campaign_id": campaign_id,
                        "amount_cents": amount_cents,
                    }
                )

    def _select_templates(
        self, connection: sqlite3.Connection, ids: list[int]
    ) -> dict[int, dict[str, Any]]:
        rows = self._execute(
            connection,
            "SELECT id, name, html, version, updated_at FROM templates"
            f" WHERE id IN ({_placeholders(ids)})",
            ids,
        )
        return {
            row[0]: {
                "id": row[0],
                "name": row[1],
                "html": row[2],
                "version": row[3],
                "updated_at": row[4],
            }
            for row in rows
        }

    def _select_segments(
        self, connection: sqlite3.Connection, ids: list[int]
    ) -> dict[int, dict[str, Any]]:
        rows = self._execute(
            connection,
            "SELECT id, name, description, rule, version, updated_at FROM segments"
            f" WHERE id IN ({_placeholders(ids)})",
            ids,
        )
        return {
            row[0]: {
                "id": row[0],
                "name": row[1],
                "description": row[2],
                "rule": row[3],
                "version": row[4],
                "updated_at": row[5],
            }
            for row in rows
        }

    def _store_profile(
        self,
        connection: sqlite3.Connection,
        subscriber_id: int,
        profile: Mapping[str, Any],
    ) -> None:
        _require_keys(profile, _PROFILE_KEYS, f"subscriber:{subscriber_id}")
        if profile["status"] not in STATUSES:
            raise ValueError(
                f"status of subscriber:{subscriber_id} must be one of {STATUSES}, "
                f"got {profile['status']!r}"
            )
        preferences = profile.get("preferences") or {}
        _require_keys(
            preferences, _PREFERENCE_KEYS, f"subscriber:{subscriber_id} preferences"
        )

        now = now_timestamp()
        self._execute(
            connection,
            "INSERT INTO subscribers (id, email, first_name, last_name, locale, status,"
            " version, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, 1, ?, ?)"
            " ON CONFLICT (id) DO UPDATE SET email = excluded.email,"
            " first_name = excluded.first_name, last_name = excluded.last_name,"
            " locale = excluded.locale, status = excluded.status,"
            " version = subscribers.version + 1, updated_at = excluded.updated_at",
            (
                subscriber_id,
                profile["email"],
                profile["first_name"],
                profile["last_name"],
                profile["locale"],
                profile["status"],
                now,
                now,
            ),
        )

        self._execute(
            connection,
            "INSERT INTO preferences (subscriber_id, frequency, content_format,"
            " rewards_member, timezone) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (subscriber_id) DO UPDATE SET frequency = excluded.frequency,"
            " content_format = excluded.content_format,"
            " rewards_member = excluded.rewards_member, timezone = excluded.timezone",
            (
                subscriber_id,
                preferences["frequency"],
                preferences["content_format"],
                int(bool(preferences["rewards_member"])),
                preferences["timezone"],
            ),
        )

        self._execute(
            connection,
            "DELETE FROM custom_fields WHERE subscriber_id = ?",
            (subscriber_id,),
        )
        for name, value in (profile.get("fields") or {}).items():
            self._execute(
                connection,
                "INSERT INTO custom_fields (subscriber_id, name, value)"
                " VALUES (?, ?, ?)",
                (subscriber_id, str(name), str(value)),
            )

        segment_ids = [int(segment_id) for segment_id in profile.get("segments") or []]
        self._execute(
            connection,
            "DELETE FROM segment_members WHERE subscriber_id = ?"
            f" AND segment_id NOT IN ({_placeholders(segment_ids)})",
            (subscriber_id, *segment_ids),
        )
        for segment_id in segment_ids:
            self._execute(
                connection,
                "INSERT INTO segment_members (segment_id, subscriber_id, added_at)"
                " VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                (segment_id, subscriber_id, now),
            )

    def _store_template(
        self,
        connection: sqlite3.Connection,
        template_id: int,
        template: Mapping[str, Any],
    ) -> None:
        _require_keys(template, ("name", "html"), f"template:{template_id}")
        self._execute(
            connection,
            "INSERT INTO templates (id, name, html, version, updated_at)"
            " VALUES (?, ?, ?, 1, ?) ON CONFLICT (id) DO UPDATE SET"
            " name = excluded.name, html = excluded.html,"
            " version = templates.version + 1, updated_at = excluded.updated_at",
            (template_id, template["name"], template["html"], now_timestamp()),
        )

    def _store_segment(
        self,
        connection: sqlite3.Connection,
        segment_id: int,
        segment: Mapping[str, Any],
    ) -> None:
        _require_keys(segment, ("name", "description", "rule"), f"segment:{segment_id}")
        self._execute(
            connection,
            "INSERT INTO segments (id, name, description, rule, version, updated_at)"
            " VALUES (?, ?, ?, ?, 1, ?) ON CONFLICT (id) DO UPDATE SET"
            " name = excluded.name, description = excluded.description,"
            " rule = excluded.rule, version = segments.version + 1,"
            " updated_at = excluded.updated_at",
            (
                segment_id,
                segment["name"],
                segment["description"],
                segment["rule"],
                now_timestamp(),
            ),
        )


def _iso_time(unix_seconds: int | None) -> str | None:
    if unix_seconds is None:
        return None
    return datetime.fromtimestamp(unix_seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _placeholders(values: list[Any]) -> str:
    return ", ".join("?" * len(values))


def _require_keys(value: Mapping[str, Any], keys: Iterable[str], name: str) -> None:
    missing = [key for key in keys if key not in value]
    if missing:
        raise ValueError(
            f"{name} is missing {', '.join(missing)}; add them to the value"
        )
