"""The index behaves the same on SQLite and on a real PostgreSQL (tests/pg_server.py).

Each test runs on both engines (``engine`` parameter), whatever ``FIONA_TEST_INDEX`` says; the
PostgreSQL cluster is started once per session by the ``pg_cluster`` fixture.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.dicom.header import InstanceHeader
from engine.store import db as dbmod
from engine.store.db import IndexUnavailable, IntegrityError, redact_url
from engine.store.index import (
    IndexMissing,
    IndexOutdated,
    Origin,
    SqliteIndex,
    _split_sql,
    latest_version,
    migrations,
    open_index,
)
from engine.store.mpps import MppsStore, StepError, StepUpdate
from engine.store.pg import translate, translate_ddl
from engine.store.users import UserError, UserStore
from tests.pg_server import PgCluster

ORIGIN = Origin("dimse", "MODALITY", "FIONA", "127.0.0.1")


def header(sop: str, series: str = "1.2.3.1", study: str = "1.2.3") -> InstanceHeader:
    return InstanceHeader(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        sop_instance_uid=sop,
        study_uid=study,
        series_uid=series,
        patient_id="P1",
        patient_name="Doe^Jane",
        birth_date="19700101",
        sex="F",
        study_date="20260101",
        study_time="120000",
        accession_number="A1",
        study_description="CT",
        modality="CT",
        series_number=1,
        series_description="axial",
        instance_number=1,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        attrs={},
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def engine_url(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """An index URL on each engine (a fresh file; a fresh database)."""
    monkeypatch.delenv(dbmod.INDEX_URL_ENV, raising=False)
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'index.sqlite'}"
        return
    cluster: PgCluster = request.getfixturevalue("pg_cluster")
    name = cluster.new_database()
    yield cluster.url(name)
    cluster.drop_database(name)


def test_add_instance_counts_and_finds_it_again(engine_url: str, tmp_path: Path) -> None:
    index = open_index(engine_url, tmp_path / "unused")
    try:
        first = index.add_instance(header("1.1"), "a/1.dcm", 10, ORIGIN)
        second = index.add_instance(header("1.2"), "a/2.dcm", 20, ORIGIN)
        other = index.add_instance(header("1.3", series="1.2.3.2"), "a/3.dcm", 30, ORIGIN)
        assert (first.new_study, first.new_series) == (True, True)
        assert (second.new_study, second.new_series) == (False, False)
        assert (other.new_study, other.new_series) == (False, True)
        found = index.find_instance("1.2")
        assert found is not None and (found.path, found.size, found.series_uid) == (
            "a/2.dcm",
            20,
            "1.2.3.1",
        )
        assert index.counts() == {
            "patients": 1,
            "studies": 1,
            "series": 2,
            "instances": 3,
            "quarantine": 0,
        }
        with index.reading() as db:
            n, last = db.execute(
                "SELECT n_instances, last_received_at FROM studies WHERE study_uid = ?", ("1.2.3",)
            ).fetchone()
        assert n == 3 and isinstance(last, float) and last > 1.7e9  # epoch seconds, not float4
    finally:
        index.close()


def test_a_duplicate_instance_is_one_integrity_error_on_both(
    engine_url: str, tmp_path: Path
) -> None:
    index = open_index(engine_url, tmp_path / "unused")
    try:
        index.add_instance(header("1.1"), "a/1.dcm", 10, ORIGIN)
        # Indexed meanwhile (another receiver): a duplicate, its counts rolled back.
        again = index.add_instance(header("1.1"), "a/1b.dcm", 10, ORIGIN)
        assert again.duplicate and not again.new_study and not again.new_series
        assert index.counts()["instances"] == 1
        with pytest.raises(IntegrityError), index.transaction() as db:
            db.execute(
                "INSERT INTO instances (sop_instance_uid, sop_class_uid, series_ref, path, size,"
                " received_at, via) SELECT sop_instance_uid, sop_class_uid, series_ref, path, size,"
                " received_at, via FROM instances"
            )
        assert index.counts()["instances"] == 1  # the failed insert left nothing behind
        assert issubclass(IntegrityError, sqlite3.IntegrityError)
        index.record_duplicate("1.1", True, "ignored", ORIGIN)
        with index.reading() as db:
            assert db.execute("SELECT identical, action FROM duplicates").fetchall() == [
                (1, "ignored")
            ]
    finally:
        index.close()


def test_stores_catch_the_integrity_error_of_either_engine(engine_url: str, tmp_path: Path) -> None:
    index = open_index(engine_url, tmp_path / "unused")
    try:
        users = UserStore(index)
        users.add("alice", "viewer", "correct horse battery", projects=["p1", "p2"])
        with pytest.raises(UserError, match="exists already"):
            users.add("alice", "viewer", "correct horse battery")
        mpps = MppsStore(index)
        update = StepUpdate(None, studies=("1.2.3", "1.2.3"), instances=(("s", "1"), ("s", "1")))
        mpps.create("9.9", update, "MOD", 1.0)  # repeated rows: ON CONFLICT DO NOTHING
        with pytest.raises(StepError):
            mpps.create("9.9", update, "MOD", 2.0)
        assert [(s.studies, s.n_instances) for s in mpps.steps_for("1.2.3")] == [(("1.2.3",), 1)]
    finally:
        index.close()


def test_a_transaction_rolls_back_on_both(engine_url: str, tmp_path: Path) -> None:
    index = open_index(engine_url, tmp_path / "unused")
    try:
        with pytest.raises(RuntimeError), index.transaction() as db:
            db.execute("INSERT INTO engine_state (key, value) VALUES (?, ?)", ("k", "100% sure?"))
            raise RuntimeError("abort")
        with index.transaction() as db:
            db.execute("INSERT INTO engine_state (key, value) VALUES (?, ?)", ("k", "50%?"))
            cur = db.execute(
                "INSERT INTO engine_state (key, value) VALUES (?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                ("k", "it's ?"),
            )
            assert cur.rowcount == 1
        with index.reading() as db:
            rows = db.execute("SELECT key, value FROM engine_state WHERE value LIKE '%?'")
            assert rows.fetchall() == [("k", "it's ?")]
            assert db.execute("SELECT 1 WHERE 'ABC' LIKE 'abc'").fetchall() == [(1,)]
            cast = db.execute("SELECT CAST(? / 2 AS INTEGER), CAST(-0.5 AS INTEGER)", (15.8,))
            assert cast.fetchone() == (7, 0)  # truncated, as SQLite does, not rounded
    finally:
        index.close()


def test_migrations_give_both_engines_the_same_tables_and_columns(
    engine_url: str, tmp_path: Path
) -> None:
    index = open_index(engine_url, tmp_path / "unused")
    try:
        assert index.schema_version == latest_version()
        with index.reading() as db:
            if engine_url.startswith("sqlite"):
                tables = [
                    r[0]
                    for r in db.execute(
                        "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
                    )
                ]
                columns = {
                    t: sorted(r[1] for r in db.execute(f"PRAGMA table_info({t})")) for t in tables
                }
            else:
                tables = [
                    r[0]
                    for r in db.execute(
                        "SELECT table_name FROM information_schema.tables"
                        " WHERE table_schema = 'public' AND table_name <> 'schema_version'"
                        " ORDER BY table_name"
                    )
                ]
                columns = {
                    t: sorted(
                        r[0]
                        for r in db.execute(
                            "SELECT column_name FROM information_schema.columns"
                            " WHERE table_name = ?",
                            (t,),
                        )
                    )
                    for t in tables
                }
        assert columns == _sqlite_reference_columns(tmp_path)
    finally:
        index.close()


def _sqlite_reference_columns(tmp_path: Path) -> dict[str, list[str]]:
    """The tables and columns every migration gives a SQLite index, read back from SQLite."""
    path = tmp_path / "reference.sqlite"
    SqliteIndex(path).close()
    db = sqlite3.connect(path)
    try:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {t: sorted(r[1] for r in db.execute(f"PRAGMA table_info({t})")) for t in tables}
    finally:
        db.close()


def test_an_index_is_missing_then_created_then_refused_when_outdated(
    engine_url: str, tmp_path: Path
) -> None:
    with pytest.raises(IndexMissing):
        open_index(engine_url, tmp_path / "unused", upgrade=False)
    open_index(engine_url, tmp_path / "unused").close()
    index = open_index(engine_url, tmp_path / "unused", upgrade=False, read_only=True)
    try:
        assert index.schema_version == latest_version()
    finally:
        index.close()
    if engine_url.startswith("postgresql"):  # an older schema: the version table says so
        index = open_index(engine_url, tmp_path / "unused")
        with index.transaction() as db:
            db.execute("UPDATE schema_version SET version = ?", (latest_version() - 1,))
        index.close()
        with pytest.raises(IndexOutdated):
            open_index(engine_url, tmp_path / "unused", upgrade=False)


def test_threads_add_instances_concurrently(engine_url: str, tmp_path: Path) -> None:
    index = open_index(engine_url, tmp_path / "unused")
    errors: list[BaseException] = []

    def add(n: int) -> None:
        try:
            for i in range(20):
                index.add_instance(header(f"2.{n}.{i}", series=f"1.2.3.{n}"), "x", 1, ORIGIN)
        except BaseException as exc:  # pragma: no cover - the assertion shows it
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert errors == []
        assert index.counts()["instances"] == 80 and index.counts()["studies"] == 1
    finally:
        index.close()


def test_a_postgresql_restart_is_index_unavailable_then_recovered(
    pg_cluster: PgCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server restarted under an open index: the statement in flight fails with
    IndexUnavailable (nothing half-written), the next one gets a fresh connection."""
    monkeypatch.delenv(dbmod.INDEX_URL_ENV, raising=False)
    name = pg_cluster.new_database()
    index = open_index(pg_cluster.url(name), tmp_path / "unused")
    try:
        index.add_instance(header("1.1"), "a/1.dcm", 10, ORIGIN)
        with pytest.raises(IndexUnavailable), index.transaction() as db:
            db.execute("INSERT INTO engine_state (key, value) VALUES ('half', 'x')")
            pg_cluster.restart()
            db.execute("INSERT INTO engine_state (key, value) VALUES ('other', 'y')")
        index.add_instance(header("1.2"), "a/2.dcm", 10, ORIGIN)  # a new connection
        assert index.counts()["instances"] == 2
        pg_cluster.restart()  # now while every pooled connection is idle: none is noticed
        assert index.counts()["instances"] == 2
        with index.reading() as db:
            assert db.execute("SELECT count(*) FROM engine_state").fetchone()[0] == 0
    finally:
        index.close()
        pg_cluster.drop_database(name)


