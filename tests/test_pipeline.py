"""The pipeline interpreter: steps, validation, durable runs, the runner.

Instances are synthetic (tests/synth.py), written into a real data dir through the archive and
its index; runs are created in the run store and executed by PipelineRunner with explicit clock
values, so retries and backoff are tested without sleeping. A restart is a new index connection,
run store and runner on the same data dir.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections import Counter
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from jsonschema import Draft202012Validator
from pydicom.dataset import Dataset

from engine.config.loader import ConfigError, check_project_files, schema_dir
from engine.pipeline import Done, Quarantined, Retry, RunContext, SeriesInput
from engine.pipeline.outcome import Outcome
from engine.pipeline.runner import PipelineRunner
from engine.pipeline.steps import STEPS, Step
from engine.pipeline.store import RunRecord, RunState, RunStore, StepState
from engine.pipeline.validate import build_pipeline, check_pipeline
from engine.store.archive import Archive
from engine.store.index import Origin, SqliteIndex, open_index
from tests import synth

MR = synth.MR_SERIES
NOW = 1_700_000_000.0
INGEST = Origin("ingest")
STUDY_SERIES = [MR["localizer"], MR["t1_mprage"], MR["t2_tse"], MR["flair"]]


class World:
    """A data dir with an index, an archive, a run store and a project file."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.data = tmp / "data"
        (tmp / "projects").mkdir()
        self.project = tmp / "projects" / "p.yaml"
        self.project.write_text("name: p\n")
        self.held: list[tuple[int, str, str]] = []
        self.open()

    def open(self) -> None:
        """(Re)open the index, archive and run store: a restart."""
        self.index: SqliteIndex = open_index("", self.data / "index.sqlite")
        self.archive = Archive(self.data, self.index)
        self.store = RunStore(self.index)

    def restart(self) -> None:
        self.index.close()
        self.open()

    def receive(self, datasets: list[Dataset], origin: Origin = INGEST) -> None:
        for path in synth.write_study(datasets, self.tmp / f"in-{time.monotonic_ns()}"):
            assert self.archive.receive(path.read_bytes(), origin).status == 0

    def steps(self, pipeline: list[dict[str, Any]]) -> list[Step]:
        return build_pipeline(pipeline, self.project)

    def hold(self, run: RunRecord, reason: str, detail: str) -> None:
        self.held.append((run.id, reason, detail))

    def runner(self, steps: list[Step], **options: Any) -> PipelineRunner:
        return PipelineRunner(self.store, self.index, self.data, {"p": steps}, self.hold, **options)

    def rows(self, sql: str, *args: object) -> list[tuple[Any, ...]]:
        with self.index.reading() as db:
            return db.execute(sql, args).fetchall()

    def run(self, run_id: int) -> RunRecord:
        found = self.store.get(run_id)
        assert found is not None
        return found


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def _study(seed: int = 1, series: list[synth.SeriesSpec] | None = None) -> list[Dataset]:
    return synth.make_study(synth.make_study_spec(seed), series or STUDY_SERIES, size=8)


def _uids(datasets: list[Dataset]) -> tuple[str, dict[str, str]]:
    """(study UID, series name -> series UID), names from synth's SeriesSpec."""
    names = {s.series_description: s.name for s in synth.MR_SERIES.values()}
    series = {names[str(ds.SeriesDescription)]: str(ds.SeriesInstanceUID) for ds in datasets}
    return str(datasets[0].StudyInstanceUID), series


def _new_run(world: World, datasets: list[Dataset], follow_up: int = 0) -> int:
    study, series = _uids(datasets)
    return world.store.create_run(study, "p", "S01", "baseline", follow_up, list(series.values()))


# --------------------------------------------------------------------------- run store


def test_runs_added_at_once_each_get_their_own_follow_up_number(world: World) -> None:
    """The tracker, a REDCap transfer request and an operator's release may add a run of one
    study at the same instant (on PostgreSQL, on different nodes): each gets its own number,
    after the runs already there."""
    from concurrent.futures import ThreadPoolExecutor

    world.store.create_run("1.2.3", "p", "", "", 0, ["1.2.3.4"])

    def add(_: int) -> int:
        with world.index.transaction() as db:
            return RunStore.add_next_run(db, "1.2.3", "p", "", "", ["1.2.3.4"])[1]

    with ThreadPoolExecutor(6) as pool:
        got = sorted(pool.map(add, range(24)))
    assert got == list(range(1, 25))


