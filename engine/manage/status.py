"""``fiona status [--json]``: is the service healthy, and where is every study?

Reads the index (so it works whether or not ``fiona serve`` runs) and the status file
``<data_dir>/status.json`` the heartbeat writes (the scheduled jobs and their next run times).
The service counts as not running when the status file is missing, says it stopped, or is older
than three heartbeat intervals. Exit status: 0 healthy; 1 when the last heartbeat's C-ECHO failed,
when there is none, or when it is stale.

Counts, times and project names only: no UIDs, no header values (the web page shows the same).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from engine.config.model import SiteConfig
from engine.manage.heartbeat import STATUS_FILE, iso, parse_iso
from engine.store.index import Index

__all__ = ["STALE_BEATS", "collect_status", "render_text", "run_status"]

#: Heartbeat intervals after which the service counts as not running.
STALE_BEATS = 3

_PROJECT_SQL = {
    "received": "SELECT project, count(*) FROM study_routes GROUP BY project",
    "complete": "SELECT project, count(*) FROM study_routes WHERE state='complete'"
    " GROUP BY project",
    "in_pipeline": "SELECT project, count(DISTINCT study_uid) FROM pipeline_runs"
    " WHERE state IN ('pending','running') GROUP BY project",
    # A study is sent to a project when it has transfers and all of them are done.
    "sent": "SELECT project, count(*) FROM (SELECT project, study_uid FROM transfers"
    " GROUP BY project, study_uid HAVING sum(state != 'done') = 0) GROUP BY project",
    "quarantined": "SELECT project, count(DISTINCT study_uid) FROM quarantine"
    " WHERE state='held' AND project != '' GROUP BY project",
    "deleted": "SELECT r.project, count(*) FROM study_routes r JOIN studies st"
    " ON st.study_uid = r.study_uid WHERE st.deleted_at IS NOT NULL GROUP BY r.project",
}


def _projects(index: Index) -> dict[str, dict[str, int]]:
    """Per project: studies received (routed to it), complete, in pipeline, sent, quarantined,
    deleted by retention."""
    out: dict[str, dict[str, int]] = {}
    with index.reading() as db:
        for key, sql in _PROJECT_SQL.items():
            for project, n in db.execute(sql):
                out.setdefault(str(project), dict.fromkeys(_PROJECT_SQL, 0))[key] = int(n)
    return dict(sorted(out.items()))


def _outbox(index: Index, now: float) -> dict[str, Any]:
    """Transfers by state, and the oldest queued one (when, and its age in seconds)."""
    with index.reading() as db:
        states = dict(db.execute("SELECT state, count(*) FROM transfers GROUP BY state"))
        oldest = db.execute("SELECT min(created_at) FROM transfers WHERE state='queued'").fetchone()
    by_state = {
        s: int(states.get(s, 0)) for s in ("queued", "sending", "done", "failed", "cancelled")
    }
    at = oldest[0]
    return {
        "by_state": by_state,
        "oldest_queued_at": iso(at),
        "oldest_queued_age_seconds": None if at is None else round(now - at, 1),
    }


def _last_heartbeat(index: Index, now: float) -> dict[str, Any] | None:
    """The newest heartbeat row with its age in seconds, or None."""
    with index.reading() as db:
        row = db.execute(
            "SELECT at, echo_ok, echo_detail, free_bytes, total_bytes, report FROM heartbeats"
            " ORDER BY id DESC LIMIT 1"
        ).fetchone()
    if row is None:
        return None
    at, ok, detail, free, total, report = row
    full = json.loads(report or "{}")
    return {
        "at": iso(at),
        "age_seconds": round(now - at, 1),
        "echo_ok": bool(ok),
        "echo_detail": detail,
        "disk": full.get("disk", {"free_bytes": free, "total_bytes": total}),
        "queues": full.get("queues", {}),
        "projects": full.get("projects", {}),
    }


def _service(data_dir: Path, interval: float, now: float) -> dict[str, Any]:
    """What the status file says about the service: running or not, and its jobs."""
    try:
        doc = json.loads((data_dir / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return {"running": False, "why": "no status file", "written_at": None, "jobs": []}
    written = parse_iso(doc.get("written_at"))
    stale = written is None or now - written > STALE_BEATS * interval
    why = ""
    if not doc.get("running", False):
        why = "stopped"
    elif stale:
        why = f"status file older than {STALE_BEATS} heartbeat intervals"
    return {
        "running": not why,
        "why": why,
        "written_at": doc.get("written_at"),
        "jobs": doc.get("jobs", []) if not why else [],
    }


def collect_status(site: SiteConfig, index: Index, now: float | None = None) -> dict[str, Any]:
    """The whole status as JSON-ready data (``fiona status --json`` and ``GET /status.json``)."""
    now = time.time() if now is None else now
    interval = site.heartbeat.interval
    heartbeat = _last_heartbeat(index, now)
    service = _service(site.data_dir, interval, now)
    problems = []
    if not service["running"]:
        problems.append(f"service not running ({service['why']})")
    if heartbeat is None:
        problems.append("no heartbeat recorded")
    else:
        if not heartbeat["echo_ok"]:
            problems.append(f"last heartbeat: C-ECHO failed ({heartbeat['echo_detail']})")
        if heartbeat["age_seconds"] > STALE_BEATS * interval:
            problems.append("last heartbeat is stale")
    return {
        "generated_at": iso(now),
        "healthy": not problems,
        "problems": problems,
        "ae_title": site.ae_title,
        "heartbeat_interval_seconds": interval,
        "service": service,
        "heartbeat": heartbeat,
        "projects": _projects(index),
        "outbox": _outbox(index, now),
    }


def _gib(n: object) -> str:
    return f"{int(n) / 2**30:.1f} GiB" if isinstance(n, int | float) else "-"


def _heartbeat_lines(hb: dict[str, Any] | None) -> list[str]:
    if hb is None:
        return ["heartbeat   none recorded"]
    echo = "ok" if hb["echo_ok"] else f"FAILED ({hb['echo_detail']})"
    disk = hb.get("disk", {})
    pct = disk.get("free_percent")
    free = f"{_gib(disk.get('free_bytes'))} free" + (f" ({pct:.1f}%)" if pct is not None else "")
    return [
        f"heartbeat   {hb['at']} ({hb['age_seconds']:.0f} s ago)",
        f"  echo      {echo}",
        f"  disk      {free} of {_gib(disk.get('total_bytes'))}",
    ]


def _project_lines(status: dict[str, Any]) -> list[str]:
    projects: dict[str, dict[str, int]] = status["projects"]
    activity = (status["heartbeat"] or {}).get("projects", {})
    head = (
        f"{'project':<16} {'received':>8} {'complete':>8} {'pipeline':>8} {'sent':>6}"
        f" {'held':>5} {'deleted':>7}  last receipt          last send"
    )
    lines = [head]
    for name, c in projects.items():
        seen = activity.get(name, {})
        lines.append(
            f"{name:<16.16} {c['received']:>8} {c['complete']:>8} {c['in_pipeline']:>8}"
            f" {c['sent']:>6} {c['quarantined']:>5} {c['deleted']:>7}"
            f"  {seen.get('last_receipt') or '-':<21} {seen.get('last_send') or '-'}"
        )
    return lines if projects else ["projects    no studies routed yet"]


def render_text(status: dict[str, Any]) -> str:
    """The status as a compact plain-text report."""
    service = status["service"]
    state = "running" if service["running"] else f"NOT RUNNING ({service['why']})"
    outbox = status["outbox"]
    counts = ", ".join(f"{k} {v}" for k, v in outbox["by_state"].items())
    lines = [
        f"fiona {status['ae_title']}: {'healthy' if status['healthy'] else 'UNHEALTHY'}",
        *[f"  ! {p}" for p in status["problems"]],
        f"service     {state}",
        *_heartbeat_lines(status["heartbeat"]),
        f"outbox      {counts}",
    ]
    if outbox["oldest_queued_at"]:
        lines.append(
            f"  oldest queued {outbox['oldest_queued_at']}"
            f" ({outbox['oldest_queued_age_seconds']:.0f} s)"
        )
    lines += ["", *_project_lines(status)]
    if service["jobs"]:
        lines += ["", f"{'job':<20} {'next run':<21} what"]
        lines += [
            f"{j['id']:<20.20} {j['next_run_time'] or 'paused':<21} {j['name']}"
            for j in service["jobs"]
        ]
    return "\n".join(lines)


def run_status(args: argparse.Namespace) -> int:
    """``fiona status``: print the status; 0 when healthy, 1 when not, 2 on a bad site config."""
    from engine.service import run_with_index

    def command(site: SiteConfig, index: Index) -> int:
        status = collect_status(site, index)
        print(json.dumps(status, indent=2, sort_keys=True) if args.json else render_text(status))
        return 0 if status["healthy"] else 1

    return run_with_index(args, command, read_only=True)
