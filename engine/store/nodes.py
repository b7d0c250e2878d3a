"""Nodes: the ``fiona serve`` processes sharing one index, each with its id and heartbeat.

A node's id is the site's ``node.name`` when set (stable across restarts: the node takes its
own leftover leases back at once when it starts again), else ``<host>/<pid>`` (unique on the
host even with several processes on one port; a restarted process is a new node, and what its
previous life held is taken over by any node once the lease runs out). The row ``nodes.id`` is
written at start (:meth:`NodeStore.register`), its ``last_heartbeat`` by the node's heartbeat
job, and ``stopped_at`` by a clean stop. ``fiona status`` lists every node with what it holds.

Every process has one node (:func:`this_node`): ``fiona serve`` sets it from the site config at
start; other commands (``fiona ingest``, tests) get ``<host>/<pid>`` with the default lease.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from engine.store.index import Index

__all__ = [
    "DEFAULT_LEASE_SECONDS",
    "FORGET_AFTER",
    "Node",
    "NodeStore",
    "node_id",
    "process_alive",
    "set_this_node",
    "this_node",
]

#: Seconds a claim lasts unless renewed (site ``node.lease_seconds``).
DEFAULT_LEASE_SECONDS = 60.0
#: Seconds after which a node that stopped (or whose heartbeat is that old) and holds
#: nothing is removed from ``nodes``.
FORGET_AFTER = 86400.0


def node_id(configured: str | None = None, host: str | None = None, pid: int | None = None) -> str:
    """The node id: ``configured`` when given, else ``<host>/<pid>``."""
    if configured:
        return configured
    return f"{host or socket.gethostname()}/{os.getpid() if pid is None else pid}"


@dataclass(frozen=True)
class Node:
    """This process as a node of the cluster. ``lease_seconds``: how long its claims last
    without renewal."""

    id: str
    lease_seconds: float = DEFAULT_LEASE_SECONDS
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)


_this: Node | None = None


def this_node() -> Node:
    """The node of this process (``<host>/<pid>`` until :func:`set_this_node`)."""
    global _this
    if _this is None or _this.pid != os.getpid():  # a forked child is a process of its own
        _this = Node(node_id())
    return _this


def set_this_node(node: Node) -> None:
    """Make ``node`` this process's node (``fiona serve`` at start)."""
    global _this
    _this = node


