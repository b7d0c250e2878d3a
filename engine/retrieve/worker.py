"""The retrieval job of ``fiona serve``: works through queued list rows, one at a time per PACS.

For a row: C-FIND the studies it names (study level), their series (series level, filtered
by the row's modality and series description) and their instances (image level): that is what
must arrive. The studies are given to the row's project (an assigned route, as a coupling-list
entry or ``fiona ingest --project`` gives them) before anything arrives. Then C-MOVE to
fiona's own SCP what fiona does not hold yet (a whole series, or the missing instances of
one), up to :data:`ROUNDS` times, counting what arrived in the index after each: a C-MOVE that
answers success but delivers nothing is a failure, not a success. The row ends ``done`` (all
arrived), ``partial`` or ``failed``, with a reason.

Limits: a PACS is only asked inside its time windows and below its studies per hour; one
association at a time per PACS (within ``max_associations``). Log lines and reasons carry
counts and the PACS's name, never a patient's or study's identifiers.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pydicom.dataset import Dataset

from engine.config.model import SiteConfig
from engine.config.pacs import PacsConfig, RetrieveMethod
from engine.net.dimse import part10_header
from engine.net.scu import AssociationBroken, MoveResult, ScuAssociation, StoreHandler
from engine.retrieve.peer import GET_ROLES, get_proposals, move_proposals, open_association
from engine.retrieve.query import Filters, matches, series_identifier, study_identifier
from engine.route.assign import assign_study
from engine.store.archive import Archive
from engine.store.audit import AuditLog, uid_token
from engine.store.index import Index, Origin
from engine.store.leases import LeaseLost
from engine.store.retrievals import RetrievalStore, Row, RowState

log = logging.getLogger(__name__)

#: Seconds one call of the job works rows before it returns (a row under way is finished).
BUDGET = 30.0
#: C-MOVE rounds per row: the first, then retries of what is still missing.
ROUNDS = 3
#: Seconds a PACS that could not be reached is left alone before its rows are tried again.
UNREACHABLE_PAUSE = 60.0
#: Times a row is put back for an unreachable PACS before it fails.
MAX_UNREACHABLE = 5
#: Times a row's association may break off during its requests before the row fails, and
#: the pause in seconds before the next try.
MAX_BROKEN = 2
BROKEN_PAUSE = 5.0
#: Instances named per image-level C-MOVE.
IMAGE_BATCH = 100


@dataclass
class _Series:
    study_uid: str
    series_uid: str
    instances: set[str] = field(default_factory=set)


class RowFailed(Exception):
    """The row cannot go on; the message is its reason (no PHI)."""


class RetrieveWorker:
    """The scheduler job: each call works one queued row per PACS that may be asked now."""

    def __init__(
        self,
        site: SiteConfig,
        index: Index,
        archive: Archive | None = None,
        *,
        clock: Callable[[], float] = time.time,
        local_now: Callable[[], dt.datetime] = dt.datetime.now,
    ) -> None:
        self.site = site
        self.index = index
        self.archive = archive  # where C-GET files what it brings (C-MOVE: fiona's SCP)
        self.store = RetrievalStore(index)
        self.audit = AuditLog(site.data_dir)
        self.clock = clock
        self.local_now = local_now
        self._paused: dict[str, float] = {}  # PACS name -> monotonic time it may be asked
        self._studies: dict[int, list[str]] = {}  # row id -> its studies' UIDs, for the audit
        resumed = self.store.take_back_own()
        if resumed:
            log.info("retrieval: %d rows taken up again after a restart", resumed)

    def __call__(self) -> None:
        """Rows one after another, a row per PACS in turn, for up to :data:`BUDGET` seconds
        (then the next call goes on), so a long list is not slowed by the job's interval."""
        deadline = time.monotonic() + BUDGET
        worked = True
        while worked and time.monotonic() < deadline:
            worked = False
            for name in self.store.pacs_with_queued():
                pacs = self.site.pacs_named(name)
                row = self.store.next_queued(name)
                if row is None:
                    continue
                if pacs is None:
                    self._end(row, RowState.FAILED, f"no PACS named {name} in the site config")
                    worked = True
                elif self._may_ask(pacs):
                    self.work(pacs, row)
                    worked = True

    def _may_ask(self, pacs: PacsConfig) -> bool:
        if time.monotonic() < self._paused.get(pacs.name, 0.0):
            return False
        if not pacs.limits.open_at(self.local_now()):
            return False
        per_hour = pacs.limits.studies_per_hour
        return not per_hour or self.store.studies_since(pacs.name, self.clock() - 3600) < per_hour

    def work(self, pacs: PacsConfig, row: Row) -> None:
        """Query, claim, move and check one row; its state says how it went."""
        get = pacs.retrieve is RetrieveMethod.GET
        if get and self.archive is None:
            self._end(row, RowState.FAILED, "retrieve: get needs the archive of fiona serve")
            return
        if not self.store.claim(row.id, self.clock()):
            return  # cancelled since it was picked, or another node took it
        try:
            self._claimed(pacs, row, get)
        except LeaseLost:
            log.warning(
                "retrieval job %d line %d: another node holds it now", row.job, row.spec.line
            )
        finally:
            self.store.release(row.id)

    def _claimed(self, pacs: PacsConfig, row: Row, get: bool) -> None:
        """Work a row this node claimed."""
        try:
            if get:
                assoc = open_association(self.site, pacs, get_proposals(), GET_ROLES)
            else:
                assoc = open_association(self.site, pacs, move_proposals())
        except AssociationBroken as exc:
            self._unreachable(pacs, row, str(exc))
            return
        try:
            self._work(pacs, row, assoc)
        except RowFailed as exc:
            self._end(row, RowState.FAILED, str(exc))
        except AssociationBroken as exc:
            assoc.abort()
            self._broken(pacs, row, f"PACS {pacs.name}: {exc}")
            return
        except LeaseLost:
            assoc.abort()
            raise
        try:
            assoc.release()
        except AssociationBroken:
            log.info("PACS %s did not release the association cleanly", pacs.name)

    def _unreachable(self, pacs: PacsConfig, row: Row, why: str) -> None:
        self._paused[pacs.name] = time.monotonic() + UNREACHABLE_PAUSE
        tries = row.attempts + 1
        if tries >= MAX_UNREACHABLE:
            self._end(row, RowState.FAILED, why, attempts=tries)
            return
        log.warning("retrieval from PACS %s paused: %s", pacs.name, why)
        self.store.update(row.id, self.clock(), RowState.QUEUED, reason=why, attempts=tries)

    def _broken(self, pacs: PacsConfig, row: Row, why: str) -> None:
        """The association broke off during the row's requests: a PACS that aborts a C-GET or
        C-MOVE it will not do says no this way, so the row fails the second time (after a
        short pause, in case the PACS was only restarting)."""
        tries = row.attempts + 1
        if tries >= MAX_BROKEN:
            verb = "C-GET" if pacs.retrieve is RetrieveMethod.GET else "C-MOVE"
            hint = f" (does the PACS allow {verb} from {pacs.calling_ae_for(self.site.ae_title)}?)"
            self._end(row, RowState.FAILED, why + hint, attempts=tries)
            return
        self._paused[pacs.name] = time.monotonic() + BROKEN_PAUSE
        log.warning("retrieval from PACS %s paused: %s", pacs.name, why)
        self.store.update(row.id, self.clock(), RowState.QUEUED, reason=why, attempts=tries)

    def _work(self, pacs: PacsConfig, row: Row, assoc: ScuAssociation) -> None:
        plan = self._plan(assoc, row)
        studies = sorted({s.study_uid for s in plan})
        self._studies[row.id] = studies
        expected = {uid for s in plan for uid in s.instances}
        project = row.spec.project
        if project:
            for study_uid in studies:
                assign_study(
                    self.index,
                    study_uid,
                    project,
                    subject=row.spec.subject,
                    event=row.spec.event,
                    now=self.clock(),
                )
        held = self.store.held_instances(sorted(expected))
        self.store.update(
            row.id,
            self.clock(),
            RowState.RETRIEVING,
            studies=len(studies),
            expected=len(expected),
            arrived=len(held),
        )
        reason = ""
        rounds = 0
        while len(held) < len(expected) and rounds < ROUNDS:
            if self.store.cancelled(row.id):
                log.info("retrieval job %d line %d: cancelled", row.job, row.spec.line)
                return
            rounds += 1
            before = len(held)
            reason = self._move(pacs, assoc, plan, held)
            held = self.store.held_instances(sorted(expected))
            if len(held) == before and not reason:
                reason = f"PACS {pacs.name} answered with success but delivered nothing" + (
                    ""
                    if pacs.retrieve is RetrieveMethod.GET
                    else f" (does it send {pacs.move_destination_for(self.site.ae_title)}"
                    " to this fiona's host and port?)"
                )
            self.store.update(row.id, self.clock(), RowState.RETRIEVING, arrived=len(held))
        missing = len(expected) - len(held)
        if not missing:
            self._end(row, RowState.DONE, "", arrived=len(held), attempts=row.attempts + rounds)
            return
        state = RowState.PARTIAL if held else RowState.FAILED
        verb = "C-GET" if pacs.retrieve is RetrieveMethod.GET else "C-MOVE"
        why = f"{missing} of {len(expected)} instances did not arrive after {rounds} {verb}s"
        self._end(
            row,
            state,
            f"{why}: {reason}" if reason else why,
            arrived=len(held),
            attempts=row.attempts + rounds,
        )

    def _plan(self, assoc: ScuAssociation, row: Row) -> list[_Series]:
        """The row's series and their instances, as the PACS lists them."""
        spec = row.spec
        query = study_identifier(Filters(spec.patient_id, spec.accession, spec.study_date))
        query.StudyInstanceUID = spec.study_uid
        found = assoc.find(query)
        if isinstance(found, str):
            raise RowFailed(found)
        study_uids = sorted({str(ds.get("StudyInstanceUID", "")) for ds in found} - {""})
        if not study_uids:
            raise RowFailed("no study matched")
        plan: list[_Series] = []
        for study_uid in study_uids:
            series = assoc.find(series_identifier(study_uid, spec.modality))
            if isinstance(series, str):
                raise RowFailed(series)
            for ds in series:
                uid = str(ds.get("SeriesInstanceUID", ""))
                if not uid or not matches(spec.modality, str(ds.get("Modality", ""))):
                    continue
                if not matches(spec.series_description, str(ds.get("SeriesDescription", ""))):
                    continue
                instances = assoc.list_instances(study_uid, uid)
                if isinstance(instances, str):
                    raise RowFailed(instances)
                plan.append(_Series(study_uid, uid, instances))
        if not plan:
            raise RowFailed("no series matched the row's modality and series description")
        if not any(s.instances for s in plan):
            raise RowFailed("the PACS listed no instances for the matching series")
        return plan

    def _move(
        self, pacs: PacsConfig, assoc: ScuAssociation, plan: list[_Series], held: set[str]
    ) -> str:
        """C-MOVE (or C-GET) what is missing; '' when every one answered success, else why
        not."""
        destination = pacs.move_destination_for(self.site.ae_title)
        get = pacs.retrieve is RetrieveMethod.GET
        verb = "C-GET" if get else "C-MOVE"
        problems = []
        for series in plan:
            missing = sorted(series.instances - held)
            if not missing:
                continue
            for identifier in _identifiers(series, missing):
                result: MoveResult | str
                if get:
                    result = assoc.get(identifier, self._filer(pacs))
                else:
                    result = assoc.move(identifier, destination)
                if isinstance(result, str):
                    raise RowFailed(result)
                if not result.ok:
                    problems.append(f"PACS {pacs.name} answered the {verb} with {result.detail}")
                elif result.failed > 0:
                    problems.append(f"PACS {pacs.name}: {result.failed} sub-operations failed")
        return problems[0] if problems else ""

    def _filer(self, pacs: PacsConfig) -> StoreHandler:
        """Files each instance a C-GET brings as the receiver files a C-STORE (the archive
        checks it holds the SOP class and instance the command names)."""
        archive = self.archive
        assert archive is not None
        calling = pacs.calling_ae_for(self.site.ae_title)
        origin = Origin("dimse", pacs.ae_title, calling, pacs.host)

        def file(sop_class: str, sop_instance: str, syntax: str, data: bytes) -> int:
            header = part10_header(sop_class, sop_instance, syntax, pacs.ae_title)
            outcome = archive.receive(header + data, origin, (sop_class, sop_instance))
            return int(outcome.status)

        return file

    def _end(self, row: Row, state: RowState, reason: str, **progress: int) -> None:
        self.store.update(row.id, self.clock(), state, reason=reason, **progress)
        self.audit.try_write(
            "retrieved",
            job=row.job,
            line=row.spec.line,
            pacs=row.pacs,
            project=row.spec.project,
            outcome=str(state),
            studies=[uid_token(s) for s in self._studies.pop(row.id, [])],
            reason=reason,
            **progress,
        )
        suffix = f" ({reason})" if reason else ""
        log.info("retrieval job %d line %d: %s%s", row.job, row.spec.line, state, suffix)


def _identifiers(series: _Series, missing: list[str]) -> list[Dataset]:
    """A series-level identifier when the whole series is missing, else image-level ones
    naming the missing SOP Instance UIDs (0008,0018) in batches."""
    base = Dataset()
    base.StudyInstanceUID = series.study_uid
    base.SeriesInstanceUID = series.series_uid
    if len(missing) == len(series.instances):
        base.QueryRetrieveLevel = "SERIES"
        return [base]
    out = []
    for start in range(0, len(missing), IMAGE_BATCH):
        ds = Dataset()
        ds.QueryRetrieveLevel = "IMAGE"
        ds.StudyInstanceUID = series.study_uid
        ds.SeriesInstanceUID = series.series_uid
        ds.SOPInstanceUID = missing[start : start + IMAGE_BATCH]
        out.append(ds)
    return out
