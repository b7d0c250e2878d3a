"""The verification gate (engine.deid.verify): original identifiers hunted in the output.

Originals are synthetic studies (tests/synth.py); the "de-identified" outputs are built here by
hand from another synthetic patient, so the tests do not depend on the de-identifier.
"""

from __future__ import annotations

import copy
import io
import statistics
import time
import warnings

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from engine.deid.verify import (
    ByteLeak,
    IdentifyingValues,
    Leak,
    find_leaks,
    find_leaks_in_bytes,
    leak_reason,
)
from tests.synth import MR_SERIES, make_study, make_study_spec, study_uid

# A few planted UIDs are deliberately longer than 64 characters.
pytestmark = pytest.mark.filterwarnings("ignore:The value length .* for VR UI")

SPEC = make_study_spec(0)  # DOE^JANE^SYNTH
OTHER = make_study_spec(7)
ORIGINAL = make_study(SPEC, [MR_SERIES["localizer"]])
VALUES = IdentifyingValues.from_datasets(ORIGINAL)


def _pseudonymised(ds: Dataset) -> Dataset:
    """``ds`` the way a de-identifier leaves it: pseudonyms, no institution or staff names,
    new UIDs (descriptions, device model and acquisition parameters kept)."""
    out = copy.deepcopy(ds)
    out.PatientName = "SUBJ^0042"
    out.PatientID = "SUBJ0042"
    out.PatientBirthDate = ""
    out.AccessionNumber = ""
    out.StudyID = ""
    out.ReferringPhysicianName = ""
    for keyword in (
        "InstitutionName",
        "InstitutionAddress",
        "InstitutionalDepartmentName",
        "PerformingPhysicianName",
        "OperatorsName",
        "DeviceSerialNumber",
        "StationName",
    ):
        delattr(out, keyword)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        setattr(out, keyword, generate_uid())
    out.SOPInstanceUID = out.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    out.PatientIdentityRemoved = "YES"
    return out


def _clean_output() -> Dataset:
    return _pseudonymised(make_study(OTHER, [MR_SERIES["localizer"]])[0])


def _bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _private(ds: Dataset, group: int, creator: str, offset: int, vr: str, value: object) -> None:
    ds.private_block(group, creator, create=True).add_new(offset, vr, value)


# --------------------------------------------------------------------------- collection


def test_values_cover_every_kind_of_identifier() -> None:
    assert VALUES.kinds() == {
        "patient_name",
        "person_name",
        "patient_id",
        "accession_number",
        "study_id",
        "birth_date",
        "original_date",
        "original_uid",
        "institution",
        "device_serial",
    }


@pytest.mark.filterwarnings("ignore:Invalid value for VR DA")
def test_too_short_and_placeholder_values_are_not_hunted() -> None:
    ds = Dataset()
    ds.PatientName = "LI^JO^SYNTH"  # parts < 3 characters
    ds.PatientID = "123"  # < 4 characters (and digits: < 6)
    ds.StudyID = "1"
    ds.AccessionNumber = "ANONYMOUS"
    ds.StudyDate = "2023"  # not a full date
    ds.PatientBirthDate = "20231340"  # not a valid date
    values = IdentifyingValues.from_dataset(ds)
    assert values.kinds() == {"patient_name"}  # only the whole name 'LI^JO^SYNTH' and forms
    target = Dataset()
    target.ImageComments = "LI 1 123 ANONYMOUS 2023 20231340 SOLID JO JOB"
    assert find_leaks(target, values) == []
    target.ImageComments = "seen: Jo Li"
    assert find_leaks(target, values) == [Leak("ImageComments", "patient_name")]


# --------------------------------------------------------------------------- planted values


def _plant_free_text(ds: Dataset) -> None:
    ds.ImageComments = "Comment for patient jane doe"


def _plant_private_lo(ds: Dataset) -> None:
    _private(ds, 0x0009, "SYNTH PRIVATE", 0x10, "LO", f"id {SPEC.patient_id}")


def _plant_nested_private(ds: Dataset) -> None:
    item = Dataset()
    item.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    item.ReferencedSOPInstanceUID = generate_uid()
    _private(item, 0x0009, "SYNTH PRIVATE", 0x10, "LO", "Doe")
    ds.ReferencedStudySequence = Sequence([item])


def _plant_sr_text(ds: Dataset) -> None:
    text = Dataset()
    text.ValueType = "TEXT"
    text.TextValue = f"Accession {SPEC.accession_number} reviewed"
    container = Dataset()
    container.ValueType = "CONTAINER"
    container.ContentSequence = Sequence([Dataset(), text])
    ds.ContentSequence = Sequence([container])


