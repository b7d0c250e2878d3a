"""A first install, as the README's first command runs it, never exports PHI.

`bash scripts/serve.sh` runs `fiona serve` with no arguments in the repository: the shipped
`projects/` folder, data in `./var`, the embedded site defaults. Here the same command runs in a
fresh folder holding a copy of the repository's `projects/` (only the example's quiet time is
shortened, so the test need not wait five minutes, and a free port replaces 11112), dcmtk's
`storescu` sends synthetic studies with planted (fake) PHI, and every byte under the data
folder's exports is searched for every identifying value that was sent.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from tests import synth
from tests.dbutil import connect_index
from tests.deid_phi import PLANTED, plant
from tests.peers import REPO, free_port, nodelay_env, wait_for_port
from tests.test_workflow import wait_for

SERVE = [sys.executable, "-m", "engine.cli", "serve"]


@dataclass
class FirstInstall:
    """`fiona serve` started the way scripts/serve.sh starts it, in ``root``."""

    root: Path
    port: int
    web_port: int
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def data(self) -> Path:
        return self.root / "var"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def first_install(tmp_path: Path) -> Iterator[FirstInstall]:
    root = tmp_path / "install"
    shutil.copytree(REPO / "projects", root / "projects")
    example = root / "projects" / "example.yaml"
    text = example.read_text()
    assert "study_quiet_seconds: 300" in text
    example.write_text(text.replace("study_quiet_seconds: 300", "study_quiet_seconds: 2"))
    port, web_port = free_port(), free_port()
    log_path = tmp_path / "serve.log"
    # No --config, --data, --projects, --bind or --ae-title: the defaults of `fiona serve`
    # (the ports are free ones, so that the test never meets another service on 11112/8080).
    # PYTHONPATH: the engine of this checkout, although the command runs in another folder.
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*SERVE, "--port", str(port), "--web-port", str(web_port)],
            cwd=root,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    install = FirstInstall(root, port, web_port, proc, log_path)
    try:
        wait_for_port(port, 60, proc)
        yield install
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _studies(tmp: Path) -> tuple[list[Path], list[bytes]]:
    """Two studies (files written under ``tmp``) and every identifying value they carry: one
    with the planted PHI of tests/deid_phi.py in every instance, one plain synthetic study."""
    mr = synth.MR_SERIES
    planted_spec, plain_spec = synth.make_study_spec(3), synth.make_study_spec(11)
    planted = [
        plant(ds)
        for ds in synth.make_study(planted_spec, [mr["localizer"], mr["t1_mprage"]], size=8)
    ]
    plain = synth.make_study(plain_spec, [mr["t2_tse"]], size=8)
    files = synth.write_study(planted, tmp / "planted") + synth.write_study(plain, tmp / "plain")
    values = {str(v) for v in PLANTED.values()}
    for spec in (planted_spec, plain_spec):
        values |= {
            spec.patient_name,
            spec.patient_name.split("^")[0] + "^",  # the family name as a name component
            spec.patient_id,
            spec.birth_date,
            spec.accession_number,
            spec.study_date,
            spec.referring_physician,
            spec.station_name,
            spec.device_serial_number,
            spec.institution_name,
            spec.institution_address,
            spec.operators_name,
            spec.performing_physician,
        }
    values |= set(_uids(planted + plain))
    return files, sorted(v.encode() for v in values)


def _uids(datasets: list[Dataset]) -> Iterator[str]:
    for ds in datasets:
        yield from (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)


def _runs(data: Path) -> list[tuple[str, str]]:
    try:
        with connect_index(data / "index.sqlite") as db:
            return db.execute("SELECT state, reason FROM pipeline_runs").fetchall()
    except sqlite3.Error:
        return []


def test_first_install_exports_no_phi(
    first_install: FirstInstall, storescu: str, tmp_path: Path
) -> None:
    install = first_install
    files, phi = _studies(tmp_path / "send")
    sent = subprocess.run(
        [storescu, "-aec", "FIONA", "127.0.0.1", str(install.port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=300,
        env=nodelay_env(),
    )
    assert sent.returncode == 0, sent.stderr

    def both_runs_finished() -> bool:
        runs = _runs(install.data)
        return len(runs) == 2 and all(state in ("done", "quarantined") for state, _ in runs)

    wait_for("both studies' pipeline runs", both_runs_finished, 180, install)  # type: ignore[arg-type]
    assert [state for state, _ in _runs(install.data)] == ["done", "done"], _runs(install.data)

    exports = install.data / "export"
    exported = [p for p in exports.rglob("*") if p.is_file()]
    assert len([p for p in exported if p.suffix == ".dcm"]) >= 2, install.log_text()
    found = {
        (str(p.relative_to(exports)), value.decode())
        for p in exported
        for value in phi
        if value in p.read_bytes()
    }
    assert not found, f"PHI in the exports: {sorted({value for _, value in found})}"

    # The secret the example de-identifies with: created at start, 0600, its path logged.
    secret = install.data / "secrets" / "install.key"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert len(secret.read_bytes().strip()) >= 32
    assert re.search(r"INFO .*created the install secret .*install\.key", install.log_text())
    # Listening on loopback only by default.
    assert re.search(r"on 127\.0\.0\.1:\d+", install.log_text())
    # The web portal is part of the default start, on loopback too, and asks for a login.
    assert f"web portal on http://127.0.0.1:{install.web_port}/" in install.log_text()
    portal = f"http://127.0.0.1:{install.web_port}/"
    with urllib.request.urlopen(portal, timeout=10) as page:
        assert "/login" in page.url and b"password" in page.read().lower()
    # A first start creates the index; nothing was upgraded.
    created = r"INFO .*index \S+ created \(schema version \d+\)"
    assert re.search(created, install.log_text())
    assert "upgraded from schema version" not in install.log_text()


def test_install_secret_is_created_once_and_never_overwritten(tmp_path: Path) -> None:
    from engine.deid.keys import load_secret
    from engine.store.secrets import ensure_install_secret

    path, created = ensure_install_secret(tmp_path / "data")
    assert created and path == tmp_path / "data" / "secrets" / "install.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    first = load_secret(path)
    assert len(first) >= 32
    again, created_again = ensure_install_secret(tmp_path / "data")
    assert again == path and not created_again and load_secret(path) == first
    assert [p.name for p in path.parent.iterdir()] == ["install.key"]  # no temp file left


def test_a_data_folder_secret_reference_must_be_well_formed(tmp_path: Path) -> None:
    from engine.deid.keys import SecretError, secret_in_data_dir
    from engine.pipeline.steps.anonymize import AnonymizeStep

    assert secret_in_data_dir("{data_dir}/secrets/install.key") == Path("secrets/install.key")
    assert secret_in_data_dir("keys/project.key") is None
    for bad in ("x/{data_dir}/k", "{data_dir}/../k", "{data_dir}/", "{data_dir}/{data_dir}/k"):
        with pytest.raises(SecretError, match="must start the path"):
            secret_in_data_dir(bad)
    options = {"step": "anonymize", "secret_file": "{data_dir}/../outside.key"}
    issues = AnonymizeStep.check(options, tmp_path / "p.yaml", ("pipeline", 0))
    assert [i.path for i in issues] == ["pipeline[0].secret_file"], issues


def test_a_lost_secret_beside_an_index_is_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from engine.config.model import SiteConfig
    from engine.daemon import prepare_install_secret

    site = SiteConfig(data_dir=tmp_path / "data")
    assert prepare_install_secret(site)  # a first start: no warning
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    (site.data_dir / "index.sqlite").touch()
    (site.data_dir / "secrets" / "install.key").unlink()
    caplog.clear()
    assert prepare_install_secret(site)
    assert any("restore it from the backup" in r.getMessage() for r in caplog.records)
    os.chmod(site.data_dir / "secrets" / "install.key", 0o644)
    assert not prepare_install_secret(site)  # readable by everyone: refused, not used
