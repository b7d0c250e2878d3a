"""Work shared between nodes: leases on runs, transfers and retrieval rows, once-per-cluster
locks, the nodes table.

Each node here has its own connection to one real SQLite index file (as two ``fiona serve``
processes have) and its own clock, so a lease running out is a clock moved on, not a wait.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from engine.config.model import SiteConfig
from engine.manage.metrics import render
from engine.manage.status_nodes import node_lines, node_rows
from engine.pipeline.outcome import Done
from engine.pipeline.store import RunState, RunStore
from engine.store.index import open_index
from engine.store.leases import ClusterLocks, LeaseLost, OncePerCluster, Renewer
from engine.store.nodes import Node, NodeStore
from engine.store.retrievals import RetrievalStore, RowSpec, RowState
from engine.transfer.outbox import Outbox, TransferState

T0 = 1_900_000_000.0
LEASE = 60.0


class Clock:
    """A node's wall clock, moved on by the test."""

    def __init__(self, at: float = T0) -> None:
        self.at = at

    def __call__(self) -> float:
        return self.at


class Member:
    """One node: its own index connection, stores and clock."""

    def __init__(self, path: Path, name: str, host: str = "test-host", pid: int = 1) -> None:
        self.node = Node(name, LEASE, host=host, pid=pid)
        self.index = open_index("", path)  # this test's engine (FIONA_TEST_INDEX)
        self.clock = Clock()
        self.runs = RunStore(self.index, self.node)
        self.outbox = Outbox(self.index, path.parent, self.node)
        self.rows = RetrievalStore(self.index, self.node)
        self.locks = ClusterLocks(self.index, self.node, self.clock)
        for leases in (self.runs.leases, self.outbox.leases, self.rows.leases):
            leases.clock = self.clock

    def close(self) -> None:
        for leases in (self.runs.leases, self.outbox.leases, self.rows.leases, self.locks.leases):
            with leases._lock:
                leases._held.clear()  # nothing left for the shared renewer thread
        self.index.close()


@pytest.fixture
def members(tmp_path: Path) -> Callable[[str], Member]:
    path = tmp_path / "data" / "index.sqlite"
    path.parent.mkdir()
    open_index("", path).close()  # created and migrated once
    made: list[Member] = []

    def member(name: str, host: str = "test-host", pid: int = 1) -> Member:
        made.append(Member(path, name, host, pid))
        return made[-1]

    yield member
    for m in made:
        m.close()


def _runs(m: Member, n: int) -> list[int]:
    return [m.runs.create_run(f"1.2.3.{i}", "p", "S", "", 0, ["1.2.3.9"]) for i in range(n)]


def _transfers(m: Member, n: int) -> list[int]:
    return [
        m.outbox.enqueue(
            project="p",
            destination="d",
            study_uid=f"1.2.3.{i}",
            export_uid=f"1.2.3.{i}",
            run_id=i + 1,
            follow_up=0,
            subject="S",
            event="",
            items=[],
            now=T0,
        )
        for i in range(n)
    ]


def _rows(m: Member, n: int) -> list[int]:
    job = m.rows.create_job("pacs", "p", "list", [RowSpec(line=i) for i in range(n)], "t", T0)
    return [r.id for r in m.rows.rows(job)]


def _race(members: list[Member], claim: Callable[[Member], list[int]]) -> list[list[int]]:
    """Every member claims until nothing is left, all at once (one thread each)."""
    start = threading.Barrier(len(members))
    got: list[list[int]] = [[] for _ in members]
    errors: list[BaseException] = []

    def work(i: int, m: Member) -> None:
        try:
            start.wait()
            while found := claim(m):
                got[i] += found
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i, m)) for i, m in enumerate(members)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return got