def test_create_run_is_idempotent_and_series_come_from_the_index(world: World) -> None:
    datasets = _study()
    world.receive(datasets, Origin("dimse", "MR1", "FIONA", "10.0.0.9"))
    study, series = _uids(datasets)
    first = world.store.create_run(study, "p", "S01", "baseline", 0, list(series.values()))
    again = world.store.create_run(study, "p", "S01", "baseline", 0, ["9.9"])
    assert first == again
    assert [r.id for r in world.store.runs_for_study(study)] == [first]
    run = world.run(first)
    assert (run.state, run.attempts, run.series) == (RunState.PENDING, 0, tuple(series.values()))
    assert [r.id for r in world.store.runnable(NOW)] == [first]

    inputs = world.store.series_inputs(run, world.data)
    assert [s.series_uid for s in inputs] == list(series.values())
    t1 = inputs[1]
    assert (t1.series_number, t1.modality, t1.n_instances) == (2, "MR", MR["t1_mprage"].n_instances)
    assert (t1.calling_ae, t1.called_ae, t1.peer_ip) == ("MR1", "FIONA", "10.0.0.9")
    assert all(f.is_file() and f.is_relative_to(world.data) for f in t1.files)
    assert [f.name for f in t1.files] == [
        f"{ds.SOPInstanceUID}.dcm"
        for ds in sorted(
            (d for d in datasets if str(d.SeriesInstanceUID) == t1.series_uid),
            key=lambda d: int(d.InstanceNumber),
        )
    ]


