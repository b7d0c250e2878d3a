"""Shared fixtures: real peers, a running `fiona serve`, synthetic studies."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

import engine.projects  # noqa: F401  (registers every project section, as fiona's commands do)
from engine.store.db import INDEX_URL_ENV
from tests.peers import FionaServer, PeerMissing, dcmtk

#: ``FIONA_TEST_INDEX=postgresql`` runs the suite with every index in PostgreSQL.
TEST_INDEX = os.environ.get("FIONA_TEST_INDEX", "sqlite")


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[object]:
    """One throw-away PostgreSQL cluster for the session (tests/pg_server.py); skips locally
    when the package is missing, fails under CI."""
    from tests.pg_server import PgCluster, pg_bin

    if pg_bin() is None:
        message = "PostgreSQL is not installed (apt-get install -y postgresql)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    cluster = PgCluster()
    yield cluster
    cluster.close()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """On PostgreSQL, skip ``@pytest.mark.sqlite_only(reason)`` tests (SQLite by nature: its
    file, PRAGMAs, old SQLite indexes) and ``@pytest.mark.pg_todo(reason)`` ones (not yet
    passing on PostgreSQL: the list of what is left, each with its reason). On SQLite, skip
    ``@pytest.mark.postgresql_run(reason)`` ones (they make their own PostgreSQL whatever the
    run: once, in the PostgreSQL run, is enough)."""
    if TEST_INDEX != "postgresql":
        for item in items:
            marker = item.get_closest_marker("postgresql_run")
            if marker is not None:
                reason = marker.args[0] if marker.args else ""
                item.add_marker(pytest.mark.skip(reason=f"postgresql_run: {reason}"))
        return
    for item in items:
        for name in ("sqlite_only", "pg_todo"):
            marker = item.get_closest_marker(name)
            if marker is not None:
                reason = marker.args[0] if marker.args else ""
                item.add_marker(pytest.mark.skip(reason=f"{name}: {reason}"))


@pytest.fixture(scope="module", autouse=True)
def index_module_engine(request: pytest.FixtureRequest) -> Iterator[str]:
    """On PostgreSQL, one database for the module's wider-scoped fixtures (a ``fiona serve``
    started once for the module, say) and the tests that use them; its name ('' on SQLite)."""
    if TEST_INDEX != "postgresql":
        yield ""
        return
    cluster = request.getfixturevalue("pg_cluster")
    name = cluster.new_database()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(INDEX_URL_ENV, cluster.url(name))
        yield name
    cluster.drop_database(name)


@pytest.fixture(autouse=True)
def index_engine(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, index_module_engine: str
) -> Iterator[None]:
    """The index engine of the run: with ``FIONA_TEST_INDEX=postgresql`` each test gets a fresh
    database through ``$FIONA_INDEX_URL`` (which ``fiona serve`` subprocesses inherit), unless a
    module-scoped fixture has made an index in the module's database already (then the test
    works on that one); on SQLite (the default) no override."""
    if TEST_INDEX != "postgresql":
        monkeypatch.delenv(INDEX_URL_ENV, raising=False)
        yield
        return
    cluster = request.getfixturevalue("pg_cluster")
    with psycopg.connect(cluster.url(index_module_engine), autocommit=True) as conn:
        in_use = conn.execute("SELECT to_regclass('schema_version')").fetchone()
    if in_use and in_use[0] is not None:
        monkeypatch.setenv(INDEX_URL_ENV, cluster.url(index_module_engine))
        yield
        return
    name = cluster.new_database()
    monkeypatch.setenv(INDEX_URL_ENV, cluster.url(name))
    yield
    cluster.drop_database(name)


@pytest.fixture(autouse=True)
def studies_settle_at_once(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process scans read a study right after it arrived, as they did before the tracker
    learnt to wait for a pause (engine.route.tracker.SETTLE_SECONDS): tests drive the scan with
    their own clock, and waiting is tested on its own (``@pytest.mark.settle`` keeps the real
    pause). ``fiona serve`` subprocesses are not affected."""
    if request.node.get_closest_marker("settle") is None:
        monkeypatch.setattr("engine.route.tracker.SETTLE_SECONDS", 0.0)


@pytest.fixture(autouse=True)
def no_system_site_config(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """In-process commands find no site config of the machine running the tests: no
    ``$FIONA_CONFIG`` and no ``/etc/fiona/site.yaml`` (tests set either on purpose)."""
    monkeypatch.delenv("FIONA_CONFIG", raising=False)
    missing = tmp_path_factory.getbasetemp() / "no-etc-fiona" / "site.yaml"
    monkeypatch.setattr("engine.config.loader.SYSTEM_SITE_CONFIG", missing)


def need_peer(name: str) -> str:
    """dcmtk's ``name``; skips locally when missing, fails under CI (CI=true)."""
    try:
        return dcmtk(name)
    except PeerMissing as exc:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))


@pytest.fixture
def storescu() -> str:
    return need_peer("storescu")


@pytest.fixture
def echoscu() -> str:
    return need_peer("echoscu")


@pytest.fixture
def empty_projects(tmp_path: Path) -> Path:
    folder = tmp_path / "projects"
    folder.mkdir()
    return folder


@pytest.fixture
def fiona(tmp_path: Path, empty_projects: Path) -> Iterator[FionaServer]:
    """`fiona serve` on a free loopback port with a fresh data folder."""
    server = FionaServer(data_dir=tmp_path / "data", projects_dir=empty_projects).start()
    yield server
    server.stop()
