"""Each node's own ``serve.pid`` and ``status.json`` under ``<data>/nodes/<node>/``, beside the
data folder's (the node started last), with node names made safe file names first."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import yaml

from engine.manage.pidfile import node_dir, prune_node_dirs, safe_node_name, serve_process
from tests.peers import FionaServer
from tests.test_cluster_serve import _status
from tests.test_workflow import wait_for


@pytest.mark.parametrize(
    ("node_id", "expected"),
    [
        ("mri-1", "mri-1"),
        ("ct_2.ward@site", "ct_2.ward@site"),
        ("host/4242", None),  # <host>/<pid>: '/' replaced, a hash added
        ("../../etc", None),
        ("..", None),
        ("a:b", None),
    ],
)
def test_node_names_become_safe_folder_names(node_id: str, expected: str | None) -> None:
    name = safe_node_name(node_id)
    if expected is not None:
        assert name == expected
    else:
        assert name != node_id and len(name.rsplit("-", 1)[1]) == 8
    assert "/" not in name and not name.startswith(".") and name not in ("", ".", "..")
    data = Path("/srv/fiona")
    assert node_dir(data, node_id).parent == data / "nodes"


def test_names_that_differ_never_share_a_folder() -> None:
    assert safe_node_name("a/b") != safe_node_name("a_b")
    assert safe_node_name("x" * 64 + "/1") != safe_node_name("x" * 64 + "/2")


def test_two_nodes_on_one_data_folder_keep_their_own_files(tmp_path: Path) -> None:
    """Two nodes share a data folder: each has its own pid and status file naming it, the
    folder's files name the node started last, and a clean stop of one marks only its own
    status stopped; ``fiona status`` still finds the service running."""
    data, projects = tmp_path / "data", tmp_path / "projects"
    projects.mkdir()
    names = ["ward/1", "ward:2"]
    nodes = []
    for name in names:
        site = tmp_path / f"{len(nodes)}.yaml"
        site.write_text(
            yaml.safe_dump({"node": {"name": name}, "heartbeat": {"interval_seconds": 1}})
        )
        nodes.append(FionaServer(data, projects, config=site).start())
    try:
        for name, node in zip(names, nodes, strict=True):
            folder = node_dir(data, name)
            assert node.proc is not None
            # Written once the port listens: a moment after the test sees it listen.
            wait_for("its pid file", (folder / "serve.pid").is_file, 30, node)
            assert (folder / "serve.pid").read_text().strip() == str(node.proc.pid)
            assert serve_process(data, name).running
            wait_for("its status file", (folder / "status.json").is_file, 30, node)
            doc = json.loads((folder / "status.json").read_text())
            assert doc["pid"] == node.proc.pid and doc["heartbeat"]["node"] == name
        assert nodes[1].proc is not None
        assert (data / "serve.pid").read_text().strip() == str(nodes[1].proc.pid)
        nodes[1].stop()
        second = json.loads((node_dir(data, names[1]) / "status.json").read_text())
        assert second["running"] is False
        assert not (node_dir(data, names[1]) / "serve.pid").exists()
        first = json.loads((node_dir(data, names[0]) / "status.json").read_text())
        assert first["running"] is True
        assert serve_process(data, names[0]).running
        doc = _status(tmp_path / "0.yaml", data, projects)
        assert doc["service"]["running"] is True
    finally:
        for node in nodes:
            node.stop()


def _node_folder(data: Path, node_id: str, age_days: float, now: float) -> Path:
    """A node's folder with a status.json (and a pid file) last changed ``age_days`` ago."""
    folder = node_dir(data, node_id)
    folder.mkdir(parents=True)
    for name in ("status.json", "serve.pid"):
        (folder / name).write_text("{}")
        os.utime(folder / name, (now - age_days * 86400,) * 2)
    os.utime(folder, (now - age_days * 86400,) * 2)
    return folder


def test_folders_of_nodes_gone_for_a_week_are_pruned(tmp_path: Path) -> None:
    """Unnamed nodes (``<host>/<pid>``) get a new folder at every start: those untouched for a
    week go when a node starts; the starting node's own, a recent one, and anything that is
    not a plain folder of plain files stay."""
    data, now = tmp_path / "data", time.time()
    gone = _node_folder(data, "host/100", 8, now)
    recent = _node_folder(data, "host/200", 2, now)
    own = _node_folder(data, "host/300", 30, now)
    odd = _node_folder(data, "host/400", 30, now)
    (odd / "inner").mkdir()
    os.utime(odd, (now - 30 * 86400,) * 2)
    (data / "nodes" / "link").symlink_to(tmp_path)
    assert prune_node_dirs(data, keep="host/300", now=now) == 1
    assert not gone.exists()
    assert recent.is_dir() and own.is_dir() and odd.is_dir()
    assert (data / "nodes" / "link").is_symlink() and tmp_path.is_dir()
    assert prune_node_dirs(tmp_path / "elsewhere", keep="x", now=now) == 0  # no nodes folder


def test_a_starting_node_prunes_the_folders_of_nodes_long_gone(tmp_path: Path) -> None:
    data, projects = tmp_path / "data", tmp_path / "projects"
    projects.mkdir()
    gone = _node_folder(data, "old-host/4242", 10, time.time())
    node = FionaServer(data, projects).start()
    try:
        wait_for("the old node's folder to go", lambda: not gone.exists(), 30, node)
    finally:
        node.stop()
    assert "removed 1 node folders untouched for 7 days or more (nodes gone)" in node.log_text()
