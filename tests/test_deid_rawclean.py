"""The byte path (engine.deid.rawclean) gives exactly what the pydicom reference path gives.

Every case de-identifies the same Part 10 bytes twice, once on the byte path and once with
``byte_path=False``, and requires identical output bytes, action counts, header sizes and
written UIDs; the byte path must really have been taken (no silent fallback). Inputs with
what the byte path leaves to pydicom check that the fallback still de-identifies them.
"""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from engine.deid import Deidentifier, load_profile
from engine.deid.rawclean import NotRaw
from engine.dicom.walk import Walker, read_meta
from tests.deid_phi import PLANTED, phi_instances
from tests.synth import make_study, make_study_spec

SECRET = b"fiona-test-secret-not-for-production-0123"
CASES = Path(__file__).parent / "deid_cases"
SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
#: Every option of the table, the golden combinations and overrides.
PROFILES: dict[str, tuple[list[str], dict[str, Any]]] = {
    "basic": ([], {}),
    "retain_safe_private": (["retain_safe_private"], {}),
    "retain_uids": (["retain_uids"], {}),
    "retain_device_identity": (["retain_device_identity"], {}),
    "retain_institution_identity": (["retain_institution_identity"], {}),
    "retain_patient_characteristics": (["retain_patient_characteristics"], {}),
    "retain_longitudinal_full_dates": (["retain_longitudinal_full_dates"], {}),
    "retain_longitudinal_modified_dates": (["retain_longitudinal_modified_dates"], {}),
    "clean_descriptors": (["clean_descriptors"], {}),
    "clean_structured_content": (["clean_structured_content"], {}),
    "clean_graphics": (["clean_graphics"], {}),
    "combo": (
        ["retain_safe_private", "retain_longitudinal_modified_dates", "retain_device_identity"],
        {},
    ),
    "research_combo": (
        json.loads((CASES / "cases.json").read_text())["research_combo"]["options"],
        {},
    ),
    "overrides": ([], json.loads((CASES / "cases.json").read_text())["overrides"]["overrides"]),
}


def to_bytes(ds: Dataset, syntax: str) -> bytes:
    ds = copy.deepcopy(ds)
    ds.file_meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def inputs() -> list[Dataset]:
    golden = Dataset.from_json(json.loads((CASES / "input.json").read_text()))
    study = make_study(make_study_spec(7, modalities=("MR", "CT")), size=4)
    return [*phi_instances(2), golden, *study[:: max(1, len(study) // 6)]]


def deidentifier(profile: str) -> Deidentifier:
    options, overrides = PROFILES[profile]
    return Deidentifier(load_profile("basic", options, overrides), SECRET, project="p1")


def assert_same(deid: Deidentifier, data: bytes) -> None:
    deid.raw.clean(data, "S01", "baseline")  # raises NotRaw if the byte path is not taken
    fast = deid.process_file(data, subject="S01", event="baseline")
    reference = deid.process_file(data, subject="S01", event="baseline", byte_path=False)
    assert fast.data == reference.data
    assert fast == reference


@pytest.mark.parametrize("syntax", SYNTAXES)
@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_byte_path_equals_reference(profile: str, syntax: str) -> None:
    deid = deidentifier(profile)
    for ds in inputs():
        assert_same(deid, to_bytes(ds, syntax))


def test_byte_path_output_has_no_planted_phi() -> None:
    deid = deidentifier("basic")
    for ds in phi_instances():
        out = deid.process_file(to_bytes(ds, ExplicitVRLittleEndian)).data
        for value in PLANTED.values():
            assert value.encode() not in out, value


def test_existing_deidentification_marks_are_replaced_and_counted() -> None:
    ds = phi_instances(1)[0]
    ds.PatientIdentityRemoved = "NO"
    ds.DeidentificationMethod = "SOMEONE ELSE"
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "1", "X", "other"
    ds.DeidentificationMethodCodeSequence = Sequence([code])
    ds.LongitudinalTemporalInformationModified = "UNMODIFIED"
    deid = deidentifier("basic")
    data = to_bytes(ds, ExplicitVRLittleEndian)
    assert_same(deid, data)
    out = pydicom.dcmread(io.BytesIO(deid.process_file(data).data))
    assert out.PatientIdentityRemoved == "YES"
    assert out.LongitudinalTemporalInformationModified == "REMOVED"
    assert [c.CodeValue for c in out.DeidentificationMethodCodeSequence] == ["113100"]


def test_private_blocks_follow_their_creators() -> None:
    """A safe private element is kept only under its own creator, at every level."""
    ds = phi_instances(1)[0]
    item = Dataset()
    item.private_block(0x0019, "SIEMENS MR HEADER", create=True).add_new(0x0C, "IS", "500")
    item.private_block(0x0029, "NOT A SAFE CREATOR", create=True).add_new(0x0C, "LO", "X")
    ds.ReferencedSeriesSequence = Sequence([item])
    for syntax in SYNTAXES:
        data = to_bytes(ds, syntax)
        deid = deidentifier("retain_safe_private")
        assert_same(deid, data)
        out = pydicom.dcmread(io.BytesIO(deid.process_file(data).data))
        kept = out.ReferencedSeriesSequence[0]
        assert kept[0x0019100C].value in ("500", b"500 ", 500)
        assert 0x0029100C not in kept and 0x00290010 not in kept


@pytest.mark.parametrize(
    "why",
    ["big_endian", "un_sequence", "out_of_order"],
)
@pytest.mark.parametrize("options", [[], ["clean_descriptors"]])
def test_what_the_byte_path_leaves_to_pydicom(why: str, options: list[str]) -> None:
    ds = phi_instances(1)[0]
    series = Dataset()
    series.SeriesInstanceUID = ds.SeriesInstanceUID
    ds.ReferencedSeriesSequence = Sequence([series])  # kept, its items cleaned
    ds["ReferencedSeriesSequence"].is_undefined_length = True
    data = to_bytes(ds, ExplicitVRBigEndian if why == "big_endian" else ExplicitVRLittleEndian)
    if why == "un_sequence":  # that sequence stored as UN of undefined length
        data = _as_un_sequence(data, 0x00081115)
    elif why == "out_of_order":
        data = _swap_first_two(data, group=0x0010)
    deid = Deidentifier(load_profile("basic", options), SECRET)
    with pytest.raises(NotRaw):
        deid.raw.clean(data)
    out = deid.process_file(data)
    assert out == deid.process_file(data, byte_path=False)
    for value in [*PLANTED.values(), ds.SeriesInstanceUID]:
        assert value.encode() not in out.data


def _as_un_sequence(data: bytes, tag: int) -> bytes:
    """``data`` with the explicit-VR sequence ``tag`` relabelled UN (same undefined length)."""
    header = (tag >> 16).to_bytes(2, "little") + (tag & 0xFFFF).to_bytes(2, "little")
    at = data.index(header + b"SQ\0\0\xff\xff\xff\xff")
    return data[:at] + header + b"UN" + data[at + 6 :]


def _swap_first_two(data: bytes, group: int) -> bytes:
    """``data`` with the first two top-level elements of ``group`` in swapped order."""
    walker = Walker(data, little=True)
    pos, _ = read_meta(data)
    spans = []
    while len(spans) < 2:
        end = walker.skip(pos, implicit=False)
        if walker.tag(pos) >> 16 == group:
            spans.append((pos, end))
        pos = end
    (a, b), (c, d) = spans
    assert b == c
    return data[:a] + data[c:d] + data[a:b] + data[d:]