def _plant_un_bytes(ds: Dataset) -> None:
    _private(ds, 0x0011, "SYNTH BLOB", 0x01, "UN", b"\x01\x00hdr:DOE^JANE\x00\x00")


def _plant_ob_bytes(ds: Dataset) -> None:
    _private(ds, 0x0029, "SYNTH CSA", 0x10, "OB", b"SN=" + SPEC.device_serial_number.encode())


def _plant_referenced_uid(ds: Dataset) -> None:
    item = Dataset()
    item.ReferencedSOPClassUID = ORIGINAL[1].SOPClassUID  # well known: never a leak
    item.ReferencedSOPInstanceUID = ORIGINAL[1].SOPInstanceUID
    ds.ReferencedImageSequence = Sequence([item])


def _plant_uid_prefix(ds: Dataset) -> None:
    ds.StudyInstanceUID = study_uid(SPEC) + ".1"  # derived from the original: still a leak


def _plant_meta_uid(ds: Dataset) -> None:
    ds.file_meta.MediaStorageSOPInstanceUID = ORIGINAL[0].SOPInstanceUID


def _plant_dt(ds: Dataset) -> None:
    ds.AcquisitionDateTime = SPEC.study_date + "101500.000000"


def _plant_da(ds: Dataset) -> None:
    ds.InstanceCreationDate = SPEC.study_date


def _plant_birth_date(ds: Dataset) -> None:
    ds.PatientBirthDate = SPEC.birth_date


def _plant_rendered_birth_date(ds: Dataset) -> None:
    b = SPEC.birth_date
    ds.ImageComments = f"DOB {b[6:]}.{b[4:6]}.{b[:4]}"


def _plant_physician(ds: Dataset) -> None:
    family, given = SPEC.referring_physician.split("^")[:2]
    ds.RequestingPhysician = f"{given.title()} {family.title()}"  # 'Given Family' form


def _plant_institution(ds: Dataset) -> None:
    _private(ds, 0x0019, "SYNTH SITE", 0x20, "LT", f"site: {SPEC.institution_name.lower()}")


PLANTED = [
    (_plant_free_text, "ImageComments", "patient_name"),
    (_plant_private_lo, "(0009,1010)", "patient_id"),
    (_plant_nested_private, "ReferencedStudySequence[0].(0009,1010)", "patient_name"),
    (_plant_sr_text, "ContentSequence[0].ContentSequence[1].TextValue", "accession_number"),
    (_plant_un_bytes, "(0011,1001)", "patient_name"),
    (_plant_ob_bytes, "(0029,1010)", "device_serial"),
    (_plant_referenced_uid, "ReferencedImageSequence[0].ReferencedSOPInstanceUID", "original_uid"),
    (_plant_uid_prefix, "StudyInstanceUID", "original_uid"),
    (_plant_meta_uid, "MediaStorageSOPInstanceUID", "original_uid"),
    (_plant_dt, "AcquisitionDateTime", "original_date"),
    (_plant_da, "InstanceCreationDate", "original_date"),
    (_plant_birth_date, "PatientBirthDate", "birth_date"),
    (_plant_rendered_birth_date, "ImageComments", "birth_date"),
    (_plant_physician, "RequestingPhysician", "person_name"),
    (_plant_institution, "(0019,1020)", "institution"),
]


def test_clean_output_of_another_patient_has_no_leaks() -> None:
    out = _clean_output()
    assert out.StudyDate != SPEC.study_date and out.StudyDescription  # kept, and different
    assert find_leaks(out, VALUES) == []
    assert find_leaks_in_bytes(_bytes(out), VALUES) == []


@pytest.mark.parametrize(("plant", "path", "kind"), PLANTED, ids=[p[0].__name__ for p in PLANTED])
def test_planted_value_is_found_with_its_path(plant, path: str, kind: str) -> None:
    out = _clean_output()
    plant(out)
    assert find_leaks(out, VALUES) == [Leak(path, kind)]
    # the same file written and read back (raw elements, implicit private VRs as written)
    if path.startswith("MediaStorage"):
        return  # writing a Part 10 file sets it from SOPInstanceUID
    data = _bytes(out)
    assert find_leaks(pydicom.dcmread(io.BytesIO(data)), VALUES) == [Leak(path, kind)]
    assert [leak.kind for leak in find_leaks_in_bytes(data, VALUES)] == [kind]


def test_byte_offsets_point_at_the_value() -> None:
    out = _clean_output()
    _plant_private_lo(out)
    data = _bytes(out)
    (leak,) = find_leaks_in_bytes(data, VALUES)
    assert leak == ByteLeak(leak.offset, "patient_id")
    assert data[leak.offset : leak.offset + len(SPEC.patient_id)] == SPEC.patient_id.encode()


