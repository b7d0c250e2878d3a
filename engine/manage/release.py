"""Quarantine items for operators: find them, release them, discard them.

A release undoes the hold the way the item's kind asks (see :meth:`Releaser.release`); the row
becomes ``released`` only once that took effect. A discard gives the item up: quarantined bytes
are deleted, a held study is marked discarded (its archived files stay until retention removes
them). Both write their audit entry (operator, qid, reason, project, study token) *before*
acting: when the audit cannot be written, nothing happens.

Everything goes through the index's database, so this works while ``fiona serve`` runs: a
reopened run, a retried transfer or a study to route again is picked up by the service's next
scan.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.config.model import DuplicatePolicy, SiteConfig
from engine.pipeline.store import RunState, RunStore, StepState
from engine.store.archive import Archive
from engine.store.audit import AuditLog, uid_token
from engine.store.index import Index, Origin
from engine.store.quarantine import Reason
from engine.store.quarantine_policy import sidecar_of
from engine.transfer.outbox import Outbox

__all__ = ["Item", "Outcome", "Releaser", "find_items", "get_item"]

_COLUMNS = (
    "qid, reason, detail, path, size, sha256, received_at, via, calling_ae, called_ae, peer_ip,"
    " sop_instance_uid, study_uid, project, state, resolved_at, resolved_by, resolution, purged_at"
)

#: Study holds released by routing the study again with the current projects.
_ROUTING = frozenset({Reason.UNROUTED.value, Reason.AMBIGUOUS.value})


@dataclass(frozen=True)
class Item:
    """One row of the ``quarantine`` table; times in seconds since the epoch (UTC)."""

    qid: str
    reason: str
    detail: str
    path: str  # relative to the data dir: quarantine/<day>/<qid>.dcm or archive/<StudyUID>
    size: int
    sha256: str
    received_at: float
    origin: Origin
    sop_instance_uid: str | None
    study_uid: str | None
    project: str
    state: str  # held | released | discarded
    resolved_at: float | None
    resolved_by: str
    resolution: str
    purged_at: float | None

    @property
    def kind(self) -> str:
        """``instance`` (bytes kept in quarantine/) or ``study`` (files stay in archive/)."""
        return "instance" if self.path.startswith("quarantine/") else "study"

    @property
    def sidecar(self) -> Path:
        """The item's JSON, relative to the data dir."""
        return sidecar_of(self.qid, self.received_at)

    def as_json(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "origin"}
        out.update(self.origin.__dict__, kind=self.kind)
        return out


@dataclass(frozen=True)
class Outcome:
    """What a release or discard did; ``done``: it took effect (the row changed state)."""

    qid: str
    done: bool
    message: str


def _item(r: Sequence[Any]) -> Item:
    return Item(
        qid=str(r[0]),
        reason=str(r[1]),
        detail=str(r[2]),
        path=str(r[3]),
        size=int(r[4]),
        sha256=str(r[5]),
        received_at=float(r[6]),
        origin=Origin(str(r[7]), str(r[8]), str(r[9]), str(r[10])),
        sop_instance_uid=r[11],
        study_uid=r[12],
        project=str(r[13]),
        state=str(r[14]),
        resolved_at=r[15],
        resolved_by=str(r[16]),
        resolution=str(r[17]),
        purged_at=r[18],
    )


def find_items(
    index: Index,
    *,
    state: str | None = "held",
    reason: str | None = None,
    project: str | None = None,
    projects: Sequence[str] | None = None,
    limit: int | None = None,
    offset: int = 0,
) -> list[Item]:
    """Quarantine items, oldest first, filtered by state, reason code and project; ``projects``
    (None: all) keeps only items of those projects (not those held at receipt); ``limit`` and
    ``offset`` give one page."""
    where: list[str] = []
    args: list[Any] = []
    for column, value in (("state", state), ("reason", reason), ("project", project)):
        if value:
            where.append(f"{column} = ?")
            args.append(value)
    if projects is not None:
        where.append(f"project IN ({','.join('?' * len(projects)) or 'NULL'})")
        args += list(projects)
    sql = f"SELECT {_COLUMNS} FROM quarantine" + (" WHERE " + " AND ".join(where) if where else "")
    sql += " ORDER BY id"
    if limit is not None:
        sql += " LIMIT ? OFFSET ?"
        args += [limit, offset]
    with index.reading() as db:
        rows = db.execute(sql, args).fetchall()
    return [_item(r) for r in rows]


def get_item(index: Index, qid: str) -> Item:
    """The item whose qid is ``qid`` or starts with it (at least 6 characters); KeyError when
    there is none, or several."""
    if len(qid) < 6 or not qid.isalnum():
        raise KeyError(f"no quarantine item {qid!r} (give at least 6 characters of the id)")
    with index.reading() as db:
        rows = db.execute(
            f"SELECT {_COLUMNS} FROM quarantine WHERE qid LIKE ? LIMIT 2", (qid + "%",)
        ).fetchall()
    if len(rows) != 1:
        raise KeyError(f"{'no' if not rows else 'more than one'} quarantine item {qid!r}")
    return _item(rows[0])


