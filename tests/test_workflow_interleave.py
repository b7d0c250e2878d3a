"""While a node works through a queue of pipeline runs, its tracker still runs (between runs,
once ``scan_interval`` has passed), so studies complete on time and their runs are there for
the other nodes; a run the tracker creates meanwhile is worked in the same pass."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from engine.config.loader import load_site
from engine.store.index import open_index
from engine.workflow import Workflow
from tests.test_pipeline import NOW, Record, World, world  # noqa: F401  (the fixture)


def test_the_runner_calls_between_after_each_run_and_works_runs_made_meanwhile(
    world: World,  # noqa: F811
) -> None:
    first = [world.store.create_run(f"1.2.3.{k}", "p", "S", "", 0, ["1.2.3.9"]) for k in range(3)]
    made: list[int] = []

    def between() -> None:  # the tracker completing a study while the runs go on
        if not made:
            made.append(world.store.create_run("1.2.3.99", "p", "S", "", 0, ["1.2.3.9"]))

    runner = world.runner([Record({"tag": "a"}, world.project)])
    assert runner.run_pending(NOW, between=between) == 4
    assert all(world.run(r).state.value == "done" for r in [*first, *made])


def _workflow(tmp_path: Path, interval: float) -> Workflow:
    site_file = tmp_path / "site.yaml"
    site_file.write_text(f"data_dir: data\nscan_interval_seconds: {interval}\n")
    site = load_site(site_file)
    return Workflow(open_index("", site.data_dir / "index.sqlite"), site, [])


def _fake_runs(count: int, seconds: float) -> Callable[..., int]:
    """A runner pass of ``count`` runs of ``seconds`` each, calling ``between`` after each."""

    def run_pending(now: float, between: Callable[[], None] | None = None) -> int:
        for _ in range(count):
            time.sleep(seconds)
            if between is not None:
                between()
        return count

    return run_pending


def test_the_tracker_runs_between_runs_once_the_scan_interval_has_passed(
    tmp_path: Path,
) -> None:
    workflow = _workflow(tmp_path, 0.2)
    scans: list[float] = []
    workflow.tracker.scan = lambda now: scans.append(now)  # type: ignore[method-assign]
    workflow.runner.run_pending = _fake_runs(4, 0.12)  # type: ignore[method-assign]
    workflow.scan()
    # At the start, then after runs 2 and 4 (0.24 s since the last pass each time).
    assert len(scans) == 3
    assert scans == sorted(scans) and scans[-1] - scans[0] >= 0.4
    workflow.index.close()


def test_a_scan_at_a_given_time_is_one_pass(tmp_path: Path) -> None:
    """With ``now`` given (tests, one-shot tools) the pass is what it always was: the tracker
    once, then the runs."""
    workflow = _workflow(tmp_path, 0.2)
    scans: list[float] = []
    workflow.tracker.scan = lambda now: scans.append(now)  # type: ignore[method-assign]
    workflow.runner.run_pending = _fake_runs(4, 0.12)  # type: ignore[method-assign]
    workflow.scan(NOW)
    assert scans == [NOW]
    workflow.index.close()
