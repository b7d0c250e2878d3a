"""The tests' direct look into the index, on whichever engine the suite runs
(``FIONA_TEST_INDEX=postgresql``: the test's own PostgreSQL database, see tests/conftest.py).

``connect_index(path)`` stands where a test said ``sqlite3.connect(path)``: on SQLite it is
exactly that; on PostgreSQL a connection that takes the same portable SQL (``?`` parameters)
through the engine's translation, in autocommit mode (``commit()`` does nothing).
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from types import TracebackType
from typing import Any

from engine.store.db import INDEX_URL_ENV, engine_of

__all__ = ["connect_index", "index_exists", "on_postgresql", "separate_index"]


def on_postgresql() -> bool:
    """Whether the index of this test is a PostgreSQL database."""
    return engine_of(os.environ.get(INDEX_URL_ENV, "")) == "postgresql"


class _PgTestConnection:
    def __init__(self, url: str) -> None:
        import psycopg

        from engine.store.pg import PgConnection, _configure

        raw = psycopg.connect(url, autocommit=True)
        _configure(raw)
        self._conn = PgConnection(raw)

    def execute(self, sql: str, parameters: Any = ()) -> Any:
        return self._conn.execute(sql, parameters)

    def executemany(self, sql: str, parameters: Any) -> Any:
        return self._conn.executemany(sql, parameters)

    def commit(self) -> None:
        pass

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> _PgTestConnection:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def separate_index(request: Any, monkeypatch: Any) -> None:
    """For a test that starts a second fiona with a data folder of its own beside a module's
    one: on PostgreSQL, a fresh database of its own from here on (SQLite: its own file)."""
    if on_postgresql():
        cluster = request.getfixturevalue("pg_cluster")
        monkeypatch.setenv(INDEX_URL_ENV, cluster.url(cluster.new_database()))


def index_exists(path: Path) -> bool:
    """Whether the index file ``path`` exists (on PostgreSQL: the test's database always does)."""
    return on_postgresql() or path.exists()


def connect_index(path: Path | str, *, read_only: bool = False, timeout: float = 5.0) -> Any:
    """A connection to the index file ``path`` (SQLite), or to the test's PostgreSQL index."""
    if on_postgresql():
        return _PgTestConnection(os.environ[INDEX_URL_ENV])
    if read_only:
        return sqlite3.connect(
            f"{Path(path).resolve().as_uri()}?mode=ro", uri=True, timeout=timeout
        )
    return sqlite3.connect(path, timeout=timeout)
