"""Modality Performed Procedure Steps in the index: what the receiver's MPPS SCP records.

A step is created IN PROGRESS (N-CREATE) and may be set (N-SET) until it is COMPLETED or
DISCONTINUED, after which it is final (PS3.4 F.7.2.2). Only UIDs, the status and our own times
are kept (the ``mpps`` tables of migration 12). The tracker reads :meth:`MppsStore.completed_for`
to complete a study at its last referenced instance; ``fiona status``, ``fiona explain`` and
the audit show the steps.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from engine.store.audit import uid_token
from engine.store.db import Connection, IntegrityError
from engine.store.index import Index


class StepStatus(StrEnum):
    """Performed Procedure Step Status (0040,0252)."""

    IN_PROGRESS = "IN PROGRESS"
    COMPLETED = "COMPLETED"
    DISCONTINUED = "DISCONTINUED"

    @property
    def final(self) -> bool:
        return self is not StepStatus.IN_PROGRESS


class StepError(Exception):
    """A request the step's state does not allow; ``kind`` names which (see :class:`MppsStore`)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


#: StepError kinds.
DUPLICATE, NO_SUCH_STEP, FINAL = "duplicate", "no such step", "final"


@dataclass(frozen=True)
class StepUpdate:
    """What one N-CREATE or N-SET says about a step. ``studies`` and ``instances`` ((series
    UID, SOP Instance UID) pairs) are None when the message does not carry them (an N-SET
    leaves them as they were); ``status`` None likewise."""

    status: StepStatus | None
    studies: tuple[str, ...] | None = None
    instances: tuple[tuple[str, str], ...] | None = None


@dataclass(frozen=True)
class Step:
    """One recorded step; times in seconds since the epoch."""

    sop_instance_uid: str
    status: StepStatus
    studies: tuple[str, ...]
    n_instances: int
    created_at: float
    updated_at: float
    ended_at: float | None


