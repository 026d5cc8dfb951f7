"""Tests of the SQLite origin adapter opened by several processes at once."""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import Any

from tiercache.adapters.sqlite import SQLiteOrigin

SPAWN = multiprocessing.get_context("spawn")


def open_and_store(path: str, barrier: Any, number: int) -> None:
    barrier.wait(30)
    origin = SQLiteOrigin(path)
    origin.store(f"k{number}", {"n": number})


def test_processes_open_new_file_together(tmp_path: Path) -> None:
    # Several processes switching a new file to WAL at once made SQLite
    # raise "database is locked" without waiting for the busy timeout.
    for round_number in range(10):
        path = str(tmp_path / f"origin{round_number}.db")
        barrier = SPAWN.Barrier(6)
        processes = [
            SPAWN.Process(target=open_and_store, args=(path, barrier, number))
            for number in range(6)
        ]
        for process in processes:
            process.start()
        for process in processes:
            process.join(60)
        assert [process.exitcode for process in processes] == [0] * 6
        origin = SQLiteOrigin(path)
        assert origin.load("k5") == {"n": 5}
        assert origin.connection().execute("PRAGMA journal_mode").fetchone()[0] == "wal"
