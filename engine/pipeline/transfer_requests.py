"""Transfer requests in FIONA's style: coordinators ask in REDCap, fiona queues and reports.

A project's ``redcap.requests`` names the fields of a request instrument: the study
(StudyInstanceUID or AccessionNumber), the fiona project it goes to, the subject and event, and
the fields fiona writes (status, status date, error). Every ``poll_seconds`` the
``redcap-requests`` job:

1. exports the open requests in one call: a study given and status empty (new), ``waiting`` or
   ``queued`` (REDCap filter logic built from field names only);
2. for a new or waiting request: an unknown project is ``error``; a study not (yet) in the index
   is ``waiting`` (looked at again next poll); else the study is routed to the project with the
   request's subject and event (a ``study_routes`` row, as the tracker makes) and a pipeline run
   is created: ``queued``. The request row is remembered in ``redcap_requests``, so a request is
   queued once even when REDCap did not get its status;
3. for a queued request: the run's state; ``done`` when it is, ``error`` when it was held;
4. writes every changed status, with the time (``YYYY-MM-DD HH:MM:SS``, UTC: ISO 8601 with a
   space, which REDCap's ``datetime_seconds_ymd`` validation accepts) and any error, in one
   batched import. Error texts name fields and reason codes, never a value from the request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from engine.config.model import ProjectConfig
from engine.pipeline.store import RunState, RunStore
from engine.redcap.client import RedcapError
from engine.redcap.settings import RedcapSettings, RequestFields, connection, settings_of
from engine.store.db import IndexUnavailable
from engine.store.index import Index

__all__ = ["RequestSource", "Status", "TransferRequests", "transfer_requests_job"]

log = logging.getLogger(__name__)


class Status(StrEnum):
    """A request's status field, as fiona writes it (empty: new)."""

    NEW = ""
    WAITING = "waiting"
    QUEUED = "queued"
    DONE = "done"
    ERROR = "error"


@dataclass(frozen=True)
class RequestSource:
    """A project whose REDCap holds transfer requests."""

    project: str
    settings: RedcapSettings
    fields: RequestFields


@dataclass(frozen=True)
class _Key:
    """One request row: record, event, repeat instrument and instance."""

    record: str
    event: str = ""
    instrument: str = ""
    instance: str = ""

    @classmethod
    def of(cls, row: Mapping[str, str], id_field: str) -> _Key:
        return cls(
            row.get(id_field, ""),
            row.get("redcap_event_name", ""),
            row.get("redcap_repeat_instrument", ""),
            row.get("redcap_repeat_instance", ""),
        )

    def columns(self, id_field: str) -> dict[str, str]:
        """The row's identifying columns for an import (only those the project has)."""
        out = {id_field: self.record}
        if self.event:
            out["redcap_event_name"] = self.event
        if self.instance:
            out["redcap_repeat_instrument"] = self.instrument
            out["redcap_repeat_instance"] = self.instance
        return out


def request_sources(projects: Sequence[ProjectConfig]) -> list[RequestSource]:
    """The enabled projects with ``redcap.requests``."""
    out = []
    for project in projects:
        settings = settings_of(project.raw, project.source.parent)
        if project.enabled and settings is not None and settings.requests is not None:
            out.append(RequestSource(project.name, settings, settings.requests))
    return out


