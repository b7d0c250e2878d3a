"""Retention: delete a study's files once every project it went to has finished with it.

A study is **finished** when it was routed to at least one project and, for every project:
the route is complete with every instance handed to a pipeline run, every run is ``done``, every
transfer of the study is ``done``, and no quarantine item of the study is held. A study no project
claimed (unrouted) is never finished, so it is never deleted here: a person decides about it.

Two passes (every ``retention.interval_seconds``):

1. **age**: a finished study goes once the longest ``retention.keep_days`` of its projects has
   passed since it finished (its last transfer, run or instance, whichever is latest). A study
   whose project file is gone or invalid waits: its keep_days are unknown.
2. **watermark**: while the data folder has less than ``retention.min_free_percent`` free,
   finished studies go oldest first, whatever their keep_days. Unfinished ones never do; when
   nothing finished is left, that is logged at ERROR (someone must act).

Deleting removes ``archive/<StudyUID>``, its ``raw/`` and ``participants/`` links and the
``work/<project>/run-<id>`` copies of its runs, fsyncs the parent folders, writes an audit entry
``deleted`` (the study as a :func:`~engine.store.audit.uid_token`) and sets
``studies.deleted_at``; the index rows stay as the record of what was received.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from engine.config.model import ProjectConfig
from engine.manage.heartbeat import disk_usage
from engine.projects import load_projects
from engine.store.archive import safe_component
from engine.store.audit import AuditLog, uid_token
from engine.store.db import IndexUnavailable
from engine.store.fsio import fsync_dir
from engine.store.index import Index
from engine.store.quarantine_policy import expired_items, policies_of, purge

log = logging.getLogger(__name__)

__all__ = [
    "DAY",
    "DEFAULT_KEEP_DAYS",
    "Finished",
    "RetentionJob",
    "delete_study",
    "evict",
    "expire",
    "finished_studies",
    "keep_days_of",
]

DAY = 86400.0
#: ``retention.keep_days`` of a project file that does not say (schemas/project.schema.json).
DEFAULT_KEEP_DAYS = 30.0


@dataclass(frozen=True)
class Finished:
    """A study every project has finished with; ``finished_at`` in seconds since the epoch."""

    study_uid: str
    study_id: int
    patient_id: str
    projects: tuple[str, ...]
    finished_at: float
    max_instance: int  # instances.id of its newest instance when it was found finished


_FINISHED_SQL = """
SELECT st.study_uid, st.id, p.patient_id,
       (SELECT group_concat(r.project, char(31)) FROM study_routes r
         WHERE r.study_uid = st.study_uid),
       max(st.last_received_at,
           coalesce((SELECT max(t.finished_at) FROM transfers t
                      WHERE t.study_uid = st.study_uid), 0),
           coalesce((SELECT max(r.updated_at) FROM pipeline_runs r
                      WHERE r.study_uid = st.study_uid), 0)) AS finished_at,
       (SELECT max(i.id) FROM instances i JOIN series se ON se.id = i.series_ref
         WHERE se.study_ref = st.id) AS newest
FROM studies st JOIN patients p ON p.id = st.patient_ref
WHERE st.deleted_at IS NULL
  AND EXISTS (SELECT 1 FROM study_routes r WHERE r.study_uid = st.study_uid)
  AND NOT EXISTS (SELECT 1 FROM study_routes r WHERE r.study_uid = st.study_uid
                   AND (r.state != 'complete' OR r.runs = 0 OR r.done_upto <
                        (SELECT max(i.id) FROM instances i JOIN series se ON se.id = i.series_ref
                          WHERE se.study_ref = st.id)))
  AND NOT EXISTS (SELECT 1 FROM pipeline_runs r WHERE r.study_uid = st.study_uid
                   AND r.state != 'done')
  AND NOT EXISTS (SELECT 1 FROM transfers t WHERE t.study_uid = st.study_uid AND t.state != 'done')
  AND NOT EXISTS (SELECT 1 FROM quarantine q WHERE q.study_uid = st.study_uid AND q.state = 'held')
ORDER BY finished_at, st.id
"""


def finished_studies(index: Index) -> list[Finished]:
    """Every finished study still on disk, the one that finished first first."""
    with index.reading() as db:
        rows = db.execute(_FINISHED_SQL).fetchall()
    return [
        Finished(
            uid,
            int(sid),
            str(pid),
            tuple(sorted(str(projects).split("\x1f"))),
            float(at),
            int(newest or 0),
        )
        for uid, sid, pid, projects, at, newest in rows
    ]


def keep_days_of(projects: Iterable[ProjectConfig]) -> dict[str, float]:
    """``retention.keep_days`` per project name (the schema default when a file does not say)."""
    out = {}
    for project in projects:
        section = project.raw.get("retention")
        days = section.get("keep_days") if isinstance(section, dict) else None
        out[project.name] = DEFAULT_KEEP_DAYS if days is None else float(days)
    return out


# -------------------------------------------------------------------------- deleting one study


def _remove_tree(path: Path) -> bool:
    """Remove a folder (or a link to one) and fsync its parent; True when something was there."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
    else:
        return False
    fsync_dir(path.parent)
    return True


def _remove_participant_link(data_dir: Path, patient_id: str, study_uid: str) -> None:
    """The ``participants/<PatientID>/<when>`` link to the study (and the folder, when empty)."""
    folder = data_dir / "participants" / safe_component(patient_id)
    target = str(Path("../..") / "archive" / study_uid)
    if not folder.is_dir():
        return
    for link in folder.iterdir():
        if link.is_symlink() and os.readlink(link) == target:
            _remove_tree(link)
    if not any(folder.iterdir()):
        folder.rmdir()
        fsync_dir(folder.parent)


