"""``fiona audit [STUDY_UID] [--project P] [--event E] [--since YYYY-MM-DD] [--json]``.

Reads the audit log (``<data>/audit/audit-YYYYMM.jsonl``). The log never holds a UID, only its
token (:func:`engine.store.audit.uid_token`): a study UID given here is turned into its token
and matched against the entries' ``study`` field.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable
from typing import Any

from engine.store.audit import AuditLog, uid_token
from engine.store.commands import load_site_or_exit
from engine.store.index import IndexMissing, index_file, is_postgresql

__all__ = ["matching", "run_audit"]

#: Columns shown first in text output, with their widths.
_SHOWN_FIRST = {"at": 20, "event": 14, "project": 14, "study": 16}


def matcher(
    *,
    study_uid: str | None = None,
    project: str | None = None,
    events: Iterable[str] = (),
    since: str | None = None,
) -> Callable[[dict[str, Any]], bool]:
    """Whether an entry is for a study (by UID), project, event(s) and from a day
    (``YYYY-MM-DD``) on."""
    token = uid_token(study_uid) if study_uid else None
    wanted = set(events)

    def keep(e: dict[str, Any]) -> bool:
        if token and e.get("study") != token:
            return False
        if project and e.get("project") != project and project not in e.get("projects", ()):
            return False
        if wanted and e.get("event") not in wanted:
            return False
        return not (since and str(e.get("at", "")) < since)

    return keep


def matching(
    entries: Iterable[dict[str, Any]],
    *,
    study_uid: str | None = None,
    project: str | None = None,
    events: Iterable[str] = (),
    since: str | None = None,
) -> list[dict[str, Any]]:
    """Entries for a study (by UID), project, event(s) and from a day (``YYYY-MM-DD``) on."""
    keep = matcher(study_uid=study_uid, project=project, events=events, since=since)
    return [e for e in entries if keep(e)]


def _line(entry: dict[str, Any]) -> str:
    head = " ".join(f"{entry.get(k) or '-'!s:<{w}}" for k, w in _SHOWN_FIRST.items())
    rest = " ".join(
        f"{k}={json.dumps(v)}" for k, v in sorted(entry.items()) if k not in _SHOWN_FIRST
    )
    return f"{head} {rest}".rstrip()


def run_audit(args: argparse.Namespace) -> int:
    site = load_site_or_exit(args)
    if site is None:
        return 2
    if not is_postgresql(site.index_url):
        index = index_file(site.index_url, site.data_dir / "index.sqlite")
        if not index.is_file():  # the audit log sits beside the index of the same data folder
            print(f"fiona: {IndexMissing(index)}", file=sys.stderr)
            return 2
    if args.since and (len(args.since) != 10 or args.since[4] != "-" or args.since[7] != "-"):
        print("fiona: --since takes a day, YYYY-MM-DD", file=sys.stderr)
        return 2
    found = matching(
        AuditLog(site.data_dir).entries(args.study_uid, since=args.since),
        study_uid=args.study_uid,
        project=args.project,
        events=args.event or (),
        since=args.since,
    )
    for entry in found:
        print(json.dumps(entry, sort_keys=True) if args.json else _line(entry))
    if not found and not args.json:
        print("no audit entries", file=sys.stderr)
    return 0
