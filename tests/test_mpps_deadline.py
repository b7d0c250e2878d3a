"""Completeness by MPPS with the tracker's own clock: a COMPLETED step completes its study at
its last referenced instance; missing instances are waited for, quiet or not, until
``mpps_wait_seconds`` after the step ended; then the quiet-time rule decides as before."""

from __future__ import annotations

import time
from pathlib import Path

from engine.store.mpps import MppsStore, StepStatus, StepUpdate
from tests.test_tracker import MR, World, _neuro, _study, settled

STEP = "1.2.826.0.1.3680043.8.498.90"


def _world(tmp_path: Path, wait: float) -> World:
    return World(tmp_path, [_neuro(mpps_wait_seconds=wait)], {})


def _step(world: World, datasets: list, ended: float) -> str:
    """A step created and COMPLETED at ``ended``, referencing ``datasets``; its study UID."""
    study_uid = str(datasets[0].StudyInstanceUID)
    store = MppsStore(world.index)
    store.create(STEP, StepUpdate(StepStatus.IN_PROGRESS, (study_uid,), ()), "MR1", ended - 60)
    refs = tuple((str(d.SeriesInstanceUID), str(d.SOPInstanceUID)) for d in datasets)
    store.set(STEP, StepUpdate(StepStatus.COMPLETED, None, refs), ended)
    return study_uid


def _audit_why(world: World) -> list[str]:
    from engine.store.audit import AuditLog

    entries = AuditLog(world.site.data_dir).entries()
    return [e.get("why", "") for e in entries if e["event"] == "completed"]


def test_complete_at_the_last_instance(tmp_path: Path) -> None:
    world = _world(tmp_path, 600)
    datasets = _study(1, [MR["localizer"], MR["t2_tse"]])
    _step(world, datasets, time.time())
    world.send(datasets)
    world.tracker.scan(settled())  # well inside the 100 s quiet time
    assert [r[0] for r in world.runs()] == ["neuro"]
    assert _audit_why(world) == ["MPPS completed, every instance it references arrived"]


def test_missing_instances_are_waited_for_until_the_deadline(tmp_path: Path) -> None:
    world = _world(tmp_path, 600)
    datasets = _study(1, [MR["localizer"], MR["t2_tse"]])
    ended = time.time()
    _step(world, datasets, ended)
    world.send(datasets[:-1])
    world.tracker.scan(settled())
    world.tracker.scan(ended + 300)  # quiet for 300 s > 100 s: the step still waits
    assert world.runs() == []
    world.tracker.scan(ended + 601)  # past the deadline: the quiet rule completes it
    assert [r[0] for r in world.runs()] == ["neuro"]
    assert _audit_why(world) == ["quiet"]


def test_a_step_of_another_study_or_none_changes_nothing(tmp_path: Path) -> None:
    world = _world(tmp_path, 600)
    other = _study(2, [MR["localizer"]])
    _step(world, other, time.time())
    world.send(_study(1, [MR["localizer"]]))
    world.tracker.scan(settled())
    assert world.runs() == []


def test_mpps_wait_zero_turns_it_off(tmp_path: Path) -> None:
    world = _world(tmp_path, 0)
    datasets = _study(1, [MR["localizer"]])
    _step(world, datasets, time.time())
    world.send(datasets)
    world.tracker.scan(settled())
    assert world.runs() == []
