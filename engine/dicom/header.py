"""Read the header fields the engine needs from one instance's bytes.

Parsing stops before the pixel data, so its cost does not grow with image size.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass, field
from typing import Any

import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from engine.dicom.uids import is_valid_uid

#: Header fields kept per instance in the index (``attrs``) and aggregated into series summaries.
SUMMARY_KEYWORDS: tuple[str, ...] = (
    "ImageType",
    "SequenceName",
    "ScanningSequence",
    "SequenceVariant",
    "ProtocolName",
    "EchoTime",
    "RepetitionTime",
    "InversionTime",
    "FlipAngle",
    "EchoNumbers",
    "MagneticFieldStrength",
    "SliceThickness",
    "SpacingBetweenSlices",
    "SliceLocation",
    "PixelSpacing",
    "ImageOrientationPatient",
    "ImagePositionPatient",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "DiffusionBValue",
    "AcquisitionNumber",
    "Manufacturer",
    "ManufacturerModelName",
    "BodyPartExamined",
    "KVP",
    "ConvolutionKernel",
    "ContrastBolusAgent",
)


_OTHER_KEYWORDS = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyDescription",
    "SeriesDescription",
    "Modality",
    "SeriesNumber",
    "InstanceNumber",
)
_TAGS: dict[str, int] = {
    keyword: int(tag_for_keyword(keyword) or 0) for keyword in SUMMARY_KEYWORDS + _OTHER_KEYWORDS
}


class HeaderError(ValueError):
    """The bytes are not a DICOM dataset the engine can file.

    ``code`` is the quarantine reason code (``unparseable`` or ``invalid_uid``); ``detail`` says
    what was wrong without quoting header values (they may carry PHI).
    """

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class InstanceHeader:
    """Identifying and descriptive fields of one instance.

    UIDs are validated (digits and dots, at most 64 characters) at construction by
    :func:`parse_header`; every other value is free text and must never become a path unchecked.
    """

    sop_class_uid: str  # (0008,0016)
    sop_instance_uid: str  # (0008,0018)
    study_uid: str  # (0020,000D)
    series_uid: str  # (0020,000E)
    transfer_syntax_uid: str  # (0002,0010)
    patient_id: str = ""  # (0010,0020)
    patient_name: str = ""  # (0010,0010)
    birth_date: str = ""  # (0010,0030)
    sex: str = ""  # (0010,0040)
    study_date: str = ""  # (0008,0020)
    study_time: str = ""  # (0008,0030)
    accession_number: str = ""  # (0008,0050)
    study_description: str = ""  # (0008,1030)
    series_description: str = ""  # (0008,103E)
    modality: str = ""  # (0008,0060)
    series_number: int | None = None  # (0020,0011)
    instance_number: int | None = None  # (0020,0013)
    attrs: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


def _value(ds: Dataset, keyword: str) -> Any:
    """The value of ``keyword`` or None, looked up by tag (cheaper than attribute access)."""
    elem = ds.get(_TAGS[keyword])
    return None if elem is None else elem.value


def _text(ds: Dataset, keyword: str) -> str:
    value = _value(ds, keyword)
    return "" if value is None else str(value).strip()


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = _value(ds, keyword)
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


def _json_value(value: Any) -> Any:
    """A JSON-friendly copy of a pydicom value (multi-values become lists)."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [_json_value(v) for v in value]
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, bytes):
        return None
    return str(value)


def _summary_attrs(ds: Dataset) -> dict[str, Any]:
    attrs: dict[str, Any] = {}
    for keyword in SUMMARY_KEYWORDS:
        try:
            value = _value(ds, keyword)
        except Exception:
            continue
        if value is not None and value != "":
            attrs[keyword] = _json_value(value)
    return attrs


#: VRs whose explicit-VR header has 2 reserved bytes and a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_UNDEFINED = 0xFFFFFFFF
_DEFLATED = "1.2.840.10008.1.2.1.99"


