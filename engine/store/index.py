"""The index of everything received: SQLite (stdlib, WAL) or PostgreSQL behind one interface.

Callers use :class:`Index` only; :func:`open_index` picks the engine from the site's
``index_url`` (``$FIONA_INDEX_URL`` overrides it). Both engines run the same statements, written
in the portable subset described in :mod:`engine.store.db`. Schema changes are numbered SQL files
in ``migrations/``, applied in order and recorded in ``PRAGMA user_version`` (SQLite) or the
``schema_version`` table (PostgreSQL, DDL types translated by :mod:`engine.store.pg`).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from engine.dicom.header import InstanceHeader
from engine.store.db import Connection, IndexUnavailable, engine_of, redact_url, resolve_index_url
from engine.store.group_commit import GroupCommit

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Origin:
    """Where an instance came from: the association's AE titles and peer, or a local ingest."""

    via: str  # 'dimse' or 'ingest'
    calling_ae: str = ""
    called_ae: str = ""
    peer_ip: str = ""


@dataclass(frozen=True)
class StoredInstance:
    """An indexed instance: where its file is (relative to the data dir) and its checksum."""

    sop_instance_uid: str
    study_uid: str
    series_uid: str
    path: str
    size: int


@dataclass(frozen=True)
class AddResult:
    """What adding an instance created: a new study or series gets its views and summary.

    ``duplicate``: nothing was added, the SOP Instance UID was indexed already (by another
    receiver between this one's look-up and its commit).
    """

    new_study: bool
    new_series: bool
    duplicate: bool = False


class _Add(NamedTuple):
    """One instance waiting for the group commit; ``now`` is its receipt time (epoch s)."""

    header: InstanceHeader
    path: str
    size: int
    origin: Origin
    now: float


class _AlreadyIndexed(Exception):
    """The instance row exists already (raised inside the add's transaction, rolled back)."""


@dataclass(frozen=True)
class QuarantineRecord:
    """One quarantined item (bytes at ``path``, reason code and detail beside it)."""

    qid: str
    reason: str
    detail: str
    path: str
    size: int
    sha256: str
    received_at: float
    origin: Origin
    sop_instance_uid: str | None = None
    study_uid: str | None = None
    project: str = ""  # for a study held by a project's routing or pipeline


class Index(Protocol):
    """The storage interface the rest of the engine uses."""

    #: Where the index is, for messages: a file path, or a URL without its password.
    location: str

    def find_instance(self, sop_instance_uid: str) -> StoredInstance | None: ...

    def add_instance(
        self, header: InstanceHeader, path: str, size: int, origin: Origin
    ) -> AddResult: ...

    def replace_instance(
        self, header: InstanceHeader, path: str, size: int, origin: Origin
    ) -> None: ...

    def record_duplicate(
        self, sop_instance_uid: str, identical: bool, action: str, origin: Origin
    ) -> None: ...

    def mark_study_present(self, study_uid: str) -> None: ...

    def add_quarantine(self, record: QuarantineRecord) -> None: ...

    def series_needing_summary(self, quiet_seconds: float) -> list[str]: ...

    def series_for_summary(self, series_uid: str) -> dict[str, Any]: ...

    def mark_summary_written(self, series_uid: str, at: float) -> None: ...

    def counts(self) -> dict[str, int]: ...

    def transaction(self) -> contextlib.AbstractContextManager[Connection]: ...

    def reading(self) -> contextlib.AbstractContextManager[Connection]: ...

    def close(self) -> None: ...


MIGRATIONS_PACKAGE = "engine.store.migrations"
#: UPDATE ... RETURNING arrived in SQLite 3.35; older libraries take two statements.
_HAS_RETURNING = sqlite3.sqlite_version_info >= (3, 35, 0)


@dataclass(frozen=True)
class Migration:
    """One numbered schema change: ``NNNN_name.sql`` in the migrations package."""

    version: int
    name: str  # the file name without ``.sql``
    sql: str


@functools.cache
def migrations() -> tuple[Migration, ...]:
    """Every migration shipped with this fiona, in order."""
    files = resources.files(MIGRATIONS_PACKAGE)
    found = []
    for entry in files.iterdir():
        name = entry.name
        if name.endswith(".sql") and name[:4].isdigit():
            found.append(
                Migration(int(name[:4]), name[: -len(".sql")], entry.read_text(encoding="utf-8"))
            )
    return tuple(sorted(found, key=lambda m: m.version))


def latest_version() -> int:
    """The schema version this fiona's code expects (its last migration)."""
    return max((m.version for m in migrations()), default=0)


