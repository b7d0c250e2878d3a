"""The retrieval worker honours a PACS's time windows, studies per hour and associations
across the nodes sharing the index (no PACS needed: one that cannot be reached shows whether
the worker tried it), and tries C-GET again some time after a PACS refused it."""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path

import pytest

from engine.config.loader import load_site
from engine.config.pacs import RetrieveMethod
from engine.retrieve.row import GetRefused
from engine.retrieve.worker import GET_RETRY_SECONDS, RetrieveWorker
from engine.store.index import open_index
from engine.store.nodes import Node, NodeStore, this_node
from engine.store.retrievals import RetrievalStore, RowSpec, RowState
from tests.peers import free_port

MONDAY_NOON = dt.datetime(2026, 12, 7, 12, 0)
MONDAY_NIGHT = dt.datetime(2026, 12, 7, 22, 0)


def _site(tmp_path: Path, limits: str) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(
        "data_dir: data\npacs:\n"
        f"  - {{name: clinical, ae_title: PACS, host: 127.0.0.1, port: {free_port()},"
        f" limits: {limits}}}\n"
    )
    return path


@pytest.mark.parametrize(
    ("windows", "when", "tried"),
    [
        ('["Mon-Fri 19:00-07:00"]', MONDAY_NOON, False),
        ('["Mon-Fri 19:00-07:00"]', MONDAY_NIGHT, True),
        ("[Sat-Sun]", MONDAY_NIGHT, False),
        ("[]", MONDAY_NOON, True),
    ],
)
def test_time_windows(tmp_path: Path, windows: str, when: dt.datetime, tried: bool) -> None:
    site = load_site(_site(tmp_path, f"{{windows: {windows}}}"))
    index = open_index("", site.data_dir / "index.sqlite")
    store = RetrievalStore(index)
    job = store.create_job("clinical", "", "list.csv", [RowSpec(2, accession="A1")], "t", 0.0)
    worker = RetrieveWorker(site, index, local_now=lambda: when)
    worker()
    worker.drain()
    (row,) = store.rows(job)
    assert row.state is RowState.QUEUED
    assert row.attempts == (1 if tried else 0)
    assert ("cannot connect" in row.reason) is tried
    index.close()


@pytest.mark.parametrize(("finished_ago", "tried"), [(600.0, False), (7200.0, True)])
def test_studies_per_hour(tmp_path: Path, finished_ago: float, tried: bool) -> None:
    site = load_site(_site(tmp_path, "{studies_per_hour: 2}"))
    index = open_index("", site.data_dir / "index.sqlite")
    store = RetrievalStore(index)
    now = 1_800_000_000.0
    rows = [RowSpec(2, accession="A1"), RowSpec(3, accession="A2")]
    job = store.create_job("clinical", "", "list.csv", rows, "t", now - 8000)
    done = store.rows(job)[0]
    # The first row retrieved two studies, finished_ago seconds ago.
    store.update(done.id, now - finished_ago, RowState.DONE, studies=2)
    worker = RetrieveWorker(site, index, clock=lambda: now, local_now=lambda: MONDAY_NOON)
    worker()
    worker.drain()
    second = store.rows(job)[1]
    assert second.state is RowState.QUEUED
    assert second.attempts == (1 if tried else 0)
    index.close()


def test_max_associations_counts_the_rows_every_node_works(tmp_path: Path) -> None:
    index = open_index("", tmp_path / "index.sqlite")
    a = RetrievalStore(index, Node("node-a", 60.0, host="h", pid=1))
    b = RetrievalStore(index, Node("node-b", 60.0, host="h", pid=2))
    specs = [RowSpec(i, accession=f"A{i}") for i in range(2, 6)]
    rows = [r.id for r in a.rows(a.create_job("clinical", "", "list.csv", specs, "t", 0.0))]
    assert a.claim(rows[0], 1.0, "clinical", 2)
    assert b.claim(rows[1], 1.0, "clinical", 2)
    assert a.under_way("clinical") == b.under_way("clinical") == 2
    assert not b.claim(rows[2], 1.0, "clinical", 2)  # two associations in the cluster already
    assert not a.claim(rows[2], 1.0, "clinical", 2)
    assert a.under_way("other-pacs") == 0
    a.update(rows[0], 2.0, RowState.DONE)
    assert b.claim(rows[2], 2.0, "clinical", 2)
    index.close()


def test_the_worker_starts_no_lane_while_other_nodes_fill_the_limit(tmp_path: Path) -> None:
    site = load_site(_site(tmp_path, "{max_associations: 1}"))
    index = open_index("", site.data_dir / "index.sqlite")
    other = RetrievalStore(index, Node("elsewhere", 60.0, host="h", pid=2))
    specs = [RowSpec(2, accession="A1"), RowSpec(3, accession="A2")]
    job = other.create_job("clinical", "", "list.csv", specs, "t", 0.0)
    held, queued = other.rows(job)
    assert other.claim(held.id, 1.0, "clinical", 1)  # the other node's one association
    worker = RetrieveWorker(site, index, local_now=lambda: MONDAY_NOON)
    worker()
    worker.drain()
    row = RetrievalStore(index).rows(job)[1]
    assert row.id == queued.id and row.state is RowState.QUEUED
    assert row.attempts == 0  # not tried: the PACS's one association is in use
    other.update(held.id, 2.0, RowState.DONE)
    worker()
    worker.drain()
    assert RetrievalStore(index).rows(job)[1].attempts == 1  # tried now (it cannot be reached)
    index.close()


