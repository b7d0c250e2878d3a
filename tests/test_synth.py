"""Tests for the synthetic study generator (tests/synth.py)."""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.errors import InvalidDicomError
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage

from tests.synth import (
    CT_SERIES,
    MR_SERIES,
    StudySpec,
    dataset_missing,
    dataset_with_bad_uid,
    make_corpus,
    make_series,
    make_study,
    make_study_spec,
    write_dataset,
    write_garbage,
    write_study,
    write_truncated,
    write_truncated_pair,
)

UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
UID_KEYWORDS = ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID",
                "FrameOfReferenceUID")  # fmt: skip


def _valid_uid(value: object) -> bool:
    s = str(value)
    return len(s) <= 64 and bool(UID_RE.match(s))


def _fingerprint(datasets: list[pydicom.Dataset]) -> list[tuple[object, ...]]:
    return [
        (str(d.SOPInstanceUID), str(d.SeriesInstanceUID), str(d.PatientName), d.PixelData)
        for d in datasets
    ]


@pytest.fixture(scope="module")
def study_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = tmp_path_factory.mktemp("study")
    return write_study(make_study(make_study_spec(7)), out)


def test_deterministic_per_seed() -> None:
    assert make_study_spec(5) == make_study_spec(5)
    a = make_study(make_study_spec(5), size=16)
    b = make_study(make_study_spec(5), size=16)
    assert _fingerprint(a) == _fingerprint(b)


def test_varies_across_seeds() -> None:
    specs = [make_study_spec(s) for s in range(20)]
    assert len({s.patient_id for s in specs}) == 20
    assert len({s.patient_name for s in specs}) == 20
    assert len({s.accession_number for s in specs}) == 20
    a = make_study(specs[0], size=16)
    b = make_study(specs[1], size=16)
    assert {d.StudyInstanceUID for d in a}.isdisjoint({d.StudyInstanceUID for d in b})
    assert {d.SOPInstanceUID for d in a}.isdisjoint({d.SOPInstanceUID for d in b})
    assert a[0].PixelData != b[0].PixelData


def test_overrides_and_fake_defaults() -> None:
    spec = make_study_spec(3, patient_name="ROE^RICHARD^SYNTH", modalities=("MR", "CT"))
    assert spec.patient_name == "ROE^RICHARD^SYNTH"
    assert "SYNTH" in StudySpec().patient_name
    assert make_study_spec(0).patient_name == "DOE^JANE^SYNTH"
    mods = {d.Modality for d in make_study(spec, size=16)}
    assert mods == {"MR", "CT"}


def test_files_read_back_with_valid_uids_and_meta(study_files: list[Path]) -> None:
    assert len(study_files) == sum(s.n_instances for s in MR_SERIES.values())
    sop_uids = set()
    for path in study_files:
        ds = pydicom.dcmread(path)
        meta = ds.file_meta
        assert meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert meta.MediaStorageSOPClassUID == ds.SOPClassUID == MRImageStorage
        assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert _valid_uid(meta.ImplementationClassUID)
        for kw in UID_KEYWORDS:
            assert _valid_uid(ds[kw].value), (kw, ds[kw].value)
        sop_uids.add(ds.SOPInstanceUID)
        assert path.name == f"{ds.InstanceNumber}.dcm"
        assert ds.pixel_array.shape == (64, 64)
        assert int(ds.pixel_array.max()) <= 4095
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (16, 12, 11)
    assert len(sop_uids) == len(study_files)


