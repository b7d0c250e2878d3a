"""The ``fiona`` command line: a thin shell over the engine's functions.

Each sub-command imports its implementation lazily so ``fiona validate`` does not pay for
pynetdicom and ``fiona serve`` starts fast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from engine import __version__


def _add_site_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="site config file (YAML or JSON)")
    p.add_argument("--projects", type=Path, help="folder of project files (default: projects/)")
    p.add_argument(
        "--data", type=Path, help="data folder: archive, quarantine, index (default: var/)"
    )


def _add_transfers_parser(sub: Any) -> None:
    """The ``transfers`` sub-command and its actions."""
    transfers = sub.add_parser("transfers", help="the outbox: list, show, retry, cancel transfers")
    actions = transfers.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="transfers, newest first")
    _add_site_args(listing)
    listing.add_argument(
        "--state",
        action="append",
        choices=["queued", "sending", "done", "failed", "cancelled"],
        help="only transfers in this state (repeatable)",
    )
    listing.add_argument("--project", help="only this project's transfers")
    listing.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    listing.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    show = actions.add_parser("show", help="one transfer with its instances' states")
    _add_site_args(show)
    show.add_argument("id", type=int)
    show.add_argument("--json", action="store_true", help="JSON instead of text")
    for name, text in (
        ("retry", "queue failed, cancelled or waiting transfers now, with fresh attempts"),
        ("cancel", "stop transfers (instances sent stay sent; retry resumes them)"),
    ):
        action = actions.add_parser(name, help=text)
        _add_site_args(action)
        action.add_argument("ids", type=int, nargs="*", help="transfer ids")
        if name == "retry":
            action.add_argument(
                "--failed", action="store_true", help="every failed transfer (with --project)"
            )
            action.add_argument("--project", help="with --failed: only this project")


def _add_status_parser(sub: Any) -> None:
    """The ``status`` sub-command: health, counts, outbox and jobs; exit 1 when unhealthy."""
    status = sub.add_parser(
        "status", help="health (heartbeat, disk), per-project counts, outbox, scheduled jobs"
    )
    _add_site_args(status)
    status.add_argument("--json", action="store_true", help="JSON instead of a table")


def _add_quarantine_parser(sub: Any) -> None:
    """The ``quarantine`` sub-command (list, show, release, discard) and ``audit``."""
    q = sub.add_parser("quarantine", help="held items: list, show, release, discard (audited)")
    actions = q.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="quarantine items, oldest first, reasons explained")
    _add_site_args(listing)
    listing.add_argument("--reason", help="only this reason code")
    listing.add_argument("--project", help="only this project's items")
    listing.add_argument(
        "--state", choices=["held", "released", "discarded", "all"], default="held"
    )
    listing.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    show = actions.add_parser("show", help="one item: sidecar, pipeline runs, transfers")
    _add_site_args(show)
    show.add_argument("qid", help="the item's id (or its first 6+ characters)")
    show.add_argument("--json", action="store_true", help="JSON instead of text")
    for name, text in (
        ("release", "undo holds: rerun, retry, route again or archive again"),
        ("discard", "give items up: delete held bytes, end held studies' runs"),
    ):
        action = actions.add_parser(name, help=text)
        _add_site_args(action)
        action.add_argument("qids", nargs="+", help="item ids (or their first 6+ characters)")
        action.add_argument("--yes", action="store_true", help="do not ask (for scripts)")
    audit = sub.add_parser("audit", help="the audit log: decisions about studies, no PHI")
    _add_site_args(audit)
    audit.add_argument("study_uid", nargs="?", help="only this study (matched by its token)")
    audit.add_argument("--project", help="only this project's entries")
    audit.add_argument("--event", action="append", help="only this event (repeatable)")
    audit.add_argument("--since", help="from this day on (YYYY-MM-DD, UTC)")
    audit.add_argument("--json", action="store_true", help="JSON lines instead of text")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fiona", description=__doc__)
    parser.add_argument("--version", action="version", version=f"fiona {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the DICOM receiver (Storage SCP) and the engine")
    _add_site_args(serve)
    serve.add_argument("--port", type=int, help="TCP port to listen on (default 11112)")
    serve.add_argument("--ae-title", help="our AE title (default FIONA)")
    serve.add_argument(
        "--bind", help="address to bind (default 127.0.0.1; 0.0.0.0 for every interface)"
    )

    validate = sub.add_parser("validate", help="check config files; exit 1 on any error")
    validate.add_argument("paths", nargs="*", type=Path, help="project files or folders")
    validate.add_argument("--config", type=Path, help="site config file to check as well")
    validate.add_argument("--projects", type=Path, help="folder of project files")

    ingest = sub.add_parser("ingest", help="import DICOM files from folders (a CD, a USB copy)")
    _add_site_args(ingest)
    ingest.add_argument("paths", nargs="+", type=Path, help="files or folders, read recursively")
    ingest.add_argument("--no-progress", action="store_true", help="no progress bar")

    test_rules = sub.add_parser(
        "test-rules", help="run the golden cases of rule sets; exit 1 on any mismatch"
    )
    test_rules.add_argument(
        "paths",
        nargs="*",
        type=Path,
        help="rule set files or folders (default: every rule set under rulesets/classify/)",
    )

    explain = sub.add_parser(
        "explain", help="dry run: which projects claim a study and why, its labels, its steps"
    )
    _add_site_args(explain)
    explain.add_argument("targets", nargs="+", help="DICOM files, folders, or study UIDs")
    explain.add_argument("--calling-ae", help="for files: the sender's AE title to assume")
    explain.add_argument("--called-ae", help="for files: the called AE title (default ours)")
    explain.add_argument("--calling-ip", help="for files: the sender's address to assume")

    anon = sub.add_parser(
        "anonymize", help="de-identify a folder of DICOM files (PS3.15 profile), with a report"
    )
    anon.add_argument("in_dir", type=Path, help="folder (or file) of DICOM files")
    anon.add_argument("out_dir", type=Path, help="output folder: <Study>/<Series>/<SOP>.dcm")
    anon.add_argument("--profile", default="basic", help="'basic' or a profile JSON file")
    anon.add_argument(
        "--option", action="append", help="a PS3.15 option, e.g. retain_longitudinal_modified_dates"
    )
    anon.add_argument("--secret-file", required=True, help="the project key (>= 32 bytes, 0600)")
    anon.add_argument("--quarantine", help="folder for held files (default OUT_DIR-quarantine)")
    anon.add_argument("--pixel-rules", action="append", help="pixel cleaning rule files")
    anon.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    anon.add_argument("--no-progress", action="store_true", help="no progress bar")
    anon.add_argument(
        "--no-sync", action="store_true", help="do not flush the output to disk before reporting"
    )

    reid = sub.add_parser(
        "reidentify", help="admin: the original Patient ID behind a pseudonym (audited)"
    )
    _add_site_args(reid)
    reid.add_argument("--project", required=True, help="the project the pseudonym belongs to")
    reid.add_argument("--reason", required=True, help="why (a ticket or approval number)")
    reid.add_argument("pseudonym", help="the pseudonym as exported")
    _add_transfers_parser(sub)
    _add_status_parser(sub)
    _add_quarantine_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "validate":
        from engine.config.validate import run_validate

        return int(run_validate(args.paths, site_path=args.config, projects_dir=args.projects))
    if args.command == "serve":
        from engine.service import run_serve

        return run_serve(args)
    if args.command == "ingest":
        from engine.ingest import run_ingest

        return run_ingest(args)
    if args.command == "test-rules":
        from engine.rules.testing import run_test_rules

        return run_test_rules(args.paths)
    if args.command == "explain":
        from engine.route.explain import run_explain

        return run_explain(args)
    if args.command == "anonymize":
        from engine.deid.run import run_anonymize

        return run_anonymize(args)
    if args.command == "reidentify":
        from engine.manage.reidentify import run_reidentify

        return run_reidentify(args)
    if args.command == "transfers":
        from engine.transfer.cli import run_transfers

        return run_transfers(args)
    if args.command == "status":
        from engine.manage.status import run_status

        return run_status(args)
    if args.command == "quarantine":
        from engine.manage.quarantine_cli import run_quarantine

        return run_quarantine(args)
    if args.command == "audit":
        from engine.manage.audit_cli import run_audit

        return run_audit(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
