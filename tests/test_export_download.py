"""Downloads: ``GET /api/v1/studies/{uid}/export`` streams a project's export as a zip.

A real ``fiona serve`` with its web API: dcmtk ``storescu`` sends a synthetic MR study, the
project classifies, de-identifies and converts it to BIDS; coordinators download it with their
tokens (``fiona user token``). The unzipped BIDS dataset is checked by the real BIDS validator.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import yaml

from engine.store.audit import AuditLog
from tests import synth
from tests.conftest import need_peer
from tests.dbutil import connect_index
from tests.peers import REPO, FionaServer, free_port, nodelay_env, wait_for_port
from tests.test_convert import _validate, _validator
from tests.test_ldap import Client
from tests.test_web import PASSWORD, _wait


def _fiona(root: Path, *argv: str) -> str:
    where = ["--config", str(root / "site.yaml"), "--data", str(root / "data"),
             "--projects", str(root / "projects")]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "engine.cli", *argv, *where],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _get(port: int, path: str, token: str) -> tuple[int, bytes, dict[str, str]]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, answer.read(), dict(answer.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def _runs_done(data: Path) -> bool:
    with connect_index(data / "index.sqlite") as db:
        states = [r[0] for r in db.execute("SELECT state FROM pipeline_runs")]
    return states == ["done"]


def test_a_coordinator_downloads_the_bids_and_dicom_export_of_a_granted_study(
    tmp_path: Path,
) -> None:
    storescu = need_peer("storescu")
    _validator()
    projects = tmp_path / "projects"
    projects.mkdir()
    key = projects / "p.key"
    key.write_bytes(os.urandom(40))
    os.chmod(key, 0o600)
    pipeline = [
        {"step": "classify"},
        {"step": "anonymize", "secret_file": "p.key", "pseudonyms": {"prefix": "NEU"}},
        {"step": "convert", "format": "bids"},
    ]
    for name, aet in (("neuro", "MR1"), ("other", "MR2")):
        doc = {"name": name, "routing": {"calling_ae": [aet]},
               "completeness": {"study_quiet_seconds": 1}, "pipeline": pipeline}  # fmt: skip
        (projects / f"{name}.yaml").write_text(yaml.safe_dump(doc))
    port = free_port()
    (tmp_path / "site.yaml").write_text(yaml.safe_dump(
        {"scan_interval_seconds": 0.5, "web": {"enabled": True, "port": port}}
    ))  # fmt: skip
    server = FionaServer(tmp_path / "data", projects, config=tmp_path / "site.yaml",
                         web_port=None).start()  # fmt: skip
    try:
        wait_for_port(port, 30, server.proc)
        (tmp_path / "pw.txt").write_text(PASSWORD + "\n")
        tokens = {}
        for user, project in (("coord_a", "neuro"), ("coord_b", "other")):
            _fiona(tmp_path, "user", "add", user, "--role", "coordinator", "--project", project,
                   "--password-file", str(tmp_path / "pw.txt"))  # fmt: skip
            tokens[user] = _fiona(tmp_path, "user", "token", user, "--label", "tests")
        spec = synth.make_study_spec(61)
        sent = synth.make_study(spec, [synth.MR_SERIES["t1_mprage"], synth.MR_SERIES["bold"]],
                                size=16)  # fmt: skip
        files = synth.write_study(sent, tmp_path / "send")
        result = subprocess.run(
            [storescu, "-aet", "MR1", "-aec", "FIONA", "127.0.0.1", str(server.port),
             *map(str, files)],
            capture_output=True, text=True, timeout=300, env=nodelay_env(),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        _wait("the pipeline run", lambda: _runs_done(tmp_path / "data"))
        uid = str(sent[0].StudyInstanceUID)
        base = f"/api/v1/studies/{uid}/export"

        status, body, headers = _get(port, f"{base}?project=neuro&format=bids", tokens["coord_a"])
        assert status == 200, body
        assert headers["content-type"] == "application/zip"
        assert uid not in headers["content-disposition"]  # the study's token, not its UID
        with zipfile.ZipFile(io.BytesIO(body)) as opened:
            names = opened.namelist()
            opened.extractall(tmp_path / "unzipped")
        assert "neuro-bids/sub-NEU0001/ses-1/func/sub-NEU0001_ses-1_task-rest_bold.nii.gz" in names
        assert _validate(tmp_path / "unzipped" / "neuro-bids")["issues"]["errors"] == []

        status, body, _ = _get(port, f"{base}?project=neuro&format=dicom", tokens["coord_a"])
        assert status == 200
        with zipfile.ZipFile(io.BytesIO(body)) as opened:
            members = [opened.read(n) for n in opened.namelist()]
        assert len(members) == len(files)
        assert not [m for m in members if spec.patient_id.encode() in m or uid.encode() in m]

        # The portal: the study page links the downloads, a session downloads the same zip.
        browser = Client(port)
        assert browser.login("coord_a", PASSWORD)[0] == 303
        status, page = browser.go(f"/studies/{uid}")
        assert status == 200 and f"/studies/{uid}/export?project=neuro&amp;format=dicom" in page
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("GET", f"/studies/{uid}/export?project=neuro&format=dicom",
                     headers={"Cookie": browser.cookie})  # fmt: skip
        answer = conn.getresponse()
        zipped = answer.read()
        conn.close()
        assert answer.status == 200 and answer.getheader("Content-Type") == "application/zip"
        with zipfile.ZipFile(io.BytesIO(zipped)) as opened:
            assert len(opened.namelist()) == len(files)
        assert browser.go(f"/studies/{uid}/export?project=other&format=dicom")[0] == 403

        status, body, _ = _get(port, f"{base}?project=neuro&format=bids", tokens["coord_b"])
        assert status == 403, body
        status, body, _ = _get(port, f"{base}?project=neuro&format=nifti", tokens["coord_a"])
        assert status == 404 and b"convert with format nifti" in body, body
        status, body, _ = _get(port, f"{base}?project=neuro&format=jpeg", tokens["coord_a"])
        assert status == 400, body
    finally:
        server.stop()
    exported = [e for e in AuditLog(tmp_path / "data").entries() if e.get("event") == "exported"]
    assert [(e["format"], e["operator"]) for e in exported] == [
        ("bids", "web:coord_a"), ("dicom", "web:coord_a"), ("dicom", "web:coord_a"),
    ]  # fmt: skip
    assert not [e for e in exported if uid in json.dumps(e)]
