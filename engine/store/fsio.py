"""Durable file writes: temp file in the target folder, fsync, atomic rename, fsync the folder.

After :func:`write_durable` returns, the file survives a power cut under its final name.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from pathlib import Path


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename or a new entry in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_dir(path: Path) -> None:
    """Create ``path`` and its missing parents, fsyncing each parent that gained an entry.

    When another thread or process created ``path`` in between, its parent is fsynced all the
    same: the other may not have done so yet, and what this caller writes into ``path`` must
    not depend on the other's progress to survive a power cut.
    """
    if path.is_dir():
        return
    ensure_dir(path.parent)
    with contextlib.suppress(FileExistsError):
        path.mkdir()
    fsync_dir(path.parent)


_TMP_NAMES = itertools.count()


def write_durable(
    path: str | os.PathLike[str], data: bytes | memoryview, *, mode: int = 0o640
) -> None:
    """Write ``data`` to ``path`` atomically and durably (replacing any existing file).

    Missing folders are created (durably). Plain ``os`` calls on strings, no pathlib: this runs
    once per received instance.
    """
    target = os.fspath(path)
    folder = os.path.dirname(target)
    tmp, fd = _create_temp(folder, mode)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink_quietly(tmp)
        raise
    os.close(fd)
    try:
        os.replace(tmp, target)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    fsync_dir(folder)


def create_durable(path: Path, data: bytes, *, mode: int = 0o600) -> bool:
    """Create ``path`` holding ``data`` atomically and durably, never replacing a file.

    The bytes go to a temp file (mode ``mode``) that is fsynced and then hard-linked to
    ``path``: a crash leaves either no file or the whole file. Returns False (and leaves the
    existing file alone) when ``path`` already exists.
    """
    folder = os.fspath(path.parent)
    tmp, fd = _create_temp(folder, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
    finally:
        _unlink_quietly(tmp)
    fsync_dir(folder)
    return True


def _create_temp(folder: str, mode: int) -> tuple[str, int]:
    """A new hidden temp file in ``folder`` (created when missing), opened for writing."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    while True:
        # pid + counter is unique among live writers; a stale name left by a crash is skipped.
        tmp = os.path.join(folder, f".tmp-{os.getpid()}-{next(_TMP_NAMES)}")
        try:
            return tmp, os.open(tmp, flags, mode)
        except FileExistsError:
            continue
        except FileNotFoundError:
            ensure_dir(Path(folder))
            return tmp, os.open(tmp, flags, mode)


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
