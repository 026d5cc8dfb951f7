"""Tests of the throwaway servers in tiercache.testing, against the real binaries."""

from __future__ import annotations

import os
import pwd
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import psycopg
import pytest
import redis as redis_py
from pymemcache.client.base import Client as MemcacheClient
from pymemcache.exceptions import MemcacheServerError

from tiercache import testing
from tiercache.testing import (
    MemcachedServer,
    PostgresServer,
    RedisServer,
    ServerNotInstalledError,
    free_port,
)

REPO_ROOT = Path(__file__).resolve().parent.parent


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def process_state(pid: int) -> str | None:
    """Return the state letter of ``pid`` from /proc, or None if it does not exist."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2]


def process_alive(pid: int) -> bool:
    # A killed child of a dead parent stays a zombie (Z) until init reaps it.
    return process_state(pid) not in (None, "Z", "X")


def child_pids(pid: int) -> list[int]:
    children = []
    for stat_path in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat_path.read_text()
        except OSError:
            continue
        parent = int(text[text.rindex(")") + 2 :].split()[1])
        if parent == pid:
            children.append(int(stat_path.parent.name))
    return children


def memcache_client(server: MemcachedServer, timeout: float = 2.0) -> MemcacheClient:
    return MemcacheClient(
        (server.host, server.port), timeout=timeout, connect_timeout=timeout
    )


def ipv6_loopback_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


# free_port and argument checks


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))
    assert 0 < port < 65536


@pytest.mark.parametrize("host", ["10.0.0.1", "0.0.0.0", "localhost", ""])
def test_server_rejects_non_loopback_host(host: str) -> None:
    with pytest.raises(ValueError, match="invalid host"):
        MemcachedServer(host=host)


def test_server_rejects_invalid_port() -> None:
    with pytest.raises(ValueError, match="invalid port"):
        RedisServer(port=70000)


def test_port_before_start_raises() -> None:
    server = MemcachedServer()
    with pytest.raises(RuntimeError, match="has not been started"):
        _ = server.port


@pytest.fixture
def server_tempdir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Directory in which the servers of a test create their temporary directories."""
    directory = tmp_path / "servers"
    directory.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(directory))
    return directory


