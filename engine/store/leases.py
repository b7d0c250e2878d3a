"""Leases: work (and once-per-cluster jobs) held by one node at a time, for a limited time.

A leased table has two columns, ``claimed_by`` (a node id, :mod:`engine.store.nodes`) and
``lease_until`` (seconds since the epoch, UTC). A node claims rows in one statement whose
condition is that nobody holds them (``claimed_by IS NULL``) or that the holder's lease ran out
(``lease_until < now``): SQLite runs it inside ``BEGIN IMMEDIATE`` (one writer at a time), and
on PostgreSQL the sub-select takes the rows with ``FOR UPDATE SKIP LOCKED``
(:func:`skip_locked`) while the outer condition is checked again on the locked row. So two live
nodes never hold one row.

While the work runs, the node renews its leases every third of the lease (:class:`Renewer`, one
thread per process); a renewal that finds the row held by another node (its lease ran out and
another node took it over) marks it lost, and the work stops without writing its outcome
(every write of an outcome is guarded by ``claimed_by``, :meth:`Leases.guard`). Finished work
releases its row (``claimed_by`` NULL). Work of a node that died is taken over by any node once
its lease has run out; a node that starts again under the same name (``node.name``) takes its
own leftovers back at once (:meth:`Leases.expire_own`).

Leases compare wall-clock times of different hosts: the nodes' clocks must agree (NTP) to well
within a lease.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from typing import Any

from engine.store.db import IndexUnavailable
from engine.store.index import Index
from engine.store.nodes import Node, this_node
from engine.store.outage import OUTAGE

__all__ = [
    "LEASED_TABLES",
    "ClusterLocks",
    "LeaseLost",
    "Leases",
    "OncePerCluster",
    "claimable",
    "skip_locked",
]

log = logging.getLogger(__name__)

#: The tables whose rows are leased, with their key column (locks are keyed by name).
LEASED_TABLES = {"pipeline_runs": "id", "transfers": "id", "retrieve_rows": "id", "locks": "name"}


class LeaseLost(Exception):
    """This node's lease on an item ran out and another node holds it now: stop the item and
    write nothing of its outcome."""


def claimable(alias: str = "") -> str:
    """The condition "nobody holds the row, or its holder's lease ran out" (one ``?``: now)."""
    p = f"{alias}." if alias else ""
    return f"({p}claimed_by IS NULL OR {p}lease_until IS NULL OR {p}lease_until < ?)"


def skip_locked(db: Any) -> str:
    """What a claim's sub-select ends with on the engine of connection ``db``: ``FOR UPDATE
    SKIP LOCKED`` on PostgreSQL (rows another node's claim is locking are passed over, not
    waited for), nothing on SQLite, where ``BEGIN IMMEDIATE`` already serialises the claims.

    The engine is the connection's ``dialect`` attribute when it has one, else the package of
    its class (``psycopg``, ``sqlite3``). Without the clause a claim is still safe on
    PostgreSQL (every claim re-checks "nobody holds it" on the row it locks): concurrent
    claims then wait for each other instead of passing over."""
    if isinstance(db, sqlite3.Connection):
        return ""
    engine = str(getattr(db, "dialect", "") or type(db).__module__)
    return " FOR UPDATE SKIP LOCKED" if engine.startswith(("postgres", "psycopg")) else ""


def one_at_a_time(db: Any, name: str) -> None:
    """In the transaction begun on connection ``db``: wait until no other transaction of the
    cluster holds ``name``, and hold it until this one ends. For a check and a claim that must
    not interleave with another node's (a limit counted across the nodes): on PostgreSQL a
    transaction-scoped advisory lock (READ COMMITTED: what the other committed is seen after
    it); nothing on SQLite, where ``BEGIN IMMEDIATE`` already lets one writer in at a time."""
    if skip_locked(db):  # the engine test of skip_locked: PostgreSQL
        db.execute("SELECT pg_advisory_xact_lock(hashtext(?))", (name,))


def _marks(n: int) -> str:
    return ",".join("?" * n)


class Leases:
    """The leases ``node`` holds on rows of ``table`` in ``index``.

    The store modules claim rows with their own statement (the condition from
    :func:`claimable`, the values ``node.id`` and :meth:`until`) and tell this object what they
    took (:meth:`took`); it renews them (through the :class:`Renewer`), says which were lost,
    and releases them.
    """

    def __init__(
        self,
        index: Index,
        table: str,
        node: Node | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if table not in LEASED_TABLES:
            raise ValueError(f"not a leased table: {table}")
        self.index = index
        self.table = table
        self.key = LEASED_TABLES[table]
        self.node = this_node() if node is None else node
        #: Seconds since the epoch (UTC); tests set their own to let leases run out.
        self.clock = clock
        self._lock = threading.Lock()
        self._held: set[Any] = set()
        self._lost: set[Any] = set()

    def until(self) -> float:
        """When a lease taken or renewed now runs out (seconds since the epoch)."""
        return self.clock() + self.node.lease_seconds

    def took(self, keys: Iterable[Any]) -> None:
        """Record rows this node just claimed, and keep their leases renewed."""
        with self._lock:
            for key in keys:
                self._held.add(key)
                self._lost.discard(key)
        if self._held:
            Renewer.shared().watch(self)

    def holds(self, key: Any) -> bool:
        """Whether this node claimed the row (and has not released it)."""
        with self._lock:
            return key in self._held

    def lost(self, key: Any) -> bool:
        """Whether a renewal found the row held by another node."""
        with self._lock:
            return key in self._lost

    def _claimed(self, key: Any) -> bool:
        """Whether this node claimed the row: it holds it, or held it and lost it."""
        with self._lock:
            return key in self._held or key in self._lost

    def guard(self, key: Any) -> tuple[str, tuple[Any, ...]]:
        """The condition (and its value) an outcome's write adds for a row this node claimed
        (holds, or lost): ``AND claimed_by = ?``; nothing for a row it never claimed (an
        operator's change)."""
        if self._claimed(key):
            return " AND claimed_by = ?", (self.node.id,)
        return "", ()

    def check(self, db: Any, rowcount: int, key: Any) -> None:
        """After a guarded write on ``db`` (in its transaction, which the exception rolls
        back): raise :class:`LeaseLost` when it changed nothing because the row is held by
        another node now (or released by one that took it over)."""
        if rowcount == 0 and self._claimed(key):
            row = db.execute(
                f"SELECT claimed_by FROM {self.table} WHERE {self.key} = ?", (key,)
            ).fetchone()
            if row is not None and row[0] != self.node.id:
                self._forget(key, lost=True)
                raise LeaseLost(f"{self.table} {key} is held by another node now")

    def release_sql(self) -> str:
        """The statement releasing one held row (values: key, node id)."""
        return (
            f"UPDATE {self.table} SET claimed_by = NULL, lease_until = NULL"
            f" WHERE {self.key} = ? AND claimed_by = ?"
        )

    def forget(self, key: Any) -> None:
        """Stop renewing the row's lease without releasing it (it runs out unless taken
        again)."""
        self._forget(key, lost=False)

    def released(self, key: Any) -> None:
        """The row was released (by :meth:`release_sql` in the caller's transaction)."""
        self._forget(key, lost=False)

    def release(self, key: Any) -> None:
        """Release a held row in a transaction of its own. When the index cannot be written
        (it is away), the lease is no longer renewed: it runs out and the row is claimable
        again (by this node too) once the index is back."""
        if not self.holds(key):
            return
        try:
            with self.index.transaction() as db:
                db.execute(self.release_sql(), (key, self.node.id))
        finally:
            self.released(key)

    def renew(self) -> set[Any]:
        """Push the lease of every held row out by a lease; the rows found held by another node
        are lost (returned, and no longer held)."""
        with self._lock:
            keys = sorted(self._held, key=str)
        if not keys:
            return set()
        still: set[Any] = set()
        with self.index.transaction() as db:
            for start in range(0, len(keys), 500):
                chunk = keys[start : start + 500]
                db.execute(
                    f"UPDATE {self.table} SET lease_until = ? WHERE claimed_by = ?"
                    f" AND {self.key} IN ({_marks(len(chunk))})",
                    (self.until(), self.node.id, *chunk),
                )
                still.update(
                    r[0]
                    for r in db.execute(
                        f"SELECT {self.key} FROM {self.table} WHERE claimed_by = ?"
                        f" AND {self.key} IN ({_marks(len(chunk))})",
                        (self.node.id, *chunk),
                    )
                )
        lost = set(keys) - still
        for key in lost:
            log.warning("%s %s: lease lost to another node; stopping it", self.table, key)
            self._forget(key, lost=True)
        return lost

    def expire_own(self) -> int:
        """At start: rows this node's name held in a previous life (it stopped without
        releasing them) may be claimed again at once; how many."""
        with self.index.transaction() as db:
            cur = db.execute(
                f"UPDATE {self.table} SET lease_until = 0 WHERE claimed_by = ?", (self.node.id,)
            )
            return int(cur.rowcount)

    def _forget(self, key: Any, *, lost: bool) -> None:
        with self._lock:
            self._held.discard(key)
            if lost:
                self._lost.add(key)


class Renewer:
    """The thread renewing every held lease of this process, every third of the shortest
    lease; started by the first lease taken, a daemon (a stopped process's leases run out)."""

    _shared: Renewer | None = None
    _shared_lock = threading.Lock()

    def __init__(self) -> None:
        self._watched: weakref.WeakSet[Leases] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()

    @classmethod
    def shared(cls) -> Renewer:
        with cls._shared_lock:
            if cls._shared is None:
                cls._shared = cls()
            return cls._shared

    def watch(self, leases: Leases) -> None:
        with self._lock:
            self._watched.add(leases)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, name="lease-renewer", daemon=True
                )
                self._thread.start()

    def period(self) -> float:
        """Seconds between renewals: a third of the shortest lease watched (at least 0.1)."""
        with self._lock:
            leases = [w.node.lease_seconds for w in self._watched]
        return max(0.1, min(leases, default=60.0) / 3)

    def stop(self) -> None:
        """Renew nothing any more (``fiona serve`` at a clean stop, before it releases what it
        holds and closes the index)."""
        with self._lock:
            self._watched = weakref.WeakSet()

    def renew_all(self) -> None:
        with self._lock:
            watched = list(self._watched)
        for leases in watched:
            try:
                leases.renew()
            except IndexUnavailable as exc:
                # Nothing is marked lost: the rows are checked again when the index is back
                # (a lease that ran out meanwhile and another node took is lost then).
                OUTAGE.went_away(exc)
                return
            except Exception as exc:
                log.warning(
                    "could not renew the leases on %s (%s)", leases.table, type(exc).__name__
                )

    def _loop(self) -> None:
        while True:
            self._wake.wait(self.period())
            self._wake.clear()
            self.renew_all()