def pending_migrations(version: int) -> list[Migration]:
    """The migrations an index at schema ``version`` still needs, in order."""
    return [m for m in migrations() if m.version > version]


class IndexUnusable(Exception):
    """The index cannot be opened as asked; the message says what to do. CLI exit status 2."""


class IndexUnreachable(IndexUnusable):
    """The index's database server does not take a connection (stopped, out of reach, or
    refusing the login): for ``fiona status``, a health problem like any other."""


class IndexMissing(IndexUnusable):
    """A command that only reads (or changes existing records) found no index file."""

    def __init__(self, path: Path | str) -> None:
        self.path = path
        where = path.parent if isinstance(path, Path) else path
        super().__init__(f"no fiona index in {where}: wrong --data, or nothing received yet")


class IndexOutdated(IndexUnusable):
    """The index's schema is older than the code; only an upgrade may change it."""

    def __init__(self, path: Path | str, version: int) -> None:
        self.path, self.version = path, version
        pending = len(pending_migrations(version))
        super().__init__(
            f"the index {path} is at schema version {version}, this fiona needs"
            f" {latest_version()} ({pending} migrations pending): run fiona db upgrade"
        )


class IndexTooNew(IndexUnusable):
    """The index was written by a newer fiona: this code must not read or change it."""

    def __init__(self, path: Path | str, version: int) -> None:
        self.path, self.version = path, version
        super().__init__(
            f"the index {path} is at schema version {version}, newer than this fiona knows"
            f" ({latest_version()}): run the fiona version that wrote it, or restore a backup"
        )


#: Instance columns written on receipt (besides the UID and the series reference).
_FIELDS = (
    "sop_class_uid",
    "instance_number",
    "transfer_syntax",
    "path",
    "size",
    "received_at",
    "calling_ae",
    "called_ae",
    "peer_ip",
    "via",
    "attrs",
)


def _values(h: InstanceHeader, path: str, size: int, now: float, origin: Origin) -> tuple[Any, ...]:
    """Values for :data:`_FIELDS`, in order."""
    attrs = json.dumps(h.attrs, separators=(",", ":"))
    return (
        h.sop_class_uid,
        h.instance_number,
        h.transfer_syntax_uid,
        path,
        size,
        now,
        origin.calling_ae,
        origin.called_ae,
        origin.peer_ip,
        origin.via,
        attrs,
    )


