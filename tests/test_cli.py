"""The command line as a user meets it: help, pipes, missing and old indexes, db status and
upgrade, and start-up refusals that must be one message, not a traceback.

Commands run in-process through ``engine.cli.main`` (output from ``capsys``), or as
``python -m engine.cli`` subprocesses where the process itself is what is tested (a closed
pipe, a user without write access, ``fiona serve``).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.cli import main
from engine.store.index import latest_version, migrations, open_index
from tests.peers import FionaServer, free_port

REPO = Path(__file__).resolve().parents[1]
#: The schema version an "old" index is left at (two migrations behind this code).
OLD = 6


def old_index(path: Path, version: int = OLD) -> Path:
    """An index as an older fiona left it: migrations up to ``version`` only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path)
    for migration in migrations():
        if migration.version <= version:
            db.executescript(migration.sql)
    db.execute(f"PRAGMA user_version={version}")
    db.commit()
    db.close()
    return path


def user_version(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return int(db.execute("PRAGMA user_version").fetchone()[0])
    finally:
        db.close()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fiona(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        check=False,
        **kw,  # type: ignore[call-overload]
    )


# --------------------------------------------------------------------------- help and pipes


def test_top_level_help_is_written_for_users(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "fiona receives DICOM images" in out
    assert "common commands:" in out
    for command in ("fiona serve", "fiona status", "fiona backup DEST", "fiona db status"):
        assert command in out
    assert "FIONA_CONFIG" in out and "/etc/fiona/site.yaml" in out
    assert "thin shell" not in out and "imports its implementation lazily" not in out


def test_output_cut_short_by_head_ends_quietly(tmp_path: Path) -> None:
    data = tmp_path / "data"
    open_index("", data / "index.sqlite").close()
    (data / "audit").mkdir(parents=True)
    entry = {"at": "2026-01-01T00:00:00Z", "event": "received", "study": "t" * 16}
    lines = "".join(json.dumps({**entry, "n": n}) + "\n" for n in range(20000))
    (data / "audit" / "audit-202601.jsonl").write_text(lines)
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "audit", "--data", str(data)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()  # what `head -1` does: one line, then close
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141
    assert b"received" in first
    assert err == ""  # no BrokenPipeError traceback, no "Exception ignored" either


def test_reidentify_says_what_is_wrong_with_a_short_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["reidentify", "--data", str(tmp_path), "--project", "p", "--reason", " ok ", "X"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--reason 'ok' is too short (2 characters, at least 5)" in err
    assert "ticket or approval number" in err


# --------------------------------------------------------------------------- no index


@pytest.mark.parametrize(
    "command",
    [
        ["status"],
        ["status", "--json"],
        ["quarantine", "list"],
        ["quarantine", "show", "abcdef"],
        ["quarantine", "release", "abcdef", "--yes"],
        ["transfers", "list"],
        ["transfers", "show", "1"],
        ["transfers", "retry", "1"],
        ["audit"],
        ["reidentify", "--project", "p", "--reason", "TICKET-1", "SUBJ0001"],
        ["db", "status"],
        ["db", "upgrade"],
        ["explain", "1.2.3.4"],
    ],
)
@pytest.mark.sqlite_only("a data folder without an index file")
def test_commands_on_a_folder_without_index_say_so_and_create_none(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    data = tmp_path / "typo"
    assert main([*command, "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert f"no fiona index in {data}: wrong --data, or nothing received yet" in err
    assert not data.exists()


# --------------------------------------------------------------------------- old indexes


@pytest.fixture
def old(tmp_path: Path) -> Iterator[Path]:
    """A data folder whose index is two migrations behind."""
    path = old_index(tmp_path / "data" / "index.sqlite")
    yield path.parent


@pytest.mark.parametrize(
    "command",
    [
        ["status"],
        ["quarantine", "list"],
        ["quarantine", "show", "abcdef"],
        ["transfers", "list"],
        ["transfers", "show", "1"],
        ["transfers", "cancel", "1"],
        ["explain", "1.2.3.4"],
        ["reidentify", "--project", "p", "--reason", "TICKET-1", "SUBJ0001"],
    ],
)
@pytest.mark.sqlite_only("an old SQLite index file, byte for byte")
def test_commands_never_migrate_an_old_index(
    old: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    before = digest(old / "index.sqlite")
    assert main([*command, "--data", str(old)]) == 2
    err = capsys.readouterr().err
    assert f"is at schema version {OLD}, this fiona needs {latest_version()}" in err
    assert "run fiona db upgrade" in err
    assert user_version(old / "index.sqlite") == OLD
    assert digest(old / "index.sqlite") == before


@pytest.mark.sqlite_only("an old SQLite index file (PostgreSQL: tests/test_index_engines.py)")
def test_db_status_reports_pending_migrations_and_upgrade_applies_them(
    old: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pending = [m.name for m in migrations() if m.version > OLD]
    assert main(["db", "status", "--data", str(old)]) == 1
    out = capsys.readouterr().out
    assert f"schema version: {OLD} (this fiona: {latest_version()})" in out
    assert f"pending migrations: {', '.join(pending)}" in out
    assert user_version(old / "index.sqlite") == OLD  # status only looks

    assert main(["db", "upgrade", "--data", str(old)]) == 0
    out = capsys.readouterr().out
    assert f"upgraded from schema version {OLD} to {latest_version()}" in out
    assert user_version(old / "index.sqlite") == latest_version()

    assert main(["db", "status", "--data", str(old), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert (status["schema_version"], status["pending"]) == (latest_version(), [])
    assert main(["db", "upgrade", "--data", str(old)]) == 0
    assert "is up to date" in capsys.readouterr().out
    assert main(["quarantine", "list", "--data", str(old)]) == 0  # usable now


@pytest.mark.sqlite_only("a SQLite index file at schema version 1")
def test_an_index_from_the_first_version_upgrades_with_its_records(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = old_index(tmp_path / "data" / "index.sqlite", 1)
    db = sqlite3.connect(path)
    db.execute("INSERT INTO patients(id, patient_id) VALUES (1, 'P1')")
    db.execute(
        "INSERT INTO studies(study_uid, patient_ref, first_received_at, last_received_at)"
        " VALUES ('1.2.3', 1, 0, 0)"
    )
    db.commit()
    db.close()
    assert main(["db", "upgrade", "--data", str(path.parent)]) == 0
    assert f"from schema version 1 to {latest_version()}" in capsys.readouterr().out
    db = sqlite3.connect(path)
    try:
        assert db.execute("SELECT study_uid FROM studies").fetchall() == [("1.2.3",)]
    finally:
        db.close()
    assert main(["transfers", "list", "--data", str(path.parent)]) == 0


@pytest.mark.sqlite_only("a damaged SQLite file")
@pytest.mark.parametrize("command", [["status"], ["transfers", "retry", "1"], ["db", "upgrade"]])
def test_a_damaged_index_is_one_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    (tmp_path / "index.sqlite").write_bytes(b"not a database, but long enough " * 100)
    assert main([*command, "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert (
        f"fiona: cannot open the index {tmp_path / 'index.sqlite'}: file is not a database" in err
    )


@pytest.mark.sqlite_only("SQLite's user_version")
def test_an_index_newer_than_the_code_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = old_index(tmp_path / "data" / "index.sqlite", latest_version())
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version={latest_version() + 1}")
    db.commit()
    db.close()
    for command in (["status"], ["db", "upgrade"], ["db", "status"]):
        assert main([*command, "--data", str(path.parent)]) == 2
        shown = capsys.readouterr()
        assert "newer than this fiona" in shown.out + shown.err
    assert user_version(path) == latest_version() + 1


@pytest.mark.sqlite_only("an old SQLite index file")
def test_serve_upgrades_an_old_index_at_start_with_a_log_line(
    old: Path, empty_projects: Path
) -> None:
    server = FionaServer(data_dir=old, projects_dir=empty_projects).start()
    try:
        assert user_version(old / "index.sqlite") == latest_version()
        deadline = time.monotonic() + 30  # let the first heartbeat finish before stopping
        while not (old / "status.json").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        assert server.stop() == 0
    expected = f"upgraded from schema version {OLD} to {latest_version()}"
    assert expected in server.log_text()


# --------------------------------------------------------------------------- start-up refusals


def test_serve_refuses_a_read_only_data_folder_with_one_message(tmp_path: Path) -> None:
    """A data folder the service cannot write: exit 2 and one line, before the port opens.
    Root writes through file modes, so as root the folder is made immutable (chattr +i)."""
    data = tmp_path / "data"
    data.mkdir()
    open_index("", data / "index.sqlite").close()
    (tmp_path / "projects").mkdir()
    root = os.geteuid() == 0
    if root:
        subprocess.run(["chattr", "+i", str(data)], check=True)
    else:
        data.chmod(0o555)
    try:
        args = ["serve", "--data", str(data), "--projects", str(tmp_path / "projects")]
        done = fiona(*args, "--port", str(free_port()), "--bind", "127.0.0.1")
    finally:
        if root:
            subprocess.run(["chattr", "-i", str(data)], check=True)
        else:
            data.chmod(0o755)
    assert done.returncode == 2, done.stderr
    why = "Operation not permitted" if root else "Permission denied"
    assert f"fiona: cannot write the data folder {data} ({why})" in done.stderr
    assert "Traceback" not in done.stderr
