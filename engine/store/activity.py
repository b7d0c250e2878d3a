"""Received and sent per hour over the last day, and per project, counted live from the index.

Hours are whole UTC hours: the last bucket is the current hour (so far), the first the hour
23 hours before it. Received counts instances indexed (``instances.received_at``, whether by
C-STORE or ``fiona ingest``); sent counts instances delivered (``transfer_items.sent_at``) and
transfers finished as done (``transfers.finished_at``). Counts only: no UIDs, no header values.
Each count is a range scan of one index of migration 0012.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from engine.store.index import Index

__all__ = ["HOURS", "hourly_activity", "project_counts", "project_last_times"]

#: Buckets returned: one day of whole hours.
HOURS = 24

_COUNTS = {
    "received": "SELECT CAST((received_at - ?) / 3600 AS INTEGER), count(*) FROM instances"
    " WHERE received_at >= ? AND received_at < ? GROUP BY 1",
    "sent_instances": "SELECT CAST((sent_at - ?) / 3600 AS INTEGER), count(*) FROM transfer_items"
    " WHERE sent_at >= ? AND sent_at < ? GROUP BY 1",
    "sent_transfers": "SELECT CAST((finished_at - ?) / 3600 AS INTEGER), count(*) FROM transfers"
    " WHERE finished_at >= ? AND finished_at < ? AND +state = 'done' GROUP BY 1",
}


def _hour(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:00Z")


def hourly_activity(index: Index, now: float) -> list[dict[str, Any]]:
    """The last :data:`HOURS` whole UTC hours up to ``now`` (seconds since the epoch), oldest
    first: ``{"hour": "2026-01-31T12:00Z", "received": n, "sent_instances": n,
    "sent_transfers": n}``."""
    start = (int(now) // 3600 - (HOURS - 1)) * 3600
    end = start + HOURS * 3600
    out = [{"hour": _hour(start + i * 3600), **dict.fromkeys(_COUNTS, 0)} for i in range(HOURS)]
    with index.reading() as db:
        for key, sql in _COUNTS.items():
            for bucket, n in db.execute(sql, (start, start, end)):
                if 0 <= bucket < HOURS:
                    out[bucket][key] = int(n)
    return out


#: Per project: each query one pass over one index of migration 0012. SQLite has no statistics
#: here (fiona never runs ANALYZE), so CROSS JOIN keeps it on those indexes.
_PROJECT_COUNTS = {
    ("received", "complete"): "SELECT project, count(*),"
    " sum(CASE WHEN state = 'complete' THEN 1 ELSE 0 END) FROM study_routes GROUP BY project",
    ("in_pipeline",): "SELECT project, count(DISTINCT study_uid) FROM pipeline_runs"
    " WHERE state IN ('pending','running') GROUP BY project",
    ("quarantined",): "SELECT project, count(DISTINCT study_uid) FROM quarantine"
    " WHERE state='held' AND project != '' GROUP BY project",
    ("deleted",): "SELECT r.project, count(*) FROM studies st CROSS JOIN study_routes r"
    " ON r.study_uid = st.study_uid WHERE st.deleted_at IS NOT NULL GROUP BY r.project",
}
_KEYS = ("received", "complete", "in_pipeline", "sent", "quarantined", "deleted")

# Per project, each a range of one index. A study is sent to a project when it has transfers
# and all of them are done (grouped in the index's order, no sort).
_SENT = (
    "SELECT count(*) FROM (SELECT 1 FROM transfers WHERE project = ? GROUP BY study_uid"
    " HAVING sum(CASE WHEN state != 'done' THEN 1 ELSE 0 END) = 0) AS sent"
)
# The newest study routed to the project: read newest first, stopping at the first match.
_LAST_RECEIPT = (
    "SELECT st.last_received_at FROM studies st WHERE EXISTS (SELECT 1 FROM study_routes r"
    " WHERE r.study_uid = st.study_uid AND r.project = ?)"
    " ORDER BY st.last_received_at DESC LIMIT 1"
)
_LAST_SEND = "SELECT max(finished_at) FROM transfers WHERE project = ? AND state = 'done'"
# Projects with a route; every transfer comes from a run of a route, and routes are kept.
_PROJECTS = "SELECT project FROM study_routes GROUP BY project"


def project_counts(index: Index) -> dict[str, dict[str, int]]:
    """Per project (by name): studies routed to it (``received``), ``complete``, in pipeline,
    ``sent`` (every transfer done), ``quarantined`` (held) and ``deleted`` by retention."""
    out: dict[str, dict[str, int]] = {}
    with index.reading() as db:
        for keys, sql in _PROJECT_COUNTS.items():
            for project, *counts in db.execute(sql):
                row = out.setdefault(str(project), dict.fromkeys(_KEYS, 0))
                row.update({k: int(n) for k, n in zip(keys, counts, strict=True)})
        for project, row in out.items():
            row["sent"] = int(db.execute(_SENT, (project,)).fetchone()[0])
    return out


def project_last_times(index: Index) -> dict[str, tuple[float | None, float | None]]:
    """Per project: (the last receipt of a study routed to it, its last finished transfer),
    seconds since the epoch or None."""
    with index.reading() as db:
        projects = [str(p) for (p,) in db.execute(_PROJECTS)]
        return {
            p: (
                db.execute(_LAST_RECEIPT, (p,)).fetchone()[0],
                db.execute(_LAST_SEND, (p,)).fetchone()[0],
            )
            for p in projects
        }
