"""One retrieval row on one association: C-FIND what must arrive, claim it for the row's
project, C-MOVE or C-GET what is missing, count what arrived.

For a row: C-FIND the studies it names (study level) and their series (series level, filtered
by the row's modality and series description): that is what must arrive. A series fiona holds
nothing of is counted by the Number of Series Related Instances (0020,1209) the PACS reports
(dcmtk's movescu asks nothing; fiona asks this much, so as to know what to check); one it holds
part of (a row taken up again), or whose count the PACS does not report, is listed instance by
instance (image level). The studies are given to the row's project (an assigned route, as a
coupling-list entry or ``fiona ingest --project`` gives them) before anything arrives. Then
fetch what fiona does not hold yet (a whole study when the row takes every series and none has
arrived, else a whole series, or the missing instances of one), up to :data:`ROUNDS` times,
counting what arrived in the index after each: a counted series that came up short is listed
then, so the next request names exactly what is missing; a C-MOVE that answers success but
delivers nothing is a failure, not a success. Reasons carry counts and the PACS's name, never
a patient's or study's identifiers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from pydicom.dataset import Dataset

from engine.config.model import SiteConfig
from engine.config.pacs import PacsConfig, RetrieveMethod
from engine.net.dimse import part10_header
from engine.net.scu import MoveResult, PeerClosed, ScuAssociation
from engine.retrieve.query import Filters, matches, series_identifier, study_identifier
from engine.route.assign import assign_study
from engine.store.archive import Archive
from engine.store.index import Index, Origin
from engine.store.retrievals import RetrievalStore, Row, RowState

#: C-MOVE rounds per row: the first, then retries of what is still missing.
ROUNDS = 3
#: Instances named per image-level C-MOVE.
IMAGE_BATCH = 100
#: Final C-GET statuses that say the PACS will not do C-GET for us (PS3.7 C: refused, SOP
#: class not supported; refused, not authorized).
GET_REFUSED_STATUSES = (0x0122, 0x0124)


class RowFailed(Exception):
    """The row cannot go on; the message is its reason (no PHI)."""


class GetRefused(Exception):
    """The PACS will not do C-GET for fiona (not accepted at association, the association
    ended on a C-GET request, or a 'refused' status); the message says how (no PHI).
    ``aborted``: the association ended, which a PACS restarting does too."""

    def __init__(self, why: str, *, aborted: bool = False) -> None:
        super().__init__(why)
        self.aborted = aborted


@dataclass
class Series:
    """One series to fetch: ``listed`` with its SOP Instance UIDs (0008,0018) in
    ``instances``, else ``count`` instances as the PACS reported them."""

    study_uid: str
    series_uid: str
    instances: set[str] = field(default_factory=set)
    count: int = 0
    listed: bool = True

    @property
    def expected(self) -> int:
        return len(self.instances) if self.listed else self.count


@dataclass(frozen=True)
class Arrived:
    """What fiona holds of a plan: the listed instances it has (``held``), the instances of
    each counted series (``counts``), and the total towards the plan (``n``)."""

    held: set[str]
    counts: dict[str, int]
    n: int

    @classmethod
    def of(cls, store: RetrievalStore, plan: list[Series]) -> Arrived:
        held = store.held_instances(sorted(u for s in plan if s.listed for u in s.instances))
        counts = store.series_counts([s.series_uid for s in plan if not s.listed])
        counted = sum(min(counts.get(s.series_uid, 0), s.count) for s in plan if not s.listed)
        return cls(held, counts, len(held) + counted)

    def missing(self, series: Series) -> list[str] | None:
        """The missing SOP Instance UIDs of a listed series; for a counted one, None when it
        is short, [] when complete."""
        if series.listed:
            return sorted(series.instances - self.held)
        return None if self.counts.get(series.series_uid, 0) < series.count else []

    def untouched(self, series: Series) -> bool:
        """Nothing of the series has arrived."""
        if series.listed:
            return not series.instances & self.held
        return not self.counts.get(series.series_uid, 0)


@dataclass(frozen=True)
class Finished:
    """How a row ended: its state, reason, instances arrived and requests made."""

    state: RowState
    reason: str
    arrived: int
    rounds: int


@dataclass
class RowFetch:
    """Works one row on an open association; :meth:`run` returns how it ended, or None when
    the row was cancelled, or fiona is stopping, mid-way. ``method`` is how this association
    fetches (a ``get`` PACS that refused C-GET is fetched by C-MOVE)."""

    site: SiteConfig
    index: Index
    archive: Archive | None
    pacs: PacsConfig
    method: RetrieveMethod
    clock: Callable[[], float]
    #: whether fiona is stopping (checked between requests, as cancelling is)
    stopping: Callable[[], bool] = lambda: False
    #: the studies of the row, once found (for the audit)
    studies: list[str] = field(default_factory=list)

    @property
    def verb(self) -> str:
        return "C-GET" if self.method is RetrieveMethod.GET else "C-MOVE"

    def run(self, assoc: ScuAssociation, row: Row) -> Finished | None:
        store = RetrievalStore(self.index)
        plan = plan_row(assoc, row, store.series_counts)
        self.studies = sorted({s.study_uid for s in plan})
        if row.spec.project:
            for study_uid in self.studies:
                assign_study(
                    self.index,
                    study_uid,
                    row.spec.project,
                    subject=row.spec.subject,
                    event=row.spec.event,
                    now=self.clock(),
                )
        have = Arrived.of(store, plan)
        store.update(
            row.id,
            self.clock(),
            RowState.RETRIEVING,
            studies=len(self.studies),
            expected=_expected(plan),
            arrived=have.n,
        )
        whole = not (row.spec.modality or row.spec.series_description)
        reason = ""
        rounds = 0
        while have.n < _expected(plan) and rounds < ROUNDS:
            if self.stopping() or store.cancelled(row.id):
                return None
            rounds += 1
            before = have.n
            reason = self._fetch(assoc, plan, have, whole)
            have = Arrived.of(store, plan)
            if have.n < _expected(plan):
                _list_short(assoc, plan, have)
                have = Arrived.of(store, plan)
            if have.n == before and not reason:
                reason = f"PACS {self.pacs.name} answered with success but delivered nothing" + (
                    ""
                    if self.method is RetrieveMethod.GET
                    else f" (does it send {self.pacs.move_destination_for(self.site.ae_title)}"
                    " to this fiona's host and port?)"
                )
            store.update(
                row.id,
                self.clock(),
                RowState.RETRIEVING,
                expected=_expected(plan),
                arrived=have.n,
            )
        expected = _expected(plan)
        missing = expected - have.n
        if not missing:
            return Finished(RowState.DONE, "", have.n, rounds)
        state = RowState.PARTIAL if have.n else RowState.FAILED
        why = f"{missing} of {expected} instances did not arrive after {rounds} {self.verb}s"
        return Finished(state, f"{why}: {reason}" if reason else why, have.n, rounds)

    def _fetch(self, assoc: ScuAssociation, plan: list[Series], have: Arrived, whole: bool) -> str:
        """C-MOVE (or C-GET) what is missing; '' when every request answered success, else
        why not. ``whole``: the plan has every series of its studies (no series filter)."""
        problems = []
        for identifier in _identifiers(plan, have, whole):
            result = self._request(assoc, identifier)
            if not result.ok:
                problems.append(
                    f"PACS {self.pacs.name} answered the {self.verb} with {result.detail}"
                )
            elif result.failed > 0:
                problems.append(f"PACS {self.pacs.name}: {result.failed} sub-operations failed")
        return problems[0] if problems else ""

    def _request(self, assoc: ScuAssociation, identifier: Dataset) -> MoveResult:
        if self.method is RetrieveMethod.MOVE:
            moved = assoc.move(identifier, self.pacs.move_destination_for(self.site.ae_title))
            if isinstance(moved, str):
                raise RowFailed(moved)
            return moved
        filer = self._filer()
        try:
            got = assoc.get(identifier, filer)
        except PeerClosed as exc:
            if filer.stored:  # it was sending: a broken association, not a refusal
                raise
            raise GetRefused(f"PACS {self.pacs.name}: {exc}", aborted=True) from exc
        if isinstance(got, str):
            raise GetRefused(f"PACS {self.pacs.name}: {got}")
        if got.status in GET_REFUSED_STATUSES and got.completed <= 0:
            raise GetRefused(f"PACS {self.pacs.name} answered the C-GET with {got.detail}")
        return got

    def _filer(self) -> _Filer:
        if self.archive is None:
            raise RowFailed("retrieve: get needs the archive of fiona serve")
        return _Filer(self.archive, self.pacs, self.pacs.calling_ae_for(self.site.ae_title))


class _Filer:
    """Files each instance a C-GET brings as the receiver files a C-STORE (the archive
    checks it holds the SOP class and instance the command names); counts them."""

    def __init__(self, archive: Archive, pacs: PacsConfig, calling_ae: str) -> None:
        self.archive = archive
        self.sender = pacs.ae_title
        self.origin = Origin("dimse", pacs.ae_title, calling_ae, pacs.host)
        self.stored = 0

    def __call__(self, sop_class: str, sop_instance: str, syntax: str, data: bytes) -> int:
        self.stored += 1
        header = part10_header(sop_class, sop_instance, syntax, self.sender)
        outcome = self.archive.receive(header + data, self.origin, (sop_class, sop_instance))
        return int(outcome.status)


def plan_row(
    assoc: ScuAssociation, row: Row, held_counts: Callable[[list[str]], dict[str, int]]
) -> list[Series]:
    """The row's series, counted or listed (see the module's docstring); ``held_counts``
    gives the instances fiona holds per Series Instance UID."""
    spec = row.spec
    query = study_identifier(Filters(spec.patient_id, spec.accession, spec.study_date))
    query.StudyInstanceUID = spec.study_uid
    found = assoc.find(query)
    if isinstance(found, str):
        raise RowFailed(found)
    study_uids = sorted({str(ds.get("StudyInstanceUID", "")) for ds in found} - {""})
    if not study_uids:
        raise RowFailed("no study matched")
    wanted: list[tuple[str, str, int]] = []  # study, series, count reported (0: none)
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
            wanted.append((study_uid, uid, _count(ds)))
    if not wanted:
        raise RowFailed("no series matched the row's modality and series description")
    held = held_counts([uid for _, uid, _ in wanted])
    plan: list[Series] = []
    for study_uid, uid, count in wanted:
        if count > 0 and not held.get(uid):
            plan.append(Series(study_uid, uid, count=count, listed=False))
            continue
        instances = assoc.list_instances(study_uid, uid)
        if isinstance(instances, str):
            raise RowFailed(instances)
        plan.append(Series(study_uid, uid, instances))
    if not _expected(plan):
        raise RowFailed("the PACS listed no instances for the matching series")
    return plan


def _count(ds: Dataset) -> int:
    """Number of Series Related Instances (0020,1209) of a series-level answer; 0 when absent
    or unreadable."""
    try:
        return max(int(ds.get("NumberOfSeriesRelatedInstances") or 0), 0)
    except (TypeError, ValueError):
        return 0


def _expected(plan: list[Series]) -> int:
    return sum(s.expected for s in plan)


def _list_short(assoc: ScuAssociation, plan: list[Series], have: Arrived) -> None:
    """List the instances of the counted series that came up short, so the next request
    names exactly what is missing."""
    for series in plan:
        if series.listed or have.missing(series) is not None:
            continue
        listed = assoc.list_instances(series.study_uid, series.series_uid)
        if isinstance(listed, str):
            raise RowFailed(listed)
        series.instances, series.listed = listed, True


def _identifiers(plan: list[Series], have: Arrived, whole: bool) -> list[Dataset]:
    """What to ask for: a study-level identifier for a study nothing of which has arrived
    when the plan has all its series (``whole``), else per series: the whole series when
    nothing of it has arrived, else the missing instances (:func:`_image_identifiers`)."""
    out: list[Dataset] = []
    for study_uid in sorted({s.study_uid for s in plan}):
        series = [s for s in plan if s.study_uid == study_uid]
        if whole and all(have.untouched(s) for s in series):
            ds = Dataset()
            ds.QueryRetrieveLevel = "STUDY"
            ds.StudyInstanceUID = study_uid
            out.append(ds)
            continue
        for one in series:
            missing = have.missing(one)
            if missing == []:
                continue
            if missing is None or have.untouched(one):
                ds = Dataset()
                ds.QueryRetrieveLevel = "SERIES"
                ds.StudyInstanceUID = one.study_uid
                ds.SeriesInstanceUID = one.series_uid
                out.append(ds)
                continue
            out += _image_identifiers(one, missing)
    return out


def _image_identifiers(series: Series, missing: list[str]) -> list[Dataset]:
    """Image-level identifiers naming the missing SOP Instance UIDs (0008,0018) of a series,
    in batches."""
    out = []
    for start in range(0, len(missing), IMAGE_BATCH):
        ds = Dataset()
        ds.QueryRetrieveLevel = "IMAGE"
        ds.StudyInstanceUID = series.study_uid
        ds.SeriesInstanceUID = series.series_uid
        ds.SOPInstanceUID = missing[start : start + IMAGE_BATCH]
        out.append(ds)
    return out