@pytest.mark.sqlite_only("a SQLite index file left at schema version 1")
def test_migrations_apply_on_a_version_1_database(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite"
    sql = (resources.files("engine.store.migrations") / "0001_initial.sql").read_text()
    with sqlite3.connect(path) as db:
        db.executescript(sql)
        db.execute("INSERT INTO patients(patient_id) VALUES ('SYNPID1')")
        db.execute(
            "INSERT INTO studies(study_uid, patient_ref, first_received_at, last_received_at)"
            " VALUES ('1.2.3', 1, 0, 0)"
        )
        db.execute("PRAGMA user_version=1")
    index = open_index("", path)
    try:
        assert index.schema_version >= 2
        with index.reading() as db:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            assert {"pipeline_runs", "pipeline_steps"} <= tables
            assert db.execute("SELECT study_uid FROM studies").fetchall() == [("1.2.3",)]
        run_id = RunStore(index).create_run("1.2.3", "p", "", "", 0, [])
        assert RunStore(index).done_steps(run_id) == set()
    finally:
        index.close()


# --------------------------------------------------------------------------- classify


def test_classify_labels_every_series_with_the_default_rule_sets(world: World) -> None:
    datasets = _study()
    world.receive(datasets)
    run_id = _new_run(world, datasets)
    assert world.runner(world.steps([{"step": "classify"}])).run_pending(NOW) == 1
    run = world.run(run_id)
    assert run.state == RunState.DONE
    _, series = _uids(datasets)
    labels = run.step_state["labels"]
    assert "localizer" in labels[series["localizer"]]
    assert "t1" in labels[series["t1_mprage"]] and "original" in labels[series["t1_mprage"]]
    assert "t2" in labels[series["t2_tse"]]
    assert "flair" in labels[series["flair"]]
    assert world.store.steps(run_id)[0].detail == "4 series (43 files) labelled"


def test_classify_uses_summary_fields_and_series_level_rules(world: World) -> None:
    rules = world.tmp / "projects" / "rules" / "site.yaml"
    rules.parent.mkdir()
    rules.write_text(
        yaml.safe_dump(
            {
                "rules": {
                    "from_mr1": {
                        "conditions": [{"attr": "summary.calling_ae", "op": "==", "value": "MR1"}]
                    },
                    "from_ingest": {
                        "conditions": [{"attr": "summary.calling_ae", "op": "not_exists"}]
                    },
                    "big": {"conditions": [{"attr": "summary.num_files", "op": ">", "value": 10}]},
                    "first_five": {
                        "series_level": True,
                        "conditions": [{"attr": "InstanceNumber", "op": "<", "value": 6}],
                    },
                }
            }
        )
    )
    mr1 = _study(1, [MR["localizer"], MR["t1_mprage"]])
    ingested = _study(2, [MR["localizer"]])
    world.receive(mr1, Origin("dimse", "MR1", "FIONA", "10.0.0.9"))
    world.receive(ingested)
    steps = world.steps([{"step": "classify", "rulesets": ["rules/site.yaml"]}])
    runs = [_new_run(world, mr1), _new_run(world, ingested)]
    world.runner(steps).run_pending(NOW)
    (_, a), (_, b) = _uids(mr1), _uids(ingested)
    assert world.run(runs[0]).step_state["labels"] == {
        a["localizer"]: ["first_five", "from_mr1"],  # 3 instances, numbered 1-3
        a["t1_mprage"]: ["big", "from_mr1"],  # 16 instances: 6-16 remove first_five
    }
    assert world.run(runs[1]).step_state["labels"] == {
        b["localizer"]: ["first_five", "from_ingest"]
    }


# --------------------------------------------------------------------------- select


def _ctx(labels: Mapping[str, list[str]], **state: Any) -> RunContext:
    series = tuple(SeriesInput(uid, i, "MR", "", 0, ()) for i, uid in enumerate(labels, 1))
    return RunContext(
        1, "p", "1.2.3", "", "", 0, series, Path("/nowhere"), {"labels": labels, **state}
    )


SERIES_LABELS = {
    "loc": ["localizer", "mr"],
    "t1": ["mr", "original", "t1"],
    "t2": ["mr", "original", "t2"],
    "flair": ["flair", "mr", "derived"],
}


@pytest.mark.parametrize(
    ("options", "selected"),
    [
        ({"labels": ["t1", "flair"]}, ["t1", "flair"]),
        ({"exclude_labels": ["localizer"]}, ["t1", "t2", "flair"]),
        ({"labels": ["mr"], "exclude_labels": ["localizer", "derived"]}, ["t1", "t2"]),
        ({"labels": ["original"], "exclude_labels": ["t2"]}, ["t1"]),
        ({}, ["loc", "t1", "t2", "flair"]),
        ({"labels": ["dwi"]}, []),
    ],
)
def test_select_keeps_series_by_label(
    world: World, options: dict[str, Any], selected: list[str]
) -> None:
    step = world.steps([{"step": "classify"}, {"step": "select", **options}])[1]
    ctx = _ctx(SERIES_LABELS)
    assert isinstance(step.run(ctx), Done)
    assert ctx.state["selected"] == selected


def test_a_second_select_narrows_the_first(world: World) -> None:
    steps = world.steps(
        [
            {"step": "classify"},
            {"step": "select", "labels": ["original"]},
            {"step": "select", "exclude_labels": ["t2"]},
        ]
    )
    ctx = _ctx(SERIES_LABELS)
    assert steps[1].run(ctx) == Done("2 of 4 series selected")
    assert steps[2].run(ctx) == Done("1 of 2 series selected")
    assert ctx.state["selected"] == ["t1"]


def test_select_if_empty(world: World) -> None:
    done = world.steps([{"step": "classify"}, {"step": "select", "labels": ["dwi"]}])[1]
    held = world.steps(
        [
            {"step": "classify"},
            {
                "step": "select",
                "labels": ["dwi"],
                "exclude_labels": ["t2"],
                "if_empty": "quarantine",
            },
        ]
    )[1]
    assert done.run(_ctx(SERIES_LABELS)) == Done("0 of 4 series selected")
    assert held.run(_ctx(SERIES_LABELS)) == Quarantined(
        "nothing_selected", "none of 4 series has dwi without t2"
    )


def test_nothing_selected_quarantines_the_run_and_stops_it(world: World) -> None:
    datasets = _study()
    world.receive(datasets)
    run_id = _new_run(world, datasets)
    out = world.tmp / "out"
    steps = world.steps(
        [
            {"step": "classify"},
            {"step": "select", "labels": ["dwi"], "if_empty": "quarantine"},
            {"step": "copy", "to": str(out)},
        ]
    )
    world.runner(steps).run_pending(NOW)
    run = world.run(run_id)
    assert (run.state, run.reason, run.detail) == (
        RunState.QUARANTINED,
        "nothing_selected",
        "none of 4 series has dwi",
    )
    assert world.held == [(run_id, "nothing_selected", "none of 4 series has dwi")]
    assert [(s.idx, s.state) for s in world.store.steps(run_id)] == [
        (0, StepState.DONE),
        (1, StepState.QUARANTINED),
    ]
    assert not out.exists()
    assert world.runner(steps).run_pending(NOW + 1e6) == 0
    # After a config fix the run is reopened: it resumes at the step that held it.
    fixed = world.steps(
        [
            {"step": "classify"},
            {"step": "select", "labels": ["t1"], "if_empty": "quarantine"},
            {"step": "copy", "to": str(out)},
        ]
    )
    assert world.store.reopen(run_id, now=NOW) == 1
    with pytest.raises(ValueError):
        world.store.reopen(run_id)  # pending now, not held
    world.runner(fixed).run_pending(NOW + 1)
    assert world.run(run_id).state == RunState.DONE
    assert [s.idx for s in world.store.steps(run_id)] == [0, 1, 2]
    assert len(list(out.rglob("*.dcm"))) == MR["t1_mprage"].n_instances


# --------------------------------------------------------------------------- copy


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_copy_writes_selected_series_and_labels(world: World) -> None:
    datasets = _study()
    world.receive(datasets)
    study, series = _uids(datasets)
    run_id = _new_run(world, datasets)
    steps = world.steps(
        [
            {"step": "classify"},
            {"step": "select", "labels": ["t1", "flair"]},
            {"step": "copy", "to": "export/p"},  # relative to the data dir
        ]
    )
    world.runner(steps).run_pending(NOW)
    assert world.run(run_id).state == RunState.DONE
    root = world.data / "export" / "p" / study
    assert sorted(p.name for p in root.iterdir()) == sorted(
        [series["t1_mprage"], series["flair"], "labels.json"]
    )
    t1 = world.store.series_inputs(world.run(run_id), world.data)[1]
    assert {f.name: f.read_bytes() for f in t1.files} == {
        p.name: p.read_bytes() for p in (root / t1.series_uid).iterdir()
    }
    labels = json.loads((root / "labels.json").read_text())
    assert set(labels) == {series["t1_mprage"], series["flair"]}
    assert "t1" in labels[series["t1_mprage"]] and "flair" in labels[series["flair"]]
    assert world.store.steps(run_id)[2].detail == "2 series copied (28 files written)"


def test_anonymize_then_copy_exports_new_uids_and_table_pseudonyms(world: World) -> None:
    import os

    key = world.project.parent / "p.key"
    key.write_bytes(os.urandom(40))
    os.chmod(key, 0o600)
    datasets = _study()
    world.receive(datasets)
    study, series = _uids(datasets)
    run_id = _new_run(world, datasets)
    steps = world.steps(
        [
            {"step": "classify"},
            {"step": "select", "labels": ["t1"]},
            {"step": "anonymize", "secret_file": "p.key", "pseudonyms": {"prefix": "P"}},
            {"step": "copy", "to": "export/p"},
        ]
    )
    world.runner(steps).run_pending(NOW)
    assert world.run(run_id).state == RunState.DONE
    [study_dir] = list((world.data / "export" / "p").iterdir())
    assert study_dir.name != study
    [series_dir] = [p for p in study_dir.iterdir() if p.is_dir()]
    assert series_dir.name != series["t1_mprage"]
    copied = sorted(series_dir.iterdir())
    assert len(copied) == synth.MR_SERIES["t1_mprage"].n_instances
    ds = pydicom.dcmread(copied[0])
    # The run's subject (a coupling list's research ID) is the preferred pseudonym.
    assert (ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID) == (
        "S01",
        study_dir.name,
        series_dir.name,
    )
    assert "t1" in json.loads((study_dir / "labels.json").read_text())[series_dir.name]


def test_anonymize_holds_the_whole_study_when_one_file_is_held(world: World) -> None:
    import os

    key = world.project.parent / "p.key"
    key.write_bytes(os.urandom(40))
    os.chmod(key, 0o600)
    datasets = _study()
    datasets[0].BurnedInAnnotation = "YES"
    world.receive(datasets)
    run_id = _new_run(world, datasets)
    out = world.data / "export" / "p"
    steps = world.steps(
        [{"step": "anonymize", "secret_file": "p.key"}, {"step": "copy", "to": str(out)}]
    )
    world.runner(steps).run_pending(NOW)
    assert world.run(run_id).state == RunState.QUARANTINED
    [(_, reason, detail)] = world.held
    assert reason == "burned_in" and detail.startswith("1 of ")
    assert not out.exists()


def test_anonymize_strips_identity_written_in_compressed_frames(world: World) -> None:
    """A JPEG-LS frame with a comment segment holding the name, ID and birth date: the
    exported copy keeps the image and loses the comment (engine.deid.encapsulated)."""
    import os
    import struct

    from pydicom.encaps import encapsulate, generate_frames
    from pydicom.uid import JPEGLSLossless

    key = world.project.parent / "p.key"
    key.write_bytes(os.urandom(40))
    os.chmod(key, 0o600)
    datasets = _study(series=[synth.MR_SERIES["t1_mprage"]])
    ds = datasets[0]
    text = f"{ds.PatientName} {ds.PatientID} {ds.PatientBirthDate}".encode()
    comment = b"\xff\xfe" + struct.pack(">H", len(text) + 2) + text
    for one in datasets:
        one.compress(JPEGLSLossless, generate_instance_uid=False)
        [frame] = generate_frames(one.PixelData, number_of_frames=1)
        one.PixelData = encapsulate([frame[:2] + comment + frame[2:]])
    world.receive(datasets)
    run_id = _new_run(world, datasets)
    out = world.data / "export" / "p"
    steps = world.steps(
        [{"step": "anonymize", "secret_file": "p.key"}, {"step": "copy", "to": str(out)}]
    )
    world.runner(steps).run_pending(NOW)
    assert world.run(run_id).state == RunState.DONE
    copies = list(out.rglob("*.dcm"))
    assert len(copies) == len(datasets)
    for copy in copies:
        data = copy.read_bytes()
        assert text not in data and str(ds.PatientID).encode() not in data
    assert pydicom.dcmread(copies[0]).pixel_array.shape == (8, 8)


def test_send_queues_the_de_identified_copies_once_per_destination(world: World) -> None:
    import os

    from engine.transfer.outbox import Outbox

    key = world.project.parent / "p.key"
    key.write_bytes(os.urandom(40))
    os.chmod(key, 0o600)
    datasets = _study()
    world.receive(datasets)
    study, _ = _uids(datasets)
    run_id = _new_run(world, datasets)
    steps = world.steps(
        [
            {"step": "anonymize", "secret_file": "p.key", "pseudonyms": {"prefix": "P"}},
            {"step": "send", "to": ["pacs", "share"]},
        ]
    )
    world.runner(steps).run_pending(NOW)
    assert world.run(run_id).state == RunState.DONE
    outbox = Outbox(world.index, world.data)
    transfers = sorted(outbox.find(), key=lambda t: t.destination)
    assert [t.destination for t in transfers] == ["pacs", "share"]
    for transfer in transfers:
        # Filed under the archived study, sent under the new UID and the pseudonym.
        assert (transfer.study_uid, transfer.subject, transfer.run_id) == (study, "S01", run_id)
        assert transfer.export_uid != study and transfer.n_items == len(datasets)
        batch = outbox.batch(transfer)
        for item in batch.instances:
            ds = pydicom.dcmread(item.path, stop_before_pixels=True)
            assert (ds.SOPInstanceUID, ds.StudyInstanceUID) == (
                item.sop_instance_uid,
                transfer.export_uid,
            )
            assert ds.PatientID == "S01" and item.path.is_relative_to(world.data / "work")
    # Run again (a crash after the step, say): still one transfer per destination.
    run = world.run(run_id)
    ctx = RunContext(
        run.id, "p", run.study_uid, run.subject, run.event, run.follow_up,
        world.store.series_inputs(run, world.data), world.data, dict(run.step_state),
        index=world.index,
    )
    world.steps([{"step": "send", "to": "pacs"}])[0].run(ctx)
    assert len(outbox.find()) == 2


def test_copy_is_idempotent_and_recovers_from_a_crash(world: World) -> None:
    datasets = _study(1, [MR["localizer"], MR["t1_mprage"]])
    world.receive(datasets)
    study, series = _uids(datasets)
    run = world.run(_new_run(world, datasets))
    out = world.tmp / "out"
    classify, copy = world.steps([{"step": "classify"}, {"step": "copy", "to": str(out)}])
    ctx = RunContext(
        run.id, "p", study, "", "", 0, world.store.series_inputs(run, world.data), world.data
    )
    assert isinstance(classify.run(ctx), Done)
    assert copy.run(ctx) == Done("2 series copied (19 files written)")
    first = _tree(out)
    assert copy.run(ctx) == Done("2 series copied (0 files written)")  # nothing to do
    assert _tree(out) == first

    # A crash mid-copy: a half-written hidden folder, a swapped-out old copy, a target missing
    # a file. The next run clears the leftovers and ends with the same tree.
    root = out / study
    (root / f".tmp-{series['t1_mprage']}").mkdir()
    (root / f".tmp-{series['t1_mprage']}" / "junk.dcm").write_bytes(b"partial")
    (root / f".old-{series['localizer']}").mkdir()
    next((root / series["t1_mprage"]).iterdir()).unlink()
    assert copy.run(ctx) == Done("2 series copied (16 files written)")
    assert _tree(out) == first
    assert not [p for p in root.iterdir() if p.name.startswith(".")]


def test_a_follow_up_run_adds_its_series_and_merges_labels(world: World) -> None:
    first = _study(1, [MR["localizer"], MR["t1_mprage"], MR["flair"]])
    late = [ds for ds in first if ds.SeriesDescription == MR["flair"].series_description]
    early = [ds for ds in first if ds not in late]
    study, series = _uids(first)
    out = world.tmp / "out"
    steps = world.steps([{"step": "classify"}, {"step": "copy", "to": str(out)}])
    world.receive(early)
    run0 = _new_run(world, early)
    world.runner(steps).run_pending(NOW)
    labels_file = out / study / "labels.json"
    before = json.loads(labels_file.read_text())
    assert set(before) == {series["localizer"], series["t1_mprage"]}

    world.receive(late)
    run1 = _new_run(world, late, follow_up=1)
    assert run1 != run0
    world.runner(steps).run_pending(NOW + 10)
    after = json.loads(labels_file.read_text())
    assert set(after) == set(series.values())
    assert {k: after[k] for k in before} == before  # the first run's entries stay
    assert "flair" in after[series["flair"]]
    assert world.run(run1).series == (series["flair"],)
    assert len(list((out / study / series["flair"]).iterdir())) == MR["flair"].n_instances


def test_copy_refuses_a_uid_that_cannot_name_a_folder(world: World, tmp_path: Path) -> None:
    copy = world.steps([{"step": "copy", "to": str(tmp_path / "out")}])[0]
    ctx = RunContext(
        1, "p", "1.2.3", "", "", 0, (SeriesInput("../x", 1, "MR", "", 0, ()),), tmp_path
    )
    assert copy.run(ctx) == Quarantined("invalid_uid", "1 series UID(s) cannot name a folder")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- runner

CALLS: Counter[str] = Counter()


class Record(Step):
    """Appends its tag to state['seen'] and counts its calls."""

    name = "record"

    def run(self, ctx: RunContext) -> Outcome:
        CALLS[self.options["tag"]] += 1
        ctx.state["seen"] = [*ctx.state.get("seen", []), self.options["tag"]]
        return Done(self.options["tag"])


class Flaky(Step):
    """Fails the first time (raises, or asks for a retry), then succeeds."""

    name = "flaky"

    def run(self, ctx: RunContext) -> Outcome:
        CALLS["flaky"] += 1
        ctx.state["seen"] = [*ctx.state.get("seen", []), "flaky"]
        if CALLS["flaky"] == 1:
            if self.options["mode"] == "raise":
                raise RuntimeError("cannot read DOE^JANE^SYNTH")  # a message quoting PHI
            return Retry("destination_busy", 5)
        return Done()


class Boom(Step):
    name = "boom"

    def run(self, ctx: RunContext) -> Outcome:
        raise ValueError("PatientName DOE^JANE^SYNTH")


class ReturnsNone(Step):
    name = "none"

    def run(self, ctx: RunContext) -> Outcome:
        return None  # type: ignore[return-value]


def _one_run(world: World) -> int:
    datasets = _study(1, [MR["localizer"]])
    world.receive(datasets)
    return _new_run(world, datasets)


@pytest.mark.parametrize(
    ("mode", "reason", "after", "step_state"),
    [
        ("raise", "step_error: RuntimeError", 60, StepState.ERROR),
        ("retry", "destination_busy", 5, StepState.RETRY),
    ],
)
def test_a_restart_resumes_at_the_step_that_did_not_finish(
    world: World,
    caplog: pytest.LogCaptureFixture,
    mode: str,
    reason: str,
    after: float,
    step_state: StepState,
) -> None:
    CALLS.clear()
    caplog.set_level(logging.DEBUG)
    run_id = _one_run(world)
    f = world.project

    def steps() -> list[Step]:
        return [Record({"tag": "a"}, f), Flaky({"mode": mode}, f), Record({"tag": "b"}, f)]

    assert world.runner(steps()).run_pending(NOW) == 1
    run = world.run(run_id)
    assert (run.state, run.reason, run.attempts, run.next_try_at) == (
        RunState.PENDING,
        reason,
        1,
        NOW + after,
    )
    assert run.step_state == {"seen": ["a"]}  # what the unfinished step wrote is not kept
    assert [(s.idx, s.state) for s in world.store.steps(run_id)] == [
        (0, StepState.DONE),
        (1, step_state),
    ]

    world.restart()
    runner = world.runner(steps())
    assert runner.run_pending(NOW + after - 1) == 0  # not yet
    assert runner.run_pending(NOW + after) == 1
    run = world.run(run_id)
    assert (run.state, run.attempts) == (RunState.DONE, 0)
    assert run.step_state == {"seen": ["a", "flaky", "b"]}
    assert CALLS == {"a": 1, "flaky": 2, "b": 1}  # step 0 was not repeated
    assert all(s.state == StepState.DONE for s in world.store.steps(run_id))
    assert "DOE" not in caplog.text
    assert "DOE" not in json.dumps(world.rows("SELECT * FROM pipeline_runs"))
    assert "DOE" not in json.dumps(world.rows("SELECT * FROM pipeline_steps"))


def test_errors_back_off_then_quarantine_as_step_failed(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    run_id = _one_run(world)
    runner = world.runner([Boom({}, world.project)], backoff=10)
    now, waits = NOW, []
    for _ in range(4):
        assert runner.run_pending(now) == 1
        run = world.run(run_id)
        assert run.state == RunState.PENDING and run.reason == "step_error: ValueError"
        assert run.next_try_at is not None
        waits.append(run.next_try_at - now)
        now = run.next_try_at
    assert waits == [10, 20, 40, 80]
    assert world.held == []
    assert runner.run_pending(now) == 1  # the fifth failure
    run = world.run(run_id)
    detail = "step 0 (boom) failed 5 times; last: step_error: ValueError"
    assert (run.state, run.reason, run.detail) == (RunState.QUARANTINED, "step_failed", detail)
    assert world.held == [(run_id, "step_failed", detail)]
    assert runner.run_pending(now + 1e6) == 0
    assert "DOE" not in caplog.text


def test_a_step_returning_none_is_an_error(world: World) -> None:
    run_id = _one_run(world)
    world.runner([ReturnsNone({}, world.project)]).run_pending(NOW)
    assert world.run(run_id).reason == "step_error: TypeError"


def test_a_failing_quarantine_hook_leaves_the_run_to_try_again(world: World) -> None:
    run_id = _one_run(world)
    calls: list[str] = []

    def hook(run: RunRecord, reason: str, detail: str) -> None:
        calls.append(reason)
        if len(calls) == 1:
            raise OSError("disk full")

    steps: list[Step] = [_Hold({}, world.project)]
    runner = PipelineRunner(world.store, world.index, world.data, {"p": steps}, hook, backoff=30)
    runner.run_pending(NOW)
    assert world.run(run_id).state == RunState.PENDING
    runner.run_pending(NOW + 30)
    assert world.run(run_id).state == RunState.QUARANTINED
    assert calls == ["held", "held"]


class _Hold(Step):
    name = "hold"

    def run(self, ctx: RunContext) -> Outcome:
        return Quarantined("held", "held by the test")


def test_runs_of_a_project_without_a_pipeline_wait(world: World) -> None:
    run_id = _one_run(world)
    runner = PipelineRunner(world.store, world.index, world.data, {}, world.hold)
    assert runner.run_pending(NOW) == 0
    assert world.run(run_id).state == RunState.PENDING


def test_an_empty_pipeline_finishes_at_once(world: World) -> None:
    run_id = _one_run(world)
    world.runner([]).run_pending(NOW)
    assert world.run(run_id).state == RunState.DONE


# --------------------------------------------------------------------------- validation

P = Path("projects/p.yaml")


@pytest.mark.parametrize(
    ("pipeline", "messages"),
    [
        (
            [{"step": "clasify"}],
            [
                "projects/p.yaml pipeline[0].step: unknown step 'clasify' (did you mean"
                " 'classify'?); expected one of anonymize, classify, consent, convert, copy,"
                " select, send"
            ],
        ),
        (
            [{"step": "transmit"}],
            [
                "projects/p.yaml pipeline[0].step: unknown step 'transmit';"
                " expected one of anonymize, classify, consent, convert, copy, select, send"
            ],
        ),
        (
            [{"step": "classify"}, {"step": "select", "lables": ["t1"], "if_empty": "skip"}],
            [
                "projects/p.yaml pipeline[1]: 'lables' is not allowed (did you mean 'labels'?)",
                "projects/p.yaml pipeline[1].if_empty: expected one of 'done', 'quarantine';"
                " found 'skip'",
            ],
        ),
        (
            [{"step": "copy"}, {"step": "copy", "to": 5}, {"step": "copy", "to": "archive/x"}],
            [
                "projects/p.yaml pipeline[0]: missing required key 'to'",
                "projects/p.yaml pipeline[1].to: expected string, found integer 5 (put the value"
                " in quotes to make it a string)",
                "projects/p.yaml pipeline[2].to: expected a folder inside the data folder but"
                " outside its archive, raw, participants and quarantine folders (or an absolute"
                " path), found 'archive/x'",
            ],
        ),
        (
            [{"step": "classify", "rulesets": ["mri", "extra/none.yaml"]}],
            [
                "projects/p.yaml pipeline[0].rulesets[0]: unknown rule set 'mri' (did you mean"
                " 'mr'?); expected a name from {classify} (ct, derived, mr, objects, pet) or a"
                " file path",
                "projects/p.yaml pipeline[0].rulesets[1]: expected a rule set file, found no file"
                " at projects/extra/none.yaml",
            ],
        ),
        (
            [{"step": "select", "labels": ["t1"]}, {"step": "classify"}],
            [
                "projects/p.yaml pipeline[0]: 'select' reads series labels, so expected a"
                " classify step before it, found none"
            ],
        ),
        (
            [
                {"step": "classify", "rulesets": ["mr"]},
                {"step": "select", "labels": ["t1"], "exclude_labels": ["flaire"]},
            ],
            [
                "projects/p.yaml pipeline[1].exclude_labels[0]: expected a label given by the"
                " classify step(s) before, found 'flaire' (did you mean 'flair'?)",
            ],
        ),
        ([{"step": "classify"}, {"step": "select"}, {"step": "copy", "to": "/tmp/x"}], []),
        (
            [{"step": "convert", "format": "nifti"}],
            [
                "projects/p.yaml pipeline[0].step: 'convert' runs only on de-identified series,"
                " so expected an anonymize step before it, found none"
            ],
        ),
    ],
)
def test_pipeline_messages(pipeline: list[Any], messages: list[str]) -> None:
    from engine.config.rulesets import classify_dir

    issues = check_pipeline(pipeline, P, ("pipeline",), None)
    assert [str(i) for i in issues] == [m.format(classify=classify_dir()) for m in messages]


def test_unknown_labels_list_what_the_rule_sets_give(tmp_path: Path) -> None:
    rules = {"rules": {"alpha": {"conditions": [{"attr": "Modality", "op": "exists"}]}}}
    (tmp_path / "one.yaml").write_text(yaml.safe_dump(rules))
    rules = {"rules": {"beta": {"conditions": [{"attr": "Modality", "op": "exists"}]}}}
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(rules))
    pipeline = [
        {"step": "classify", "rulesets": ["./one.yaml"]},
        {"step": "select", "labels": ["beta"]},
        {"step": "classify", "rulesets": ["./two.yaml"]},
        {"step": "select", "labels": ["alpha", "beta", "ct"]},
    ]
    issues = check_pipeline(pipeline, tmp_path / "p.yaml")
    assert [f"{i.path}: {i.message}" for i in issues] == [
        "pipeline[1].labels[0]: expected a label given by the classify step(s) before, found"
        " 'beta'; they give alpha",
        "pipeline[3].labels[2]: expected a label given by the classify step(s) before, found"
        " 'ct'; they give alpha, beta",
    ]


def test_project_files_report_pipeline_problems_with_lines(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        "name: p\n"
        "pipeline:\n"
        "  - step: classify\n"
        "  - step: select\n"
        "    labels: [t1]\n"
        "    if_empty: maybe         # not a choice\n"
        "  - step: cpoy              # a typo\n"
        "    to: out\n"
    )
    projects, issues = check_project_files([path])
    assert projects == []
    assert [str(i) for i in issues] == [
        f"{path}:6 pipeline[1].if_empty: expected one of 'done', 'quarantine'; found 'maybe'",
        f"{path}:7 pipeline[2].step: unknown step 'cpoy' (did you mean 'copy'?);"
        " expected one of anonymize, classify, consent, convert, copy, select, send",
    ]


def test_a_broken_rule_set_is_reported_under_its_file(tmp_path: Path) -> None:
    rules = tmp_path / "bad.yaml"
    rules.write_text("rules:\n  x:\n    conditions:\n      - {attr: Modality, op: '~'}\n")
    issues = check_pipeline([{"step": "classify", "rulesets": ["./bad.yaml"]}], tmp_path / "p.yaml")
    assert issues[0].file == rules and issues[0].line == 4
    assert str(issues[-1]).startswith(f"{tmp_path / 'p.yaml'} pipeline[0].rulesets: expected")
    with pytest.raises(ConfigError) as exc:
        build_pipeline([{"step": "classify", "rulesets": ["./bad.yaml"]}], tmp_path / "p.yaml")
    assert "bad.yaml" in str(exc.value)


def test_every_registered_step_has_a_schema_fragment_and_a_test() -> None:
    source = Path(__file__).read_text(encoding="utf-8")
    folder = schema_dir() / "steps"
    assert sorted(p.name for p in folder.glob("*.schema.json")) == sorted(
        f"{name}.schema.json" for name in STEPS
    )
    for name, cls in STEPS.items():
        assert cls.name == name
        schema = json.loads((folder / f"{name}.schema.json").read_text())
        Draft202012Validator.check_schema(schema)
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        assert schema["additionalProperties"] is False
        assert schema["properties"]["step"]["const"] == name
        for key, prop in schema["properties"].items():
            assert prop.get("description"), (name, key)
            assert key in schema.get("required", []) or "default" in prop, (name, key)
        assert f'"step": "{name}"' in source, f"no test builds a {name} step"


def test_consent_step_needs_the_projects_redcap_section(world: World) -> None:
    # The step's REDCap behaviour is tested in tests/test_redcap_pipeline.py (REDCap stand-in).
    step = {"step": "consent", "key": {"field": "mrn", "from": "patient_id"}, "consent_field": "c"}
    assert [i.message for i in check_pipeline([step], world.project)] == [
        "a consent step needs the project's 'redcap' section (url, token_file); found none"
    ]