#: Pixel Data, Float Pixel Data, Double Float Pixel Data (stop_before_pixels stops at any).
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)
_ITEM = (0xFFFE, 0xE000)
_ITEM_END = (0xFFFE, 0xE00D)
_SEQ_END = (0xFFFE, 0xE0DD)


class _Walker:
    """Walks element headers and declared lengths without decoding any value.

    pydicom reads a file cut short inside a value or header as a shorter dataset without
    complaint; walking every declared length to the end of the bytes is what tells a whole file
    from a truncated one. Undefined lengths (sequences, encapsulated pixel data) are followed
    item by item.
    """

    def __init__(self, data: bytes, little: bool) -> None:
        self.data = data
        self.e = "<" if little else ">"

    def _need(self, pos: int, n: int) -> None:
        if pos + n > len(self.data):
            raise HeaderError("unparseable", "truncated: the file ends inside an element")

    def tag(self, pos: int) -> tuple[int, int]:
        self._need(pos, 8)
        group, elem = struct.unpack_from(self.e + "HH", self.data, pos)
        return group, elem

    def one(self, pos: int, implicit: bool) -> int:
        """Position after the element that starts at ``pos``."""
        data, e = self.data, self.e
        group, _ = self.tag(pos)
        vr = data[pos + 4 : pos + 6]
        if implicit or group == 0xFFFE:
            length = struct.unpack_from(e + "L", data, pos + 4)[0]
            pos += 8
        elif vr in _LONG_VRS:
            self._need(pos, 12)
            length = struct.unpack_from(e + "L", data, pos + 8)[0]
            pos += 12
        else:
            length = struct.unpack_from(e + "H", data, pos + 6)[0]
            pos += 8
        if length == _UNDEFINED:
            # An explicit 'UN' of undefined length holds implicit VR little endian content.
            return self.items(pos, implicit or vr == b"UN")
        self._need(pos, length)
        return int(pos + length)

    def elements(self, pos: int, implicit: bool, until_item_end: bool = False) -> int:
        """Walk elements from ``pos`` to the end (or past the Item Delimitation Item)."""
        while pos < len(self.data):
            if until_item_end and self.tag(pos) == _ITEM_END:
                return pos + 8
            pos = self.one(pos, implicit)
        if until_item_end:
            raise HeaderError("unparseable", "truncated: the file ends inside a sequence item")
        return pos

    def items(self, pos: int, implicit: bool) -> int:
        """Walk the items of an undefined-length element up to its Sequence Delimitation Item."""
        while True:
            tag = self.tag(pos)
            length = struct.unpack_from(self.e + "L", self.data, pos + 4)[0]
            pos += 8
            if tag == _SEQ_END:
                return pos
            if tag != _ITEM:
                raise HeaderError("unparseable", "malformed item in an undefined-length element")
            if length == _UNDEFINED:
                pos = self.elements(pos, implicit, until_item_end=True)
            else:
                self._need(pos, length)
                pos += length


def _dataset_start(data: bytes) -> int:
    """Offset of the first dataset element after the preamble, 'DICM' and the file meta group.

    The meta group (always explicit VR little endian) is walked rather than trusting its group
    length, which some writers get wrong.
    """
    walker = _Walker(data, little=True)
    pos = 132
    while pos + 2 <= len(data) and struct.unpack_from("<H", data, pos)[0] == 0x0002:
        pos = walker.one(pos, implicit=False)
    return pos


def check_complete(data: bytes, implicit: bool, little: bool) -> bool:
    """Raise :class:`HeaderError` unless every element's declared length fits ``data`` exactly.

    Returns whether the dataset has a top-level pixel data element.
    """
    walker = _Walker(data, little)
    pos = _dataset_start(data)
    has_pixels = False
    while pos < len(data):
        group, elem = walker.tag(pos)
        has_pixels = has_pixels or (group << 16 | elem) in _PIXEL_TAGS
        pos = walker.one(pos, implicit)
    return has_pixels


