"""`fiona status` tells the truth: not running the moment the service is gone, counts read live
from the index, `healthy` apart from `attention`; and `fiona validate`'s warnings.

End to end with a real `fiona serve` (heartbeat every hour, so nothing below can come from a
heartbeat after the first), dcmtk `storescu` and a raw pynetdicom C-STORE of bytes that are not
DICOM; the destination is a DICOM port nobody listens on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from engine.config.validate import run_validate
from engine.manage.pidfile import PID_FILE, serve_process, write_pid_file
from tests import synth
from tests.peers import REPO, FionaServer, free_port, send_raw_c_store
from tests.test_receive import store
from tests.test_workflow import wait_for

MR = [synth.MR_SERIES["t1_mprage"]]
NOT_DICOM = b"this is not a DICOM data set" * 8


def fiona_status(server: FionaServer, config: Path) -> tuple[int, dict[str, Any], str]:
    """`fiona status --json` and `fiona status` as subprocesses: (exit status, JSON, text)."""
    base = [sys.executable, "-m", "engine.cli", "status", "--config", str(config)]
    base += ["--data", str(server.data_dir), "--projects", str(server.projects_dir)]
    done = subprocess.run([*base, "--json"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode in (0, 1, 3), done.stderr
    text = subprocess.run(base, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert text.returncode == done.returncode, text.stderr
    return done.returncode, json.loads(done.stdout), text.stdout


def write_project(folder: Path, name: str, aet: str, destination: dict[str, Any]) -> None:
    """A project claiming studies from ``aet``: de-identify, then send to ``destination``."""
    key = folder / f"{name}.key"
    key.write_bytes(os.urandom(48))
    os.chmod(key, 0o600)
    doc = {
        "name": name,
        "routing": {"calling_ae": [aet]},
        "completeness": {"study_quiet_seconds": 1},
        "destinations": {"out": destination},
        "pipeline": [
            {"step": "anonymize", "secret_file": key.name},
            {"step": "send", "to": ["out"]},
        ],
    }
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))


@dataclass
class Running:
    server: FionaServer
    config: Path
    http_port: int

    def status(self) -> tuple[int, dict[str, Any], str]:
        return fiona_status(self.server, self.config)


def start_site(tmp: Path, projects: Path, *, heartbeat: float = 3600) -> Running:
    """`fiona serve` on ``projects`` with the web portal on; the first heartbeat is taken at
    start, the next only after ``heartbeat`` seconds."""
    http_port = free_port()
    config = tmp / "site.yaml"
    site = {
        "scan_interval_seconds": 0.5,
        "heartbeat": {"interval_seconds": heartbeat},
        "retention": {"min_free_percent": 0},
        "web": {"enabled": True, "port": http_port},
    }
    config.write_text(yaml.safe_dump(site))
    server = FionaServer(data_dir=tmp / "data", projects_dir=projects, config=config, web_port=None)
    server.start()
    running = Running(server, config, http_port)
    wait_for("the first heartbeat", lambda: running.status()[0] == 0, 30, server)
    return running


@pytest.fixture
def dead_end(tmp_path: Path) -> Iterator[Running]:
    """A service whose project 'dead' sends to a port nobody listens on, giving up at once."""
    projects = tmp_path / "projects"
    projects.mkdir()
    peer = {"type": "dicom", "host": "127.0.0.1", "port": free_port(), "ae_title": "NOBODY"}
    write_project(projects, "dead", "SCANNER_D", {**peer, "retry": {"max_attempts": 1}})
    running = start_site(tmp_path, projects)
    yield running
    running.server.stop()


# --------------------------------------------------------------------------- not running


def test_kill_9_is_not_running_at_once(dead_end: Running) -> None:
    server = dead_end.server
    code, status, _ = dead_end.status()
    assert code == 0 and status["service"]["running"], status["problems"]
    assert status["service"]["pid"] == server.proc.pid  # type: ignore[union-attr]

    server.proc.kill()  # type: ignore[union-attr]  # SIGKILL: nothing is marked stopped
    server.proc.wait()  # type: ignore[union-attr]
    # The heartbeat is seconds old and the status file says running: neither is believed.
    code, status, text = dead_end.status()
    assert code == 1 and not status["healthy"]
    assert status["service"]["running"] is False
    assert f"process {server.proc.pid} is gone" in status["service"]["why"]  # type: ignore[union-attr]
    assert any(p.startswith("service not running") for p in status["problems"])
    assert "UNHEALTHY" in text and "NOT RUNNING" in text


def test_a_clean_stop_is_not_running(dead_end: Running) -> None:
    assert dead_end.server.stop() == 0
    assert not (dead_end.server.data_dir / PID_FILE).exists()
    code, status, _ = dead_end.status()
    assert code == 1 and status["service"]["running"] is False
    assert "not started, or stopped" in status["service"]["why"]


def test_a_reused_or_dead_pid_is_not_the_service(tmp_path: Path) -> None:
    write_pid_file(tmp_path)  # this process: pytest, not `fiona serve`
    found = serve_process(tmp_path)
    assert not found.running and "not fiona serve" in found.why
    gone = subprocess.Popen(["true"])
    gone.wait()
    write_pid_file(tmp_path, gone.pid)
    assert "is gone" in serve_process(tmp_path).why
    zombie = subprocess.Popen(["true"])  # exited, not yet reaped
    write_pid_file(tmp_path, zombie.pid)
    wait_for("the child to exit", lambda: "is gone" in serve_process(tmp_path).why, 10)
    zombie.wait()


# --------------------------------------------------------------------------- attention


def test_held_items_and_dead_letters_need_attention_live(
    dead_end: Running, storescu: str, tmp_path: Path
) -> None:
    server = dead_end.server
    code, status, _ = dead_end.status()
    assert code == 0 and not status["attention"]["needed"]
    assert status["quarantine"]["held_items"] == 0

    # Held at receipt: counted the moment the C-STORE is answered, no heartbeat in between.
    assert send_raw_c_store(server.port, NOT_DICOM) == 0xC210
    code, status, text = dead_end.status()
    assert code == 3 and status["healthy"], status["problems"]
    assert status["quarantine"]["held_items"] == 1
    assert status["quarantine"]["by_reason"] == {"unparseable": 1}
    assert status["attention"]["counts"]["quarantine_held_items"] == 1
    assert "healthy, 1 needs attention" in text and "(receipt): unparseable 1" in text

    # A study to a peer that never answers: one attempt, a dead letter, its study held.
    spec = synth.make_study_spec(5)
    files = synth.write_study(synth.make_study(spec, MR, size=16), tmp_path / "study")
    assert store(storescu, server, files, aet="SCANNER_D").returncode == 0

    def routed() -> bool:
        return "dead" in dead_end.status()[1]["projects"]

    wait_for("the study to be routed", routed, 30, server)
    code, status, _ = dead_end.status()
    assert status["projects"]["dead"]["received"] == 1
    assert status["projects"]["dead"]["last_receipt"]  # live, not from a heartbeat

    def dead_letter() -> bool:
        return dead_end.status()[1]["attention"]["counts"]["dead_letters"] == 1

    wait_for("the transfer to be given up", dead_letter, 90, server)
    (server.projects_dir / "broken.yaml").write_text("name: broken\nroutng: {}\n")
    code, status, text = dead_end.status()
    assert code == 3 and status["healthy"], status["problems"]
    needs = status["attention"]
    assert needs["counts"] == {
        "quarantine_held_items": 2,
        "quarantine_held_studies": 1,
        "dead_letters": 1,
        "invalid_projects": 1,
    }
    assert [(d["project"], d["destination"], d["attempts"]) for d in needs["dead_letters"]] == [
        ("dead", "out", 1)
    ]
    assert {(g["project"], g["reason"]) for g in needs["quarantine"]} == {
        ("", "unparseable"),
        ("dead", "transfer_failed"),
    }
    assert needs["invalid_projects"][0]["file"].endswith("broken.yaml")
    assert status["outbox"]["by_state"]["failed"] == 1
    assert status["projects"]["dead"]["quarantined"] == 1
    assert "dead letters     1 transfers given up" in text
    assert "invalid projects 1 disabled" in text and "broken.yaml" in text
    # The web's /status.json, without a login, says the same.
    url = f"http://127.0.0.1:{dead_end.http_port}/status.json"
    with urllib.request.urlopen(url, timeout=10) as page:
        served = json.loads(page.read())
    assert served["attention"]["counts"] == needs["counts"] and served["healthy"]
    # Heartbeats every hour: all of the above was read live.
    assert status["heartbeat"]["age_seconds"] < 3600
    everything = json.dumps(status) + text
    assert synth.study_uid(spec) not in everything and "SYNPID" not in everything


# --------------------------------------------------------------------------- validate warnings


def test_validate_warns_about_the_heartbeat_ae_and_a_missing_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    projects = tmp_path / "projects"
    projects.mkdir()
    there = tmp_path / "share"
    there.mkdir()
    write_project(projects, "mounted", "A", {"type": "folder", "path": str(there)})
    write_project(projects, "unmounted", "B", {"type": "folder", "path": "../not-mounted"})
    site = tmp_path / "site.yaml"
    site.write_text(
        f"ae_title: FIONA\nprojects_dir: {projects}\nallowed_calling_aes:\n  - SCANNER_A\n"
    )
    assert run_validate([], site_path=site) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"{site}:3 allowed_calling_aes: warning: the heartbeat's C-ECHO calls with AE 'FIONA'"
        " (ae_title, as heartbeat.calling_ae is not set), which is not on this list: it is"
        " rejected and `fiona status` reports the service unhealthy; add it to the list or"
        " set heartbeat.calling_ae to one on it",
        f"{projects / 'unmounted.yaml'}:10 destinations.out.path: warning: the folder"
        f" {projects / '../not-mounted'} does not exist (not created, or not mounted);"
        " transfers to it wait and retry until it does",
        "3 files checked, 0 errors, 2 warnings",
    ]

    # Listening on the network with no allow-list: anyone may send.
    site.write_text(f"ae_title: FIONA\nprojects_dir: {projects}\nbind_address: 0.0.0.0\n")
    assert run_validate([], site_path=site) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (
        f"{site}:3 bind_address: warning: fiona listens on 0.0.0.0 and allowed_calling_aes is"
        " empty: any host that reaches the port can send images under any AE title; list the"
        " modalities' AE titles in allowed_calling_aes and open the port only to their"
        " addresses in the firewall"
    )
    site.write_text(
        f"ae_title: FIONA\nprojects_dir: {projects}\nallowed_calling_aes:\n  - SCANNER_A\n"
    )

    # The heartbeat on the list, the folder there: no warnings.
    site.write_text(site.read_text() + "heartbeat:\n  calling_ae: SCANNER_A\n")
    (tmp_path / "not-mounted").mkdir()
    assert run_validate([], site_path=site) == 0
    assert capsys.readouterr().out.splitlines() == ["3 files checked, 0 errors"]


def test_validate_refuses_a_commitment_port_the_service_listens_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    projects = tmp_path / "projects"
    projects.mkdir()
    pacs = {"type": "dicom", "host": "127.0.0.1", "port": 104, "ae_title": "RESEARCH"}
    write_project(projects, "clash", "A", {**pacs, "storage_commitment": {"port": 11112}})
    write_project(projects, "apart", "B", {**pacs, "storage_commitment": {"port": 11113}})
    site = tmp_path / "site.yaml"
    site.write_text(f"ae_title: FIONA\nport: 11112\nprojects_dir: {projects}\n")
    assert run_validate([], site_path=site) == 1
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"{projects / 'clash.yaml'}:14 destinations.out.storage_commitment.port: port 11112 is"
        " the site's port (the DICOM receiver): fiona could not listen there for the peer's"
        " Storage Commitment report; give the destination a port of its own",
        "3 files checked, 1 error",
    ]
    # Without the site file nothing is known of its ports.
    assert run_validate([projects]) == 0


# --------------------------------------------------------------------------- the last day


def _plant(db: Any, received: list[float], sent: list[float], done: list[float]) -> None:
    """Instances received at ``received``, delivered at ``sent``, transfers finished at
    ``done`` (seconds since the epoch), as rows of the index."""
    db.execute("INSERT INTO patients (id, patient_id) VALUES (1, 'P')")
    db.execute("INSERT INTO studies (id, study_uid, patient_ref, first_received_at,"
               " last_received_at) VALUES (1, '1.2', 1, 0, 0)")  # fmt: skip
    db.execute("INSERT INTO series (id, series_uid, study_ref, first_received_at,"
               " last_received_at) VALUES (1, '1.2.3', 1, 0, 0)")  # fmt: skip
    for n, at in enumerate(received):
        db.execute("INSERT INTO instances (sop_instance_uid, sop_class_uid, series_ref, path,"
                   " size, received_at, via) VALUES (?, '1.2.840', 1, 'x', 1, ?, 'dimse')",
                   (f"1.2.3.{n}", at))  # fmt: skip
    for n, at in enumerate(done):
        db.execute("INSERT INTO transfers (id, project, destination, study_uid, export_uid,"
                   " run_id, state, next_try_at, created_at, updated_at, finished_at)"
                   " VALUES (?, 'p', 'd', '1.2', '9.9', ?, 'done', 0, 0, 0, ?)",
                   (n + 1, n + 1, at))  # fmt: skip
    db.execute("INSERT INTO transfers (id, project, destination, study_uid, export_uid, run_id,"
               " state, next_try_at, created_at, updated_at, finished_at)"
               " VALUES (99, 'p', 'd', '1.2', '9.9', 99, 'failed', 0, 0, 0, ?)",
               (done[0],))  # fmt: skip  # given up: finished, but not sent
    for n, at in enumerate(sent):
        db.execute("INSERT INTO transfer_items (transfer_id, sop_instance_uid, sop_class_uid,"
                   " transfer_syntax, series_uid, path, size, state, sent_at)"
                   " VALUES (99, ?, '1.2.840', '1.2.840.10008.1.2.1', '9.9.1', 'x', 1, 'sent', ?)",
                   (f"9.9.1.{n}", at))  # fmt: skip


def test_received_and_sent_are_counted_in_their_hour_of_the_last_day(tmp_path: Path) -> None:
    from engine.store.activity import hourly_activity
    from engine.store.index import open_index

    now = 497_222 * 3600.0 + 1800  # half past an hour (UTC)
    this_hour = now - 1800
    index = open_index("", tmp_path / "index.sqlite")
    ago = [1, 1800, 1801, 5 * 3600, 30 * 3600, -3600]  # seconds before now
    with index.transaction() as db:
        _plant(
            db,
            received=[now - s for s in ago],
            sent=[now - 2 * 3600, now - 2 * 3600 + 60, now - 24 * 3600],
            done=[this_hour - 23 * 3600, this_hour - 23 * 3600 - 1],
        )
    hours = hourly_activity(index, now)
    index.close()
    assert len(hours) == 24
    assert hours[-1]["hour"] == "2026-09-21T14:00Z" and hours[0]["hour"] == "2026-09-20T15:00Z"
    nonzero = {
        (i, key): h[key]
        for i, h in enumerate(hours)
        for key in ("received", "sent_instances", "sent_transfers")
        if h[key]
    }
    assert nonzero == {
        (23, "received"): 2,  # this hour: its first second and one second ago
        (22, "received"): 1,  # the last second of the hour before
        (18, "received"): 1,  # five hours ago; 30 hours ago and the next hour are left out
        (21, "sent_instances"): 2,
        (0, "sent_transfers"): 1,  # the first second of the day; the failed one is not sent
    }


# --------------------------------------------------------------------------- status_http


def test_a_deprecated_status_http_port_still_serves_status_and_metrics(
    tmp_path: Path, empty_projects: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old_port, web_port = free_port(), free_port()
    site = tmp_path / "site.yaml"
    site.write_text(
        f"status_http:\n  port: {old_port}\nweb:\n  port: {web_port}\n"
        f"projects_dir: {empty_projects}\n"
    )
    assert run_validate([], site_path=site) == 0  # a warning, not an error
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (
        f"{site}:1 status_http: warning: status_http is deprecated and goes in the next"
        f" release: the web portal's port (web.port, {web_port}) answers GET /status.json and"
        " GET /metrics without a login, and its dashboard replaces the page; point Prometheus"
        " and monitoring at that port and remove status_http (until then port"
        f" {old_port} still answers /status.json, /metrics and / as plain text)"
    )
    # The web off (as in most tests): the old port alone still answers, without a login.
    server = FionaServer(tmp_path / "data", empty_projects, config=site).start()
    try:
        base = f"http://127.0.0.1:{old_port}"
        wait_for("the status port", lambda: _answers(base + "/metrics"), 30, server)
        with urllib.request.urlopen(base + "/metrics", timeout=10) as answer:
            assert b"fiona_instances_received_total" in answer.read()
        with urllib.request.urlopen(base + "/status.json", timeout=10) as answer:
            assert json.loads(answer.read())["ae_title"] == "FIONA"
        with urllib.request.urlopen(base + "/", timeout=10) as answer:
            assert answer.headers["Content-Type"].startswith("text/plain")
            assert answer.read().decode().startswith("fiona FIONA: ")
        assert "status_http is deprecated" in server.log_text()
    finally:
        server.stop()


def test_a_status_http_port_that_is_the_webs_is_served_by_the_web(
    tmp_path: Path, empty_projects: Path
) -> None:
    port = free_port()
    site = tmp_path / "site.yaml"
    site.write_text(f"status_http:\n  port: {port}\nweb:\n  enabled: true\n  port: {port}\n")
    server = FionaServer(tmp_path / "data", empty_projects, config=site, web_port=None).start()
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        wait_for("the web port", lambda: _answers(url), 30, server)
        assert f"port {port} is the web portal's" in server.log_text()
        assert "cannot listen" not in server.log_text()
    finally:
        server.stop()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False
