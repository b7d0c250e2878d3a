"""The MPPS SCP on the receiver's port, against a pynetdicom SCU as the scanner and dcmtk's
storescu sending the images to a running ``fiona serve``.

The project's quiet time is an hour, so a study that completes during a test completed by its
MPPS step, not by the quiet-time rule; assertions are on the index's state.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.association import Association

from engine.cli import main
from tests import synth
from tests.conftest import need_peer
from tests.dbutil import connect_index
from tests.peers import FionaServer, nodelay_env

MPPS = "1.2.840.10008.3.1.2.3.3"
SCANNER = "MR_SCANNER"
HOUR = 3600


@pytest.fixture
def site(tmp_path: Path) -> Iterator[FionaServer]:
    projects = tmp_path / "projects"
    projects.mkdir()
    project = {
        "name": "neuro",
        "routing": {"calling_ae": [SCANNER]},
        "completeness": {"study_quiet_seconds": HOUR, "force_complete_seconds": 0},
        "pipeline": [{"step": "copy", "to": str(tmp_path / "out")}],
    }
    (projects / "neuro.yaml").write_text(yaml.safe_dump(project))
    config = tmp_path / "site.yaml"
    config.write_text(yaml.safe_dump({"scan_interval_seconds": 0.3}))
    server = FionaServer(data_dir=tmp_path / "data", projects_dir=projects, config=config)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def scanner(site: FionaServer) -> Iterator[Association]:
    ae = AE(ae_title=SCANNER)
    ae.add_requested_context(MPPS)
    assoc = ae.associate("127.0.0.1", site.port, ae_title="FIONA")
    assert assoc.is_established
    yield assoc
    if assoc.is_established:
        assoc.release()


def study(tmp_path: Path, seed: int = 1) -> tuple[str, list[Path], list[Dataset]]:
    spec = synth.make_study_spec(seed)
    datasets = synth.make_study(
        spec, [synth.MR_SERIES["localizer"], synth.MR_SERIES["t2_tse"]], size=8
    )
    paths = synth.write_study(datasets, tmp_path / f"study{seed}")
    return synth.study_uid(spec), paths, datasets


def in_progress(study_uid: str) -> Dataset:
    ds = Dataset()
    item = Dataset()
    item.StudyInstanceUID = study_uid
    item.AccessionNumber = "SYNACC"
    ds.ScheduledStepAttributesSequence = [item]
    ds.PatientName = "DOE^JANE^SYNTH"  # sent by scanners; never stored
    ds.PerformedProcedureStepStatus = "IN PROGRESS"
    ds.PerformedSeriesSequence = []
    return ds


def finished(datasets: list[Dataset], status: str = "COMPLETED") -> Dataset:
    ds = Dataset()
    ds.PerformedProcedureStepStatus = status
    series: dict[str, Dataset] = {}
    for inst in datasets:
        item = series.get(str(inst.SeriesInstanceUID))
        if item is None:
            item = series[str(inst.SeriesInstanceUID)] = Dataset()
            item.SeriesInstanceUID = inst.SeriesInstanceUID
            item.ReferencedImageSequence = []
        ref = Dataset()
        ref.ReferencedSOPClassUID = inst.SOPClassUID
        ref.ReferencedSOPInstanceUID = inst.SOPInstanceUID
        item.ReferencedImageSequence.append(ref)
    ds.PerformedSeriesSequence = list(series.values())
    return ds


def send(site: FionaServer, paths: list[Path]) -> None:
    subprocess.run(
        [need_peer("storescu"), "-aet", SCANNER, "-aec", "FIONA", "127.0.0.1", str(site.port)]
        + [str(p) for p in paths],
        check=True,
        capture_output=True,
        env=nodelay_env(),
        timeout=120,
    )


def index(site: FionaServer, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    db = connect_index(site.data_dir / 'index.sqlite', read_only=True, timeout=30)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def wait_for(what: str, check: Any, timeout: float = 90.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout} s: {what}")


def route_state(site: FionaServer, study_uid: str) -> str | None:
    rows = index(site, "SELECT state FROM study_routes WHERE study_uid=?", study_uid)
    return str(rows[0][0]) if rows else None


def seen_all(site: FionaServer, study_uid: str, n: int) -> bool:
    """The index holds the study's ``n`` instances and the tracker has read (routed) them all;
    the same scan then judged its completeness."""
    rows = index(
        site,
        "SELECT st.routed_upto, (SELECT max(i.id) FROM instances i JOIN series se"
        " ON se.id = i.series_ref WHERE se.study_ref = st.id), st.n_instances"
        " FROM studies st WHERE st.study_uid=?",
        study_uid,
    )
    return bool(rows) and rows[0][2] == n and rows[0][0] == rows[0][1]


def audit(site: FionaServer) -> list[dict[str, Any]]:
    folder = site.data_dir / "audit"
    return [json.loads(line) for p in sorted(folder.glob("*.jsonl")) for line in p.open()]


def later_scans(site: FionaServer) -> None:
    """Let the service run a few more scans (its interval is 0.3 s): the state asserted after
    this is the one those scans left, whatever they decided."""
    time.sleep(2.0)


# --------------------------------------------------------------------------- completeness


def test_study_completes_at_its_last_instance_not_its_quiet_time(
    site: FionaServer, scanner: Association, tmp_path: Path
) -> None:
    study_uid, paths, datasets = study(tmp_path)
    status, _ = scanner.send_n_create(in_progress(study_uid), MPPS, "1.2.826.0.1.3680043.8.498.77")
    assert status.Status == 0x0000
    send(site, paths[:-1])  # all but the last instance
    status, _ = scanner.send_n_set(finished(datasets), MPPS, "1.2.826.0.1.3680043.8.498.77")
    assert status.Status == 0x0000
    wait_for("the tracker read the instances", lambda: seen_all(site, study_uid, len(paths) - 1))
    later_scans(site)
    assert route_state(site, study_uid) == "open"  # one instance the step names is missing

    send(site, paths[-1:])
    wait_for("the study complete", lambda: route_state(site, study_uid) == "complete")
    completed = [e for e in audit(site) if e["event"] == "completed"]
    assert [e["why"] for e in completed] == ["MPPS completed, every instance it references arrived"]
    steps = [e for e in audit(site) if e["event"] == "mpps"]
    assert [e["status"] for e in steps] == ["IN PROGRESS", "COMPLETED"]
    assert steps[1]["instances"] == len(paths)
    text = json.dumps(audit(site))
    assert "DOE^JANE" not in text and study_uid not in text


def test_without_mpps_the_quiet_time_still_rules(
    site: FionaServer, scanner: Association, tmp_path: Path
) -> None:
    """The control: the same study with its step left IN PROGRESS waits for its quiet time."""
    study_uid, paths, _ = study(tmp_path)
    status, _ = scanner.send_n_create(in_progress(study_uid), MPPS, "1.2.826.0.1.3680043.8.498.78")
    assert status.Status == 0x0000
    send(site, paths)
    wait_for("the tracker read the instances", lambda: seen_all(site, study_uid, len(paths)))
    later_scans(site)
    assert route_state(site, study_uid) == "open"


def test_discontinued_step_is_recorded_and_shown(
    site: FionaServer,
    scanner: Association,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    study_uid, paths, datasets = study(tmp_path)
    uid = "1.2.826.0.1.3680043.8.498.79"
    scanner.send_n_create(in_progress(study_uid), MPPS, uid)
    send(site, paths)
    status, _ = scanner.send_n_set(finished(datasets[:3], "DISCONTINUED"), MPPS, uid)
    assert status.Status == 0x0000
    wait_for("the tracker read the instances", lambda: seen_all(site, study_uid, len(paths)))
    later_scans(site)
    assert route_state(site, study_uid) == "open"  # a discontinued step completes nothing
    rows = index(
        site, "SELECT status, ended_at IS NOT NULL FROM mpps WHERE sop_instance_uid=?", uid
    )
    assert rows == [("DISCONTINUED", 1)]

    args = ["--data", str(site.data_dir), "--projects", str(site.projects_dir)]
    main(["explain", study_uid, *args])
    out = capsys.readouterr().out
    assert f"MPPS step {uid}: DISCONTINUED (3 instances referenced)" in out
    main(["status", *args])
    out = capsys.readouterr().out
    assert (
        "mpps        procedure steps of the last 24 h: 0 in progress, 0 completed, 1 discontinued"
        in out
    )
    main(["status", "--json", *args])
    counts = json.loads(capsys.readouterr().out)["mpps_last_24h"]
    assert counts == {"IN PROGRESS": 0, "COMPLETED": 0, "DISCONTINUED": 1}


# --------------------------------------------------------------------------- the DIMSE answers


def test_n_create_and_n_set_answers(site: FionaServer, scanner: Association) -> None:
    study_uid = "1.2.826.0.1.3680043.8.498.80"
    uid = "1.2.826.0.1.3680043.8.498.81"
    assert scanner.send_n_create(in_progress(study_uid), MPPS, uid)[0].Status == 0x0000
    # The same step again: Duplicate SOP Instance.
    assert scanner.send_n_create(in_progress(study_uid), MPPS, uid)[0].Status == 0x0111
    # Created as anything but IN PROGRESS: Invalid Attribute Value.
    bad = in_progress(study_uid)
    bad.PerformedProcedureStepStatus = "COMPLETED"
    assert scanner.send_n_create(bad, MPPS, "1.2.826.0.1.3680043.8.498.82")[0].Status == 0x0106
    # No UID from the SCU: the SCP chooses one and records the step under it.
    assert scanner.send_n_create(in_progress(study_uid), MPPS, None)[0].Status == 0x0000
    # N-SET of an unknown step: No Such SOP Instance.
    done = finished([])
    assert scanner.send_n_set(done, MPPS, "1.2.826.0.1.3680043.8.498.83")[0].Status == 0x0112
    # An N-SET that changes nothing but the series keeps the step IN PROGRESS.
    progress = Dataset()
    progress.PerformedSeriesSequence = []
    assert scanner.send_n_set(progress, MPPS, uid)[0].Status == 0x0000
    # An unknown status value: Invalid Attribute Value.
    odd = Dataset()
    odd.PerformedProcedureStepStatus = "PAUSED"
    assert scanner.send_n_set(odd, MPPS, uid)[0].Status == 0x0106
    assert scanner.send_n_set(done, MPPS, uid)[0].Status == 0x0000
    # A final step may no longer be updated: Processing Failure, Error ID 0xA710.
    status, _ = scanner.send_n_set(done, MPPS, uid)
    assert (status.Status, status.ErrorID) == (0x0110, 0xA710)
    rows = index(site, "SELECT status FROM mpps ORDER BY id")
    assert [r[0] for r in rows] == ["COMPLETED", "IN PROGRESS"]
    studies = index(site, "SELECT DISTINCT study_uid FROM mpps_studies")
    assert studies == [(study_uid,)]
