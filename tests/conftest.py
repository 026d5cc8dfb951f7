"""Shared fixtures: session-wide test servers and a clean state for each test.

The session fixtures start one memcached pool, one Redis and one PostgreSQL server
on free loopback ports (see tiercache.testing). The function fixtures below reset
them before each test, so tests stay independent of their order.

The parameters of the function fixtures shadow the imported session fixtures of
the same name, which is how pytest passes one fixture to another (ruff F811).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

from tiercache.testing import (  # noqa: F401 (fixtures are used by name)
    MemcachedServer,
    PostgresServer,
    RedisServer,
    memcached_server,
    memcached_servers,
    postgres_server,
    redis_server,
)


def _ensure_running(server: MemcachedServer | RedisServer | PostgresServer) -> None:
    """Resume or restart a session server that an earlier test paused or stopped."""
    if server.is_paused:
        server.resume()
    if not server.is_running:
        server.restart()


@pytest.fixture
def memcached(memcached_server: MemcachedServer) -> MemcachedServer:  # noqa: F811
    """The session memcached server, running and flushed."""
    _ensure_running(memcached_server)
    memcached_server.flush()
    return memcached_server


@pytest.fixture
def memcached3(
    memcached_servers: list[MemcachedServer],  # noqa: F811
) -> list[MemcachedServer]:
    """The three session memcached servers, running and flushed."""
    for server in memcached_servers:
        _ensure_running(server)
        server.flush()
    return memcached_servers


@pytest.fixture
def redis(redis_server: RedisServer) -> RedisServer:  # noqa: F811
    """The session Redis server, running and emptied with FLUSHALL."""
    _ensure_running(redis_server)
    redis_server.flush()
    return redis_server


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:  # noqa: F811
    """URL of a new, empty database on the session PostgreSQL server.

    The database is dropped after the test, with any connections the test left
    open.
    """
    _ensure_running(postgres_server)
    name = f"test_{uuid.uuid4().hex}"
    with psycopg.connect(postgres_server.url, autocommit=True) as connection:
        connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield postgres_server.database_url(name)
    _ensure_running(postgres_server)
    with psycopg.connect(postgres_server.url, autocommit=True) as connection:
        connection.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)
            )
        )
