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
#: here (fiona never runs ANALYZE), so "+column" and CROSS JOIN keep it on those indexes.
_PROJECT_COUNTS = {
    ("received", "complete"): "SELECT project, count(*), sum(state = 'complete')"
    " FROM study_routes GROUP BY project",
    ("in_pipeline",): "SELECT project, count(DISTINCT study_uid) FROM pipeline_runs"
    " WHERE state IN ('pending','running') GROUP BY project",
    # A study is sent to a project when it has transfers and all of them are done.
    ("sent",): "SELECT project, count(DISTINCT study_uid)"
    " - count(DISTINCT CASE WHEN state != 'done' THEN study_uid END) FROM transfers"
    " GROUP BY project",
    ("quarantined",): "SELECT project, count(DISTINCT study_uid) FROM quarantine"
    " WHERE state='held' AND project != '' GROUP BY project",
    ("deleted",): "SELECT r.project, count(*) FROM studies st CROSS JOIN study_routes r"
    " ON r.study_uid = st.study_uid WHERE st.deleted_at IS NOT NULL GROUP BY r.project",
}
_KEYS = tuple(k for keys in _PROJECT_COUNTS for k in keys)

# The newest study routed to the project: read newest first, stopping at the first match.
_LAST_RECEIPT = (
    "SELECT st.last_received_at FROM studies st WHERE +st.study_uid IN"
    " (SELECT study_uid FROM study_routes WHERE project = ?)"
    " ORDER BY st.last_received_at DESC LIMIT 1"
)
_LAST_SEND = "SELECT project, max(finished_at) FROM transfers WHERE +state='done' GROUP BY project"


def project_counts(index: Index) -> dict[str, dict[str, int]]:
    """Per project (by name): studies routed to it (``received``), ``complete``, in pipeline,
    ``sent`` (every transfer done), ``quarantined`` (held) and ``deleted`` by retention."""
    out: dict[str, dict[str, int]] = {}
    with index.reading() as db:
        for keys, sql in _PROJECT_COUNTS.items():
            for project, *counts in db.execute(sql):
                row = out.setdefault(str(project), dict.fromkeys(_KEYS, 0))
                row.update({k: int(n) for k, n in zip(keys, counts, strict=True)})
    return out


def project_last_times(index: Index) -> dict[str, tuple[float | None, float | None]]:
    """Per project: (the last receipt of a study routed to it, its last finished transfer),
    seconds since the epoch or None."""
    with index.reading() as db:
        projects = [str(p) for (p,) in db.execute("SELECT DISTINCT project FROM study_routes")]
        received = {p: db.execute(_LAST_RECEIPT, (p,)).fetchone()[0] for p in projects}
        sent = {str(p): at for p, at in db.execute(_LAST_SEND)}
    return {p: (received.get(p), sent.get(p)) for p in sorted({*received, *sent})}
