"""The ``fiona`` command line: a thin shell over the engine's functions.

Each sub-command imports its implementation lazily so ``fiona validate`` does not pay for
pynetdicom and ``fiona serve`` starts fast.
"""

from __future__ import annotations

import argparse
import os
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


def _add_pacs_parsers(sub: Any) -> None:
    """``pacs list|echo`` and ``query``: the site's remote PACS."""
    pacs = sub.add_parser("pacs", help="the remote PACS of the site config: list, echo")
    actions = pacs.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="the configured PACS and their limits")
    _add_site_args(listing)
    listing.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    echo = actions.add_parser("echo", help="C-ECHO one PACS; exit 1 when it does not answer")
    _add_site_args(echo)
    echo.add_argument("name", help="the PACS's name in the site config")
    query = sub.add_parser(
        "query", help="C-FIND on a PACS: which studies or series match (shown here only)"
    )
    _add_site_args(query)
    query.add_argument("name", help="the PACS's name in the site config")
    query.add_argument("--patient-id", help="Patient ID (0010,0020); wildcards * and ?")
    query.add_argument("--accession", help="Accession Number (0008,0050); wildcards * and ?")
    query.add_argument(
        "--study-date", metavar="FROM-TO", help="YYYYMMDD, FROM-TO, FROM- or -TO (or ISO FROM..TO)"
    )
    query.add_argument("--modality", help="a modality in the study, e.g. MR")
    query.add_argument("--study-description", help="Study Description (0008,1030); wildcards")
    query.add_argument("--level", choices=["study", "series"], default="study")
    query.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    retrieve = sub.add_parser(
        "retrieve",
        help="queue a list of studies to fetch from a PACS (C-MOVE); 'retrieve status [JOB]',"
        " 'retrieve cancel|retry JOB'",
    )
    _add_site_args(retrieve)
    retrieve.add_argument(
        "name", help="the PACS's name in the site config, or 'status', 'cancel', 'retry'"
    )
    retrieve.add_argument(
        "job", nargs="?", help="with status: one job's rows; with cancel or retry: the job"
    )
    retrieve.add_argument("--list", type=Path, help="CSV: accession, study_uid or patient_id ...")
    retrieve.add_argument("--project", help="give the studies to this project (rows may say)")
    retrieve.add_argument("--json", action="store_true", help="with status: JSON lines")


def _add_user_parser(sub: Any) -> None:
    """``user add|list|set|password|token|revoke-token|disable|enable|remove``: the web's users
    (audited)."""
    user = sub.add_parser(
        "user",
        help="web users and tokens: add, list, set, password, token, disable, enable, remove",
    )
    actions = user.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="a new user (asks for the password twice)")
    _add_site_args(add)
    add.add_argument("name", help="the user's name (letters, digits, . _ @ -)")
    add.add_argument("--role", required=True, choices=["admin", "coordinator", "viewer"])
    add.add_argument("--project", action="append", help="a project granted (repeatable)")
    add.add_argument("--phi", action="store_true", help="may see patient names, IDs, birth dates")
    add.add_argument("--password-file", type=Path, help="read the password from this file")
    listing = actions.add_parser("list", help="users, their grants and their tokens' ids")
    _add_site_args(listing)
    token = actions.add_parser("token", help="a new API token for a user (printed once)")
    _add_site_args(token)
    token.add_argument("name")
    token.add_argument("--label", help="what the token is for (e.g. the script using it)")
    revoke = actions.add_parser("revoke-token", help="revoke an API token by its id")
    _add_site_args(revoke)
    revoke.add_argument("token_id", help="the token's id (fiona user list)")
    for action, said in (
        ("disable", "stop a user logging in or using its tokens (kept for the record)"),
        ("enable", "let a disabled user in again"),
    ):
        toggle = actions.add_parser(action, help=said)
        _add_site_args(toggle)
        toggle.add_argument("name")
    remove = actions.add_parser("remove", help="delete a user and its tokens")
    _add_site_args(remove)
    remove.add_argument("name")
    change = actions.add_parser("set", help="change a user's role, projects or PHI grant")
    _add_site_args(change)
    change.add_argument("name")
    change.add_argument("--role", choices=["admin", "coordinator", "viewer"])
    change.add_argument("--project", action="append", help="the projects granted (all replaced)")
    change.add_argument("--no-projects", action="store_true", help="grant no project")
    change.add_argument("--phi", action=argparse.BooleanOptionalAction, help="the PHI grant")
    password = actions.add_parser("password", help="set a user's password (asks twice)")
    _add_site_args(password)
    password.add_argument("name")
    password.add_argument("--password-file", type=Path, help="read the password from this file")


