"""``fiona db status`` and ``fiona db upgrade``: the index's schema version and its migrations.

The index's schema is versioned by numbered SQL files (``engine/store/migrations/NNNN_*.sql``)
and ``PRAGMA user_version``. ``fiona serve`` and ``fiona ingest`` apply pending migrations when
they open the index (with a log line); every other command refuses an index older than the code
and says to run ``fiona db upgrade``, so a command that only looks never changes the file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from engine.config.model import SiteConfig
from engine.store.commands import load_site_or_exit
from engine.store.index import (
    IndexUnusable,
    SqliteIndex,
    index_file,
    latest_version,
    pending_migrations,
    read_schema_version,
)

__all__ = ["db_status", "run_db"]


def db_status(path: Path) -> dict[str, Any]:
    """The index file, its schema version, this code's version and the pending migrations
    (:class:`IndexUnusable` when there is no index)."""
    version = read_schema_version(path)
    return {
        "index": str(path),
        "schema_version": version,
        "code_version": latest_version(),
        "pending": [m.name for m in pending_migrations(version)],
        "newer_than_code": version > latest_version(),
    }


def _render(status: dict[str, Any]) -> str:
    lines = [
        f"index:          {status['index']}",
        f"schema version: {status['schema_version']} (this fiona: {status['code_version']})",
    ]
    if status["newer_than_code"]:
        lines.append("the index is newer than this fiona: run the version that wrote it")
    elif status["pending"]:
        lines.append(f"pending migrations: {', '.join(status['pending'])}")
        lines.append("run fiona db upgrade (after fiona backup DEST), or restart fiona serve")
    else:
        lines.append("up to date: no pending migrations")
    return "\n".join(lines)


def _upgrade(path: Path) -> int:
    before = read_schema_version(path)  # refuses a missing index: serve creates it
    index = SqliteIndex(path, upgrade=True)  # IndexUnusable when a migration fails
    try:
        after = index.schema_version
    finally:
        index.close()
    if after == before:
        print(f"index {path} is up to date (schema version {after})")
    else:
        applied = [m.name for m in pending_migrations(before) if m.version <= after]
        print(
            f"index {path} upgraded from schema version {before} to {after}: {', '.join(applied)}"
        )
    return 0


def run_db(args: argparse.Namespace) -> int:
    """``db status``: 0 when up to date, 1 when migrations are pending, 2 when the index is
    missing or newer than the code; ``db upgrade``: 0 when done."""
    site: SiteConfig | None = load_site_or_exit(args)
    if site is None:
        return 2
    path = index_file(site.index_url, site.data_dir / "index.sqlite")
    try:
        if args.action == "upgrade":
            return _upgrade(path)
        status = db_status(path)
    except IndexUnusable as exc:
        print(f"fiona: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(status, indent=2, sort_keys=True) if args.json else _render(status))
    if status["newer_than_code"]:
        return 2
    return 1 if status["pending"] else 0