class SqliteIndex:
    """:class:`Index` on one SQLite file in WAL mode, committing with ``synchronous=FULL``.

    One connection is shared by all receiver threads under a lock: SQLite serialises writers
    anyway, and a single connection keeps the commit path short. Instances are added through a
    :class:`~engine.store.group_commit.GroupCommit`: adds that arrive while a commit runs are
    committed together in the next transaction, one flush for all of them.
    :class:`PgIndex` shares every statement below; there ``_lock`` lends the thread a pooled
    connection and ``_db`` is it.
    """

    _lock: contextlib.AbstractContextManager[Any]
    _db: Any  # sqlite3.Connection here; engine.store.pg.LeasedConnection in PgIndex

    #: Instance adds queued for the group commit at most, and per transaction at most.
    MAX_PENDING_ADDS = 256
    MAX_BATCH = 64

    def __init__(
        self,
        path: Path,
        *,
        busy_timeout: float = 10.0,
        upgrade: bool = True,
        read_only: bool = False,
    ) -> None:
        """Open (and with ``upgrade``, create and migrate) the index at ``path``.

        ``upgrade`` (the receiver, ingest, ``fiona db upgrade``): create a missing index and
        apply pending migrations (``upgraded_from`` is the version found, None when nothing
        was applied). Without it the index must exist (:class:`IndexMissing`) and be current
        (:class:`IndexOutdated`); ``read_only`` also opens it read-only, so a command that only
        looks never changes the file. An index newer than the code is always refused
        (:class:`IndexTooNew`); one SQLite cannot open or migrate is :class:`IndexUnusable`.
        """
        self.path = path
        self.location = str(path)
        self.upgraded_from: int | None = None
        self._lock = threading.Lock()
        self.adds: GroupCommit[_Add, AddResult] = GroupCommit(
            self._add_batch, max_pending=self.MAX_PENDING_ADDS, max_batch=self.MAX_BATCH
        )
        if upgrade and not read_only:
            path.parent.mkdir(parents=True, exist_ok=True)
        elif not path.is_file():
            raise IndexMissing(path)
        self._writer_fd = -1
        target = _read_only_uri(path) if read_only else str(path)
        try:
            self._db = sqlite3.connect(
                target,
                check_same_thread=False,
                isolation_level=None,
                timeout=busy_timeout,
                uri=read_only,
            )
        except sqlite3.Error as exc:
            raise IndexUnusable(f"cannot open the index {path}: {exc}") from None
        try:
            self._configure(read_only, upgrade)
        except sqlite3.Error as exc:
            self._db.close()
            raise IndexUnusable(f"cannot open the index {path}: {exc}") from None
        except BaseException:
            self._db.close()
            raise
        if not read_only:
            self._writer_fd = _open_writer_lock(path)
        if self._writer_fd >= 0:  # closed with the index, or when it is collected
            self._close_writer = weakref.finalize(self, os.close, self._writer_fd)

    def _configure(self, read_only: bool, upgrade: bool) -> None:
        # The version first: an index this code must not change is left byte for byte as is.
        version = self.schema_version
        if version > latest_version():
            raise IndexTooNew(self.path, version)
        if version < latest_version() and (read_only or not upgrade):
            raise IndexOutdated(self.path, version)
        if not read_only:
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is on disk when it returns, so a C-STORE Success is never premature.
            self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        if version < latest_version():
            self._migrate()
            self.upgraded_from = version

    def _migrate(self) -> None:
        with self._lock:
            current = self._db.execute("PRAGMA user_version").fetchone()[0]
            for migration in pending_migrations(current):
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    for statement in _split_sql(migration.sql):
                        self._db.execute(statement)
                    self._db.execute(f"PRAGMA user_version={migration.version}")
                    self._db.execute("COMMIT")
                except Exception:
                    self._db.execute("ROLLBACK")
                    raise

    @property
    def schema_version(self) -> int:
        with self._lock:
            return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def find_instance(self, sop_instance_uid: str) -> StoredInstance | None:
        with self._lock:
            row = self._db.execute(
                "SELECT i.sop_instance_uid, st.study_uid, se.series_uid, i.path, i.size"
                " FROM instances i JOIN series se ON se.id = i.series_ref"
                " JOIN studies st ON st.id = se.study_ref WHERE i.sop_instance_uid = ?",
                (sop_instance_uid,),
            ).fetchone()
        return StoredInstance(*row) if row else None

    def _patient_ref(self, h: InstanceHeader) -> int:
        key = (h.patient_id, h.patient_name, h.birth_date)
        row = self._db.execute(
            "SELECT id FROM patients WHERE patient_id=? AND patient_name=? AND birth_date=?", key
        ).fetchone()
        if row:
            return int(row[0])
        cur = self._db.execute(
            "INSERT INTO patients(patient_id, patient_name, birth_date, sex) VALUES (?,?,?,?)"
            " ON CONFLICT (patient_id, patient_name, birth_date) DO NOTHING",
            (*key, h.sex),
        )
        if cur.rowcount != 1:  # another writer's row, committed since the look-up
            return self._patient_ref(h)
        return int(cur.lastrowid or 0)

    def _touch_or_insert(
        self,
        table: str,
        uid_column: str,
        uid: str,
        now: float,
        insert: str,
        values: Callable[[], tuple[Any, ...]],
    ) -> tuple[int, bool]:
        """Count one more instance in an existing study/series row, or insert it with
        ``values()`` (called only then: the patient lookup is for new studies); (id, created)."""
        if _HAS_RETURNING:  # one statement for the common case, the row exists
            rows = self._db.execute(
                f"UPDATE {table} SET last_received_at=?, n_instances=n_instances+1"
                f" WHERE {uid_column}=? RETURNING id",
                (now, uid),
            ).fetchall()
        else:
            rows = self._db.execute(
                f"SELECT id FROM {table} WHERE {uid_column}=?", (uid,)
            ).fetchall()
            if rows:
                self._db.execute(
                    f"UPDATE {table} SET last_received_at=?, n_instances=n_instances+1 WHERE id=?",
                    (now, rows[0][0]),
                )
        if rows:
            return int(rows[0][0]), False
        cur = self._db.execute(f"{insert} ON CONFLICT ({uid_column}) DO NOTHING", values())
        if cur.rowcount != 1:  # another writer's row, committed since the update: count in it
            return self._touch_or_insert(table, uid_column, uid, now, insert, values)
        return int(cur.lastrowid or 0), True

    def _study_ref(self, h: InstanceHeader, now: float) -> tuple[int, bool]:
        return self._touch_or_insert(
            "studies",
            "study_uid",
            h.study_uid,
            now,
            "INSERT INTO studies(study_uid, patient_ref, study_date, study_time, accession_number,"
            " description, first_received_at, last_received_at, n_instances)"
            " VALUES (?,?,?,?,?,?,?,?,1)",
            lambda: (
                h.study_uid,
                self._patient_ref(h),
                h.study_date,
                h.study_time,
                h.accession_number,
                h.study_description,
                now,
                now,
            ),
        )

    def _series_ref(self, h: InstanceHeader, study_ref: int, now: float) -> tuple[int, bool]:
        return self._touch_or_insert(
            "series",
            "series_uid",
            h.series_uid,
            now,
            "INSERT INTO series(series_uid, study_ref, modality, series_number, description,"
            " first_received_at, last_received_at, n_instances) VALUES (?,?,?,?,?,?,?,1)",
            lambda: (
                h.series_uid,
                study_ref,
                h.modality,
                h.series_number,
                h.series_description,
                now,
                now,
            ),
        )

    def add_instance(
        self, header: InstanceHeader, path: str, size: int, origin: Origin
    ) -> AddResult:
        """Index one instance (its study, series and patient rows as needed); returns once
        committed, in a transaction shared with the adds of other threads waiting meanwhile."""
        return self.adds.submit(_Add(header, path, size, origin, time.time()))

    def _add_batch(self, adds: Sequence[_Add]) -> list[AddResult | BaseException]:
        """Commit ``adds`` in one transaction; when one of them fails, roll back and commit
        each alone, so only the failing one gets its error."""
        with self._lock, self._writer_turn():
            if len(adds) > 1:
                together = self._add_together(adds)
                if together is not None:
                    return together
            return [self._add_alone(add) for add in adds]

    def _add_together(self, adds: Sequence[_Add]) -> list[AddResult | BaseException] | None:
        """One transaction for all; None when an add failed (rolled back, to be retried one
        by one); a failure to begin or commit is every add's."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except Exception as exc:
            return [exc] * len(adds)
        return self._commit_together(adds, lambda: [self._insert(add) for add in adds])

    def _commit_together(
        self, adds: Sequence[_Add], rows: Callable[[], Sequence[AddResult]]
    ) -> list[AddResult | BaseException] | None:
        """Write the rows of ``adds`` (``rows``, in the transaction begun) and commit: None
        when writing failed (rolled back, for the adds to be retried one by one); a failure
        to commit is every add's."""
        try:
            results: list[AddResult | BaseException] = list(rows())
        except Exception:
            self._rollback()
            return None
        except BaseException:
            self._rollback()
            raise
        try:
            self._db.execute("COMMIT")
        except Exception as exc:
            self._rollback()
            return [exc] * len(adds)
        return results

    def _add_alone(self, add: _Add) -> AddResult | BaseException:
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except Exception as exc:
            return exc
        try:
            result = self._insert(add)
            self._db.execute("COMMIT")
        except _AlreadyIndexed:
            self._rollback()
            return AddResult(new_study=False, new_series=False, duplicate=True)
        except Exception as exc:
            self._rollback()
            return exc
        except BaseException:
            self._rollback()
            raise
        return result

    @contextlib.contextmanager
    def _writer_turn(self) -> Iterator[None]:
        """This process's turn to write, among the processes adding to the index (several
        receivers on one port): an exclusive ``flock`` on ``<index>-writer``. SQLite would
        serialise them too, but a writer finding the database locked sleeps 1, 2, 5, 10...
        ms before it looks again, while a commit takes well under a millisecond: the lock
        wakes the next process as soon as the last one commits."""
        if self._writer_fd < 0:
            yield
            return
        fcntl.flock(self._writer_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._writer_fd, fcntl.LOCK_UN)

    def _rollback(self) -> None:
        """Roll back the open transaction, if SQLite has not already (it does on some errors)."""
        with contextlib.suppress(Exception):  # sqlite3's, or a PostgreSQL connection gone
            self._db.execute("ROLLBACK")

    def _insert(self, add: _Add) -> AddResult:
        """The rows of one add, inside the caller's transaction; :class:`_AlreadyIndexed`
        when the instance is (its study and series counts must then be rolled back)."""
        header, now = add.header, add.now
        study_ref, new_study = self._study_ref(header, now)
        series_ref, new_series = self._series_ref(header, study_ref, now)
        cur = self._db.execute(
            f"INSERT INTO instances(sop_instance_uid, series_ref, {', '.join(_FIELDS)})"
            f" VALUES (?,?,{','.join('?' * len(_FIELDS))})"
            " ON CONFLICT (sop_instance_uid) DO NOTHING",
            (
                header.sop_instance_uid,
                series_ref,
                *_values(header, add.path, add.size, now, add.origin),
            ),
        )
        if cur.rowcount == 0:
            raise _AlreadyIndexed
        return AddResult(new_study=new_study, new_series=new_series)

    def replace_instance(
        self, header: InstanceHeader, path: str, size: int, origin: Origin
    ) -> None:
        now = time.time()
        with self._lock:
            self._db.execute(
                f"UPDATE instances SET {', '.join(f + '=?' for f in _FIELDS)}"
                " WHERE sop_instance_uid=?",
                (*_values(header, path, size, now, origin), header.sop_instance_uid),
            )
            self._db.execute(
                "UPDATE series SET last_received_at=?, summary_written_at=NULL WHERE series_uid=?",
                (now, header.series_uid),
            )

    def mark_study_present(self, study_uid: str) -> None:
        """A study deleted by retention has files again (it was sent again)."""
        with self._lock:
            self._db.execute(
                "UPDATE studies SET deleted_at=NULL, deleted_reason='' WHERE study_uid=?",
                (study_uid,),
            )

    def record_duplicate(
        self, sop_instance_uid: str, identical: bool, action: str, origin: Origin
    ) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO duplicates(sop_instance_uid, identical, action, received_at,"
                " calling_ae, peer_ip) VALUES (?,?,?,?,?,?)",
                (
                    sop_instance_uid,
                    int(identical),
                    action,
                    time.time(),
                    origin.calling_ae,
                    origin.peer_ip,
                ),
            )

    def add_quarantine(self, record: QuarantineRecord) -> None:
        r, o = record, record.origin
        with self._lock:
            self._db.execute(
                "INSERT INTO quarantine(qid, reason, detail, path, size, sha256, received_at,"
                " calling_ae, called_ae, peer_ip, via, sop_instance_uid, study_uid, project)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    r.qid,
                    r.reason,
                    r.detail,
                    r.path,
                    r.size,
                    r.sha256,
                    r.received_at,
                    o.calling_ae,
                    o.called_ae,
                    o.peer_ip,
                    o.via,
                    r.sop_instance_uid,
                    r.study_uid,
                    r.project,
                ),
            )

    def list_quarantine(self) -> list[QuarantineRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT qid, reason, detail, path, size, sha256, received_at, via, calling_ae,"
                " called_ae, peer_ip, sop_instance_uid, study_uid FROM quarantine ORDER BY id"
            ).fetchall()
        return [
            QuarantineRecord(q, r, d, p, s, h, t, Origin(v, ca, cd, ip), sop, st)
            for q, r, d, p, s, h, t, v, ca, cd, ip, sop, st in rows
        ]

    def series_needing_summary(self, quiet_seconds: float) -> list[str]:
        """Series whose JSON is missing or older than their last instance, quiet for a while."""
        cutoff = time.time() - quiet_seconds
        with self._lock:
            rows = self._db.execute(
                "SELECT series_uid FROM series WHERE last_received_at <= ? AND"
                " (summary_written_at IS NULL OR summary_written_at < last_received_at)",
                (cutoff,),
            ).fetchall()
        return [r[0] for r in rows]

    def series_for_summary(self, series_uid: str) -> dict[str, Any]:
        """Study, patient and series fields plus every instance's ``attrs`` of one series."""
        with self._lock:
            head = self._db.execute(
                "SELECT se.id, se.series_uid, se.modality, se.series_number, se.description,"
                " se.first_received_at, se.last_received_at, st.study_uid, st.study_date,"
                " st.study_time, st.accession_number, st.description, p.patient_id,"
                " p.patient_name, p.birth_date, p.sex, se.labels"
                " FROM series se JOIN studies st ON st.id = se.study_ref"
                " JOIN patients p ON p.id = st.patient_ref WHERE se.series_uid = ?",
                (series_uid,),
            ).fetchone()
            if head is None:
                raise KeyError(series_uid)
            rows = self._db.execute(
                "SELECT sop_instance_uid, sop_class_uid, instance_number, transfer_syntax, size,"
                " calling_ae, called_ae, peer_ip, attrs FROM instances WHERE series_ref = ?"
                " ORDER BY instance_number, id",
                (head[0],),
            ).fetchall()
        keys = (
            "series_uid",
            "modality",
            "series_number",
            "series_description",
            "first_received_at",
            "last_received_at",
            "study_uid",
            "study_date",
            "study_time",
            "accession_number",
            "study_description",
            "patient_id",
            "patient_name",
            "birth_date",
            "sex",
        )
        out: dict[str, Any] = dict(zip(keys, head[1:-1], strict=True))
        out["labels"] = json.loads(head[-1] or "[]")
        out["instances"] = [
            {
                "sop_instance_uid": r[0],
                "sop_class_uid": r[1],
                "instance_number": r[2],
                "transfer_syntax": r[3],
                "size": r[4],
                "calling_ae": r[5],
                "called_ae": r[6],
                "peer_ip": r[7],
                "attrs": json.loads(r[8]),
            }
            for r in rows
        ]
        return out

    def mark_summary_written(self, series_uid: str, at: float) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE series SET summary_written_at=? WHERE series_uid=?", (at, series_uid)
            )

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {
                table: int(self._db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
                for table in ("patients", "studies", "series", "instances", "quarantine")
            }

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Connection]:
        """The shared connection inside ``BEGIN IMMEDIATE`` ... ``COMMIT`` (rolled back on error).

        For the other stores of the engine (pipeline runs, routes) that keep their tables in the
        same database file: one connection, one lock, one durable commit.
        """
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    @contextlib.contextmanager
    def reading(self) -> Iterator[Connection]:
        """The shared connection under the lock, for reads (autocommit, no transaction)."""
        with self._lock:
            yield self._db

    def close(self) -> None:
        """Close the index once the adds already queued are committed (10 s at most: an add
        after that fails, and its sender is not answered Success)."""
        if not self.adds.wait_idle(10.0):
            log.warning("index closed with instance adds still queued: they are not answered")
        if self.adds.items:
            log.info(
                "index: %d instances added in %d transactions (group commit)",
                self.adds.items,
                self.adds.batches,
            )
        with self._lock:
            self._db.close()
            if self._writer_fd >= 0:
                self._writer_fd = -1
                self._close_writer()