def test_missing_memcached_binary_raises(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, server_tempdir: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    server = MemcachedServer()
    with pytest.raises(ServerNotInstalledError, match="apt-get install memcached"):
        server.start()
    assert not server.is_running
    assert list(server_tempdir.iterdir()) == []


def test_missing_redis_binary_raises(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ServerNotInstalledError, match="apt-get install redis-server"):
        RedisServer().start()


def test_missing_postgres_binaries_raise(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, server_tempdir: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(testing, "_POSTGRES_LIB_GLOB", str(tmp_path / "*" / "bin"))
    with pytest.raises(ServerNotInstalledError, match="apt-get install postgresql"):
        PostgresServer().start()
    assert list(server_tempdir.iterdir()) == []


def test_stop_after_kill_removes_tempdir(server_tempdir: Path) -> None:
    server = RedisServer().start()
    server.kill()
    assert len(list(server_tempdir.iterdir())) == 1
    server.stop()
    assert list(server_tempdir.iterdir()) == []


# MemcachedServer


def test_memcached_start_serve_stop() -> None:
    server = MemcachedServer().start()
    pid = server.pid
    assert server.is_running
    assert server.address == f"127.0.0.1:{server.port}"
    client = memcache_client(server)
    assert client.set("key", b"value", noreply=False)
    assert client.get("key") == b"value"
    client.close()

    server.stop()
    assert not server.is_running
    assert not process_exists(pid)


def test_memcached_stop_is_idempotent() -> None:
    server = MemcachedServer().start()
    server.stop()
    server.stop()
    assert not server.is_running


def test_memcached_start_twice_raises() -> None:
    with MemcachedServer() as server:
        with pytest.raises(RuntimeError, match="already running"):
            server.start()


def test_memcached_context_manager_stops() -> None:
    with MemcachedServer() as server:
        pid = server.pid
        assert process_exists(pid)
    assert not server.is_running
    assert not process_exists(pid)


def test_memcached_restart_keeps_port_and_empties() -> None:
    with MemcachedServer() as server:
        port = server.port
        old_pid = server.pid
        client = memcache_client(server)
        client.set("key", b"value", noreply=False)
        client.close()

        server.restart()

        assert server.port == port
        assert server.pid != old_pid
        assert not process_exists(old_pid)
        client = memcache_client(server)
        assert client.get("key") is None
        client.close()


def test_memcached_pause_blocks_until_resume() -> None:
    with MemcachedServer() as server:
        client = memcache_client(server, timeout=0.5)
        client.set("key", b"value", noreply=False)

        server.pause()
        assert server.is_paused
        with pytest.raises(TimeoutError):
            client.get("key")

        server.resume()
        assert not server.is_paused
        assert client.get("key") == b"value"
        client.close()


def test_memcached_stop_while_paused() -> None:
    server = MemcachedServer().start()
    pid = server.pid
    server.pause()
    server.stop()
    assert not process_exists(pid)


def test_memcached_kill_then_restart() -> None:
    with MemcachedServer() as server:
        port = server.port
        pid = server.pid
        server.kill()
        assert not server.is_running
        assert not process_exists(pid)
        with pytest.raises(RuntimeError, match="not running"):
            server.pause()

        server.restart()
        assert server.port == port
        client = memcache_client(server)
        assert client.set("key", b"value", noreply=False)
        client.close()


def test_memcached_flush_removes_items() -> None:
    with MemcachedServer() as server:
        client = memcache_client(server)
        client.set("key", b"value", noreply=False)
        server.flush()
        assert client.get("key") is None
        client.close()


def test_memcached_item_size_max() -> None:
    value = b"x" * 1_500_000
    with MemcachedServer() as server:
        client = memcache_client(server)
        with pytest.raises(MemcacheServerError, match="too large"):
            client.set("big", value, noreply=False)
        client.close()
    with MemcachedServer(item_size_max="2m") as server:
        client = memcache_client(server)
        assert client.set("big", value, noreply=False)
        assert client.get("big") == value
        client.close()


def test_memcached_port_in_use_raises(server_tempdir: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        server = MemcachedServer(port=port)
        with pytest.raises(RuntimeError, match="another process uses that port"):
            server.start()
        assert not server.is_running
    assert list(server_tempdir.iterdir()) == []


def test_memcached_fixed_port() -> None:
    port = free_port()
    with MemcachedServer(port=port) as server:
        assert server.port == port


@pytest.mark.skipif(not ipv6_loopback_available(), reason="no IPv6 loopback")
def test_memcached_ipv6_loopback() -> None:
    with MemcachedServer(host="::1") as server:
        assert server.address == f"[::1]:{server.port}"
        client = memcache_client(server)
        assert client.set("key", b"value", noreply=False)
        client.close()


def test_memcached_servers_fixture(memcached_servers: list[MemcachedServer]) -> None:
    ports = {server.port for server in memcached_servers}
    assert len(ports) == 3
    for server in memcached_servers:
        client = memcache_client(server)
        assert client.version()
        client.close()


def test_memcached_fixture_is_flushed(memcached: MemcachedServer) -> None:
    client = memcache_client(memcached)
    assert client.get("leftover") is None
    client.set("leftover", b"from this test", noreply=False)
    client.close()


@pytest.mark.parametrize("crash", [False, True])
def test_server_stopped_at_interpreter_exit(crash: bool) -> None:
    script = textwrap.dedent(
        f"""
        from tiercache.testing import MemcachedServer
        server = MemcachedServer().start()
        print(server.pid, flush=True)
        if {crash}:
            raise RuntimeError("crash on purpose")
        """
    )
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=30,
        env=environment,
        check=False,
    )
    assert result.stdout.strip().isdigit(), result.stderr
    pid = int(result.stdout)
    assert result.returncode == (1 if crash else 0), result.stderr
    assert not process_exists(pid)


# RedisServer


def test_redis_start_serve_stop() -> None:
    server = RedisServer().start()
    pid = server.pid
    assert server.url == f"redis://127.0.0.1:{server.port}/0"
    client = redis_py.Redis.from_url(server.url)
    assert client.ping()
    client.set("key", "value")
    assert client.get("key") == b"value"
    client.close()

    server.stop()
    assert not server.is_running
    assert not process_exists(pid)


def test_redis_restart_keeps_port_and_empties() -> None:
    with RedisServer() as server:
        port = server.port
        old_pid = server.pid
        client = redis_py.Redis.from_url(server.url)
        client.set("key", "value")
        client.close()

        server.restart()

        assert server.port == port
        assert not process_exists(old_pid)
        client = redis_py.Redis.from_url(server.url)
        assert client.get("key") is None
        client.close()


def test_redis_pause_blocks_until_resume() -> None:
    with RedisServer() as server:
        client = redis_py.Redis.from_url(server.url, socket_timeout=0.5)
        assert client.ping()

        server.pause()
        with pytest.raises(redis_py.exceptions.TimeoutError):
            client.ping()

        server.resume()
        assert client.ping()
        client.close()


def test_redis_kill_then_restart() -> None:
    with RedisServer() as server:
        pid = server.pid
        server.kill()
        assert not process_exists(pid)
        server.restart()
        client = redis_py.Redis.from_url(server.url)
        assert client.ping()
        client.close()


def test_redis_fixture_is_flushed(redis: RedisServer) -> None:
    client = redis_py.Redis.from_url(redis.url)
    assert client.dbsize() == 0
    client.set("leftover", "from this test")
    client.close()


# PostgresServer


def test_postgres_server_accepts_query(postgres_server: PostgresServer) -> None:
    assert postgres_server.url == (
        f"postgresql://postgres@127.0.0.1:{postgres_server.port}/postgres"
    )
    with psycopg.connect(postgres_server.url) as connection:
        row = connection.execute("SELECT 1 + 1, current_user").fetchone()
        encoding = connection.execute("SHOW server_encoding").fetchone()
    assert row == (2, "postgres")
    assert encoding == ("UTF8",)


def test_postgres_runs_as_postgres_user_when_root(
    postgres_server: PostgresServer,
) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root switches to the postgres user")
    owner_uid = os.stat(f"/proc/{postgres_server.pid}").st_uid
    assert owner_uid == pwd.getpwnam("postgres").pw_uid


def test_postgres_lifecycle() -> None:
    server = PostgresServer().start()
    pid = server.pid
    port = server.port
    data_dir = server.data_dir
    with psycopg.connect(server.url, autocommit=True) as connection:
        connection.execute("CREATE TABLE kept (value int)")
        connection.execute("INSERT INTO kept VALUES (42)")

    # A connection left open must not block the restart.
    idle_connection = psycopg.connect(server.url)
    children = child_pids(pid)
    assert children
    server.restart()
    idle_connection.close()
    assert server.port == port
    assert not process_exists(pid)
    for child in children:
        assert not process_alive(child)
    with psycopg.connect(server.url) as connection:
        row = connection.execute("SELECT value FROM kept").fetchone()
    assert row == (42,)

    pid = server.pid
    children = child_pids(pid)
    server.stop()
    assert not process_exists(pid)
    for child in children:
        assert not process_alive(child)
    assert not data_dir.exists()


def test_postgres_pause_kill_and_restart() -> None:
    with PostgresServer() as server:
        connection = psycopg.connect(server.url)
        backends = child_pids(server.pid)
        # The postmaster and its children: checkpointer, walwriter, backend...
        assert len(backends) >= 3

        server.pause()
        assert process_state(server.pid) == "T"
        for child in backends:
            assert process_state(child) == "T"
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(server.url, connect_timeout=2)

        server.resume()
        assert process_state(server.pid) != "T"
        for child in backends:
            assert process_state(child) != "T"
        assert connection.execute("SELECT 1").fetchone() == (1,)

        pid = server.pid
        server.kill()
        assert not process_exists(pid)
        for child in backends:
            assert not process_alive(child)
        connection.close()

        server.restart()
        with psycopg.connect(server.url) as connection:
            assert connection.execute("SELECT 1").fetchone() == (1,)


def test_postgres_url_fixture_is_new_database(postgres_url: str) -> None:
    with psycopg.connect(postgres_url) as connection:
        database = connection.execute("SELECT current_database()").fetchone()
        tables = connection.execute(
            "SELECT count(*) FROM information_schema.tables"
            " WHERE table_schema = 'public'"
        ).fetchone()
        connection.execute("CREATE TABLE leftover (value int)")
    assert database is not None
    assert database[0].startswith("test_")
    assert tables == (0,)
