"""De-identified outputs stay valid objects: dciodvfy (dicom3tools) over ten synthetic IODs
(tests/iod_objects.py), for the basic profile and for each option, finds no error the input did
not have (issue 16, deliverable 1)."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian

from engine.config.rulesets import rulesets_dir
from engine.deid.conform import Conformer
from engine.deid.deidentifier import IOD_RESTORED, Deidentifier
from engine.deid.profile import OPTIONS, load_profile
from engine.deid.verify import IdentifyingValues, find_leaks
from tests.iod_objects import (
    BASIC_TEXT_SR,
    BUILDERS,
    ENCAPSULATED_PDF,
    ENHANCED_MR,
    GSPS,
    MR_IMAGE,
    SEGMENTATION,
    iod_object,
)

SECRET = b"iod-test-secret-0123456789abcdef0123"
#: The basic profile, each option alone, and every option at once (but full dates, which
#: excludes modified dates).
PROFILES = ("basic", *OPTIONS, "all")
ALL = tuple(o for o in OPTIONS if o != "retain_longitudinal_full_dates")


def dciodvfy_errors(path: Path) -> set[str]:
    """The Error lines dciodvfy prints for ``path``, values and frame numbers taken out."""
    tool = shutil.which("dciodvfy")
    if tool is None:
        message = "dciodvfy (Debian dicom3tools) is not installed; run scripts/setup.sh"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    done = subprocess.run([tool, str(path)], capture_output=True, text=True, check=False)
    lines = (done.stdout + done.stderr).splitlines()
    return {_normalise(line) for line in lines if line.startswith("Error")}


def _normalise(line: str) -> str:
    line = re.sub(r"<[^<>]*[0-9][^<>]*>", "<v>", line)
    return re.sub(r"(?<!Type )\b\d+\b", "N", line)


def _files(kind: str, option: str, tmp: Path) -> tuple[Path, Path]:
    buffer = io.BytesIO()
    iod_object(kind).save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    options = {"basic": (), "all": ALL}.get(option, (option,))
    out = Deidentifier(load_profile("basic", options), SECRET).process_file(data).data
    source, target = tmp / f"{kind}-in.dcm", tmp / f"{kind}-{option}.dcm"
    source.write_bytes(data)
    target.write_bytes(out)
    return source, target


@pytest.mark.parametrize("option", PROFILES)
@pytest.mark.parametrize("kind", list(BUILDERS))
def test_output_has_no_new_dciodvfy_error(kind: str, option: str, tmp_path: Path) -> None:
    source, target = _files(kind, option, tmp_path)
    new = dciodvfy_errors(target) - dciodvfy_errors(source)
    assert not new, f"{kind} with {option}: dciodvfy errors not in the input: {sorted(new)}"


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_inputs_are_valid(kind: str, tmp_path: Path) -> None:
    """The synthetic inputs themselves carry no dciodvfy error, so the comparison above is
    against a clean baseline."""
    path = tmp_path / f"{kind}.dcm"
    iod_object(kind).save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == set()


def _deid(ds: Dataset, *, byte_path: bool = True, options: tuple[str, ...] = ()) -> Dataset:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    deid = Deidentifier(load_profile("basic", options), SECRET)
    out = deid.process_file(buffer.getvalue(), byte_path=byte_path).data
    return dcmread(io.BytesIO(out))


def test_restored_values_carry_nothing_of_the_input() -> None:
    """Every restored attribute holds a dummy, a keyed hash or nothing: the verification gate
    finds no original identifying value in any output."""
    for kind in BUILDERS:
        original = iod_object(kind)
        out = _deid(iod_object(kind))
        assert find_leaks(out, IdentifyingValues.from_dataset(original)) == [], kind
    seg = _deid(iod_object("SEG"))
    segment = seg.SegmentSequence[0]
    assert segment.SegmentLabel not in ("", "LIVER")
    assert segment.SegmentAlgorithmName == "ANONYMIZED"
    assert seg.ContentDescription in (None, "")


def test_stack_ids_stay_distinct_and_consistent() -> None:
    """Stack ID (0020,9056) is replaced by a keyed hash: two stacks stay two, and the frames
    of one stack share one value."""
    ds = iod_object("EnhancedMR")
    ds.PerFrameFunctionalGroupsSequence[1].FrameContentSequence[0].StackID = "2"
    out = _deid(ds)
    ids = [f.FrameContentSequence[0].StackID for f in out.PerFrameFunctionalGroupsSequence]
    assert ids[0] != ids[1] and "1" not in ids and "2" not in ids
    again = _deid(iod_object("EnhancedMR"))
    first = again.PerFrameFunctionalGroupsSequence
    assert first[0].FrameContentSequence[0].StackID == first[1].FrameContentSequence[0].StackID


def test_conditional_attributes_follow_the_input() -> None:
    """A Type 1C attribute is restored only where the input had it (its condition held): a
    MANUAL segment without Segment Algorithm Name gets none; an UNVERIFIED report without
    Verifying Observer Sequence gets none; a verified one keeps one dummy observer item."""
    seg = iod_object("SEG")
    segment = seg.SegmentSequence[0]
    segment.SegmentAlgorithmType = "MANUAL"
    del segment.SegmentAlgorithmName, segment.SegmentationAlgorithmIdentificationSequence
    assert "SegmentAlgorithmName" not in _deid(seg).SegmentSequence[0]
    sr = iod_object("BasicSR")
    sr.VerificationFlag = "UNVERIFIED"
    del sr.VerifyingObserverSequence
    assert "VerifyingObserverSequence" not in _deid(sr)
    verified = _deid(iod_object("BasicSR"))
    (observer,) = verified.VerifyingObserverSequence
    assert observer.VerifyingObserverName == "ANONYMIZED"
    assert "ContentSequence" not in verified  # emptied by D, then its 1C condition is gone
    kept = _deid(iod_object("BasicSR"), options=("clean_structured_content",))
    assert len(kept.ContentSequence) == 1


@pytest.mark.parametrize("kind", ["SEG", "EnhancedMR", "BasicSR", "GSPS", "PDF", "MR"])
def test_byte_path_gives_the_reference_output(kind: str) -> None:
    """The byte path hands the SOP classes of iod_types.json to the pydicom path, so both
    write the same file."""
    buffer = io.BytesIO()
    iod_object(kind).save_as(buffer, enforce_file_format=True)
    deid = Deidentifier(load_profile("basic"), SECRET)
    fast = deid.process_file(buffer.getvalue()).data
    reference = deid.process_file(buffer.getvalue(), byte_path=False).data
    assert fast == reference


def test_the_iod_table_cites_its_source_and_reads() -> None:
    """Every row of rulesets/anonymize/iod_types.json names its PS3.3 source, a known set and a
    known keyword (Conformer raises on an unknown one)."""
    path = rulesets_dir() / "anonymize" / "iod_types.json"
    doc = json.loads(path.read_text(encoding="utf-8"))
    for row in doc["rows"]:
        assert row["source"].startswith("PS3.3"), row["keyword"]
        assert set(row["sets"]) <= set(doc["sop_class_sets"]), row["keyword"]
        assert row["type"] in ("1", "1C", "2", "2C"), row["keyword"]
    conformer = Conformer(path)
    assert {
        SEGMENTATION,
        ENHANCED_MR,
        BASIC_TEXT_SR,
        GSPS,
        ENCAPSULATED_PDF,
    } <= conformer.sop_classes
    assert MR_IMAGE not in conformer.sop_classes  # the common path keeps its byte speed


def test_the_report_names_what_the_iod_got_back() -> None:
    """The action counts and ``--report``'s per-attribute rows say what was written back (or
    removed) for the IOD; a plain MR gets no such row."""
    buffer = io.BytesIO()
    iod_object("BasicSR").save_as(buffer, enforce_file_format=True)
    deid = Deidentifier(load_profile("basic"), SECRET, per_attribute=True)
    result = deid.process_file(buffer.getvalue())
    assert result.counts[IOD_RESTORED] == 3
    rows = result.attributes
    assert rows["VerifyingObserverSequence (required by the IOD)"] == {"replaced": 1}
    assert rows["ReferencedPerformedProcedureStepSequence (required by the IOD)"] == {"replaced": 1}
    assert rows["ContentSequence (required by the IOD)"] == {"removed": 1}
    buffer = io.BytesIO()
    iod_object("MR").save_as(buffer, enforce_file_format=True)
    assert IOD_RESTORED not in deid.process_file(buffer.getvalue()).counts


def test_implicit_vr_objects_are_restored_too() -> None:
    """An implicit VR little endian SEG (sequences read without their VR) gets its Segment
    Label back as well."""
    ds = iod_object("SEG")
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    out = _deid(ds)
    assert out.SegmentSequence[0].SegmentLabel not in ("", "LIVER")
    assert out.SegmentSequence[0].SegmentAlgorithmName == "ANONYMIZED"
