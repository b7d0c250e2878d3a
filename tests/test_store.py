"""The archive: durable filing, index rows, views, duplicates, quarantine, resource refusals."""

from __future__ import annotations

import copy
import io
import json
import sqlite3
from pathlib import Path

import pydicom
import pytest

from engine.config.model import DuplicatePolicy
from engine.dicom.uids import is_valid_uid
from engine.store.archive import Archive, Status, safe_component
from engine.store.index import Origin, SqliteIndex, open_index
from engine.store.summary import summary_path, write_pending_summaries
from tests import synth
from tests.peers import archived_path

ORIGIN = Origin(via="dimse", calling_ae="SCANNER", called_ae="FIONA", peer_ip="127.0.0.1")


def part10(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture
def study() -> list[pydicom.Dataset]:
    spec = synth.make_study_spec(7)
    return synth.make_study(spec, [synth.MR_SERIES["t2_tse"], synth.MR_SERIES["dwi"]], size=16)


def open_archive(data: Path, **kw: object) -> Archive:
    return Archive(data, open_index("", data / "index.sqlite"), **kw)  # type: ignore[arg-type]


def test_stores_every_instance_byte_identical_with_index_rows_and_views(
    tmp_path: Path, study: list[pydicom.Dataset]
) -> None:
    archive = open_archive(tmp_path)
    blobs = [part10(ds) for ds in study]
    outcomes = [archive.receive(b, ORIGIN) for b in blobs]
    assert {o.action for o in outcomes} == {"stored"}
    assert {o.status for o in outcomes} == {Status.SUCCESS}
    for ds, blob in zip(study, blobs, strict=True):
        assert archived_path(tmp_path, ds).read_bytes() == blob
    counts = archive.index.counts()
    assert counts["instances"] == len(study)
    assert counts["series"] == 2 and counts["studies"] == 1 and counts["patients"] == 1
    st = study[0]
    raw = tmp_path / "raw" / st.StudyInstanceUID / st.SeriesInstanceUID
    assert raw.is_dir() and len(list(raw.glob("*.dcm"))) == sum(
        1 for d in study if d.SeriesInstanceUID == st.SeriesInstanceUID
    )
    participant = tmp_path / "participants" / st.PatientID
    (link,) = participant.iterdir()
    assert link.is_symlink() and link.name == f"{st.StudyDate}_{st.StudyTime}"
    assert link.resolve() == (tmp_path / "archive" / st.StudyInstanceUID).resolve()


@pytest.mark.parametrize("returning", [True, False], ids=["update-returning", "select-update"])
def test_study_and_series_rows_count_every_instance(
    tmp_path: Path, study: list[pydicom.Dataset], monkeypatch: pytest.MonkeyPatch, returning: bool
) -> None:
    # SQLite before 3.35 has no UPDATE ... RETURNING; both ways must keep the same counts.
    monkeypatch.setattr("engine.store.index._HAS_RETURNING", returning)
    archive = open_archive(tmp_path)
    for ds in study:
        assert archive.receive(part10(ds), ORIGIN).status is Status.SUCCESS
    with archive.index.reading() as db:
        studies = db.execute("SELECT n_instances, last_received_at FROM studies").fetchall()
        series = dict(db.execute("SELECT series_uid, n_instances FROM series").fetchall())
        newest = db.execute("SELECT MAX(received_at) FROM instances").fetchone()[0]
    assert studies == [(len(study), newest)]
    expected: dict[str, int] = {}
    for ds in study:
        expected[ds.SeriesInstanceUID] = expected.get(ds.SeriesInstanceUID, 0) + 1
    assert series == expected


def test_series_summary_aggregates_over_all_instances(
    tmp_path: Path, study: list[pydicom.Dataset]
) -> None:
    archive = open_archive(tmp_path)
    for ds in study:
        archive.receive(part10(ds), ORIGIN)
    assert write_pending_summaries(archive.index, tmp_path, 0.0) == 2
    dwi = [ds for ds in study if "DiffusionBValue" in ds]
    assert dwi, "the synthetic DWI series carries b-values"
    doc = json.loads(
        summary_path(tmp_path, dwi[0].StudyInstanceUID, dwi[0].SeriesInstanceUID).read_text()
    )
    assert doc["NumFiles"] == len(dwi)
    b_values = sorted({float(ds.DiffusionBValue) for ds in dwi})
    assert sorted(doc["DiffusionBValue"]) == b_values  # varies: every distinct value, not the first
    locations = [float(ds.SliceLocation) for ds in dwi]
    assert doc["SliceLocationRange"] == [min(locations), max(locations)]
    assert doc["CallingAETitle"] == "SCANNER"
    # Nothing new arrived: no rewrite.
    assert write_pending_summaries(archive.index, tmp_path, 0.0) == 0


def test_identical_resend_is_a_no_op(tmp_path: Path, study: list[pydicom.Dataset]) -> None:
    archive = open_archive(tmp_path)
    blob = part10(study[0])
    assert archive.receive(blob, ORIGIN).action == "stored"
    again = archive.receive(blob, ORIGIN)
    assert (again.action, again.status) == ("duplicate", Status.SUCCESS)
    assert archive.index.counts()["instances"] == 1


def test_a_study_sent_again_after_retention_deleted_it_is_filed_again(
    tmp_path: Path, study: list[pydicom.Dataset]
) -> None:
    import shutil

    archive = open_archive(tmp_path)
    blob = part10(study[0])
    assert archive.receive(blob, ORIGIN).action == "stored"
    path = archived_path(tmp_path, study[0])
    # What retention does: the files go, the index rows stay (marked deleted).
    shutil.rmtree(path.parent.parent)
    with archive.index.transaction() as db:
        db.execute("UPDATE studies SET deleted_at=1, deleted_reason='age'")
    again = archive.receive(blob, ORIGIN)
    assert (again.action, again.status) == ("stored", Status.SUCCESS)
    assert path.read_bytes() == blob
    with archive.index.reading() as db:
        assert db.execute("SELECT deleted_at FROM studies").fetchall() == [(None,)]
    assert archive.index.counts()["instances"] == 1


@pytest.mark.parametrize(
    ("policy", "action", "kept", "quarantined"),
    [
        (DuplicatePolicy.KEEP_FIRST, "kept_first", "first", 0),
        (DuplicatePolicy.REPLACE, "replaced", "second", 0),
        (DuplicatePolicy.QUARANTINE, "quarantined", "first", 1),
    ],
)
def test_conflicting_duplicate_follows_policy(
    tmp_path: Path,
    study: list[pydicom.Dataset],
    policy: DuplicatePolicy,
    action: str,
    kept: str,
    quarantined: int,
) -> None:
    archive = open_archive(tmp_path, duplicate_policy=policy)
    first = study[0]
    second = copy.deepcopy(first)
    second.SeriesDescription = "CHANGED"
    blobs = {"first": part10(first), "second": part10(second)}
    archive.receive(blobs["first"], ORIGIN)
    outcome = archive.receive(blobs["second"], ORIGIN)
    assert (outcome.action, outcome.status) == (action, Status.SUCCESS)
    path = tmp_path / "archive" / first.StudyInstanceUID / first.SeriesInstanceUID
    assert (path / f"{first.SOPInstanceUID}.dcm").read_bytes() == blobs[kept]
    assert archive.index.counts()["quarantine"] == quarantined


def _quarantine_sidecars(data: Path) -> list[dict[str, object]]:
    return [json.loads(p.read_text()) for p in sorted((data / "quarantine").rglob("*.json"))]


@pytest.mark.filterwarnings("ignore:.*VR UI:UserWarning")
@pytest.mark.parametrize(
    ("which", "value"),
    [
        ("SOPInstanceUID", "1.2.3.abc/../../etc"),
        ("StudyInstanceUID", "../../../../tmp/x"),
        ("SeriesInstanceUID", "1." + "2" * 70),
        ("SOPInstanceUID", "1..2"),
    ],
)
def test_malformed_uid_never_reaches_the_file_system(
    tmp_path: Path, study: list[pydicom.Dataset], which: str, value: str
) -> None:
    data = tmp_path / "data"
    archive = open_archive(data)
    blob = part10(synth.dataset_with_bad_uid(study[0], which, value))
    outcome = archive.receive(blob, ORIGIN)
    assert (outcome.action, outcome.reason) == ("quarantined", "invalid_uid")
    assert outcome.status == Status.DATASET_MISMATCH
    assert which in outcome.detail and value not in outcome.detail
    assert list((data / "archive").iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    (sidecar,) = _quarantine_sidecars(data)
    assert sidecar["reason"] == "invalid_uid"
    (kept,) = (data / "quarantine").rglob("*.dcm")
    assert kept.read_bytes() == blob


def test_missing_uid_is_quarantined(tmp_path: Path, study: list[pydicom.Dataset]) -> None:
    archive = open_archive(tmp_path)
    outcome = archive.receive(part10(synth.dataset_missing(study[0], "SeriesInstanceUID")), ORIGIN)
    assert (outcome.reason, outcome.status) == ("invalid_uid", Status.DATASET_MISMATCH)
    assert "SeriesInstanceUID is missing" in outcome.detail


def test_garbage_and_truncated_files_are_quarantined_with_their_bytes(
    tmp_path: Path, study: list[pydicom.Dataset]
) -> None:
    src = synth.write_dataset(study[0], tmp_path / "src.dcm")
    cut_pixels, cut_header = synth.write_truncated_pair(src, tmp_path / "cut")
    garbage = synth.write_garbage(tmp_path / "garbage.bin", 5000, seed=3)
    archive = open_archive(tmp_path / "data")
    for path in (garbage, cut_pixels, cut_header):
        outcome = archive.receive(path.read_bytes(), ORIGIN)
        assert (outcome.action, outcome.reason) == ("quarantined", "unparseable"), path.name
        assert outcome.status == Status.CANNOT_UNDERSTAND
    assert archive.index.counts()["instances"] == 0
    kept = sorted(p.read_bytes() for p in (tmp_path / "data" / "quarantine").rglob("*.dcm"))
    assert kept == sorted(p.read_bytes() for p in (garbage, cut_pixels, cut_header))
    reasons = {s["reason"] for s in _quarantine_sidecars(tmp_path / "data")}
    assert reasons == {"unparseable"}


def test_low_disk_space_refuses_with_out_of_resources(
    tmp_path: Path, study: list[pydicom.Dataset]
) -> None:
    archive = open_archive(tmp_path, min_free_disk_mb=1 << 40)  # more than any disk has
    outcome = archive.receive(part10(study[0]), ORIGIN)
    assert (outcome.action, outcome.status) == ("rejected", Status.OUT_OF_RESOURCES)
    assert archive.index.counts()["instances"] == 0
    assert list((tmp_path / "archive").iterdir()) == []


def test_locked_index_refuses_and_leaves_no_orphan_file(
    tmp_path: Path, study: list[pydicom.Dataset]
) -> None:
    index = SqliteIndex(tmp_path / "index.sqlite", busy_timeout=0.2)
    archive = Archive(tmp_path, index)
    blocker = sqlite3.connect(tmp_path / "index.sqlite", isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        outcome = archive.receive(part10(study[0]), ORIGIN)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert (outcome.action, outcome.status) == ("rejected", Status.OUT_OF_RESOURCES)
    assert list((tmp_path / "archive").rglob("*.dcm")) == []
    # The sender's retry then succeeds.
    assert archive.receive(part10(study[0]), ORIGIN).action == "stored"


def test_index_migrations_are_versioned_and_idempotent(tmp_path: Path) -> None:
    first = SqliteIndex(tmp_path / "i.sqlite")
    version = first.schema_version
    assert version >= 1
    first.close()
    again = SqliteIndex(tmp_path / "i.sqlite")
    assert again.schema_version == version
    assert again.counts()["instances"] == 0


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        ("1.2.840.10008.5.1.4.1.1.4", True),
        ("2.25.329800735698586629295641978511506172918", True),
        ("1", True),
        ("1." + "9" * 62, True),
        ("1." + "9" * 63, False),
        ("", False),
        ("1..2", False),
        (".1.2", False),
        ("1.2.", False),
        ("1.2.3a", False),
        ("1.2/3", False),
        ("../etc", False),
        (" 1.2", False),
        (None, False),
    ],
)
def test_uid_validation(value: object, valid: bool) -> None:
    assert is_valid_uid(value) is valid


@pytest.mark.parametrize(
    ("text", "expected_prefix"),
    [
        ("SYN123", "SYN123"),
        ("../../etc", "_.._etc-"),
        ("A B", "A_B-"),
        ("", "UNKNOWN-"),
        ("ÆØÅ", "___-"),
    ],
)
def test_safe_component(text: str, expected_prefix: str) -> None:
    out = safe_component(text)
    assert out.startswith(expected_prefix)
    assert "/" not in out and not out.startswith(".")
    if text == expected_prefix:
        assert out == text
