"""Throwaway memcached, Redis and PostgreSQL servers for tests.

Each server class starts its own server process on a free loopback port, with its
files in a new temporary directory, so tests never use a system-wide server on the
standard ports. A server runs in its own session, so a Ctrl-C in the terminal does
not reach it. ``pause()``, ``resume()`` and ``kill()`` signal the server process and
all its descendants, which they find through /proc. At interpreter exit, an
``atexit`` handler stops the servers that are still running and removes the
temporary directories of all servers.

NOTE: ``atexit`` handlers do not run when the test process itself is killed by a
signal (SIGKILL, or SIGTERM without a handler), so such a run leaves its servers
running.

Example::

    from pymemcache import Client
    from tiercache.testing import MemcachedServer

    with MemcachedServer() as server:
        client = Client((server.host, server.port))

The pytest fixtures ``memcached_server``, ``memcached_servers`` (three servers),
``redis_server`` and ``postgres_server`` are session-scoped, and are defined only
when pytest is importable. Import them into a ``conftest.py`` to use them::

    from tiercache.testing import memcached_server, redis_server  # noqa: F401

The binaries come from the Debian packages ``memcached``, ``redis-server`` and
``postgresql``. A missing binary raises :class:`ServerNotInstalledError`.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import ipaddress
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self

try:
    import pytest
except ImportError:  # pytest is optional: without it, no fixtures are defined.
    _PYTEST_AVAILABLE = False
else:
    _PYTEST_AVAILABLE = True

__all__ = [
    "MemcachedServer",
    "PostgresServer",
    "RedisServer",
    "ServerNotInstalledError",
    "free_port",
]

logger = logging.getLogger(__name__)

# Debian installs the PostgreSQL server binaries here, outside PATH.
_POSTGRES_LIB_GLOB = "/usr/lib/postgresql/*/bin"

# Number of ports that start() tries when another process takes the port that
# free_port() returned before the server could bind it.
_PORT_ATTEMPTS = 5

# Servers of this process that have a running process or a temporary directory,
# for the atexit handler.
_active_servers: set[_ServerProcess] = set()


class ServerNotInstalledError(RuntimeError):
    """A server binary that a test server needs is not installed."""


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on ``host`` at the time of the call.

    The port is found by binding port 0 and closing the socket, so another process
    can take it before the caller binds it. The server classes retry with a new
    port when that happens.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _validate_loopback(host: str) -> None:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"invalid host {host!r}: expected a loopback IP address such as "
            "'127.0.0.1' or '::1'"
        ) from None
    if not address.is_loopback:
        # The servers run without authentication, so they must not listen on a
        # network that other hosts reach.
        raise ValueError(
            f"invalid host {host!r}: test servers listen only on loopback "
            "addresses such as '127.0.0.1' or '::1'"
        )


def _format_host(host: str) -> str:
    """Return ``host`` as it appears in an address or URL, bracketed for IPv6."""
    return f"[{host}]" if ":" in host else host


def _find_binary(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ServerNotInstalledError(
            f"{name} not found on PATH: install the Debian package {package!r} "
            f"(apt-get install {package})"
        )
    return path


def _send_command(host: str, port: int, command: bytes, timeout: float) -> bytes:
    """Send one text-protocol command and return the first response line."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(command)
        response = b""
        while not response.endswith(b"\r\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            response += chunk
        return response


class _PortInUseError(RuntimeError):
    """The server exited at startup because another process listens on its port."""


class _ServerProcess:
    """Lifecycle of one server process: start, stop, kill, pause and restart.

    Subclasses set ``name`` and implement ``_command`` and ``_is_ready``. The
    server's output goes to ``<tempdir>/<name>.log``, and startup errors include
    that output.
    """

    name: ClassVar[str]
    # Seconds that start() and restart() wait for the server to accept connections.
    startup_timeout: float = 5.0
    # Seconds that stop() waits after the stop signal before it sends SIGKILL.
    stop_timeout: float = 5.0
    # Signal that stop() and restart() send first.
    stop_signal: ClassVar[signal.Signals] = signal.SIGTERM

    def __init__(self, *, host: str, port: int | None) -> None:
        _validate_loopback(host)
        if port is not None and not 0 < port < 65536:
            raise ValueError(f"invalid port {port}: expected 1 to 65535")
        self._host = host
        self._requested_port = port
        self._port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._owner_pid = os.getpid()
        self._tempdir: Path | None = None
        self._paused = False

    # Properties

    @property
    def host(self) -> str:
        """Loopback IP address that the server listens on."""
        return self._host

    @property
    def port(self) -> int:
        """TCP port of the server, chosen by start() and kept by restart()."""
        if self._port is None:
            raise RuntimeError(f"{self.name} server has not been started")
        return self._port

    @property
    def address(self) -> str:
        """``host:port`` string, with the host in brackets for IPv6."""
        return f"{_format_host(self._host)}:{self.port}"

    @property
    def pid(self) -> int:
        """Process id of the running server."""
        return self._require_process().pid

    @property
    def is_running(self) -> bool:
        """Whether the server process exists, paused or not."""
        return self._process is not None and self._process.poll() is None

    @property
    def is_paused(self) -> bool:
        """Whether the server is stopped by pause() and not yet resumed."""
        return self.is_running and self._paused

    # Lifecycle

    def start(self) -> Self:
        """Start the server and wait until it accepts connections.

        Without a ``port`` argument, start() picks a free port, and tries another
        one if a different process takes it first. Raises RuntimeError when the
        server is already running or exits during startup, TimeoutError when it
        does not accept connections within ``startup_timeout`` seconds. A failed
        start removes the temporary directory.
        """
        if self.is_running:
            raise RuntimeError(
                f"{self.name} server is already running (pid {self.pid})"
            )
        try:
            self._prepare_and_launch()
        except BaseException:
            self.stop()
            raise
        return self

    def _prepare_and_launch(self) -> None:
        self._prepare()
        if self._requested_port is not None:
            self._launch(self._requested_port)
            return
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            port = free_port(self._host)
            try:
                self._launch(port)
            except _PortInUseError:
                if attempt == _PORT_ATTEMPTS:
                    raise
                logger.debug(
                    "%s port %d was taken by another process, trying another port",
                    self.name,
                    port,
                )
            else:
                break

    def stop(self) -> None:
        """Stop the server and remove its temporary files.

        Sends ``stop_signal`` and waits up to ``stop_timeout`` seconds, then sends
        SIGKILL. A paused server is resumed first. Calling stop() again does
        nothing.
        """
        self._terminate()
        if self._tempdir is not None:
            try:
                shutil.rmtree(self._tempdir)
            except OSError as error:
                logger.warning("failed to remove %s: %s", self._tempdir, error)
            self._tempdir = None
        _active_servers.discard(self)

    def kill(self) -> None:
        """Kill the server and its descendant processes with SIGKILL, like a crash.

        Its files stay in place, so restart() starts it again from them.
        """
        process = self._require_process()
        _kill_process_tree(process)
        logger.debug("killed %s pid %d on %s", self.name, process.pid, self.address)
        self._forget_process()

    def pause(self) -> None:
        """Freeze the server with SIGSTOP.

        The kernel still accepts connections into the listen backlog, but the
        server reads and responds to nothing until resume().
        """
        process = self._require_process()
        _stop_process_tree(process.pid)
        self._paused = True
        logger.debug("paused %s pid %d on %s", self.name, process.pid, self.address)

    def resume(self) -> None:
        """Continue a paused server with SIGCONT."""
        process = self._require_process()
        _signal_processes(_process_tree(process.pid), signal.SIGCONT)
        self._paused = False
        logger.debug("resumed %s pid %d on %s", self.name, process.pid, self.address)

    def restart(self) -> Self:
        """Stop the server if it runs, then start it again on the same port.

        Works after kill() and stop() too, but stop() has removed the files, so
        the server starts empty. Raises RuntimeError when the server was never
        started or another process has taken the port.
        """
        port = self.port
        self._terminate()
        self._prepare()
        self._launch(port)
        return self

    def __enter__(self) -> Self:
        if not self.is_running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        if self._port is None:
            return f"<{type(self).__name__} not started>"
        state = "running" if self.is_running else "stopped"
        return f"<{type(self).__name__} {self.address} {state}>"

    # Hooks for subclasses

    def _command(self, port: int) -> list[str]:
        raise NotImplementedError

    def _is_ready(self, port: int) -> bool:
        """Return whether the server on ``port`` accepts requests."""
        raise NotImplementedError

    def _prepare_files(self, tempdir: Path) -> None:
        """Create the files the server needs in ``tempdir`` before a launch."""

    def _popen_options(self) -> dict[str, Any]:
        return {}

    def _after_stop_signal(self) -> None:
        """Help the server act on the stop signal that was just sent."""

    # Internals

    def _require_process(self) -> subprocess.Popen[bytes]:
        if self._process is None or self._process.poll() is not None:
            raise RuntimeError(f"{self.name} server is not running")
        return self._process

    def _prepare(self) -> None:
        if self._tempdir is None:
            self._tempdir = Path(tempfile.mkdtemp(prefix=f"tiercache-{self.name}-"))
            self._owner_pid = os.getpid()
            _active_servers.add(self)
        self._prepare_files(self._tempdir)

    def _launch(self, port: int) -> None:
        """Start the process on ``port`` and wait until it accepts requests."""
        assert self._tempdir is not None
        command = self._command(port)
        log_path = self._tempdir / f"{self.name}.log"
        with open(log_path, "ab") as log:
            log_offset = log.tell()
            logger.debug("starting %s on port %d: %s", self.name, port, command)
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._tempdir,
                start_new_session=True,
                **self._popen_options(),
            )
        try:
            self._wait_ready(process, port, log_path, log_offset)
        except BaseException:
            _kill_process_tree(process)
            raise
        self._process = process
        self._port = port
        self._paused = False
        logger.debug("started %s pid %d on %s", self.name, process.pid, self.address)

    def _wait_ready(
        self,
        process: subprocess.Popen[bytes],
        port: int,
        log_path: Path,
        log_offset: int,
    ) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while True:
            exit_code = process.poll()
            if exit_code is not None:
                output = _read_log(log_path, log_offset)
                if "address already in use" in output.lower():
                    raise _PortInUseError(
                        f"{self.name} could not listen on "
                        f"{_format_host(self._host)}:{port} because another process "
                        f"uses that port. Its output:\n{output}"
                    )
                raise RuntimeError(
                    f"{self.name} exited with code {exit_code} while starting on "
                    f"{_format_host(self._host)}:{port}. Its output:\n{output}"
                )
            # Check the exit code again after a successful probe, because a
            # different server that already listens on the port could respond
            # while ours is still failing to bind it.
            if self._is_ready(port) and process.poll() is None:
                return
            if time.monotonic() > deadline:
                output = _read_log(log_path, log_offset)
                raise TimeoutError(
                    f"{self.name} pid {process.pid} did not accept connections on "
                    f"{_format_host(self._host)}:{port} within "
                    f"{self.startup_timeout} s. Its output:\n{output}"
                )
            time.sleep(0.02)

    def _terminate(self) -> None:
        """Stop the process gracefully, with SIGKILL after ``stop_timeout``."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(self.stop_signal)
            # A process stopped by SIGSTOP handles the stop signal only once
            # it continues.
            _signal_processes(_process_tree(process.pid), signal.SIGCONT)
            self._after_stop_signal()
            try:
                process.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "%s pid %d did not exit within %s s of %s, sending SIGKILL",
                    self.name,
                    process.pid,
                    self.stop_timeout,
                    self.stop_signal.name,
                )
                _kill_process_tree(process)
        logger.debug(
            "stopped %s pid %d with exit code %s",
            self.name,
            process.pid,
            process.returncode,
        )
        self._forget_process()

    def _forget_process(self) -> None:
        self._process = None
        self._paused = False


def _kill_process_tree(process: subprocess.Popen[bytes]) -> None:
    """Kill the process and its descendants with SIGKILL and wait until they exit.

    Reaps the process. Descendants that have exited stay zombies until init
    reaps them.
    """
    # Signal only while the process is not yet reaped, so that its id cannot
    # have been reused by an unrelated process.
    if process.poll() is not None:
        return
    tree = _stop_process_tree(process.pid)
    _signal_processes(tree, signal.SIGKILL)
    process.wait()
    _wait_for_threads(tree[1:], _EXITED_STATES, "exit after SIGKILL")


def _stop_process_tree(pid: int) -> list[int]:
    """Stop ``pid`` and its descendants with SIGSTOP and return their ids.

    The parent stops first, so it cannot start a child that the list misses.
    """
    os.kill(pid, signal.SIGSTOP)
    _wait_for_threads([pid], _STOPPED_STATES, "stop after SIGSTOP")
    tree = _process_tree(pid)
    _signal_processes(tree[1:], signal.SIGSTOP)
    _wait_for_threads(tree, _STOPPED_STATES, "stop after SIGSTOP")
    return tree


def _process_tree(pid: int) -> list[int]:
    """Return ``pid`` followed by the ids of all its descendant processes.

    PostgreSQL backends call setsid(), so they leave the server's process group,
    and only the parent links in /proc find them. Where /proc is missing, the
    list contains only ``pid``.
    """
    children: dict[int, list[int]] = {}
    for stat_path in Path("/proc").glob("[0-9]*/stat"):
        fields = _read_proc_stat(stat_path)
        if fields is None:
            continue
        # fields[1] is the parent process id.
        children.setdefault(int(fields[1]), []).append(int(stat_path.parent.name))
    tree = [pid]
    index = 0
    while index < len(tree):
        tree.extend(children.get(tree[index], []))
        index += 1
    return tree


def _signal_processes(pids: list[int], signal_number: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal_number)


# Thread states in /proc: T is stopped by a signal, Z and X have exited.
_STOPPED_STATES = frozenset("TZX")
_EXITED_STATES = frozenset("ZX")


def _wait_for_threads(
    pids: list[int], states: frozenset[str], action: str, timeout: float = 5.0
) -> None:
    """Wait until every thread of the processes ``pids`` is in one of ``states``.

    kill() only queues a signal, so a thread that runs on another CPU can still
    handle a request right after the call. A process that no longer exists
    counts as done, so this returns at once where /proc is missing.
    """
    deadline = time.monotonic() + timeout
    while not all(_threads_in_states(pid, states) for pid in pids):
        if time.monotonic() > deadline:
            raise TimeoutError(f"processes {pids} did not {action} within {timeout} s")
        time.sleep(0.001)


def _threads_in_states(pid: int, states: frozenset[str]) -> bool:
    for thread_stat in Path(f"/proc/{pid}/task").glob("[0-9]*/stat"):
        fields = _read_proc_stat(thread_stat)
        if fields is not None and fields[0] not in states:
            return False
    return True


def _read_proc_stat(path: Path) -> list[str] | None:
    """Return the fields of a /proc stat file that follow the command name.

    The first returned field is the state. Returns None when the process or
    thread has exited.
    """
    try:
        text = path.read_text()
    except OSError:
        return None
    # The command name may contain spaces and parentheses, so split after the
    # last closing parenthesis.
    return text[text.rindex(")") + 2 :].split()


def _read_log(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace").strip()
    except OSError as error:
        return f"(could not read {path}: {error})"


@atexit.register
def _stop_active_servers() -> None:
    for server in list(_active_servers):
        # A child created by os.fork() inherits this set but not the processes.
        if server._owner_pid != os.getpid():
            continue
        try:
            server.stop()
        except Exception:
            logger.exception("failed to stop %r at interpreter exit", server)


class MemcachedServer(_ServerProcess):
    """A memcached server on a loopback port, with UDP disabled and 2 threads."""

    name = "memcached"

    def __init__(
        self,
        *,
        memory_mb: int = 64,
        item_size_max: str | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
    ) -> None:
        """Configure the server. Nothing runs until start().

        ``memory_mb`` is the item memory limit (``-m``). ``item_size_max`` is
        memcached's maximum item size (``-I``), such as ``"2m"``. Without ``port``,
        start() picks a free port.
        """
        super().__init__(host=host, port=port)
        if memory_mb <= 0:
            raise ValueError(f"invalid memory_mb {memory_mb}: expected at least 1")
        self.memory_mb = memory_mb
        self.item_size_max = item_size_max

    def flush(self) -> None:
        """Invalidate every item with ``flush_all``."""
        self._require_process()
        response = _send_command(self._host, self.port, b"flush_all\r\n", timeout=5)
        if response != b"OK\r\n":
            raise RuntimeError(
                f"memcached on {self.address} rejected flush_all: {response!r}"
            )

    def _command(self, port: int) -> list[str]:
        command = [
            _find_binary("memcached", "memcached"),
            "-l",
            self._host,
            "-p",
            str(port),
            "-U",
            "0",
            "-m",
            str(self.memory_mb),
            "-t",
            "2",
        ]
        if self.item_size_max is not None:
            command += ["-I", self.item_size_max]
        if os.geteuid() == 0:
            # As root, memcached exits at startup unless -u names a user.
            command += ["-u", "root"]
        return command

    def _after_stop_signal(self) -> None:
        # memcached's SIGTERM handler only sets a flag, which the main event loop
        # reads when it wakes, once a second on an idle server. A new connection
        # wakes it at once: stop() took 2 ms instead of 1.0 s with memcached 1.6.18.
        with contextlib.suppress(OSError):
            socket.create_connection((self._host, self.port), timeout=1).close()

    def _is_ready(self, port: int) -> bool:
        try:
            response = _send_command(self._host, port, b"version\r\n", timeout=1)
        except OSError:
            return False
        return response.startswith(b"VERSION ")


class RedisServer(_ServerProcess):
    """A Redis server on a loopback port that keeps nothing on disk."""

    name = "redis"

    def __init__(self, *, host: str = "127.0.0.1", port: int | None = None) -> None:
        """Configure the server. Without ``port``, start() picks a free port."""
        super().__init__(host=host, port=port)

    @property
    def url(self) -> str:
        """Connection URL of database 0, such as ``redis://127.0.0.1:6390/0``."""
        return f"redis://{self.address}/0"

    def flush(self) -> None:
        """Delete every key in every database with ``FLUSHALL``."""
        self._require_process()
        response = _send_command(self._host, self.port, b"FLUSHALL\r\n", timeout=5)
        if response != b"+OK\r\n":
            raise RuntimeError(
                f"redis on {self.address} rejected FLUSHALL: {response!r}"
            )

    def _command(self, port: int) -> list[str]:
        assert self._tempdir is not None
        return [
            _find_binary("redis-server", "redis-server"),
            "--bind",
            self._host,
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self._tempdir),
            "--daemonize",
            "no",
        ]

    def _is_ready(self, port: int) -> bool:
        try:
            response = _send_command(self._host, port, b"PING\r\n", timeout=1)
        except OSError:
            return False
        # A server that is still loading responds -LOADING.
        return response == b"+PONG\r\n"


