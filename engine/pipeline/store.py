"""Durable pipeline runs: tables ``pipeline_runs`` and ``pipeline_steps`` of the index database.

A run is created once per (study, project, follow-up) when the study is complete for the project
(``follow_up`` counts the runs for series that arrived later). The runner records every step's
outcome, together with the steps' shared state, in one transaction before it starts the next
step, so a restart resumes at the first step not done and never repeats a finished one.

Run states: ``pending`` (waiting, possibly until ``next_try_at``), ``running`` (a node's runner
is at it, or was when it stopped: such runs are taken up again once its lease runs out),
``done``, ``quarantined`` (the study was held with ``reason``), ``failed`` (reserved for runs
given up without a quarantine).

Several nodes share the runs: a runner claims one run at a time with a lease
(:meth:`RunStore.claim_next`, :mod:`engine.store.leases`), its outcomes are written only while it
holds the run (:class:`~engine.store.leases.LeaseLost` otherwise), and it releases the run when
it stops working on it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from engine.pipeline.context import SeriesInput
from engine.pipeline.outcome import Done, Outcome, Quarantined, Retry
from engine.store.db import Connection
from engine.store.index import Index
from engine.store.leases import Leases, claimable, one_at_a_time, skip_locked
from engine.store.nodes import Node

__all__ = ["RunRecord", "RunState", "RunStore", "StepRecord", "StepState"]


class RunState(StrEnum):
    """Where a run is (``pipeline_runs.state``)."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    QUARANTINED = "quarantined"
    FAILED = "failed"


class StepState(StrEnum):
    """A step's last outcome (``pipeline_steps.state``); ``error``: it raised."""

    DONE = "done"
    QUARANTINED = "quarantined"
    RETRY = "retry"
    ERROR = "error"


@dataclass(frozen=True)
class RunRecord:
    """One row of ``pipeline_runs``; times in seconds since the epoch (UTC)."""

    id: int
    study_uid: str
    project: str
    subject: str
    event: str
    follow_up: int
    series: tuple[str, ...]
    state: RunState
    reason: str
    detail: str
    attempts: int
    next_try_at: float | None
    step_state: dict[str, Any] = field(compare=False, hash=False)
    created_at: float = 0.0
    updated_at: float = 0.0

    def summary(self) -> dict[str, Any]:
        """What operators are shown of a run (no subject: it may be a patient's record id)."""
        return {
            "id": self.id,
            "project": self.project,
            "follow_up": self.follow_up,
            "state": self.state.value,
            "reason": self.reason,
            "detail": self.detail,
        }


@dataclass(frozen=True)
class StepRecord:
    """One row of ``pipeline_steps``."""

    run_id: int
    idx: int
    name: str
    state: StepState
    reason: str
    detail: str
    finished_at: float


_RUN_COLUMNS = (
    "id, study_uid, project, subject, event, follow_up, series, state, reason, detail, attempts,"
    " next_try_at, state_json, created_at, updated_at"
)


def _run(row: Sequence[Any]) -> RunRecord:
    return RunRecord(
        id=int(row[0]),
        study_uid=str(row[1]),
        project=str(row[2]),
        subject=str(row[3]),
        event=str(row[4]),
        follow_up=int(row[5]),
        series=tuple(json.loads(row[6])),
        state=RunState(row[7]),
        reason=str(row[8]),
        detail=str(row[9]),
        attempts=int(row[10]),
        next_try_at=None if row[11] is None else float(row[11]),
        step_state=json.loads(row[12]),
        created_at=float(row[13]),
        updated_at=float(row[14]),
    )


