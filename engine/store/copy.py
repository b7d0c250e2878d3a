"""Copy a SQLite index into an empty PostgreSQL one (``fiona db migrate --to``), row for row.

The target gets the schema from the same migrations first; then every table of the source is
copied in the order its foreign keys need (in one transaction on the target, so a failure
leaves it as empty as it was), the identity sequences are moved past the copied ids, and the
rows of each table are counted on both sides. A target that holds any row is refused: this
never merges two indexes.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

from engine.store.index import PgIndex, SqliteIndex, latest_version
from engine.store.pg import identity_tables

__all__ = ["CopyError", "copy_to_postgresql", "tables_in_order"]

#: Rows sent to PostgreSQL per batch.
BATCH = 2000


class CopyError(Exception):
    """The copy cannot start or did not match; the message says why."""


def tables_in_order(db: sqlite3.Connection) -> list[str]:
    """The source's tables, each after the tables its foreign keys reference."""
    names = [
        r[0]
        for r in db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            " ORDER BY name"
        )
    ]
    needs = {t: {r[2] for r in db.execute(f'PRAGMA foreign_key_list("{t}")')} - {t} for t in names}
    ordered: list[str] = []
    while len(ordered) < len(names):
        ready = [t for t in names if t not in ordered and needs[t] <= set(ordered)]
        if not ready:
            raise CopyError(f"foreign keys form a cycle among {sorted(set(names) - set(ordered))}")
        ordered.extend(ready)
    return ordered


def copy_to_postgresql(
    source: SqliteIndex,
    target: PgIndex,
    progress: Callable[[str, int], None] = lambda table, rows: None,
) -> dict[str, int]:
    """Copy every row of ``source`` (current schema) into ``target`` (current, empty); the
    rows per table, equal on both sides (:class:`CopyError` otherwise)."""
    if source.schema_version != latest_version():
        raise CopyError("the SQLite index is not at this fiona's schema: run fiona db upgrade")
    src = sqlite3.connect(f"{Path(source.path).resolve().as_uri()}?mode=ro", uri=True)
    try:
        tables = tables_in_order(src)
        with target.reading() as db:
            for table in tables:
                if db.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone():
                    raise CopyError(
                        f"the PostgreSQL index is not empty ({table} has rows): copy into an"
                        " empty database only"
                    )
        with target.transaction() as db:
            for table in tables:
                columns = [r[1] for r in src.execute(f'PRAGMA table_info("{table}")')]
                insert = (
                    f"INSERT INTO {table} ({', '.join(columns)})"
                    f" VALUES ({', '.join('?' * len(columns))})"
                )
                cursor = src.execute(f"SELECT {', '.join(columns)} FROM {table}")
                copied = 0
                while rows := cursor.fetchmany(BATCH):
                    db.executemany(insert, rows)
                    copied += len(rows)
                progress(table, copied)
                if table in identity_tables():
                    db.execute(
                        f"SELECT setval(pg_get_serial_sequence('{table}', 'id'),"
                        f" coalesce((SELECT max(id) FROM {table}), 0) + 1, false)"
                    )
        counts: dict[str, int] = {}
        with target.reading() as db:
            for table in tables:
                want = int(src.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
                got = int(db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
                if want != got:
                    raise CopyError(f"{table}: {want} rows in SQLite, {got} in PostgreSQL")
                counts[table] = got
        return counts
    finally:
        src.close()