def find_postgres_bin_dir() -> Path:
    """Return the directory that contains the ``initdb`` and ``postgres`` binaries.

    Looks on PATH first, then in Debian's ``/usr/lib/postgresql/<version>/bin``,
    newest version first.
    """
    initdb = shutil.which("initdb")
    if initdb is not None:
        bin_dir = Path(initdb).resolve().parent
        if (bin_dir / "postgres").is_file():
            return bin_dir
    candidates: list[tuple[tuple[int, ...], Path]] = []
    for bin_dir in Path("/").glob(_POSTGRES_LIB_GLOB.lstrip("/")):
        version_text = bin_dir.parent.name
        if not re.fullmatch(r"\d+(\.\d+)*", version_text):
            continue
        if (bin_dir / "initdb").is_file() and (bin_dir / "postgres").is_file():
            version = tuple(int(part) for part in version_text.split("."))
            candidates.append((version, bin_dir))
    if not candidates:
        raise ServerNotInstalledError(
            f"initdb and postgres not found on PATH or in {_POSTGRES_LIB_GLOB}: "
            "install the Debian package 'postgresql' (apt-get install postgresql)"
        )
    return max(candidates)[1]


class PostgresServer(_ServerProcess):
    """A PostgreSQL server on a loopback port, with a new cluster in a temp dir.

    The cluster has trust authentication and the superuser ``postgres``. Durability
    is off (``fsync``, ``synchronous_commit``, ``full_page_writes``) for speed.
    Data survives restart(). After kill(), crash recovery at the next start keeps
    the data, except transactions committed within the last fraction of a second,
    because ``synchronous_commit`` is off. Nothing survives a crash of the machine.

    PostgreSQL does not run as root, so when this process runs as root, the
    server runs as the ``postgres`` OS user. That user then needs search access
    to the directories above the temporary directory (``TMPDIR``, else ``/tmp``).
    """

    name = "postgres"
    startup_timeout = 30.0
    stop_timeout = 15.0
    # SIGINT is PostgreSQL's fast shutdown, which ends open sessions. SIGTERM
    # (smart shutdown) would wait for every client to disconnect.
    stop_signal = signal.SIGINT

    def __init__(self, *, host: str = "127.0.0.1", port: int | None = None) -> None:
        """Configure the server. Without ``port``, start() picks a free port."""
        super().__init__(host=host, port=port)
        self._bin_dir: Path | None = None

    @property
    def url(self) -> str:
        """Connection URL of the ``postgres`` database as the ``postgres`` user."""
        return self.database_url("postgres")

    def database_url(self, database: str) -> str:
        """Return the connection URL of ``database`` as the ``postgres`` user."""
        return f"postgresql://postgres@{self.address}/{database}"

    @property
    def data_dir(self) -> Path:
        """Data directory of the cluster, removed by stop()."""
        if self._tempdir is None:
            raise RuntimeError("postgres server has no data directory: start it first")
        return self._tempdir / "data"

    def _binary(self, name: str) -> str:
        if self._bin_dir is None:
            self._bin_dir = find_postgres_bin_dir()
        return str(self._bin_dir / name)

    def _server_user(self) -> pwd.struct_passwd | None:
        """Return the OS user to run PostgreSQL as, or None for the current user."""
        if os.geteuid() != 0:
            return None
        try:
            return pwd.getpwnam("postgres")
        except KeyError:
            raise ServerNotInstalledError(
                "PostgreSQL does not run as root, and the OS user 'postgres' "
                "that it would run as does not exist: install the Debian package "
                "'postgresql', which creates it, or run the tests as another user"
            ) from None

    def _popen_options(self) -> dict[str, Any]:
        user = self._server_user()
        if user is None:
            return {}
        # extra_groups=[] drops root's supplementary groups.
        return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}

    def _prepare_files(self, tempdir: Path) -> None:
        socket_dir = tempdir / "socket"
        socket_dir.mkdir(exist_ok=True)
        user = self._server_user()
        if user is not None:
            os.chown(tempdir, user.pw_uid, user.pw_gid)
            os.chown(socket_dir, user.pw_uid, user.pw_gid)
        data_dir = tempdir / "data"
        if (data_dir / "PG_VERSION").exists():
            return
        command = [
            self._binary("initdb"),
            "-D",
            str(data_dir),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        ]
        logger.debug("creating postgres cluster: %s", command)
        result = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            cwd=tempdir,
            timeout=120,
            check=False,
            **self._popen_options(),
        )
        if result.returncode != 0:
            output = (result.stdout + result.stderr).decode(errors="replace").strip()
            raise RuntimeError(
                f"initdb failed with exit code {result.returncode} in {data_dir}. "
                f"Its output:\n{output}"
            )

    def _command(self, port: int) -> list[str]:
        assert self._tempdir is not None
        return [
            self._binary("postgres"),
            "-D",
            str(self._tempdir / "data"),
            "-p",
            str(port),
            "-k",
            str(self._tempdir / "socket"),
            "-c",
            f"listen_addresses={self._host}",
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
        ]

    def _is_ready(self, port: int) -> bool:
        if importlib.util.find_spec("psycopg") is None:
            result = subprocess.run(
                [
                    self._binary("pg_isready"),
                    "--host",
                    self._host,
                    "--port",
                    str(port),
                    "--username",
                    "postgres",
                    "--dbname",
                    "postgres",
                    "--timeout",
                    "2",
                ],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                check=False,
            )
            return result.returncode == 0

        import psycopg

        try:
            with psycopg.connect(
                host=self._host,
                port=port,
                user="postgres",
                dbname="postgres",
                connect_timeout=2,
            ) as connection:
                connection.execute("SELECT 1")
        except psycopg.Error:
            return False
        return True


if _PYTEST_AVAILABLE:

    @pytest.fixture(scope="session")
    def memcached_server() -> Iterator[MemcachedServer]:
        """Start a memcached server for the test session and stop it afterwards."""
        with MemcachedServer() as server:
            yield server

    @pytest.fixture(scope="session")
    def memcached_servers() -> Iterator[list[MemcachedServer]]:
        """Start three memcached servers, for a client pool, for the test session."""
        with contextlib.ExitStack() as stack:
            yield [stack.enter_context(MemcachedServer()) for _ in range(3)]

    @pytest.fixture(scope="session")
    def redis_server() -> Iterator[RedisServer]:
        """Start a Redis server for the test session and stop it afterwards."""
        with RedisServer() as server:
            yield server

    @pytest.fixture(scope="session")
    def postgres_server() -> Iterator[PostgresServer]:
        """Start a PostgreSQL server for the test session and stop it afterwards."""
        with PostgresServer() as server:
            yield server