def test_racing_nodes_never_send_more_than_a_destinations_concurrency(
    members: Callable[[str], Member],
) -> None:
    """Four nodes claim due transfers of one destination (concurrency 1) at the same instant,
    round after round: one transfer is sending each time. On PostgreSQL the claims take turns
    on an advisory lock; without it two nodes could both count none sending and both claim."""
    nodes = [members(f"node-{i}") for i in range(4)]
    for attempt in range(10):
        for i in range(4):
            nodes[0].outbox.enqueue(
                project="p", destination="d", study_uid=f"1.2.{attempt}.{i}",
                export_uid=f"1.2.{attempt}.{i}", run_id=10 * attempt + i + 1, follow_up=0,
                subject="S", event="", items=[], now=T0,
            )  # fmt: skip
        start = threading.Barrier(len(nodes))
        claimed: list[int] = []

        def claim(m: Member, start: threading.Barrier = start, out: list[int] = claimed) -> None:
            start.wait()
            out.extend(t.id for t in m.outbox.claim_due(T0, {("p", "d"): 1}))

        threads = [threading.Thread(target=claim, args=(m,)) for m in nodes]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(claimed) == 1, f"round {attempt}: {claimed}"
        with nodes[0].index.transaction() as db:  # every transfer of the round ends
            db.execute("UPDATE transfers SET state = 'done', claimed_by = NULL")


def test_every_run_transfer_and_row_is_claimed_exactly_once_by_racing_nodes(
    members: Callable[[str], Member],
) -> None:
    nodes = [members(f"node-{i}") for i in range(3)]
    runs, transfers, rows = _runs(nodes[0], 60), _transfers(nodes[0], 60), _rows(nodes[0], 60)

    def claim_run(m: Member) -> list[int]:
        after = max(getattr(m, "after", 0), 0)
        run = m.runs.claim_next(T0, ["p"], after)
        if run is None:
            return []
        m.after = run.id  # type: ignore[attr-defined]
        return [run.id]

    taken = [0]
    count = threading.Lock()

    def claim_transfers(m: Member) -> list[int]:
        # Two more than are sending in the cluster: each claim takes one or two.
        found = [t.id for t in m.outbox.claim_due(T0, {("p", "d"): taken[0] + 2})]
        with count:
            taken[0] += len(found)
        return found

    def claim_rows(m: Member) -> list[int]:
        row = m.rows.next_queued("pacs")
        while row is not None and not m.rows.claim(row.id, T0):
            row = m.rows.next_queued("pacs")
        return [] if row is None else [row.id]

    for claim, made in ((claim_run, runs), (claim_transfers, transfers), (claim_rows, rows)):
        got = _race(nodes, claim)
        flat = [i for g in got for i in g]
        assert sorted(flat) == sorted(made), claim.__name__  # each exactly once, none left
    held = {n["id"]: n["holds"] for n in NodeStore(nodes[0].index).nodes()}
    assert held == {}  # no node registered: holds are listed per registered node
    for m in nodes:
        NodeStore(m.index).register(m.node, "test", now=T0)
    listed = NodeStore(nodes[0].index).nodes()
    assert sum(n["holds"]["runs"] for n in listed) == 60
    assert sum(n["holds"]["transfers"] for n in listed) == 60
    assert sum(n["holds"]["retrieval_rows"] for n in listed) == 60


def test_a_dead_nodes_run_is_taken_over_after_its_lease_and_the_old_holder_writes_nothing(
    members: Callable[[str], Member],
) -> None:
    a, b = members("a"), members("b")
    [run_id] = _runs(a, 1)
    run = a.runs.claim_next(T0, ["p"])
    assert run is not None and run.id == run_id
    assert b.runs.claim_next(T0, ["p"]) is None  # held by a
    b.clock.at = T0 + LEASE - 1
    assert b.runs.claim_next(T0, ["p"]) is None  # a's lease has a second left
    b.clock.at = T0 + LEASE + 1  # a stopped renewing: its lease ran out
    taken = b.runs.claim_next(T0, ["p"])
    assert taken is not None and taken.id == run_id
    # a comes back (it was only paused): whatever it records is refused, nothing is written.
    with pytest.raises(LeaseLost):
        a.runs.record_step(run_id, 0, "anonymize", Done("x"), state={"k": 1}, now=T0)
    with pytest.raises(LeaseLost):
        a.runs.finish(run_id, RunState.DONE, now=T0)
    assert a.runs.steps(run_id) == []
    record = b.runs.get(run_id)
    assert record is not None and record.state is RunState.RUNNING
    # b finishes it and lets go.
    b.runs.record_step(run_id, 0, "anonymize", Done("x"), state={"k": 1}, now=T0)
    b.runs.finish(run_id, RunState.DONE, now=T0)
    done = b.runs.get(run_id)
    assert done is not None and done.state is RunState.DONE
    assert not b.runs.leases.holds(run_id)


