"""``fiona db status``, ``upgrade`` and ``migrate --to``: the index's schema version, its
migrations, and the copy of a SQLite index into PostgreSQL.

The index's schema is versioned by numbered SQL files (``engine/store/migrations/NNNN_*.sql``)
and ``PRAGMA user_version`` (SQLite) or the ``schema_version`` table (PostgreSQL). ``fiona
serve`` and ``fiona ingest`` apply pending migrations when they open the index (with a log
line); every other command refuses an index older than the code and says to run ``fiona db
upgrade``, so a command that only looks never changes the file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from engine.config.model import SiteConfig
from engine.store.commands import load_site_or_exit
from engine.store.db import redact_url
from engine.store.index import (
    IndexUnusable,
    index_location,
    is_postgresql,
    latest_version,
    open_index,
    pending_migrations,
    read_index_version,
)

__all__ = ["db_status", "run_db"]


def db_status(url: str, default_path: Path) -> dict[str, Any]:
    """The index (its file, or its PostgreSQL URL without a password), its schema version,
    this code's version and the pending migrations (:class:`IndexUnusable` when there is no
    index)."""
    version = read_index_version(url, default_path)
    return {
        "index": index_location(url, default_path),
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


def _upgrade(url: str, default_path: Path) -> int:
    before = read_index_version(url, default_path)  # refuses a missing index: serve creates it
    index = open_index(url, default_path, upgrade=True)  # IndexUnusable when a migration fails
    try:
        after = index.schema_version
    finally:
        index.close()
    where = index_location(url, default_path)
    if after == before:
        print(f"index {where} is up to date (schema version {after})")
    else:
        applied = [m.name for m in pending_migrations(before) if m.version <= after]
        print(
            f"index {where} upgraded from schema version {before} to {after}: {', '.join(applied)}"
        )
    return 0


def _migrate_to(url: str, default_path: Path, target_url: str) -> int:
    """Copy the site's SQLite index into the empty PostgreSQL database ``target_url``."""
    from engine.store.copy import CopyError, copy_to_postgresql
    from engine.store.index import PgIndex, SqliteIndex

    if is_postgresql(url):
        print("fiona: the site's index is PostgreSQL already: nothing to copy", file=sys.stderr)
        return 2
    if not is_postgresql(target_url):
        print("fiona: --to takes a postgresql://USER@HOST:PORT/DB URL", file=sys.stderr)
        return 2
    source = open_index(url, default_path, upgrade=False, read_only=True)
    try:
        target = open_index(target_url, default_path, upgrade=True)
        try:
            assert isinstance(source, SqliteIndex) and isinstance(target, PgIndex)
            counts = copy_to_postgresql(
                source, target, lambda table, rows: print(f"  {table}: {rows} rows")
            )
        except CopyError as exc:
            print(f"fiona: {exc}", file=sys.stderr)
            return 2
        finally:
            target.close()
    finally:
        source.close()
    print(
        f"copied {sum(counts.values())} rows in {len(counts)} tables from"
        f" {index_location(url, default_path)} to {redact_url(target_url)}; every table's count"
        " matches. Set index_url (or $FIONA_INDEX_URL) to it and start fiona serve."
    )
    return 0


def run_db(args: argparse.Namespace) -> int:
    """``db status``: 0 when up to date, 1 when migrations are pending, 2 when the index is
    missing or newer than the code; ``db upgrade``: 0 when done."""
    site: SiteConfig | None = load_site_or_exit(args)
    if site is None:
        return 2
    default = site.data_dir / "index.sqlite"
    try:
        if args.action == "upgrade":
            return _upgrade(site.index_url, default)
        if args.action == "migrate":
            return _migrate_to(site.index_url, default, args.to)
        status = db_status(site.index_url, default)
    except IndexUnusable as exc:
        print(f"fiona: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(status, indent=2, sort_keys=True) if args.json else _render(status))
    if status["newer_than_code"]:
        return 2
    return 1 if status["pending"] else 0