def _requires_pixels(ds: Dataset) -> bool:
    """True for images: Rows present, or a SOP class whose PS3.6 name says 'Image Storage'."""
    if "Rows" in ds:
        return True
    sop_class = ds.get("SOPClassUID")
    return sop_class is not None and "Image Storage" in getattr(sop_class, "name", "")


def read_dataset(data: bytes) -> Dataset:
    """Parse a Part 10 file (preamble, meta, dataset) up to the pixel data; check the rest fits."""
    fp = io.BytesIO(data)
    try:
        ds = pydicom.dcmread(fp, stop_before_pixels=True, force=False)
    except InvalidDicomError as exc:
        raise HeaderError("unparseable", "not a DICOM Part 10 file (no DICM prefix)") from exc
    except Exception as exc:
        raise HeaderError(
            "unparseable", f"header could not be parsed: {type(exc).__name__}"
        ) from exc
    meta = getattr(ds, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        raise HeaderError("unparseable", "file meta has no Transfer Syntax UID")
    if str(meta.TransferSyntaxUID) == _DEFLATED:
        return ds  # compressed as a whole: pydicom's inflate reports a cut
    implicit, little = ds.original_encoding
    has_pixels = check_complete(data, bool(implicit), bool(little))
    # A cut exactly at an element boundary leaves a well-formed but shorter dataset; for an
    # image that shows as a missing pixel data element.
    if not has_pixels and _requires_pixels(ds):
        raise HeaderError("unparseable", "truncated: an image without pixel data")
    return ds


def header_from_dataset(ds: Dataset) -> InstanceHeader:
    """Build an :class:`InstanceHeader`; raise :class:`HeaderError` on missing or bad UIDs."""
    try:
        meta = getattr(ds, "file_meta", None)
        meta_ts = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
        uids = {
            keyword: str(_value(ds, keyword) or "")
            for keyword in (
                "SOPClassUID",
                "SOPInstanceUID",
                "StudyInstanceUID",
                "SeriesInstanceUID",
            )
        }
        fields = {
            "patient_id": _text(ds, "PatientID"),
            "patient_name": _text(ds, "PatientName"),
            "birth_date": _text(ds, "PatientBirthDate"),
            "sex": _text(ds, "PatientSex"),
            "study_date": _text(ds, "StudyDate"),
            "study_time": _text(ds, "StudyTime"),
            "accession_number": _text(ds, "AccessionNumber"),
            "study_description": _text(ds, "StudyDescription"),
            "series_description": _text(ds, "SeriesDescription"),
            "modality": _text(ds, "Modality"),
            "series_number": _int(ds, "SeriesNumber"),
            "instance_number": _int(ds, "InstanceNumber"),
        }
        attrs = _summary_attrs(ds)
    except Exception as exc:
        raise HeaderError(
            "unparseable", f"header could not be decoded: {type(exc).__name__}"
        ) from exc
    for keyword, value in uids.items():
        if not value:
            raise HeaderError("invalid_uid", f"{keyword} is missing")
        if not is_valid_uid(value):
            # The value itself is not quoted: a malformed UID may be anything, PHI included.
            raise HeaderError(
                "invalid_uid", f"{keyword} is not a valid UID (digits and dots, <= 64)"
            )
    if meta_ts and not is_valid_uid(meta_ts):
        raise HeaderError("invalid_uid", "TransferSyntaxUID is not a valid UID")
    return InstanceHeader(
        sop_class_uid=uids["SOPClassUID"],
        sop_instance_uid=uids["SOPInstanceUID"],
        study_uid=uids["StudyInstanceUID"],
        series_uid=uids["SeriesInstanceUID"],
        transfer_syntax_uid=meta_ts,
        attrs=attrs,
        **fields,  # type: ignore[arg-type]
    )


def parse_header(data: bytes) -> InstanceHeader:
    """Parse and validate the header of a Part 10 file held in memory."""
    return header_from_dataset(read_dataset(data))
