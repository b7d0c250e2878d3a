"""End to end: projects dropped in projects/, studies sent by dcmtk storescu to `fiona serve`.

Two projects claim studies in two ways (the sender's AE title; a header rule); a third study
matches neither. After the quiet time each claimed study is copied to its project's folder with
the right series labels, the third is held as 'unrouted', and a late series runs the pipeline
again for that series only.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
import yaml
from pydicom.uid import generate_uid

from tests import synth
from tests.dbutil import connect_index
from tests.peers import FionaServer
from tests.test_receive import store

QUIET = 2


def _write(path: Path, doc: object) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def wait_for(
    what: str,
    check: Callable[[], bool],
    timeout: float = 90.0,
    server: FionaServer | None = None,
) -> None:
    """Poll ``check`` every 0.25 s until it holds; fail naming ``what`` after ``timeout`` s,
    with the end of ``server``'s log when given (what the engine was doing)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.25)
    tail = "\n".join(server.log_text().splitlines()[-40:]) if server is not None else ""
    raise AssertionError(f"timed out waiting for {what}\n{tail}")


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[FionaServer, Path]]:
    out = tmp_path / "out"
    projects = tmp_path / "projects"
    projects.mkdir()
    completeness = {"study_quiet_seconds": QUIET, "series_quiet_seconds": 1}
    _write(
        projects / "neuro.yaml",
        {
            "name": "neuro",
            "routing": {"calling_ae": ["SCANNER_A"]},
            "completeness": completeness,
            "pipeline": [
                {"step": "classify"},
                {"step": "select", "labels": ["t1", "flair"]},
                {"step": "copy", "to": str(out / "neuro")},
            ],
        },
    )
    _write(
        projects / "headct.yaml",
        {
            "name": "headct",
            "routing": {
                "rules": {
                    "match": {
                        "conditions": [
                            {"attr": "Modality", "op": "==", "value": "CT"},
                            {"attr": "StudyDescription", "value": "(?i)head"},
                        ]
                    }
                }
            },
            "completeness": completeness,
            "pipeline": [{"step": "classify"}, {"step": "copy", "to": str(out / "headct")}],
        },
    )
    site = _write(
        tmp_path / "site.yaml",
        {"scan_interval_seconds": 0.5, "routing": {"unrouted_after_seconds": QUIET}},
    )
    server = FionaServer(data_dir=tmp_path / "data", projects_dir=projects, config=site).start()
    yield server, out
    server.stop()


def _study(tmp: Path, seed: int, series: list[synth.SeriesSpec], **spec: object) -> list[Path]:
    study_spec = synth.make_study_spec(seed, **spec)
    return synth.write_study(synth.make_study(study_spec, series, size=16), tmp / f"study{seed}")


def _series_folders(root: Path) -> dict[str, list[str]]:
    """Series UID -> labels, from the copied study's labels.json, once every folder exists."""
    labels_file = root / "labels.json"
    if not labels_file.is_file():
        return {}
    labels: dict[str, list[str]] = json.loads(labels_file.read_text())
    return {uid: sorted(v) for uid, v in labels.items() if (root / uid).is_dir()}


def _index(server: FionaServer, sql: str, *args: object) -> list[tuple[object, ...]]:
    with connect_index(server.data_dir / "index.sqlite") as db:
        return db.execute(sql, args).fetchall()


