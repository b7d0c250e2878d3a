"""``fiona backup`` and ``fiona restore``: a machine lost and rebuilt from a backup folder.

The site is real: a site file, a project whose secret lives outside the data folder and one
that uses the per-install secret inside it (``{data_dir}/...``), an index
with pseudonyms written through the engine (and left open in WAL mode, as a running service
leaves it), the data folder's secrets and audit log.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import stat
from pathlib import Path

import pytest

from engine import __version__
from engine.cli import main
from engine.store.audit import AuditLog
from engine.store.index import SqliteIndex, latest_version, open_index
from engine.store.pseudonyms import PseudonymTable, reidentify
from tests.test_cli import old_index

pytestmark = pytest.mark.sqlite_only(
    "fiona backup copies a SQLite index; a PostgreSQL one is refused (test_index_engines.py)"
)


class Site:
    """A site config, a project with a secret outside the data folder, a populated data
    folder (index open, as the service keeps it), and the files a backup must hold."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.projects = root / "projects"
        self.keys = root / "keys"
        for folder in (self.projects, self.keys, self.data / "secrets"):
            folder.mkdir(parents=True)
        self.config = root / "etc" / "site.yaml"
        self.config.parent.mkdir()
        self.config.write_text(f"data_dir: {self.data}\nprojects_dir: {self.projects}\n")
        self.key = self.keys / "p.key"
        self.key.write_bytes(os.urandom(40))
        self.key.chmod(0o600)
        (self.projects / "p.yaml").write_text(
            "name: p\nrouting: {called_ae: [FIONA]}\npipeline:\n"
            "  - step: anonymize\n    secret_file: ../keys/p.key\n"
        )
        # The shipped example's way: the per-install secret, inside the data folder.
        (self.projects / "q.yaml").write_text(
            "name: q\nrouting: {called_ae: [FIONA]}\npipeline:\n"
            "  - step: anonymize\n    secret_file: '{data_dir}/secrets/install.key'\n"
        )
        (self.projects / "coupling.csv").write_text("accession,subject\n")
        install = self.data / "secrets" / "install.key"
        install.write_bytes(os.urandom(48))
        install.chmod(0o600)
        self.index: SqliteIndex = open_index("", self.data / "index.sqlite")
        self.pseudonym = PseudonymTable(self.index, "p").pseudonym_for("PATIENT-1")
        AuditLog(self.data).write("reidentified", project="p", reason="test")
        (self.data / "archive").mkdir()
        (self.data / "archive" / "x.dcm").write_bytes(b"not backed up")

    def files(self) -> dict[Path, bytes]:
        """What a restore must bring back, byte for byte (the index is compared by content)."""
        wanted = [self.config, self.key, self.projects / "p.yaml", self.projects / "q.yaml"]
        wanted += [self.projects / "coupling.csv"]
        wanted += [self.data / "secrets" / "install.key"]
        wanted += sorted((self.data / "audit").glob("*.jsonl"))
        return {p: p.read_bytes() for p in wanted}

    def lose_everything(self) -> None:
        self.index.close()
        for folder in (self.data, self.projects, self.keys, self.config.parent):
            shutil.rmtree(folder)


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path / "site")


def backup(site: Site, dest: Path) -> int:
    return main(["backup", "--config", str(site.config), str(dest)])


