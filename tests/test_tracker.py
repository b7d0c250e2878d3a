"""The tracker: labels on arrival, routes, completeness, follow-ups, unclaimed studies.

Instances go through the real archive and index; the scan is driven with explicit clock values
so quiet times are tested without sleeping. State lives in the index: a new Tracker on the same
index carries on (a restart).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

import engine.route.tracker as tracker_module
from engine.config.loader import load_project, load_site
from engine.config.model import ProjectConfig, SiteConfig
from engine.pipeline.store import RunStore
from engine.route.tracker import MAX_DEFER_SECONDS, SETTLE_SECONDS, Tracker
from engine.store.archive import Archive
from engine.store.index import Origin, SqliteIndex, open_index
from engine.workflow import site_labeller
from tests import synth
from tests.dbutil import separate_index

MR = synth.MR_SERIES


class World:
    """A data dir with an index, an archive, projects and a tracker over them."""

    def __init__(self, tmp: Path, projects: list[dict[str, Any]], site: dict[str, Any]) -> None:
        self.tmp = tmp
        (tmp / "projects").mkdir()
        for doc in projects:
            (tmp / "projects" / f"{doc['name']}.yaml").write_text(yaml.safe_dump(doc))
        (tmp / "site.yaml").write_text(yaml.safe_dump({"data_dir": "data", **site}))
        self.site: SiteConfig = load_site(tmp / "site.yaml")
        self.projects: list[ProjectConfig] = [
            load_project(tmp / "projects" / f"{d['name']}.yaml") for d in projects
        ]
        self.index: SqliteIndex = open_index("", self.site.data_dir / "index.sqlite")
        self.archive = Archive(self.site.data_dir, self.index)
        self.labeller = site_labeller(self.site)
        self.tracker = self.restart()

    def restart(self) -> Tracker:
        self.tracker = Tracker(
            self.index,
            self.site.data_dir,
            self.site,
            self.projects,
            self.labeller,
            RunStore(self.index),
        )
        return self.tracker

    def send(self, datasets: list[Dataset], aet: str = "MR1") -> None:
        for path in synth.write_study(datasets, self.tmp / f"send-{time.monotonic_ns()}"):
            outcome = self.archive.receive(
                path.read_bytes(), Origin("dimse", aet, "FIONA", "10.0.0.9")
            )
            assert outcome.status == 0

    def rows(self, sql: str, *args: object) -> list[tuple[Any, ...]]:
        with self.index.reading() as db:
            return db.execute(sql, args).fetchall()

    def runs(self) -> list[tuple[str, int, list[str]]]:
        rows = self.rows("SELECT project, follow_up, series FROM pipeline_runs ORDER BY id")
        return [(p, f, json.loads(s)) for p, f, s in rows]


def _study(seed: int, series: list[synth.SeriesSpec], **spec: object) -> list[Dataset]:
    return synth.make_study(synth.make_study_spec(seed, **spec), series, size=8)


def _neuro(**completeness: Any) -> dict[str, Any]:
    return {
        "name": "neuro",
        "routing": {"calling_ae": ["MR1"]},
        "completeness": {"study_quiet_seconds": 100, **completeness},
    }


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path, [_neuro()], {})


def settled() -> float:
    """A clock just past the pause after which a study that arrived now is read."""
    return time.time() + SETTLE_SECONDS


def test_series_labels_accumulate_into_index_and_summary(world: World) -> None:
    world.send(_study(1, [MR["localizer"], MR["t1_mprage"], MR["flair"]]))
    world.tracker.scan(settled())
    labels = dict(world.rows("SELECT description, labels FROM series"))
    assert "localizer" in json.loads(labels["localizer"])
    assert "t1" in json.loads(labels["t1_mprage_sag_p2_iso"])
    assert "flair" in json.loads(labels["t2_tirm_tra_dark-fluid"])
    from engine.store.summary import aggregate

    summary = aggregate(
        world.index.series_for_summary(
            world.rows("SELECT series_uid FROM series WHERE description='t2_tirm_tra_dark-fluid'")[
                0
            ][0]
        )
    )
    assert "flair" in summary["ClassifyType"]


def _age(world: World, study: list[Dataset], seconds: float) -> None:
    """Make a study look as if its instances arrived ``seconds`` earlier."""
    with world.index.transaction() as db:
        db.execute(
            "UPDATE studies SET first_received_at = first_received_at - ?,"
            " last_received_at = last_received_at - ? WHERE study_uid = ?",
            (seconds, seconds, str(study[0].StudyInstanceUID)),
        )


@pytest.mark.settle
def test_a_study_still_arriving_is_read_once_it_pauses(world: World) -> None:
    world.send(_study(1, [MR["t1_mprage"]]))
    world.tracker.scan(time.time())
    assert world.rows("SELECT count(*) FROM study_routes") == [(0,)]
    assert world.rows("SELECT labels FROM series") == [("[]",)]
    world.tracker.scan(settled())
    assert world.rows("SELECT project FROM study_routes") == [("neuro",)]
    assert "t1" in json.loads(world.rows("SELECT labels FROM series")[0][0])


@pytest.mark.settle
def test_a_study_arriving_for_long_is_read_as_it_comes(world: World) -> None:
    study = _study(1, [MR["t1_mprage"]])
    world.send(study)
    with world.index.transaction() as db:  # its first instance came long ago, its last now
        db.execute(
            "UPDATE studies SET first_received_at = first_received_at - ?",
            (MAX_DEFER_SECONDS + 1,),
        )
    world.tracker.scan(time.time())
    assert world.rows("SELECT project FROM study_routes") == [("neuro",)]


@pytest.mark.settle
def test_instances_left_for_a_later_scan_are_not_lost_behind_the_scan_mark(world: World) -> None:
    # A follow-up series still arriving is skipped by a scan that reads another study; the
    # next scan must still find it, though newer instances than it were seen.
    routed = _study(2, [MR["t1_mprage"]])
    world.send(routed)
    world.tracker.scan(settled())
    other = _study(3, [MR["flair"]])
    world.send(other)
    late = _study(2, [MR["t1_mprage"], MR["flair"]])[MR["t1_mprage"].n_instances :]
    world.send(late)
    world.send(_study(4, [MR["localizer"]]))  # instances newer than the late series
    _age(world, other, 10)
    world.tracker.scan(time.time())  # reads `other`; the late series and study 4 still arrive
    late_series = str(late[0].SeriesInstanceUID)
    assert world.rows("SELECT labels FROM series WHERE series_uid = ?", late_series) == [("[]",)]
    world.tracker.scan(settled())
    [(labels,)] = world.rows("SELECT labels FROM series WHERE series_uid = ?", late_series)
    assert "flair" in json.loads(labels)


def test_quiet_time_completes_and_creates_one_run(world: World) -> None:
    world.send(_study(1, [MR["t1_mprage"], MR["flair"]]))
    now = settled()
    world.tracker.scan(now)
    assert world.rows("SELECT project, state FROM study_routes") == [("neuro", "open")]
    world.tracker.scan(now + 50)
    assert world.runs() == []
    world.tracker.scan(now + 101)
    [(project, follow_up, series)] = world.runs()
    assert (project, follow_up, len(series)) == ("neuro", 0, 2)
    world.tracker.scan(now + 200)
    assert len(world.runs()) == 1  # complete once


def test_expected_labels_complete_early(tmp_path: Path) -> None:
    world = World(tmp_path, [_neuro(expected_labels=["t1", "flair"], series_quiet_seconds=5)], {})
    world.send(_study(1, [MR["t1_mprage"]]))
    now = time.time()
    world.tracker.scan(now + 10)
    assert world.runs() == []  # flair has not arrived
    world.send(_study(1, [MR["t1_mprage"], MR["flair"]])[MR["t1_mprage"].n_instances :])
    world.tracker.scan(time.time() + 2)
    assert world.runs() == []  # series quiet time not yet over
    world.tracker.scan(time.time() + 6)
    assert len(world.runs()) == 1


def test_force_complete_deadline(tmp_path: Path) -> None:
    world = World(tmp_path, [_neuro(force_complete_seconds=30)], {})
    world.send(_study(1, [MR["t1_mprage"]]))
    world.tracker.scan()
    world.send(_study(1, [MR["t1_mprage"], MR["flair"]])[MR["t1_mprage"].n_instances :])
    world.tracker.scan(time.time() + 31)  # not quiet for 100 s, but past the deadline
    assert len(world.runs()) == 1


def test_late_series_opens_a_follow_up_for_that_series_only_after_a_restart(world: World) -> None:
    first = _study(1, [MR["t1_mprage"], MR["flair"]])
    world.send(first)
    world.tracker.scan(time.time() + 101)
    late = _study(1, [MR["t2_tse"]])
    uid = generate_uid(prefix=None)
    for ds in late:
        ds.SeriesInstanceUID = uid
    world.send(late)
    world.restart().scan(settled())
    assert world.rows("SELECT state FROM study_routes") == [("open",)]
    world.tracker.scan(time.time() + 101)
    runs = world.runs()
    assert [follow_up for _, follow_up, _ in runs] == [0, 1]
    assert set(runs[0][2]) == {str(d.SeriesInstanceUID) for d in first}
    assert runs[1][2] == [uid]


def test_unclaimed_study_is_held_as_unrouted_once(tmp_path: Path) -> None:
    world = World(tmp_path, [_neuro()], {"routing": {"unrouted_after_seconds": 10}})
    world.send(_study(3, [MR["t2_tse"]]), aet="OTHER")
    world.tracker.scan()
    assert world.rows("SELECT reason FROM quarantine") == []
    world.tracker.scan(time.time() + 11)
    world.tracker.scan(time.time() + 12)
    assert world.rows("SELECT reason, path FROM quarantine") == [
        ("unrouted", f"archive/{_study(3, [MR['t2_tse']])[0].StudyInstanceUID}")
    ]


def test_unclaimed_study_is_let_be_under_policy_ignore(tmp_path: Path) -> None:
    world = World(
        tmp_path, [_neuro()], {"routing": {"unrouted": "ignore", "unrouted_after_seconds": 0}}
    )
    world.send(_study(3, [MR["t2_tse"]]), aet="OTHER")
    world.tracker.scan(time.time() + 1)
    assert world.rows("SELECT count(*) FROM quarantine") == [(0,)]
    assert world.rows("SELECT judged_at IS NOT NULL FROM studies") == [(1,)]


@pytest.mark.parametrize(("policy", "runs", "held"), [("all", 2, 0), ("quarantine", 0, 1)])
def test_ambiguous_policy(tmp_path: Path, policy: str, runs: int, held: int) -> None:
    other = {
        "name": "other",
        "routing": {"calling_ae": ["MR1"]},
        "completeness": {"study_quiet_seconds": 100},
    }
    world = World(tmp_path, [_neuro(), other], {"routing": {"ambiguous": policy}})
    world.send(_study(1, [MR["t1_mprage"]]))
    world.tracker.scan(time.time() + 101)
    world.tracker.scan(time.time() + 102)
    assert len(world.runs()) == runs
    assert world.rows("SELECT count(*) FROM quarantine WHERE reason='ambiguous'") == [(held,)]


def test_log_lines_name_the_run_ids_of_the_index(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    world.send(_study(1, [MR["t1_mprage"]]))
    world.send(_study(2, [MR["flair"]]))
    with caplog.at_level("INFO", logger="engine.route.tracker"):
        world.tracker.scan(time.time() + 101)
    logged = [
        int(r.getMessage().split("; run ")[1].split()[0])
        for r in caplog.records
        if "; run " in r.getMessage()
    ]
    ids = [row[0] for row in world.rows("SELECT id FROM pipeline_runs ORDER BY id")]
    assert len(ids) == 2
    assert sorted(logged) == ids  # before: the follow-up number, 0 for both


class _Reads:
    """Records the tracker's header reads; the real reader reads (whole, with ``whole``)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, whole: bool = False) -> None:
        self.tags: list[frozenset[int] | None] = []
        real = tracker_module.read_header_dataset

        def recording(path: Path, tags: frozenset[int] | None = None) -> Dataset:
            self.tags.append(tags)
            return real(path, None if whole else tags)

        monkeypatch.setattr(tracker_module, "read_header_dataset", recording)