def test_a_renewed_lease_keeps_the_work_and_a_lost_one_is_noticed(
    members: Callable[[str], Member],
) -> None:
    a, b = members("a"), members("b")
    [tid] = _transfers(a, 1)
    [claimed] = a.outbox.claim_due(T0, {("p", "d"): 1})
    a.clock.at = T0 + 50
    assert a.outbox.leases.renew() == set()  # now held until T0 + 110
    b.clock.at = T0 + 100
    assert b.outbox.claim_due(T0, {("p", "d"): 1}) == []
    b.clock.at = T0 + 111
    assert [t.id for t in b.outbox.claim_due(T0, {("p", "d"): 1})] == [tid]
    # a's next renewal finds b holding it: lost, and a's outcome is not written.
    assert a.outbox.leases.renew() == {tid}
    assert a.outbox.leases.lost(tid)
    with pytest.raises(LeaseLost):
        a.outbox.finish(tid)
    record = b.outbox.get(tid)
    assert record is not None and record.state is TransferState.SENDING
    b.outbox.finish(tid)
    record = b.outbox.get(tid)
    assert record is not None and record.state is TransferState.DONE
    assert claimed.id == tid


def test_the_renewer_renews_every_held_lease(members: Callable[[str], Member]) -> None:
    a, b = members("a"), members("b")
    [row] = _rows(a, 1)
    assert a.rows.claim(row, T0)
    a.clock.at = T0 + 40
    Renewer.shared().renew_all()  # what its thread does every third of a lease
    b.clock.at = T0 + LEASE + 1
    assert not b.rows.claim(row, T0)  # renewed at T0 + 40: held until T0 + 100
    a.rows.update(row, T0, RowState.DONE, reason="")  # finished: released
    assert not a.rows.leases.holds(row)
    assert b.rows.next_queued("pacs") is None  # done, nothing to claim


def test_a_node_started_again_under_its_name_takes_its_leftovers_back_at_once(
    members: Callable[..., Member],
) -> None:
    first = members("fixed-name")
    [tid] = _transfers(first, 1)
    assert len(first.outbox.claim_due(T0, {("p", "d"): 1})) == 1
    with first.outbox.leases._lock:
        first.outbox.leases._held.clear()  # the process died
    again = members("fixed-name")  # the same node.name, a new process
    other = members("other")
    assert again.outbox.claim_due(T0, {("p", "d"): 1}) == []  # still leased
    assert again.outbox.take_back_own() == 1
    assert other.outbox.claim_due(T0, {("p", "d"): 0}) == []
    assert [t.id for t in again.outbox.claim_due(T0, {("p", "d"): 1})] == [tid]


def test_a_new_node_on_the_host_of_a_dead_one_takes_its_work_at_once(
    members: Callable[..., Member],
) -> None:
    """An unnamed node killed and started again is a new ``<host>/<pid>``: the work its dead
    process held on this host is free at once; a live process's and another host's wait."""
    import socket
    import subprocess

    here = socket.gethostname()
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid whose process has ended
    alive = subprocess.Popen(["sleep", "60"])
    try:
        owners = {
            "dead-here": (here, gone.pid),
            "alive-here": (here, alive.pid),
            "dead-elsewhere": ("other-host", gone.pid),
        }
        tids = {}
        for i, (name, (host, pid)) in enumerate(owners.items()):
            m = members(name, host, pid)
            NodeStore(m.index).register(m.node, "test", now=T0)
            tids[name] = m.outbox.enqueue(
                project="p",
                destination="d",
                study_uid=f"1.2.4.{i}",
                export_uid=f"1.2.4.{i}",
                run_id=i + 1,
                follow_up=0,
                subject="S",
                event="",
                items=[],
                now=T0,
            )
            assert [t.id for t in m.outbox.claim_due(T0, {("p", "d"): 3})] == [tids[name]]
        newcomer = members("newcomer", here, alive.pid + 100000)
        assert newcomer.outbox.claim_due(T0 + 1, {("p", "d"): 3}) == []  # all still leased
        assert NodeStore(newcomer.index).take_over_dead_here(newcomer.node) == 1
        taken = newcomer.outbox.claim_due(T0 + 1, {("p", "d"): 3})
        assert [t.id for t in taken] == [tids["dead-here"]]
        dead_row = NodeStore(newcomer.index).get("dead-here")
        assert dead_row is not None and dead_row["stopped_at"] is not None
    finally:
        alive.kill()
        alive.wait()


