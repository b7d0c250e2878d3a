"""``fiona quarantine list|show|release|discard`` and the per-project quarantine policy.

A real data dir (index, archive, quarantine) fed with synthetic studies; the engine side is a
:class:`Workflow` (tracker plus runner) and an outbox worker driven with explicit clock values;
the operator side is the CLI on the same site config, as while ``fiona serve`` runs. A config
change is a project file rewritten and a new Workflow built from the files (what the service
does when a project file changes).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydicom.dataset import Dataset

from engine.cli import main
from engine.config.loader import load_project, load_site
from engine.store.archive import Archive
from engine.store.audit import AuditLog
from engine.store.index import Origin, SqliteIndex, open_index
from engine.store.quarantine import MEANINGS, Reason
from engine.store.quarantine_policy import (
    QuarantinePolicy,
    expired_items,
    policy_of,
    purge,
)
from engine.workflow import Workflow
from tests import synth
from tests.dbutil import connect_index, index_exists
from tests.peers import REPO, FionaServer, nodelay_env

MR = synth.MR_SERIES
LATER = 1000.0  # seconds: past every quiet time used here


class World:
    """A site with projects (files), an index, an archive and a workflow over them."""

    def __init__(self, tmp: Path, projects: list[dict[str, Any]], site: dict[str, Any]) -> None:
        self.tmp = tmp
        self.projects_dir = tmp / "projects"
        self.projects_dir.mkdir(exist_ok=True)
        for doc in projects:
            self.write_project(doc)
        self.site_file = tmp / "site.yaml"
        self.site_file.write_text(yaml.safe_dump({"data_dir": "data", **site}))
        self.site = load_site(self.site_file)
        self.data = self.site.data_dir
        self.index: SqliteIndex = open_index("", self.data / "index.sqlite")
        self.archive = Archive(self.data, self.index, duplicate_policy=self.site.duplicate_policy)
        self.workflow = self.reload()

    def write_project(self, doc: dict[str, Any]) -> None:
        (self.projects_dir / f"{doc['name']}.yaml").write_text(yaml.safe_dump(doc))

    def loaded(self) -> list[Any]:
        return [load_project(p) for p in sorted(self.projects_dir.glob("*.yaml"))]

    def reload(self) -> Workflow:
        """A workflow on the current project files (the service reloads them the same way)."""
        self.workflow = Workflow(self.index, self.site, self.loaded())
        return self.workflow

    def send(self, datasets: list[Dataset], aet: str = "MR1") -> None:
        for path in synth.write_study(datasets, self.tmp / f"send-{time.monotonic_ns()}"):
            outcome = self.archive.receive(
                path.read_bytes(), Origin("dimse", aet, "FIONA", "10.0.0.9")
            )
            assert outcome.status == 0

    def scan(self, later: float = LATER) -> None:
        self.workflow.scan(time.time() + later)

    def rows(self, sql: str, *args: object) -> list[tuple[Any, ...]]:
        with self.index.reading() as db:
            return db.execute(sql, args).fetchall()

    def held(self) -> list[tuple[str, str, str]]:
        return [
            (str(q), str(r), str(p))
            for q, r, p in self.rows(
                "SELECT qid, reason, project FROM quarantine WHERE state='held'"
            )
        ]

    def cli(self, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
        code = main([*args, "--config", str(self.site_file)])
        out = capsys.readouterr()
        return code, out.out + out.err

    def audit(self) -> list[dict[str, Any]]:
        return AuditLog(self.data).entries()


def _study(seed: int, series: list[synth.SeriesSpec] | None = None) -> list[Dataset]:
    spec = synth.make_study_spec(seed)
    return synth.make_study(spec, series or [MR["t1_mprage"], MR["t2_tse"]], size=8)


def _project(
    name: str, pipeline: list[dict[str, Any]], aet: str = "MR1", **more: Any
) -> dict[str, Any]:
    return {
        "name": name,
        "routing": {"calling_ae": [aet]},
        "completeness": {"study_quiet_seconds": 100},
        "pipeline": pipeline,
        **more,
    }


def _select(label: str, out: Path) -> list[dict[str, Any]]:
    return [
        {"step": "classify"},
        {"step": "select", "labels": [label], "if_empty": "quarantine"},
        {"step": "copy", "to": str(out)},
    ]


def _key(tmp: Path) -> None:
    """The project key, beside the project files (the loader checks it)."""
    (tmp / "projects").mkdir(exist_ok=True)
    key = tmp / "projects" / "p.key"
    key.write_bytes(os.urandom(40))
    os.chmod(key, 0o600)


# --------------------------------------------------------------------------- release


def test_release_after_a_config_change_reruns_from_the_step_that_held(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    world = World(tmp_path, [_project("p", _select("dwi", out))], {})
    datasets = _study(1)
    world.send(datasets)
    world.scan()
    [(qid, reason, project)] = world.held()
    assert (reason, project) == ("nothing_selected", "p")
    code, text = world.cli(capsys, "quarantine", "list")
    assert code == 0 and qid[:12] in text and str(datasets[0].StudyInstanceUID) in text
    assert f"nothing_selected: {MEANINGS[Reason.NOTHING_SELECTED]}" in text
    code, text = world.cli(capsys, "quarantine", "show", qid[:8])
    assert code == 0 and "stopped at step 1 (select)" in text
    # The coordinator fixes the project; the service reloads it; the operator releases.
    world.write_project(_project("p", _select("t1", out)))
    world.reload()
    code, text = world.cli(capsys, "quarantine", "release", qid, "--yes")
    assert code == 0 and "reopened at step 1 (select)" in text, text
    assert world.rows("SELECT state, resolved_by != '' FROM quarantine") == [("released", 1)]
    world.scan()
    assert world.rows("SELECT state FROM pipeline_runs") == [("done",)]
    assert len(list(out.rglob("*.dcm"))) == MR["t1_mprage"].n_instances
    released = [e for e in world.audit() if e["event"] == "released"]
    assert [(e["qid"], e["reason"], e["project"]) for e in released] == [
        (qid, "nothing_selected", "p")
    ]
    # A released item cannot be released again.
    code, text = world.cli(capsys, "quarantine", "release", qid, "--yes")
    assert code == 1 and "is released, not held" in text


def test_release_of_a_transfer_failed_study_retries_its_transfers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from engine.service import OutboxJob, Store

    share = tmp_path / "share"  # not there yet: an unmounted share
    project = _project(
        "p",
        [{"step": "anonymize", "secret_file": "p.key"}, {"step": "send", "to": "share"}],
        destinations={
            "share": {"type": "folder", "path": str(share), "retry": {"max_attempts": 1}}
        },
    )
    _key(tmp_path)
    world = World(tmp_path, [project], {})
    world.send(_study(2))
    world.scan()
    # The service's outbox job, with its policy-aware hold.
    worker = OutboxJob(Store(world.site, world.index, world.archive), world.loaded()).worker
    try:
        assert worker.run_due(time.time() + 1, timeout=30) == 1
        [(qid, reason, _)] = world.held()
        assert reason == "transfer_failed"
        share.mkdir()
        code, text = world.cli(capsys, "quarantine", "release", qid, "--yes")
        assert code == 0 and "queued again" in text, text
        assert worker.run_due(time.time() + 1, timeout=30) == 1
    finally:
        worker.close()
    assert world.rows("SELECT state FROM transfers") == [("done",)]
    assert len(list(share.rglob("*.dcm"))) == len(_study(2))
    assert world.held() == []


def test_release_of_a_series_that_failed_conversion_converts_it_again_with_the_current_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from engine.pipeline.nifti import dcm2niix_path
    from engine.service import OutboxJob, Store

    if dcm2niix_path() is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("dcm2niix is not installed (scripts/setup.sh --test)")
        pytest.skip("dcm2niix is not installed")
    share = tmp_path / "share"
    share.mkdir()

    def project(timeout: float) -> dict[str, Any]:
        return _project(
            "p",
            [
                {"step": "anonymize", "secret_file": "p.key"},
                {"step": "convert", "format": "nifti", "timeout_seconds": timeout},
                {"step": "send", "to": "share"},
            ],
            destinations={"share": {"type": "folder", "path": str(share)}},
        )

    _key(tmp_path)
    # A timeout no dcm2niix meets: every series of the study is held, the run goes on.
    world = World(tmp_path, [project(0.001)], {})
    datasets = _study(9)
    world.send(datasets)
    world.scan()
    held = {path.rsplit("/", 1)[1]: qid for qid, path in world.rows(
        "SELECT qid, path FROM quarantine WHERE state='held' AND reason='conversion_failed'"
    )}  # fmt: skip
    t2 = next(d for d in datasets if d.SeriesDescription == MR["t2_tse"].series_description)
    t2_uid = str(t2.SeriesInstanceUID)
    assert len(held) == 2 and t2_uid in held
    assert world.rows("SELECT follow_up, state FROM pipeline_runs") == [(0, "done")]
    # The coordinator gives dcm2niix time; the service reloads; the operator releases one.
    world.write_project(project(600))
    world.reload()
    code, text = world.cli(capsys, "quarantine", "release", held[t2_uid], "--yes")
    assert code == 0 and "run 2 (follow-up 1) made for this series alone" in text, text
    world.scan()
    runs = world.rows("SELECT follow_up, series, state FROM pipeline_runs ORDER BY id")
    assert runs[1] == (1, json.dumps([t2_uid]), "done"), runs
    worker = OutboxJob(Store(world.site, world.index, world.archive), world.loaded()).worker
    try:
        while worker.run_due(time.time() + 1, timeout=60):
            pass
    finally:
        worker.close()
    assert world.rows("SELECT state FROM transfers WHERE run_id=2") == [("done",)]
    converted = sorted(p.name for p in share.rglob("*.nii.gz"))
    assert len(converted) == 1 and converted[0].startswith(f"series-{t2.SeriesNumber:03d}")
    # The other series stays held; the released one is released, and a new scan makes no
    # other run (the route counts the released series' run).
    assert [q for q, r, _ in world.held()] == [q for u, q in held.items() if u != t2_uid]
    world.scan()
    assert len(world.rows("SELECT id FROM pipeline_runs")) == 2
    code, text = world.cli(capsys, "quarantine", "release", held[t2_uid], "--yes")
    assert code == 1 and "is released, not held" in text


def test_release_of_an_unrouted_study_routes_it_with_the_current_projects(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = {"routing": {"unrouted_after_seconds": 10}}
    world = World(tmp_path, [_project("neuro", [])], site)
    world.send(_study(3), aet="OTHER")
    world.scan()
    world.scan(LATER + 1)  # judged once: held once
    [(qid, reason, _)] = world.held()
    assert reason == "unrouted"
    world.write_project(_project("other", [{"step": "classify"}], aet="OTHER"))
    world.reload()
    code, text = world.cli(capsys, "quarantine", "release", qid, "--yes")
    assert code == 0 and "routing reset" in text, text
    world.scan(LATER + 2)
    world.scan(LATER + 3)
    assert world.rows("SELECT project, state FROM pipeline_runs") == [("other", "done")]
    assert world.held() == []
    assert world.rows("SELECT count(*) FROM quarantine") == [(1,)]  # not held again
    assert world.rows("SELECT labels != '[]' FROM series") == [(1,), (1,)]  # labelled again


def _garbage(world: World, seed: int = 0) -> str:
    data = synth.write_garbage(world.tmp / f"garbage{seed}.bin", seed=seed).read_bytes()
    outcome = world.archive.receive(data, Origin("dimse", "MR1", "FIONA", "10.0.0.9"))
    assert outcome.reason == "unparseable"
    [(qid,)] = world.rows("SELECT qid FROM quarantine ORDER BY id DESC LIMIT 1")
    return str(qid)


def test_release_of_an_unparseable_item_stays_held_and_says_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    world = World(tmp_path, [], {})
    qid = _garbage(world)
    code, text = world.cli(capsys, "quarantine", "release", qid, "--yes")
    assert code == 1
    assert "not released: still unparseable" in text and "this item stays held" in text
    rows = world.rows("SELECT qid, state FROM quarantine ORDER BY id")
    assert rows[0] == (qid, "held") and len(rows) == 2 and rows[1][1] == "held"
    assert rows[1][0] in text  # the new item is named
    events = [e["event"] for e in world.audit()]
    assert events == ["quarantined", "released", "quarantined", "release_failed"]


def test_release_of_a_repaired_instance_archives_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    world = World(tmp_path, [], {"duplicate_policy": "quarantine"})
    [first] = _study(4, [MR["localizer"]])[:1]
    world.send([first])
    changed = _study(4, [MR["localizer"]])[0]
    changed.SeriesDescription = "changed"
    world.send([changed])
    [(qid, reason, _)] = world.held()
    assert reason == "duplicate_conflict"
    code, text = world.cli(capsys, "quarantine", "release", qid, "--yes")
    assert code == 0 and "archived again (replaced)" in text, text
    [(path,)] = world.rows("SELECT path FROM instances")
    assert b"changed" in (world.data / str(path)).read_bytes()


# --------------------------------------------------------------------------- discard


def test_discard_asks_first_audits_first_then_removes_the_bytes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    world = World(tmp_path, [], {})
    qid = _garbage(world)
    [(path,)] = world.rows("SELECT path FROM quarantine")
    held = world.data / str(path)
    monkeypatch.setattr("sys.stdin", io.StringIO("yes\n"))
    code, text = world.cli(capsys, "quarantine", "discard", qid)
    assert code == 1 and "nothing done" in text and held.is_file()

    def broken(self: AuditLog, event: str, **fields: Any) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(AuditLog, "write", broken)
        code, text = world.cli(capsys, "quarantine", "discard", qid, "--yes")
    assert code == 1 and "not discarded" in text and held.is_file()
    assert world.rows("SELECT state FROM quarantine") == [("held",)]

    monkeypatch.setattr("sys.stdin", io.StringIO("discard\n"))
    code, text = world.cli(capsys, "quarantine", "discard", qid)
    assert code == 0 and "discarded" in text
    assert not held.exists() and (world.data / "archive").is_dir()
    assert world.rows("SELECT state FROM quarantine") == [("discarded",)]
    assert world.audit()[-1]["event"] == "discarded" and world.audit()[-1]["qid"] == qid


def test_discard_of_a_held_study_keeps_the_archive_and_ends_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    world = World(tmp_path, [_project("p", _select("dwi", tmp_path / "out"))], {})
    datasets = _study(5)
    world.send(datasets)
    world.scan()
    [(qid, _, _)] = world.held()
    code, text = world.cli(capsys, "quarantine", "discard", qid, "--yes")
    assert code == 0 and "stays until retention" in text
    assert (world.data / "archive" / str(datasets[0].StudyInstanceUID)).is_dir()
    assert world.rows("SELECT state, reason FROM pipeline_runs") == [("failed", "discarded")]
    code, text = world.cli(capsys, "quarantine", "list", "--state", "discarded", "--json")
    assert code == 0 and json.loads(text.splitlines()[0])["qid"] == qid


# --------------------------------------------------------------------------- policy


def test_policy_hold_excluding_a_reason_drops_the_study(tmp_path: Path) -> None:
    policy = {"hold": ["step_failed"], "notify": ["nothing_selected"]}
    world = World(
        tmp_path, [_project("p", _select("dwi", tmp_path / "out"), quarantine=policy)], {}
    )
    world.send(_study(6))
    world.scan()
    assert world.held() == []
    assert world.rows("SELECT state, reason FROM pipeline_runs") == [("failed", "nothing_selected")]
    events = [(e["event"], e.get("reason")) for e in world.audit() if "reason" in e]
    assert events == [("dropped", "nothing_selected"), ("notify", "nothing_selected")]


def test_policy_defaults_and_what_is_always_held(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"name": "p"}))
    default = policy_of(load_project(tmp_path / "p.yaml"))
    assert default.keep_days == 90 and default.notify == frozenset()
    assert all(default.holds(r) for r in Reason)
    none = QuarantinePolicy(hold=frozenset())
    held = {r.value for r in Reason if none.holds(r)}
    assert held == {"burned_in", "verification_failed", "deidentification_failed"}
    assert none.holds("a_plugin_code")  # unknown codes are never dropped


def test_schema_lists_every_reason_code() -> None:
    schema = json.loads(Path("schemas/project.schema.json").read_text())
    assert set(schema["$defs"]["quarantine_reason"]["enum"]) == {r.value for r in Reason}
    assert set(schema["properties"]["quarantine"]["properties"]["hold"]["default"]) == set(Reason)
    assert set(MEANINGS) == set(Reason)


def test_keep_days_purge_deletes_expired_files_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    world = World(tmp_path, [], {})
    old, young, kept = _garbage(world, 1), _garbage(world, 2), _garbage(world, 3)
    world.cli(capsys, "quarantine", "discard", old, young, "--yes")
    sidecars = {q: next(world.data.glob(f"quarantine/*/{q}.json")) for q in (old, young, kept)}
    with world.index.transaction() as db:  # discarded 100 days ago
        db.execute(
            "UPDATE quarantine SET resolved_at=? WHERE qid=?", (time.time() - 100 * 86400, old)
        )
    now = time.time()
    expired = expired_items(world.index, now, {})
    assert [e.qid for e in expired] == [old]
    assert expired_items(world.index, now, {"": QuarantinePolicy(keep_days=200)}) == []
    assert purge(world.index, world.data, expired) == 1
    assert not sidecars[old].exists() and sidecars[young].exists() and sidecars[kept].exists()
    assert expired_items(world.index, now, {}) == []  # purged once
    assert any(e["event"] == "purged" and e["qid"] == old for e in world.audit())


def test_the_retention_job_purges_expired_quarantine_items(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from engine.manage.retention import RetentionJob

    world = World(tmp_path, [], {})
    old = _garbage(world, 1)
    world.cli(capsys, "quarantine", "discard", old, "--yes")
    sidecar = next(world.data.glob(f"quarantine/*/{old}.json"))
    with world.index.transaction() as db:  # discarded 100 days ago
        db.execute(
            "UPDATE quarantine SET resolved_at=? WHERE qid=?", (time.time() - 100 * 86400, old)
        )
    projects = tmp_path / "no-projects"
    projects.mkdir()
    RetentionJob(world.data, projects, world.index, 0.0)()
    assert not sidecar.exists()
    assert any(e["event"] == "purged" and e["qid"] == old for e in world.audit())


# --------------------------------------------------------------------------- judging (13.11)


def _fiona(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip


def _wait_for_held(data: Path, n: int, timeout: float = 90.0) -> list[tuple[Any, ...]]:
    """The held items once there are ``n`` (polling the index the service writes)."""
    deadline = time.monotonic() + timeout
    rows: list[tuple[Any, ...]] = []
    while time.monotonic() < deadline:
        if index_exists(data / "index.sqlite"):
            with connect_index(data / "index.sqlite") as db:
                rows = db.execute(
                    "SELECT qid, reason, study_uid FROM quarantine WHERE state='held' ORDER BY id"
                ).fetchall()
            if len(rows) >= n:
                return rows
        time.sleep(0.2)
    raise AssertionError(f"{len(rows)} held items after {timeout} s, expected {n}")


def test_list_and_show_say_where_held_items_came_from_and_what_they_hold(
    tmp_path: Path, storescu: str, empty_projects: Path
) -> None:
    from engine.store.audit import uid_token

    site = tmp_path / "site.yaml"
    site.write_text(
        yaml.safe_dump({"scan_interval_seconds": 0.5, "routing": {"unrouted_after_seconds": 0}})
    )
    data = tmp_path / "data"
    where = ("--config", str(site), "--data", str(data), "--projects", str(empty_projects))
    spec = synth.make_study_spec(41)
    sent = synth.make_study(spec, [MR["t1_mprage"], MR["t2_tse"]], size=8)
    net_uid = str(sent[0].StudyInstanceUID)
    cd_study = synth.make_study(synth.make_study_spec(42), [MR["localizer"]], size=8)
    cd_uid = str(cd_study[0].StudyInstanceUID)
    cd = tmp_path / "cd"
    synth.write_study(cd_study, cd)
    synth.write_garbage(cd / "VIEWER.BIN", seed=4)
    server = FionaServer(data, empty_projects, config=site).start()
    try:
        files = synth.write_study(sent, tmp_path / "send")
        result = subprocess.run(
            [storescu, "-aet", "MR1", "-aec", "FIONA", "127.0.0.1", str(server.port),
             *map(str, files)],
            capture_output=True, text=True, timeout=300, env=nodelay_env(),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        ingest = _fiona("ingest", "--no-progress", "--calling-ae", "USB1", *where, str(cd))
        assert ingest.returncode == 1, ingest.stdout + ingest.stderr  # the garbage is held
        held = _wait_for_held(data, 3)
    finally:
        server.stop()
    by_study = {str(s): (str(q), str(r)) for q, r, s in held}
    net_qid, net_reason = by_study[net_uid]
    cd_qid, cd_reason = by_study[cd_uid]
    [(bad_qid, bad_reason, _)] = [h for h in held if h[2] is None]
    assert (net_reason, cd_reason, bad_reason) == ("unrouted", "unrouted", "unparseable")

    listing = _fiona("quarantine", "list", *where)
    assert listing.returncode == 0, listing.stderr
    text = listing.stdout
    n_sent = MR["t1_mprage"].n_instances + MR["t2_tse"].n_instances
    date = _iso(spec.study_date)
    assert f"from MR1@127.0.0.1 -> FIONA; MR; study date {date}; 2 series, {n_sent} instances" in (
        text
    )
    assert (
        f"from ingest USB1 -> FIONA; MR; study date"
        f" {_iso(cd_study[0].StudyDate)}; 1 series, {MR['localizer'].n_instances} instances"
    ) in text
    assert "from ingest USB1 -> FIONA; -; study date -; 1 instance" in text
    for ds in (sent[0], cd_study[0]):  # a coordinator's list: no patient name or ID
        assert str(ds.PatientName) not in text and str(ds.PatientID) not in text
    lines = _fiona("quarantine", "list", *where, "--json").stdout.splitlines()
    as_json = [json.loads(line) for line in lines]
    facts = {j["qid"]: j["facts"] for j in as_json}
    assert facts[net_qid]["series"] == 2 and facts[net_qid]["instances"] == n_sent

    show = _fiona("quarantine", "show", net_qid[:8], *where)
    assert show.returncode == 0, show.stderr
    assert f"origin      MR1@127.0.0.1 -> FIONA ({n_sent} instances)" in show.stdout
    assert "modality    MR" in show.stdout and f"study date  {date}" in show.stdout
    assert f"contents    2 series, {n_sent} instances" in show.stdout
    command = (
        f"explain     fiona explain {net_uid} --config {site.resolve()} --data {data.resolve()}"
        f" --projects {empty_projects.resolve()}"
    )
    assert command in show.stdout
    # The command given is the one that explains the hold.
    explained = _fiona(*command.split()[2:])
    assert explained.returncode == 0 and "would be held as 'unrouted'" in explained.stdout
    show_bad = _fiona("quarantine", "show", bad_qid, *where)
    assert "origin      ingest USB1 -> FIONA" in show_bad.stdout
    assert "fiona explain" not in show_bad.stdout

    # One log line per item names its id and the study's token, never the UID.
    log = server.log_text()
    assert f"quarantine {net_qid}: unrouted (study {uid_token(net_uid)}, from MR1@127.0.0.1" in log
    assert f"quarantine {cd_qid}: unrouted (study {uid_token(cd_uid)}, from ingest USB1" in log
    assert net_uid not in log and cd_uid not in log
    assert f"quarantine {bad_qid}: unparseable (study -, from ingest USB1 -> FIONA)" in (
        ingest.stderr
    )


def _iso(day: str) -> str:
    return f"{day[:4]}-{day[4:6]}-{day[6:]}"


def test_a_held_study_records_every_origin_and_shows_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = {"routing": {"unrouted_after_seconds": 10}}
    world = World(tmp_path, [_project("neuro", [])], site)
    datasets = _study(43)
    world.send(datasets[:3], aet="OTHER")
    world.send(datasets[3:], aet="SECOND")
    world.scan()
    world.scan(LATER + 1)
    [(qid, reason, _)] = world.held()
    assert reason == "unrouted"
    [(via, calling)] = world.rows("SELECT via, calling_ae FROM quarantine")
    assert (via, calling) == ("dimse", "SECOND" if len(datasets) - 3 > 3 else "OTHER")
    sidecar = json.loads(next(world.data.glob(f"quarantine/*/{qid}.json")).read_text())
    assert {(o["calling_ae"], o["instances"]) for o in sidecar["origins"]} == {
        ("OTHER", 3),
        ("SECOND", len(datasets) - 3),
    }
    code, text = world.cli(capsys, "quarantine", "list")
    assert code == 0 and "(+1 more); MR; study date" in text, text
    code, text = world.cli(capsys, "quarantine", "show", qid)
    assert "OTHER@10.0.0.9 -> FIONA (3 instances)" in text
    assert f"SECOND@10.0.0.9 -> FIONA ({len(datasets) - 3} instances)" in text
    assert f"explain     fiona explain {datasets[0].StudyInstanceUID} --config" in text


def test_release_of_an_unrouted_study_keeps_its_assignment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Held as unrouted, then given to a project by ``fiona ingest --project`` (the same CD
    ingested again): the release routes it to that project, the assignment is not reset."""
    from engine.route.assign import assign_study

    site = {"routing": {"unrouted_after_seconds": 10}}
    world = World(tmp_path, [_project("neuro", [])], site)
    datasets = _study(44)
    world.send(datasets, aet="OTHER")
    world.scan()
    world.scan(LATER + 1)
    [(qid, reason, _)] = world.held()
    assert reason == "unrouted"
    assign_study(world.index, str(datasets[0].StudyInstanceUID), "neuro", subject="S1")
    code, text = world.cli(capsys, "quarantine", "release", qid, "--yes")
    assert code == 0 and "routing reset" in text, text
    world.scan(LATER + 2)
    world.scan(LATER + 3)
    assert world.rows("SELECT project, subject, state FROM pipeline_runs") == [
        ("neuro", "S1", "done")
    ]
    assert world.held() == []


