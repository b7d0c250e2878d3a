"""Faults a clustered fiona must ride out: its PostgreSQL index restarted while instances
stream in (this module), and nodes killed mid-pipeline and mid-transfer
(tests/test_cluster_netns.py).

Every test here makes its own PostgreSQL cluster (tests/pg_server.py), whatever the suite's
engine, so it runs once: in the PostgreSQL run of scripts/test.sh (``postgresql_run``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from engine.store.db import INDEX_URL_ENV
from tests import synth
from tests.peers import REPO, FionaServer, free_port, nodelay_env
from tests.pg_server import PgCluster, pg_bin
from tests.test_workflow import wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.postgresql_run("makes and restarts a PostgreSQL cluster of its own"),
]

#: The receiver's answer while the index is away (engine.store.outage).
OUT_OF_RESOURCES = 0xA700


def need_postgresql() -> None:
    if pg_bin() is None:
        message = "PostgreSQL is not installed (apt-get install -y postgresql)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture
def own_pg(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[PgCluster, str]]:
    """A PostgreSQL cluster of the test's own (it restarts it) and the index database on it,
    named to ``fiona serve`` by $FIONA_INDEX_URL."""
    need_postgresql()
    cluster = PgCluster()
    try:
        name = cluster.new_database()
        monkeypatch.setenv(INDEX_URL_ENV, cluster.url(name))
        yield cluster, name
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):  # stopped by the test
            cluster.close()


_SENDING = re.compile(r"Sending file: (\S+)")
_STATUS = re.compile(r"DIMSE Status\s*:\s*0x([0-9a-fA-F]{4})")


def store_statuses(storescu: str, host: str, port: int, files: list[Path]) -> dict[Path, int]:
    """Send ``files`` in one association with dcmtk's storescu; each file's C-STORE response
    status as storescu printed it (a file missing had no response: the association broke)."""
    done = subprocess.run(
        [storescu, "-d", "-aet", "SCANNER", "-aec", "FIONA", host, str(port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=300,
        env=nodelay_env(),
    )
    out: dict[Path, int] = {}
    current: Path | None = None
    for line in (done.stdout + done.stderr).splitlines():
        sending = _SENDING.search(line)
        if sending:
            current = Path(sending.group(1))
            continue
        status = _STATUS.search(line)
        if status and current is not None:
            out[current] = int(status.group(1), 16)
            current = None
    return out


@dataclass
class Streamer:
    """A sender streaming small new studies to one node until stopped, one association per
    study; every response status it got, by SOP Instance UID."""

    storescu: str
    host: str
    port: int
    folder: Path
    #: The first synthetic study's seed (senders beside each other send different studies).
    base: int = 5000
    statuses: dict[str, int] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Streamer:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        seed = 0
        while not self.stop.is_set():
            seed += 1
            datasets = synth.make_study(
                synth.make_study_spec(self.base + seed), [synth.MR_SERIES["localizer"]], size=16
            )
            files = synth.write_study(datasets, self.folder / f"s{seed}")
            uids = {f: str(ds.SOPInstanceUID) for f, ds in zip(files, datasets, strict=True)}
            got = store_statuses(self.storescu, self.host, self.port, files)
            with self.lock:
                self.statuses.update({uids[f]: s for f, s in got.items()})

    def count(self, success: bool) -> int:
        with self.lock:
            return sum((s == 0) == success for s in self.statuses.values())

    def finish(self) -> dict[str, int]:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=120)
        with self.lock:
            return dict(self.statuses)


def _indexed(url: str) -> dict[str, str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT sop_instance_uid, path FROM instances").fetchall()
    return {str(u): str(p) for u, p in rows}


def test_serve_rides_out_a_postgresql_restart(
    tmp_path: Path, storescu: str, own_pg: tuple[PgCluster, str]
) -> None:
    """PostgreSQL stopped and started again on its port while a sender streams instances in:
    the node answers Out of Resources (never Success) for what it cannot index, says once that
    the index went away and once that it is back, keeps running and receiving, and every
    instance it answered Success is in the index and the archive."""
    cluster, name = own_pg
    data, projects = tmp_path / "data", tmp_path / "projects"
    projects.mkdir()
    site = tmp_path / "site.yaml"
    site.write_text(
        yaml.safe_dump(
            {
                "scan_interval_seconds": 0.3,
                "heartbeat": {"interval_seconds": 1},
                "node": {"name": "solo", "lease_seconds": 6},
            }
        )
    )
    node = FionaServer(data, projects, config=site).start()
    sender = Streamer(storescu, "127.0.0.1", node.port, tmp_path / "sent").start()
    try:
        wait_for("instances received", lambda: sender.count(True) >= 6, timeout=60, server=node)
        cluster.stop()
        try:
            wait_for(
                "the node to notice",
                lambda: "index unavailable" in node.log_text(),
                timeout=60,
                server=node,
            )
            wait_for("a refused instance", lambda: sender.count(False) >= 1, timeout=60)
        finally:
            cluster.start()
        before = sender.count(True)
        wait_for(
            "the node to resume",
            lambda: "index available again" in node.log_text(),
            timeout=60,
            server=node,
        )
        wait_for("receiving again", lambda: sender.count(True) >= before + 6, timeout=60)
        statuses = sender.finish()
        assert node.alive()
    finally:
        sender.finish()
        node.stop()
    refused = {uid: s for uid, s in statuses.items() if s != 0}
    assert refused and set(refused.values()) == {OUT_OF_RESOURCES}, refused
    indexed = _indexed(cluster.url(name))
    answered_success = {uid for uid, s in statuses.items() if s == 0}
    assert answered_success <= set(indexed)
    assert all((data / indexed[uid]).is_file() for uid in answered_success)
    text = node.log_text()
    assert text.count("index unavailable") == 1, text
    assert text.count("index available again") == 1, text
    assert "Traceback" not in text


def test_serve_stops_cleanly_while_the_index_is_away(
    tmp_path: Path, own_pg: tuple[PgCluster, str]
) -> None:
    """SIGTERM while PostgreSQL is stopped: the node exits 0, saying that its leases run out
    instead of being released, with no traceback."""
    cluster, _ = own_pg
    data, projects = tmp_path / "data", tmp_path / "projects"
    projects.mkdir()
    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump({"heartbeat": {"interval_seconds": 1}}))
    node = FionaServer(data, projects, config=site).start()
    try:
        cluster.stop()
        wait_for(
            "the node to notice",
            lambda: "index unavailable" in node.log_text(),
            timeout=60,
            server=node,
        )
        assert node.stop() == 0
    finally:
        node.stop()
    text = node.log_text()
    assert "index unavailable at shutdown" in text
    assert "Traceback" not in text


def _get(port: int, path: str, token: str = "", cookie: str = "") -> tuple[int, str, str]:
    """(status, Content-Type, body) of one GET to the web port (with a bearer ``token``, a
    ``cookie``)."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    if cookie:
        request.add_header("Cookie", cookie)
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, answer.headers["Content-Type"], answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def _status_code(port: int) -> int:
    """The status of ``GET /status.json``; 0 while the web port does not answer yet."""
    try:
        return _get(port, "/status.json")[0]
    except urllib.error.URLError:
        return 0


