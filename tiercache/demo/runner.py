"""Start the processes of one send, start them together, and collect their results."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from tiercache.demo.workers import (
    EditorResult,
    RunSpec,
    WorkerResult,
    run_editor,
    run_worker,
)

logger = logging.getLogger(__name__)

# Seconds to wait for every process to start, open its connections and
# subscribe. Spawned interpreters import tiercache first, about 0.5 s each
# on a 2-core machine.
READY_TIMEOUT = 60.0
# Seconds past the run's duration to wait for the results.
RESULT_GRACE = 60.0
# Seconds between two progress lines.
PROGRESS_INTERVAL = 2.0
# Delay between the start signal and the common start time, so that every
# process is waiting when the clock starts.
START_DELAY = 0.05
EDITOR_NAME = "editor"


class RunFailedError(RuntimeError):
    """A process of the send failed, died or timed out."""


@dataclass(slots=True)
class RunResult:
    """Results of every process of one send."""

    spec: RunSpec
    workers: list[WorkerResult]
    editor: EditorResult
    load_average: float
    """The machine's 1-minute load average when the send ended. Other
    programs running at the same time slow the send down."""

    @property
    def elapsed(self) -> float:
        """Seconds of sending, the longest of the workers."""
        return max(worker.elapsed for worker in self.workers)


def run_send(spec: RunSpec, *, workers: int, show_progress: bool) -> RunResult:
    """Run ``workers`` sender processes and one editor for ``spec.duration`` seconds.

    Every process is terminated when this returns or raises, including on
    KeyboardInterrupt.

    :raises RunFailedError: if a process fails, dies or times out.
    """
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    start = context.Event()
    start_time = context.Value("d", 0.0, lock=False)
    progress = context.Array("q", workers + 1, lock=False)
    names = [f"worker-{index}" for index in range(workers)] + [EDITOR_NAME]
    processes: dict[str, Any] = {}
    is_finished = False
    try:
        for index, name in enumerate(names):
            target = run_editor if name == EDITOR_NAME else run_worker
            process = context.Process(
                target=target,
                args=(name, index, spec, start, start_time, progress, results),
                name=f"tiercache-demo {spec.mode} {name}",
                daemon=True,
            )
            with _sigint_ignored():
                process.start()
            processes[name] = process
        logger.debug("%s run: started %d processes", spec.mode, len(processes))
        _collect(results, processes, "ready", time.monotonic() + READY_TIMEOUT)

        start_time.value = time.time() + START_DELAY
        start.set()
        logger.info("%s run: sending for %.1f s", spec.mode, spec.duration)
        reporter = _ProgressReporter(spec, progress, workers) if show_progress else None
        deadline = time.monotonic() + START_DELAY + spec.duration + RESULT_GRACE
        outcomes = _collect(results, processes, "result", deadline, reporter)
        is_finished = True
    finally:
        _stop_processes(processes, join_timeout=5.0 if is_finished else 0.0)
    return RunResult(
        spec=spec,
        workers=[outcomes[name] for name in names if name != EDITOR_NAME],
        editor=outcomes[EDITOR_NAME],
        load_average=os.getloadavg()[0],
    )


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """Ignore SIGINT while starting a process, so that the process inherits it.

    A Ctrl-C in the terminal reaches every process in the foreground group.
    A spawned interpreter that starts with SIGINT ignored keeps ignoring it,
    so only the main process handles Ctrl-C, and it terminates the others.
    Without this, a process still importing would print a traceback.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class _ProgressReporter:
    def __init__(self, spec: RunSpec, progress: Any, workers: int) -> None:
        self._spec = spec
        self._progress = progress
        self._workers = workers
        self._started = time.monotonic()
        self._next = self._started + PROGRESS_INTERVAL

    def maybe_report(self) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + PROGRESS_INTERVAL
        elapsed = min(now - self._started, self._spec.duration)
        sends = sum(self._progress[index] for index in range(self._workers))
        writes = self._progress[self._workers]
        logger.info(
            "%s run: %4.1f of %.1f s, %d emails sent, %d writes",
            self._spec.mode,
            elapsed,
            self._spec.duration,
            sends,
            writes,
        )


def _collect(
    results: Any,
    processes: dict[str, Any],
    kind: str,
    deadline: float,
    reporter: _ProgressReporter | None = None,
) -> dict[str, Any]:
    """Wait for a ``kind`` message from every process.

    :returns: the payloads by process name.
    """
    payloads: dict[str, Any] = {}
    while len(payloads) < len(processes):
        if reporter is not None:
            reporter.maybe_report()
        try:
            message_kind, name, payload = results.get(timeout=0.2)
        except queue.Empty:
            _check_alive(processes, payloads, kind, deadline)
            continue
        if message_kind == "failed":
            # The traceback exists only in this message, so it is logged here
            # in full, and the exception carries its last line.
            logger.error("%s failed:\n%s", name, payload.rstrip())
            summary = payload.strip().splitlines()[-1]
            raise RunFailedError(f"{name} failed: {summary}")
        if message_kind == kind:
            payloads[name] = payload
    return payloads


def _check_alive(
    processes: dict[str, Any], payloads: dict[str, Any], kind: str, deadline: float
) -> None:
    # The queue was empty for a while, so a process that has exited without
    # a message will not send one any more.
    for name, process in processes.items():
        if name not in payloads and process.exitcode is not None:
            raise RunFailedError(
                f"{name} (pid {process.pid}) exited with code {process.exitcode} "
                f"before sending its {kind} message"
            )
    if time.monotonic() > deadline:
        waiting = sorted(set(processes) - set(payloads))
        raise RunFailedError(
            f"timed out waiting for the {kind} message of {', '.join(waiting)}"
        )


def _stop_processes(processes: dict[str, Any], *, join_timeout: float) -> None:
    """Join the processes, then terminate and kill those still running.

    After a failure or Ctrl-C ``join_timeout`` is 0, because the other
    processes would keep sending until the deadline.
    """
    for process in processes.values():
        process.join(timeout=join_timeout)
    for name, process in processes.items():
        if process.is_alive():
            if join_timeout > 0:
                logger.warning(
                    "%s (pid %d) still running; terminating it", name, process.pid
                )
            process.terminate()
            process.join(timeout=5.0)
        if process.is_alive():
            logger.warning("%s (pid %d) ignored SIGTERM; killing it", name, process.pid)
            process.kill()
            process.join(timeout=5.0)