def test_concurrency_of_a_destination_counts_every_nodes_transfers(
    members: Callable[[str], Member],
) -> None:
    a, b = members("a"), members("b")
    _transfers(a, 3)
    assert len(a.outbox.claim_due(T0, {("p", "d"): 2})) == 2
    assert b.outbox.claim_due(T0, {("p", "d"): 2}) == []  # two sending already, in the cluster


def test_a_once_per_cluster_job_runs_on_one_node_until_its_lease_runs_out(
    members: Callable[[str], Member],
) -> None:
    a, b = members("a"), members("b")
    ran: list[str] = []
    job_a = OncePerCluster("retention", lambda: ran.append("a"), a.locks)
    job_b = OncePerCluster("retention", lambda: ran.append("b"), b.locks)
    for _ in range(3):
        job_a()
        job_b()
    assert ran == ["a", "a", "a"]  # b skips every tick: a holds the lock
    assert b.locks.holders() == {"retention": ("a", T0 + LEASE)}
    b.clock.at = T0 + LEASE + 1  # a died
    job_b()
    a.clock.at = T0 + LEASE + 2
    job_a()
    assert ran == ["a", "a", "a", "b"]
    NodeStore(b.index).stopped(b.node)  # a clean stop lets go of its jobs
    job_a()
    assert ran[-1] == "a"


def test_nodes_are_listed_with_heartbeat_holds_and_stale_ones_flagged(
    members: Callable[[str], Member],
) -> None:
    a, b = members("a"), members("b")
    store = NodeStore(a.index)
    store.register(a.node, "1.0", now=T0)
    store.register(Node("b", LEASE, host="elsewhere", pid=2), "1.0", now=T0)
    _runs(a, 2)
    assert a.runs.claim_next(T0, ["p"]) is not None
    b.clock.at = T0
    assert b.locks.acquire("tracker")
    store.beat(Node("b", LEASE, host="elsewhere", pid=2), now=T0 + 300)
    rows = {n["id"]: n for n in node_rows(a.index, 60.0, 3, T0 + 300)}
    assert rows["a"]["state"] == "stale"  # no heartbeat for 300 s: more than 3 intervals
    assert rows["b"]["state"] == "running"
    assert rows["a"]["holds"] == {"runs": 1, "transfers": 0, "retrieval_rows": 0}
    assert rows["b"]["jobs"] == ["tracker"]
    text = "\n".join(node_lines(list(rows.values())))
    assert "STALE" in text and "runs 1, transfers 0" in text
    body, _ = render(SiteConfig(data_dir=a.index.path.parent), a.index)
    assert b'fiona_node_heartbeat_age_seconds{node="a"}' in body
    assert b'fiona_node_heartbeat_age_seconds{node="b"}' in body
    store.stopped(a.node, now=T0 + 301)
    rows = {n["id"]: n for n in node_rows(a.index, 60.0, 3, T0 + 301)}
    assert rows["a"]["state"] == "stopped"
    assert rows["a"]["holds"]["runs"] == 0  # released by the clean stop
    body, _ = render(SiteConfig(data_dir=a.index.path.parent), a.index)
    assert b'node="a"' not in body  # a clean stop is no alert


def test_an_operator_ending_a_run_stops_the_node_working_on_it(
    members: Callable[[str], Member],
) -> None:
    a, operator = members("a"), members("operator")
    [run_id] = _runs(a, 1)
    assert a.runs.claim_next(T0, ["p"]) is not None
    # fiona quarantine discard (another process, which never claimed the run) ends it.
    operator.runs.finish(run_id, RunState.FAILED, "discarded", now=T0)
    with pytest.raises(LeaseLost):
        a.runs.record_step(run_id, 0, "anonymize", Done("x"), now=T0)
    record = operator.runs.get(run_id)
    assert record is not None and record.state is RunState.FAILED
    assert NodeStore(a.index).nodes() == []  # nothing registered, nothing held


def test_the_claims_pass_over_locked_rows_on_postgresql_only() -> None:
    import sqlite3

    from engine.store.leases import skip_locked

    class PgConnection:  # what a psycopg connection adapter names itself
        dialect = "postgresql"

    assert skip_locked(sqlite3.connect(":memory:")) == ""
    assert skip_locked(PgConnection()) == " FOR UPDATE SKIP LOCKED"