def _away_beat(data: Path) -> dict[str, Any] | None:
    """The heartbeat in ``<data>/status.json`` when it says the index is unavailable."""
    try:
        beat = json.loads((data / "status.json").read_text())["heartbeat"]
    except (OSError, ValueError, KeyError):
        return None
    away = isinstance(beat, dict) and beat.get("index", {}).get("available") is False
    return beat if away else None


def test_status_and_the_web_say_the_index_is_unavailable(
    tmp_path: Path, own_pg: tuple[PgCluster, str]
) -> None:
    """PostgreSQL stopped under a running node: ``fiona status`` reports it unhealthy (exit
    1) with the one reason; the web answers 503 with Retry-After: ``/status.json`` with the
    health verdict, the API a JSON error, the portal a page; no traceback anywhere. Started
    again, the status is served as before."""
    cluster, _ = own_pg
    data, projects = tmp_path / "data", tmp_path / "projects"
    projects.mkdir()
    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump({"heartbeat": {"interval_seconds": 1}}))
    web = free_port()
    node = FionaServer(data, projects, config=site, web_port=web).start()
    where = ["--config", str(site), "--data", str(data), "--projects", str(projects)]

    def status(*more: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "engine.cli", "status", *more, *where],
            cwd=REPO, capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    try:
        wait_for("the status page", lambda: _status_code(web) == 200, timeout=60)
        cluster.stop()
        try:
            text = status()
            assert text.returncode == 1, text.stderr
            assert "UNHEALTHY" in text.stdout and "! index unavailable: " in text.stdout
            assert "Traceback" not in text.stdout + text.stderr
            doc = json.loads(status("--json").stdout)
            assert doc["healthy"] is False and doc["index"]["available"] is False
            assert doc["problems"][0].startswith("index unavailable: postgresql://")
            code, kind, body = _get(web, "/status.json")
            assert (code, kind) == (503, "application/json")
            assert json.loads(body)["healthy"] is False
            # Checking a well-formed token needs the index (a missing one is 401 at once).
            code, kind, body = _get(web, "/api/v1/studies", token="0123456789ab." + "x" * 40)
            assert (code, kind) == (503, "application/json")
            assert json.loads(body)["error"] == "index unavailable"
            # A browser with a session: looking it up needs the index.
            code, kind, body = _get(web, "/", cookie="fiona_session=" + "y" * 43)
            assert code == 503 and kind.startswith("text/html")
            assert "The index is unavailable" in body
            # The heartbeat goes on: the status file says the index is away, and the SCP
            # still answers its C-ECHO.
            wait_for("the status file to say so", lambda: _away_beat(data) is not None, 60)
            beat = _away_beat(data)
            assert beat is not None and beat["index"]["error"].startswith("postgresql://")
            assert beat["echo"]["ok"] is True and "queues" not in beat
        finally:
            cluster.start()
        wait_for("the status page again", lambda: _status_code(web) == 200, timeout=60)
        assert status().returncode in (0, 1, 3)  # answered from the index again
    finally:
        node.stop()
    assert "Traceback" not in node.log_text()
