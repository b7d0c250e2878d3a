"""Studies given to a project by an operator (``fiona ingest --project``), not by its routing.

An assigned route is a ``study_routes`` row like the one a coupling list makes (open, with the
research subject and event that carry into pseudonyms and REDCap), marked ``assigned``: the
scan then leaves the study's routing alone (no project's criteria are applied to it, so it is
neither claimed by another project nor held as unrouted or ambiguous) and completes it for the
project by the project's completeness rules, labels first, as for any study.

The route is written before the study's first instance is archived, so a scan running meanwhile
(``fiona serve``) never routes the study by the criteria first.
"""

from __future__ import annotations

import json
import time

from engine.store.db import Connection
from engine.store.index import Index

__all__ = ["ASSIGNED_REASON", "assign_study", "is_assigned"]

#: The reason an assigned route gives (``fiona explain``, the route's ``reasons``).
ASSIGNED_REASON = "assigned by fiona ingest --project"


def assign_study(
    index: Index,
    study_uid: str,
    project: str,
    *,
    subject: str = "",
    event: str = "",
    now: float | None = None,
) -> None:
    """Give ``study_uid`` (0020,000D) to ``project``; ``now`` in seconds since the epoch.

    Idempotent: assigning again keeps the route and its runs and updates the subject and event
    when given; instances that arrive later reopen the route as for any study (a follow-up).
    """
    now = time.time() if now is None else now
    with index.transaction() as db:
        db.execute(
            "INSERT INTO study_routes(study_uid, project, subject, event, reasons, opened_at,"
            " assigned) VALUES (?,?,?,?,?,?,1) ON CONFLICT(study_uid, project) DO UPDATE SET"
            " assigned=1, reasons=excluded.reasons,"
            " subject=CASE WHEN excluded.subject != '' THEN excluded.subject"
            " ELSE study_routes.subject END,"
            " event=CASE WHEN excluded.event != '' THEN excluded.event"
            " ELSE study_routes.event END",
            (study_uid, project, subject, event, json.dumps([ASSIGNED_REASON]), now),
        )


def is_assigned(db: Connection, study_uid: str) -> bool:
    """Whether the study has an assigned route (``db``: the index connection, held)."""
    row = db.execute(
        "SELECT 1 FROM study_routes WHERE study_uid=? AND assigned=1 LIMIT 1", (study_uid,)
    ).fetchone()
    return row is not None
