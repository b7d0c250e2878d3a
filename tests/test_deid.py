"""De-identification core: generated profile, golden cases, properties, keys, the file path."""

from __future__ import annotations

import copy
import io
import json
import os
from pathlib import Path
from typing import Any

import pydicom
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from engine.deid import (
    OPTIONS,
    Deidentifier,
    HashPseudonyms,
    ProfileError,
    SecretError,
    UidMapper,
    generate_profile,
    load_profile,
    load_secret,
)
from engine.deid.ops import Op
from engine.deid.rawfile import split_pixels
from engine.dicom.values import dictionary_vr
from tests.deid_phi import PLANTED, phi_instances

SECRET = b"fiona-test-secret-not-for-production-0123"
CASES = Path(__file__).parent / "deid_cases"
UPDATE = os.environ.get("UPDATE_DEID_GOLDEN") == "1"


def to_bytes(ds: Dataset, syntax: str = ExplicitVRLittleEndian) -> bytes:
    ds = copy.deepcopy(ds)
    meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    meta.TransferSyntaxUID = syntax
    ds.file_meta = meta
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


# ---------------------------------------------------------------------- generated profile


def test_committed_profile_matches_generator() -> None:
    for name, text in generate_profile.render().items():
        committed = (generate_profile.OUT_DIR / name).read_text(encoding="utf-8")
        assert committed == text, f"{name} drifted: run python -m engine.deid.generate_profile"


def test_source_copy_matches_shared_data() -> None:
    shared = generate_profile.REPO.parent / "shared" / "data"
    if not shared.is_dir():
        pytest.skip("no ../shared/data here (CI): the committed copy is the source")
    for name in (generate_profile.E11, generate_profile.SAFE):
        copy_ = generate_profile.OUT_DIR / "source" / name
        assert copy_.read_bytes() == (shared / name).read_bytes()


def test_profile_has_every_row_and_codes() -> None:
    doc = json.loads((generate_profile.OUT_DIR / "basic.json").read_text())
    assert doc["edition"] == "2026d" and len(doc["rows"]) == 657
    assert doc["code"]["value"] == "113100"
    assert {k: v["value"] for k, v in doc["options"].items()}["retain_uids"] == "113110"
    assert all(len(v["meaning"]) <= 64 for v in doc["options"].values())


# ---------------------------------------------------------------------- golden cases


def golden_cases() -> dict[str, dict[str, Any]]:
    return json.loads((CASES / "cases.json").read_text())


def golden_input() -> Dataset:
    ds = Dataset.from_json(json.loads((CASES / "input.json").read_text()))
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


@pytest.mark.parametrize("case", sorted(golden_cases()))
def test_golden(case: str) -> None:
    spec = golden_cases()[case]
    profile = load_profile("basic", spec.get("options", []), spec.get("overrides", {}))
    deid = Deidentifier(profile, SECRET, project="golden")
    ds = deid.deidentify_dataset(golden_input(), subject="S01", event="baseline")
    got = ds.to_json_dict()
    path = CASES / f"{case}.json"
    if UPDATE:
        path.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    assert got == json.loads(path.read_text())


# ---------------------------------------------------------------------- properties

TEXT_TAGS = sorted(
    tag
    for tag, op in load_profile("basic").ops.items()
    if op in (Op.REMOVE, Op.EMPTY, Op.DUMMY, Op.HASH)
    and dictionary_vr(tag) in ("LO", "SH", "LT", "ST", "UT", "PN")
)
option_sets = st.lists(st.sampled_from(OPTIONS), unique=True).filter(
    lambda o: not {"retain_longitudinal_full_dates", "retain_longitudinal_modified_dates"} <= set(o)
)
planted = st.text("ABCDEFGHJKLMNPQRSTUVWXYZ23456789", min_size=8, max_size=12).map(
    lambda s: "Q" + s
)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)
@given(
    options=option_sets,
    tags=st.lists(st.sampled_from(TEXT_TAGS), min_size=1, max_size=8, unique=True),
    values=st.lists(planted, min_size=8, max_size=8, unique=True),
    nested=st.booleans(),
)
def test_no_removed_value_survives(
    options: list[str], tags: list[int], values: list[str], nested: bool
) -> None:
    profile = load_profile("basic", options)
    base = phi_instances(1)[0]
    target = base
    if nested:  # an unlisted sequence is kept and its items cleaned
        item = Dataset()
        base.ReferencedSeriesSequence = Sequence([item])
        target = item
    secret_values = []
    for tag, value in zip(tags, values, strict=False):
        vr = dictionary_vr(tag)
        value = value[:16] if vr == "SH" else value
        if profile.ops.get(tag) in (Op.KEEP, Op.CLEAN, Op.RECURSE, Op.SHIFT):
            continue  # kept or cleaned under these options: not a D/Z/X/U attribute here
        target.add_new(tag, vr, value)
        secret_values.append(value)
    base.SeriesDescription = ("desc " + " ".join(secret_values))[:64]  # C under clean_descriptors
    out = Deidentifier(profile, SECRET).deidentify_file(to_bytes(base))
    for value in secret_values:
        assert value.encode() not in out
    result = pydicom.dcmread(io.BytesIO(out))
    texts = [str(e.value) for e in result.iterall()]
    assert not any(v in t for v in secret_values for t in texts)


