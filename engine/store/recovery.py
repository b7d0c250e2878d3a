"""What a crash can leave in the data folder, put right at start (before the port opens).

Every durable write (:func:`engine.store.fsio.write_durable`) goes through a hidden temp file
``.tmp-<pid>-<n>`` beside its target, renamed into place once fsynced; the receiver then commits
the instance to the index and only then answers Success. A SIGKILL or power cut can therefore
leave two kinds of leftovers:

- temp files (in archive series folders, ``work/``, ``quarantine/``...): never renamed, so
  nothing refers to them; removed, unless the process that wrote them still runs (a
  ``fiona ingest`` next to the service);
- orphans: ``archive/<Study>/<Series>/<SOP>.dcm`` files renamed into place but not in the
  index (the crash fell between the rename and the commit). The sender was never answered
  Success, but the bytes are whole (fsynced before the rename): they are filed again through
  :meth:`engine.store.archive.Archive.receive`, the path of every receipt, so they are indexed
  and routed like any other instance, or quarantined with a reason when unreadable. An orphan
  takes the origin (AE titles, peer) of the last indexed instance of its series or study, so a
  project routing by AE title still claims it; with none, its origin is ``recovery``.

Another fiona process may be writing to the same folder (a ``fiona ingest``): its temp files
carry a live pid and are kept, and a leftover younger than ``GRACE_SECONDS`` may be its file
between rename and commit, so the sweep first waits until every leftover it found is that old,
then looks again.

The walk reads every folder of the archive and the index of every series, which takes minutes
on a large archive, so it runs only when some writer did not stop cleanly. Each process that
writes to the data folder (``fiona serve``, ``fiona ingest``, ``fiona quarantine release``)
holds a :class:`WriterMark`, a file ``run/<pid>@<host>`` naming its process (pid and start
time), made before it writes anything and removed when it stops cleanly. A mark whose process is
gone is a crash: the next start sweeps, then removes the dead marks. A data folder shared by
nodes on several hosts (README, "Several nodes") holds marks of other hosts, whose processes
this host cannot see: they never count as crashes here (their own host's next start does). A
folder without ``run/`` (made by a version before the marks) is swept once; ``fiona serve
--sweep`` forces a sweep.

Only file counts are logged, never names (they are UIDs).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from engine.store.archive import Archive
from engine.store.fsio import write_durable
from engine.store.index import Index, Origin
from engine.store.nodes import process_alive

log = logging.getLogger(__name__)

__all__ = [
    "GRACE_SECONDS",
    "RECOVERY_ORIGIN",
    "RUN_DIR",
    "TEMP_NAME",
    "RecoveryReport",
    "WriterMark",
    "recover",
]

#: The temp files of :mod:`engine.store.fsio`: ``.tmp-<pid>-<counter>``.
TEMP_NAME = re.compile(r"^\.tmp-(\d+)-\d+$")
#: The origin of an orphan when nothing of its series or study is indexed.
RECOVERY_ORIGIN = Origin(via="recovery")
#: Seconds a leftover must be old before the sweep acts on it (a live writer's rename and
#: commit take milliseconds).
GRACE_SECONDS = 3.0
#: The folder (in the data folder) of the writers' marks.
RUN_DIR = "run"
_PROC = Path("/proc")


def _start_time(pid: int) -> str:
    """The start time of process ``pid`` in clock ticks since boot (field 22 of
    ``/proc/<pid>/stat``), so a reused pid is not taken for the process that wrote a mark;
    empty where it cannot be read."""
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return ""
    # Fields after the command name (which may hold ')' itself); field 3 is the first.
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else ""


def _mark_name(pid: int) -> str:
    """A writer mark's file name: ``<pid>@<host>``."""
    return f"{pid}@{socket.gethostname()}"