def test_labelling_reads_only_the_tags_its_rules_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    """Each series' first instance is read whole (routing reads any attribute); every other
    one only for the labelling rules' tags, with the labels whole headers give."""
    study = _study(1, [MR["localizer"], MR["t1_mprage"], MR["flair"], MR["dwi"]])
    labels = []
    for whole in (False, True):
        if whole:  # a second world, with an index of its own (PostgreSQL: a new database)
            separate_index(request, monkeypatch)
        (tmp_path / str(whole)).mkdir()
        world = World(tmp_path / str(whole), [_neuro()], {})
        reads = _Reads(monkeypatch, whole=whole)
        world.send(study)
        world.tracker.scan(settled())
        assert world.labeller is not None and world.labeller.header_tags is not None
        assert len(reads.tags) == len(study)
        assert reads.tags.count(None) == 4  # the first of each series, for routing
        assert set(reads.tags) == {None, world.labeller.header_tags}
        labels.append(world.rows("SELECT series_uid, labels, label_state FROM series ORDER BY 1"))
    assert labels[0] == labels[1]
    assert all(json.loads(text) for _, text, _ in labels[0])


def test_without_labelling_only_the_first_of_each_series_is_read(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads = _Reads(monkeypatch)
    world.tracker.labeller = None
    world.send(_study(2, [MR["t1_mprage"], MR["flair"]]))
    world.tracker.scan(settled())
    assert reads.tags == [None, None]
    assert world.rows("SELECT count(*) FROM study_routes") == [(1,)]