def test_planted_phi_gone_from_bytes_under_basic() -> None:
    for ds in phi_instances():
        out = Deidentifier(load_profile("basic"), SECRET).deidentify_file(to_bytes(ds))
        for value in PLANTED.values():
            assert value.encode() not in out, value
        assert b"SYNPID" not in out and b"FAKEPERSON" not in out


# ---------------------------------------------------------------------- UIDs and keys


def test_references_follow_their_instances_across_files() -> None:
    first, second = phi_instances()
    deid = Deidentifier(load_profile("basic"), SECRET)
    out1 = pydicom.dcmread(io.BytesIO(deid.deidentify_file(to_bytes(first))))
    other = Deidentifier(load_profile("basic"), SECRET)  # a second run maps the same way
    out2 = pydicom.dcmread(io.BytesIO(other.deidentify_file(to_bytes(second))))
    assert out1.SOPInstanceUID != first.SOPInstanceUID
    assert out2.ReferencedImageSequence[0].ReferencedSOPInstanceUID == out1.SOPInstanceUID
    ref = out2.ReferencedSeriesSequence[0]
    assert ref.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == out1.SOPInstanceUID
    assert ref.SeriesInstanceUID == out1.SeriesInstanceUID == out2.SeriesInstanceUID
    assert out1.StudyInstanceUID == out2.StudyInstanceUID
    assert out1.FrameOfReferenceUID == out2.FrameOfReferenceUID
    assert out2.ReferencedImageSequence[0].ReferencedSOPClassUID == first.SOPClassUID


def test_same_input_same_output_and_uid_shape() -> None:
    data = to_bytes(phi_instances(1)[0])
    a = Deidentifier(load_profile("basic"), SECRET).deidentify_file(data)
    b = Deidentifier(load_profile("basic"), SECRET).deidentify_file(data)
    assert a == b
    c = Deidentifier(load_profile("basic"), SECRET[::-1]).deidentify_file(data)
    assert a != c
    uid = pydicom.dcmread(io.BytesIO(a)).SOPInstanceUID
    assert uid.startswith("2.25.") and len(uid) <= 64 and uid.is_valid
    rooted = UidMapper(SECRET, "1.2.826.0.1.3680043.10.1234").map("1.2.3.4")
    assert rooted.startswith("1.2.826.0.1.3680043.10.1234.") and len(rooted) == 64
    assert UidMapper(SECRET).map(ExplicitVRLittleEndian) == ExplicitVRLittleEndian


def test_retain_uids_keeps_them() -> None:
    ds = phi_instances(1)[0]
    out = Deidentifier(load_profile("basic", ["retain_uids"]), SECRET).deidentify_dataset(
        copy.deepcopy(ds)
    )
    assert out.SOPInstanceUID == ds.SOPInstanceUID and out.StudyInstanceUID == ds.StudyInstanceUID


def test_modified_dates_keep_intervals_per_patient() -> None:
    profile = load_profile("basic", ["retain_longitudinal_modified_dates"])
    deid = Deidentifier(profile, SECRET)
    a, b = phi_instances(2)
    b.StudyDate = "20230111"
    out_a, out_b = (deid.deidentify_dataset(copy.deepcopy(x)) for x in (a, b))
    from datetime import date

    def d(s: str) -> date:
        return date(int(s[:4]), int(s[4:6]), int(s[6:8]))

    shift = (d(out_a.StudyDate) - d(a.StudyDate)).days
    assert -365 <= shift <= -1
    assert (d(out_b.StudyDate) - d(b.StudyDate)).days == shift
    assert out_a.AcquisitionDateTime[8:] == a.AcquisitionDateTime[8:]
    assert out_a.LongitudinalTemporalInformationModified == "MODIFIED"


