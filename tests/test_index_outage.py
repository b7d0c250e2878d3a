"""Waiting for the index: the back-off of scheduled jobs, the one log line each way, and that an
index outage is never counted as a step's failure (the real PostgreSQL restarts are in
tests/test_cluster_faults.py and tests/test_cluster_netns.py)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.daemon import WaitsForIndex
from engine.pipeline.context import RunContext
from engine.pipeline.outcome import Outcome
from engine.pipeline.steps.base import Step
from engine.pipeline.store import RunState
from engine.store.db import IndexUnavailable
from engine.store.outage import OUTAGE, Backoff
from tests.test_pipeline import NOW, Record, World, _one_run


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def fresh_outage() -> Iterator[None]:
    OUTAGE.since = None
    yield
    OUTAGE.since = None


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