def _run_folders(index: Index, data_dir: Path, study_uid: str) -> list[Path]:
    """The de-identified work copies of the study's runs (``work/<project>/run-<id>``)."""
    with index.reading() as db:
        rows = db.execute(
            "SELECT id, project FROM pipeline_runs WHERE study_uid=?", (study_uid,)
        ).fetchall()
    return [data_dir / "work" / str(project) / f"run-{run_id}" for run_id, project in rows]


def _newest_instance(index: Index, study_id: int) -> int:
    with index.reading() as db:
        row = db.execute(
            "SELECT max(i.id) FROM instances i JOIN series se ON se.id = i.series_ref"
            " WHERE se.study_ref=?",
            (study_id,),
        ).fetchone()
    return int(row[0] or 0)


def delete_study(
    index: Index, data_dir: Path, audit: AuditLog, study: Finished, reason: str
) -> bool:
    """Delete one finished study's files and mark it deleted; False when it changed meanwhile.

    The study folder is first renamed aside (atomic): an instance the receiver files after that
    lands in a new folder and survives; one indexed between the scan and the rename makes the
    rename go back, and the study waits for the next run.
    """
    archive = data_dir / "archive"
    live = archive / study.study_uid
    aside = archive / f".deleting-{study.study_uid}"
    if live.is_dir():
        os.rename(live, aside)
        fsync_dir(archive)
        if _newest_instance(index, study.study_id) != study.max_instance:
            os.rename(aside, live)
            fsync_dir(archive)
            log.info("retention: study %s received instances; kept", uid_token(study.study_uid))
            return False
    # Audited before the files go (like every audited action): a crash after this line
    # leaves the entry and the deletion is finished by the next run.
    audit.write(
        "deleted", study=uid_token(study.study_uid), reason=reason, projects=list(study.projects)
    )
    _remove_tree(data_dir / "raw" / study.study_uid)
    _remove_participant_link(data_dir, study.patient_id, study.study_uid)
    for folder in _run_folders(index, data_dir, study.study_uid):
        _remove_tree(folder)
    _remove_tree(aside)
    with index.transaction() as db:
        db.execute(
            "UPDATE studies SET deleted_at=?, deleted_reason=? WHERE id=?",
            (time.time(), reason, study.study_id),
        )
    log.info("retention: deleted study %s (%s)", uid_token(study.study_uid), reason)
    return True


# -------------------------------------------------------------------------- the two passes


def expire(
    index: Index,
    data_dir: Path,
    audit: AuditLog,
    keep_days: Mapping[str, float],
    now: float | None = None,
) -> list[str]:
    """Delete finished studies whose projects' longest keep_days has passed; their UIDs."""
    now = time.time() if now is None else now
    deleted = []
    for study in finished_studies(index):
        if any(p not in keep_days for p in study.projects):
            continue  # a project we cannot read: its keep_days are unknown, so wait
        keep = max(keep_days[p] for p in study.projects) * DAY
        if now - study.finished_at >= keep and delete_study(index, data_dir, audit, study, "age"):
            deleted.append(study.study_uid)
    return deleted


def evict(
    index: Index,
    data_dir: Path,
    audit: AuditLog,
    min_free_percent: float,
    free_percent: Callable[[], float],
) -> list[str]:
    """Below the watermark, delete finished studies oldest first until above it; their UIDs.

    ``free_percent`` measures the data folder's free disk (0-100) after each deletion.
    """
    deleted: list[str] = []
    if min_free_percent <= 0 or free_percent() >= min_free_percent:
        return deleted
    for study in finished_studies(index):
        if delete_study(index, data_dir, audit, study, "watermark"):
            deleted.append(study.study_uid)
        if free_percent() >= min_free_percent:
            log.warning(
                "retention: disk below %.1f%% free; evicted %d sent studies",
                min_free_percent,
                len(deleted),
            )
            return deleted
    log.error(
        "retention: disk still below %.1f%% free after evicting %d studies; nothing sent is "
        "left to evict (the rest is unsent, held or unrouted)",
        min_free_percent,
        len(deleted),
    )
    return deleted


class RetentionJob:
    """The scheduled retention run; reads the projects' keep_days afresh each time."""

    def __init__(
        self, site_data_dir: Path, projects_dir: Path, index: Index, min_free_percent: float
    ) -> None:
        self.data_dir = site_data_dir
        self.projects_dir = projects_dir
        self.index = index
        self.min_free_percent = min_free_percent
        self.audit = AuditLog(site_data_dir)

    def _free_percent(self) -> float:
        return disk_usage(self.data_dir).free_percent

    def _purge_quarantine(self, projects: list[ProjectConfig]) -> None:
        """Released and discarded quarantine items past their project's ``keep_days``."""
        expired = expired_items(self.index, time.time(), policies_of(projects))
        if expired:
            purged = purge(self.index, self.data_dir, expired)
            log.info("purged %d expired quarantine items", purged)

    def __call__(self) -> None:
        try:
            # Every valid project, enabled or not: a disabled project's studies keep its rules.
            projects, _ = load_projects(self.projects_dir)
            expire(self.index, self.data_dir, self.audit, keep_days_of(projects))
            evict(self.index, self.data_dir, self.audit, self.min_free_percent, self._free_percent)
            self._purge_quarantine(projects)
        except IndexUnavailable:
            raise  # fiona serve's WaitsForIndex waits for it, quietly
        except Exception:
            log.exception("retention run failed; trying again next interval")