def test_a_quarantined_instance_shows_the_modality_and_date_it_carries(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    world = World(tmp_path, [], {"duplicate_policy": "quarantine"})
    [first] = _study(45, [MR["localizer"]])[:1]
    world.send([first])
    changed = _study(45, [MR["localizer"]])[0]
    changed.SeriesDescription = "changed"
    world.send([changed])
    [(_, reason, _)] = world.held()
    assert reason == "duplicate_conflict"
    code, text = world.cli(capsys, "quarantine", "list")
    expected = f"from MR1@10.0.0.9 -> FIONA; MR; study date {_iso(first.StudyDate)}; 1 instance"
    assert code == 0 and expected in text, text


def test_items_are_listed_a_page_at_a_time_and_only_of_the_given_projects(
    tmp_path: Path,
) -> None:
    from engine.manage.release import find_items
    from engine.store.index import QuarantineRecord

    index = open_index("", tmp_path / "index.sqlite")
    projects = ["a", "b", "", "a", "a", "b"]
    for n, project in enumerate(projects):
        index.add_quarantine(QuarantineRecord(
            f"{n:012x}", "unrouted", "", f"quarantine/20260101/{n:012x}.dcm", 1, "x",
            float(n), Origin("dimse"), project=project,
        ))  # fmt: skip
    try:

        def qids(**kw: Any) -> list[str]:
            return [i.qid[-1] for i in find_items(index, **kw)]

        assert qids() == ["0", "1", "2", "3", "4", "5"]  # oldest first
        assert qids(limit=2, offset=2) == ["2", "3"]
        assert qids(projects=["a"], limit=2) == ["0", "3"]
        assert qids(projects=["a"], limit=2, offset=2) == ["4"]
        assert qids(projects=["a", "b"]) == ["0", "1", "3", "4", "5"]  # none held at receipt
        assert qids(projects=[]) == []
    finally:
        index.close()