class WriterMark:
    """This process's mark ``run/<pid>@<host>`` in a data folder (see the module doc).

    ``unclean`` lists the marks of writers gone without a clean stop, found when the mark was
    made; ``first`` is true when the folder had no ``run/`` yet (an older version's folder, or
    a new one: a sweep of a new folder is instant).
    """

    def __init__(self, data_dir: Path) -> None:
        self.run_dir = data_dir / RUN_DIR
        self.first = not self.run_dir.is_dir()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        own = os.getpid()
        self.unclean = [m for m in self.run_dir.iterdir() if _dead_mark(m)]
        self.path = self.run_dir / _mark_name(own)
        write_durable(self.path, f"{_start_time(own)}\n".encode(), mode=0o644)
        self._open = True

    @property
    def sweep_needed(self) -> bool:
        """Whether a writer of this folder stopped without a clean stop (or may have)."""
        return self.first or bool(self.unclean)

    def forget_unclean(self) -> None:
        """Remove the dead writers' marks (once their leftovers are swept)."""
        for mark in self.unclean:
            if mark == self.path:
                continue  # an earlier process's mark under our pid, now ours
            with contextlib.suppress(FileNotFoundError):
                mark.unlink()
        self.unclean = []
        self.first = False

    def release(self) -> None:
        """The clean stop: remove this process's mark (idempotent)."""
        if self._open:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self._open = False


def _dead_mark(mark: Path) -> bool:
    """Whether ``mark`` (``run/<pid>@<host>``, or ``run/<pid>`` of an older version) names a
    process of this host that is gone: none runs under its pid, or the one that does started
    at another time (the pid was reused, ours included). Another host's mark: never."""
    number, _, host = mark.name.partition("@")
    if not number.isdigit() or (host and host != socket.gethostname()):
        return False
    pid = int(number)
    if not process_alive(pid):
        return True
    try:
        started = mark.read_text().strip()
    except OSError:
        return False
    return bool(started) and started != _start_time(pid)


@dataclass
class RecoveryReport:
    """Counts of what the start-up sweep found and did."""

    temp_removed: int = 0
    temp_in_use: int = 0
    orphans_indexed: int = 0
    orphans_quarantined: int = 0
    orphans_left: int = 0

    def summary(self) -> str:
        return (
            f"{self.temp_removed} temp files removed"
            f" ({self.temp_in_use} of running processes kept),"
            f" {self.orphans_indexed} unindexed archive files indexed,"
            f" {self.orphans_quarantined} quarantined,"
            f" {self.orphans_left} left in place (could not be filed)"
        )


