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

from engine.dicom.header import HeaderError, header_from_dataset, parse_header, read_dataset
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


def _all_series_instances() -> list[Dataset]:
    spec = synth.make_study_spec(11)
    series = list(synth.MR_SERIES.values()) + list(synth.CT_SERIES.values())
    return [_with_sequence(ds) for ds in synth.make_study(spec, series, size=8)[::7]]


def _with_charset(ds: Dataset, charset: list[str], name: str, description: str) -> Dataset:
    ds = copy.deepcopy(ds)
    ds.SpecificCharacterSet = charset
    ds.PatientName = name
    ds.StudyDescription = description
    return ds


CHARSET_CASES = [
    (["ISO_IR 100"], "Müller^Jörg", "Kopf/Hals Übersicht"),
    (["ISO_IR 192"], "Ærøe^Åsa", "Hode – oversikt"),
    (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう", "頭部 MRI"),
]


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
@pytest.mark.parametrize("transfer_syntax", ENCODINGS)
def test_fast_path_reads_what_pydicom_reads(transfer_syntax: str) -> None:
    """The walk-based reader and pydicom agree on every field, attrs included."""
    datasets = _all_series_instances()
    datasets += [_with_charset(datasets[0], *case) for case in CHARSET_CASES]
    for ds in datasets:
        data = _encode(ds, transfer_syntax)
        fast = parse_header(data)
        slow = header_from_dataset(read_dataset(data))
        assert fast == slow
        assert fast.attrs == slow.attrs
    assert parse_header(_encode(datasets[-1], transfer_syntax)).patient_name.startswith("Yamada")
    assert "山田" in parse_header(_encode(datasets[-1], transfer_syntax)).patient_name


def test_deflated_file_is_read_through_pydicom(instance: Dataset) -> None:
    data = _encode(instance, "1.2.840.10008.1.2.1.99")
    assert parse_header(data).sop_instance_uid == instance.SOPInstanceUID


def nest_sequences(part10: bytes, depth: int) -> bytes:
    """``part10`` (explicit VR little endian) with ``depth`` undefined-length Content Sequences
    (0040,A730) nested one inside the other just before its Pixel Data."""
    import struct

    opening = struct.pack("<HH2sHL", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF) + struct.pack(
        "<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF
    )
    closing = struct.pack("<HHL", 0xFFFE, 0xE00D, 0) + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    at = part10.rindex(b"\xe0\x7f\x10\x00OW")
    return part10[:at] + opening * depth + closing * depth + part10[at:]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_nesting_within_the_bound_parses_as_pydicom_reads_it(instance: Dataset) -> None:
    from engine.dicom.walk import MAX_DEPTH

    data = nest_sequences(_encode(instance, "1.2.840.10008.1.2.1"), MAX_DEPTH)
    assert parse_header(data).sop_instance_uid == instance.SOPInstanceUID
    ds = pydicom.dcmread(io.BytesIO(data))  # the workflow reads archived files with pydicom
    assert ds.SOPInstanceUID == instance.SOPInstanceUID


@pytest.mark.parametrize("depth", [65, 300, 20_000])
def test_deep_nesting_is_unparseable_not_a_recursion_error(instance: Dataset, depth: int) -> None:
    data = nest_sequences(_encode(instance, "1.2.840.10008.1.2.1"), depth)
    with pytest.raises(HeaderError) as caught:
        parse_header(data)
    assert caught.value.code == "unparseable"
    assert "nested deeper than 64 levels" in caught.value.detail
