"""A key-value origin in an SQLite file (WAL mode), the embedded default."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import orjson

from ..sentinel import MISSING
from . import key_bytes, key_from_bytes

_CHUNK = 500


class SQLiteOrigin:
    """Stores JSON values by key in one table of an SQLite database.

    Each thread (and each process after ``fork()``) opens its own connection.
    ``store`` and ``delete`` commit before they return.

    :param path: the database file; created if missing.
    :param table: the table name, created if missing.
    """

    def __init__(self, path: str, *, table: str = "tiercache_kv") -> None:
        if not table.isidentifier():
            raise ValueError(f"invalid table name {table!r}: use letters, digits and _")
        self.path = path
        self.table = table
        self._local = threading.local()
        self.loads = 0
        self.stores = 0
        with self.transaction() as conn:
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {table} "
                "(key BLOB PRIMARY KEY, value BLOB NOT NULL)"
            )

    def connection(self) -> sqlite3.Connection:
        """Return this thread's connection, opening it on first use."""
        local = self._local
        conn: sqlite3.Connection | None = getattr(local, "conn", None)
        if conn is None or local.pid != os.getpid():
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            _use_wal(conn)
            conn.execute("PRAGMA synchronous=NORMAL")
            local.conn, local.pid = conn, os.getpid()
        return conn

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """Run the block in one write transaction; commit on success, else roll back."""
        conn = self.connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def load(self, key: str | bytes) -> Any:
        self.loads += 1
        row = (
            self.connection()
            .execute(f"SELECT value FROM {self.table} WHERE key = ?", (key_bytes(key),))
            .fetchone()
        )
        return MISSING if row is None else orjson.loads(row[0])

    def load_many(self, keys: Iterable[str | bytes]) -> dict[str | bytes, Any]:
        keys = list(keys)
        self.loads += len(keys)
        found: dict[str | bytes, Any] = {}
        conn = self.connection()
        for start in range(0, len(keys), _CHUNK):
            chunk = [key_bytes(key) for key in keys[start : start + _CHUNK]]
            marks = ",".join("?" * len(chunk))
            rows = conn.execute(
                f"SELECT key, value FROM {self.table} WHERE key IN ({marks})", chunk
            )
            for raw_key, value in rows:
                found[key_from_bytes(raw_key)] = orjson.loads(value)
        return found

    def store(self, key: str | bytes, value: Any) -> None:
        data = orjson.dumps(value)
        with self.transaction() as conn:
            conn.execute(
                f"INSERT INTO {self.table} (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key_bytes(key), data),
            )
        self.stores += 1

    def delete(self, key: str | bytes) -> None:
        with self.transaction() as conn:
            conn.execute(f"DELETE FROM {self.table} WHERE key = ?", (key_bytes(key),))


def _use_wal(conn: sqlite3.Connection) -> None:
    """Switch the database file to WAL mode, which it keeps once set.

    SQLite can raise "database is locked" at once, without waiting for the
    busy timeout, when several processes switch the mode together. The
    mode is checked first, since it is usually set already, and the switch
    is retried for up to 30 s.
    """
    deadline = time.monotonic() + 30
    while True:
        try:
            mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
            if str(mode).lower() != "wal":
                conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)
