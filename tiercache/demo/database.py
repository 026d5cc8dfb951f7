"""Schema, connections and seeding of the demo's SQLite origin database."""

from __future__ import annotations

import hashlib
import logging
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tiercache.demo.data import DataSet

logger = logging.getLogger(__name__)

# Bump when the schema or the generated rows change, so that a database
# seeded by an older version is not reused.
DATA_FORMAT_VERSION = 1

SCHEMA = """
CREATE TABLE subscribers (
    id INTEGER PRIMARY KEY,
    email TEXT NOT NULL UNIQUE,
    first_name TEXT NOT NULL,
    last_name TEXT NOT NULL,
    locale TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('subscribed', 'unsubscribed')),
    version INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE preferences (
    subscriber_id INTEGER PRIMARY KEY REFERENCES subscribers (id),
    frequency TEXT NOT NULL,
    content_format TEXT NOT NULL,
    rewards_member INTEGER NOT NULL,
    timezone TEXT NOT NULL
);
CREATE TABLE custom_fields (
    subscriber_id INTEGER NOT NULL REFERENCES subscribers (id),
    name TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (subscriber_id, name)
);
CREATE TABLE segments (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    description TEXT NOT NULL,
    rule TEXT NOT NULL,
    version INTEGER NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE segment_members (
    segment_id INTEGER NOT NULL REFERENCES segments (id),
    subscriber_id INTEGER NOT NULL REFERENCES subscribers (id),
    added_at TEXT NOT NULL,
    PRIMARY KEY (subscriber_id, segment_id)
);
CREATE INDEX segment_members_by_segment ON segment_members (segment_id);
CREATE TABLE events (
    subscriber_id INTEGER NOT NULL REFERENCES subscribers (id),
    occurred_at INTEGER NOT NULL,  -- Unix time in seconds
    kind TEXT NOT NULL CHECK (kind IN ('open', 'click', 'purchase')),
    campaign_id INTEGER NOT NULL,
    amount_cents INTEGER
);
CREATE INDEX events_by_subscriber ON events (subscriber_id, occurred_at);
CREATE TABLE templates (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    html TEXT NOT NULL,
    version INTEGER NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE campaigns (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    subject TEXT NOT NULL,
    preview_text TEXT NOT NULL,
    template_id INTEGER NOT NULL REFERENCES templates (id),
    segment_id INTEGER NOT NULL REFERENCES segments (id)
);
CREATE TABLE demo_meta (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class DataSetIdentity:
    """Inputs that decide the rows of a seeded database.

    Two databases seeded with equal identities contain equal rows.
    """

    seed: int
    subscriber_count: int
    templates_digest: str

    def as_meta(self) -> dict[str, str]:
        """Return the ``demo_meta`` rows that record this identity."""
        return {
            "format_version": str(DATA_FORMAT_VERSION),
            "seed": str(self.seed),
            "subscriber_count": str(self.subscriber_count),
            "templates_digest": self.templates_digest,
        }


def digest_templates(names_and_sources: Iterable[tuple[str, str]]) -> str:
    """Return a SHA-256 hex digest over template names and HTML sources."""
    digest = hashlib.sha256()
    for name, source in names_and_sources:
        digest.update(name.encode("utf-8") + b"\0")
        digest.update(source.encode("utf-8") + b"\0")
    return digest.hexdigest()


def connect(path: Path) -> sqlite3.Connection:
    """Open ``path`` in WAL mode with autocommit, for explicit transactions.

    ``synchronous=NORMAL`` is the usual setting with WAL: a commit survives
    a crash of the process but not a power loss, which is enough for a demo.
    ``check_same_thread`` is off because a cache may call its origin from a
    background thread; :class:`~tiercache.demo.origin.CampaignOrigin`
    serializes access with a lock.
    """
    connection = sqlite3.connect(
        path, isolation_level=None, check_same_thread=False, timeout=30.0
    )
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    connection.execute("PRAGMA foreign_keys=ON")
    return connection


def read_identity(path: Path) -> DataSetIdentity | None:
    """Return the identity of the data set seeded at ``path``.

    :returns: ``None`` if the file is missing, is not an SQLite database, or
        was not seeded by this version of the demo.
    """
    if not path.is_file():
        return None
    try:
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            rows = dict(connection.execute("SELECT name, value FROM demo_meta"))
        finally:
            connection.close()
    except sqlite3.DatabaseError:
        return None
    if rows.get("format_version") != str(DATA_FORMAT_VERSION):
        return None
    return DataSetIdentity(
        seed=int(rows["seed"]),
        subscriber_count=int(rows["subscriber_count"]),
        templates_digest=rows["templates_digest"],
    )


def is_demo_database(path: Path) -> bool:
    """Return whether ``path`` is an SQLite database seeded by any demo version."""
    try:
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            connection.execute("SELECT name, value FROM demo_meta").fetchall()
        finally:
            connection.close()
    except sqlite3.DatabaseError:
        return False
    return True


def seed_database(path: Path, dataset: DataSet, identity: DataSetIdentity) -> None:
    """Create ``path`` with the schema and the rows of ``dataset``.

    An existing file at ``path`` is replaced. Callers check first that it is
    a demo database, see :func:`is_demo_database`.
    """
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    connection = connect(path)
    try:
        connection.executescript(SCHEMA)
        connection.execute("BEGIN IMMEDIATE")
        _insert_rows(connection, dataset, identity)
        connection.execute("COMMIT")
        connection.execute("ANALYZE")
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        connection.close()


def copy_database(source: Path, target: Path) -> None:
    """Copy the database at ``source`` to ``target`` with SQLite's backup API.

    Each run of the demo works on its own copy, so that both runs start from
    the same rows.
    """
    for suffix in ("", "-wal", "-shm"):
        Path(f"{target}{suffix}").unlink(missing_ok=True)
    source_connection = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    target_connection = connect(target)
    try:
        source_connection.backup(target_connection)
        target_connection.execute("PRAGMA journal_mode=WAL")
    finally:
        target_connection.close()
        source_connection.close()


def _insert_rows(
    connection: sqlite3.Connection, dataset: DataSet, identity: DataSetIdentity
) -> None:
    connection.executemany(
        "INSERT INTO subscribers (id, email, first_name, last_name, locale, status,"
        " version, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        dataset.subscribers,
    )
    connection.executemany(
        "INSERT INTO preferences (subscriber_id, frequency, content_format,"
        " rewards_member, timezone) VALUES (?, ?, ?, ?, ?)",
        dataset.preferences,
    )
    connection.executemany(
        "INSERT INTO custom_fields (subscriber_id, name, value) VALUES (?, ?, ?)",
        dataset.custom_fields,
    )
    connection.executemany(
        "INSERT INTO segments (id, name, description, rule, version, updated_at)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        dataset.segments,
    )
    connection.executemany(
        "INSERT INTO segment_members (segment_id, subscriber_id, added_at)"
        " VALUES (?, ?, ?)",
        dataset.segment_members,
    )
    connection.executemany(
        "INSERT INTO events (subscriber_id, occurred_at, kind, campaign_id,"
        " amount_cents) VALUES (?, ?, ?, ?, ?)",
        dataset.events,
    )
    connection.executemany(
        "INSERT INTO templates (id, name, html, version, updated_at)"
        " VALUES (?, ?, ?, 1, ?)",
        [
            (row.id, row.name, row.html, "2025-01-01T00:00:00.000000Z")
            for row in dataset.templates
        ],
    )
    connection.executemany(
        "INSERT INTO campaigns (id, name, subject, preview_text, template_id,"
        " segment_id) VALUES (?, ?, ?, ?, ?, ?)",
        [
            (
                campaign.id,
                campaign.name,
                campaign.subject,
                campaign.preview_text,
                campaign.template_id,
                campaign.segment_id,
            )
            for campaign in dataset.campaigns
        ],
    )
    connection.executemany(
        "INSERT INTO demo_meta (name, value) VALUES (?, ?)",
        list(identity.as_meta().items()),
    )
