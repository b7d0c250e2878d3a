"""REDCap in the pipeline: the consent step and its re-check job, research IDs as pseudonyms,
transfer requests.

Everything goes through PyCap over real HTTP to the REDCap stand-in (``tests/redcap_server.py``),
with a real index and archive holding synthetic studies (``tests/synth.py``). Runs are executed
by the PipelineRunner with explicit clock values, so retries are tested without sleeping;
batching is asserted through the server's request log.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from pydicom.dataset import Dataset

from engine.config.loader import check_project_files, load_project
from engine.config.model import ProjectConfig
from engine.pipeline.consent_recheck import consent_recheck_job
from engine.pipeline.runner import MAX_ATTEMPTS, PipelineRunner
from engine.pipeline.steps import Step
from engine.pipeline.store import RunRecord, RunState, RunStore, StepState
from engine.pipeline.transfer_requests import transfer_requests_job
from engine.pipeline.validate import build_pipeline
from engine.store.archive import Archive
from engine.store.audit import AuditLog, uid_token
from engine.store.db import IndexUnavailable
from engine.store.index import Origin, SqliteIndex, open_index
from engine.store.quarantine import Quarantine
from tests import synth
from tests.redcap_server import RedcapServer, meta

NOW = 1_700_000_000.0
METADATA = [
    meta("record_id", "enrolment"),
    meta("mrn", "enrolment"),
    meta("research_id", "enrolment"),
    meta("consent", "enrolment", "yesno"),
    meta("req_study", "requests"),
    meta("req_project", "requests"),
    meta("req_subject", "requests"),
    meta("req_event", "requests"),
    meta("req_status", "requests"),
    meta("req_date", "requests"),
    meta("req_error", "requests"),
]
CONSENT = {
    "step": "consent",
    "key": {"field": "mrn", "from": "patient_id"},
    "consent_field": "consent",
}


def patient_id(seed: int) -> str:
    return synth.make_study_spec(seed).patient_id


class World:
    """A data dir (index, archive, quarantine, run store), a REDCap and a project file using it."""

    def __init__(self, tmp: Path, redcap: RedcapServer) -> None:
        self.tmp, self.redcap = tmp, redcap
        self.data = tmp / "data"
        self.folder = tmp / "projects"
        self.folder.mkdir()
        token = self.folder / "redcap.token"
        token.write_text(redcap.token + "\n")
        token.chmod(0o600)
        key = self.folder / "p.key"
        key.write_bytes(os.urandom(40))
        key.chmod(0o600)
        self.project_file = self.folder / "p.yaml"
        self.index: SqliteIndex = open_index("", self.data / "index.sqlite")
        self.archive = Archive(self.data, self.index)
        self.store = RunStore(self.index)
        self.quarantine = Quarantine(self.data, self.index)

    def write_project(self, pipeline: list[dict[str, Any]], **redcap: Any) -> ProjectConfig:
        section = {
            "url": self.redcap.url,
            "token_file": "redcap.token",
            "timeout_seconds": 5,
            "min_interval_seconds": 0,
            "retries": 0,
            "consent_recheck_seconds": 60,
            **redcap,
        }
        doc = {"name": "p", "redcap": section, "pipeline": pipeline}
        self.project_file.write_text(yaml.safe_dump(doc))
        return load_project(self.project_file)

    def receive(self, seed: int) -> tuple[str, list[str]]:
        """Archive a small synthetic study; (study UID, series UIDs)."""
        datasets: list[Dataset] = synth.make_study(
            synth.make_study_spec(seed), [synth.MR_SERIES["t1_mprage"]], size=8
        )
        for path in synth.write_study(datasets, self.tmp / f"in-{seed}"):
            assert self.archive.receive(path.read_bytes(), Origin("ingest")).status == 0
        series = sorted({str(ds.SeriesInstanceUID) for ds in datasets})
        return str(datasets[0].StudyInstanceUID), series

    def new_run(self, seed: int, subject: str = "S01") -> int:
        study, series = self.receive(seed)
        return self.store.create_run(study, "p", subject, "baseline", 0, series)

    def hold(self, run: RunRecord, reason: str, detail: str) -> None:
        self.quarantine.hold_study(run.study_uid, reason, detail, project=run.project)

    def runner(self, steps: list[Step]) -> PipelineRunner:
        return PipelineRunner(self.store, self.index, self.data, {"p": steps}, self.hold)

    def steps(self, pipeline: list[dict[str, Any]]) -> list[Step]:
        return build_pipeline(pipeline, self.project_file)

    def run(self, run_id: int) -> RunRecord:
        found = self.store.get(run_id)
        assert found is not None
        return found

    def quarantine_rows(self) -> list[tuple[str, str, str]]:
        with self.index.reading() as db:
            rows = db.execute("SELECT study_uid, reason, state FROM quarantine ORDER BY id")
            return [(str(a), str(b), str(c)) for a, b, c in rows]


@pytest.fixture
def redcap() -> Iterator[RedcapServer]:
    with RedcapServer(METADATA) as srv:
        yield srv


@pytest.fixture
def world(tmp_path: Path, redcap: RedcapServer) -> Iterator[World]:
    w = World(tmp_path, redcap)
    yield w
    w.index.close()


# --------------------------------------------------------------------------- config


def test_project_schema_copies_the_connection_keys_of_the_redcap_schema() -> None:
    import json

    schemas = Path(__file__).resolve().parents[1] / "schemas"
    connection = json.loads((schemas / "redcap.schema.json").read_text())["properties"]
    project = json.loads((schemas / "project.schema.json").read_text())
    section = project["properties"]["redcap"]["properties"]
    for key, spec in connection.items():
        assert key in section, key
        for word in ("type", "default", "minimum", "maximum", "exclusiveMinimum", "pattern"):
            assert section[key].get(word) == spec.get(word), (key, word)


def test_consent_step_needs_a_redcap_section(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"name": "p", "pipeline": [CONSENT]}))
    projects, issues = check_project_files([path])
    assert projects == []
    assert [i.message for i in issues] == [
        "a consent step needs the project's 'redcap' section (url, token_file); found none"
    ]


# --------------------------------------------------------------------------- consent


def test_consent_present_is_done_and_keeps_the_record_id(world: World) -> None:
    world.redcap.put([{"record_id": "7", "mrn": patient_id(1), "consent": "1"}])
    world.write_project([CONSENT])
    run_id = world.new_run(1)
    world.runner(world.steps([CONSENT])).run_pending(NOW)
    run = world.run(run_id)
    assert run.state == RunState.DONE
    assert run.step_state["redcap"] == {"record": "7"}
    assert world.quarantine_rows() == []


@pytest.mark.parametrize("rows", [[], [{"record_id": "7", "mrn": "OTHER", "consent": "1"}]])
def test_no_record_is_held_no_consent(world: World, rows: list[dict[str, str]]) -> None:
    world.redcap.put(rows)
    world.write_project([CONSENT])
    run_id = world.new_run(1)
    world.runner(world.steps([CONSENT])).run_pending(NOW)
    run = world.run(run_id)
    assert (run.state, run.reason) == (RunState.QUARANTINED, "no_consent")
    assert patient_id(1) not in run.detail and "PatientID" in run.detail


def test_consent_granted_later_is_released_by_the_recheck_job(world: World) -> None:
    world.redcap.put([{"record_id": "7", "mrn": patient_id(1), "consent": "0"}])
    project = world.write_project([CONSENT])
    run_id = world.new_run(1)
    runner = world.runner(world.steps([CONSENT]))
    runner.run_pending(NOW)
    study = world.run(run_id).study_uid
    assert world.run(run_id).reason == "no_consent"
    assert world.quarantine_rows() == [(study, "no_consent", "held")]

    job = consent_recheck_job(world.index, world.data, [project])
    assert job is not None and job.interval == 60
    assert job(NOW + 10) == 0  # still no consent: stays held
    world.redcap.put([{"record_id": "7", "consent": "1"}])
    assert job(NOW + 20) == 0  # not due yet: every 60 s
    assert job(NOW + 80) == 1
    assert world.quarantine_rows() == [(study, "no_consent", "released")]
    assert world.run(run_id).state == RunState.PENDING
    [entry] = [e for e in AuditLog(world.data).entries() if e["event"] == "consent_granted"]
    assert entry["study"] == uid_token(study) and entry["project"] == "p"
    assert study not in str(entry) and patient_id(1) not in str(entry)

    runner.run_pending(NOW + 81)
    run = world.run(run_id)
    assert run.state == RunState.DONE and run.step_state["redcap"] == {"record": "7"}


def test_recheck_asks_redcap_once_per_batch(world: World) -> None:
    world.redcap.put(
        [{"record_id": str(s), "mrn": patient_id(s), "consent": "0"} for s in range(1, 6)]
    )
    project = world.write_project([CONSENT], batch_size=10)
    runs = [world.new_run(s) for s in range(1, 6)]
    world.runner(world.steps([CONSENT])).run_pending(NOW)
    assert all(world.run(r).reason == "no_consent" for r in runs)
    world.redcap.put([{"record_id": str(s), "consent": "1"} for s in (2, 4)])
    job = consent_recheck_job(world.index, world.data, [project])
    assert job is not None
    before = len(world.redcap.calls("record"))
    assert job(NOW) == 2
    exports = world.redcap.calls("record")[before:]
    # One filtered export finds the five subjects' records, one export fetches their rows.
    assert len(exports) == 2
    assert len(exports[1].params["records"]) == 5
    assert [world.run(r).state for r in runs] == [
        RunState.QUARANTINED, RunState.PENDING, RunState.QUARANTINED, RunState.PENDING,
        RunState.QUARANTINED,
    ]  # fmt: skip


def test_redcap_down_then_up_retries_and_never_holds(world: World) -> None:
    world.redcap.put([{"record_id": "7", "mrn": patient_id(1), "consent": "1"}])
    world.write_project([CONSENT], outage_backoff_seconds=30, outage_max_backoff_seconds=120)
    run_id = world.new_run(1)
    runner = world.runner(world.steps([CONSENT]))
    world.redcap.set_down(True)
    now, waits = NOW, []
    for _ in range(MAX_ATTEMPTS + 3):  # more tries than the runner allows a failing step
        runner.run_pending(now)
        run = world.run(run_id)
        assert (run.state, run.reason) == (RunState.PENDING, "redcap_unavailable")
        assert run.next_try_at is not None
        waits.append(run.next_try_at - now)
        now = run.next_try_at
    assert waits[:4] == [30, 60, 120, 120]
    assert world.store.steps(run_id)[0].state == StepState.RETRY
    world.redcap.set_down(False)
    runner.run_pending(now)
    assert world.run(run_id).state == RunState.DONE
    assert world.quarantine_rows() == []


def test_a_closed_connection_is_an_outage_too(world: World) -> None:
    world.redcap.put([{"record_id": "7", "mrn": patient_id(1), "consent": "1"}])
    world.write_project([CONSENT])
    run_id = world.new_run(1)
    runner = world.runner(world.steps([CONSENT]))
    world.redcap.set_down(True, mode="close", calls=1)
    runner.run_pending(NOW)
    assert world.run(run_id).reason == "redcap_unavailable"
    runner.run_pending(NOW + 3600)
    assert world.run(run_id).state == RunState.DONE


def test_consent_by_subject_with_accepted_values(world: World) -> None:
    step = {
        "step": "consent",
        "key": {"field": "research_id", "from": "subject"},
        "consent_field": "consent",
        "accepted": ["1", "2"],
    }
    world.redcap.put([{"record_id": "3", "research_id": "S03", "consent": "1"}])
    world.write_project([step])
    held, done = world.new_run(1, subject="S01"), world.new_run(2, subject="S03")
    world.runner(world.steps([step])).run_pending(NOW)
    assert world.run(held).reason == "no_consent"
    assert world.run(done).step_state["redcap"] == {"record": "3"}


# --------------------------------------------------------------------------- research IDs

ANONYMIZE = {
    "step": "anonymize",
    "secret_file": "p.key",
    "pseudonyms": {
        "source": "redcap",
        "field": "research_id",
        "key": {"field": "mrn", "from": "patient_id"},
    },
}


def test_research_id_from_redcap_is_the_pseudonym(world: World) -> None:
    world.redcap.put(
        [{"record_id": "7", "mrn": patient_id(1), "research_id": "NEURO-042", "consent": "1"}]
    )
    pipeline = [CONSENT, ANONYMIZE]
    world.write_project(pipeline)
    run_id = world.new_run(1)
    world.runner(world.steps(pipeline)).run_pending(NOW)
    run = world.run(run_id)
    assert run.state == RunState.DONE, run.detail
    files = [f for s in run.step_state["deidentified"]["series"].values() for f in s["files"]]
    assert files
    for name in files:
        ds = pydicom.dcmread(world.data / name)
        assert (ds.PatientID, str(ds.PatientName)) == ("NEURO-042", "NEURO-042")


@pytest.mark.parametrize(
    ("rows", "detail"),
    [
        ([{"record_id": "7", "mrn": "SOMEONE-ELSE", "research_id": "R7"}], "no research ID"),
        ([{"record_id": "7", "mrn": "<pid>", "research_id": ""}], "no research ID"),
        (
            [
                {"record_id": "7", "mrn": "<pid>", "research_id": "R7"},
                {"record_id": "8", "mrn": "<pid>", "research_id": "R8"},
            ],
            "2 different research IDs",
        ),
    ],
)
def test_no_single_research_id_holds_the_study(
    world: World, rows: list[dict[str, str]], detail: str
) -> None:
    world.redcap.put([{**r, "mrn": r["mrn"].replace("<pid>", patient_id(1))} for r in rows])
    world.write_project([ANONYMIZE])
    run_id = world.new_run(1)
    world.runner(world.steps([ANONYMIZE])).run_pending(NOW)
    run = world.run(run_id)
    assert (run.state, run.reason) == (RunState.QUARANTINED, "no_pseudonym")
    assert detail in run.detail and patient_id(1) not in run.detail
    assert not (world.data / "work").exists()  # nothing de-identified with an invented ID
    assert world.quarantine_rows() == [(run.study_uid, "no_pseudonym", "held")]


def test_research_id_lookup_waits_out_an_outage_and_is_cached_per_run(world: World) -> None:
    world.redcap.put([{"record_id": "7", "mrn": patient_id(1), "research_id": "R7"}])
    world.write_project([ANONYMIZE])
    run_id = world.new_run(1)
    steps = world.steps([ANONYMIZE])
    world.redcap.set_down(True)
    world.runner(steps).run_pending(NOW)
    assert (world.run(run_id).state, world.run(run_id).reason) == (
        RunState.PENDING,
        "redcap_unavailable",
    )
    world.redcap.set_down(False)
    world.runner(steps).run_pending(NOW + 3600)
    assert world.run(run_id).state == RunState.DONE
    lookups = len(world.redcap.calls("record"))
    source = steps[0].research_ids.source_for  # type: ignore[attr-defined]
    ctx = type("Ctx", (), {"project": "p", "run_id": run_id})()
    assert source(ctx).value == "R7"  # from the cache: no further call
    assert len(world.redcap.calls("record")) == lookups


def test_redcap_pseudonyms_need_field_key_and_a_redcap_section(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    step = {"step": "anonymize", "secret_file": "k", "pseudonyms": {"source": "redcap"}}
    path.write_text(yaml.safe_dump({"name": "p", "pipeline": [step]}))
    _, issues = check_project_files([path])
    text = "\n".join(str(i) for i in issues)
    assert "field" in text and "key" in text, text


# --------------------------------------------------------------------------- transfer requests

REQUESTS = {
    "poll_seconds": 60,
    "study": "req_study",
    "project": "req_project",
    "subject": "req_subject",
    "event": "req_event",
    "status": "req_status",
    "status_date": "req_date",
    "error": "req_error",
}


def request(record: str, study: str, project: str = "p") -> dict[str, str]:
    return {
        "record_id": record,
        "req_study": study,
        "req_project": project,
        "req_subject": f"SUB-{record}",
        "req_event": "baseline",
    }


def stored(srv: RedcapServer, record: str) -> dict[str, str]:
    return srv.project.rows[(record, "", "", 0)]


def test_transfer_requests_are_queued_reported_and_never_queued_twice(world: World) -> None:
    study, _ = world.receive(1)
    later = synth.make_study_spec(2).accession_number
    world.redcap.put(
        [
            request("r1", study),
            request("r2", later),  # not received yet
            request("r3", synth.make_study_spec(1).accession_number, project="secret-name"),
            {"record_id": "r4", "mrn": "SOMEONE"},  # a subject without a request
        ]
    )
    project = world.write_project([], requests=REQUESTS)
    job = transfer_requests_job(world.index, [project])
    assert job is not None and job.interval == 60

    assert job(NOW) == 3
    # One export of the open requests, one batched import of the three statuses.
    assert [c.action for c in world.redcap.calls("record")] == ["export", "import"]
    assert stored(world.redcap, "r1")["req_status"] == "queued"
    assert stored(world.redcap, "r1")["req_date"] == "2023-11-14 22:13:20"
    assert stored(world.redcap, "r2")["req_status"] == "waiting"
    r3 = stored(world.redcap, "r3")
    assert r3["req_status"] == "error" and "req_project" in r3["req_error"]
    assert "secret-name" not in r3["req_error"]
    assert stored(world.redcap, "r4").get("req_status", "") == ""
    [run] = world.store.runs_for_study(study)
    assert (run.project, run.subject, run.event) == ("p", "SUB-r1", "baseline")

    # REDCap lost the status (an import that failed): the request is not queued again.
    world.redcap.put([{"record_id": "r1", "req_status": ""}], overwrite=True)
    assert job(NOW + 60) == 1
    assert stored(world.redcap, "r1")["req_status"] == "queued"
    assert len(world.store.runs_for_study(study)) == 1

    world.runner(world.steps([])).run_pending(NOW + 61)
    world.receive(2)
    assert job(NOW + 120) == 2
    assert stored(world.redcap, "r1")["req_status"] == "done"
    assert stored(world.redcap, "r2")["req_status"] == "queued"
    assert job(NOW + 180) == 0  # nothing changed
    imports = [c for c in world.redcap.calls("record") if c.action == "import"]
    assert len(imports) == 3  # one per poll that had something to write


def test_a_held_run_is_reported_as_error_and_an_outage_waits(world: World) -> None:
    study, _ = world.receive(1)
    world.redcap.put([request("r1", study)])
    pipeline = [CONSENT]  # no consent record: the run is held
    project = world.write_project(pipeline, requests=REQUESTS)
    job = transfer_requests_job(world.index, [project])
    assert job is not None
    world.redcap.set_down(True)
    assert job(NOW) == 0  # logged; tried again at the next poll
    world.redcap.set_down(False)
    assert job(NOW + 60) == 1
    world.runner(world.steps(pipeline)).run_pending(NOW + 61)
    assert job(NOW + 120) == 1
    row = stored(world.redcap, "r1")
    assert row["req_status"] == "error" and row["req_error"] == (
        "fiona held the study (reason no_consent)"
    )


# --------------------------------------------------------------------------- service wiring


def test_service_adds_the_jobs_the_projects_need(world: World) -> None:
    from apscheduler.schedulers.background import BackgroundScheduler

    from engine.pipeline.redcap_jobs import add_redcap_jobs

    def jobs(scheduler: BackgroundScheduler) -> dict[str, float]:
        return {j.id: j.trigger.interval.total_seconds() for j in scheduler.get_jobs()}

    scheduler = BackgroundScheduler(timezone="UTC")  # real, not started
    assert add_redcap_jobs(scheduler, world.index, world.data, [world.write_project([])]) == []
    project = world.write_project([CONSENT], requests=REQUESTS, consent_recheck_seconds=900)
    add_redcap_jobs(scheduler, world.index, world.data, [project])
    assert jobs(scheduler) == {"consent-recheck": 900, "redcap-requests": 60}
    # The project files change (reload): the jobs follow, and an unneeded one goes.
    add_redcap_jobs(scheduler, world.index, world.data, [world.write_project([CONSENT])])
    assert set(jobs(scheduler)) == {"consent-recheck"}


def test_logs_and_details_carry_no_phi_or_token(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    world.redcap.put([{"record_id": "7", "mrn": patient_id(1), "consent": "0"}])
    project = world.write_project([CONSENT])
    run_id = world.new_run(1)
    runner = world.runner(world.steps([CONSENT]))
    world.redcap.set_down(True, calls=1)
    runner.run_pending(NOW)
    runner.run_pending(NOW + 3600)
    job = consent_recheck_job(world.index, world.data, [project])
    assert job is not None
    world.redcap.set_down(True)
    job(NOW + 3600)
    text = caplog.text + world.run(run_id).detail + str(world.quarantine_rows())
    assert "redcap_unavailable" in caplog.text or "unavailable" in caplog.text
    assert patient_id(1) not in text and world.redcap.token not in text


def test_the_redcap_jobs_leave_an_index_outage_to_their_wrapper(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """The index away during a REDCap job: the job raises IndexUnavailable (the service's
    wrapper says so once and waits) instead of logging a traceback per project per tick, and
    the project is looked at again as soon as the index is back, not a whole interval later."""
    world.redcap.put([{"record_id": "7", "mrn": patient_id(1), "consent": "0"}])
    project = world.write_project([CONSENT], requests=REQUESTS)
    recheck = consent_recheck_job(world.index, world.data, [project])
    requests = transfer_requests_job(world.index, [project])
    assert recheck is not None and requests is not None

    def away(*_: object) -> int:
        raise IndexUnavailable("the index database does not answer")

    for job, method in ((recheck, "recheck"), (requests, "poll")):
        real = getattr(job, method)
        setattr(job, method, away)
        with pytest.raises(IndexUnavailable):
            job(NOW)
        calls: list[object] = []
        setattr(job, method, lambda *a, real=real, calls=calls: calls.append(a) or real(*a))
        job(NOW + 1)  # back a second later: done now, not after the job's interval
        assert len(calls) == 1, method
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