def test_series_structure() -> None:
    spec = make_study_spec(11, modalities=("MR", "CT"))
    datasets = make_study(spec, size=16)
    assert len({d.StudyInstanceUID for d in datasets}) == 1
    by_series: dict[str, list[pydicom.Dataset]] = {}
    for d in datasets:
        by_series.setdefault(d.SeriesInstanceUID, []).append(d)
    assert len(by_series) == len(MR_SERIES) + len(CT_SERIES)
    mr_for = {d.FrameOfReferenceUID for d in datasets if d.Modality == "MR"}
    ct_for = {d.FrameOfReferenceUID for d in datasets if d.Modality == "CT"}
    assert len(mr_for) == 1 and len(ct_for) == 1 and mr_for != ct_for
    for insts in by_series.values():
        assert len({d.SeriesNumber for d in insts}) == 1
        assert [d.InstanceNumber for d in insts] == list(range(1, len(insts) + 1))
    # make_series alone gives the same UIDs as make_study for the same position
    t2 = make_series(spec, MR_SERIES["t2_tse"], 3, size=16)
    assert [d.SOPInstanceUID for d in t2] == [
        d.SOPInstanceUID for d in datasets if d.SeriesNumber == 3
    ]


def test_mr_series_attributes() -> None:
    datasets = make_study(make_study_spec(2), size=16)
    loc = [d for d in datasets if d.SeriesDescription == "localizer"]
    assert len(loc) == 3
    assert all("LOCALIZER" in d.ImageType for d in loc)
    assert len({tuple(d.ImageOrientationPatient) for d in loc}) == 3
    t1 = [d for d in datasets if d.ProtocolName == "t1_mprage_sag_p2_iso"]
    assert all(float(d.InversionTime) == 900.0 for d in t1)
    # positions move along the slice normal, one step of SpacingBetweenSlices each
    locs = [float(d.SliceLocation) for d in t1]
    steps = {round(b - a, 3) for a, b in itertools.pairwise(locs)}
    assert steps == {float(t1[0].SpacingBetweenSlices)}
    assert len({tuple(d.ImagePositionPatient) for d in t1}) == len(t1)
    bold = [d for d in datasets if d.ProtocolName == "ep2d_bold_rest"]
    assert {d.TemporalPositionIdentifier for d in bold} == {1, 2, 3, 4}
    for d in datasets:
        for kw in ("EchoTime", "RepetitionTime", "FlipAngle", "MagneticFieldStrength",
                   "SequenceName", "ScanningSequence", "SequenceVariant", "PixelSpacing",
                   "ImageOrientationPatient", "WindowCenter", "Manufacturer",
                   "BodyPartExamined", "PatientPosition"):  # fmt: skip
            assert kw in d, (d.SeriesDescription, kw)


def test_dwi_carries_b_values() -> None:
    dwi = make_series(make_study_spec(1), MR_SERIES["dwi"], 5, size=16)
    assert {float(d.DiffusionBValue) for d in dwi} == {0.0, 1000.0}
    assert all(d[0x0018, 0x9087].VR == "FD" for d in dwi)
    b0 = [d for d in dwi if d.DiffusionBValue == 0]
    assert len(b0) == len(dwi) // 2


def test_512_pixel_data_sizes(tmp_path: Path) -> None:
    spec = make_study_spec(4)
    mr = make_series(spec, MR_SERIES["t2_tse"], 1, size=512)[0]
    assert len(mr.PixelData) == 524_288
    ct = make_series(spec, CT_SERIES["ct_head"], 2, size=512)[0]
    assert len(ct.PixelData) == 524_288
    path = write_dataset(ct, tmp_path / "ct.dcm")
    back = pydicom.dcmread(path)
    assert back.SOPClassUID == CTImageStorage
    assert (back.PixelRepresentation, back.BitsStored, back.HighBit) == (1, 16, 15)
    assert float(back.RescaleIntercept) == -1024.0 and float(back.KVP) == 120.0
    assert back.pixel_array.dtype.kind == "i"


def test_corpus(tmp_path: Path) -> None:
    paths = make_corpus(tmp_path, 120, 32, seed=9)
    assert len(paths) == len(set(paths)) == 120
    datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    assert {d.Modality for d in datasets} == {"MR"}
    assert len({d.SOPInstanceUID for d in datasets}) == 120
    assert len({d.SeriesInstanceUID for d in datasets}) == 3


