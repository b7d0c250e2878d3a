"""The durable outbox: tables ``transfers`` and ``transfer_items`` of the index database.

The ``send`` step queues one transfer per (pipeline run, destination) with every instance it
is to deliver, in one transaction. The worker (:mod:`engine.transfer.worker`) claims due
transfers, hands them to their destination, and records each instance the destination confirms
as soon as it does (one commit each), so a crash or a restart never sends a confirmed instance
again. A transfer that fails is retried with exponential backoff and jitter; beyond its
destination's ``retry.max_attempts`` it becomes a dead letter (``failed``) and its study is
quarantined as ``transfer_failed``. Nothing is dropped: ``fiona transfers retry`` queues it again.

States: ``queued`` (waiting for ``next_try_at``), ``sending`` (a node's worker has it, leased:
:mod:`engine.store.leases`; one whose node stopped is claimed again once the lease runs out, its
confirmed instances are not sent again), ``done``, ``failed``, ``cancelled``. Transfers of one
study to one destination run one at a time, oldest first, so a follow-up (series that arrived
after the study was sent) reaches the peer after the study.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from engine.store.db import Connection
from engine.store.index import Index
from engine.store.leases import Leases, claimable, one_at_a_time, skip_locked
from engine.store.nodes import Node
from engine.transfer.base import InstanceResult, OutgoingInstance, StudyBatch

__all__ = ["Outbox", "RetryPolicy", "TransferItem", "TransferRecord", "TransferState"]


class TransferState(StrEnum):
    """Where a transfer is (``transfers.state``)."""

    QUEUED = "queued"
    SENDING = "sending"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


#: States a transfer can still leave on its own.
OPEN_STATES = (TransferState.QUEUED, TransferState.SENDING)


@dataclass(frozen=True)
class RetryPolicy:
    """A destination's ``retry`` option: how often and how patiently a transfer is retried.

    The n-th failed attempt waits ``backoff_seconds * 2**(n-1)`` seconds, at most
    ``max_backoff_seconds``, each spread by +-``jitter`` (a fraction) so transfers queued
    together do not hammer a peer together when it comes back. After ``max_attempts`` failed
    attempts the transfer is a dead letter.
    """

    max_attempts: int = 20
    backoff_seconds: float = 30.0
    max_backoff_seconds: float = 3600.0
    jitter: float = 0.2

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any]) -> RetryPolicy:
        """From a destination's ``retry`` mapping (missing keys take the defaults)."""
        default = cls()
        return cls(
            max_attempts=int(options.get("max_attempts", default.max_attempts)),
            backoff_seconds=float(options.get("backoff_seconds", default.backoff_seconds)),
            max_backoff_seconds=float(
                options.get("max_backoff_seconds", default.max_backoff_seconds)
            ),
            jitter=float(options.get("jitter", default.jitter)),
        )

    def delay(self, attempts: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after the ``attempts``-th failed attempt (1 or more)."""
        base = min(self.backoff_seconds * 2 ** max(attempts - 1, 0), self.max_backoff_seconds)
        spread = (rng or random).uniform(-self.jitter, self.jitter)
        return float(max(0.0, base * (1.0 + spread)))


@dataclass(frozen=True)
class TransferRecord:
    """One row of ``transfers`` with its item counts; times in seconds since the epoch (UTC)."""

    id: int
    project: str
    destination: str
    study_uid: str
    export_uid: str
    run_id: int | None
    follow_up: int
    subject: str
    event: str
    state: TransferState
    attempts: int
    next_try_at: float
    last_error: str
    created_at: float
    updated_at: float
    finished_at: float | None
    n_items: int = 0
    n_sent: int = 0
    n_failed: int = 0


@dataclass(frozen=True)
class TransferItem:
    """One row of ``transfer_items``: an instance of a transfer and what its peer said."""

    sop_instance_uid: str
    series_uid: str
    path: str
    size: int
    state: str
    status: int | None
    detail: str
    sent_at: float | None


_RECORD_SQL = """
SELECT t.id, t.project, t.destination, t.study_uid, t.export_uid, t.run_id, t.follow_up,
       t.subject, t.event, t.state, t.attempts, t.next_try_at, t.last_error, t.created_at,
       t.updated_at, t.finished_at,
       (SELECT COUNT(*) FROM transfer_items i WHERE i.transfer_id = t.id),
       (SELECT COUNT(*) FROM transfer_items i WHERE i.transfer_id = t.id AND i.state = 'sent'),
       (SELECT COUNT(*) FROM transfer_items i WHERE i.transfer_id = t.id AND i.state = 'failed')
FROM transfers t
"""


def _record(row: Sequence[Any]) -> TransferRecord:
    fields = list(row)
    fields[9] = TransferState(fields[9])
    return TransferRecord(*fields)


class Outbox:
    """The outbox tables of one index; paths of items are relative to ``data_dir`` when inside.

    Every method is one transaction (or one read) on the index's shared connection. ``node``
    (default: this process's) is who claims transfers.
    """

    def __init__(self, index: Index, data_dir: Path, node: Node | None = None) -> None:
        self.index = index
        self.data_dir = data_dir
        self.leases = Leases(index, "transfers", node)

    # -- queueing -------------------------------------------------------------------------------

    def enqueue(
        self,
        *,
        project: str,
        destination: str,
        study_uid: str,
        export_uid: str,
        run_id: int | None,
        follow_up: int,
        subject: str,
        event: str,
        items: Sequence[OutgoingInstance],
        now: float | None = None,
    ) -> int:
        """Queue a transfer; returns its id. Queuing the same (run, destination) again returns
        the existing transfer unchanged, so a re-run send step never doubles a transfer."""
        now = time.time() if now is None else now
        with self.index.transaction() as db:
            if run_id is not None:
                row = db.execute(
                    "SELECT id FROM transfers WHERE run_id = ? AND destination = ?",
                    (run_id, destination),
                ).fetchone()
                if row is not None:
                    return int(row[0])
            cur = db.execute(
                "INSERT INTO transfers (project, destination, study_uid, export_uid, run_id,"
                " follow_up, subject, event, state, next_try_at, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'queued', ?, ?, ?)",
                (project, destination, study_uid, export_uid, run_id, follow_up, subject, event,
                 now, now, now),
            )
            transfer_id = int(cur.lastrowid or 0)
            db.executemany(
                "INSERT INTO transfer_items (transfer_id, sop_instance_uid,"
                " sop_class_uid, transfer_syntax, series_uid, series_number, modality, path,"
                " size, kind, name, seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT DO NOTHING",
                [
                    (transfer_id, i.sop_instance_uid, i.sop_class_uid, i.transfer_syntax,
                     i.series_uid, i.series_number, i.modality, self._rel(i.path), i.size,
                     i.kind, i.name, seq)
                    for seq, i in enumerate(items, 1)
                ],
            )
        return transfer_id

    def take_back_own(self) -> int:
        """At start: transfers this node's name left ``sending`` in a previous life may be
        claimed again at once (other nodes' wait for their leases to run out); how many."""
        return self.leases.expire_own()

    # -- the worker's side ----------------------------------------------------------------------

    def claim_due(
        self, now: float, slots: Mapping[tuple[str, str], int]
    ) -> list[TransferRecord]:
        """Claim due transfers for this node (``sending``, leased) and return them: at most
        ``slots[(project, destination)]`` transfers of a destination are sending at once in
        the whole cluster (destinations not in ``slots`` get none: not configured here).
        Due: queued with ``next_try_at`` reached, or sending by a node whose lease ran out. A
        transfer waits while an older one of its study to the same destination is still
        open."""
        leases = self.leases
        lease_now = leases.clock()
        claimed: list[int] = []
        with self.index.transaction() as db:
            # The count and the claims of two nodes must not interleave, or both could fill
            # the same free slot.
            one_at_a_time(db, "outbox-claim")
            busy = {
                (str(p), str(d)): int(n)
                for p, d, n in db.execute(
                    "SELECT project, destination, count(*) FROM transfers WHERE state = 'sending'"
                    " AND claimed_by IS NOT NULL AND lease_until >= ?"
                    " GROUP BY project, destination",
                    (lease_now,),
                )
            }
            free = {key: n - busy.get(key, 0) for key, n in slots.items()}
            rows = db.execute(
                "SELECT t.id, t.project, t.destination FROM transfers t"
                " WHERE ((t.state = 'queued' AND t.next_try_at <= ?)"
                f" OR (t.state = 'sending' AND {claimable('t')})) AND NOT EXISTS ("
                "   SELECT 1 FROM transfers o WHERE o.project = t.project"
                "   AND o.destination = t.destination AND o.study_uid = t.study_uid"
                "   AND o.id < t.id AND o.state IN ('queued', 'sending'))"
                " ORDER BY t.next_try_at, t.id" + skip_locked(db),
                (now, lease_now),
            ).fetchall()
            for transfer_id, project, destination in rows:
                key = (str(project), str(destination))
                if free.get(key, 0) <= 0:
                    continue
                cur = db.execute(
                    "UPDATE transfers SET state = 'sending', claimed_by = ?, lease_until = ?,"
                    " updated_at = ? WHERE id = ? AND (state = 'queued' OR "
                    + claimable()
                    + ")",
                    (leases.node.id, leases.until(), now, transfer_id, lease_now),
                )
                if cur.rowcount == 1:
                    free[key] -= 1
                    claimed.append(int(transfer_id))
        leases.took(claimed)
        records = [self.get(i) for i in claimed]
        return [r for r in records if r is not None]

    def release(self, transfer_id: int) -> None:
        """This node stops working on the transfer (whatever its state)."""
        self.leases.release(transfer_id)

    def batch(self, record: TransferRecord) -> StudyBatch:
        """The study batch of a transfer: all its instances, in series and instance order."""
        with self.index.reading() as db:
            rows = db.execute(
                "SELECT sop_instance_uid, sop_class_uid, transfer_syntax, series_uid, path,"
                " size, series_number, modality, kind, name FROM transfer_items"
                " WHERE transfer_id = ?"
                " ORDER BY seq, sop_instance_uid",
                (record.id,),
            ).fetchall()
        instances = tuple(
            OutgoingInstance(
                sop_instance_uid=r[0],
                sop_class_uid=r[1],
                transfer_syntax=r[2],
                series_uid=r[3],
                path=self.data_dir / r[4],
                size=int(r[5]),
                series_number=r[6],
                modality=r[7],
                kind=r[8],
                name=r[9],
            )
            for r in rows
        )
        return StudyBatch(
            transfer_id=record.id,
            project=record.project,
            study_uid=record.export_uid,
            subject=record.subject,
            event=record.event,
            follow_up=record.follow_up,
            instances=instances,
        )

    def already_sent(self, record: TransferRecord) -> frozenset[str]:
        """SOP Instance UIDs of the transfer the destination already confirmed, by this
        transfer or an earlier one of the same project to the same destination."""
        with self.index.reading() as db:
            rows = db.execute(
                "SELECT i.sop_instance_uid FROM transfer_items i WHERE i.transfer_id = ?"
                " AND (i.state = 'sent' OR EXISTS (SELECT 1 FROM transfer_items s"
                "  JOIN transfers o ON o.id = s.transfer_id"
                "  WHERE s.sop_instance_uid = i.sop_instance_uid AND s.state = 'sent'"
                "  AND o.project = ? AND o.destination = ?))",
                (record.id, record.project, record.destination),
            ).fetchall()
        return frozenset(r[0] for r in rows)

    def confirm(self, transfer_id: int, result: InstanceResult, now: float | None = None) -> None:
        """Record what the peer said about one instance (committed before this returns)."""
        now = time.time() if now is None else now
        with self.index.transaction() as db:
            db.execute(
                "UPDATE transfer_items SET state = ?, status = ?, detail = ?, sent_at = ?"
                " WHERE transfer_id = ? AND sop_instance_uid = ?",
                (
                    "sent" if result.ok else "failed",
                    result.status,
                    result.detail[:500],
                    now if result.ok else None,
                    transfer_id,
                    result.sop_instance_uid,
                ),
            )

    def unconfirmed(self, transfer_id: int) -> list[TransferItem]:
        """Items of a transfer not (yet) confirmed ``sent``."""
        return [i for i in self.items(transfer_id) if i.state != "sent"]

    def finish(self, transfer_id: int, now: float | None = None) -> None:
        """The destination has every instance: the transfer is done."""
        now = time.time() if now is None else now
        with self.index.transaction() as db:
            self._check_held(db, transfer_id)
            # Only a transfer still being sent: one cancelled meanwhile stays cancelled.
            db.execute(
                "UPDATE transfers SET state = 'done', last_error = '', updated_at = ?,"
                " finished_at = ? WHERE id = ? AND state = 'sending'",
                (now, now, transfer_id),
            )
            db.execute(self.leases.release_sql(), (transfer_id, self.leases.node.id))
        self.leases.released(transfer_id)

    def fail_attempt(
        self,
        transfer_id: int,
        error: str,
        policy: RetryPolicy,
        now: float | None = None,
        rng: random.Random | None = None,
    ) -> TransferState:
        """Count a failed attempt: queued again after the backoff, or ``failed`` (a dead
        letter) once the policy's attempts are used up. Returns the new state."""
        now = time.time() if now is None else now
        with self.index.transaction() as db:
            self._check_held(db, transfer_id)
            row = db.execute(
                "SELECT attempts, state FROM transfers WHERE id = ?", (transfer_id,)
            ).fetchone()
            if row is None:
                raise KeyError(transfer_id)
            db.execute(self.leases.release_sql(), (transfer_id, self.leases.node.id))
            if row[1] == TransferState.CANCELLED:
                self.leases.released(transfer_id)
                return TransferState.CANCELLED  # cancelled while it was being sent
            attempts = int(row[0]) + 1
            if attempts >= policy.max_attempts:
                state, next_try, finished = TransferState.FAILED, now, now
            else:
                state = TransferState.QUEUED
                next_try, finished = now + policy.delay(attempts, rng), None
            db.execute(
                "UPDATE transfers SET state = ?, attempts = ?, next_try_at = ?, last_error = ?,"
                " updated_at = ?, finished_at = ? WHERE id = ?",
                (state, attempts, next_try, error[:1000], now, finished, transfer_id),
            )
        self.leases.released(transfer_id)
        return state

    def _check_held(self, db: Connection, transfer_id: int) -> None:
        """Raise :class:`~engine.store.leases.LeaseLost` (in ``db``'s transaction, so nothing
        is written) when this node claimed the transfer and another node holds it now."""
        if self.leases.guard(transfer_id)[0]:
            row = db.execute(
                "SELECT 1 FROM transfers WHERE id = ? AND claimed_by = ?",
                (transfer_id, self.leases.node.id),
            ).fetchone()
            self.leases.check(db, 0 if row is None else 1, transfer_id)

    # -- operators' side ------------------------------------------------------------------------

    def get(self, transfer_id: int) -> TransferRecord | None:
        with self.index.reading() as db:
            row = db.execute(_RECORD_SQL + " WHERE t.id = ?", (transfer_id,)).fetchone()
        return None if row is None else _record(row)

    def find(
        self,
        *,
        states: Sequence[str] = (),
        project: str | None = None,
        study_uid: str | None = None,
        limit: int = 200,
    ) -> list[TransferRecord]:
        """Transfers, newest first, filtered by state(s), project and (archived) study UID."""
        where: list[str] = []
        args: list[object] = []
        if states:
            where.append(f"t.state IN ({', '.join('?' for _ in states)})")
            args += list(states)
        if project:
            where.append("t.project = ?")
            args.append(project)
        if study_uid:
            where.append("t.study_uid = ?")
            args.append(study_uid)
        sql = _RECORD_SQL + (" WHERE " + " AND ".join(where) if where else "")
        with self.index.reading() as db:
            rows = db.execute(sql + " ORDER BY t.id DESC LIMIT ?", (*args, limit)).fetchall()
        return [_record(r) for r in rows]

    def items(self, transfer_id: int) -> list[TransferItem]:
        with self.index.reading() as db:
            rows = db.execute(
                "SELECT sop_instance_uid, series_uid, path, size, state, status, detail,"
                " sent_at FROM transfer_items WHERE transfer_id = ?"
                " ORDER BY seq, sop_instance_uid",
                (transfer_id,),
            ).fetchall()
        return [TransferItem(*r) for r in rows]

    def retry(self, transfer_id: int, now: float | None = None) -> TransferRecord:
        """Queue a failed, cancelled or waiting transfer now, with a fresh attempt count.
        Instances already confirmed stay confirmed; failed ones are tried again."""
        now = time.time() if now is None else now
        with self.index.transaction() as db:
            state = self._state(db, transfer_id)
            if state in (TransferState.DONE, TransferState.SENDING):
                raise ValueError(f"transfer {transfer_id} is {state}; nothing to retry")
            db.execute(
                "UPDATE transfers SET state = 'queued', attempts = 0, next_try_at = ?,"
                " updated_at = ?, finished_at = NULL WHERE id = ?",
                (now, now, transfer_id),
            )
            db.execute(
                "UPDATE transfer_items SET state = 'pending' WHERE transfer_id = ?"
                " AND state = 'failed'",
                (transfer_id,),
            )
        record = self.get(transfer_id)
        assert record is not None
        return record

    def cancel(self, transfer_id: int, now: float | None = None) -> TransferRecord:
        """Stop a queued, sending or failed transfer; instances sent stay sent."""
        now = time.time() if now is None else now
        with self.index.transaction() as db:
            state = self._state(db, transfer_id)
            if state in (TransferState.DONE, TransferState.CANCELLED):
                raise ValueError(f"transfer {transfer_id} is {state}; nothing to cancel")
            db.execute(
                "UPDATE transfers SET state = 'cancelled', updated_at = ?, finished_at = ?"
                " WHERE id = ?",
                (now, now, transfer_id),
            )
        record = self.get(transfer_id)
        assert record is not None
        return record

    def state_of(self, transfer_id: int) -> TransferState | None:
        with self.index.reading() as db:
            row = db.execute("SELECT state FROM transfers WHERE id = ?", (transfer_id,)).fetchone()
        return None if row is None else TransferState(row[0])

    @staticmethod
    def _state(db: Connection, transfer_id: int) -> TransferState:
        row = db.execute("SELECT state FROM transfers WHERE id = ?", (transfer_id,)).fetchone()
        if row is None:
            raise KeyError(f"no transfer {transfer_id}")
        return TransferState(row[0])

    def _rel(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.data_dir))
        except ValueError:
            return str(path)