def test_studies_are_routed_completed_copied_and_late_series_follow(
    setup: tuple[FionaServer, Path], storescu: str, tmp_path: Path
) -> None:
    server, out = setup
    mr = synth.MR_SERIES
    neuro_files = _study(tmp_path, 1, [mr["localizer"], mr["t1_mprage"], mr["t2_tse"], mr["flair"]])
    ct_files = _study(
        tmp_path,
        2,
        [synth.CT_SERIES["ct_head"]],
        modalities=("CT",),
        study_description="SYNTH HEAD CT",
    )
    other_files = _study(tmp_path, 3, [mr["t2_tse"]], study_description="SYNTH KNEE MRI")
    for files, aet in ((neuro_files, "SCANNER_A"), (ct_files, "SCANNER_B"), (other_files, "X")):
        result = store(storescu, server, files, aet=aet)
        assert result.returncode == 0, result.stderr

    def uids(files: list[Path]) -> tuple[str, dict[str, str]]:
        series = {}
        for f in files:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            series[str(ds.SeriesDescription)] = str(ds.SeriesInstanceUID)
        return str(ds.StudyInstanceUID), series

    neuro_uid, neuro_series = uids(neuro_files)
    ct_uid, ct_series = uids(ct_files)
    other_uid, _ = uids(other_files)

    t1 = neuro_series["t1_mprage_sag_p2_iso"]
    flair = neuro_series["t2_tirm_tra_dark-fluid"]
    wait_for(
        "the neuro study's copy",
        lambda: len(_series_folders(out / "neuro" / neuro_uid)) == 2,
        server=server,
    )
    copied = _series_folders(out / "neuro" / neuro_uid)
    assert set(copied) == {t1, flair}  # select kept t1 and flair; localizer and t2 are left out
    assert "t1" in copied[t1] and "flair" in copied[flair]
    assert len(list((out / "neuro" / neuro_uid / t1).iterdir())) == mr["t1_mprage"].n_instances

    wait_for("the head CT copy", lambda: len(_series_folders(out / "headct" / ct_uid)) == 1)
    assert "ct" in _series_folders(out / "headct" / ct_uid)[ct_series["SYNTH HEAD 5mm"]]
    assert not (out / "headct" / neuro_uid).exists() and not (out / "neuro" / ct_uid).exists()

    wait_for(
        "the unclaimed study to be held",
        lambda: bool(_index(server, "SELECT 1 FROM quarantine WHERE study_uid=?", other_uid)),
    )
    assert _index(server, "SELECT reason FROM quarantine WHERE study_uid=?", other_uid) == [
        ("unrouted",)
    ]
    assert not (out / "neuro" / other_uid).exists() and not (out / "headct" / other_uid).exists()

    # A late series: another FLAIR for the neuro study, sent after the study was complete.
    spec = synth.make_study_spec(1)
    late = synth.make_study(spec, [mr["localizer"], mr["flair"]], size=16)
    late = [ds for ds in late if ds.SeriesDescription == mr["flair"].series_description]
    late_series_uid = generate_uid(prefix=None)
    for ds in late:
        ds.SeriesNumber = 9
        ds.SeriesInstanceUID = late_series_uid
        ds.SOPInstanceUID = generate_uid(prefix=None)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    late_files = synth.write_study(late, tmp_path / "late")
    late_uid = str(late[0].SeriesInstanceUID)
    result = store(storescu, server, late_files, aet="SCANNER_A")
    assert result.returncode == 0, result.stderr
    wait_for(
        "the late series' copy", lambda: late_uid in _series_folders(out / "neuro" / neuro_uid)
    )
    assert set(_series_folders(out / "neuro" / neuro_uid)) == {t1, flair, late_uid}
    runs = _index(
        server,
        "SELECT follow_up, series FROM pipeline_runs WHERE study_uid=? AND project='neuro'"
        " ORDER BY follow_up",
        neuro_uid,
    )
    assert [r[0] for r in runs] == [0, 1]
    assert json.loads(str(runs[1][1])) == [late_uid]  # the follow-up ran for the new series only
    assert "Traceback" not in server.log_text()


def test_anonymized_study_leaves_under_new_uids_and_a_pseudonym(
    tmp_path: Path, storescu: str
) -> None:
    import os

    projects = tmp_path / "projects"
    projects.mkdir()
    key = projects / "neuro.key"
    key.write_bytes(os.urandom(48))
    os.chmod(key, 0o600)
    out = tmp_path / "out"
    _write(
        projects / "neuro.yaml",
        {
            "name": "neuro",
            "routing": {"calling_ae": ["SCANNER_A"]},
            "completeness": {"study_quiet_seconds": QUIET},
            "pipeline": [
                {"step": "classify"},
                {"step": "anonymize", "secret_file": "neuro.key", "pseudonyms": {"prefix": "NEU"}},
                {"step": "copy", "to": str(out)},
            ],
        },
    )
    site = _write(tmp_path / "site.yaml", {"scan_interval_seconds": 0.5})
    server = FionaServer(data_dir=tmp_path / "data", projects_dir=projects, config=site).start()
    try:
        spec = synth.make_study_spec(21)
        files = _study(tmp_path, 21, [synth.MR_SERIES["t1_mprage"], synth.MR_SERIES["flair"]])
        result = store(storescu, server, files, aet="SCANNER_A")
        assert result.returncode == 0, result.stderr
        wait_for("the de-identified copy", lambda: len(list(out.rglob("*.dcm"))) == len(files))
        original = pydicom.dcmread(files[0], stop_before_pixels=True)
        [study_dir] = list(out.iterdir())
        assert study_dir.name != original.StudyInstanceUID
        for path in out.rglob("*.dcm"):
            data = path.read_bytes()
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            assert (ds.PatientID, str(ds.PatientName)) == ("NEU0001", "NEU0001")
            assert ds.PatientIdentityRemoved == "YES"
            for value in (spec.patient_id, spec.patient_name.split("^")[0], spec.accession_number):
                assert value.encode() not in data
            assert original.StudyInstanceUID.encode() not in data
        labels = json.loads((study_dir / "labels.json").read_text())
        assert [label for v in labels.values() for label in v].count("t1") == 1
        assert "Traceback" not in server.log_text()
    finally:
        server.stop()