class MppsStore:
    """The MPPS tables of one index; every statement on them."""

    def __init__(self, index: Index) -> None:
        self.index = index

    def create(self, uid: str, update: StepUpdate, calling_ae: str, now: float) -> None:
        """Record a new step (IN PROGRESS); raises :class:`StepError` (``duplicate``) when
        ``uid`` is known."""
        with self.index.transaction() as db:
            try:
                cur = db.execute(
                    "INSERT INTO mpps(sop_instance_uid, status, calling_ae, created_at, updated_at)"
                    " VALUES (?,?,?,?,?)",
                    (uid, str(update.status or StepStatus.IN_PROGRESS), calling_ae, now, now),
                )
            except IntegrityError as exc:
                raise StepError(DUPLICATE, "the step exists already") from exc
            self._replace(db, int(cur.lastrowid or 0), update)

    def set(self, uid: str, update: StepUpdate, now: float) -> StepStatus:
        """Apply an N-SET; the step's status after it. Raises :class:`StepError`
        (``no such step``, ``final``)."""
        with self.index.transaction() as db:
            row = db.execute(
                "SELECT id, status FROM mpps WHERE sop_instance_uid=?", (uid,)
            ).fetchone()
            if row is None:
                raise StepError(NO_SUCH_STEP, "no such step")
            step_id, status = int(row[0]), StepStatus(row[1])
            if status.final:
                raise StepError(FINAL, f"the step is {status} and may no longer be updated")
            status = update.status or status
            db.execute(
                "UPDATE mpps SET status=?, updated_at=?, ended_at=? WHERE id=?",
                (str(status), now, now if status.final else None, step_id),
            )
            self._replace(db, step_id, update)
        return status

    @staticmethod
    def _replace(db: Connection, step_id: int, update: StepUpdate) -> None:
        if update.studies is not None:
            db.execute("DELETE FROM mpps_studies WHERE mpps_ref=?", (step_id,))
            db.executemany(
                "INSERT INTO mpps_studies(mpps_ref, study_uid) VALUES (?,?) ON CONFLICT DO NOTHING",
                [(step_id, uid) for uid in update.studies],
            )
        if update.instances is not None:
            db.execute("DELETE FROM mpps_instances WHERE mpps_ref=?", (step_id,))
            db.executemany(
                "INSERT INTO mpps_instances(mpps_ref, series_uid, sop_instance_uid)"
                " VALUES (?,?,?) ON CONFLICT DO NOTHING",
                [(step_id, series, sop) for series, sop in update.instances],
            )

    def steps_for(self, study_uid: str) -> list[Step]:
        """The steps of a study, oldest first."""
        with self.index.reading() as db:
            rows = db.execute(
                "SELECT m.id, m.sop_instance_uid, m.status, m.created_at, m.updated_at,"
                " m.ended_at, (SELECT count(*) FROM mpps_instances i WHERE i.mpps_ref = m.id)"
                " FROM mpps m JOIN mpps_studies s ON s.mpps_ref = m.id WHERE s.study_uid=?"
                " ORDER BY m.created_at, m.id",
                (study_uid,),
            ).fetchall()
            return [self._step(db, row) for row in rows]

    def get(self, uid: str) -> Step | None:
        with self.index.reading() as db:
            row = db.execute(
                "SELECT m.id, m.sop_instance_uid, m.status, m.created_at, m.updated_at,"
                " m.ended_at, (SELECT count(*) FROM mpps_instances i WHERE i.mpps_ref = m.id)"
                " FROM mpps m WHERE m.sop_instance_uid=?",
                (uid,),
            ).fetchone()
            return None if row is None else self._step(db, row)

    @staticmethod
    def _step(db: Connection, row: tuple[object, ...]) -> Step:
        studies = tuple(
            str(r[0])
            for r in db.execute(
                "SELECT study_uid FROM mpps_studies WHERE mpps_ref=? ORDER BY study_uid", (row[0],)
            )
        )
        ended = row[5]
        return Step(
            sop_instance_uid=str(row[1]),
            status=StepStatus(str(row[2])),
            studies=studies,
            n_instances=int(str(row[6])),
            created_at=float(str(row[3])),
            updated_at=float(str(row[4])),
            ended_at=None if ended is None else float(str(ended)),
        )

    def missing_of_completed(self, study_uid: str, seen_upto: int, since: float) -> list[int]:
        """For each COMPLETED step of the study that ended at or after ``since`` and
        references instances: how many of them the index does not hold up to instance id
        ``seen_upto`` (those the tracker has seen). Empty when there is no such step."""
        with self.index.reading() as db:
            rows = db.execute(
                "SELECT (SELECT count(*) FROM mpps_instances r WHERE r.mpps_ref = m.id AND NOT"
                " EXISTS (SELECT 1 FROM instances i WHERE i.sop_instance_uid = r.sop_instance_uid"
                " AND i.id <= ?)) FROM mpps m JOIN mpps_studies s ON s.mpps_ref = m.id"
                " WHERE s.study_uid = ? AND m.status = 'COMPLETED' AND m.ended_at >= ?"
                " AND EXISTS (SELECT 1 FROM mpps_instances r WHERE r.mpps_ref = m.id)",
                (seen_upto, study_uid, since),
            ).fetchall()
        return [int(r[0]) for r in rows]

    def counts(self, since: float = 0.0) -> dict[str, int]:
        """Steps by status, among those updated at or after ``since``."""
        with self.index.reading() as db:
            rows = db.execute(
                "SELECT status, count(*) FROM mpps WHERE updated_at >= ? GROUP BY status", (since,)
            ).fetchall()
        found = {str(s): int(n) for s, n in rows}
        return {str(s): found.get(str(s), 0) for s in StepStatus}


def study_tokens(studies: Iterable[str]) -> list[str]:
    """The audit tokens of ``studies`` (the audit names no UID)."""
    return [uid_token(s) for s in studies]
