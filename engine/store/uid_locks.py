"""Locks that keep two receipts of one SOP Instance UID apart, between threads and processes.

Two associations may send the same instance at once (a sender that timed out and sent again,
on another association, perhaps to another process on the port): the archive must look it up,
file it and index it for one of them at a time. The UIDs are spread over :data:`STRIPES`
stripes by a stable hash (every process picks the same stripe for a UID); a stripe is a thread
lock in this process, then one byte of a lock file shared by every process receiving into the
data folder, locked with an open-file-description lock (``F_OFD_SETLKW``). Not a classic
``lockf``: those belong to the process, so the kernel's deadlock check sees a cycle where two
threads of one process and one of another each wait for a different stripe, and fails a
request with ``EDEADLK`` although nothing is stuck. OFD locks have no such check (each receipt
holds one stripe at a time, so there is no cycle to detect).

Where the file cannot be opened or the system has no OFD locks, only the thread locks are
taken (one process is then still safe).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import struct
import threading
import weakref
import zlib
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["STRIPES", "UidLocks", "stripe_of"]

#: Stripes the UIDs are spread over.
STRIPES = 64
_OFD_SETLKW: int | None = getattr(fcntl, "F_OFD_SETLKW", None)


def stripe_of(uid: str) -> int:
    """The stripe of ``uid``: the same in every process (``hash()`` of a str is not)."""
    return zlib.crc32(uid.encode()) % STRIPES


def _flock_struct(kind: int, stripe: int) -> bytes:
    """A ``struct flock`` for one byte at offset ``stripe`` (``l_pid`` 0, as OFD locks need)."""
    return struct.pack("@hhqqi4x", kind, os.SEEK_SET, stripe, 1, 0)


class UidLocks:
    """The stripes of one data folder; ``path`` is the shared lock file (created if missing)."""

    def __init__(self, path: Path) -> None:
        self._threads = [threading.Lock() for _ in range(STRIPES)]
        self._fd = -1
        if _OFD_SETLKW is None:
            return
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except OSError as exc:
            log.warning(
                "cannot open %s (%s): receipts of one instance by two processes are not kept"
                " apart",
                path.name,
                exc.strerror,
            )
            return
        self._close = weakref.finalize(self, os.close, self._fd)  # or when collected

    @contextlib.contextmanager
    def hold(self, uid: str) -> Iterator[None]:
        """Hold ``uid``'s stripe: its thread lock, then its byte of the lock file."""
        stripe = stripe_of(uid)
        with self._threads[stripe]:
            if self._fd < 0 or _OFD_SETLKW is None:
                yield
                return
            fcntl.fcntl(self._fd, _OFD_SETLKW, _flock_struct(fcntl.F_WRLCK, stripe))
            try:
                yield
            finally:
                fcntl.fcntl(self._fd, _OFD_SETLKW, _flock_struct(fcntl.F_UNLCK, stripe))

    def close(self) -> None:
        """Close the lock file (idempotent)."""
        if self._fd >= 0:
            self._fd = -1
            self._close()
