"""Retrieval jobs in the index: every SQL statement on ``retrieve_jobs`` and ``retrieve_rows``.

A row goes ``queued`` -> ``querying`` -> ``retrieving`` -> ``done`` | ``partial`` | ``failed``
(with a reason). A row being worked is leased to its node (:mod:`engine.store.leases`); one
left ``querying`` or ``retrieving`` by a node that stopped is claimed again once its lease runs
out (at once by the same node name, :meth:`RetrievalStore.take_back_own`): what arrived
meanwhile is counted, not fetched twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from enum import StrEnum
from typing import Any

from engine.store.index import Index
from engine.store.leases import Leases, claimable, one_at_a_time
from engine.store.nodes import Node


class RowState(StrEnum):
    QUEUED = "queued"
    QUERYING = "querying"
    RETRIEVING = "retrieving"
    DONE = "done"
    PARTIAL = "partial"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINAL_STATES = (RowState.DONE, RowState.PARTIAL, RowState.FAILED, RowState.CANCELLED)
#: States a cancelled job's rows leave (a row under way stops after its current request).
_OPEN = ("queued", "querying", "retrieving")
#: A row a node may claim: open, and nobody holds it (or its holder's lease ran out; one ``?``).
_CLAIMABLE = f"r.state IN ('queued', 'querying', 'retrieving') AND {claimable('r')}"


@dataclass(frozen=True)
class RowSpec:
    """One line of a retrieval list: what to find, for whom, which series."""

    line: int
    accession: str = ""
    study_uid: str = ""
    patient_id: str = ""
    study_date: str = ""
    project: str = ""
    subject: str = ""
    event: str = ""
    modality: str = ""
    series_description: str = ""


@dataclass(frozen=True)
class Row:
    """A row as stored: its spec, job and progress."""

    id: int
    job: int
    pacs: str
    spec: RowSpec
    state: RowState
    reason: str
    studies: int
    expected: int
    arrived: int
    attempts: int


_SPEC = [f.name for f in fields(RowSpec)]
_ROW_SQL = (
    "SELECT r.id, r.job_ref, j.pacs, j.project, r.state, r.reason, r.studies, r.expected,"
    f" r.arrived, r.attempts, {', '.join('r.' + n for n in _SPEC)}"
    " FROM retrieve_rows r JOIN retrieve_jobs j ON j.id = r.job_ref"
)


def _row(r: Sequence[Any]) -> Row:
    spec = dict(zip(_SPEC, r[10:], strict=True))
    spec["project"] = spec["project"] or r[3]  # the job's --project for rows without one
    return Row(
        id=int(r[0]),
        job=int(r[1]),
        pacs=str(r[2]),
        spec=RowSpec(**spec),
        state=RowState(r[4]),
        reason=str(r[5]),
        studies=int(r[6]),
        expected=int(r[7]),
        arrived=int(r[8]),
        attempts=int(r[9]),
    )


class RetrievalStore:
    """The retrieval tables of one index; ``node`` (default: this process's) claims rows."""

    def __init__(self, index: Index, node: Node | None = None) -> None:
        self.index = index
        self.leases = Leases(index, "retrieve_rows", node)

    def create_job(
        self,
        pacs: str,
        project: str,
        list_name: str,
        rows: Sequence[RowSpec],
        by: str,
        now: float,
    ) -> int:
        """Queue a job of ``rows``; its id."""
        with self.index.transaction() as db:
            cur = db.execute(
                "INSERT INTO retrieve_jobs(pacs, project, list_name, created_at, created_by)"
                " VALUES (?,?,?,?,?)",
                (pacs, project, list_name, now, by),
            )
            job = int(cur.lastrowid or 0)
            db.executemany(
                f"INSERT INTO retrieve_rows(job_ref, updated_at, {', '.join(_SPEC)})"
                f" VALUES (?, ?, {', '.join('?' for _ in _SPEC)})",
                [(job, now, *(getattr(r, n) for n in _SPEC)) for r in rows],
            )
        return job

    def take_back_own(self) -> int:
        """At start: rows this node's name left half-way in a previous life may be claimed
        again at once (other nodes' wait for their leases to run out); how many."""
        return self.leases.expire_own()

    def next_queued(self, pacs: str) -> Row | None:
        """The oldest row of a job on ``pacs`` a node may claim (queued, or left half-way by a
        node whose lease ran out)."""
        with self.index.reading() as db:
            r = db.execute(
                _ROW_SQL + f" WHERE {_CLAIMABLE} AND j.pacs=? ORDER BY r.id LIMIT 1",
                (self.leases.clock(), pacs),
            ).fetchone()
        return None if r is None else _row(r)

    def pacs_with_queued(self) -> list[str]:
        """The PACS with rows a node may claim."""
        with self.index.reading() as db:
            rows = db.execute(
                "SELECT DISTINCT j.pacs FROM retrieve_rows r JOIN retrieve_jobs j"
                f" ON j.id = r.job_ref WHERE {_CLAIMABLE} ORDER BY j.pacs",
                (self.leases.clock(),),
            ).fetchall()
        return [str(r[0]) for r in rows]

    def studies_since(self, pacs: str, since: float) -> int:
        """Studies retrieved from ``pacs`` by rows finished at or after ``since``."""
        with self.index.reading() as db:
            row = db.execute(
                "SELECT coalesce(sum(r.studies), 0) FROM retrieve_rows r JOIN retrieve_jobs j"
                " ON j.id = r.job_ref WHERE j.pacs=? AND r.done_at >= ?",
                (pacs, since),
            ).fetchone()
        return int(row[0])

    def update(self, row_id: int, now: float, state: RowState, **progress: int | str) -> None:
        """Set a row's state (and ``reason``, ``studies``, ``expected``, ``arrived``,
        ``attempts`` when given). For a row this node claimed: only while it holds it (else
        :class:`~engine.store.leases.LeaseLost`, nothing written), and a row that ends or goes
        back to ``queued`` is released."""
        allowed = {"reason", "studies", "expected", "arrived", "attempts"}
        assert set(progress) <= allowed, progress
        sets = "".join(f", {k}=?" for k in progress)
        done = now if state in FINAL_STATES else None
        guard, held = self.leases.guard(row_id)
        release = bool(guard) and (state in FINAL_STATES or state is RowState.QUEUED)
        with self.index.transaction() as db:  # a cancelled row stays so (cancel may come mid-way)
            cur = db.execute(
                f"UPDATE retrieve_rows SET state=?, updated_at=?, done_at=?{sets}"
                f" WHERE id=? AND state != 'cancelled'{guard}",
                (str(state), now, done, *progress.values(), row_id, *held),
            )
            self.leases.check(db, cur.rowcount, row_id)
            if release:
                db.execute(self.leases.release_sql(), (row_id, self.leases.node.id))
        if release:
            self.leases.released(row_id)

    def under_way(self, pacs: str) -> int:
        """Rows of ``pacs`` being worked in the whole cluster (held under a lease not run
        out): each is one association with the PACS."""
        with self.index.reading() as db:
            return _under_way(db, pacs, self.leases.clock())

    def claim(self, row_id: int, now: float, pacs: str = "", limit: int = 0) -> bool:
        """Start a row (``querying``), leased to this node; False when it is no longer open
        (cancelled), another node holds it, or (``limit`` > 0) ``limit`` rows of ``pacs`` are
        under way in the cluster already (the count and the claim share one transaction, and
        the claims of one PACS take turns: see :func:`one_at_a_time`)."""
        leases = self.leases
        with self.index.transaction() as db:
            if limit:
                one_at_a_time(db, f"retrieve-claim:{pacs}")
                if _under_way(db, pacs, leases.clock()) >= limit:
                    return False
            cur = db.execute(
                "UPDATE retrieve_rows SET state='querying', claimed_by=?, lease_until=?,"
                " updated_at=? WHERE id=? AND state IN ('queued', 'querying', 'retrieving')"
                f" AND {claimable()}",
                (leases.node.id, leases.until(), now, row_id, leases.clock()),
            )
            mine = cur.rowcount == 1
        if mine:
            leases.took([row_id])
        return mine

    def release(self, row_id: int) -> None:
        """This node stops working on the row (whatever its state)."""
        self.leases.release(row_id)

    def cancelled(self, row_id: int) -> bool:
        """Whether the row was cancelled (the worker stops it between requests)."""
        with self.index.reading() as db:
            row = db.execute("SELECT state FROM retrieve_rows WHERE id=?", (row_id,)).fetchone()
        return row is not None and row[0] == RowState.CANCELLED.value

    def cancel(self, job: int, now: float) -> int:
        """Cancel a job's rows not yet finished; how many."""
        marks = ",".join("?" * len(_OPEN))
        with self.index.transaction() as db:
            cur = db.execute(
                "UPDATE retrieve_rows SET state='cancelled', reason='cancelled', updated_at=?,"
                f" done_at=? WHERE job_ref=? AND state IN ({marks})",
                (now, now, job, *_OPEN),
            )
            return int(cur.rowcount)

    def requeue(self, job: int, now: float) -> int:
        """Queue a job's partial, failed and cancelled rows again (what is held already is not
        fetched twice); how many."""
        with self.index.transaction() as db:
            cur = db.execute(
                "UPDATE retrieve_rows SET state='queued', reason='', updated_at=?, done_at=NULL"
                " WHERE job_ref=? AND state IN ('partial', 'failed', 'cancelled')",
                (now, job),
            )
            return int(cur.rowcount)

    def rows(self, job: int) -> list[Row]:
        with self.index.reading() as db:
            found = db.execute(_ROW_SQL + " WHERE r.job_ref=? ORDER BY r.line", (job,)).fetchall()
        return [_row(r) for r in found]

    def jobs(self, job: int | None = None) -> list[dict[str, Any]]:
        """Every job (or only ``job``: [] when there is none) with its row counts by state,
        newest first."""
        only, args = ("", ()) if job is None else (" WHERE id = ?", (job,))
        rows_of = "" if job is None else " WHERE job_ref = ?"
        with self.index.reading() as db:
            jobs = db.execute(
                "SELECT id, pacs, project, list_name, created_at, created_by FROM retrieve_jobs"
                f"{only} ORDER BY id DESC",
                args,
            ).fetchall()
            counts = db.execute(
                "SELECT job_ref, state, count(*), sum(studies), sum(expected), sum(arrived)"
                f" FROM retrieve_rows{rows_of} GROUP BY job_ref, state",
                args,
            ).fetchall()
        out = []
        for job_id, pacs, project, list_name, created_at, by in jobs:
            states = {str(s): 0 for s in RowState}
            totals = {"studies": 0, "expected": 0, "arrived": 0}
            for ref, state, n, studies, expected, arrived in counts:
                if ref == job_id:
                    states[str(state)] = int(n)
                    totals["studies"] += int(studies or 0)
                    totals["expected"] += int(expected or 0)
                    totals["arrived"] += int(arrived or 0)
            out.append(
                {
                    "job": int(job_id),
                    "pacs": str(pacs),
                    "project": str(project),
                    "list": str(list_name),
                    "created_at": float(created_at),
                    "created_by": str(by),
                    "rows": states,
                    **totals,
                }
            )
        return out

    def held_instances(self, sop_uids: Sequence[str]) -> set[str]:
        """Those of ``sop_uids`` (SOP Instance UID (0008,0018)) the index holds."""
        found: set[str] = set()
        with self.index.reading() as db:
            for start in range(0, len(sop_uids), 500):
                chunk = list(sop_uids[start : start + 500])
                marks = ",".join("?" for _ in chunk)
                found.update(
                    str(r[0])
                    for r in db.execute(
                        "SELECT sop_instance_uid FROM instances"
                        f" WHERE sop_instance_uid IN ({marks})",
                        chunk,
                    )
                )
        return found

    def series_counts(self, series_uids: Sequence[str]) -> dict[str, int]:
        """Instances the index holds in each of ``series_uids`` (Series Instance UID
        (0020,000E)); a series it holds nothing of is left out."""
        found: dict[str, int] = {}
        with self.index.reading() as db:
            for start in range(0, len(series_uids), 500):
                chunk = list(series_uids[start : start + 500])
                marks = ",".join("?" for _ in chunk)
                found.update(
                    (str(r[0]), int(r[1]))
                    for r in db.execute(
                        "SELECT s.series_uid, count(*) FROM series s"
                        " JOIN instances i ON i.series_ref = s.id"
                        f" WHERE s.series_uid IN ({marks}) GROUP BY s.series_uid",
                        chunk,
                    )
                )
        return found


def _under_way(db: Any, pacs: str, now: float) -> int:
    """Rows of ``pacs`` held by a node whose lease has not run out at ``now``."""
    row = db.execute(
        "SELECT count(*) FROM retrieve_rows r JOIN retrieve_jobs j ON j.id = r.job_ref"
        " WHERE j.pacs = ? AND r.state IN ('querying', 'retrieving')"
        " AND r.claimed_by IS NOT NULL AND r.lease_until >= ?",
        (pacs, now),
    ).fetchone()
    return int(row[0])