@dataclass
class _Found:
    """Leftovers found by the walk: temp files with their writer's pid, orphan names per
    series folder (relative to the data folder), and the newest modification time seen."""

    temps: list[tuple[str, int]] = field(default_factory=list)
    orphans: dict[str, list[str]] = field(default_factory=dict)
    newest: float = 0.0

    def saw(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.newest = max(self.newest, os.lstat(path).st_mtime)


def recover(
    archive: Archive,
    mark: WriterMark | None = None,
    grace: float = GRACE_SECONDS,
    force: bool = False,
) -> RecoveryReport | None:
    """Sweep temp files and file orphans under ``archive.data_dir``; log one line of counts.

    With this process's ``mark``, sweep only when it found a writer gone without a clean stop
    or when ``force`` (None returned when it does not), then forget those writers; without a
    mark, always sweep. Call it before anything else writes to the data folder (the SCP, the
    jobs).
    """
    if mark is not None and not (force or mark.sweep_needed):
        log.info("start-up sweep skipped: every earlier writer of the data folder stopped cleanly")
        return None
    report = _sweep(archive, grace)
    if mark is not None:
        mark.forget_unclean()
    return report


def _sweep(archive: Archive, grace: float) -> RecoveryReport:
    """The sweep itself (see :func:`recover`)."""
    report = RecoveryReport()
    found = _walk(archive.data_dir, archive.index)
    wait = found.newest + grace - time.time()
    if wait > 0:
        time.sleep(min(wait, grace))
    own = os.getpid()
    for path, pid in found.temps:
        if pid != own and process_alive(pid):
            report.temp_in_use += 1
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            report.temp_removed += 1
    for series_dir, names in sorted(found.orphans.items()):
        known = _indexed_paths(archive.index, os.path.basename(series_dir))
        left = [n for n in names if f"{series_dir}/{n}" not in known]
        origin = _origin_of(archive.index, series_dir) if left else RECOVERY_ORIGIN
        for name in left:
            _file_orphan(archive, f"{series_dir}/{name}", origin, report)
    level = logging.WARNING if report.orphans_left else logging.INFO
    log.log(level, "start-up sweep of the data folder: %s", report.summary())
    return report


def _walk(data_dir: Path, index: Index) -> _Found:
    """One walk of the data folder (symlinks not followed)."""
    found = _Found()
    root = os.fspath(data_dir)
    for folder, _dirs, files in os.walk(root):
        rel = os.path.relpath(folder, root)
        for name in files:
            match = TEMP_NAME.match(name)
            if match is not None:
                path = os.path.join(folder, name)
                found.temps.append((path, int(match.group(1))))
                found.saw(path)
        parts = rel.split(os.sep)
        if len(parts) == 3 and parts[0] == "archive":
            dcm = sorted(n for n in files if n.endswith(".dcm") and not n.startswith("."))
            known = _indexed_paths(index, parts[2])
            orphans = [n for n in dcm if f"{rel}/{n}" not in known]
            if orphans:
                found.orphans["/".join(parts)] = orphans
                for name in orphans:
                    found.saw(os.path.join(folder, name))
    return found


def _indexed_paths(index: Index, series_uid: str) -> set[str]:
    """Paths (relative to the data folder) of the indexed instances of a series."""
    with index.reading() as db:
        rows = db.execute(
            "SELECT i.path FROM instances i JOIN series s ON s.id = i.series_ref"
            " WHERE s.series_uid = ?",
            (series_uid,),
        ).fetchall()
    return {str(r[0]) for r in rows}


def _origin_of(index: Index, series_dir: str) -> Origin:
    """The origin of the last indexed instance of the folder's series, else of its study."""
    _, study_uid, series_uid = series_dir.split("/")
    columns = "i.via, i.calling_ae, i.called_ae, i.peer_ip"
    with index.reading() as db:
        row = db.execute(
            f"SELECT {columns} FROM instances i JOIN series s ON s.id = i.series_ref"
            " WHERE s.series_uid = ? ORDER BY i.id DESC LIMIT 1",
            (series_uid,),
        ).fetchone()
        if row is None:
            row = db.execute(
                f"SELECT {columns} FROM instances i JOIN series s ON s.id = i.series_ref"
                " JOIN studies st ON st.id = s.study_ref WHERE st.study_uid = ?"
                " ORDER BY i.id DESC LIMIT 1",
                (study_uid,),
            ).fetchone()
    return RECOVERY_ORIGIN if row is None else Origin(*map(str, row))


def _file_orphan(archive: Archive, rel: str, origin: Origin, report: RecoveryReport) -> None:
    """File one orphan through the archive; drop the orphan's own copy when its bytes are now
    archived elsewhere (other UIDs than its name says) or in the quarantine."""
    path = archive.data_dir / rel
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return  # its writer (or a retention run) dealt with it meanwhile
    except OSError as exc:
        log.error("start-up sweep: cannot read an unindexed archive file: %s", exc.strerror)
        report.orphans_left += 1
        return
    outcome = archive.receive(data, origin)
    if outcome.action == "rejected":
        report.orphans_left += 1
        return
    if outcome.action == "quarantined":
        report.orphans_quarantined += 1
    else:
        report.orphans_indexed += 1
    if rel not in _indexed_paths(archive.index, Path(rel).parent.name):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