class Releaser:
    """Releases and discards items of one site's quarantine on behalf of ``operator``."""

    def __init__(self, site: SiteConfig, index: Index, audit: AuditLog, operator: str) -> None:
        self.site = site
        self.data_dir = site.data_dir
        self.index = index
        self.audit = audit
        self.operator = operator
        self.runs = RunStore(index)

    # -- release ----------------------------------------------------------------------------------

    def release(self, item: Item) -> Outcome:
        """Undo the hold, by kind of item:

        * bytes in quarantine/: fed through :meth:`Archive.receive` again (as on receipt, same
          origin; a conflicting duplicate now replaces the archived instance). Still bad: it is
          quarantined again under a new qid and this one stays held;
        * ``unrouted`` / ``ambiguous``: the study's routing is reset, so the next scan labels
          and routes it with the current projects;
        * ``transfer_failed``: the study's failed transfers for the project are queued again;
        * ``conversion_failed`` (one series): a follow-up run for that series alone;
        * any other study hold (a pipeline run stopped it): the study's held runs for the
          project are reopened at the step that stopped them, with the current config.
        """
        if item.state != "held":
            return Outcome(item.qid, False, f"is {item.state}, not held")
        self._audit("released", item)  # before acting; raises when the audit cannot be written
        done, message = self._act(item)
        if done:
            self._resolve(item, "released", message)
        else:
            self.audit.write("release_failed", qid=item.qid, why=message, operator=self.operator)
        return Outcome(item.qid, done, message)

    def _act(self, item: Item) -> tuple[bool, str]:
        if item.kind == "instance":
            return self._receive_again(item)
        if not item.study_uid or not (self.data_dir / "archive" / item.study_uid).is_dir():
            return False, "the study's files are no longer in the archive"
        if item.reason in _ROUTING:
            return self._route_again(item.study_uid)
        if item.reason == Reason.TRANSFER_FAILED:
            return self._retry_transfers(item.study_uid, item.project)
        if item.reason == Reason.CONVERSION_FAILED:
            return self._run_series_again(item)
        return self._reopen_runs(item.study_uid, item.project)

    def _receive_again(self, item: Item) -> tuple[bool, str]:
        try:
            data = (self.data_dir / item.path).read_bytes()
        except OSError as exc:
            return False, f"cannot read the quarantined bytes ({exc.strerror})"
        policy = self.site.duplicate_policy
        if item.reason == Reason.DUPLICATE_CONFLICT:
            policy = DuplicatePolicy.REPLACE  # the operator chose this version
        archive = Archive(
            self.data_dir,
            self.index,
            duplicate_policy=policy,
            min_free_disk_mb=self.site.limits.min_free_disk_mb,
            max_instance_mb=self.site.limits.max_instance_mb,
        )
        outcome = archive.receive(data, item.origin)
        if outcome.action in ("stored", "replaced", "duplicate"):
            return True, f"archived again ({outcome.action})"
        if outcome.action == "quarantined":
            again = self._requarantined(item)
            return False, (
                f"still {outcome.reason}: {outcome.detail}; quarantined again as {again},"
                " this item stays held"
            )
        return False, f"not archived ({outcome.reason}: {outcome.detail}); this item stays held"

    def _requarantined(self, item: Item) -> str:
        with self.index.reading() as db:
            row = db.execute(
                "SELECT qid FROM quarantine WHERE sha256=? AND qid != ? ORDER BY id DESC LIMIT 1",
                (item.sha256, item.qid),
            ).fetchone()
        return str(row[0]) if row else "?"

    def _route_again(self, study_uid: str) -> tuple[bool, str]:
        """Reset what the tracker decided about the study: its labels, unstarted routes and
        judgement (an operator's assigned route stays). A study with ``routed_upto`` 0 and no
        judgement is picked up by the next scan as if it had just arrived."""
        with self.index.transaction() as db:
            row = db.execute("SELECT id FROM studies WHERE study_uid=?", (study_uid,)).fetchone()
            if row is None:
                return False, "the study is no longer in the index"
            db.execute(
                "DELETE FROM study_routes WHERE study_uid=? AND runs=0 AND assigned=0", (study_uid,)
            )
            db.execute(
                "UPDATE series SET labels='[]', label_state=NULL WHERE study_ref=?", (row[0],)
            )
            db.execute("UPDATE studies SET routed_upto=0, judged_at=NULL WHERE id=?", (row[0],))
        return True, "routing reset; the next scan routes the study with the current projects"

    def _retry_transfers(self, study_uid: str, project: str) -> tuple[bool, str]:
        outbox = Outbox(self.index, self.data_dir)
        found = outbox.find(study_uid=study_uid, project=project or None, limit=10**6)
        failed = [t for t in found if t.state == "failed"]
        if not failed:
            if found:
                return True, "no failed transfer left (retried already)"
            return False, "no transfer of this study for the project"
        for transfer in failed:
            outbox.retry(transfer.id)
        ids = ", ".join(str(t.id) for t in failed)
        return True, f"transfer(s) {ids} queued again"

    def _run_series_again(self, item: Item) -> tuple[bool, str]:
        """A series the ``convert`` step could not convert (its run went on without it): a
        follow-up run of the project's pipeline on that series alone, with the current config
        (a longer timeout, a newer dcm2niix). Failing again, it is held again as a new item."""
        assert item.study_uid is not None
        series_uid = Path(item.path).name  # archive/<study>/<series>, validated on receipt
        if Path(item.path).parent.name != item.study_uid or series_uid == item.study_uid:
            return False, "the item names no series of the study"
        if not (self.data_dir / item.path).is_dir():
            return False, "the series' files are no longer in the archive"
        with self.index.transaction() as db:
            route = db.execute(
                "SELECT subject, event FROM study_routes WHERE study_uid=? AND project=?",
                (item.study_uid, item.project),
            ).fetchone()
            if route is None:
                return False, f"the study is not routed to project {item.project!r}"
            run_id, follow_up = self.runs.add_next_run(
                db, item.study_uid, item.project, str(route[0]), str(route[1]), [series_uid]
            )
            db.execute(
                "UPDATE study_routes SET runs=? WHERE study_uid=? AND project=?",
                (follow_up + 1, item.study_uid, item.project),
            )
        return True, (
            f"run {run_id} (follow-up {follow_up}) made for this series alone; the next scan"
            " runs the project's pipeline on it with the current config"
        )

    def _reopen_runs(self, study_uid: str, project: str) -> tuple[bool, str]:
        held = [
            r
            for r in self.runs.runs_for_study(study_uid)
            if r.project == project and r.state == RunState.QUARANTINED
        ]
        if not held:
            return False, f"no held pipeline run of this study for project {project!r}"
        parts = []
        for run in held:
            stopped = [s for s in self.runs.steps(run.id) if s.state != StepState.DONE]
            at = self.runs.reopen(run.id)
            name = f" ({stopped[0].name})" if stopped else ""
            parts.append(f"run {run.id} reopened at step {at if at is not None else 0}{name}")
        return True, "; ".join(parts) + "; the next scan runs it with the current config"

    # -- discard ----------------------------------------------------------------------------------

    def discard(self, item: Item) -> Outcome:
        """Give the item up: delete its quarantined bytes, or end the study's held runs (failed,
        ``discarded``) and cancel its failed transfers. Never touches ``archive/``."""
        if item.state != "held":
            return Outcome(item.qid, False, f"is {item.state}, not held")
        self._audit("discarded", item)  # before acting
        if item.kind == "instance":
            (self.data_dir / item.path).unlink(missing_ok=True)
            message = "quarantined bytes deleted"
        else:
            message = self._give_up_study(item)
        self._resolve(item, "discarded", message)
        return Outcome(item.qid, True, message)

    def _give_up_study(self, item: Item) -> str:
        assert item.study_uid is not None
        ended = 0
        for run in self.runs.runs_for_study(item.study_uid):
            if run.project == item.project and run.state == RunState.QUARANTINED:
                self.runs.finish(run.id, RunState.FAILED, "discarded", "discarded by an operator")
                ended += 1
        cancelled = 0
        if item.reason == Reason.TRANSFER_FAILED:
            outbox = Outbox(self.index, self.data_dir)
            for t in outbox.find(states=["failed"], study_uid=item.study_uid, limit=10**6):
                if t.project == item.project:
                    outbox.cancel(t.id)
                    cancelled += 1
        return (
            f"study hold discarded ({ended} run(s) ended, {cancelled} transfer(s) cancelled);"
            " the archived study stays until retention removes it"
        )

    # -- shared -----------------------------------------------------------------------------------

    def _audit(self, event: str, item: Item) -> None:
        self.audit.write(
            event,
            operator=self.operator,
            qid=item.qid,
            reason=item.reason,
            project=item.project,
            study=uid_token(item.study_uid) if item.study_uid else "",
            kind=item.kind,
        )

    def _resolve(self, item: Item, state: str, message: str) -> None:
        with self.index.transaction() as db:
            db.execute(
                "UPDATE quarantine SET state=?, resolved_at=?, resolved_by=?, resolution=?"
                " WHERE qid=? AND state='held'",
                (state, time.time(), self.operator, message, item.qid),
            )