def test_each_running_node_takes_its_share_of_the_associations(tmp_path: Path) -> None:
    """Every node runs the retrieval job; with two running, each starts lanes for half of a
    PACS's max_associations (rounded up), so C-GET's filing spreads over both processes."""
    site = load_site(_site(tmp_path, "{max_associations: 3}"))
    (pacs,) = site.pacs
    index = open_index("", site.data_dir / "index.sqlite")
    now = 1_800_000_000.0
    worker = RetrieveWorker(site, index, clock=lambda: now, local_now=lambda: MONDAY_NOON)
    nodes = NodeStore(index)
    nodes.register(this_node(), "test", now)
    assert worker._share(pacs) == 3
    nodes.register(Node("elsewhere", 60.0, host="h", pid=2), "test", now - 10)
    assert worker._share(pacs) == 2  # 3 over 2 nodes, rounded up
    nodes.register(Node("gone", 60.0, host="h", pid=3), "test", now - 4 * 60)  # stale
    nodes.register(Node("stopped", 60.0, host="h", pid=4), "test", now)
    nodes.stopped(Node("stopped", 60.0, host="h", pid=4), now)
    assert worker._share(pacs) == 2
    store = RetrievalStore(index)
    specs = [RowSpec(i, accession=f"A{i}") for i in range(2, 6)]
    store.create_job("clinical", "", "list.csv", specs, "t", now)
    worker()
    assert len(worker._lanes) == 2  # its share, not the PACS's three
    worker.drain()
    index.close()


def test_c_get_is_tried_again_for_the_next_job_or_after_a_while(tmp_path: Path) -> None:
    site = load_site(_site(tmp_path, "{}"))
    text = site.source.read_text().replace("limits: {}", "retrieve: get, on_get_refused: move")
    site.source.write_text(text)
    site = load_site(site.source)
    (pacs,) = site.pacs
    index = open_index("", site.data_dir / "index.sqlite")
    store = RetrievalStore(index)
    job = store.create_job("clinical", "", "list.csv", [RowSpec(2, accession="A1")], "t", 0.0)
    (row,) = store.rows(job)
    now = [1_800_000_000.0]
    worker = RetrieveWorker(site, index, clock=lambda: now[0], local_now=lambda: MONDAY_NOON)
    assert worker.method_for(pacs, job) is RetrieveMethod.GET
    # The PACS refuses C-GET: this row is fetched by C-MOVE at once (it cannot be reached).
    worker._get_refused(pacs, row, _NoLane(), GetRefused("PACS clinical: refused"))
    assert worker.method_for(pacs, job) is RetrieveMethod.MOVE
    now[0] += GET_RETRY_SECONDS - 1
    assert worker.method_for(pacs, job) is RetrieveMethod.MOVE  # the same job, within the hour
    assert worker.method_for(pacs, job + 1) is RetrieveMethod.GET  # another job: C-GET again
    worker._get_refused(pacs, row, _NoLane(), GetRefused("PACS clinical: refused"))
    assert worker.method_for(pacs, job) is RetrieveMethod.MOVE
    now[0] += GET_RETRY_SECONDS
    assert worker.method_for(pacs, job) is RetrieveMethod.GET  # an hour on: C-GET again
    index.close()


class _NoLane:
    """A lane whose PACS cannot be reached."""

    reused = False

    def open(self, method: RetrieveMethod) -> None:
        from engine.net.scu import AssociationBroken

        raise AssociationBroken(f"cannot connect ({method})")

    def drop(self) -> None:
        pass


def _claim_at_once(nodes: list[RetrievalStore], rows: list[int], limit: int) -> list[bool]:
    """Each node claims its row of PACS ``clinical`` in its own thread, all at one instant."""
    start = threading.Barrier(len(nodes))
    won: list[bool] = []

    def claim(store: RetrievalStore, row: int) -> None:
        start.wait()
        won.append(store.claim(row, 1.0, "clinical", limit))

    threads = [
        threading.Thread(target=claim, args=(node, row))
        for node, row in zip(nodes, rows, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return won


def test_claims_at_the_same_instant_never_pass_the_limit(tmp_path: Path) -> None:
    """Four nodes claim a row of one PACS (limit 1) at once, many times over: one gets it each
    time. On PostgreSQL the claims of a PACS take turns on an advisory lock; without it two
    transactions could both count none under way and both claim."""
    index = open_index("", tmp_path / "index.sqlite")
    nodes = [RetrievalStore(index, Node(f"node-{k}", 60.0, host="h", pid=k + 1)) for k in range(4)]
    for attempt in range(12):
        specs = [RowSpec(k + 2, accession=f"A{attempt}-{k}") for k in range(len(nodes))]
        job = nodes[0].create_job("clinical", "", "list.csv", specs, "t", 0.0)
        rows = [r.id for r in nodes[0].rows(job)]
        won = _claim_at_once(nodes, rows, 1)
        assert won.count(True) == 1, f"attempt {attempt}: {won}"
        assert nodes[0].under_way("clinical") == 1
        for node, row in zip(nodes, rows, strict=True):
            node.update(row, 2.0, RowState.DONE)  # only its holder's write counts
    index.close()