def test_backup_while_running_then_restore_on_a_bare_machine(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = tmp_path / "backup"
    files = site.files()
    assert backup(site, dest) == 0  # the index is open (WAL) in this process meanwhile
    assert "the archive is not included" in capsys.readouterr().out
    assert stat.S_IMODE(dest.stat().st_mode) == 0o700
    site.lose_everything()

    assert main(["restore", str(dest)]) == 0
    for path, content in files.items():
        assert path.read_bytes() == content, path
    assert stat.S_IMODE(site.key.stat().st_mode) == 0o600
    assert stat.S_IMODE((site.data / "secrets" / "install.key").stat().st_mode) == 0o600
    assert not (site.data / "archive").exists()
    index = open_index("", site.data / "index.sqlite", upgrade=False, read_only=True)
    try:
        assert reidentify(index, "p", site.pseudonym) == "PATIENT-1"  # the pseudonym table
    finally:
        index.close()


def test_the_manifest_holds_versions_time_and_checksums(site: Site, tmp_path: Path) -> None:
    dest = tmp_path / "backup"
    assert backup(site, dest) == 0
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["fiona_version"] == __version__
    assert manifest["schema_version"] == latest_version()
    assert manifest["created_at"].endswith("Z")
    roles = {f["role"] for f in manifest["files"]}
    assert roles == {"index", "data", "site", "project", "file"}
    for entry in manifest["files"]:
        content = (dest / entry["path"]).read_bytes()
        assert hashlib.sha256(content).hexdigest() == entry["sha256"]
        assert len(content) == entry["size"]
    originals = {f["original"] for f in manifest["files"]}
    assert str(site.key.resolve()) in originals
    assert not any("archive" in o for o in originals)


def test_the_index_copy_holds_what_is_only_in_the_wal(site: Site, tmp_path: Path) -> None:
    """A plain file copy of a live index misses commits still in its WAL file; the online
    backup API does not."""
    PseudonymTable(site.index, "p").pseudonym_for("PATIENT-2")
    assert (site.data / "index.sqlite-wal").stat().st_size > 0
    assert backup(site, tmp_path / "backup") == 0
    db = sqlite3.connect(tmp_path / "backup" / "data" / "index.sqlite")
    try:
        rows = db.execute("SELECT original FROM pseudonyms ORDER BY original").fetchall()
    finally:
        db.close()
    assert rows == [("PATIENT-1",), ("PATIENT-2",)]


def test_backup_refuses_a_folder_that_is_not_empty(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = tmp_path / "backup"
    dest.mkdir()
    (dest / "old").write_text("x")
    assert backup(site, dest) == 2
    assert f"{dest} is not empty" in capsys.readouterr().err


def test_restore_refuses_a_non_empty_data_folder_unless_forced(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = tmp_path / "backup"
    assert backup(site, dest) == 0
    PseudonymTable(site.index, "p").pseudonym_for("PATIENT-LATER")
    site.index.close()
    before = (site.data / "index.sqlite").read_bytes()
    capsys.readouterr()
    assert main(["restore", str(dest)]) == 2
    assert f"the data folder {site.data} is not empty" in capsys.readouterr().err
    assert (site.data / "index.sqlite").read_bytes() == before

    assert main(["restore", str(dest), "--force"]) == 0
    assert not (site.data / "index.sqlite-wal").exists()  # the old log must not replay
    index = open_index("", site.data / "index.sqlite", upgrade=False, read_only=True)
    try:
        with index.reading() as db:
            originals = [r[0] for r in db.execute("SELECT original FROM pseudonyms")]
    finally:
        index.close()
    assert originals == ["PATIENT-1"]


def test_restore_checks_the_checksums_before_writing_anything(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = tmp_path / "backup"
    assert backup(site, dest) == 0
    damaged = dest / "data" / "secrets" / "install.key"
    content = damaged.read_bytes()
    damaged.write_bytes(bytes([content[0] ^ 0xFF]) + content[1:])
    elsewhere = tmp_path / "new-data"
    assert main(["restore", str(dest), "--data", str(elsewhere)]) == 2
    err = capsys.readouterr().err
    assert f"{damaged}: differs from the manifest" in err
    assert not elsewhere.exists()


def test_restore_into_another_data_folder(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = tmp_path / "backup"
    assert backup(site, dest) == 0
    elsewhere = tmp_path / "new-data"
    assert main(["restore", str(dest), "--data", str(elsewhere)]) == 0
    assert (elsewhere / "index.sqlite").is_file()
    assert (elsewhere / "secrets" / "install.key").read_bytes() == (
        site.data / "secrets" / "install.key"
    ).read_bytes()
    assert f"data folder {elsewhere}" in capsys.readouterr().out


def test_restore_refuses_to_overwrite_a_config_file_that_differs(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = tmp_path / "backup"
    assert backup(site, dest) == 0
    site.key.write_bytes(os.urandom(40))  # a different secret now: new pseudonyms
    elsewhere = tmp_path / "new-data"
    assert main(["restore", str(dest), "--data", str(elsewhere)]) == 2
    assert str(site.key.resolve()) in capsys.readouterr().err
    assert not elsewhere.exists()


def test_restore_of_an_old_backup_says_to_upgrade(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = tmp_path / "backup"
    assert backup(site, dest) == 0
    site.lose_everything()
    index = dest / "data" / "index.sqlite"
    index.unlink()
    old_index(index)  # as an older fiona wrote it
    manifest = json.loads((dest / "manifest.json").read_text())
    for entry in manifest["files"]:
        if entry["role"] == "index":
            entry["sha256"] = hashlib.sha256(index.read_bytes()).hexdigest()
            entry["size"] = index.stat().st_size
    (dest / "manifest.json").write_text(json.dumps(manifest))
    assert main(["restore", str(dest)]) == 0
    assert "run fiona db upgrade" in capsys.readouterr().out
    assert main(["db", "upgrade", "--data", str(site.data)]) == 0
    assert main(["db", "status", "--data", str(site.data)]) == 0


def test_a_folder_without_manifest_is_not_a_backup(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "b").mkdir()
    assert main(["restore", str(tmp_path / "b"), "--data", str(tmp_path / "d")]) == 2
    assert "is not a fiona backup (no manifest.json)" in capsys.readouterr().err


def test_a_file_the_config_names_but_cannot_be_read_stops_before_anything_is_written(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site.key.unlink()
    dest = tmp_path / "backup"
    assert backup(site, dest) == 2
    assert "keys/p.key (named in the config) cannot be read" in capsys.readouterr().err
    assert not dest.exists()  # a second try after fixing it is not refused as "not empty"
