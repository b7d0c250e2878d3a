"""Optional TLS on the Storage SCP, exercised with dcmtk's TLS client and a throw-away key."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests import synth
from tests.conftest import need_peer
from tests.dbutil import connect_index
from tests.peers import REPO, FionaServer, nodelay_env
from tests.test_workflow import wait_for


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    openssl = need_peer_binary("openssl")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return key, cert


def need_peer_binary(name: str) -> str:
    import os
    import shutil

    found = shutil.which(name)
    if found:
        return found
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{name} is not installed")
    pytest.skip(f"{name} is not installed")


def _site(tmp_path: Path, key: Path, cert: Path, *, require_client_cert: bool = False) -> Path:
    """A site file with TLS on the SCP and a one-second heartbeat (DEBUG logging)."""
    site = tmp_path / "site.yaml"
    text = f"tls:\n  enabled: true\n  cert_file: {cert}\n  key_file: {key}\n"
    if require_client_cert:
        # The site's own (self-signed) certificate is the CA: the heartbeat presents it.
        text += f"  ca_file: {cert}\n  require_client_cert: true\n"
    site.write_text(text + "heartbeat:\n  interval_seconds: 1\nlog_level: DEBUG\n")
    return site


def assert_status_healthy(server: FionaServer, site: Path) -> None:
    """`fiona status` exits 0 once a heartbeat echoed our own TLS SCP, and the log holds no
    traceback (the echo used to fail with server_hostname='' every interval)."""

    def beat_recorded() -> bool:
        try:
            doc = json.loads((server.data_dir / "status.json").read_text())
        except (OSError, ValueError):
            return False
        return bool(doc.get("heartbeat", {}).get("echo"))

    wait_for("a heartbeat", beat_recorded, 60, server)
    args = [sys.executable, "-m", "engine.cli", "status", "--json", "--config", str(site)]
    args += ["--data", str(server.data_dir), "--projects", str(server.projects_dir)]
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=60)
    status = json.loads(done.stdout)
    assert done.returncode == 0, status.get("problems")
    assert status["heartbeat"]["echo_ok"] is True
    log = server.log_text()
    assert "Traceback" not in log and "server_hostname" not in log
    assert "heartbeat: C-ECHO to our own SCP answered" in log  # at DEBUG


def test_tls_association(
    tmp_path: Path, empty_projects: Path, tls_files: tuple[Path, Path]
) -> None:
    echoscu, storescu = need_peer("echoscu"), need_peer("storescu")
    key, cert = tls_files
    site = _site(tmp_path, key, cert)
    server = FionaServer(tmp_path / "data", empty_projects, config=site).start()
    tls = ["+tla", "+cf", str(cert)]
    target = ["-aec", "FIONA", "127.0.0.1", str(server.port)]
    try:
        ok = subprocess.run([echoscu, *tls, *target], capture_output=True, text=True, timeout=60)
        assert ok.returncode == 0, ok.stderr
        plain = subprocess.run([echoscu, *target], capture_output=True, text=True, timeout=60)
        assert plain.returncode != 0
        files = synth.write_study(
            synth.make_study(synth.make_study_spec(31), [synth.MR_SERIES["localizer"]]),
            tmp_path / "in",
        )
        sent = subprocess.run(
            [storescu, *tls, *target, *map(str, files)],
            capture_output=True,
            text=True,
            timeout=120,
            env=nodelay_env(),
        )
        assert sent.returncode == 0, sent.stderr
        with connect_index(server.data_dir / "index.sqlite") as db:
            assert db.execute("SELECT count(*) FROM instances").fetchone() == (len(files),)
        assert server.alive()
        assert_status_healthy(server, site)
    finally:
        server.stop()


def test_tls_heartbeat_presents_a_client_certificate_when_required(
    tmp_path: Path, empty_projects: Path, tls_files: tuple[Path, Path]
) -> None:
    echoscu = need_peer("echoscu")
    key, cert = tls_files
    site = _site(tmp_path, key, cert, require_client_cert=True)
    server = FionaServer(tmp_path / "data", empty_projects, config=site).start()
    target = ["-aec", "FIONA", "127.0.0.1", str(server.port)]
    try:
        # Without a client certificate a peer is refused: the SCP really requires one.
        anonymous = subprocess.run(
            [echoscu, "+tla", "+cf", str(cert), *target], capture_output=True, timeout=60
        )
        assert anonymous.returncode != 0
        assert_status_healthy(server, site)
    finally:
        server.stop()
