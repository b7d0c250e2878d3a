"""Retrieval jobs as the command line and the web both handle them: queue a list for a PACS
(:func:`queue_list`), and each job's rows for display (:func:`job_rows`).

A row's progress (line, state, counts, reason) is no PHI; what it asks for (accession number,
patient ID, study date, subject) is, and is given only under a ``phi`` key for callers that may
show it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict
from typing import Any

from engine.config.model import SiteConfig
from engine.store.audit import AuditLog
from engine.store.index import Index
from engine.store.retrievals import RetrievalStore, RowSpec

__all__ = ["QueueError", "cancel_job", "job_rows", "queue_list", "requeue_job"]


class QueueError(ValueError):
    """The list cannot be queued (no values quoted); the message says what to fix."""


def queue_list(
    site: SiteConfig,
    index: Index,
    pacs_name: str,
    rows: list[RowSpec],
    list_name: str,
    *,
    project: str,
    known_projects: Iterable[str],
    operator: str,
) -> int:
    """Queue ``rows`` (read by :func:`engine.retrieve.lists.read_list` or ``parse_list``) as
    one job for the PACS ``pacs_name``, audited; its number. ``project`` (may be empty) is the
    job's default for rows that name none."""
    pacs = site.pacs_named(pacs_name)
    if pacs is None:
        names = ", ".join(p.name for p in site.pacs) or "none configured"
        raise QueueError(f"no PACS named {pacs_name!r} in the site config ({names})")
    wanted = {r.project for r in rows if r.project} | ({project} if project else set())
    unknown = sorted(wanted - set(known_projects))
    if unknown:
        raise QueueError(f"no such project: {', '.join(unknown)}")
    job = RetrievalStore(index).create_job(
        pacs.name, project, list_name, rows, operator, time.time()
    )
    AuditLog(site.data_dir).write(
        "retrieve_queued", job=job, pacs=pacs.name, rows=len(rows), by=operator
    )
    return job


def cancel_job(site: SiteConfig, index: Index, job: int, *, operator: str) -> int:
    """Cancel job ``job``'s rows not finished yet (a row under way stops after its current
    C-FIND, C-MOVE or C-GET), audited; how many."""
    store = RetrievalStore(index)
    if not store.jobs(job):
        raise QueueError(f"no retrieval job {job}")
    count = store.cancel(job, time.time())
    AuditLog(site.data_dir).write("retrieve_cancelled", job=job, rows=count, by=operator)
    return count


def requeue_job(site: SiteConfig, index: Index, job: int, *, operator: str) -> int:
    """Queue job ``job``'s partial, failed and cancelled rows again, audited; how many. Only
    what fiona does not hold yet is fetched."""
    store = RetrievalStore(index)
    if not store.jobs(job):
        raise QueueError(f"no retrieval job {job}")
    count = store.requeue(job, time.time())
    AuditLog(site.data_dir).write("retrieve_requeued", job=job, rows=count, by=operator)
    return count


def job_rows(index: Index, job: int, *, phi: bool = False) -> list[dict[str, Any]]:
    """The rows of retrieval job ``job`` in list order: progress, and what each asks for under
    ``phi`` when ``phi``; [] when there is no such job."""
    found = []
    for r in RetrievalStore(index).rows(job):
        item: dict[str, Any] = {
            "line": r.spec.line,
            "project": r.spec.project,
            "state": str(r.state),
            "studies": r.studies,
            "expected": r.expected,
            "arrived": r.arrived,
            "attempts": r.attempts,
            "reason": r.reason,
        }
        if phi:
            asked = {k: v for k, v in asdict(r.spec).items() if v and k not in ("line", "project")}
            item["phi"] = asked
        found.append(item)
    return found
