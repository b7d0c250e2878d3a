"""What needs a person: held quarantine items, dead-lettered transfers, invalid project files.

Read live from the index and the projects folder (``fiona status``, the web's dashboard,
``/status.json`` and ``/metrics`` call these at request time). None of these make the service
unhealthy: it keeps working around them, but each stays until someone acts (``fiona
quarantine``, ``fiona transfers retry``, fixing the file that ``fiona validate`` names).

Counts, reason codes, project and destination names, transfer ids and file paths only: no UIDs,
no header values (a transfer's last error never quotes one).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from engine.config.issues import ConfigIssue
from engine.config.loader import project_files
from engine.config.model import ProjectConfig
from engine.manage.heartbeat import iso
from engine.store.index import Index

__all__ = [
    "MAX_LISTED",
    "attention",
    "dead_letters",
    "invalid_projects",
    "loaded_projects",
    "projects_signature",
    "quarantine_summary",
]

#: Dead letters listed one by one (all are counted).
MAX_LISTED = 20


def quarantine_summary(index: Index) -> dict[str, Any]:
    """Held items and the studies they belong to (total, by reason, by project and reason),
    and how many items were resolved (released or discarded)."""
    with index.reading() as db:
        total = db.execute(
            "SELECT count(*), count(DISTINCT study_uid) FROM quarantine WHERE state='held'"
        ).fetchone()
        resolved = db.execute("SELECT count(*) FROM quarantine WHERE state!='held'").fetchone()[0]
        groups = db.execute(
            "SELECT project, reason, count(*), count(DISTINCT study_uid) FROM quarantine"
            " WHERE state='held' GROUP BY project, reason ORDER BY project, reason"
        ).fetchall()
    by_reason: dict[str, int] = {}
    for _, reason, items, _ in groups:
        by_reason[reason] = by_reason.get(reason, 0) + int(items)
    return {
        "held_items": int(total[0]),
        "held_studies": int(total[1]),
        "resolved_items": int(resolved),
        "by_reason": dict(sorted(by_reason.items())),
        "groups": [
            {"project": p, "reason": r, "items": int(n), "studies": int(s)} for p, r, n, s in groups
        ],
    }


def dead_letters(index: Index) -> tuple[int, list[dict[str, Any]]]:
    """(how many transfers were given up, the newest ``MAX_LISTED`` of them)."""
    with index.reading() as db:
        count = db.execute("SELECT count(*) FROM transfers WHERE state='failed'").fetchone()[0]
        rows = db.execute(
            "SELECT id, project, destination, attempts, last_error, updated_at FROM transfers"
            " WHERE state='failed' ORDER BY updated_at DESC, id DESC LIMIT ?",
            (MAX_LISTED,),
        ).fetchall()
    listed = [
        {
            "id": int(id_),
            "project": project,
            "destination": destination,
            "attempts": int(attempts),
            "last_error": error,
            "failed_at": iso(at),
        }
        for id_, project, destination, attempts, error, at in rows
    ]
    return int(count), listed


_projects_cache: dict[Path, tuple[tuple[tuple[str, int], ...], Any]] = {}
_projects_lock = threading.Lock()


def projects_signature(folder: Path) -> tuple[tuple[str, int], ...]:
    """Names and modification times of the folder and its project files."""
    try:
        stamps = [(f.name, f.stat().st_mtime_ns) for f in project_files(folder)]
        return ((str(folder), folder.stat().st_mtime_ns), *stamps)
    except OSError:
        return ()


def loaded_projects(projects_dir: Path) -> tuple[list[ProjectConfig], list[ConfigIssue]]:
    """Every project file's project and the issues of the invalid ones
    (:func:`engine.projects.load_projects`), read again only when a project file changed
    (its name or modification time; a rule set or key file a project names is read when the
    project is). The status, the dashboard and every web request ask for them."""
    # Imported here: every layer's checks come with it (pynetdicom, paramiko, PyCap), which
    # `fiona status` pays only when it reads the project files.
    from engine.projects import load_projects

    signature = projects_signature(projects_dir)
    with _projects_lock:
        cached = _projects_cache.get(projects_dir)
        if cached is not None and signature and cached[0] == signature:
            return cached[1]  # type: ignore[no-any-return]
        found = load_projects(projects_dir)
        _projects_cache[projects_dir] = (signature, found)
        return found


def invalid_projects(projects_dir: Path) -> list[dict[str, Any]]:
    """Each project file left out for being invalid: ``{"file", "problems"}`` (a missing
    projects folder is one entry). Reloaded only when a file changed."""
    _, issues = loaded_projects(projects_dir)
    by_file: dict[str, list[str]] = {}
    for issue in issues:
        by_file.setdefault(str(issue.file), []).append(str(issue))
    return [{"file": f, "problems": p} for f, p in sorted(by_file.items())]


def attention(
    index: Index, projects_dir: Path, quarantine: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Everything that needs a person, counted and listed; ``needed`` when anything does.
    ``quarantine``: :func:`quarantine_summary` when the caller has it already."""
    quarantine = quarantine_summary(index) if quarantine is None else quarantine
    dead_count, dead_listed = dead_letters(index)
    invalid = invalid_projects(projects_dir)
    counts = {
        "quarantine_held_items": quarantine["held_items"],
        "quarantine_held_studies": quarantine["held_studies"],
        "dead_letters": dead_count,
        "invalid_projects": len(invalid),
    }
    return {
        "needed": bool(quarantine["held_items"] or dead_count or invalid),
        "counts": counts,
        "quarantine": quarantine["groups"],
        "dead_letters": dead_listed,
        "invalid_projects": invalid,
    }
