"""read_header_dataset gives what dcmread(path, stop_before_pixels=True) gives, and takes its own
fast path for the common files (the workflow reads every received instance with it)."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

import engine.dicom.dataset as fast
from tests import synth


def _instance(size: int = 8) -> Dataset:
    spec = synth.make_study_spec(11)
    return synth.make_study(spec, [synth.MR_SERIES["t1_mprage"]], size=size)[0]


def _write(ds: Dataset, path: Path, syntax: str | None = None) -> Path:
    if syntax is not None:
        ds.file_meta.TransferSyntaxUID = syntax
    return synth.write_dataset(ds, path)


def _with_sequences(ds: Dataset, *, undefined: bool) -> Dataset:
    item = Dataset()
    item.CodeValue = "T-A0100"
    item.CodingSchemeDesignator = "SRT"
    item.CodeMeaning = "Brain"
    inner = Dataset()
    inner.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    inner.ReferencedSOPInstanceUID = generate_uid()
    item.ReferencedImageSequence = Sequence([inner])
    ds.AnatomicRegionSequence = Sequence([item, Dataset()])
    ds.ProcedureCodeSequence = Sequence([])
    for elem in (ds["AnatomicRegionSequence"], item["ReferencedImageSequence"]):
        elem.is_undefined_length = undefined
    return ds


def _charset(ds: Dataset) -> Dataset:
    ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    ds.PatientName = "Yamada^Tarou=山田^太郎=やまだ^たろう"
    ds.StudyDescription = "頭部"
    return ds


def _private(ds: Dataset) -> Dataset:
    block = ds.private_block(0x0019, "FIONA TEST", create=True)
    block.add_new(0x10, "LO", "private text")
    block.add_new(0x11, "DS", "1.5\\2.5")
    ds.add_new(0x00191200, "UN", b"\x01\x02\x03\x04")
    return ds


def _empty_values(ds: Dataset) -> Dataset:
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.add_new(0x00181030, "LO", None)  # ProtocolName, empty
    return ds


def _long_header(ds: Dataset) -> Dataset:
    block = ds.private_block(0x0029, "FIONA TEST", create=True)
    block.add_new(0x10, "OB", bytes(range(256)) * 300)  # the header outgrows the first read
    return ds


CASES: dict[str, Callable[[], tuple[Dataset, str | None]]] = {
    "explicit": lambda: (_instance(), None),
    "implicit": lambda: (_instance(), ImplicitVRLittleEndian),
    "defined-sequences": lambda: (_with_sequences(_instance(), undefined=False), None),
    "undefined-sequences": lambda: (_with_sequences(_instance(), undefined=True), None),
    "implicit-undefined-sequences": lambda: (
        _with_sequences(_instance(), undefined=True),
        ImplicitVRLittleEndian,
    ),
    "charset": lambda: (_charset(_instance()), None),
    "private": lambda: (_private(_instance()), None),
    "implicit-private": lambda: (_private(_instance()), ImplicitVRLittleEndian),
    "empty-values": lambda: (_empty_values(_instance()), None),
    "long-header": lambda: (_long_header(_instance()), None),
    "512x512": lambda: (_instance(512), None),
    "big-endian": lambda: (_instance(), ExplicitVRBigEndian),
    "deflated": lambda: (_instance(), DeflatedExplicitVRLittleEndian),
}
#: Cases read by dcmread itself (the fast path declines them).
FALLBACK = {"big-endian", "deflated"}


def _same(path: Path) -> None:
    ours = fast.read_header_dataset(path)
    ref = pydicom.dcmread(path, stop_before_pixels=True)
    assert ours.to_json_dict() == ref.to_json_dict()
    assert ours.file_meta.to_json_dict() == ref.file_meta.to_json_dict()
    assert ours.original_encoding == ref.original_encoding
    assert ours.original_character_set == ref.original_character_set
    assert ours.preamble == ref.preamble
    assert "PixelData" not in ours
    assert [e.tag for e in ours] == [e.tag for e in ref]


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_same_dataset_as_dcmread(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds, syntax = CASES[case]()
    path = _write(ds, tmp_path / "in.dcm", syntax)
    calls: list[object] = []
    real = pydicom.dcmread

    def counting(*args: object, **kwargs: object) -> object:
        calls.append(args)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(fast.pydicom, "dcmread", counting)
    _same(path)
    used_fallback = len(calls) > 1  # _same itself calls dcmread once
    assert used_fallback == (case in FALLBACK)


def test_sequences_keep_their_undefined_length(tmp_path: Path) -> None:
    path = _write(_with_sequences(_instance(), undefined=True), tmp_path / "in.dcm")
    ours = fast.read_header_dataset(path)
    assert ours["AnatomicRegionSequence"].is_undefined_length
    item = ours.AnatomicRegionSequence[0]
    assert item.ReferencedImageSequence[0].ReferencedSOPClassUID == "1.2.840.10008.5.1.4.1.1.4"


def test_a_truncated_file_is_read_as_dcmread_reads_it(tmp_path: Path) -> None:
    source = _write(_with_sequences(_instance(), undefined=True), tmp_path / "whole.dcm")
    data = source.read_bytes()
    for cut in (200, 600, len(data) // 2):
        path = tmp_path / f"cut-{cut}.dcm"
        path.write_bytes(data[:cut])
        try:
            expected = pydicom.dcmread(path, stop_before_pixels=True).to_json_dict()
        except Exception as exc:
            with pytest.raises(type(exc)):
                fast.read_header_dataset(path)
        else:
            assert fast.read_header_dataset(path).to_json_dict() == expected


def test_a_file_without_meta_is_read_by_dcmread(tmp_path: Path) -> None:
    ds = _instance()
    buf = io.BytesIO()
    ds.file_meta = FileMetaDataset()
    ds.save_as(buf, implicit_vr=True, little_endian=True)
    path = tmp_path / "bare.dcm"
    path.write_bytes(buf.getvalue())
    with pytest.raises(pydicom.errors.InvalidDicomError):
        fast.read_header_dataset(path)


#: Tags a selective read asks for: text, numbers, a sequence, private elements and their
#: creator, 'US or SS' (SmallestImagePixelValue), one absent (ContrastBolusAgent), file meta.
_WANTED = (0x00080008, 0x0008103E, 0x00180081, 0x00082218, 0x00100010, 0x00190010, 0x00191010)
_WANTED += (0x00191011, 0x00191200, 0x00280106, 0x00180010, 0x00020010)


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_selective_read_keeps_only_the_named_tags_each_as_read_whole(
    case: str, tmp_path: Path
) -> None:
    ds, syntax = CASES[case]()
    ds.SmallestImagePixelValue = 7
    path = _write(ds, tmp_path / "in.dcm", syntax)
    whole = fast.read_header_dataset(path)
    ours = fast.read_header_dataset(path, _WANTED)
    kept = set(_WANTED) | fast.DECODING_TAGS
    if case in FALLBACK:
        assert [e.tag for e in ours] == [e.tag for e in whole]
    else:
        assert {e.tag for e in ours} == {e.tag for e in whole if e.tag in kept}
        assert len(ours) < len(whole)
    assert ours.to_json_dict() == Dataset({e.tag: e for e in whole if e.tag in ours}).to_json_dict()
    assert ours.file_meta.to_json_dict() == whole.file_meta.to_json_dict()
    assert ours.original_encoding == whole.original_encoding
    assert ours.original_character_set == whole.original_character_set


def test_a_selective_read_decodes_us_or_ss_by_the_pixel_representation(tmp_path: Path) -> None:
    """Implicit VR: SmallestImagePixelValue is SS because PixelRepresentation (not asked
    for) is 1; the selective read keeps it to decode the same."""
    ds = _instance()
    ds.PixelRepresentation = 1
    ds.SmallestImagePixelValue = -5
    path = _write(ds, tmp_path / "in.dcm", ImplicitVRLittleEndian)
    ours = fast.read_header_dataset(path, [0x00280106])
    assert ours.SmallestImagePixelValue == -5
    assert ours["SmallestImagePixelValue"].VR == "SS"
