"""The REDCap scheduler jobs of ``fiona serve``, built from the loaded projects.

* ``consent-recheck`` (:mod:`engine.pipeline.consent_recheck`): studies held ``no_consent``,
  looked up again every ``redcap.consent_recheck_seconds``;
* ``redcap-requests`` (:mod:`engine.pipeline.transfer_requests`): transfer requests polled every
  ``redcap.requests.poll_seconds``.

A job is added only when some project needs it. Each job catches its own failures (an outage is
logged and tried again at the next tick); APScheduler never sees an exception.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from engine.config.model import ProjectConfig
from engine.pipeline.consent_recheck import consent_recheck_job
from engine.pipeline.transfer_requests import transfer_requests_job
from engine.store.index import Index

__all__ = ["JOB_IDS", "add_redcap_jobs"]

#: The ids of the jobs this module adds.
JOB_IDS = ("consent-recheck", "redcap-requests")

log = logging.getLogger(__name__)


def add_redcap_jobs(
    scheduler: Any,
    index: Index,
    data_dir: Path,
    projects: Sequence[ProjectConfig],
    wrap: Callable[[str, Any], Any] | None = None,
) -> list[str]:
    """Add the jobs ``projects`` need to an APScheduler ``scheduler``; their ids.

    Called again when project files change: the jobs are replaced, and one no project needs
    any more is removed. ``wrap(job_id, job)`` (``fiona serve``: once per cluster) is what is
    scheduled instead of each job; it keeps the job's ``interval``."""
    for job_id in JOB_IDS:
        if scheduler.get_job(job_id) is not None:
            scheduler.remove_job(job_id)
    added = []
    jobs = (
        (
            "consent-recheck",
            "look up studies held for want of consent again; release the consented",
            consent_recheck_job(index, data_dir, projects),
        ),
        (
            "redcap-requests",
            "queue the transfer requests of REDCap; write their status back",
            transfer_requests_job(index, projects),
        ),
    )
    for job_id, name, job in jobs:
        if job is None:
            continue
        if wrap is not None:
            job = wrap(job_id, job)
        scheduler.add_job(
            job,
            "interval",
            seconds=job.interval,
            id=job_id,
            name=name,
            max_instances=1,
            coalesce=True,
        )
        added.append(job_id)
    if added:
        log.info("REDCap jobs: %s", ", ".join(added))
    return added