def test_dcmdump_parses_written_file(study_files: list[Path]) -> None:
    dcmdump = shutil.which("dcmdump")
    if dcmdump is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("dcmdump (dcmtk) is required in CI")
        pytest.skip("dcmdump (dcmtk) not installed")
    for path in (study_files[0], study_files[-1]):
        proc = subprocess.run([dcmdump, str(path)], capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stderr
        assert "E:" not in proc.stderr and "W:" not in proc.stderr, proc.stderr
        assert "MRImageStorage" in proc.stdout


def test_garbage_not_parseable(tmp_path: Path) -> None:
    path = write_garbage(tmp_path / "junk.dcm", 4096, seed=1)
    assert path.stat().st_size == 4096
    assert path.read_bytes() == write_garbage(tmp_path / "junk2.dcm", 4096, seed=1).read_bytes()
    with pytest.raises(InvalidDicomError):
        pydicom.dcmread(path)


def test_truncated(study_files: list[Path], tmp_path: Path) -> None:
    src = study_files[0]
    pixels, header = write_truncated_pair(src, tmp_path, 0.5)
    assert 0 < pixels.stat().st_size < src.stat().st_size
    ds = pydicom.dcmread(pixels)  # header intact
    assert ds.SOPInstanceUID == pydicom.dcmread(src).SOPInstanceUID
    assert 0 < len(ds.PixelData) < ds.Rows * ds.Columns * 2
    with pytest.raises(ValueError):
        _ = ds.pixel_array
    for kf in (0.0, 0.3, 1.0):
        cut = write_truncated(src, tmp_path / f"h{kf}.dcm", kf, where="header")
        with pytest.raises(Exception):  # noqa: B017 - pydicom raises various types
            pydicom.dcmread(cut)
    with pytest.raises(Exception):  # noqa: B017
        pydicom.dcmread(header)
    partial = write_truncated(src, tmp_path / "p.dcm", 0.5, where="header_partial")
    assert "PixelData" not in pydicom.dcmread(partial)


def test_bad_uid_and_missing(tmp_path: Path) -> None:
    ds = make_series(make_study_spec(0), MR_SERIES["localizer"], 1, size=16)[0]
    bad = dataset_with_bad_uid(ds)
    assert "/" in str(bad.SOPInstanceUID) and ".." in str(bad.SOPInstanceUID)
    assert bad.file_meta.MediaStorageSOPInstanceUID == bad.SOPInstanceUID
    assert _valid_uid(ds.SOPInstanceUID)  # original untouched
    back = pydicom.dcmread(write_dataset(bad, tmp_path / "bad.dcm"))
    # fiona reads with pydicom's validation off (engine.dicom.pydicom_setup); strictly, invalid
    strict = pydicom.config.strict_reading()
    with strict, pytest.raises(ValueError, match="Invalid value for VR UI"):
        _ = back.SOPInstanceUID
    back = pydicom.dcmread(tmp_path / "bad.dcm")
    assert "/" in str(back.SOPInstanceUID)
    other = dataset_with_bad_uid(ds, which="StudyInstanceUID", value="1.2.x")
    assert other.StudyInstanceUID == "1.2.x"

    missing = dataset_missing(ds, "SOPInstanceUID")
    assert "SOPInstanceUID" not in missing and "SOPInstanceUID" in ds
    assert "TransferSyntaxUID" not in dataset_missing(ds, "TransferSyntaxUID").file_meta
    with pytest.raises(KeyError):
        dataset_missing(missing, "SOPInstanceUID")


def test_cli(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.synth", str(tmp_path), "--studies", "2", "--seed", "3"],
        capture_output=True, text=True, check=True,
        cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    assert proc.stdout.startswith("wrote ")
    assert len(list(tmp_path.rglob("*.dcm"))) == 2 * sum(s.n_instances for s in MR_SERIES.values())
