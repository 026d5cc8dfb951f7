"""A key-value origin in a PostgreSQL table, through psycopg 3."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import orjson
import psycopg

from ..sentinel import MISSING
from . import key_bytes, key_from_bytes


class PostgresOrigin:
    """Stores JSON values by key in one PostgreSQL table.

    Each thread (and each process after ``fork()``) opens its own
    connection. ``store`` and ``delete`` commit before they return.

    :param url: a ``postgresql://`` connection URL.
    :param table: the table name, created if missing.
    """

    def __init__(self, url: str, *, table: str = "tiercache_kv") -> None:
        if not table.isidentifier():
            raise ValueError(f"invalid table name {table!r}: use letters, digits and _")
        self.url = url
        self.table = table
        self._local = threading.local()
        self.loads = 0
        self.stores = 0
        with self.transaction() as conn:
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {table} "
                "(key bytea PRIMARY KEY, value bytea NOT NULL)"
            )

    def connection(self) -> psycopg.Connection[Any]:
        """Return this thread's connection, opening it on first use."""
        local = self._local
        conn: psycopg.Connection[Any] | None = getattr(local, "conn", None)
        if conn is None or local.pid != os.getpid() or conn.closed:
            conn = psycopg.connect(self.url, autocommit=True)
            local.conn, local.pid = conn, os.getpid()
        return conn

    @contextlib.contextmanager
    def transaction(self) -> Iterator[psycopg.Connection[Any]]:
        """Run the block in one transaction; commit on success, else roll back."""
        conn = self.connection()
        with conn.transaction():
            yield conn

    def load(self, key: str | bytes) -> Any:
        self.loads += 1
        row = (
            self.connection()
            .execute(
                f"SELECT value FROM {self.table} WHERE key = %s", (key_bytes(key),)
            )
            .fetchone()
        )
        return MISSING if row is None else orjson.loads(row[0])

    def load_many(self, keys: Iterable[str | bytes]) -> dict[str | bytes, Any]:
        keys = list(keys)
        self.loads += len(keys)
        rows = self.connection().execute(
            f"SELECT key, value FROM {self.table} WHERE key = ANY(%s)",
            ([key_bytes(key) for key in keys],),
        )
        return {key_from_bytes(bytes(k)): orjson.loads(v) for k, v in rows}

    def store(self, key: str | bytes, value: Any) -> None:
        data = orjson.dumps(value)
        with self.transaction() as conn:
            conn.execute(
                f"INSERT INTO {self.table} (key, value) VALUES (%s, %s) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key_bytes(key), data),
            )
        self.stores += 1

    def delete(self, key: str | bytes) -> None:
        with self.transaction() as conn:
            conn.execute(f"DELETE FROM {self.table} WHERE key = %s", (key_bytes(key),))
