"""The way out: burned-in gate, de-identification and verification, and `fiona anonymize`."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from engine.cli import main
from engine.deid import Deidentifier, load_profile
from engine.deid.export import Exported, Exporter, Held, _uid_leaks
from tests import synth

SECRET = b"s" * 48


def _bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _instance(seed: int = 7, **changes: object) -> Dataset:
    ds = synth.make_study(synth.make_study_spec(seed), [synth.MR_SERIES["t2_tse"]], size=16)[0]
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    return ds


def _exporter(**overrides: object) -> Exporter:
    return Exporter(Deidentifier(load_profile("basic", (), overrides), SECRET, project="p"))


def test_a_clean_export_has_new_uids_and_no_original_values() -> None:
    ds = _instance()
    result = _exporter().export(_bytes(ds))
    assert isinstance(result, Exported)
    assert result.study_uid != ds.StudyInstanceUID and result.sop_instance_uid != ds.SOPInstanceUID
    out = pydicom.dcmread(io.BytesIO(result.data))
    assert out.SOPInstanceUID == result.sop_instance_uid
    assert str(ds.PatientName).split("^")[0].encode() not in result.data
    assert out.PixelData == ds.PixelData


def test_a_name_kept_by_an_override_is_caught_by_verification() -> None:
    ds = _instance(StudyDescription="BRAIN FOR DOE^JANE^SYNTH", PatientName="DOE^JANE^SYNTH")
    result = _exporter(StudyDescription="keep").export(_bytes(ds))
    assert isinstance(result, Held)
    assert result.reason == "verification_failed"
    assert "StudyDescription" in result.detail and "patient_name" in result.detail
    assert "DOE" not in result.detail  # the reason never quotes the value


def test_an_original_uid_kept_by_an_override_is_caught() -> None:
    ds = _instance()
    ds.ImageComments = f"see {ds.SeriesInstanceUID}"
    result = _exporter(ImageComments="keep").export(_bytes(ds))
    assert isinstance(result, Held) and result.reason == "verification_failed"


@pytest.mark.parametrize(
    ("output", "hits"),
    [
        (b"UI 1.2.826.0.1.3680043.8.498.1 end", 1),
        (b"x1.2.826.0.1.3680043.8.498.1.7", 1),  # a UID made from the original is a hit too
        (b"1.2.826.0.1.3680043.8.498.1\\1.2.826.0.1.3680043.8.498.1", 2),
        (b"1.2.826.0.1.3680043.8.498.12", 0),  # another UID that starts with the same digits
        (b"91.2.826.0.1.3680043.8.498.1", 0),
        (b"5.1.2.826.0.1.3680043.8.498.1", 0),
        (b"1.2.840.10008.5.1.4.1.1.4", 0),  # a UID of the standard is never a leak
    ],
)
def test_original_uid_byte_scan_respects_digit_boundaries(output: bytes, hits: int) -> None:
    original = b"\x00UI1.2.826.0.1.3680043.8.498.1\x00UI1.2.840.10008.5.1.4.1.1.4\x00"
    assert len(_uid_leaks(original, output)) == hits


def test_burned_in_annotation_yes_is_held() -> None:
    result = _exporter().export(_bytes(_instance(BurnedInAnnotation="YES")))
    assert isinstance(result, Held) and result.reason == "burned_in"


def test_not_dicom_is_held_not_passed() -> None:
    result = _exporter().export(b"\0" * 128 + b"DICM" + b"junk" * 10)
    assert isinstance(result, Held)


def test_fiona_anonymize_writes_new_layout_report_and_quarantine(tmp_path: Path) -> None:
    spec = synth.make_study_spec(3)
    datasets = synth.make_study(
        spec, [synth.MR_SERIES["localizer"], synth.MR_SERIES["flair"]], size=16
    )
    datasets[0].BurnedInAnnotation = "YES"
    synth.write_study(datasets, tmp_path / "in")
    (tmp_path / "in" / "README.TXT").write_text("not dicom")
    key = tmp_path / "key"
    key.write_bytes(SECRET)
    os.chmod(key, 0o600)
    out = tmp_path / "out"
    code = main(
        ["anonymize", str(tmp_path / "in"), str(out), "--secret-file", str(key), "--no-progress"]
    )
    assert code == 0
    report = json.loads((out / "deid-report.json").read_text())
    assert (report["files"], report["exported"], report["held"]) == (
        len(datasets) + 1,
        len(datasets) - 1,
        1,
    )
    assert report["held_files"][0]["reason"] == "burned_in"
    written = sorted(out.rglob("*.dcm"))
    assert len(written) == len(datasets) - 1
    first = pydicom.dcmread(written[0])
    assert written[0].parent.name == first.SeriesInstanceUID
    assert written[0].parent.parent.name == first.StudyInstanceUID
    assert first.StudyInstanceUID not in {d.StudyInstanceUID for d in datasets}
    held = out.parent / "out-quarantine"
    assert len(list(held.glob("*.dcm"))) == 1 and len(list(held.glob("*.json"))) == 1
    text = (out / "deid-report.json").read_text()
    assert spec.patient_name.split("^")[0] not in text and spec.patient_id not in text


def test_fiona_anonymize_refuses_a_weak_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "key"
    key.write_bytes(b"short")
    os.chmod(key, 0o600)
    (tmp_path / "in").mkdir()
    assert (
        main(["anonymize", str(tmp_path / "in"), str(tmp_path / "out"), "--secret-file", str(key)])
        == 2
    )
    assert "secret" in capsys.readouterr().err.lower()


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_fiona_anonymize_report_counts_outcomes_per_attribute(
    tmp_path: Path, jobs: str, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = synth.make_study_spec(4)
    datasets = synth.make_study(spec, [synth.MR_SERIES["flair"]], size=16)
    for ds in datasets:
        ds.SeriesDescription = "FLAIR AX"
        ds.add_new(0x00091010, "LO", "PRIVATE NOTE")  # no creator: removed
    synth.write_study(datasets, tmp_path / "in")
    key = tmp_path / "key"
    key.write_bytes(SECRET)
    os.chmod(key, 0o600)
    out = tmp_path / "out"
    args = ["anonymize", str(tmp_path / "in"), str(out), "--secret-file", str(key)]
    options = ["--option", "clean_descriptors", "--option", "retain_longitudinal_modified_dates"]
    assert main([*args, *options, "--no-progress", "--report", "--jobs", jobs]) == 0
    n = len(datasets)
    rows = json.loads((out / "deid-report.json").read_text())["attributes"]
    assert rows["PatientName"] == {"kept": 0, "cleaned": 0, "replaced": n, "removed": 0}
    assert rows["PatientBirthDate"]["removed"] == n or rows["PatientBirthDate"]["cleaned"] == n
    assert rows["SeriesDescription"] == {"kept": 0, "cleaned": n, "replaced": 0, "removed": 0}
    assert rows["StudyDate"] == {"kept": 0, "cleaned": n, "replaced": 0, "removed": 0}
    assert rows["SOPInstanceUID"]["replaced"] == n
    assert rows["Rows"] == {"kept": n, "cleaned": 0, "replaced": 0, "removed": 0}
    assert rows["(0009,1010)"]["removed"] == n
    table = (out / "deid-report.txt").read_text()
    assert table.splitlines()[0].split() == ["attribute", "kept", "cleaned", "replaced", "removed"]
    assert any(line.split() == ["Rows", str(n), "0", "0", "0"] for line in table.splitlines())
    assert table in capsys.readouterr().out
    everything = table + (out / "deid-report.json").read_text()
    for value in (spec.patient_id, spec.patient_name.split("^")[0], "FLAIR AX", "PRIVATE NOTE"):
        assert value not in everything


def test_without_report_no_attribute_counts_are_kept(tmp_path: Path) -> None:
    ds = _instance()
    result = _exporter().export(_bytes(ds))
    assert isinstance(result, Exported) and result.attributes == {}


def test_both_paths_count_the_same_outcomes_per_attribute() -> None:
    from tests.deid_phi import phi_instances

    data = _bytes(phi_instances(1)[0])
    deid = Deidentifier(load_profile("basic", ("clean_descriptors",)), SECRET, per_attribute=True)
    raw = deid.process_file(data)
    reference = deid.process_file(data, byte_path=False)
    assert raw.attributes and raw.attributes == reference.attributes
    assert raw.attributes["PatientName"] == {"replaced": 1}


def test_the_example_project_keeps_series_readable() -> None:
    import yaml

    project = yaml.safe_load(Path("projects/example.yaml").read_text())
    steps = [s for s in project["pipeline"] if s.get("step") == "anonymize"]
    assert steps and all(
        {"clean_descriptors", "retain_longitudinal_modified_dates"} <= set(s.get("options", []))
        for s in steps
    )
