"""Waiting for the index: the back-off of scheduled jobs, the one log line each way, and that an
index outage is never counted as a step's failure (the real PostgreSQL restarts are in
tests/test_cluster_faults.py and tests/test_cluster_netns.py)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.daemon import WaitsForIndex
from engine.pipeline.context import RunContext
from engine.pipeline.outcome import Done, Outcome
from engine.pipeline.steps.base import Step
from engine.pipeline.store import RunState
from engine.store.archive import Archive
from engine.store.db import IndexUnavailable
from engine.store.index import SqliteIndex, open_index
from engine.store.leases import LeaseLost, Renewer
from engine.store.outage import OUTAGE, Backoff, IndexOutage
from engine.transfer.outbox import TransferState
from tests import synth
from tests.test_cluster import LEASE, T0, Member, _runs
from tests.test_group_commit import ORIGIN, part10
from tests.test_outbox import T0 as T0_OUTBOX
from tests.test_outbox import Rig
from tests.test_pipeline import NOW, Record, World, _one_run


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def fresh_outage() -> Iterator[None]:
    OUTAGE.since, OUTAGE.back_at = None, float("-inf")
    yield
    OUTAGE.since, OUTAGE.back_at = None, float("-inf")


def test_the_backoff_doubles_from_one_second_to_thirty() -> None:
    clock = Clock()
    backoff = Backoff(clock=clock)
    assert backoff.due()
    assert [backoff.failed() for _ in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    assert not backoff.due()
    clock.now += 30
    assert backoff.due()
    backoff.succeeded()
    assert backoff.failed() == 1


def test_a_job_waits_for_the_index_with_one_line_each_way(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    clock = Clock()
    calls: list[float] = []
    down = {"left": 3}

    def job() -> None:
        calls.append(clock.now)
        if down["left"]:
            down["left"] -= 1
            raise IndexUnavailable("the index database went away (host db:5432)")

    wrapped = WaitsForIndex(job, Backoff(clock=clock))
    for _ in range(40):  # a tick every 0.5 s for 20 s
        wrapped()
        clock.now += 0.5
    # Tried at once, after 1 s, after 2 s more, then every tick again.
    assert calls[:4] == [100.0, 101.0, 103.0, 107.0]
    assert len(calls) == 4 + (120.0 - 107.5) / 0.5
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.getMessage().split(" (")[0].split(" after")[0] for r in warnings] == [
        "index unavailable",
        "index available again",
    ]
    assert all(r.exc_info is None for r in caplog.records)


def test_calls_begun_before_a_change_do_not_say_the_index_changed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A call begun before the outage was noticed that returns after it says nothing of the
    index now; a call begun before it came back that fails late is of the outage that ended."""
    clock = Clock()
    outage = IndexOutage(clock)
    early = outage.now()
    clock.now += 1
    outage.went_away(IndexUnavailable("gone"))
    outage.is_back(early)  # began before: no word on the index now
    assert outage.away
    clock.now += 1
    during = outage.now()
    clock.now += 1
    outage.is_back(outage.now())
    assert not outage.away
    outage.went_away(IndexUnavailable("gone"), during)  # a late failure of the old outage
    assert not outage.away
    lines = [r.getMessage()[:22] for r in caplog.records if r.levelno >= logging.WARNING]
    assert lines == ["index unavailable (gon", "index available again "]


def test_the_wrapper_passes_the_jobs_attributes_through() -> None:
    class Job:
        interval = 42.0

        def __call__(self) -> None:
            pass

    assert WaitsForIndex(Job()).interval == 42.0


class IndexAway(Step):
    """A step whose read of the index fails: the database went away."""

    name = "away"

    def run(self, ctx: RunContext) -> Outcome:
        raise IndexUnavailable("the index database went away")


