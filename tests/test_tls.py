"""Optional TLS on the Storage SCP, exercised with dcmtk's TLS client and a throw-away key."""

from __future__ import annotations

import sqlite3
import subprocess
from pathlib import Path

import pytest

from tests import synth
from tests.conftest import need_peer
from tests.peers import FionaServer, nodelay_env


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


def test_tls_association(
    tmp_path: Path, empty_projects: Path, tls_files: tuple[Path, Path]
) -> None:
    echoscu, storescu = need_peer("echoscu"), need_peer("storescu")
    key, cert = tls_files
    site = tmp_path / "site.yaml"
    site.write_text(f"tls:\n  enabled: true\n  cert_file: {cert}\n  key_file: {key}\n")
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
        with sqlite3.connect(server.data_dir / "index.sqlite") as db:
            assert db.execute("SELECT count(*) FROM instances").fetchone() == (len(files),)
        assert server.alive()
    finally:
        server.stop()