class ClusterLocks:
    """Once-per-cluster jobs: the row ``locks.name`` says which node runs the job.

    A node that takes a lock keeps it from tick to tick (each tick takes it for another lease;
    while the job runs, its :class:`Renewer` renews it), so a job ticking more often than the
    lease runs on that node's schedule only; when the node stops (released), dies, or no longer
    schedules the job (its lease runs out), the next node whose tick comes takes it. A job that
    ticks less often than the lease (retention) may change nodes between ticks. A row lock in
    the index works on both engines; :func:`_engine_lock` is where an engine's own lock
    (PostgreSQL's ``pg_try_advisory_lock``) would be taken in addition.
    """

    def __init__(
        self, index: Index, node: Node | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self.leases = Leases(index, "locks", node, clock)

    @property
    def node(self) -> Node:
        return self.leases.node

    def acquire(self, name: str) -> bool:
        """Take (or keep) the lock ``name``; False when another node holds it."""
        leases = self.leases
        now = leases.clock()
        with leases.index.transaction() as db:
            if not _engine_lock(db, name):
                return False
            db.execute(
                "INSERT INTO locks(name, claimed_by, lease_until, acquired_at) VALUES (?,?,?,?)"
                " ON CONFLICT (name) DO UPDATE SET claimed_by = excluded.claimed_by,"
                " lease_until = excluded.lease_until, acquired_at = excluded.acquired_at"
                " WHERE locks.claimed_by = excluded.claimed_by OR " + claimable("locks"),
                (name, self.node.id, leases.until(), now, now),
            )
            row = db.execute("SELECT claimed_by FROM locks WHERE name = ?", (name,)).fetchone()
        return row is not None and row[0] == self.node.id

    def run(self, name: str, job: Callable[[], object]) -> bool:
        """Run ``job`` when this node gets the lock ``name`` (renewed while the job runs, kept
        after it); False when another node holds it."""
        if not self.acquire(name):
            return False
        self.leases.took([name])
        try:
            job()
        finally:
            self.leases.forget(name)
        return True

    def holders(self) -> dict[str, tuple[str, float]]:
        """Every lock held now: name -> (node id, lease end)."""
        with self.leases.index.reading() as db:
            rows = db.execute(
                "SELECT name, claimed_by, lease_until FROM locks WHERE claimed_by IS NOT NULL"
                " AND lease_until >= ? ORDER BY name",
                (self.leases.clock(),),
            ).fetchall()
        return {str(n): (str(c), float(u)) for n, c, u in rows}


def _engine_lock(db: Any, name: str) -> bool:
    """The engine's own lock on ``name``, taken besides the ``locks`` row: nothing on SQLite
    (the row, written under ``BEGIN IMMEDIATE``, is the lock). On PostgreSQL this is where
    ``SELECT pg_try_advisory_xact_lock(hashtext(name))`` would go; the row lock is complete
    without it, so it is not taken."""
    return True


class OncePerCluster:
    """A scheduler job run by one node of the cluster: each tick takes (or keeps) the lock
    ``name`` and runs ``job``; a node that does not get it skips the tick (a debug line)."""

    def __init__(self, name: str, job: Callable[[], object], locks: ClusterLocks) -> None:
        self.name = name
        self.job = job
        self.locks = locks
        #: The wrapped job's ``interval`` (the REDCap jobs are scheduled by it).
        self.interval: Any = getattr(job, "interval", None)

    def __call__(self) -> None:
        try:
            mine = self.locks.acquire(self.name)
        except IndexUnavailable:
            raise  # the service's WaitsForIndex waits for it
        except Exception as exc:
            log.warning("job %s: cannot take its cluster lock (%s)", self.name, type(exc).__name__)
            return
        if not mine:
            log.debug("job %s: another node runs it; skipped", self.name)
            return
        self.locks.leases.took([self.name])
        try:
            self.job()
        finally:
            self.locks.leases.forget(self.name)