def test_pseudonyms_are_keyed_and_stable() -> None:
    p = HashPseudonyms(SECRET).pseudonym("SYNPID1", "DOE^JANE")
    assert p == HashPseudonyms(SECRET).pseudonym("SYNPID1", "OTHER^NAME")
    assert (
        p.id.startswith("SUBJ-")
        and p.id != HashPseudonyms(SECRET[1:] + b"x").pseudonym("SYNPID1", "").id
    )


def test_secret_file_checks(tmp_path: Path) -> None:
    good = tmp_path / "key"
    good.write_bytes(b"x" * 40 + b"\n")
    good.chmod(0o600)
    assert load_secret(good) == b"x" * 40
    good.chmod(0o644)
    with pytest.raises(SecretError, match="readable or writable by every user"):
        load_secret(good)
    short = tmp_path / "short"
    short.write_bytes(b"x" * 31)
    short.chmod(0o600)
    with pytest.raises(SecretError, match="at least 32"):
        load_secret(short)


# ---------------------------------------------------------------------- profile errors


@pytest.mark.parametrize(
    ("options", "overrides", "message"),
    [
        (["retain_everything"], {}, "unknown option 'retain_everything'"),
        (["retain_longitudinal_full_dates", "retain_longitudinal_modified_dates"], {}, "exclude"),
        ([], {"PatientNickname": "keep"}, "not a DICOM keyword"),
        ([], {"StudyID": "shred"}, "expected one of"),
        ([], {"StudyID": {"set": "{patient}"}}, "unknown field {patient}"),
    ],
)
def test_profile_errors(options: list[str], overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ProfileError, match=message):
        load_profile("basic", options, overrides)


def test_option_precedence_most_protective() -> None:
    both = load_profile("basic", ["retain_device_identity", "retain_longitudinal_modified_dates"])
    assert both.ops[0x0018700C] is Op.SHIFT  # Date Of Last Detector Calibration: C beats K
    assert load_profile("basic", ["retain_device_identity"]).ops[0x0018700C] is Op.KEEP
    assert both.ops[0x00181000] is Op.KEEP  # Device Serial Number


# ---------------------------------------------------------------------- the file path


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_file_meta_pixels_and_codes(syntax: str) -> None:
    ds = phi_instances(1)[0]
    data = to_bytes(ds, syntax)
    options = ["retain_safe_private", "clean_descriptors"]
    result = Deidentifier(load_profile("basic", options), SECRET).process_file(data)
    out = pydicom.dcmread(io.BytesIO(result.data))
    meta = out.file_meta
    assert meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID != ds.SOPInstanceUID
    assert meta.MediaStorageSOPClassUID == out.SOPClassUID
    assert meta.TransferSyntaxUID == syntax
    assert meta.ImplementationClassUID == "2.25.21208680153880756234421539763416735043"
    assert "SourceApplicationEntityTitle" not in meta
    assert out.PatientIdentityRemoved == "YES"
    codes = [
        (i.CodeValue, i.CodingSchemeDesignator) for i in out.DeidentificationMethodCodeSequence
    ]
    assert codes == [("113100", "DCM"), ("113111", "DCM"), ("113105", "DCM")]
    src, dst = split_pixels(data), split_pixels(result.data)
    assert src is not None and dst is not None
    assert data[src.pixel_start : src.pixel_end] == result.data[dst.pixel_start : dst.pixel_end]
    assert out.PixelData == ds.PixelData
    assert (
        result.counts["X"] > 0
        and "U" in result.counts
        and all(isinstance(v, int) for v in result.counts.values())
    )
    assert out[0x0019100C].value == "1000" and 0x00191099 not in out and 0x0029100C not in out


def test_implementation_uid_matches_receiver() -> None:
    from engine.deid.deidentifier import IMPLEMENTATION_CLASS_UID
    from engine.net.dimse import IMPLEMENTATION_CLASS_UID as RECEIVER

    assert IMPLEMENTATION_CLASS_UID == RECEIVER
