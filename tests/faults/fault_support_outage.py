"""Helpers of the outage and storage fault tests (tests/faults/test_outages.py and
test_storage_faults.py).

- ``WriteLock`` is another SQLite connection (as a second process would have) holding the
  database's write lock from a thread until the test lets go.
- ``fill`` fills a filesystem up to its last byte.
"""

from __future__ import annotations

import asyncio
import errno
import os
import sqlite3
import threading
from pathlib import Path
from types import TracebackType

TESTS = Path(__file__).resolve().parent.parent


class WriteLock:
    """``BEGIN EXCLUSIVE`` on ``path`` from a thread of its own, held until ``release()``
    (or the end of the ``async with``). In WAL mode readers go on; every writer waits."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._acquired = threading.Event()
        self._release = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._hold, name="sqlite-write-lock", daemon=True)

    def _hold(self) -> None:
        try:
            db = sqlite3.connect(self.path, isolation_level=None, timeout=10)
            try:
                db.execute("BEGIN EXCLUSIVE")
                self._acquired.set()
                self._release.wait(120)  # a test that forgets to let go ends here
                db.execute("COMMIT")
            finally:
                db.close()
        except BaseException as exc:  # reported by __aenter__ / release
            self._error = exc
            self._acquired.set()

    async def __aenter__(self) -> WriteLock:
        self._thread.start()
        if not await asyncio.to_thread(self._acquired.wait, 15):
            raise AssertionError("the write lock was not taken within 15 s")
        if self._error is not None:
            raise AssertionError(f"taking the write lock failed: {self._error}")
        return self

    async def release(self) -> None:
        self._release.set()
        await asyncio.to_thread(self._thread.join, 15)
        if self._error is not None:
            raise AssertionError(f"holding the write lock failed: {self._error}")

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._thread.is_alive():
            await self.release()


def fill(path: Path) -> int:
    """Write zeros to ``path`` until the filesystem has no byte left; returns how many.
    Blocking: call it in a thread."""
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (1 << 16, 1 << 12, 1 << 9, 1):
            block = b"\0" * size
            while True:
                try:
                    written += os.write(fd, block)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    return written