def test_an_unreachable_server_is_one_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from engine.store.index import IndexUnusable

    monkeypatch.delenv(dbmod.INDEX_URL_ENV, raising=False)

    with pytest.raises(IndexUnusable, match=r"cannot open the index postgresql://fiona:\*\*\*@"):
        open_index("postgresql://fiona:secret@127.0.0.1:1/fiona", tmp_path / "x")


# --------------------------------------------------------------------------- the translation


@pytest.mark.parametrize(
    ("portable", "postgresql"),
    [
        ("SELECT a FROM t WHERE b = ? AND c = ?", "SELECT a FROM t WHERE b = %s AND c = %s"),
        ("SELECT '?', '%' FROM t WHERE b LIKE ?", "SELECT '?', '%%' FROM t WHERE b ILIKE %s"),
        ("SELECT x FROM t WHERE s = 'it''s ?'", "SELECT x FROM t WHERE s = 'it''s ?'"),
        (
            "SELECT group_concat(DISTINCT m) FROM s",
            "SELECT string_agg(DISTINCT m, ',') FROM s",
        ),
        (
            "SELECT group_concat(r.p, char(31)) FROM r",
            "SELECT string_agg(r.p, chr(31)) FROM r",
        ),
        (
            "SELECT user, t.user FROM x WHERE user = ?",
            'SELECT "user", t.user FROM x WHERE "user" = %s',
        ),
        ("BEGIN IMMEDIATE", "BEGIN"),
        (
            "SELECT CAST((t - ?) / 3600 AS INTEGER), CAST(x AS TEXT) FROM a",
            "SELECT CAST(trunc((t - %s) / 3600) AS BIGINT), CAST(x AS TEXT) FROM a",
        ),
        ("SELECT 1 WHERE a + 1 > 0 AND +r.state = ?", "SELECT 1 WHERE a + 1 > 0 AND r.state = %s"),
        (
            "SELECT 1 FROM a CROSS JOIN b r ON r.x = a.x CROSS JOIN c",
            "SELECT 1 FROM a JOIN b r ON r.x = a.x CROSS JOIN c",
        ),
        (
            "SELECT max(a), max(b, min(c, 1)), t.max(x) FROM t",
            "SELECT max(a), GREATEST(b, LEAST(c, 1)), t.max(x) FROM t",
        ),
        (
            "INSERT INTO studies(study_uid) VALUES (?)",
            "INSERT INTO studies(study_uid) VALUES (%s) RETURNING id",
        ),
        ("INSERT INTO engine_state(key) VALUES (?)", "INSERT INTO engine_state(key) VALUES (%s)"),
    ],
)
def test_portable_statements_translate_for_postgresql(portable: str, postgresql: str) -> None:
    assert translate(portable)[0] == postgresql


