"""The retrieval job of ``fiona serve``: works queued list rows, up to ``max_associations`` at
once per PACS.

Each call of the job (every half second) starts, for every PACS with queued rows that may be
asked now, lanes up to its ``limits.max_associations`` (counting those still running, and the
rows other nodes sharing the index are working: the limit is the cluster's; every node runs
the job and starts at most its share, the limit over the nodes running) and returns at once.
A lane is a thread with one association to the PACS, kept open from row to row (a new one when
the PACS has ended it): it claims the PACS's next queued row, works it
(:class:`engine.retrieve.row.RowFetch`: C-FIND, claim for the project, C-MOVE or C-GET what is
missing, count arrivals) and takes the next one at once, for as long as the PACS may be asked:
inside its time windows, below its studies per hour (a row under way counts as one), and not
paused after it could not be reached. A claim is one conditional update in the index, so a
row is worked once; a cancelled row stops between requests; when fiona stops (the scheduler's
shutdown calls :meth:`RetrieveWorker.close`), a row under way is queued again after its
current request, and rows a stopped (or killed) service left half-way are queued again when
the worker starts: only what is missing is fetched.

``retrieve: get`` with ``on_get_refused: move``: once the PACS refuses C-GET, the lanes fetch
by C-MOVE (a log line; each row's audit entry says so) until a row of another job comes, or
:data:`GET_RETRY_SECONDS` have passed, or fiona restarts: then C-GET is tried again (its
administrator may have allowed it meanwhile), which costs one refused request if not. Log lines and
reasons carry counts and the PACS's name, never a patient's or study's identifiers.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine.config.model import SiteConfig
from engine.config.pacs import OnGetRefused, PacsConfig, RetrieveMethod
from engine.net.scu import AssociationBroken, ScuAssociation
from engine.retrieve.peer import GET_ROLES, get_proposals, move_proposals, open_association
from engine.retrieve.row import GetRefused, RowFailed, RowFetch
from engine.store.archive import Archive
from engine.store.audit import AuditLog, uid_token
from engine.store.db import IndexUnavailable
from engine.store.index import Index
from engine.store.leases import LeaseLost
from engine.store.nodes import NodeStore
from engine.store.outage import OUTAGE
from engine.store.retrievals import RetrievalStore, Row, RowState

log = logging.getLogger(__name__)

#: Seconds a PACS that could not be reached is left alone before its rows are tried again.
UNREACHABLE_PAUSE = 60.0
#: Times a row is put back for an unreachable PACS before it fails.
MAX_UNREACHABLE = 5
#: Times a row's association may break off during its requests before the row fails, and
#: the pause in seconds before the next try.
MAX_BROKEN = 2
BROKEN_PAUSE = 5.0
#: Heartbeat intervals after which a node no longer counts as running (as ``fiona status``).
STALE_BEATS = 3
#: Seconds after a PACS refused C-GET (``on_get_refused: move``) before C-GET is tried again
#: within the same job.
GET_RETRY_SECONDS = 3600.0


@dataclass(frozen=True)
class _Refusal:
    """How a PACS refused C-GET (no PHI), in which job, and when (the worker's clock)."""

    why: str
    job: int
    at: float


class _Lane:
    """One association to a PACS, kept open from row to row."""

    def __init__(self, site: SiteConfig, pacs: PacsConfig) -> None:
        self.site = site
        self.pacs = pacs
        self.assoc: ScuAssociation | None = None
        self.method = RetrieveMethod.MOVE
        self.reused = False  # the association served an earlier row

    def open(self, method: RetrieveMethod) -> ScuAssociation:
        """The lane's association for ``method``: the open one unless the PACS ended it (or
        it was for the other method), else a new one (:class:`AssociationBroken`)."""
        if self.assoc is not None and (self.method is not method or self.assoc.idle_closed()):
            self.close()
        self.reused = self.assoc is not None
        if self.assoc is None:
            if method is RetrieveMethod.GET:
                self.assoc = open_association(self.site, self.pacs, get_proposals(), GET_ROLES)
            else:
                self.assoc = open_association(self.site, self.pacs, move_proposals())
            self.method = method
        return self.assoc

    def drop(self) -> None:
        """Abort the association (it broke off, or the PACS ended it)."""
        if self.assoc is not None:
            self.assoc.abort()
            self.assoc = None

    def close(self) -> None:
        if self.assoc is None:
            return
        try:
            self.assoc.release()
        except AssociationBroken:
            log.info("PACS %s did not release the association cleanly", self.pacs.name)
        self.assoc = None


class RetrieveWorker:
    """The scheduler job: each call works the queued rows, in lanes per PACS."""

    def __init__(
        self,
        site: SiteConfig,
        index: Index,
        archive: Archive | None = None,
        *,
        clock: Callable[[], float] = time.time,
        local_now: Callable[[], dt.datetime] = dt.datetime.now,
        scheduler: Any = None,
    ) -> None:
        """``scheduler``: the APScheduler that calls the job; its pause (the start of fiona
        serve's stop) tells the lanes to stop, its shutdown waits for them (:meth:`close`)
        before the index is closed."""
        self.site = site
        self.index = index
        self.archive = archive  # where C-GET files what it brings (C-MOVE: fiona's SCP)
        self.store = RetrievalStore(index)
        self.audit = AuditLog(site.data_dir)
        self.clock = clock
        self.local_now = local_now
        self._lock = threading.Lock()  # claims, and the dicts below
        self._paused: dict[str, float] = {}  # PACS name -> monotonic time it may be asked
        self._busy: dict[int, str] = {}  # row id -> its PACS, for the rows under way
        self._refused: dict[str, _Refusal] = {}  # PACS name -> its C-GET refusal (fallback)
        self._stale: set[int] = set()  # rows put back once for a reused association's break
        self._lanes: list[tuple[str, threading.Thread]] = []  # (PACS name, lane)
        self._stop = threading.Event()
        if scheduler is not None:
            from apscheduler.events import EVENT_SCHEDULER_PAUSED, EVENT_SCHEDULER_SHUTDOWN

            # fiona serve pauses the scheduler first thing when it stops: lanes stop after
            # their current request at once, not once the other jobs have finished (a lane
            # would go on fetching rows meanwhile). Nothing else pauses it.
            scheduler.add_listener(lambda _event: self._stop.set(), EVENT_SCHEDULER_PAUSED)
            scheduler.add_listener(lambda _event: self.close(), EVENT_SCHEDULER_SHUTDOWN)
        resumed = self.store.take_back_own()
        if resumed:
            log.info("retrieval: %d rows taken up again after a restart", resumed)

    def __call__(self) -> None:
        """Start lanes for every PACS with queued rows that may be asked now, up to its
        ``max_associations`` with those still running, and return: a lane takes rows until
        there is none it may take (so the job's ticks never wait for a row)."""
        if self._stop.is_set():
            return
        with self._lock:
            self._lanes = [(name, t) for name, t in self._lanes if t.is_alive()]
            running = Counter(name for name, _ in self._lanes)
        for name in self.store.pacs_with_queued():
            pacs = self.site.pacs_named(name)
            if pacs is None:
                self._fail_rows_of(name)
                continue
            with self._lock:
                if not self._may_ask(pacs):
                    continue
            # The PACS's limit is the cluster's: other nodes' rows under way count against it,
            # and this node takes its share of it (see _share).
            with self._lock:
                here = sum(1 for busy in self._busy.values() if busy == name)
            room = pacs.limits.max_associations - (self.store.under_way(name) - here)
            for n in range(running[name], min(room, self._share(pacs))):
                lane = threading.Thread(
                    target=self._lane, args=(pacs,), name=f"retrieve-{name}-{n + 1}", daemon=True
                )
                with self._lock:
                    self._lanes.append((name, lane))
                lane.start()

    def drain(self) -> None:
        """Wait until every lane has run out of rows it may take."""
        while True:
            with self._lock:
                alive = [t for _, t in self._lanes if t.is_alive()]
            if not alive:
                return
            for lane in alive:
                lane.join()

    def close(self) -> None:
        """Stop: lanes take no more rows, and a row under way is queued again after its
        current request (the next start fetches only what is missing); waits for them."""
        self._stop.set()
        self.drain()

    def _fail_rows_of(self, name: str) -> None:
        while (row := self.store.next_queued(name)) is not None:
            self._end(row, RowState.FAILED, f"no PACS named {name} in the site config")

    def _lane(self, pacs: PacsConfig) -> None:
        lane = _Lane(self.site, pacs)
        try:
            while not self._stop.is_set() and (row := self._take(pacs)) is not None:
                try:
                    self.work(pacs, row, lane)
                except LeaseLost:
                    log.warning(
                        "retrieval job %d line %d: another node holds it now",
                        row.job,
                        row.spec.line,
                    )
                finally:
                    self.store.release(row.id)
                    with self._lock:
                        self._busy.pop(row.id, None)
        except IndexUnavailable as exc:  # logged once for the process; the job's ticks wait
            OUTAGE.went_away(exc)
            lane.drop()
        except Exception:  # the guard: one lane's failure is logged, the job goes on
            log.exception("retrieval from PACS %s: a lane stopped", pacs.name)
            lane.drop()
        finally:
            lane.close()

    def _take(self, pacs: PacsConfig) -> Row | None:
        """Claim the PACS's next queued row if it may be asked now; None when not."""
        with self._lock:
            if not self._may_ask(pacs):
                return None
            limit = pacs.limits.max_associations
            if sum(1 for busy in self._busy.values() if busy == pacs.name) >= self._share(pacs):
                return None  # this node's share of the PACS's associations is in use
            for _ in range(3):  # a row cancelled between the two is passed over
                row = self.store.next_queued(pacs.name)
                if row is None:
                    return None
                if self.store.claim(row.id, self.clock(), pacs.name, limit):
                    self._busy[row.id] = pacs.name
                    return row
                if self.store.under_way(pacs.name) >= limit:
                    return None  # other nodes' lanes fill the PACS's limit
        return None

    def _may_ask(self, pacs: PacsConfig) -> bool:
        if time.monotonic() < self._paused.get(pacs.name, 0.0):
            return False
        if not pacs.limits.open_at(self.local_now()):
            return False
        per_hour = pacs.limits.studies_per_hour
        if not per_hour:
            return True
        under_way = self.store.under_way(pacs.name)  # on every node
        return self.store.studies_since(pacs.name, self.clock() - 3600) + under_way < per_hour

    def _share(self, pacs: PacsConfig) -> int:
        """This node's share of the PACS's ``max_associations``: the limit over the nodes
        running (every node works the queued rows; a node whose heartbeat is older than
        :data:`STALE_BEATS` intervals, or that stopped, does not count), rounded up: so the
        lanes, and the instances a C-GET brings, spread over the nodes."""
        since = self.clock() - STALE_BEATS * self.site.heartbeat.interval
        nodes = max(NodeStore(self.index).running(since), 1)
        return -(-pacs.limits.max_associations // nodes)

    def method_for(self, pacs: PacsConfig, job: int | None = None) -> RetrieveMethod:
        """C-MOVE for a ``get`` PACS that refused C-GET under ``on_get_refused: move``, for
        the rest of that job (``job``: the row's; None: the method in force) and at most
        :data:`GET_RETRY_SECONDS`; then C-GET again."""
        if pacs.retrieve is not RetrieveMethod.GET:
            return pacs.retrieve
        with self._lock:
            refusal = self._refused.get(pacs.name)
            if refusal is None:
                return RetrieveMethod.GET
            if self.clock() - refusal.at < GET_RETRY_SECONDS and job in (None, refusal.job):
                return RetrieveMethod.MOVE
            del self._refused[pacs.name]
        log.info("retrieval from PACS %s: trying C-GET again (refused earlier)", pacs.name)
        return RetrieveMethod.GET

    def work(
        self, pacs: PacsConfig, row: Row, lane: _Lane, method: RetrieveMethod | None = None
    ) -> None:
        """Query, claim, fetch and check one claimed row (by ``method``, else the PACS's
        method in force); its state says how it went."""
        method = method or self.method_for(pacs, row.job)
        if method is RetrieveMethod.GET and self.archive is None:
            self._end(row, RowState.FAILED, "retrieve: get needs the archive of fiona serve")
            return
        try:
            assoc = lane.open(method)
        except AssociationBroken as exc:
            self._unreachable(pacs, row, str(exc))
            return
        fetch = RowFetch(
            self.site, self.index, self.archive, pacs, method, self.clock, self._stop.is_set
        )
        try:
            finished = fetch.run(assoc, row)
        except GetRefused as exc:
            lane.drop()
            self._get_refused(pacs, row, lane, exc)
            return
        except RowFailed as exc:
            self._end(row, RowState.FAILED, str(exc), studies=fetch.studies)
            return
        except AssociationBroken as exc:
            lane.drop()
            self._broken(pacs, row, f"PACS {pacs.name}: {exc}", lane.reused)
            return
        if finished is None and self._stop.is_set():
            self.store.update(row.id, self.clock(), RowState.QUEUED)
            log.info("retrieval job %d line %d: stopped, queued again", row.job, row.spec.line)
            return
        if finished is None:
            log.info("retrieval job %d line %d: cancelled", row.job, row.spec.line)
            return
        self._end(
            row,
            finished.state,
            finished.reason,
            studies=fetch.studies,
            via=fetch.verb,
            arrived=finished.arrived,
            attempts=row.attempts + finished.rounds,
        )

    def _get_refused(self, pacs: PacsConfig, row: Row, lane: _Lane, exc: GetRefused) -> None:
        """Fall back to C-MOVE (``on_get_refused: move``: this row at once, and the rows after
        it), or fail the row saying how to."""
        why = str(exc)
        if pacs.on_get_refused is OnGetRefused.MOVE:
            with self._lock:
                first = pacs.name not in self._refused
                self._refused[pacs.name] = _Refusal(why, row.job, self.clock())
            if first:
                log.warning(
                    "%s: retrieving from PACS %s by C-MOVE from now on (on_get_refused: move)",
                    why,
                    pacs.name,
                )
            self.work(pacs, row, lane, RetrieveMethod.MOVE)
            return
        hint = "; with on_get_refused: move fiona retrieves by C-MOVE instead"
        if exc.aborted:
            self._broken(pacs, row, why, False, hint)
        else:
            self._end(row, RowState.FAILED, f"{why} ({hint[2:]})")

    def _unreachable(self, pacs: PacsConfig, row: Row, why: str) -> None:
        tries = row.attempts + 1
        if tries >= MAX_UNREACHABLE:
            self._pause(pacs, UNREACHABLE_PAUSE)
            self._end(row, RowState.FAILED, why, attempts=tries)
            return
        log.warning("retrieval from PACS %s paused: %s", pacs.name, why)
        self._pause(pacs, UNREACHABLE_PAUSE, row, why, tries)

    def _pause(
        self,
        pacs: PacsConfig,
        seconds: float,
        row: Row | None = None,
        why: str = "",
        tries: int = 0,
    ) -> None:
        """Pause the PACS and queue ``row`` again, both under the lock :meth:`_take` holds from
        its check to its claim: another lane must not see the row queued before the pause and
        try it at once (one more attempt counted against an unreachable PACS)."""
        with self._lock:
            self._paused[pacs.name] = time.monotonic() + seconds
            if row is not None:
                self.store.update(row.id, self.clock(), RowState.QUEUED, reason=why, attempts=tries)

    def _broken(self, pacs: PacsConfig, row: Row, why: str, reused: bool, hint: str = "") -> None:
        """The association broke off during the row's requests: a PACS that aborts a C-GET or
        C-MOVE it will not do says no this way, so the row fails the second time (after a
        short pause, in case the PACS was only restarting). On an association kept from an
        earlier row, the PACS may have ended it meanwhile: the row is queued again once,
        without counting a try."""
        with self._lock:
            stale = reused and row.id not in self._stale
            self._stale.add(row.id)
        if stale:
            log.info("retrieval from PACS %s: a kept association broke off (%s)", pacs.name, why)
            self.store.update(row.id, self.clock(), RowState.QUEUED)
            return
        tries = row.attempts + 1
        if tries >= MAX_BROKEN:
            verb = "C-GET" if self.method_for(pacs) is RetrieveMethod.GET else "C-MOVE"
            calling = pacs.calling_ae_for(self.site.ae_title)
            question = f"does the PACS allow {verb} from {calling}?"
            self._end(row, RowState.FAILED, f"{why} ({question}{hint})", attempts=tries)
            return
        log.warning("retrieval from PACS %s paused: %s", pacs.name, why)
        self._pause(pacs, BROKEN_PAUSE, row, why, tries)

    def _end(
        self,
        row: Row,
        state: RowState,
        reason: str,
        *,
        studies: list[str] | None = None,
        via: str = "",
        **progress: int,
    ) -> None:
        self.store.update(row.id, self.clock(), state, reason=reason, **progress)
        extra: dict[str, str] = {"via": via} if via else {}
        with self._lock:
            fallback = self._refused.get(row.pacs)
        if via == "C-MOVE" and fallback is not None:
            extra["fallback"] = f"C-GET refused: {fallback.why}"
        self.audit.try_write(
            "retrieved",
            job=row.job,
            line=row.spec.line,
            pacs=row.pacs,
            project=row.spec.project,
            outcome=str(state),
            studies=[uid_token(s) for s in studies or []],
            reason=reason,
            **extra,
            **progress,
        )
        suffix = f" ({reason})" if reason else ""
        log.info("retrieval job %d line %d: %s%s", row.job, row.spec.line, state, suffix)