DESCRIPTION = """\
fiona receives DICOM images from scanners and PACS, decides by rules which research
projects each study belongs to, de-identifies it and delivers it to the projects'
destinations, keeping an audit trail of every decision."""

EPILOG = """\
common commands:
  run the service      fiona serve
  check the config     fiona validate, fiona test-rules, fiona explain FILE|STUDY_UID
  watch it             fiona status, fiona transfers list, fiona quarantine list, fiona audit
  act on held items    fiona quarantine release|discard ID, fiona transfers retry ID
  import from CD/USB   fiona ingest PATH
  de-identify a folder fiona anonymize IN OUT --secret-file KEY
  web API users        fiona user add NAME --role admin, fiona user token NAME
  the clinical PACS    fiona pacs list, fiona pacs echo NAME, fiona query NAME --accession A,
                       fiona retrieve NAME --list FILE.csv, fiona retrieve status|cancel|retry
  look after it        fiona backup DEST, fiona restore SRC, fiona db status|upgrade

The site config is --config FILE, else $FIONA_CONFIG, else /etc/fiona/site.yaml when it
exists, else the built-in defaults (data in var/, projects in projects/).
Run 'fiona COMMAND --help' for a command's options; README.md has the full guide."""


def _add_ops_parsers(sub: Any) -> None:
    """``backup``, ``restore`` and ``db status|upgrade``."""
    backup = sub.add_parser(
        "backup", help="copy the index, secrets, audit log and config into a new folder"
    )
    _add_site_args(backup)
    backup.add_argument("dest", type=Path, help="a new (or empty) folder for the backup")
    restore = sub.add_parser(
        "restore", help="put a backup back (checks its checksums; stop fiona serve first)"
    )
    restore.add_argument("src", type=Path, help="a folder written by fiona backup")
    restore.add_argument(
        "--data", type=Path, help="data folder to restore into (default: the backup's own)"
    )
    restore.add_argument(
        "--force",
        action="store_true",
        help="overwrite a non-empty data folder and config files that differ",
    )
    db = sub.add_parser(
        "db", help="the index's schema: status, upgrade (apply migrations), migrate --to PostgreSQL"
    )
    actions = db.add_subparsers(dest="action", required=True)
    status = actions.add_parser(
        "status", help="schema version and pending migrations; exit 1 when some are pending"
    )
    _add_site_args(status)
    status.add_argument("--json", action="store_true", help="JSON instead of text")
    upgrade = actions.add_parser("upgrade", help="apply pending migrations (back up first)")
    _add_site_args(upgrade)
    migrate = actions.add_parser(
        "migrate",
        help="copy the SQLite index into an empty PostgreSQL database (fiona serve stopped)",
    )
    _add_site_args(migrate)
    migrate.add_argument(
        "--to",
        required=True,
        metavar="URL",
        help="postgresql://USER@HOST:PORT/DB (the password from PGPASSWORD or ~/.pgpass)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fiona",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fiona {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")

    serve = sub.add_parser("serve", help="run the DICOM receiver (Storage SCP) and the engine")
    _add_site_args(serve)
    serve.add_argument("--port", type=int, help="TCP port to listen on (default 11112)")
    serve.add_argument("--ae-title", help="our AE title (default FIONA)")
    serve.add_argument(
        "--bind", help="address to bind (default 127.0.0.1; 0.0.0.0 for every interface)"
    )
    serve.add_argument(
        "--web-port",
        type=int,
        metavar="N",
        help="port of the web portal and API (default 8080, on 127.0.0.1; 0 turns it off)",
    )
    serve.add_argument(
        "--sweep",
        action="store_true",
        help="sweep the data folder for crash leftovers at start even after a clean stop",
    )

    validate = sub.add_parser("validate", help="check config files; exit 1 on any error")
    validate.add_argument("paths", nargs="*", type=Path, help="project files or folders")
    validate.add_argument("--config", type=Path, help="site config file to check as well")
    validate.add_argument("--projects", type=Path, help="folder of project files")

    ingest = sub.add_parser("ingest", help="import DICOM files from folders (a CD, a USB copy)")
    _add_site_args(ingest)
    ingest.add_argument("paths", nargs="+", type=Path, help="files or folders, read recursively")
    ingest.add_argument("--no-progress", action="store_true", help="no progress bar")
    ingest.add_argument("--called-ae", metavar="AET", help="called AE title routing sees")
    ingest.add_argument("--calling-ae", metavar="AET", help="calling AE title routing sees")
    ingest.add_argument("--project", metavar="P", help="give the studies to project P")
    ingest.add_argument("--subject", metavar="S", help="research subject (needs --project)")
    ingest.add_argument("--event", metavar="E", help="research event (needs --project)")

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
    anon.add_argument(
        "--ocr",
        choices=["hold", "redact"],
        help="read held images' pixels with Tesseract: hold text, or black it out and re-check",
    )
    anon.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    anon.add_argument("--no-progress", action="store_true", help="no progress bar")
    anon.add_argument(
        "--report",
        action="store_true",
        help="count per attribute how many values were kept, cleaned, replaced or removed "
        "(deid-report.json 'attributes' and the table deid-report.txt)",
    )
    anon.add_argument(
        "--date-languages",
        metavar="CODES",
        help="comma-separated ISO 639-1 codes (nb,de,...) whose month names the verification "
        "gate also searches in written birth dates, besides English",
    )
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
    _add_ops_parsers(sub)
    _add_user_parser(sub)
    _add_pacs_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; its exit status. Output cut short by a closed pipe (``| head``) ends
    quietly with 141 (as a command killed by SIGPIPE); an unusable index or data folder is one
    message and 2."""
    from engine.store.db import IndexUnavailable
    from engine.store.index import IndexUnusable

    try:
        status = _run(build_parser().parse_args(argv))
        sys.stdout.flush()
    except BrokenPipeError:
        # Python would flush stdout again at exit and fail the same way: point it at devnull.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141
    except IndexUnusable as exc:
        print(f"fiona: {exc}", file=sys.stderr)
        return 2
    except IndexUnavailable as exc:  # the database server went away while the command ran
        print(
            f"fiona: the index is unavailable ({exc}); try again when it is back",
            file=sys.stderr,
        )
        return 2
    return status


def _run(args: argparse.Namespace) -> int:
    if args.command == "validate":
        import engine.projects  # noqa: F401  (registers the project sections it checks)
        from engine.config.loader import find_site_config
        from engine.config.validate import run_validate

        site_path = find_site_config(args.config)
        return int(run_validate(args.paths, site_path=site_path, projects_dir=args.projects))
    if args.command in ("backup", "restore", "db"):
        return _run_ops(args)
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
        from engine.manage.explain_cli import run_explain

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
    if args.command in ("pacs", "query", "retrieve"):
        from engine.retrieve.cli import run_pacs, run_query, run_retrieve

        runner = {"pacs": run_pacs, "query": run_query, "retrieve": run_retrieve}
        return runner[args.command](args)
    if args.command == "user":
        from engine.manage.users_cli import run_user

        return run_user(args)
    raise AssertionError(args.command)


def _run_ops(args: argparse.Namespace) -> int:
    if args.command == "db":
        from engine.manage.db import run_db

        return run_db(args)
    from engine.manage.backup import run_backup, run_restore

    return run_backup(args) if args.command == "backup" else run_restore(args)


if __name__ == "__main__":
    sys.exit(main())
