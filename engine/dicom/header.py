"""Read the header fields the engine needs from one instance's bytes.

The receive path reads them in the same walk that proves the file whole
(:func:`engine.dicom.walk.scan`), with no pydicom Dataset; a file that walk cannot read as
declared (a deflated dataset, or bytes whose encoding disagrees with their transfer syntax,
which pydicom detects) is read with pydicom instead, with the same completeness check.
Either way the cost does not grow with image size: pixel data is skipped, not decoded.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

import engine.dicom.pydicom_setup  # noqa: F401  (pydicom's settings: no value in any log)
from engine.dicom.errors import HeaderError
from engine.dicom.uids import is_valid_uid
from engine.dicom.values import SPECIFIC_CHARACTER_SET, decode_fields
from engine.dicom.walk import DEFLATED, check_complete, scan

__all__ = ["SUMMARY_KEYWORDS", "HeaderError", "InstanceHeader", "parse_header", "read_dataset"]

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


def _text(values: Mapping[str, Any], keyword: str) -> str:
    value = values.get(keyword)
    return "" if value is None else str(value).strip()


def _int(values: Mapping[str, Any], keyword: str) -> int | None:
    try:
        value = values.get(keyword)
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


def _json_value(value: Any) -> Any:
    """A JSON-friendly copy of a value (multi-values become lists, bytes are dropped)."""
    kind = type(value)
    if kind is str or kind is int or kind is float:  # what the receive path decodes to
        return value
    if isinstance(value, (list, tuple)) or kind.__name__ == "MultiValue":
        return [_json_value(v) for v in value]
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, bytes):
        return None
    return str(value)


def _summary_attrs(values: Mapping[str, Any]) -> dict[str, Any]:
    attrs: dict[str, Any] = {}
    for keyword in SUMMARY_KEYWORDS:
        value = values.get(keyword)
        if value is not None and value != "":
            attrs[keyword] = _json_value(value)
    return attrs


def _requires_pixels(sop_class_uid: object, has_rows: bool) -> bool:
    """True for images: Rows present, or a SOP class whose PS3.6 name says 'Image Storage'."""
    return has_rows or "Image Storage" in UID(str(sop_class_uid or "")).name


# --------------------------------------------------------------------------- fast path

_WANTED = frozenset(_TAGS.values()) | {SPECIFIC_CHARACTER_SET}
_KEYWORD_OF = {tag: keyword for keyword, tag in _TAGS.items()}
#: Walk failures pydicom would not read any better (it would recurse on deep nesting).
_FINAL = ("not a DICOM", "sequences nested deeper")


def parse_header(data: bytes) -> InstanceHeader:
    """Parse and validate the header of a Part 10 file held in memory.

    Raises :class:`HeaderError` (``unparseable`` or ``invalid_uid``) for anything that is not a
    whole DICOM file with valid UIDs.
    """
    try:
        found = scan(data, _WANTED)
    except HeaderError as exc:
        if exc.detail.startswith(_FINAL):
            raise
        return header_from_dataset(read_dataset(data))  # pydicom may know the real encoding
    if found.transfer_syntax == DEFLATED:
        return header_from_dataset(read_dataset(data))
    try:
        values = decode_fields(found, _KEYWORD_OF)
    except Exception as exc:
        raise HeaderError(
            "unparseable", f"header could not be decoded: {type(exc).__name__}"
        ) from exc
    # A cut exactly at an element boundary leaves a well-formed but shorter dataset; for an
    # image that shows as a missing pixel data element.
    if not found.has_pixels and _requires_pixels(values.get("SOPClassUID"), "Rows" in values):
        raise HeaderError("unparseable", "truncated: an image without pixel data")
    return header_from_values(values, found.transfer_syntax)


# --------------------------------------------------------------------------- pydicom path


def read_dataset(data: bytes) -> Dataset:
    """Parse a Part 10 file with pydicom up to the pixel data; check the rest fits."""
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
    if str(meta.TransferSyntaxUID) == DEFLATED:
        return ds  # compressed as a whole: pydicom's inflate reports a cut
    implicit, little = ds.original_encoding
    has_pixels = check_complete(data, bool(implicit), bool(little))
    if not has_pixels and _requires_pixels(ds.get("SOPClassUID", ""), "Rows" in ds):
        raise HeaderError("unparseable", "truncated: an image without pixel data")
    return ds


def header_from_dataset(ds: Dataset) -> InstanceHeader:
    """Build an :class:`InstanceHeader` from a pydicom Dataset."""
    try:
        values = {}
        for keyword, tag in _TAGS.items():
            elem = ds.get(tag)
            if elem is not None:
                values[keyword] = elem.value
        meta = getattr(ds, "file_meta", None)
        meta_ts = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    except Exception as exc:
        raise HeaderError(
            "unparseable", f"header could not be decoded: {type(exc).__name__}"
        ) from exc
    return header_from_values(values, meta_ts)


# --------------------------------------------------------------------------- both paths

_UID_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


def header_from_values(values: Mapping[str, Any], transfer_syntax: str) -> InstanceHeader:
    """Build an :class:`InstanceHeader`; raise :class:`HeaderError` on missing or bad UIDs."""
    try:
        uids = {keyword: str(values.get(keyword) or "").strip() for keyword in _UID_KEYWORDS}
        fields = {
            "patient_id": _text(values, "PatientID"),
            "patient_name": _text(values, "PatientName"),
            "birth_date": _text(values, "PatientBirthDate"),
            "sex": _text(values, "PatientSex"),
            "study_date": _text(values, "StudyDate"),
            "study_time": _text(values, "StudyTime"),
            "accession_number": _text(values, "AccessionNumber"),
            "study_description": _text(values, "StudyDescription"),
            "series_description": _text(values, "SeriesDescription"),
            "modality": _text(values, "Modality"),
            "series_number": _int(values, "SeriesNumber"),
            "instance_number": _int(values, "InstanceNumber"),
        }
        attrs = _summary_attrs(values)
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
    if transfer_syntax and not is_valid_uid(transfer_syntax):
        raise HeaderError("invalid_uid", "TransferSyntaxUID is not a valid UID")
    return InstanceHeader(
        sop_class_uid=uids["SOPClassUID"],
        sop_instance_uid=uids["SOPInstanceUID"],
        study_uid=uids["StudyInstanceUID"],
        series_uid=uids["SeriesInstanceUID"],
        transfer_syntax_uid=transfer_syntax,
        attrs=attrs,
        **fields,  # type: ignore[arg-type]
    )
