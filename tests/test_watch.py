"""The service watching itself: heartbeat, status file, `fiona status`, the web page, retention.

End to end with a real `fiona serve` and dcmtk `storescu` (synthetic studies); the heartbeat's
dead-SCP case and the disk watermark are driven directly (a port nothing listens on; a free-space
function instead of filling the disk).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from engine.config.loader import load_site
from engine.manage.heartbeat import beat, write_status_file
from engine.manage.retention import evict, expire, finished_studies
from engine.store.archive import Archive
from engine.store.audit import AuditLog, uid_token
from engine.store.index import Origin, SqliteIndex, open_index
from tests import synth
from tests.dbutil import connect_index
from tests.peers import REPO, FionaServer, free_port
from tests.test_receive import store
from tests.test_workflow import wait_for

MR = [synth.MR_SERIES["t1_mprage"]]


def _study(tmp: Path, seed: int) -> list[Path]:
    spec = synth.make_study_spec(seed)
    return synth.write_study(synth.make_study(spec, MR, size=16), tmp / f"study{seed}")


def _fiona_status(data: Path, projects: Path, config: Path | None = None) -> tuple[int, Any]:
    """`fiona status --json` as a subprocess: (exit status, parsed JSON)."""
    args = [sys.executable, "-m", "engine.cli", "status", "--json", "--data", str(data)]
    args += ["--projects", str(projects)]
    if config is not None:
        args += ["--config", str(config)]
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, json.loads(done.stdout)


def _get(port: int, path: str) -> tuple[str, bytes]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return response.headers["Content-Type"], response.read()


# --------------------------------------------------------------------------- heartbeat


def test_heartbeat_records_a_dead_scp_and_status_exits_1(tmp_path: Path) -> None:
    data, projects = tmp_path / "data", tmp_path / "projects"
    projects.mkdir()
    data.mkdir()
    site = load_site(
        None, {"data_dir": str(data), "port": free_port(), "bind_address": "127.0.0.1"}
    )
    index = open_index("", data / "index.sqlite")
    try:
        report = beat(site, index)  # nothing listens on the port
        write_status_file(data, report, [{"id": "heartbeat", "name": "x", "next_run_time": None}])
        rows = index_rows(data, "SELECT echo_ok, echo_detail FROM heartbeats")
    finally:
        index.close()
    assert report["echo"]["ok"] is False and report["echo"]["detail"]
    assert rows[0][0] == 0 and rows[0][1]
    assert report["disk"]["total_bytes"] > 0 and 0 <= report["disk"]["free_percent"] <= 100
    code, status = _fiona_status(data, projects)
    assert code == 1
    assert not status["healthy"]
    assert status["heartbeat"]["echo_ok"] is False
    assert any("C-ECHO failed" in p for p in status["problems"])


def test_heartbeat_keeps_the_last_n_rows(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    site = load_site(None, {"data_dir": str(data), "port": free_port()})
    site = type(site)(**{**site.__dict__, "heartbeat": type(site.heartbeat)(keep=3)})
    index = open_index("", data / "index.sqlite")
    from engine.manage.heartbeat import EchoResult

    try:
        for _ in range(5):
            beat(site, index, echo=EchoResult(True, "", 0.0))
        assert len(index_rows(data, "SELECT id FROM heartbeats")) == 3
    finally:
        index.close()


def index_rows(data: Path, sql: str, *args: object) -> list[tuple[Any, ...]]:
    with connect_index(data / "index.sqlite") as db:
        return db.execute(sql, args).fetchall()


# --------------------------------------------------------------------------- a running site


@dataclass
class Site:
    tmp: Path
    server: FionaServer
    config: Path
    http_port: int
    out: Path

    @property
    def data(self) -> Path:
        return self.server.data_dir

    def status_file(self) -> dict[str, Any]:
        try:
            doc: dict[str, Any] = json.loads((self.data / "status.json").read_text())
        except (OSError, ValueError):
            return {}
        return doc


def _project(folder: Path, name: str, aet: str, destination: dict[str, Any], keep: float) -> None:
    key = folder / f"{name}.key"
    key.write_bytes(os.urandom(48))
    os.chmod(key, 0o600)
    doc = {
        "name": name,
        "routing": {"calling_ae": [aet]},
        "completeness": {"study_quiet_seconds": 1},
        "retention": {"keep_days": keep},
        "destinations": {"out": {**destination, "retry": {"backoff_seconds": 30}}},
        "pipeline": [
            {"step": "anonymize", "secret_file": key.name},
            {"step": "send", "to": ["out"]},
        ],
    }
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    projects = tmp_path / "projects"
    projects.mkdir()
    out = tmp_path / "research-share"
    out.mkdir()
    # 'sent' delivers to a folder; 'stuck' to a DICOM peer nobody runs (stays queued).
    _project(projects, "sent", "SCANNER_A", {"type": "folder", "path": str(out)}, 0)
    dead = {"type": "dicom", "host": "127.0.0.1", "port": free_port(), "ae_title": "NOBODY"}
    _project(projects, "stuck", "SCANNER_B", dead, 0)
    http_port = free_port()
    config = tmp_path / "site.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "scan_interval_seconds": 0.5,
                "heartbeat": {"interval_seconds": 1},
                "retention": {"interval_seconds": 1, "min_free_percent": 0},
                "web": {"enabled": True, "port": http_port},
            }
        )
    )
    server = FionaServer(
        data_dir=tmp_path / "data", projects_dir=projects, config=config, web_port=None
    )
    server.start()
    yield Site(tmp_path, server, config, http_port, out)
    server.stop()


def test_serve_heartbeat_status_file_and_web_page(
    site: Site, storescu: str, tmp_path: Path
) -> None:
    server = site.server
    wait_for("the first status file", lambda: bool(site.status_file()), 30, server)
    jobs = {j["id"]: j for j in site.status_file()["jobs"]}
    assert {"heartbeat", "retention", "workflow", "outbox"} <= set(jobs)
    assert all(j["next_run_time"] and j["name"] for j in jobs.values())

    assert store(storescu, server, _study(tmp_path, 1), aet="SCANNER_B").returncode == 0

    def received() -> bool:
        projects = site.status_file().get("heartbeat", {}).get("projects", {})
        return bool(projects.get("stuck", {}).get("last_receipt"))

    wait_for("a heartbeat naming the last receipt", received, 60, server)
    code, status = _fiona_status(site.data, server.projects_dir, site.config)
    assert code == 0, status["problems"]
    assert status["healthy"] and status["service"]["running"]
    assert status["heartbeat"]["echo_ok"] is True
    assert status["projects"]["stuck"]["last_receipt"]
    assert status["projects"]["stuck"]["received"] == 1
    assert set(status["outbox"]["by_state"]) == {"queued", "sending", "done", "failed", "cancelled"}
    assert {j["id"] for j in status["service"]["jobs"]} >= {"heartbeat", "retention"}
    # No PHI in what the status shows.
    text = json.dumps(status)
    assert "SYNPID" not in text and "SYNTH" not in text and "1.2." not in text

    kind, body = _get(site.http_port, "/status.json")
    assert kind == "application/json"
    assert json.loads(body)["projects"]["stuck"]["received"] == 1
    kind, page = _get(site.http_port, "/metrics")  # no login, as Prometheus scrapes it
    assert kind.startswith("text/plain") and b'project="stuck"' in page

    server.stop()
    code, status = _fiona_status(site.data, server.projects_dir, site.config)
    assert code == 1 and not status["service"]["running"]
    assert any("service not running" in p for p in status["problems"])


def test_retention_deletes_the_sent_study_never_the_unsent(
    site: Site, storescu: str, tmp_path: Path
) -> None:
    server, data = site.server, site.data
    sent = _study(tmp_path, 2)
    unsent = _study(tmp_path, 3)
    assert store(storescu, server, sent, aet="SCANNER_A").returncode == 0
    assert store(storescu, server, unsent, aet="SCANNER_B").returncode == 0
    sent_uid = synth.study_uid(synth.make_study_spec(2))
    unsent_uid = synth.study_uid(synth.make_study_spec(3))

    def deleted() -> bool:
        rows = index_rows(data, "SELECT deleted_at FROM studies WHERE study_uid=?", sent_uid)
        return bool(rows and rows[0][0])

    wait_for("the sent study to be deleted", deleted, 90, server)
    assert not (data / "archive" / sent_uid).exists()
    assert not (data / "raw" / sent_uid).is_symlink()
    assert not any(p.name.startswith("SYNPID00000002") for p in (data / "participants").iterdir())
    assert not list((data / "work" / "sent").glob("run-*"))
    assert any(site.out.rglob("*.dcm"))  # delivered before it went
    assert index_rows(data, "SELECT count(*) FROM instances")[0][0] == 2 * MR[0].n_instances
    entries = [e for e in AuditLog(data).entries() if e["event"] == "deleted"]
    assert entries == [
        {**entries[0], "study": uid_token(sent_uid), "reason": "age", "projects": ["sent"]}
    ]
    # The unsent study, keep_days 0 and its transfer queued to a dead peer, stays.
    time.sleep(2.5)  # two more retention runs
    assert index_rows(data, "SELECT state FROM transfers WHERE project='stuck'") == [("queued",)]
    assert (data / "archive" / unsent_uid).is_dir()
    assert (data / "raw" / unsent_uid).is_symlink()
    assert index_rows(data, "SELECT deleted_at FROM studies WHERE study_uid=?", unsent_uid) == [
        (None,)
    ]
    assert unsent_uid not in json.dumps(AuditLog(data).entries())


# --------------------------------------------------------------------------- watermark


def _archived(tmp: Path, archive: Archive, seed: int) -> str:
    """Archive a synthetic study as if received; its UID."""
    for path in _study(tmp, seed):
        assert archive.receive(path.read_bytes(), Origin("ingest")).action == "stored"
    return synth.study_uid(synth.make_study_spec(seed))


def _finish(index: SqliteIndex, uid: str, project: str, at: float, transfer: str) -> None:
    """Route ``uid`` to ``project``, run its pipeline and record one transfer in ``transfer``."""
    with index.transaction() as db:
        newest = db.execute(
            "SELECT max(i.id) FROM instances i JOIN series se ON se.id = i.series_ref"
            " JOIN studies st ON st.id = se.study_ref WHERE st.study_uid=?",
            (uid,),
        ).fetchone()[0]
        db.execute(
            "INSERT INTO study_routes(study_uid, project, state, opened_at, runs, done_upto)"
            " VALUES (?,?,'complete',?,1,?)",
            (uid, project, at, newest),
        )
        db.execute(
            "INSERT INTO pipeline_runs(study_uid, project, state, created_at, updated_at)"
            " VALUES (?,?,'done',?,?)",
            (uid, project, at, at),
        )
        db.execute(
            "INSERT INTO transfers(project, destination, study_uid, export_uid, state,"
            " next_try_at, created_at, updated_at, finished_at) VALUES (?,?,?,?,?,?,?,?,?)",
            (
                project,
                "out",
                uid,
                "2.25.1",
                transfer,
                at,
                at,
                at,
                at if transfer == "done" else None,
            ),
        )
        db.execute("UPDATE studies SET last_received_at=? WHERE study_uid=?", (at, uid))


@pytest.fixture
def four_sent_one_unsent(tmp_path: Path) -> Iterator[tuple[SqliteIndex, Path, list[str], str]]:
    data = tmp_path / "data"
    index = open_index("", data / "index.sqlite")
    archive = Archive(data, index)
    now = time.time()
    # Sent oldest first: seeds 10..13 finished 4, 3, 2, 1 days ago; seed 14 (oldest of all)
    # has its transfer still queued.
    sent = [_archived(tmp_path, archive, s) for s in (10, 11, 12, 13)]
    for age, uid in zip((4, 3, 2, 1), sent, strict=True):
        _finish(index, uid, "p", now - age * 86400, "done")
    unsent = _archived(tmp_path, archive, 14)
    _finish(index, unsent, "p", now - 9 * 86400, "queued")
    _archived(tmp_path, archive, 15)  # unrouted: never finished
    yield index, data, sent, unsent
    index.close()


def _on_disk(data: Path) -> set[str]:
    return {p.name for p in (data / "archive").iterdir() if not p.name.startswith(".")}


def test_watermark_evicts_oldest_sent_first_never_unsent(
    four_sent_one_unsent: tuple[SqliteIndex, Path, list[str], str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    index, data, sent, unsent = four_sent_one_unsent
    assert [f.study_uid for f in finished_studies(index)] == sent

    def free() -> float:  # each study on disk takes 10% of it
        return 100.0 - 10 * len(_on_disk(data))

    # 6 on disk = 40% free; the watermark 65% needs 3 to go: the 3 sent longest ago.
    deleted = evict(index, data, AuditLog(data), 65, free)
    assert deleted == sent[:3]
    assert _on_disk(data) >= {sent[3], unsent}
    reasons = {e["study"]: e["reason"] for e in AuditLog(data).entries()}
    assert reasons == {uid_token(u): "watermark" for u in sent[:3]}

    # Asking for more than can be had: the last sent one goes, the unsent one never.
    with caplog.at_level(logging.ERROR, logger="engine.manage.retention"):
        assert evict(index, data, AuditLog(data), 99, free) == [sent[3]]
    assert unsent in _on_disk(data)
    assert any("nothing sent is left" in r.message for r in caplog.records)


def test_expire_waits_for_the_longest_keep_days_of_every_project(
    four_sent_one_unsent: tuple[SqliteIndex, Path, list[str], str],
) -> None:
    index, data, sent, unsent = four_sent_one_unsent
    # sent[0] (4 days) is also routed to 'q', which keeps 10 days: it waits.
    _finish(index, sent[0], "q", time.time() - 4 * 86400, "done")
    audit = AuditLog(data)
    assert expire(index, data, audit, {"p": 2.5, "q": 10}) == [sent[1]]
    # With 'q' unknown (its file gone or invalid) its studies wait; the others go.
    assert expire(index, data, audit, {"p": 0.5}) == [sent[2], sent[3]]
    assert expire(index, data, audit, {"p": 0.5, "q": 3}) == [sent[0]]
    assert unsent in _on_disk(data) and len(_on_disk(data)) == 2  # the unsent and the unrouted
