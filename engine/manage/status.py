"""``fiona status [--json]``: does the service work, does anything need a person, where is every
study?

Everything is read when asked (so it works whether or not ``fiona serve`` runs, and never lags
behind a heartbeat): counts from the index, free disk from the file system, invalid project
files from the projects folder, whether the service runs from ``<data_dir>/serve.pid``
(:mod:`engine.manage.pidfile`), the last heartbeat from the index and the scheduled jobs from the
status file ``<data_dir>/status.json``; instances received and sent per hour over the last day
(:mod:`engine.store.activity`); the nodes sharing the index, their heartbeats and what each
holds (:mod:`engine.manage.status_nodes`).

Two separate verdicts:

* **healthy**: the service works: a ``fiona serve`` process serves this data folder (its pid
  file names a live one, or a node of the cluster is running), its last
  heartbeat is younger than ``STALE_BEATS`` intervals and its C-ECHO of our own SCP succeeded,
  and the data folder has at least ``limits.min_free_disk_mb`` free (below it C-STOREs are
  refused). Each failed check is one line in ``problems``.
* **attention**: items that need a person (:mod:`engine.manage.attention`): held quarantine
  items, dead-lettered transfers, invalid (disabled) project files, each counted and listed.

Exit status: ``EXIT_HEALTHY`` (0) healthy and nothing needs attention; ``EXIT_UNHEALTHY`` (1)
unhealthy or not running (whatever else); ``EXIT_CONFIG`` (2) the site config is invalid;
``EXIT_ATTENTION`` (3) healthy, but something needs a person.

Counts, times and project names only: no UIDs, no header values (the web page shows the same).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from engine.config.model import SiteConfig
from engine.manage.attention import attention, quarantine_summary
from engine.manage.heartbeat import STATUS_FILE, disk_usage, iso
from engine.manage.pidfile import ServeProcess, node_dir, serve_process
from engine.manage.status_nodes import node_lines, node_rows
from engine.store.activity import hourly_activity, project_counts, project_last_times
from engine.store.commands import run_with_index
from engine.store.db import IndexUnavailable
from engine.store.index import Index
from engine.store.mpps import MppsStore

__all__ = [
    "EXIT_ATTENTION",
    "EXIT_CONFIG",
    "EXIT_HEALTHY",
    "EXIT_UNHEALTHY",
    "STALE_BEATS",
    "collect_status",
    "exit_code",
    "project_rows",
    "render_text",
    "run_status",
]

#: Heartbeat intervals after which a running service counts as unhealthy (hung).
STALE_BEATS = 3
EXIT_HEALTHY = 0
EXIT_UNHEALTHY = 1
EXIT_CONFIG = 2
EXIT_ATTENTION = 3

_PROJECT_KEYS = ("received", "complete", "in_pipeline", "sent", "quarantined", "deleted")


def project_rows(index: Index) -> dict[str, dict[str, Any]]:
    """Per project: studies received (routed to it), complete, in pipeline, sent, quarantined,
    deleted by retention; its last receipt and last delivery (ISO 8601 UTC or None)."""
    out: dict[str, dict[str, Any]] = dict(project_counts(index))
    for project, (received, sent) in project_last_times(index).items():
        row = out.setdefault(project, dict.fromkeys(_PROJECT_KEYS, 0))
        row.update(last_receipt=iso(received), last_send=iso(sent))
    for counts in out.values():
        counts.setdefault("last_receipt", None)
        counts.setdefault("last_send", None)
    return dict(sorted(out.items()))


def _outbox(index: Index, now: float) -> dict[str, Any]:
    """Transfers by state, pipeline runs waiting or running, and the oldest queued transfer
    (when, and its age in seconds)."""
    with index.reading() as db:
        states = dict(db.execute("SELECT state, count(*) FROM transfers GROUP BY state"))
        oldest = db.execute("SELECT min(created_at) FROM transfers WHERE state='queued'").fetchone()
        runs = dict(db.execute("SELECT state, count(*) FROM pipeline_runs GROUP BY state"))
    by_state = {
        s: int(states.get(s, 0)) for s in ("queued", "sending", "done", "failed", "cancelled")
    }
    at = oldest[0]
    return {
        "by_state": by_state,
        "pipeline_runs": {s: int(runs.get(s, 0)) for s in ("pending", "running")},
        "oldest_queued_at": iso(at),
        "oldest_queued_age_seconds": None if at is None else round(now - at, 1),
    }


def _last_heartbeat(index: Index, now: float) -> dict[str, Any] | None:
    """The newest heartbeat row: when, its age in seconds, and its C-ECHO result; or None."""
    with index.reading() as db:
        row = db.execute(
            "SELECT at, echo_ok, echo_detail FROM heartbeats ORDER BY id DESC LIMIT 1"
        ).fetchone()
    if row is None:
        return None
    at, ok, detail = row
    return {
        "at": iso(at),
        "age_seconds": round(now - at, 1),
        "echo_ok": bool(ok),
        "echo_detail": detail,
    }


def _service(data_dir: Path, nodes: list[dict[str, Any]]) -> dict[str, Any]:
    """Whether ``fiona serve`` runs (its pid file names a live ``fiona serve`` process, or a
    node sharing the index runs: several nodes share one data folder, and the pid file names
    the last one started) and, when it does, its jobs from the status file (the running
    node's own, ``nodes/<node>/status.json``, when the pid file names a process gone)."""
    process = serve_process(data_dir)
    folder = data_dir
    running = [n for n in nodes if n["state"] == "running"]
    if not process.running and running:
        process = ServeProcess(True, running[0]["pid"])
        folder = node_dir(data_dir, running[0]["id"])
    jobs: list[dict[str, Any]] = []
    written = None
    if process.running:
        try:
            doc = json.loads((folder / STATUS_FILE).read_text())
            jobs, written = doc.get("jobs", []), doc.get("written_at")
        except (OSError, ValueError):
            pass
    return {
        "running": process.running,
        "pid": process.pid,
        "why": process.why,
        "status_file_written_at": written,
        "jobs": jobs,
    }


def _disk(site: SiteConfig) -> dict[str, Any]:
    """Free space of the data folder now (bytes, percent) and the receiver's floor (bytes)."""
    try:
        disk = disk_usage(site.data_dir)
    except OSError as exc:
        return {"error": exc.strerror or type(exc).__name__}
    return {
        "free_bytes": disk.free_bytes,
        "total_bytes": disk.total_bytes,
        "free_percent": disk.free_percent,
        "min_free_bytes": site.limits.min_free_disk_mb * 2**20,
    }


def _problems(
    site: SiteConfig, service: dict[str, Any], heartbeat: dict[str, Any] | None, disk: Any
) -> list[str]:
    """Why the service is not healthy (empty: it is)."""
    limit = STALE_BEATS * site.heartbeat.interval
    problems = []
    if not service["running"]:
        problems.append(f"service not running ({service['why']})")
    if heartbeat is None:
        problems.append("no heartbeat recorded")
    else:
        if not heartbeat["echo_ok"]:
            problems.append(f"last heartbeat: C-ECHO failed ({heartbeat['echo_detail']})")
        if service["running"] and heartbeat["age_seconds"] > limit:
            problems.append(
                f"last heartbeat is {heartbeat['age_seconds']:.0f} s old (more than"
                f" {STALE_BEATS} intervals): the service may hang"
            )
    if "error" in disk:
        problems.append(f"disk: cannot measure the data folder ({disk['error']})")
    elif disk["free_bytes"] < disk["min_free_bytes"]:
        problems.append(
            f"disk: {disk['free_bytes'] / 2**20:.0f} MiB free, below limits.min_free_disk_mb"
            f" ({site.limits.min_free_disk_mb}): C-STOREs are refused"
        )
    return problems


def collect_status(site: SiteConfig, index: Index, now: float | None = None) -> dict[str, Any]:
    """The whole status as JSON-ready data (``fiona status --json`` and ``GET /status.json``)."""
    now = time.time() if now is None else now
    nodes = node_rows(index, site.heartbeat.interval, STALE_BEATS, now)
    service = _service(site.data_dir, nodes)
    heartbeat = _last_heartbeat(index, now)
    disk = _disk(site)
    problems = _problems(site, service, heartbeat, disk)
    quarantine = quarantine_summary(index)
    needs = attention(index, site.projects_dir, quarantine)
    return {
        "generated_at": iso(now),
        "healthy": not problems,
        "problems": problems,
        "attention": needs,
        "ae_title": site.ae_title,
        "heartbeat_interval_seconds": site.heartbeat.interval,
        "service": service,
        "nodes": nodes,
        "heartbeat": heartbeat,
        "disk": disk,
        "quarantine": {k: v for k, v in quarantine.items() if k != "groups"},
        "projects": project_rows(index),
        "outbox": _outbox(index, now),
        "mpps_last_24h": MppsStore(index).counts(since=now - 86400),
        "last_day": hourly_activity(index, now),
    }


def exit_code(status: dict[str, Any]) -> int:
    """0 healthy and nothing needs attention, 1 unhealthy, 3 healthy but needs attention."""
    if not status["healthy"]:
        return EXIT_UNHEALTHY
    return EXIT_ATTENTION if status["attention"]["needed"] else EXIT_HEALTHY


def verdict(status: dict[str, Any]) -> str:
    """``healthy``, ``UNHEALTHY``, each followed by ``, N need attention`` when items do."""
    counts = status["attention"]["counts"]
    waiting = counts["quarantine_held_items"] + counts["dead_letters"]
    waiting += counts["invalid_projects"]
    word = "healthy" if status["healthy"] else "UNHEALTHY"
    verb = "needs" if waiting == 1 else "need"
    return f"{word}, {waiting} {verb} attention" if waiting else word


def _gib(n: object) -> str:
    return f"{int(n) / 2**30:.1f} GiB" if isinstance(n, int | float) else "-"


def _health_lines(status: dict[str, Any]) -> list[str]:
    service, hb, disk = status["service"], status["heartbeat"], status["disk"]
    running = service["running"]
    state = f"running (pid {service['pid']})" if running else f"NOT RUNNING ({service['why']})"
    lines = [f"service     {state}"]
    if hb is None:
        lines.append("heartbeat   none recorded")
    else:
        echo = "ok" if hb["echo_ok"] else f"FAILED ({hb['echo_detail']})"
        lines += [f"heartbeat   {hb['at']} ({hb['age_seconds']:.0f} s ago)", f"  echo      {echo}"]
    if "error" in disk:
        lines.append(f"disk        unknown ({disk['error']})")
    else:
        free = f"{_gib(disk['free_bytes'])} free ({disk['free_percent']:.1f}%)"
        lines.append(f"disk        {free} of {_gib(disk['total_bytes'])}")
    return lines


def _attention_lines(status: dict[str, Any]) -> list[str]:
    needs = status["attention"]
    counts = needs["counts"]
    if not needs["needed"]:
        return ["attention   nothing needs a person"]
    lines = ["attention"]
    if counts["quarantine_held_items"]:
        lines.append(
            f"  quarantine       {counts['quarantine_held_items']} held items in"
            f" {counts['quarantine_held_studies']} studies (fiona quarantine list)"
        )
        lines += [
            f"    {g['project'] or '(receipt)'}: {g['reason']} {g['items']}"
            for g in needs["quarantine"]
        ]
    if counts["dead_letters"]:
        given_up = f"{counts['dead_letters']} transfers given up"
        lines.append(f"  dead letters     {given_up} (fiona transfers list --state failed)")
        lines += [
            f"    transfer {d['id']} {d['project']}/{d['destination']} after {d['attempts']}"
            f" attempts: {d['last_error']}"
            for d in needs["dead_letters"]
        ]
    if counts["invalid_projects"]:
        lines.append(f"  invalid projects {counts['invalid_projects']} disabled (fiona validate)")
        lines += [f"    {p['problems'][0]}" for p in needs["invalid_projects"]]
    return lines


def _project_lines(status: dict[str, Any]) -> list[str]:
    projects: dict[str, dict[str, Any]] = status["projects"]
    head = (
        f"{'project':<16} {'received':>8} {'complete':>8} {'pipeline':>8} {'sent':>6}"
        f" {'held':>5} {'deleted':>7}  last receipt          last send"
    )
    lines = [head]
    for name, c in projects.items():
        lines.append(
            f"{name:<16.16} {c['received']:>8} {c['complete']:>8} {c['in_pipeline']:>8}"
            f" {c['sent']:>6} {c['quarantined']:>5} {c['deleted']:>7}"
            f"  {c['last_receipt'] or '-':<21} {c['last_send'] or '-'}"
        )
    return lines if projects else ["projects    no studies routed yet"]


def render_text(status: dict[str, Any]) -> str:
    """The status as a compact plain-text report."""
    outbox, quarantine = status["outbox"], status["quarantine"]
    counts = ", ".join(f"{k} {v}" for k, v in outbox["by_state"].items())
    runs = outbox["pipeline_runs"]
    lines = [
        f"fiona {status['ae_title']}: {verdict(status)}",
        *[f"  ! {p}" for p in status["problems"]],
        *_health_lines(status),
        f"pipeline    runs pending {runs['pending']}, running {runs['running']}",
        f"outbox      {counts}",
    ]
    if outbox["oldest_queued_at"]:
        lines.append(
            f"  oldest queued {outbox['oldest_queued_at']}"
            f" ({outbox['oldest_queued_age_seconds']:.0f} s)"
        )
    lines.append(
        f"quarantine  {quarantine['held_items']} held ({quarantine['held_studies']} studies),"
        f" {quarantine['resolved_items']} resolved"
    )
    mpps = status.get("mpps_last_24h") or {}
    if any(mpps.values()):
        steps = ", ".join(f"{n} {state.lower()}" for state, n in mpps.items())
        lines.append(f"mpps        procedure steps of the last 24 h: {steps}")
    lines += _attention_lines(status)
    lines += node_lines(status.get("nodes") or [])
    lines += ["", *_project_lines(status)]
    jobs = status["service"]["jobs"]
    if jobs:
        lines += ["", f"{'job':<20} {'next run':<21} what"]
        lines += [
            f"{j['id']:<20.20} {j['next_run_time'] or 'paused':<21} {j['name']}" for j in jobs
        ]
    return "\n".join(lines)


def index_away_status(site: SiteConfig, error: str, now: float | None = None) -> dict[str, Any]:
    """The status while the index cannot be used (its database server stopped or out of
    reach): unhealthy, with the one problem; nothing else can be read. ``error`` names the
    index by its redacted location, never a password."""
    now = time.time() if now is None else now
    return {
        "generated_at": iso(now),
        "healthy": False,
        "problems": [f"index unavailable: {error}"],
        "ae_title": site.ae_title,
        "index": {"available": False, "error": error},
    }


def run_status(args: argparse.Namespace) -> int:
    """``fiona status``: print the status; exit as :func:`exit_code` (2 on a bad site config,
    or an index missing, damaged or of another version). An index database that cannot be
    reached is a health problem like any other: one line, exit 1 (unhealthy), so that
    monitoring says so."""

    def command(site: SiteConfig, index: Index) -> int:
        try:
            status = collect_status(site, index)
        except IndexUnavailable as exc:  # went away since it was opened
            status = index_away_status(site, f"{index.location}: {exc}")
        return _print_status(args, status)

    def unreachable(site: SiteConfig, why: str) -> int:
        return _print_status(args, index_away_status(site, why))

    return run_with_index(args, command, read_only=True, unreachable=unreachable)


def _print_status(args: argparse.Namespace, status: dict[str, Any]) -> int:
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    elif "index" in status:
        print(f"fiona {status['ae_title']}: UNHEALTHY")
        print("\n".join(f"  ! {p}" for p in status["problems"]))
        print("  a running fiona waits for it and resumes by itself; nothing else can be shown")
    else:
        print(render_text(status))
    return exit_code(status)
