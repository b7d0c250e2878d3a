"""The study list and a study's index rows, for the web API (``GET /api/v1/studies``).

Rows are plain dicts. Patient Name (0010,0010), Patient ID (0010,0020), Patient's Birth Date
(0010,0030), Accession Number (0008,0050) and the free-text descriptions (which PS3.15's basic
profile removes) are under ``"phi"`` keys; callers drop those keys for users without the PHI
grant. Dates are DICOM dates (YYYYMMDD); times seconds since the epoch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from engine.store.audit import uid_token
from engine.store.index import Index

__all__ = ["STUDY_STATES", "StudyFilter", "find_studies", "study_rows"]

#: A study's state as the list shows and filters it, from its routes: ``deleted`` by
#: retention; ``complete`` when a project's route is complete (its pipeline ran or runs);
#: ``receiving`` when routed but still arriving; ``unrouted`` when no project claims it (yet).
STUDY_STATES = ("receiving", "complete", "unrouted", "deleted")
_STATE = (
    "(CASE WHEN st.deleted_at IS NOT NULL THEN 'deleted'"
    " WHEN EXISTS (SELECT 1 FROM study_routes r WHERE r.study_uid = st.study_uid"
    " AND +r.state = 'complete') THEN 'complete'"  # '+': by the study's routes, not by state
    " WHEN EXISTS (SELECT 1 FROM study_routes r WHERE r.study_uid = st.study_uid)"
    " THEN 'receiving' ELSE 'unrouted' END)"
)
_LIVE = "st.deleted_at IS NULL AND "
_COMPLETE = "SELECT study_uid FROM study_routes WHERE state = 'complete'"
#: Each state as a condition the indexes answer (the same as :data:`_STATE`, row by row).
_STATE_WHERE = {
    "deleted": "st.deleted_at IS NOT NULL",
    "complete": f"{_LIVE}st.study_uid IN ({_COMPLETE})",
    "receiving": f"{_LIVE}st.study_uid IN (SELECT study_uid FROM study_routes"
    f" WHERE state != 'complete') AND st.study_uid NOT IN ({_COMPLETE})",
    "unrouted": f"{_LIVE}st.study_uid NOT IN (SELECT study_uid FROM study_routes)",
}
_SELECT = (
    f"SELECT st.study_uid, st.study_date, st.description, st.n_instances, {_STATE},"
    " st.first_received_at, st.last_received_at, st.deleted_at,"
    " p.patient_name, p.patient_id, p.birth_date, st.accession_number,"
    " (SELECT group_concat(DISTINCT se.modality) FROM series se WHERE se.study_ref = st.id),"
    " (SELECT count(*) FROM series se WHERE se.study_ref = st.id),"
    " (SELECT group_concat(r.project) FROM study_routes r WHERE r.study_uid = st.study_uid)"
    " FROM studies st JOIN patients p ON p.id = st.patient_ref"
)


@dataclass(frozen=True)
class StudyFilter:
    """What the study list is filtered by; None or empty: no filter.

    ``projects`` limits to studies routed to one of them (a user's grants); ``project`` to
    one; ``date_from``/``date_to`` are Study Date (0008,0020) bounds, YYYYMMDD, inclusive;
    ``text`` matches the study description or UID (and, with ``phi``, the patient's name or
    ID and the accession number).
    """

    projects: Sequence[str] | None = None
    project: str | None = None
    state: str | None = None
    modality: str | None = None
    date_from: str | None = None
    date_to: str | None = None
    text: str | None = None
    phi: bool = False


def _where(f: StudyFilter) -> tuple[str, list[Any]]:
    """The WHERE clause and its arguments. Projects and modalities are ``IN`` lists of their
    indexes (migration 0012). A project's studies are a set each study is tested against
    ("+": never a lookup per routed study, which SQLite, without statistics, would otherwise
    nest inside the modality's list), so a page reads the newest studies first and stops at
    its end."""
    clauses: list[str] = []
    args: list[Any] = []
    routed = "+st.study_uid IN (SELECT r.study_uid FROM study_routes r WHERE "
    if f.projects is not None:
        marks = ",".join("?" * len(f.projects)) or "NULL"
        clauses.append(routed + f"r.project IN ({marks}))")
        args += list(f.projects)
    if f.project:
        clauses.append(routed + "r.project = ?)")
        args.append(f.project)
    if f.state:
        clauses.append(_STATE_WHERE.get(f.state, "0"))
    if f.modality:
        clauses.append("st.id IN (SELECT se.study_ref FROM series se WHERE se.modality = ?)")
        args.append(f.modality)
    if f.date_from:
        clauses.append("st.study_date >= ?")
        args.append(f.date_from)
    if f.date_to:
        clauses.append("st.study_date <= ?")
        args.append(f.date_to)
    if f.text:
        fields = ["st.description", "st.study_uid"]
        if f.phi:
            fields += ["p.patient_name", "p.patient_id", "st.accession_number"]
        clauses.append("(" + " OR ".join(f"{c} LIKE ?" for c in fields) + ")")
        args += [f"%{f.text}%"] * len(fields)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", args


def _routes_count(f: StudyFilter) -> tuple[str, list[Any]] | None:
    """The count of a filter by projects alone, from the routes' index (every route is of an
    indexed study); None for any other filter."""
    if f.state or f.modality or f.date_from or f.date_to or f.text:
        return None
    if f.projects is None and not f.project:
        return None
    clauses, args = [], []
    if f.projects is not None:
        clauses.append(f"project IN ({','.join('?' * len(f.projects)) or 'NULL'})")
        args += list(f.projects)
    if f.project:
        clauses.append("project = ?")
        args.append(f.project)
    where = " AND ".join(clauses)
    return f"SELECT count(DISTINCT study_uid) FROM study_routes WHERE {where}", args


def _row(r: Sequence[Any]) -> dict[str, Any]:
    return {
        "study_uid": r[0],
        "token": uid_token(str(r[0])),
        "study_date": r[1],
        "instances": r[3],
        "state": r[4],
        "first_received_at": r[5],
        "last_received_at": r[6],
        "deleted_at": r[7],
        "phi": {
            "patient_name": r[8],
            "patient_id": r[9],
            "birth_date": r[10],
            "accession_number": r[11],
            "description": r[2],  # Study Description (0008,1030): free text, PS3.15 removes it
        },
        "modalities": sorted(str(r[12]).split(",")) if r[12] else [],
        "series": r[13],
        "projects": sorted(str(r[14]).split(",")) if r[14] else [],
    }


def find_studies(
    index: Index, f: StudyFilter, *, limit: int = 50, offset: int = 0
) -> tuple[int, list[dict[str, Any]]]:
    """The total matching ``f`` and one page of them, the last received first.

    The page's studies are chosen first and only they get their modalities, series and
    projects (the subqueries of each row), so a filter matching many studies costs one pass
    over an index, not a subquery per match."""
    where, args = _where(f)
    # Patients are joined only when the text searches their names and IDs.
    matched = "studies st" + (" JOIN patients p ON p.id = st.patient_ref" if "p." in where else "")
    order = " ORDER BY st.last_received_at DESC, st.id DESC"
    page = f"SELECT st.id FROM {matched}{where}{order} LIMIT ? OFFSET ?"
    count = _routes_count(f) or (f"SELECT count(*) FROM {matched}{where}", args)
    with index.reading() as db:
        (total,) = db.execute(*count).fetchone()
        rows = db.execute(
            f"{_SELECT} WHERE st.id IN ({page}){order}", [*args, limit, offset]
        ).fetchall()
    return int(total), [_row(r) for r in rows]


def study_rows(index: Index, study_uid: str) -> dict[str, Any] | None:
    """One study (as a :func:`find_studies` row) with its series (labels included) and routes;
    None when the index has no such study."""
    with index.reading() as db:
        row = db.execute(_SELECT + " WHERE st.study_uid = ?", (study_uid,)).fetchone()
        if row is None:
            return None
        series = db.execute(
            "SELECT se.series_uid, se.modality, se.series_number, se.description,"
            " se.n_instances, se.labels FROM series se JOIN studies st ON st.id = se.study_ref"
            " WHERE st.study_uid = ? ORDER BY se.series_number, se.id",
            (study_uid,),
        ).fetchall()
        routes = db.execute(
            "SELECT project, subject, event, reasons, state, opened_at, completed_at, assigned"
            " FROM study_routes WHERE study_uid = ? ORDER BY project",
            (study_uid,),
        ).fetchall()
    out = _row(row)
    out["series_list"] = [
        {
            "series_uid": s[0],
            "modality": s[1],
            "series_number": s[2],
            "phi": {"description": s[3]},  # Series Description (0008,103E): free text
            "instances": s[4],
            "labels": json.loads(s[5] or "[]"),
        }
        for s in series
    ]
    out["routes"] = [
        {
            "project": r[0],
            "subject": r[1],
            "event": r[2],
            "reasons": json.loads(r[3] or "[]"),
            "state": r[4],
            "opened_at": r[5],
            "completed_at": r[6],
            "assigned": bool(r[7]),
        }
        for r in routes
    ]
    return out
