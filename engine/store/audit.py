"""The audit log: append-only JSON lines, one per decision, with no PHI in them.

``<data_dir>/audit/audit-YYYYMM.jsonl``. Each entry is written and fsynced before the action it
records takes effect for the user (a re-identification is logged before the answer is shown).
Callers pass only values that identify nobody: pseudonyms, project names, reason codes, counts,
and UIDs through :func:`uid_token`.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from engine.store.fsio import ensure_dir

log = logging.getLogger(__name__)

_LOCK = threading.Lock()


def uid_token(uid: str) -> str:
    """A short, stable stand-in for a UID in the audit log (SHA-256, first 16 hex digits)."""
    return hashlib.sha256(uid.encode("ascii", "replace")).hexdigest()[:16]


def operator() -> str:
    """Who runs this process (the OS account), for entries made by an admin command."""
    try:
        return getpass.getuser()
    except Exception:
        return f"uid:{os.getuid()}"


class AuditLog:
    """Appends entries under ``<data_dir>/audit/``."""

    def __init__(self, data_dir: Path) -> None:
        self.folder = data_dir / "audit"

    def write(self, event: str, **fields: Any) -> None:
        now = time.time()
        entry = {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)), "event": event}
        entry.update(fields)
        line = (json.dumps(entry, sort_keys=True, separators=(",", ":")) + "\n").encode()
        path = self.folder / time.strftime("audit-%Y%m.jsonl", time.gmtime(now))
        with _LOCK:
            ensure_dir(self.folder)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)

    def try_write(self, event: str, **fields: Any) -> bool:
        """:meth:`write` for the engine's own decisions: a failure is logged and False returned,
        so a full disk never stops the receiver or a pipeline (admin commands use ``write``,
        which must succeed before they act)."""
        try:
            self.write(event, **fields)
        except Exception as exc:
            log.error("could not write the audit entry %s: %s", event, type(exc).__name__)
            return False
        return True

    def entries(
        self, study_uid: str | None = None, since: str | None = None
    ) -> list[dict[str, Any]]:
        """Every entry, oldest first; with ``study_uid``, only those naming the study (its
        :func:`uid_token` as ``study``), found in the bytes before any line is parsed (a
        study's page reads a year of entries in milliseconds); with ``since`` (a day,
        ``YYYY-MM-DD``), the months before it are not read (the caller filters the days)."""
        out: list[dict[str, Any]] = []
        for path in self._files(since):
            raw = path.read_bytes()
            if study_uid is None:
                lines = raw.splitlines()
            else:
                lines = list(_lines_with(raw, f'"study":"{uid_token(study_uid)}"'.encode()))
            out += _parsed(path, lines)
        return out

    def latest(
        self, limit: int, keep: Callable[[dict[str, Any]], bool], since: str | None = None
    ) -> list[dict[str, Any]]:
        """The newest ``limit`` entries that ``keep`` accepts, oldest first. Read from the
        newest month back, stopping once there are enough: the API's default answer (the last
        500) costs the last month, not the whole history."""
        found: list[dict[str, Any]] = []
        for path in reversed(self._files(since)):
            for entry in reversed(_parsed(path, path.read_bytes().splitlines())):
                if keep(entry):
                    found.append(entry)
                    if len(found) >= limit:
                        return found[::-1]
        return found[::-1]

    def _files(self, since: str | None) -> list[Path]:
        """The monthly files, oldest first; from the month of day ``since`` on."""
        files = sorted(self.folder.glob("audit-*.jsonl"))
        if since:
            first = f"audit-{since[:4]}{since[5:7]}"
            files = [f for f in files if f.stem >= first]
        return files


def _parsed(path: Path, lines: list[bytes]) -> list[dict[str, Any]]:
    """The entries of ``lines``; a line that is not a JSON object (torn by a crash mid-write,
    or damaged) is left out and said in the log by file and count, never by content."""
    out: list[dict[str, Any]] = []
    bad = 0
    for line in lines:
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            entry = None
        if isinstance(entry, dict):
            out.append(entry)
        else:
            bad += 1
    if bad:
        log.warning("audit file %s: %d line(s) that are not JSON objects left out", path.name, bad)
    return out


def _lines_with(raw: bytes, mark: bytes) -> Iterator[bytes]:
    """The lines of ``raw`` that contain ``mark``, in order."""
    at = raw.find(mark)
    while at >= 0:
        start = raw.rfind(b"\n", 0, at) + 1
        end = raw.find(b"\n", at)
        end = len(raw) if end < 0 else end
        yield raw[start:end]
        at = raw.find(mark, end)