def test_ddl_types_translate_for_postgresql() -> None:
    ddl = translate_ddl(
        "CREATE TABLE x (id INTEGER PRIMARY KEY, n INTEGER NOT NULL, t REAL, b BLOB,"
        " note TEXT DEFAULT 'INTEGER')"
    )
    assert ddl == (
        "CREATE TABLE x (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,"
        " n BIGINT NOT NULL, t DOUBLE PRECISION, b BYTEA, note TEXT DEFAULT 'INTEGER')"
    )


def test_every_migration_statement_is_in_the_portable_subset() -> None:
    """No SQLite-only statement in a migration: both engines run the same files."""
    banned = ("PRAGMA", "AUTOINCREMENT", "rowid", "INSERT OR", "strftime", "WITHOUT ROWID")
    for migration in migrations():
        for statement in _split_sql(migration.sql):
            assert not any(word in statement for word in banned), (migration.name, statement)


def test_a_password_never_shows_in_the_url_we_print() -> None:
    assert redact_url("postgresql://fiona:s3cret@db:5432/fiona") == (
        "postgresql://fiona:***@db:5432/fiona"
    )
    assert redact_url("postgresql://fiona@db/fiona") == "postgresql://fiona@db/fiona"
    assert redact_url("postgresql://db/fiona?sslmode=require&password=s3cret") == (
        "postgresql://db/fiona?sslmode=require&password=***"
    )


# --------------------------------------------------------------------------- commands on PostgreSQL


def test_commands_follow_the_url_from_the_environment_and_backup_says_pg_dump(
    pg_cluster: PgCluster,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from engine.cli import main

    name = pg_cluster.new_database()
    url = pg_cluster.url(name).replace("postgres@", "postgres:notused@")  # trust: any password
    monkeypatch.setenv(dbmod.INDEX_URL_ENV, url)
    data = tmp_path / "data"
    data.mkdir()
    try:
        assert main(["db", "status", "--data", str(data)]) == 1  # empty: every migration pending
        assert main(["db", "upgrade", "--data", str(data)]) == 0
        assert main(["db", "status", "--data", str(data), "--json"]) == 0
        shown = capsys.readouterr().out
        assert f'"schema_version": {latest_version()}' in shown
        assert "notused" not in shown and "postgres:***@" in shown
        assert main(["backup", "--data", str(data), str(tmp_path / "backup")]) == 2
        err = capsys.readouterr().err
        assert "pg_dump" in err and "notused" not in err
        assert not (tmp_path / "backup").exists()
        assert not (data / "index.sqlite").exists()  # nothing went to a SQLite file
    finally:
        pg_cluster.drop_database(name)
