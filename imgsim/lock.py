"""One writer at a time: an advisory lock held on the index's SQLite file while it is open for writing.

Readers take no lock; SQLite's WAL lets them search while a writer commits batches. The lock is an
flock (not a POSIX record lock), so it does not interfere with SQLite's own locks on the same file,
and the kernel releases it if the process dies, however it dies.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import IndexLockedError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks here; SQLite still keeps the file consistent.
    fcntl = None


class WriterLock:
    def __init__(self, fd: int | None):
        self._fd = fd

    @classmethod
    def acquire(cls, path: Path) -> WriterLock:
        if fcntl is None:
            return cls(None)
        try:
            fd = os.open(path, os.O_RDWR)
        except PermissionError:
            fd = os.open(path, os.O_RDONLY)  # a read-only file: the write itself will be refused later
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise IndexLockedError(f"{path} is being written by another process: wait for it to finish, "
                                   f"or open the index read-only to search it") from None
        return cls(fd)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class WriterProbe:
    """Tells a reader whether another process holds the index open for writing now (so a missing or
    lagging FAISS file is work in progress, not damage). A shared flock is tried and dropped at
    once (a writer starting in that very microsecond is told the index is busy, and can try again).

    Its descriptor on the SQLite file stays open until `close`, which the store calls after closing
    its connection: on Linux, closing any descriptor of a file drops every POSIX lock the process
    holds on it, SQLite's read locks included, and a writer could then pull the file from under
    this reader (its -wal removed while the reader still reads it)."""

    def __init__(self, path: Path):
        self._path = path
        self._fd: int | None = None

    def active(self) -> bool:
        if fcntl is None:
            return False
        if self._fd is None:
            try:
                self._fd = os.open(self._path, os.O_RDONLY)
            except OSError:
                return False
        try:
            fcntl.flock(self._fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return False
        fcntl.flock(self._fd, fcntl.LOCK_UN)  # unlocking a flock leaves SQLite's POSIX locks alone
        return False

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