def test_an_index_outage_in_a_step_is_no_attempt_of_the_step(world_: World) -> None:
    """The run is left as it was (no attempt counted, no step recorded, released) and the
    outage reaches the scan's wrapper; once the index is back the run goes on."""
    world = world_
    run_id = _one_run(world)
    f = world.project
    with pytest.raises(IndexUnavailable):
        world.runner([Record({"tag": "a"}, f), IndexAway({}, f)]).run_pending(NOW)
    run = world.run(run_id)
    assert run.attempts == 0 and run.state in (RunState.PENDING, RunState.RUNNING)
    assert world.rows("SELECT idx, state FROM pipeline_steps WHERE run_id = ?", run_id) == [
        (0, "done")
    ]
    assert world.rows("SELECT claimed_by FROM pipeline_runs") == [(None,)]
    runner = world.runner([Record({"tag": "a"}, f), Record({"tag": "b"}, f)])
    assert runner.run_pending(NOW) == 1
    assert world.run(run_id).state == RunState.DONE


@pytest.fixture
def world_(tmp_path: Path) -> World:
    return World(tmp_path)


# --------------------------------------------------------------------------- leases


@pytest.fixture
def members(tmp_path: Path) -> Iterator[Callable[[str], Member]]:
    """Nodes on one index, as tests/test_cluster.py makes them."""
    path = tmp_path / "data" / "index.sqlite"
    path.parent.mkdir()
    open_index("", path).close()
    made: list[Member] = []

    def member(name: str) -> Member:
        made.append(Member(path, name))
        return made[-1]

    yield member
    for m in made:
        m.close()


class Away:
    """An index that is away while ``down`` (every block raises IndexUnavailable)."""

    def __init__(self, index: Any) -> None:
        self.index = index
        self.down = True

    def transaction(self) -> Any:
        if self.down:
            raise IndexUnavailable("the index database went away")
        return self.index.transaction()

    def reading(self) -> Any:
        if self.down:
            raise IndexUnavailable("the index database went away")
        return self.index.reading()


def test_leases_are_not_lost_while_the_index_is_away(
    members: Callable[[str], Member], caplog: pytest.LogCaptureFixture
) -> None:
    """The renewer finds the index away past the lease's end: nothing is marked lost, one
    warning; back, and nobody having claimed the run meanwhile, the node still holds it and
    its outcome is written."""
    a = members("a")
    [run_id] = _runs(a, 1)
    assert a.runs.claim_next(T0, ["p"]) is not None
    away = Away(a.runs.leases.index)
    a.runs.leases.index = away
    a.clock.at = T0 + LEASE + 5  # the lease ran out during the outage
    for _ in range(3):
        Renewer.shared().renew_all()
    assert a.runs.leases.holds(run_id) and not a.runs.leases.lost(run_id)
    assert [r.getMessage()[:17] for r in caplog.records if r.levelno >= logging.WARNING] == [
        "index unavailable"
    ]
    away.down = False
    assert a.runs.leases.renew() == set()
    a.runs.record_step(run_id, 0, "anonymize", Done("x"), now=T0)
    a.runs.finish(run_id, RunState.DONE, now=T0)
    record = a.runs.get(run_id)
    assert record is not None and record.state is RunState.DONE


def test_a_lease_another_node_took_during_the_outage_is_lost_on_return(
    members: Callable[[str], Member],
) -> None:
    """Another node reached the index first and claimed the run whose lease ran out: this
    node's renewal on return finds it lost, and its outcome is refused, nothing written."""
    a, b = members("a"), members("b")
    [run_id] = _runs(a, 1)
    assert a.runs.claim_next(T0, ["p"]) is not None
    away = Away(a.runs.leases.index)
    a.runs.leases.index = away
    a.clock.at = T0 + LEASE + 5
    Renewer.shared().renew_all()
    b.clock.at = T0 + LEASE + 5
    taken = b.runs.claim_next(T0, ["p"])
    assert taken is not None and taken.id == run_id
    away.down = False
    assert a.runs.leases.renew() == {run_id}
    with pytest.raises(LeaseLost):
        a.runs.record_step(run_id, 0, "anonymize", Done("x"), now=T0)
    assert a.runs.steps(run_id) == []


