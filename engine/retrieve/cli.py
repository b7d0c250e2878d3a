"""``fiona pacs list|echo`` and ``fiona query``: the site's remote PACS from the terminal.

Exit status: 0 done (a query that matched nothing included), 1 the PACS could not be reached
or refused (the message says why), 2 the command or the config is wrong. What a query matched
(patient fields included) goes to the operator's terminal only; the log and the audit get the
PACS's name, the level and the count.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from engine.config.model import SiteConfig
from engine.config.pacs import PacsConfig
from engine.net.scu import AssociationBroken
from engine.retrieve.peer import echo, open_association
from engine.retrieve.query import SERIES_KEYS, STUDY_KEYS, BadFilter, Filters, Level, query
from engine.store.audit import AuditLog, operator
from engine.store.commands import load_site_or_exit, run_with_index
from engine.store.index import Index
from engine.store.retrievals import RetrievalStore

__all__ = ["run_pacs", "run_query", "run_retrieve"]

log = logging.getLogger(__name__)


def _pacs(site: SiteConfig, name: str) -> PacsConfig | None:
    found = site.pacs_named(name)
    if found is None:
        known = ", ".join(p.name for p in site.pacs) or "none: add a pacs entry to the site config"
        print(f"fiona: no PACS named {name!r} (configured: {known})", file=sys.stderr)
    return found


def run_pacs(args: argparse.Namespace) -> int:
    """``fiona pacs list`` and ``fiona pacs echo NAME``."""
    site = load_site_or_exit(args)
    if site is None:
        return 2
    if args.action == "list":
        return _list(site, args.json)
    pacs = _pacs(site, args.name)
    if pacs is None:
        return 2
    problem = echo(site, pacs)
    if problem is not None:
        print(f"fiona: C-ECHO failed: {problem}", file=sys.stderr)
        return 1
    print(f"PACS {pacs.name} ({pacs.ae_title} at {pacs.host}:{pacs.port}) answered the C-ECHO")
    return 0


def _list(site: SiteConfig, as_json: bool) -> int:
    rows = [
        {
            "name": p.name,
            "ae_title": p.ae_title,
            "host": p.host,
            "port": p.port,
            "tls": p.tls.enabled,
            "calling_ae": p.calling_ae_for(site.ae_title),
            "retrieve": str(p.retrieve),
            "on_get_refused": str(p.on_get_refused),
            "move_destination": p.move_destination_for(site.ae_title),
            "max_associations": p.limits.max_associations,
            "studies_per_hour": p.limits.studies_per_hour,
            "windows": [w.text for w in p.limits.windows],
        }
        for p in site.pacs
    ]
    if as_json:
        for row in rows:
            print(json.dumps(row))
        return 0
    if not rows:
        print("no PACS configured (add pacs entries to the site config; see README)")
        return 0
    table = [
        [
            str(r["name"]),
            f"{r['ae_title']}@{r['host']}:{r['port']}" + (" (TLS)" if r["tls"] else ""),
            str(r["calling_ae"]),
            _retrieve_text(r),
            _limits_text(r),
        ]
        for r in rows
    ]
    _print_table(["name", "PACS", "calling AE", "retrieve", "limits"], table)
    return 0


def _retrieve_text(row: dict[str, object]) -> str:
    move = f"C-MOVE to {row['move_destination']}"
    if row["retrieve"] == "move":
        return move
    return f"C-GET (refused: {move})" if row["on_get_refused"] == "move" else "C-GET"


def _limits_text(row: dict[str, object]) -> str:
    per_hour = row["studies_per_hour"]
    windows = row["windows"]
    parts = [f"{row['max_associations']} assoc."]
    parts.append(f"{per_hour} studies/h" if per_hour else "no hourly limit")
    parts.append(", ".join(windows) if isinstance(windows, list) and windows else "any time")
    return "; ".join(parts)


def run_query(args: argparse.Namespace) -> int:
    """``fiona query NAME [filters] [--level study|series] [--json]``."""
    site = load_site_or_exit(args)
    if site is None:
        return 2
    pacs = _pacs(site, args.name)
    if pacs is None:
        return 2
    try:
        filters = Filters(
            args.patient_id or "",
            args.accession or "",
            args.study_date or "",
            args.modality or "",
            args.study_description or "",
        ).checked()
    except BadFilter as exc:
        print(f"fiona: {exc}", file=sys.stderr)
        return 2
    level = Level(args.level)
    try:
        assoc = open_association(site, pacs)
    except AssociationBroken as exc:
        print(f"fiona: query failed: {exc}", file=sys.stderr)
        return 1
    try:
        rows = query(assoc, filters, level)
    except AssociationBroken as exc:
        assoc.abort()
        print(f"fiona: query failed: PACS {pacs.name}: {exc}", file=sys.stderr)
        return 1
    try:
        assoc.release()
    except AssociationBroken:
        log.info("PACS %s did not release the association cleanly", pacs.name)
    if isinstance(rows, str):
        print(f"fiona: query failed: PACS {pacs.name}: {rows}", file=sys.stderr)
        return 1
    log.info("C-FIND on PACS %s at %s level: %d matched", pacs.name, level, len(rows))
    _audit(site, pacs, level, len(rows))
    _print_rows(rows, level, args.json)
    return 0


def _audit(site: SiteConfig, pacs: PacsConfig, level: Level, matched: int) -> None:
    """A ``pacs_query`` entry (who, which PACS, how many; never what was asked) when the site
    has a data folder."""
    if site.data_dir.is_dir():
        AuditLog(site.data_dir).try_write(
            "pacs_query", pacs=pacs.name, level=str(level), matched=matched, by=operator()
        )


def _print_rows(rows: Sequence[dict[str, str]], level: Level, as_json: bool) -> None:
    if as_json:
        for row in rows:
            print(json.dumps(row, sort_keys=True))
        return
    if not rows:
        print(f"no {level} matched")
        return
    keys = STUDY_KEYS if level is Level.STUDY else SERIES_KEYS
    _print_table([h for _, h in keys], [[row.get(k, "") for k, _ in keys] for row in rows])
    plural = "studies" if level is Level.STUDY else "series"
    print(f"{len(rows)} {level if len(rows) == 1 else plural} matched")


def _print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def run_retrieve(args: argparse.Namespace) -> int:
    """``fiona retrieve NAME --list FILE.csv [--project P]`` (queue a job for ``fiona serve``)
    and ``fiona retrieve status [JOB]``."""
    if args.name == "status":
        return run_with_index(args, lambda site, index: _status(index, args), read_only=True)
    if args.name in ("cancel", "retry"):
        return run_with_index(args, lambda site, index: _change(site, index, args))
    if args.list is None:
        print("fiona: give the list to retrieve: --list FILE.csv", file=sys.stderr)
        return 2
    return run_with_index(args, lambda site, index: _queue(site, index, args))


def _queue(site: SiteConfig, index: Index, args: argparse.Namespace) -> int:
    from engine.projects import load_projects
    from engine.retrieve.jobs import QueueError, queue_list
    from engine.retrieve.lists import ListError, read_list

    if _pacs(site, args.name) is None:
        return 2
    try:
        rows = read_list(args.list)
    except ListError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    known = [p.name for p in load_projects(site.projects_dir)[0]]
    try:
        job = queue_list(
            site, index, args.name, rows, args.list.name,
            project=args.project or "", known_projects=known, operator=operator(),
        )  # fmt: skip
    except QueueError as exc:
        print(f"fiona: {exc}", file=sys.stderr)
        return 2
    print(
        f"retrieval job {job}: {len(rows)} rows queued for PACS {args.name}; fiona serve works"
        f" through them within the PACS's limits (fiona retrieve status {job})"
    )
    return 0


def _change(site: SiteConfig, index: Index, args: argparse.Namespace) -> int:
    """``fiona retrieve cancel JOB`` and ``fiona retrieve retry JOB``."""
    from engine.retrieve.jobs import QueueError, cancel_job, requeue_job

    if args.job is None or not str(args.job).isdigit():
        print(f"fiona: give the job: fiona retrieve {args.name} JOB", file=sys.stderr)
        return 2
    job = int(args.job)
    try:
        if args.name == "cancel":
            count = cancel_job(site, index, job, operator=operator())
            print(f"retrieval job {job}: {count} rows cancelled")
        else:
            count = requeue_job(site, index, job, operator=operator())
            print(f"retrieval job {job}: {count} partial, failed or cancelled rows queued again")
    except QueueError as exc:
        print(f"fiona: {exc}", file=sys.stderr)
        return 2
    return 0


def _status(index: Index, args: argparse.Namespace) -> int:
    store = RetrievalStore(index)
    if args.job is None:
        jobs = store.jobs()
        if args.json:
            for job in jobs:
                print(json.dumps(job, sort_keys=True))
            return 0
        if not jobs:
            print("no retrieval jobs")
            return 0
        table = [
            [
                str(j["job"]),
                j["pacs"],
                j["project"] or "-",
                " ".join(f"{n} {s}" for s, n in j["rows"].items() if n),
                f"{j['arrived']}/{j['expected']}",
            ]
            for j in jobs
        ]
        _print_table(["job", "PACS", "project", "rows", "instances"], table)
        return 0
    from engine.retrieve.jobs import job_rows

    found = job_rows(index, int(args.job))
    if not found:
        print(f"fiona: no retrieval job {args.job}", file=sys.stderr)
        return 2
    if args.json:
        for item in found:
            print(json.dumps(item, sort_keys=True))
        return 0
    _print_table(
        ["line", "state", "studies", "instances", "reason"],
        [
            [str(f["line"]), str(f["state"]), str(f["studies"]),
             f"{f['arrived']}/{f['expected']}", str(f["reason"])]
            for f in found
        ],
    )  # fmt: skip
    return 0