def _json(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


class RunStore:
    """Pipeline runs in the index's database, through its shared connection; ``node`` (default:
    this process's) is who claims them."""

    def __init__(self, index: Index, node: Node | None = None) -> None:
        self.index = index
        self.leases = Leases(index, "pipeline_runs", node)

    # -- runs ---------------------------------------------------------------------------------

    def create_run(
        self,
        study_uid: str,
        project: str,
        subject: str,
        event: str,
        follow_up: int,
        series_uids: Sequence[str],
    ) -> int:
        """The id of the run of (study, project, follow-up), created pending if it is new (a
        second call with the same key changes nothing)."""
        now = time.time()
        with self.index.transaction() as db:
            db.execute(
                "INSERT INTO pipeline_runs(study_uid, project, subject, event, follow_up, series,"
                " created_at, updated_at) VALUES (?,?,?,?,?,?,?,?)"
                " ON CONFLICT(study_uid, project, follow_up) DO NOTHING",
                (study_uid, project, subject, event, follow_up, _json(list(series_uids)), now, now),
            )
            return _run_id(db, study_uid, project, follow_up)

    @staticmethod
    def add_next_run(
        db: Connection,
        study_uid: str,
        project: str,
        subject: str,
        event: str,
        series_uids: Sequence[str],
    ) -> tuple[int, int]:
        """In the caller's transaction on ``db``: a pending run of the study for ``project``
        with the next follow-up number (after the route's count of runs, ``study_routes.runs``,
        and after every run already there); (its id, that number). The caller sets the route's
        count to the number plus one in the same transaction. Whoever adds a run (the tracker,
        a REDCap transfer request, an operator's release) takes the study's turn first, so two
        of them never take one number."""
        one_at_a_time(db, f"runs:{study_uid}")
        route = db.execute(
            "SELECT runs FROM study_routes WHERE study_uid=? AND project=?", (study_uid, project)
        ).fetchone()
        last = db.execute(
            "SELECT max(follow_up) FROM pipeline_runs WHERE study_uid=? AND project=?",
            (study_uid, project),
        ).fetchone()
        follow_up = max(int(route[0]) if route else 0, -1 if last[0] is None else last[0] + 1)
        now = time.time()
        db.execute(
            "INSERT INTO pipeline_runs(study_uid, project, subject, event, follow_up, series,"
            " created_at, updated_at) VALUES (?,?,?,?,?,?,?,?)",
            (study_uid, project, subject, event, follow_up, _json(list(series_uids)), now, now),
        )
        return _run_id(db, study_uid, project, follow_up), follow_up

    def get(self, run_id: int) -> RunRecord | None:
        """One run, or None."""
        with self.index.reading() as db:
            row = db.execute(
                f"SELECT {_RUN_COLUMNS} FROM pipeline_runs WHERE id=?", (run_id,)
            ).fetchone()
        return _run(row) if row else None

    def runnable(self, now: float) -> list[RunRecord]:
        """Pending and interrupted runs whose time has come, oldest first."""
        with self.index.reading() as db:
            rows = db.execute(
                f"SELECT {_RUN_COLUMNS} FROM pipeline_runs WHERE state IN ('pending', 'running')"
                " AND (next_try_at IS NULL OR next_try_at <= ?) ORDER BY id",
                (now,),
            ).fetchall()
        return [_run(r) for r in rows]

    def claim_next(
        self, now: float, projects: Sequence[str], after: int = 0
    ) -> RunRecord | None:
        """Claim the oldest runnable run of ``projects`` with an id above ``after`` that no
        node holds (or whose holder's lease ran out): it is ``running``, leased to this node,
        and returned; None when there is none. One statement, so two nodes never get one run.
        """
        if not projects:
            return None
        leases = self.leases
        lease_now = leases.clock()
        marks = ",".join("?" * len(projects))
        with self.index.transaction() as db:
            row = db.execute(
                "UPDATE pipeline_runs SET state='running', claimed_by=?, lease_until=?,"
                " updated_at=? WHERE id IN (SELECT id FROM pipeline_runs"
                " WHERE state IN ('pending', 'running')"
                " AND (next_try_at IS NULL OR next_try_at <= ?)"
                f" AND {claimable()} AND id > ? AND project IN ({marks}) ORDER BY id LIMIT 1"
                f"{skip_locked(db)}) AND {claimable()} RETURNING {_RUN_COLUMNS}",
                (leases.node.id, leases.until(), now, now, lease_now, after, *projects,
                 lease_now),
            ).fetchone()
        if row is None:
            return None
        run = _run(row)
        leases.took([run.id])
        return run

    def release(self, run_id: int) -> None:
        """This node stops working on the run (whatever its state): any node may claim it."""
        self.leases.release(run_id)

    def waiting(self, now: float, projects: Sequence[str]) -> list[RunRecord]:
        """Runnable runs of projects not in ``projects`` (none of this node's pipelines)."""
        marks = ",".join("?" * len(projects))
        other = f" AND project NOT IN ({marks})" if projects else ""
        with self.index.reading() as db:
            rows = db.execute(
                f"SELECT {_RUN_COLUMNS} FROM pipeline_runs WHERE state IN ('pending', 'running')"
                f" AND (next_try_at IS NULL OR next_try_at <= ?){other} ORDER BY id",
                (now, *projects),
            ).fetchall()
        return [_run(r) for r in rows]

    def runs_for_study(self, study_uid: str) -> list[RunRecord]:
        """Every run of a study (all projects), in creation order."""
        with self.index.reading() as db:
            rows = db.execute(
                f"SELECT {_RUN_COLUMNS} FROM pipeline_runs WHERE study_uid=? ORDER BY id",
                (study_uid,),
            ).fetchall()
        return [_run(r) for r in rows]

    def start(self, run_id: int, now: float | None = None) -> None:
        """Mark a run as being worked on."""
        self._update(run_id, now, "state='running'")

    def postpone(self, run_id: int, until: float, now: float | None = None) -> None:
        """Leave a run pending until ``until`` without counting an attempt."""
        self._update(run_id, now, "state='pending', next_try_at=?", until)

    def save_state(self, run_id: int, state: Mapping[str, Any], now: float | None = None) -> None:
        """Store the steps' shared state (JSON)."""
        self._update(run_id, now, "state_json=?", _json(state))

    def finish(
        self,
        run_id: int,
        state: RunState | str,
        reason: str = "",
        detail: str = "",
        now: float | None = None,
    ) -> None:
        """End a run as ``done``, ``quarantined`` or ``failed``."""
        final = RunState(state)
        if final in (RunState.PENDING, RunState.RUNNING):
            raise ValueError(f"a run finishes as done, quarantined or failed, not {final}")
        self._update(
            run_id,
            now,
            "state=?, reason=?, detail=?, next_try_at=NULL",
            final.value,
            reason,
            detail,
            release=True,
        )

    def reopen(self, run_id: int, now: float | None = None) -> int | None:
        """Queue a quarantined (or failed) run again from the step that stopped it.

        The stopping step's record is removed, so the runner calls it again with the project's
        current config; steps done before it stay done (their state is kept). Returns the index
        of the step the run resumes at (None when no step had stopped it: it starts over from
        its first step not done). Raises ``ValueError`` for a run that is not held.
        """
        now = time.time() if now is None else now
        with self.index.transaction() as db:
            row = db.execute("SELECT state FROM pipeline_runs WHERE id=?", (run_id,)).fetchone()
            if row is None:
                raise KeyError(f"no pipeline run {run_id}")
            if row[0] not in (RunState.QUARANTINED, RunState.FAILED):
                raise ValueError(f"pipeline run {run_id} is {row[0]}, not held")
            found = db.execute(
                "SELECT MIN(idx) FROM pipeline_steps WHERE run_id=? AND state != 'done'",
                (run_id,),
            ).fetchone()
            resume_at = None if found is None or found[0] is None else int(found[0])
            db.execute("DELETE FROM pipeline_steps WHERE run_id=? AND state != 'done'", (run_id,))
            db.execute(
                "UPDATE pipeline_runs SET state='pending', reason='', detail='', attempts=0,"
                " next_try_at=NULL, updated_at=? WHERE id=?",
                (now, run_id),
            )
        return resume_at

    def _update(
        self,
        run_id: int,
        now: float | None,
        assignments: str,
        *values: object,
        release: bool = False,
    ) -> None:
        """Update a run; for a run this node holds, only while it holds it (else
        :class:`~engine.store.leases.LeaseLost`, nothing written). ``release``: the run ends,
        whoever held it lets go in the same transaction (an operator's end stops the node that
        works on it at its next write)."""
        guard, held = self.leases.guard(run_id)
        let_go = ", claimed_by=NULL, lease_until=NULL" if release else ""
        with self.index.transaction() as db:
            cur = db.execute(
                f"UPDATE pipeline_runs SET {assignments}{let_go}, updated_at=? WHERE id=?{guard}",
                (*values, time.time() if now is None else now, run_id, *held),
            )
            self.leases.check(db, cur.rowcount, run_id)
        if let_go:
            self.leases.released(run_id)

    def check_held(self, run_id: int, now: float | None = None) -> None:
        """Raise :class:`~engine.store.leases.LeaseLost` when another node holds the run now
        (before a side effect outside the index, such as filing a quarantine)."""
        self._update(run_id, now, "state=state")

    # -- steps --------------------------------------------------------------------------------

    def done_steps(self, run_id: int) -> set[int]:
        """Positions of the run's steps that finished (Done)."""
        with self.index.reading() as db:
            rows = db.execute(
                "SELECT idx FROM pipeline_steps WHERE run_id=? AND state='done'", (run_id,)
            ).fetchall()
        return {int(r[0]) for r in rows}

    def steps(self, run_id: int) -> list[StepRecord]:
        """The recorded steps of a run, in pipeline order."""
        with self.index.reading() as db:
            rows = db.execute(
                "SELECT run_id, idx, name, state, reason, detail, finished_at FROM pipeline_steps"
                " WHERE run_id=? ORDER BY idx",
                (run_id,),
            ).fetchall()
        return [StepRecord(int(r[0]), int(r[1]), r[2], StepState(r[3]), *r[4:]) for r in rows]

    def record_step(
        self,
        run_id: int,
        idx: int,
        name: str,
        outcome: Outcome,
        *,
        state: Mapping[str, Any] | None = None,
        error: bool = False,
        now: float | None = None,
    ) -> int:
        """Record a step's outcome durably, with what it means for the run, in one transaction.

        Done: the step is done, the run's attempts go back to 0 and ``state`` (the steps'
        shared state after the step) is stored. Retry (``error``: the step raised): the run
        waits until ``now + outcome.after`` and counts one more attempt. Quarantined: only the
        step is recorded (the runner files the quarantine, then calls :meth:`finish`).
        Returns the run's attempts after the update.
        """
        now = time.time() if now is None else now
        if isinstance(outcome, Done):
            row = (StepState.DONE, "", outcome.detail)
        elif isinstance(outcome, Quarantined):
            row = (StepState.QUARANTINED, outcome.reason, outcome.detail)
        else:
            kind = StepState.ERROR if error else StepState.RETRY
            row = (kind, outcome.reason, f"retry in {outcome.after:g} s")
        guard, held = self.leases.guard(run_id)
        with self.index.transaction() as db:
            if guard:  # a run this node holds: only while it holds it
                cur = db.execute(
                    f"UPDATE pipeline_runs SET updated_at=? WHERE id=?{guard}",
                    (now, run_id, *held),
                )
                self.leases.check(db, cur.rowcount, run_id)
            db.execute(
                "INSERT INTO pipeline_steps(run_id, idx, name, state, reason, detail,"
                " finished_at) VALUES (?,?,?,?,?,?,?) ON CONFLICT (run_id, idx) DO UPDATE SET"
                " name=excluded.name, state=excluded.state, reason=excluded.reason,"
                " detail=excluded.detail, finished_at=excluded.finished_at",
                (run_id, idx, name, row[0].value, row[1], row[2], now),
            )
            self._apply(db, run_id, f"step {idx} ({name})", outcome, state, now)
            found = db.execute(
                "SELECT attempts FROM pipeline_runs WHERE id=?", (run_id,)
            ).fetchone()
        return int(found[0]) if found else 0

    @staticmethod
    def _apply(
        db: Connection,
        run_id: int,
        step: str,
        outcome: Outcome,
        state: Mapping[str, Any] | None,
        now: float,
    ) -> None:
        if isinstance(outcome, Done):
            db.execute(
                "UPDATE pipeline_runs SET attempts=0, reason='', detail='', updated_at=?"
                + (", state_json=?" if state is not None else "")
                + " WHERE id=?",
                (now, _json(state), run_id) if state is not None else (now, run_id),
            )
        elif isinstance(outcome, Retry):
            db.execute(
                "UPDATE pipeline_runs SET state='pending', attempts=attempts+1, next_try_at=?,"
                " reason=?, detail=?, updated_at=? WHERE id=?",
                (
                    now + outcome.after,
                    outcome.reason,
                    f"{step}: retry in {outcome.after:g} s",
                    now,
                    run_id,
                ),
            )

    # -- inputs -------------------------------------------------------------------------------

    def series_inputs(self, run: RunRecord, data_dir: Path) -> tuple[SeriesInput, ...]:
        """The run's series as indexed (in the run's order; a series no longer indexed is left
        out), with their files under ``data_dir`` in Instance Number order."""
        out = []
        with self.index.reading() as db:
            for uid in run.series:
                head = db.execute(
                    "SELECT se.id, se.series_number, se.modality, se.description FROM series se"
                    " JOIN studies st ON st.id = se.study_ref"
                    " WHERE se.series_uid=? AND st.study_uid=?",
                    (uid, run.study_uid),
                ).fetchone()
                if head is None:
                    continue
                rows = db.execute(
                    "SELECT id, path, calling_ae, called_ae, peer_ip FROM instances"
                    " WHERE series_ref=? ORDER BY instance_number, id",
                    (head[0],),
                ).fetchall()
                first = min(rows, key=lambda r: int(r[0])) if rows else (0, "", "", "", "")
                out.append(
                    SeriesInput(
                        series_uid=uid,
                        series_number=None if head[1] is None else int(head[1]),
                        modality=str(head[2]),
                        description=str(head[3]),
                        n_instances=len(rows),
                        files=tuple(data_dir / str(r[1]) for r in rows),
                        calling_ae=str(first[2]),
                        called_ae=str(first[3]),
                        peer_ip=str(first[4]),
                    )
                )
        return tuple(out)


def _run_id(db: Connection, study_uid: str, project: str, follow_up: int) -> int:
    """The id of the run of (study, project, follow-up), which exists."""
    row = db.execute(
        "SELECT id FROM pipeline_runs WHERE study_uid=? AND project=? AND follow_up=?",
        (study_uid, project, follow_up),
    ).fetchone()
    return int(row[0])
