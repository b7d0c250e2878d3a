"""``fiona reidentify --project P --reason TEXT PSEUDONYM``: the one way back to an original.

Re-identification is an explicit, audited admin action: the audit entry (operator, project,
pseudonym, reason, whether it was found) is fsynced before the original is printed. The
original itself never goes into the audit log.
"""

from __future__ import annotations

import argparse
import sys

from engine.store.audit import AuditLog, operator
from engine.store.commands import load_site_or_exit
from engine.store.index import IndexUnusable, open_index
from engine.store.pseudonyms import reidentify

#: The shortest ``--reason`` accepted (characters, surrounding spaces dropped).
MIN_REASON = 5


def run_reidentify(args: argparse.Namespace) -> int:
    site = load_site_or_exit(args)
    if site is None:
        return 2
    reason = (args.reason or "").strip()
    if len(reason) < MIN_REASON:
        print(
            f"fiona: --reason {reason!r} is too short ({len(reason)} characters, at least"
            f" {MIN_REASON}): say why, with a ticket or approval number,"
            " e.g. --reason 'IRB-2024-017'",
            file=sys.stderr,
        )
        return 2
    try:
        index = open_index(site.index_url, site.data_dir / "index.sqlite", read_only=True)
    except IndexUnusable as exc:
        print(f"fiona: {exc}", file=sys.stderr)
        return 2
    try:
        original = reidentify(index, args.project, args.pseudonym)
    finally:
        index.close()
    AuditLog(site.data_dir).write(
        "reidentified",
        operator=operator(),
        project=args.project,
        pseudonym=args.pseudonym,
        reason=reason,
        found=original is not None,
    )
    if original is None:
        print(f"no pseudonym {args.pseudonym!r} in project {args.project!r}", file=sys.stderr)
        return 1
    print(original)
    return 0
