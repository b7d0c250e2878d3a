"""Two real ``fiona serve`` processes on one data folder and index share the work: every study
sent to either is de-identified and delivered exactly once, and ``fiona status`` lists both
nodes.

Evidence of "once" that the index cannot hide: each node logs every step it finished and every
transfer it delivered (by run and transfer id), and the audit log has one ``sent`` entry per
delivery.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from tests import synth
from tests.conftest import need_peer
from tests.dbutil import connect_index
from tests.peers import REPO, FionaServer, StorescpServer
from tests.test_receive import store
from tests.test_workflow import wait_for

STUDIES = 6


def _project(projects: Path, out: Path | dict[str, Any]) -> None:
    key = projects / "multi.key"
    key.write_bytes(os.urandom(48))
    os.chmod(key, 0o600)
    share = out if isinstance(out, dict) else {"type": "folder", "path": str(out)}
    doc = {
        "name": "multi",
        "routing": {"calling_ae": ["SCANNER"]},
        "completeness": {"study_quiet_seconds": 1, "series_quiet_seconds": 1},
        "destinations": {"share": share},
        "pipeline": [
            {"step": "anonymize", "secret_file": key.name},
            {"step": "send", "to": ["share"]},
        ],
    }
    (projects / "multi.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))


def _index(data: Path, sql: str, *args: object) -> list[tuple[Any, ...]]:
    with connect_index(data / "index.sqlite") as db:
        return db.execute(sql, args).fetchall()


def _status(site: Path, data: Path, projects: Path) -> dict[str, Any]:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine.cli",
            "status",
            "--json",
            "--config",
            str(site),
            "--data",
            str(data),
            "--projects",
            str(projects),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    doc: dict[str, Any] = json.loads(done.stdout)
    return doc


def test_two_nodes_deliver_each_study_once(tmp_path: Path, storescu: str) -> None:
    data, projects, out = tmp_path / "data", tmp_path / "projects", tmp_path / "out"
    projects.mkdir()
    out.mkdir()
    _project(projects, out)
    site = tmp_path / "site.yaml"
    site.write_text(
        yaml.safe_dump({"scan_interval_seconds": 0.3, "heartbeat": {"interval_seconds": 5}})
    )
    nodes = [FionaServer(data, projects, config=site).start()]
    nodes.append(FionaServer(data, projects, config=site).start())
    try:
        sent_files = 0
        for seed in range(STUDIES):
            spec = synth.make_study_spec(100 + seed)
            series = [synth.MR_SERIES["t1_mprage"]]
            files = synth.write_study(
                synth.make_study(spec, series, size=16), tmp_path / f"s{seed}"
            )
            sent_files += len(files)
            # Half the studies reach each node, as behind a load balancer.
            result = store(storescu, nodes[seed % 2], files, aet="SCANNER")
            assert result.returncode == 0, result.stderr

        def delivered() -> bool:
            rows = _index(data, "SELECT count(*) FROM transfers WHERE state='done'")
            return rows[0][0] == STUDIES

        wait_for("every study delivered", delivered, timeout=120, server=nodes[0])
        assert all(n.alive() for n in nodes)
        doc = _status(site, data, projects)
    finally:
        for n in nodes:
            n.stop()
    logs = [n.log_text() for n in nodes]
    # Each run's each step finished on one node only, and each transfer was delivered once.
    steps = Counter(
        m for text in logs for m in re.findall(r"run (\d+) \(project multi\) step (\d+)", text)
    )
    assert len(steps) == 2 * STUDIES and set(steps.values()) == {1}, steps
    transfers = Counter(
        m for text in logs for m in re.findall(r"transfer (\d+): \d+ instances to multi", text)
    )
    assert len(transfers) == STUDIES and set(transfers.values()) == {1}, transfers
    runs = _index(data, "SELECT count(*), count(DISTINCT study_uid) FROM pipeline_runs")
    assert runs == [(STUDIES, STUDIES)]
    entries = [
        json.loads(line)
        for path in sorted((data / "audit").glob("audit-*.jsonl"))
        for line in path.read_text().splitlines()
        if line.strip()
    ]
    assert sum(e.get("event") == "sent" for e in entries) == STUDIES
    assert len([p for p in out.rglob("*.dcm")]) == sent_files
    # fiona status listed both nodes, running, each with its heartbeat.
    listed = {n["pid"]: n for n in doc["nodes"]}
    assert {n.proc.pid for n in nodes if n.proc} <= set(listed)
    assert all(listed[n.proc.pid]["state"] == "running" for n in nodes if n.proc)
    for text in logs:
        assert "Traceback" not in text


def test_a_node_killed_mid_transfer_is_taken_over_after_its_lease(
    tmp_path: Path, storescu: str
) -> None:
    """The node sending a study is SIGKILLed after the peer confirmed some instances: the other
    node takes the transfer over once the lease has run out, sends only what was not confirmed,
    and the peer has the whole study."""
    need_peer("storescp")
    data, projects = tmp_path / "data", tmp_path / "projects"
    projects.mkdir()
    # A slow peer: a second per instance, so the transfer is under way when the node dies.
    peer = StorescpServer(tmp_path / "peer", ("-v", "--sleep-during", "1")).start()
    # Concurrency 2: a free slot beside the running transfer, so only its lease keeps the
    # other node off it.
    _project(
        projects,
        {
            "type": "dicom",
            "host": "127.0.0.1",
            "port": peer.port,
            "ae_title": "PEER",
            "concurrency": 2,
        },
    )
    site = tmp_path / "site.yaml"
    site.write_text(
        yaml.safe_dump(
            {
                "scan_interval_seconds": 0.3,
                "heartbeat": {"interval_seconds": 2},
                "node": {"lease_seconds": 5},
            }
        )
    )
    nodes = [FionaServer(data, projects, config=site).start() for _ in range(2)]
    try:
        spec = synth.make_study_spec(7)
        files = synth.write_study(
            synth.make_study(spec, [synth.MR_SERIES["t2_tse"]], size=16), tmp_path / "study"
        )
        assert store(storescu, nodes[0], files, aet="SCANNER").returncode == 0

        def some_confirmed() -> bool:
            return bool(
                _index(
                    data,
                    "SELECT 1 FROM transfers t WHERE t.state='sending' AND (SELECT count(*)"
                    " FROM transfer_items i WHERE i.transfer_id=t.id AND i.state='sent') >= 2",
                )
            )

        wait_for("two instances confirmed", some_confirmed, timeout=90, server=nodes[0])
        [(holder, before)] = _index(
            data,
            "SELECT t.claimed_by, (SELECT count(*) FROM transfer_items i WHERE"
            " i.transfer_id=t.id AND i.state='sent') FROM transfers t",
        )
        [(pid,)] = _index(data, "SELECT pid FROM nodes WHERE id=?", holder)
        [killed] = [n for n in nodes if n.proc is not None and n.proc.pid == pid]
        [survivor] = [n for n in nodes if n is not killed]
        assert killed.proc is not None
        killed.proc.send_signal(signal.SIGKILL)
        killed.proc.wait()
        doc = _status(site, data, projects)
        states = {n["pid"]: n for n in doc["nodes"]}
        assert states[pid]["state"] == "stale"  # its process is gone, no clean stop

        def done() -> bool:
            return _index(data, "SELECT state FROM transfers") == [("done",)]

        wait_for("the survivor to finish the transfer", done, timeout=120, server=survivor)
        [(now_holder,)] = _index(data, "SELECT claimed_by FROM transfers")
        assert now_holder is None  # released by the survivor
    finally:
        for n in nodes:
            n.stop()
        peer.stop()
    received = {p.name.split(".", 1)[1] for p in peer.files()}
    items = {str(r[0]) for r in _index(data, "SELECT sop_instance_uid FROM transfer_items")}
    assert len(items) == len(files) and received == items  # the whole study, nothing else
    # Stores the peer saw: every instance once, plus at most the one in flight at the kill.
    stores = peer.log_path.read_text().count("Received Store Request")
    assert len(files) <= stores <= len(files) + 1, stores
    # The survivor sent only what the peer had not confirmed before the kill.
    found = re.search(r"transfer \d+: (\d+) instances to multi/share", survivor.log_text())
    assert found is not None and int(found.group(1)) <= len(files) - before
    assert "Traceback" not in survivor.log_text()


def test_a_node_name_in_use_by_a_running_node_is_refused(tmp_path: Path) -> None:
    """``node.name`` must be unique: a second process under a running node's name stops at
    start with one message (two nodes with one name would renew each other's leases); once
    the first stopped, a node may start under it again."""
    data, projects = tmp_path / "data", tmp_path / "projects"
    projects.mkdir()
    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump({"node": {"name": "mri-1"}}))
    first = FionaServer(data, projects, config=site).start()
    try:
        second = FionaServer(data, projects, config=site)
        with contextlib.suppress(RuntimeError):  # it exits before listening, as it should
            second.start()
        assert second.proc is not None
        assert second.proc.wait(timeout=30) == 2
        assert "node name mri-1 is in use by a running node" in second.log_text()
        assert "Traceback" not in second.log_text()
    finally:
        first.stop()
    again = FionaServer(data, projects, config=site).start()
    try:
        assert again.alive()
        rows = _index(data, "SELECT id, pid, stopped_at FROM nodes")
        assert rows == [("mri-1", again.proc.pid if again.proc else 0, None)]
    finally:
        again.stop()
