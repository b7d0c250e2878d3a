"""``fiona db migrate --to postgresql://...``: a populated SQLite index copied into an empty
PostgreSQL database (tests/pg_server.py), counted, and usable there."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.cli import main
from engine.pipeline.store import RunStore
from engine.store.db import INDEX_URL_ENV
from engine.store.index import open_index
from engine.store.pseudonyms import PseudonymTable
from engine.store.users import UserStore
from engine.transfer.base import OutgoingInstance
from engine.transfer.outbox import Outbox
from tests.pg_server import PgCluster
from tests.test_index_engines import ORIGIN, header


@pytest.fixture
def target(pg_cluster: PgCluster, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An empty PostgreSQL database; the site's own index stays SQLite whatever the run's."""
    monkeypatch.delenv(INDEX_URL_ENV, raising=False)
    name = pg_cluster.new_database()
    yield pg_cluster.url(name)
    pg_cluster.drop_database(name)


def populate(data: Path) -> None:
    """Received studies, pseudonyms, a user with grants, a run and an outbox transfer."""
    index = open_index("", data / "index.sqlite")
    try:
        for i in range(30):
            index.add_instance(header(f"1.{i}", series=f"1.2.3.{i % 3}"), f"a/{i}", 10, ORIGIN)
        index.add_instance(header("2.1", series="2.2.1", study="2.2"), "b/1", 10, ORIGIN)
        table = PseudonymTable(index, "lung")
        assert table.pseudonym_for("P1") == "SUBJ0001"
        UserStore(index).add("alice", "coordinator", "correct horse battery", projects=["lung"])
        run = RunStore(index).create_run("1.2.3", "lung", "SUBJ0001", "", 0, ["1.2.3.0"])
        Outbox(index, data).enqueue(
            project="lung",
            destination="pacs",
            study_uid="1.2.3",
            export_uid="9.9",
            run_id=run,
            follow_up=0,
            subject="SUBJ0001",
            event="",
            items=[
                OutgoingInstance(f"9.9.{i}", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1",
                                 "9.9.0", data / "work" / f"{i}.dcm", 10)
                for i in (3, 1, 2)
            ],
        )  # fmt: skip
    finally:
        index.close()


def test_a_populated_index_is_copied_counted_and_usable(
    tmp_path: Path, target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    populate(data)
    assert main(["db", "migrate", "--data", str(data), "--to", target]) == 0
    out = capsys.readouterr().out
    assert "every table's count matches" in out and "instances: 31 rows" in out

    source = sqlite3.connect(data / "index.sqlite")
    moved = open_index(target, tmp_path / "unused", upgrade=False)
    try:
        with moved.reading() as db:
            for table, query in {
                "instances": "SELECT id, sop_instance_uid, series_ref FROM instances ORDER BY id",
                "pseudonyms": "SELECT project, original, pseudonym FROM pseudonyms",
                "user_projects": "SELECT user, project FROM user_projects",
                "transfer_items": "SELECT sop_instance_uid FROM transfer_items"
                " ORDER BY seq, sop_instance_uid",
            }.items():
                assert db.execute(query).fetchall() == source.execute(query).fetchall(), table
        # the identity sequences are past the copied ids: new rows get new ids
        moved.add_instance(header("3.1", series="3.3.1", study="3.3"), "c/1", 10, ORIGIN)
        assert PseudonymTable(moved, "lung").pseudonym_for("P2") == "SUBJ0002"
        assert moved.counts()["studies"] == 3
    finally:
        moved.close()
        source.close()

    # a second copy into the (now not empty) database is refused, and changes nothing
    assert main(["db", "migrate", "--data", str(data), "--to", target]) == 2
    assert "is not empty" in capsys.readouterr().err


def test_only_a_postgresql_target_is_taken(tmp_path: Path, target: str) -> None:
    data = tmp_path / "data"
    populate(data)
    to = f"sqlite:///{tmp_path / 'other.sqlite'}"
    assert main(["db", "migrate", "--data", str(data), "--to", to]) == 2