def test_non_ascii_names_in_the_dataset_character_set() -> None:
    original = Dataset()
    original.SpecificCharacterSet = "ISO_IR 192"
    original.PatientName = "MÜLLER^JÖRG"
    values = IdentifyingValues.from_dataset(original)
    out = _clean_output()
    out.SpecificCharacterSet = "ISO_IR 192"
    out.ImageComments = "Befund Jörg Müller"
    assert find_leaks(out, values) == [Leak("ImageComments", "patient_name")]
    out.ImageComments = "Befund"
    out.StudyComments = "Patient müller"
    data = _bytes(out)
    assert find_leaks(pydicom.dcmread(io.BytesIO(data)), values) == [
        Leak("StudyComments", "patient_name")
    ]
    assert [leak.kind for leak in find_leaks_in_bytes(data, values)] == ["patient_name"]


def test_words_containing_a_name_part_and_longer_uids_are_not_leaks() -> None:
    out = _clean_output()
    out.ImageComments = "JANEWAY DOES SYNTH"  # 'JANE', 'DOE' only inside words; middle name
    out.StudyInstanceUID = "9" + study_uid(SPEC)  # another UID that contains the original
    assert find_leaks(out, VALUES) == []


def test_pixel_data_is_not_searched() -> None:
    out = _clean_output()
    pixels = bytearray(out.PixelData)
    pixels[100:114] = b"DOE^JANE^SYNTH"
    out.PixelData = bytes(pixels)
    assert find_leaks(out, VALUES) == []
    assert find_leaks_in_bytes(_bytes(out), VALUES) == []


# --------------------------------------------------------------------------- allow-list


def test_allowed_values_and_kinds_are_not_reported() -> None:
    out = _clean_output()
    out.StudyInstanceUID = study_uid(SPEC)  # retain_uids
    out.StudyDate = SPEC.study_date  # kept dates
    out.ImageComments = (
        f"acquired {SPEC.study_date[:4]}-{SPEC.study_date[4:6]}-{SPEC.study_date[6:]}"
    )
    assert {leak.kind for leak in find_leaks(out, VALUES)} == {"original_uid", "original_date"}
    allow = [study_uid(SPEC), SPEC.study_date]
    assert find_leaks(out, VALUES, allow=allow) == []
    assert find_leaks_in_bytes(_bytes(out), VALUES, allow=allow) == []
    assert find_leaks(out, VALUES, allow_kinds=["original_uid", "original_date"]) == []
    out.PatientBirthDate = SPEC.birth_date  # not allowed: still found
    assert find_leaks(out, VALUES, allow=allow) == [Leak("PatientBirthDate", "birth_date")]


# --------------------------------------------------------------------------- no PHI out


def _phi() -> list[str]:
    ds = ORIGINAL[0]
    values = [SPEC.patient_name, SPEC.patient_id, SPEC.accession_number, SPEC.birth_date]
    values += [SPEC.study_date, SPEC.institution_name, SPEC.device_serial_number, "DOE", "JANE"]
    values += [str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)]
    return [v.upper() for v in values]


def test_leaks_and_reasons_carry_no_phi() -> None:
    leaks = find_leaks(ORIGINAL[0], VALUES)  # the original itself: everything leaks
    byte_leaks = find_leaks_in_bytes(_bytes(ORIGINAL[0]), VALUES)
    assert len(leaks) >= 15 and len(byte_leaks) >= 15
    texts = [str(x) for x in leaks + byte_leaks] + [repr(x) for x in leaks + byte_leaks]
    texts += [leak_reason(leaks), leak_reason(byte_leaks), repr(VALUES), str(VALUES)]
    for text in texts:
        for value in _phi():
            assert value not in text.upper(), (text, "holds an original value")
    assert leak_reason(leaks[:2]) == (
        f"original identifying values found in {leaks[0].path} ({leaks[0].kind}), "
        f"{leaks[1].path} ({leaks[1].kind})"
    )


# --------------------------------------------------------------------------- speed


def test_fast_enough_for_the_export_path() -> None:
    values = IdentifyingValues.from_datasets(make_study(SPEC, [MR_SERIES["t2_tse"]]))
    study = make_study(OTHER, [MR_SERIES["t2_tse"]])
    outputs = [pydicom.dcmread(io.BytesIO(_bytes(_pseudonymised(ds)))) for ds in study]
    find_leaks(outputs[0], values)  # compile once per study
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for ds in outputs:
            assert find_leaks(ds, values) == []
        times.append((time.perf_counter() - start) / len(outputs))
    # ~0.3 ms per instance on the development machine; generous bound for slow CI
    assert statistics.median(times) < 0.005
