"""The connection facade both index engines satisfy, and what callers share across them.

The store modules run raw SQL on the connection that ``index.transaction()`` and
``index.reading()`` yield. With SQLite that is a ``sqlite3.Connection``; with PostgreSQL a
:class:`engine.store.pg.PgConnection` over a pooled psycopg 3 connection, which translates each
statement once (cached) from the portable subset every module writes:

- ``?`` placeholders (``%s`` on PostgreSQL; a ``%`` is doubled);
- ``INSERT ... ON CONFLICT (...) DO NOTHING / DO UPDATE SET c = excluded.c``, ``RETURNING``;
- no ``rowid``, ``strftime``, ``julianday``, ``INSERT OR IGNORE/REPLACE``, PRAGMA (only
  :mod:`engine.store.index` says PRAGMA, to SQLite);
- times as REAL epoch seconds passed in as parameters, booleans as 0/1 INTEGER;
- ``group_concat(x)`` / ``group_concat(x, sep)`` (``string_agg`` on PostgreSQL), ``LIKE``
  (case-insensitive for ASCII on SQLite: ``ILIKE`` on PostgreSQL), ``char(n)`` (``chr``);
- a column called ``user`` (reserved on PostgreSQL, quoted there).

Rows are tuples on both engines (no row factory). One :data:`IntegrityError` is raised by both
(PostgreSQL's is re-raised as SQLite's class); :class:`IndexUnavailable` when the database
server went away mid-statement (the caller may wait and retry; nothing was committed).
"""

from __future__ import annotations

import os
import re
import sqlite3
from collections.abc import Iterator, Sequence
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

__all__ = [
    "INDEX_URL_ENV",
    "Connection",
    "Cursor",
    "IndexUnavailable",
    "IntegrityError",
    "engine_of",
    "redact_url",
    "resolve_index_url",
]

#: Overrides the site config's ``index_url`` (e.g. to keep a password out of the file).
INDEX_URL_ENV = "FIONA_INDEX_URL"

#: The one constraint violation callers catch, whichever engine raised it.
IntegrityError = sqlite3.IntegrityError


class IndexUnavailable(Exception):
    """The database server cannot be reached (restarted, network down): nothing of the
    statement's transaction was committed; wait and try again."""


class Cursor(Protocol):
    """What callers use of a cursor: fetch, count, iterate, the id an INSERT made."""

    @property
    def rowcount(self) -> int: ...

    @property
    def lastrowid(self) -> int | None: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Connection(Protocol):
    """What callers use of a connection: statements with ``?`` parameters."""

    def execute(self, sql: str, parameters: Sequence[Any] = ..., /) -> Cursor: ...

    def executemany(self, sql: str, parameters: Any, /) -> Cursor: ...


def resolve_index_url(url: str) -> str:
    """The index URL in force: ``$FIONA_INDEX_URL`` when set and not empty, else ``url``."""
    return os.environ.get(INDEX_URL_ENV) or url


def engine_of(url: str) -> str:
    """``'sqlite'`` (an empty URL or ``sqlite:///PATH``) or ``'postgresql'``
    (``postgresql://`` or ``postgres://``); ValueError for any other scheme."""
    if not url or url.startswith("sqlite:///"):
        return "sqlite"
    if re.match(r"postgres(ql)?://", url):
        return "postgresql"
    raise ValueError(
        f"unsupported index URL scheme {url.split(':', 1)[0]!r}: use sqlite:///PATH or"
        " postgresql://USER@HOST:PORT/DB"
    )


def redact_url(url: str) -> str:
    """``url`` fit for a log line or a message: any password replaced by ``***``."""
    parts = urlsplit(url)
    query = re.sub(r"(?i)(^|&)password=[^&]*", r"\1password=***", parts.query)
    if parts.password is None:
        return urlunsplit(parts._replace(query=query))
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    netloc = f"{parts.username or ''}:***@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
