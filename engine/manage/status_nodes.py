"""The nodes of ``fiona status``: every ``fiona serve`` process sharing the index, its last
heartbeat and what it holds (:mod:`engine.store.nodes`).

A node is ``running`` while its heartbeat is younger than ``STALE_BEATS`` heartbeat intervals
(and, on this host, its process is alive), ``stale`` when it stopped beating without a clean
stop (hung or killed: what it holds is taken over once its leases run out), ``stopped`` after a
clean stop.
"""

from __future__ import annotations

import socket
from typing import Any

from engine.manage.heartbeat import iso
from engine.store.index import Index
from engine.store.nodes import NodeStore, process_alive

__all__ = ["node_lines", "node_rows"]


def node_rows(index: Index, interval: float, stale_beats: int, now: float) -> list[dict[str, Any]]:
    """Every node as JSON-ready data: id, host, pid, version, state (running, stale,
    stopped), started_at and last_heartbeat (ISO 8601 UTC), heartbeat_age_seconds, holds
    (leased runs, transfers, retrieval rows) and jobs (the once-per-cluster jobs it runs)."""
    here = socket.gethostname()
    out = []
    for n in NodeStore(index).nodes():
        age = now - n["last_heartbeat"]
        if n["stopped_at"] is not None:
            state = "stopped"
        elif age > stale_beats * interval or (n["host"] == here and not process_alive(n["pid"])):
            state = "stale"
        else:
            state = "running"
        out.append(
            {
                "id": n["id"],
                "host": n["host"],
                "pid": n["pid"],
                "version": n["version"],
                "state": state,
                "started_at": iso(n["started_at"]),
                "last_heartbeat": iso(n["last_heartbeat"]),
                "heartbeat_age_seconds": round(age, 1),
                "holds": n["holds"],
                "jobs": n["jobs"],
            }
        )
    return out


def node_lines(nodes: list[dict[str, Any]]) -> list[str]:
    """The nodes as lines of ``fiona status``'s text."""
    if not nodes:
        return []
    lines = ["", f"{'node':<28} {'state':<8} {'last heartbeat':<21} {'age':>6}  holds"]
    for n in nodes:
        held = n["holds"]
        holds = (
            f"runs {held['runs']}, transfers {held['transfers']},"
            f" retrieval rows {held['retrieval_rows']}"
        )
        jobs = f"; runs {', '.join(n['jobs'])}" if n["jobs"] else ""
        state = n["state"] if n["state"] != "stale" else "STALE"
        lines.append(
            f"{n['id']:<28.28} {state:<8} {n['last_heartbeat'] or '-':<21}"
            f" {n['heartbeat_age_seconds']:>5.0f}s  {holds}{jobs}"
        )
    return lines