def test_a_release_the_index_cannot_take_lets_the_lease_run_out(
    members: Callable[[str], Member],
) -> None:
    """A release during the outage is not renewed afterwards (before, the renewer kept the
    run for ever): once its lease has run out, any node claims it."""
    a, b = members("a"), members("b")
    [run_id] = _runs(a, 1)
    assert a.runs.claim_next(T0, ["p"]) is not None
    away = Away(a.runs.leases.index)
    a.runs.leases.index = away
    with pytest.raises(IndexUnavailable):
        a.runs.release(run_id)
    assert not a.runs.leases.holds(run_id)
    away.down = False
    a.clock.at = T0 + LEASE - 1
    Renewer.shared().renew_all()  # renews nothing of it
    b.clock.at = T0 + LEASE + 1
    taken = b.runs.claim_next(T0, ["p"])
    assert taken is not None and taken.id == run_id


# --------------------------------------------------------------------------- transfers


def test_an_index_outage_mid_transfer_is_no_attempt_and_sends_nothing_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The index goes away while a transfer records what the peer confirmed: the transfer
    stops there, stays sending (no failed attempt, no dead letter, no traceback) and, once the
    index is back, goes on without sending the instances confirmed before again."""
    rig = Rig(tmp_path)
    try:
        rig.share.mkdir()
        tid = rig.enqueue()
        confirm = rig.outbox.confirm
        calls = {"n": 0}

        def confirm_until_away(*args: Any, **kwargs: Any) -> None:
            calls["n"] += 1
            if calls["n"] > 2:
                raise IndexUnavailable("the index database went away")
            confirm(*args, **kwargs)

        monkeypatch.setattr(rig.outbox, "confirm", confirm_until_away)
        assert rig.run_due(T0_OUTBOX) == 1
        record = rig.outbox.get(tid)
        assert record is not None
        assert (record.state, record.attempts, record.last_error) == (
            TransferState.SENDING,
            0,
            "",
        )
        assert record.n_sent == 2
        assert all(r.exc_info is None for r in caplog.records)
        first_two = {
            p.name: p.stat().st_mtime_ns
            for p in rig.delivered()
            if p.stem in {i.sop_instance_uid for i in rig.outbox.items(tid) if i.state == "sent"}
        }
        assert len(first_two) == 2
        monkeypatch.setattr(rig.outbox, "confirm", confirm)  # the index is back
        rig.run_due(T0_OUTBOX)
        record = rig.outbox.get(tid)
        assert record is not None and record.state is TransferState.DONE, record.last_error
        again = {p.name: p.stat().st_mtime_ns for p in rig.delivered() if p.name in first_two}
        assert again == first_two  # not written again
    finally:
        rig.close()


class _CommitAnswerLost(SqliteIndex):
    """A real index whose first add commits, then reports the connection lost: what a
    PostgreSQL connection that breaks while the COMMIT's answer is on its way looks like."""

    lost = False

    def add_instance(self, *args: Any, **kwargs: Any) -> Any:
        result = super().add_instance(*args, **kwargs)
        if not self.lost:
            self.lost = True
            raise IndexUnavailable("connection lost during COMMIT")
        return result


def test_an_add_whose_commit_answer_is_lost_keeps_its_file(tmp_path: Path) -> None:
    """Refused (0xA700: the sender tries again) but the file stays: when the row was committed
    the index never names a file that is gone; the retry is then a duplicate, answered
    Success."""
    ds = synth.make_study(synth.make_study_spec(5), [synth.MR_SERIES["t2_tse"]], size=8)[0]
    index = _CommitAnswerLost(tmp_path / "index.sqlite")
    archive = Archive(tmp_path, index)
    first = archive.receive(part10(ds), ORIGIN)
    assert first.status == 0xA700
    found = index.find_instance(str(ds.SOPInstanceUID))
    assert found is not None and (tmp_path / found.path).is_file()
    again = archive.receive(part10(ds), ORIGIN)
    assert again.status == 0x0000
    assert (tmp_path / found.path).is_file()
    index.close()