def _open_writer_lock(path: Path) -> int:
    """The descriptor of the writers' lock file beside the index (``-1`` when it cannot be
    opened: the adds then rely on SQLite's own locking alone)."""
    try:
        return os.open(f"{path}-writer", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    except OSError:
        return -1


def _split_sql(script: str) -> list[str]:
    """Split a migration into statements (they contain no semicolons inside literals)."""
    lines = [line.split("--", 1)[0] for line in script.splitlines()]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def _read_only_uri(path: Path) -> str:
    """SQLite's URI opening ``path`` read-only (percent-encoded, so any file name works)."""
    return f"{path.resolve().as_uri()}?mode=ro"


def read_schema_version(path: Path) -> int:
    """The schema version of the index file ``path``, read without changing it
    (:class:`IndexMissing` when there is no such file, :class:`IndexUnusable` when SQLite
    cannot read it)."""
    if not path.is_file():
        raise IndexMissing(path)
    try:
        db = sqlite3.connect(_read_only_uri(path), uri=True)
        try:
            return int(db.execute("PRAGMA user_version").fetchone()[0])
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise IndexUnusable(f"cannot open the index {path}: {exc}") from None


def index_file(url: str, default_path: Path) -> Path:
    """The file of the SQLite index named by ``url`` (``sqlite:///PATH``; empty:
    ``default_path``; ``$FIONA_INDEX_URL`` first); ValueError for a PostgreSQL index."""
    url = resolve_index_url(url)
    if engine_of(url) != "sqlite":
        raise ValueError(f"the index {redact_url(url)} is not a file (PostgreSQL)")
    return Path(url[len("sqlite:///") :]) if url else default_path


def is_postgresql(url: str) -> bool:
    """Whether the index in force for the site's ``url`` is a PostgreSQL database."""
    return engine_of(resolve_index_url(url)) == "postgresql"


def index_location(url: str, default_path: Path) -> str:
    """Where the index in force is, for messages: its file, or its URL without a password."""
    url = resolve_index_url(url)
    return redact_url(url) if is_postgresql(url) else str(index_file(url, default_path))


def open_index(
    url: str, default_path: Path, *, upgrade: bool = True, read_only: bool = False
) -> SqliteIndex:
    """Open the index named by ``url`` (``$FIONA_INDEX_URL`` overrides it): a SQLite file
    (:func:`index_file`, :class:`SqliteIndex`) or a PostgreSQL database (:class:`PgIndex`)."""
    url = resolve_index_url(url)
    try:
        engine = engine_of(url)
    except ValueError as exc:
        raise IndexUnusable(str(exc)) from None
    if engine == "postgresql":
        return PgIndex(url, upgrade=upgrade, read_only=read_only)
    return SqliteIndex(index_file(url, default_path), upgrade=upgrade, read_only=read_only)


def read_index_version(url: str, default_path: Path) -> int:
    """The schema version of the index in force, read without changing it (see
    :func:`read_schema_version`; for PostgreSQL :class:`IndexMissing` when no fiona schema)."""
    url = resolve_index_url(url)
    if not is_postgresql(url):
        return read_schema_version(index_file(url, default_path))
    index = PgIndex(url, upgrade=False, read_only=True, check_version=False)
    try:
        return index.schema_version
    finally:
        index.close()


#: The advisory lock key under which a PostgreSQL index is migrated (one node at a time).
_MIGRATION_LOCK = 0x46494F4E41  # 'FIONA'


#: One instance add on PostgreSQL, in one statement: the study's and the series' counters and
#: the instance row under the series (when it exists), and what each did: (study id or NULL,
#: series id or NULL, 1 when the row was inserted). PostgreSQL only (SQLite has no UPDATE or
#: INSERT inside WITH): on SQLite these are three statements (:meth:`SqliteIndex._insert`),
#: which cost it ~20 us each in process; through psycopg each costs ~0.1 ms of the
#: receiver's CPU, the largest part of an add on PostgreSQL (README: Benchmarks, Index engines).
_PG_ADD = (
    "WITH st AS (UPDATE studies SET last_received_at=?, n_instances=n_instances+1"
    " WHERE study_uid=? RETURNING id),"
    " se AS (UPDATE series SET last_received_at=?, n_instances=n_instances+1"
    " WHERE series_uid=? RETURNING id),"
    f" ins AS (INSERT INTO instances(sop_instance_uid, series_ref, {', '.join(_FIELDS)})"
    f" SELECT ?, se.id, {','.join('?' * len(_FIELDS))} FROM se"
    " ON CONFLICT (sop_instance_uid) DO NOTHING RETURNING 1)"
    " SELECT (SELECT id FROM st), (SELECT id FROM se), (SELECT count(*) FROM ins)"
)


class PgIndex(SqliteIndex):
    """:class:`Index` on a PostgreSQL database: every statement of :class:`SqliteIndex`, run on
    the connection a pool lends the calling thread for the ``with`` block (psycopg 3).

    Unlike SQLite's one connection under a lock, threads run concurrently, each on its own
    connection; ``BEGIN`` ... ``COMMIT`` blocks are PostgreSQL transactions (READ COMMITTED).
    The schema version is the one row of the ``schema_version`` table.
    """

    def __init__(
        self,
        url: str,
        *,
        upgrade: bool = True,
        read_only: bool = False,
        pool_size: int = 8,
        check_version: bool = True,
    ) -> None:
        from engine.store import pg

        self.path = Path("postgresql")  # no file: see ``location``
        self.location = redact_url(url)
        self.upgraded_from = None
        # Adds of concurrent associations share transactions here too: a PostgreSQL commit
        # (a WAL flush and a round trip) costs more than SQLite's.
        self.adds = GroupCommit(
            self._add_batch, max_pending=self.MAX_PENDING_ADDS, max_batch=self.MAX_BATCH
        )
        self._writer_fd = -1  # the server orders writers; no lock file
        try:
            pool = pg.make_pool(url, max_size=pool_size, read_only=read_only)
        except Exception as exc:  # psycopg's own errors (bad URL, refused login) too
            kind = IndexUnreachable if isinstance(exc, IndexUnavailable) else IndexUnusable
            raise kind(f"cannot open the index {self.location}: {str(exc).strip()}") from None
        self._lock = pg.Lease(pool)
        self._db = pg.LeasedConnection(self._lock)
        if not check_version:
            return
        try:
            self._configure_pg(read_only, upgrade)
        except BaseException:
            pool.close()
            raise

    def _configure_pg(self, read_only: bool, upgrade: bool) -> None:
        version = self.schema_version
        if version == 0 and not upgrade:
            raise IndexMissing(self.location)
        if version > latest_version():
            raise IndexTooNew(self.location, version)
        if version < latest_version() and (read_only or not upgrade):
            raise IndexOutdated(self.location, version)
        if version < latest_version():
            self._migrate()
            self.upgraded_from = version

    def _migrate(self) -> None:
        from engine.store.pg import translate_ddl

        with self._lock:
            for migration in migrations():
                self._db.execute("BEGIN")
                try:
                    self._db.execute("SELECT pg_advisory_xact_lock(?)", (_MIGRATION_LOCK,))
                    self._db.execute(
                        "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"
                    )
                    if self._read_version() >= migration.version:  # another node did it
                        self._db.execute("COMMIT")
                        continue
                    for statement in _split_sql(migration.sql):
                        self._db.execute(translate_ddl(statement))
                    self._db.execute("DELETE FROM schema_version")
                    self._db.execute(
                        "INSERT INTO schema_version (version) VALUES (?)", (migration.version,)
                    )
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise

    def _read_version(self) -> int:
        if self._db.execute("SELECT to_regclass('schema_version')").fetchone()[0] is None:
            return 0
        row = self._db.execute("SELECT max(version) FROM schema_version").fetchone()
        return int(row[0] or 0)

    @property
    def schema_version(self) -> int:
        try:
            with self._lock:
                return self._read_version()
        except IndexUnavailable as exc:
            raise IndexUnusable(f"cannot read the index {self.location}: {exc}") from None

    def _add_batch(self, adds: Sequence[_Add]) -> list[AddResult | BaseException]:
        """Commit ``adds`` in one transaction in two round trips: BEGIN and one statement per
        add pipelined (:meth:`_pipelined`), then COMMIT. When an add fails or is a duplicate,
        as on SQLite (each alone)."""
        with self._lock:
            together = self._add_pipelined(adds)
            if together is not None:
                return together
            return [self._add_alone(add) for add in adds]

    def _add_pipelined(self, adds: Sequence[_Add]) -> list[AddResult | BaseException] | None:
        """One transaction for all; None when an add failed or was indexed already (rolled
        back: retried one by one); a failure to commit is every add's."""
        return self._commit_together(adds, lambda: self._pipelined(adds))

    def _pipelined(self, adds: Sequence[_Add]) -> list[AddResult]:
        """The rows of ``adds`` inside a new transaction, left open. One round trip: BEGIN,
        then per add one statement (:data:`_PG_ADD`) that counts the instance in its study
        and series and inserts its row under the series (nothing when it is new). An add
        whose study or series is new then finishes with :class:`SqliteIndex`'s statements;
        :class:`_AlreadyIndexed` when an instance is."""
        statements: list[tuple[str, Sequence[Any]]] = [("BEGIN", ())]
        for add in adds:
            h = add.header
            statements.append(
                (
                    _PG_ADD,
                    (
                        add.now,
                        h.study_uid,
                        add.now,
                        h.series_uid,
                        h.sop_instance_uid,
                        *_values(h, add.path, add.size, add.now, add.origin),
                    ),
                )
            )
        cursors = self._db.pipeline(statements)[1:]
        results = []
        for add, cursor in zip(adds, cursors, strict=True):
            study_id, series_id, inserted = cursor.fetchone()
            if series_id is not None and inserted != 1:
                raise _AlreadyIndexed
            if study_id is None:  # a new study: its patient and row (counted once)
                study_ref, new_study = self._study_ref(add.header, add.now)
            else:
                study_ref, new_study = int(study_id), False
            if series_id is None:  # a new series: its row, then the instance's
                results.append(self._insert_in_series(add, study_ref, new_study))
            else:
                results.append(AddResult(new_study=new_study, new_series=False))
        return results

    def _insert_in_series(self, add: _Add, study_ref: int, new_study: bool) -> AddResult:
        """An add whose series was not found by :meth:`_pipelined`: the series row (or one
        counted in, inserted meanwhile), the instance row."""
        series_ref, new_series = self._series_ref(add.header, study_ref, add.now)
        cur = self._db.execute(
            f"INSERT INTO instances(sop_instance_uid, series_ref, {', '.join(_FIELDS)})"
            f" VALUES (?,?,{','.join('?' * len(_FIELDS))})"
            " ON CONFLICT (sop_instance_uid) DO NOTHING",
            (
                add.header.sop_instance_uid,
                series_ref,
                *_values(add.header, add.path, add.size, add.now, add.origin),
            ),
        )
        if cur.rowcount == 0:
            raise _AlreadyIndexed
        return AddResult(new_study=new_study, new_series=new_series)

    def close(self) -> None:
        if not self.adds.wait_idle(10.0):
            log.warning("index closed with instance adds still queued: they are not answered")
        if self.adds.items:
            log.info(
                "index: %d instances added in %d transactions (group commit)",
                self.adds.items,
                self.adds.batches,
            )
        self._db.close()