class TransferRequests:
    """The scheduled job (see the module doc); ``projects`` are the fiona projects requests may
    name."""

    def __init__(self, index: Index, sources: Sequence[RequestSource], projects: set[str]) -> None:
        self.index = index
        self.runs = RunStore(index)
        self.sources = list(sources)
        self.projects = projects
        self._last: dict[str, float] = {}

    @property
    def interval(self) -> float:
        """Seconds between calls: the shortest poll interval of the sources."""
        return min((s.fields.poll_seconds for s in self.sources), default=300.0)

    def __call__(self, now: float | None = None) -> int:
        """Poll every source that is due; the number of statuses written back."""
        now = time.time() if now is None else now
        written = 0
        for source in self.sources:
            if now - self._last.get(source.project, float("-inf")) < source.fields.poll_seconds:
                continue
            self._last[source.project] = now
            try:
                written += self.poll(source, now)
            except IndexUnavailable:  # for the job's wrapper: one line, then it waits
                del self._last[source.project]  # polled as soon as the index is back
                raise
            except RedcapError as exc:  # an outage: the requests wait for the next poll
                log.warning("transfer requests of project %s: %s", source.project, exc)
            except Exception:
                log.exception("transfer requests of project %s failed", source.project)
        return written

    def poll(self, source: RequestSource, now: float) -> int:
        """One poll of one source; the number of request rows written back."""
        client = connection(source.settings.config).client()
        f = source.fields
        logic = (
            f"[{f.study}] <> '' and ([{f.status}] = '' or [{f.status}] = '{Status.WAITING}'"
            f" or [{f.status}] = '{Status.QUEUED}')"
        )
        wanted = [f.study, f.project, f.subject, f.event, f.status]
        rows = client.select(wanted, logic, events=list(f.events) or None)
        id_field = client.id_field()
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(now))
        updates: list[dict[str, str]] = []
        finished: list[tuple[_Key, Status]] = []
        for row in rows:
            key = _Key.of(row, id_field)
            status, error = self._handle(source, key, row, now)
            if status is None or status == row.get(f.status, ""):
                continue
            update = {**key.columns(id_field), f.status: status, f.status_date: stamp}
            updates.append({**update, f.error: error} if error else update)
            finished.append((key, status))
        if updates:
            client.write(updates)  # one import per poll (batch_size records per call)
            self._note(source.project, finished, now)
        return len(updates)

    def _handle(
        self, source: RequestSource, key: _Key, row: Mapping[str, str], now: float
    ) -> tuple[Status | None, str]:
        """(new status or None to leave it, error text) for one open request."""
        f = source.fields
        known = self._known(source.project, key)
        if known is not None:
            return self._progress(known)
        if row.get(f.status, "") == Status.QUEUED:
            return None, ""  # queued by someone else (or an index restored from backup)
        project = row.get(f.project, "").strip()
        if project not in self.projects:
            return Status.ERROR, f"the project in field {f.project} is not a fiona project here"
        studies = self._find_study(row.get(f.study, "").strip())
        if not studies:
            return Status.WAITING, ""
        if len(studies) > 1:
            return Status.ERROR, f"{len(studies)} studies match field {f.study}; give the UID"
        subject, event = row.get(f.subject, "").strip(), row.get(f.event, "").strip()
        self._queue(source.project, key, studies[0], project, subject, event, now)
        log.info("transfer request of project %s queued for project %s", source.project, project)
        return Status.QUEUED, ""

    def _progress(self, run_id: int) -> tuple[Status, str]:
        run = self.runs.get(run_id)
        if run is None or run.state in (RunState.PENDING, RunState.RUNNING):
            return Status.QUEUED, ""
        if run.state == RunState.DONE:
            return Status.DONE, ""
        return Status.ERROR, f"fiona held the study (reason {run.reason or run.state.value})"

    def _known(self, source: str, key: _Key) -> int | None:
        with self.index.reading() as db:
            row = db.execute(
                "SELECT run_id FROM redcap_requests WHERE source=? AND record=? AND event=?"
                " AND instrument=? AND instance=?",
                (source, key.record, key.event, key.instrument, key.instance),
            ).fetchone()
        return None if row is None else int(row[0])

    def _find_study(self, value: str) -> list[str]:
        """Study UIDs whose StudyInstanceUID (0020,000D) or AccessionNumber (0008,0050) is
        ``value``."""
        if not value:
            return []
        with self.index.reading() as db:
            rows = db.execute(
                "SELECT study_uid FROM studies WHERE study_uid=? OR accession_number=? ORDER BY id",
                (value, value),
            ).fetchall()
        return [str(r[0]) for r in rows]

    def _queue(
        self,
        source: str,
        key: _Key,
        study_uid: str,
        project: str,
        subject: str,
        event: str,
        now: float,
    ) -> int:
        """Route the study to ``project`` and create its run, as the tracker does for a complete
        study: the run, the route and the request in one transaction."""
        with self.index.reading() as db:
            series = [
                str(r[0])
                for r in db.execute(
                    "SELECT se.series_uid FROM series se JOIN studies st ON st.id = se.study_ref"
                    " WHERE st.study_uid=? ORDER BY se.series_number, se.series_uid",
                    (study_uid,),
                )
            ]
            upto = db.execute(
                "SELECT coalesce(max(i.id), 0) FROM instances i JOIN series se ON"
                " se.id = i.series_ref JOIN studies st ON st.id = se.study_ref"
                " WHERE st.study_uid=?",
                (study_uid,),
            ).fetchone()[0]
        with self.index.transaction() as db:
            run_id, follow_up = self.runs.add_next_run(
                db, study_uid, project, subject, event, series
            )
            db.execute(
                "INSERT INTO study_routes(study_uid, project, subject, event, reasons, state,"
                " opened_at, completed_at, runs, done_upto)"
                " VALUES (?,?,?,?,'[\"redcap request\"]','complete',?,?,?,?)"
                " ON CONFLICT(study_uid, project) DO UPDATE SET state='complete',"
                " completed_at=excluded.completed_at, runs=excluded.runs,"
                " done_upto=excluded.done_upto",
                (study_uid, project, subject, event, now, now, follow_up + 1, int(upto)),
            )
            db.execute(
                "INSERT INTO redcap_requests(source, record, event, instrument, instance,"
                " project, run_id, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?)",
                (source, key.record, key.event, key.instrument, key.instance, project, run_id,
                 now, now),
            )  # fmt: skip
        return run_id

    def _note(self, source: str, finished: list[tuple[_Key, Status]], now: float) -> None:
        """Remember the statuses REDCap now has (for ``fiona`` reports; queueing is keyed on
        the row's presence, not on this)."""
        with self.index.transaction() as db:
            for key, status in finished:
                db.execute(
                    "UPDATE redcap_requests SET status=?, updated_at=? WHERE source=?"
                    " AND record=? AND event=? AND instrument=? AND instance=?",
                    (status.value, now, source, key.record, key.event, key.instrument,
                     key.instance),
                )  # fmt: skip


def transfer_requests_job(
    index: Index, projects: Sequence[ProjectConfig]
) -> TransferRequests | None:
    """The job for ``projects`` (None when none has ``redcap.requests``)."""
    sources = request_sources(projects)
    if not sources:
        return None
    return TransferRequests(index, sources, {p.name for p in projects if p.enabled})
