"""The ``consent-recheck`` job: studies held for want of consent, looked up again in batches.

For each project with a consent step and a ``redcap`` section, every
``redcap.consent_recheck_seconds`` the job gathers the runs held with reason ``no_consent``,
looks their subjects up in one batched ``find`` (``batch_size`` subjects per REDCap call, never
one call per study), and for each subject consented since: writes an audit entry
(``consent_granted``, the study as a :func:`~engine.store.audit.uid_token`), marks the study's
``no_consent`` quarantine row ``released`` and re-queues the run at its consent step
(:meth:`RunStore.reopen`), which then checks consent once more and goes on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from engine.config.model import ProjectConfig
from engine.pipeline.steps.consent import ConsentStep, consenting_record
from engine.pipeline.store import RunRecord, RunStore
from engine.pipeline.validate import step_options
from engine.redcap.client import RedcapError
from engine.redcap.settings import RecordKey, RedcapSettings, connection, settings_of
from engine.store.audit import AuditLog, uid_token
from engine.store.db import IndexUnavailable
from engine.store.index import Index
from engine.store.quarantine import Reason

__all__ = ["ConsentCheck", "ConsentRecheck", "consent_checks", "consent_recheck_job"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConsentCheck:
    """What one project's consent step asks of REDCap."""

    project: str
    settings: RedcapSettings
    key: RecordKey
    consent_field: str
    accepted: tuple[str, ...]


def consent_checks(projects: Sequence[ProjectConfig]) -> list[ConsentCheck]:
    """One check per enabled project with a consent step and a ``redcap`` section."""
    out = []
    for project in projects:
        settings = settings_of(project.raw, project.source.parent)
        pipeline = project.raw.get("pipeline")
        if not project.enabled or settings is None or not isinstance(pipeline, list):
            continue
        for item in pipeline:
            if isinstance(item, dict) and item.get("step") == ConsentStep.name:
                step = ConsentStep(step_options(item), project.source)
                out.append(
                    ConsentCheck(
                        project.name, settings, step.key, step.consent_field, step.accepted
                    )
                )
                break  # one consent step per project is what makes sense
    return out


class ConsentRecheck:
    """The scheduled job: call it every :attr:`interval` seconds; each project is looked at
    every ``consent_recheck_seconds`` of its own."""

    def __init__(
        self, index: Index, data_dir: Path, checks: Sequence[ConsentCheck], audit: AuditLog
    ) -> None:
        self.runs = RunStore(index)
        self.index = index
        self.data_dir = data_dir
        self.checks = list(checks)
        self.audit = audit
        self._last: dict[str, float] = {}

    @property
    def interval(self) -> float:
        """Seconds between calls: the shortest re-check interval of the projects."""
        return min((c.settings.consent_recheck for c in self.checks), default=3600.0)

    def __call__(self, now: float | None = None) -> int:
        """Re-check every project that is due; the number of runs released."""
        now = time.time() if now is None else now
        released = 0
        for check in self.checks:
            if now - self._last.get(check.project, float("-inf")) < check.settings.consent_recheck:
                continue
            self._last[check.project] = now
            try:
                released += self.recheck(check)
            except IndexUnavailable:  # for the job's wrapper: one line, then it waits
                del self._last[check.project]  # looked at as soon as the index is back
                raise
            except RedcapError as exc:  # an outage: the studies stay held, tried next time
                log.warning("consent re-check of project %s: %s", check.project, exc)
            except Exception:
                log.exception("consent re-check of project %s failed", check.project)
        return released

    def recheck(self, check: ConsentCheck) -> int:
        """Look the project's ``no_consent`` runs up; release the consented; their number."""
        by_value: dict[str, list[RunRecord]] = {}
        for run in self._held(check.project):
            series = self.runs.series_inputs(run, self.data_dir)
            files = [s.files[0] for s in series if s.files][:1]
            value = check.key.value(run.subject, files)
            if value:
                by_value.setdefault(value, []).append(run)
        if not by_value:
            return 0
        client = connection(check.settings.config).client()
        found = client.find(check.key.field, list(by_value), [check.consent_field])
        id_field = client.id_field()
        released = 0
        for value, runs in by_value.items():
            rows = found.get(value, [])
            if consenting_record(rows, id_field, check.consent_field, check.accepted) is None:
                continue
            for run in runs:
                self._release(run)
                released += 1
        if released:
            log.info("consent re-check of project %s: %d studies released", check.project, released)
        return released

    def _held(self, project: str) -> list[RunRecord]:
        with self.index.reading() as db:
            ids = [
                int(r[0])
                for r in db.execute(
                    "SELECT id FROM pipeline_runs WHERE project=? AND state='quarantined'"
                    " AND reason=? ORDER BY id",
                    (project, Reason.NO_CONSENT.value),
                )
            ]
        return [run for run in map(self.runs.get, ids) if run is not None]

    def _release(self, run: RunRecord) -> None:
        """Audit first (the entry precedes the action), then release the quarantine row, then
        re-queue: a crash after the release leaves the run held, and the next re-check
        re-queues it (the release is then a no-op)."""
        self.audit.write(
            "consent_granted", project=run.project, study=uid_token(run.study_uid), run=run.id
        )
        with self.index.transaction() as db:
            db.execute(
                "UPDATE quarantine SET state='released' WHERE study_uid=? AND project=?"
                " AND reason=? AND state='held'",
                (run.study_uid, run.project, Reason.NO_CONSENT.value),
            )
        self.runs.reopen(run.id)


def consent_recheck_job(
    index: Index, data_dir: Path, projects: Sequence[ProjectConfig]
) -> ConsentRecheck | None:
    """The job for ``projects`` (None when none has a consent step with REDCap)."""
    checks = consent_checks(projects)
    if not checks:
        return None
    return ConsentRecheck(index, data_dir, checks, AuditLog(data_dir))
