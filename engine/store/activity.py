"""Received and sent per hour over the last day, counted live from the index.

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

__all__ = ["HOURS", "hourly_activity"]

#: Buckets returned: one day of whole hours.
HOURS = 24

_COUNTS = {
    "received": "SELECT CAST((received_at - ?) / 3600 AS INTEGER), count(*) FROM instances"
    " WHERE received_at >= ? AND received_at < ? GROUP BY 1",
    "sent_instances": "SELECT CAST((sent_at - ?) / 3600 AS INTEGER), count(*) FROM transfer_items"
    " WHERE sent_at >= ? AND sent_at < ? GROUP BY 1",
    "sent_transfers": "SELECT CAST((finished_at - ?) / 3600 AS INTEGER), count(*) FROM transfers"
    " WHERE finished_at >= ? AND finished_at < ? AND state = 'done' GROUP BY 1",
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
