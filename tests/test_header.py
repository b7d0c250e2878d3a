"""Header parsing: whole files of several encodings pass; every truncation is caught."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit

from engine.dicom.header import HeaderError, parse_header
from tests import synth


def _with_sequence(ds: Dataset) -> Dataset:
    item = Dataset()
    item.CodeValue = "T-A0100"
    item.CodingSchemeDesignator = "SRT"
    inner = Dataset()
    inner.CodeMeaning = "nested"
    item.ConceptCodeSequence = Sequence([inner])
    ds.AnatomicRegionSequence = Sequence([item])
    return ds


def _encode(ds: Dataset, transfer_syntax: str) -> bytes:
    ds = copy.deepcopy(ds)
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    if transfer_syntax == JPEGBaseline8Bit:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        ds.PixelData = encapsulate([b"\xff\xd8fake-jpeg-frame\xff\xd9"])
        ds["PixelData"].VR = "OB"
    buf = io.BytesIO()
    # Sequences are written with undefined length, as most scanners do.
    for elem in ds.iterall():
        if elem.VR == "SQ":
            elem.is_undefined_length = True
    ds.save_as(
        buf,
        enforce_file_format=True,
        little_endian=transfer_syntax != ExplicitVRBigEndian,
        implicit_vr=transfer_syntax == ImplicitVRLittleEndian,
    )
    return buf.getvalue()


@pytest.fixture(scope="module")
def instance() -> Dataset:
    spec = synth.make_study_spec(3)
    return _with_sequence(synth.make_study(spec, [synth.MR_SERIES["t2_tse"]], size=8)[0])


ENCODINGS = [
    "1.2.840.10008.1.2",  # implicit VR little endian
    "1.2.840.10008.1.2.1",  # explicit VR little endian
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,  # encapsulated pixel data
]


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
@pytest.mark.parametrize("transfer_syntax", ENCODINGS)
def test_whole_files_parse(instance: Dataset, transfer_syntax: str) -> None:
    header = parse_header(_encode(instance, transfer_syntax))
    assert header.sop_instance_uid == instance.SOPInstanceUID
    assert header.transfer_syntax_uid == transfer_syntax


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
@pytest.mark.parametrize("transfer_syntax", ENCODINGS)
def test_every_cut_is_caught(instance: Dataset, transfer_syntax: str) -> None:
    data = _encode(instance, transfer_syntax)
    meta_end = 132 + 12 + int.from_bytes(data[140:144], "little")
    # Every cut from the first dataset byte to one byte short of the end.
    missed = []
    for cut in range(meta_end + 1, len(data)):
        try:
            parse_header(data[:cut])
            missed.append(cut)
        except HeaderError as exc:
            assert exc.code in ("unparseable", "invalid_uid")
    assert missed == [], f"{len(missed)} truncations accepted, first at byte {missed[0]}"


def test_synth_partial_header_cut_is_caught(tmp_path: Path, instance: Dataset) -> None:
    src = synth.write_dataset(instance, tmp_path / "whole.dcm")
    for fraction in (0.2, 0.5, 0.8):
        cut = synth.write_truncated(
            src, tmp_path / f"cut{fraction}.dcm", fraction, where="header_partial"
        )
        with pytest.raises(HeaderError):
            parse_header(cut.read_bytes())


def test_not_dicom() -> None:
    with pytest.raises(HeaderError) as info:
        parse_header(b"\0" * 128 + b"NOPE" + b"x" * 100)
    assert info.value.code == "unparseable"


def test_pydicom_reads_what_we_accept(instance: Dataset) -> None:
    data = _encode(instance, "1.2.840.10008.1.2.1")
    assert pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID == instance.SOPInstanceUID