def process_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this host (another user's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


#: The leased tables and the word ``fiona status`` uses for their rows.
HELD = {"pipeline_runs": "runs", "transfers": "transfers", "retrieve_rows": "retrieval_rows"}


class NodeStore:
    """The ``nodes`` table."""

    def __init__(self, index: Index) -> None:
        self.index = index

    def register(self, node: Node, version: str, now: float | None = None) -> None:
        """Write this node's row at start (a node started again under its name replaces it)."""
        now = time.time() if now is None else now
        with self.index.transaction() as db:
            db.execute(
                "INSERT INTO nodes(id, host, pid, version, started_at, last_heartbeat)"
                " VALUES (?,?,?,?,?,?) ON CONFLICT (id) DO UPDATE SET host = excluded.host,"
                " pid = excluded.pid, version = excluded.version,"
                " started_at = excluded.started_at, last_heartbeat = excluded.last_heartbeat,"
                " stopped_at = NULL",
                (node.id, node.host, node.pid, version, now, now),
            )

    def running(self, since: float) -> int:
        """Nodes not stopped whose last heartbeat is at or after ``since`` (epoch seconds)."""
        with self.index.reading() as db:
            row = db.execute(
                "SELECT count(*) FROM nodes WHERE stopped_at IS NULL AND last_heartbeat >= ?",
                (since,),
            ).fetchone()
        return int(row[0])

    def get(self, node_id_: str) -> dict[str, Any] | None:
        """One node's row (see :meth:`nodes`), or None."""
        return next((n for n in self.nodes() if n["id"] == node_id_), None)

    def beat(self, node: Node, now: float | None = None) -> None:
        """The node's heartbeat; nodes long gone that hold nothing are forgotten."""
        now = time.time() if now is None else now
        with self.index.transaction() as db:
            db.execute(
                "INSERT INTO nodes(id, host, pid, started_at, last_heartbeat) VALUES (?,?,?,?,?)"
                " ON CONFLICT (id) DO UPDATE SET last_heartbeat = excluded.last_heartbeat,"
                " stopped_at = NULL",
                (node.id, node.host, node.pid, now, now),
            )
            held = " AND ".join(
                f"NOT EXISTS (SELECT 1 FROM {t} WHERE claimed_by = nodes.id)" for t in HELD
            )
            db.execute(
                f"DELETE FROM nodes WHERE id != ? AND last_heartbeat < ? AND {held}",
                (node.id, now - FORGET_AFTER),
            )

    def stopped(self, node: Node, now: float | None = None) -> None:
        """A clean stop: the node's row says so, and what it held is released."""
        now = time.time() if now is None else now
        with self.index.transaction() as db:
            db.execute("UPDATE nodes SET stopped_at = ? WHERE id = ?", (now, node.id))
            for table in (*HELD, "locks"):
                db.execute(
                    f"UPDATE {table} SET claimed_by = NULL, lease_until = NULL"
                    " WHERE claimed_by = ?",
                    (node.id,),
                )

    def take_over_dead_here(self, node: Node) -> int:
        """At start: leases held by other nodes of this host whose process is gone (killed,
        crashed) run out at once instead of after their lease, so a restarted unnamed node (a
        new ``<host>/<pid>``) takes its previous life's work up without waiting; how many
        leases. A live process (or a pid now another's) keeps them: the safe side."""
        with self.index.reading() as db:
            rows = db.execute(
                "SELECT id, pid FROM nodes WHERE host = ? AND id != ? AND stopped_at IS NULL",
                (node.host, node.id),
            ).fetchall()
        dead = [str(r[0]) for r in rows if not process_alive(int(r[1]))]
        expired = 0
        for gone in dead:
            with self.index.transaction() as db:
                for table in (*HELD, "locks"):
                    cur = db.execute(
                        f"UPDATE {table} SET lease_until = 0 WHERE claimed_by = ?", (gone,)
                    )
                    expired += max(cur.rowcount, 0)
                db.execute("UPDATE nodes SET stopped_at = ? WHERE id = ?", (time.time(), gone))
        return expired

    def nodes(self) -> list[dict[str, Any]]:
        """Every node: id, host, pid, version, started_at, last_heartbeat, stopped_at (epoch
        seconds or None), ``holds``: the runs, transfers and retrieval rows it claimed (a dead
        node's until another takes them over), and ``jobs``: the once-per-cluster jobs (locks)
        it runs."""
        with self.index.reading() as db:
            rows = db.execute(
                "SELECT id, host, pid, version, started_at, last_heartbeat, stopped_at"
                " FROM nodes ORDER BY id"
            ).fetchall()
            counts: dict[str, dict[str, int]] = {}
            for table, word in HELD.items():
                for holder, n in db.execute(
                    f"SELECT claimed_by, count(*) FROM {table} WHERE claimed_by IS NOT NULL"
                    " GROUP BY claimed_by"
                ):
                    counts.setdefault(str(holder), {})[word] = int(n)
            locks: dict[str, list[str]] = {}
            for name, holder in db.execute(
                "SELECT name, claimed_by FROM locks WHERE claimed_by IS NOT NULL ORDER BY name"
            ):
                locks.setdefault(str(holder), []).append(str(name))
        out = []
        for id_, host, pid, version, started, beat, stopped in rows:
            held = counts.get(str(id_), {})
            out.append(
                {
                    "id": str(id_),
                    "host": str(host),
                    "pid": int(pid),
                    "version": str(version),
                    "started_at": float(started),
                    "last_heartbeat": float(beat),
                    "stopped_at": None if stopped is None else float(stopped),
                    "holds": {word: held.get(word, 0) for word in HELD.values()},
                    "jobs": locks.get(str(id_), []),
                }
            )
        return out
