"""The group commit's batch of instance adds, on both engines: every add gets its own result and
the study and series counts are exact whatever the batch mixes (new study, new series, rows
that exist, an instance indexed already); on PostgreSQL a batch into existing series costs two
round trips (BEGIN and every add's statements pipelined, then COMMIT), not three per add.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.store import db as dbmod
from engine.store import pg
from engine.store.index import AddResult, SqliteIndex, _Add, open_index
from tests.pg_server import PgCluster
from tests.test_index_engines import ORIGIN, header


@pytest.fixture(params=["sqlite", "postgresql"])
def index(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[SqliteIndex]:
    """A fresh index on each engine."""
    monkeypatch.delenv(dbmod.INDEX_URL_ENV, raising=False)
    if request.param == "sqlite":
        opened = open_index("", tmp_path / "index.sqlite")
        yield opened
        opened.close()
        return
    cluster: PgCluster = request.getfixturevalue("pg_cluster")
    name = cluster.new_database()
    opened = open_index(cluster.url(name), tmp_path / "unused")
    yield opened
    opened.close()
    cluster.drop_database(name)


def add(sop: str, series: str = "1.2.3.1", study: str = "1.2.3") -> _Add:
    return _Add(header(sop, series, study), f"a/{sop}.dcm", 10, ORIGIN, time.time())


def counts(index: SqliteIndex) -> dict[str, int]:
    """n_instances per study and series UID, and the instance rows under each series."""
    with index.reading() as db:
        rows = db.execute(
            "SELECT study_uid, n_instances FROM studies UNION ALL"
            " SELECT series_uid, n_instances FROM series"
        ).fetchall()
        per_series = db.execute(
            "SELECT se.series_uid, count(*) FROM instances i"
            " JOIN series se ON se.id = i.series_ref GROUP BY se.series_uid"
        ).fetchall()
    return {**{r[0]: int(r[1]) for r in rows}, **{f"rows {r[0]}": int(r[1]) for r in per_series}}


def test_a_batch_of_new_and_known_rows_gives_each_add_its_result(index: SqliteIndex) -> None:
    assert index._add_batch([add("1.1")]) == [AddResult(True, True)]
    batch = [
        add("1.2"),  # known study and series
        add("1.3", series="1.2.3.2"),  # a new series of the known study
        add("1.4", series="1.2.3.2"),  # the same new series, later in the batch
        add("2.1", series="2.2.3.1", study="2.2.3"),  # a new study
        add("2.2", series="2.2.3.1", study="2.2.3"),
        add("1.5"),
    ]
    assert index._add_batch(batch) == [
        AddResult(False, False),
        AddResult(False, True),
        AddResult(False, False),
        AddResult(True, True),
        AddResult(False, False),
        AddResult(False, False),
    ]
    assert counts(index) == {
        "1.2.3": 5,
        "1.2.3.1": 3,
        "1.2.3.2": 2,
        "2.2.3": 2,
        "2.2.3.1": 2,
        "rows 1.2.3.1": 3,
        "rows 1.2.3.2": 2,
        "rows 2.2.3.1": 2,
    }
    assert index.counts()["patients"] == 1


def test_an_instance_indexed_already_in_a_batch_is_a_duplicate_and_counted_once(
    index: SqliteIndex,
) -> None:
    index._add_batch([add("1.1")])
    results = index._add_batch([add("1.2"), add("1.1"), add("1.3", series="1.2.3.2")])
    assert results == [
        AddResult(False, False),
        AddResult(False, False, duplicate=True),
        AddResult(False, True),
    ]
    assert counts(index) == {
        "1.2.3": 3,
        "1.2.3.1": 2,
        "1.2.3.2": 1,
        "rows 1.2.3.1": 2,
        "rows 1.2.3.2": 1,
    }


def test_a_postgresql_batch_into_known_series_is_two_round_trips(
    pg_cluster: PgCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(dbmod.INDEX_URL_ENV, raising=False)
    name = pg_cluster.new_database()
    index = open_index(pg_cluster.url(name), tmp_path / "unused")
    sent: list[Any] = []
    execute, pipeline = pg.PgConnection.execute, pg.PgConnection.pipeline

    def counted_execute(self: pg.PgConnection, sql: str, parameters: Any = ()) -> Any:
        sent.append(sql)
        return execute(self, sql, parameters)

    def counted_pipeline(self: pg.PgConnection, statements: Any) -> Any:
        sent.append(len(statements))
        return pipeline(self, statements)

    try:
        index._add_batch([add("1.1"), add("1.2", series="1.2.3.2")])
        monkeypatch.setattr(pg.PgConnection, "execute", counted_execute)
        monkeypatch.setattr(pg.PgConnection, "pipeline", counted_pipeline)
        batch = [add(f"1.{k}", series=f"1.2.3.{1 + k % 2}") for k in range(3, 11)]
        assert index._add_batch(batch) == [AddResult(False, False)] * 8
        assert sent == [1 + 8, "COMMIT"]  # BEGIN and one statement per add; COMMIT
        assert index.counts()["instances"] == 10
    finally:
        index.close()
        pg_cluster.drop_database(name)
