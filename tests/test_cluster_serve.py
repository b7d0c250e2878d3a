"""Two real ``fiona serve`` processes on one data folder and index share the work: every study
sent to either is de-identified and delivered exactly once, and ``fiona status`` lists both
nodes.

Evidence of "once" that the index cannot hide: each node logs every step it finished and every
transfer it delivered (by run and transfer id), and the audit log has one ``sent`` entry per
delivery.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path

import yaml

from tests import synth
from tests.peers import REPO, FionaServer
from tests.test_receive import store
from tests.test_workflow import wait_for

STUDIES = 6


def _project(projects: Path, out: Path) -> None:
    key = projects / "multi.key"
    key.write_bytes(os.urandom(48))
    os.chmod(key, 0o600)
    doc = {
        "name": "multi",
        "routing": {"calling_ae": ["SCANNER"]},
        "completeness": {"study_quiet_seconds": 1, "series_quiet_seconds": 1},
        "destinations": {"share": {"type": "folder", "path": str(out)}},
        "pipeline": [
            {"step": "anonymize", "secret_file": key.name},
            {"step": "send", "to": ["share"]},
        ],
    }
    (projects / "multi.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))


def _index(data: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(data / "index.sqlite") as db:
        return db.execute(sql).fetchall()


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
        status = subprocess.run(
            [sys.executable, "-m", "engine.cli", "status", "--json", "--config", str(site),
             "--data", str(data), "--projects", str(projects)],
            cwd=REPO, capture_output=True, text=True, timeout=60,
        )
        doc = json.loads(status.stdout)
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
