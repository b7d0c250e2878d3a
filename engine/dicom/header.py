"""Read the header fields the engine needs from one instance's bytes.

Parsing stops before the pixel data, so its cost does not grow with image size.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass, field
from typing import Any

import pydicom
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


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
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
            value = ds.get(keyword)
        except Exception:
            continue
        if value is not None and value != "":
            attrs[keyword] = _json_value(value)
    return attrs


#: VRs whose explicit-VR header has 2 reserved bytes and a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_UNDEFINED = 0xFFFFFFFF
_DEFLATED = "1.2.840.10008.1.2.1.99"


def _skip_undefined(data: bytes, pos: int, little: bool) -> int:
    """Position after the items and Sequence Delimitation Item that start at ``pos``."""
    fmt = "<HHL" if little else ">HHL"
    while True:
        if pos + 8 > len(data):
            raise HeaderError("unparseable", "file ends inside an undefined-length element")
        group, elem, length = struct.unpack_from(fmt, data, pos)
        pos += 8
        if (group, elem) == (0xFFFE, 0xE0DD):
            return pos
        if (group, elem) != (0xFFFE, 0xE000):
            raise HeaderError("unparseable", "malformed item in an undefined-length element")
        if length == _UNDEFINED:
            # A nested undefined-length item (only in rare trailing sequences such as Digital
            # Signatures): its end cannot be found without a full parse; the pixel data,
            # which is what truncation cuts, came before it.
            return len(data)
        else:
            pos += length


def check_complete(data: bytes, pos: int, implicit: bool, little: bool) -> None:
    """Raise :class:`HeaderError` if the top-level elements from ``pos`` do not fit in ``data``.

    The header parse stops before the pixel data, so a file cut inside its pixels would look
    whole; walking the remaining elements' declared lengths catches that without reading them.
    """
    end = len(data)
    fmt_tag = "<HH" if little else ">HH"
    while pos < end:
        if pos + 8 > end:
            raise HeaderError("unparseable", "file ends inside an element header")
        group, elem = struct.unpack_from(fmt_tag, data, pos)
        vr = data[pos + 4 : pos + 6]
        if group == 0xFFFE or implicit:
            length = struct.unpack_from("<L" if little else ">L", data, pos + 4)[0]
            pos += 8
        elif vr in _LONG_VRS:
            if pos + 12 > end:
                raise HeaderError("unparseable", "file ends inside an element header")
            length = struct.unpack_from("<L" if little else ">L", data, pos + 8)[0]
            pos += 12
        else:
            length = struct.unpack_from("<H" if little else ">H", data, pos + 6)[0]
            pos += 8
        if length == _UNDEFINED:
            pos = _skip_undefined(data, pos, little)
        elif pos + length > end:
            raise HeaderError(
                "unparseable",
                f"truncated: element ({group:04X},{elem:04X}) needs {length} bytes,"
                f" {end - pos} remain",
            )
        else:
            pos += length


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
    if str(meta.TransferSyntaxUID) != _DEFLATED:
        implicit, little = ds.original_encoding
        check_complete(data, fp.tell(), bool(implicit), bool(little))
    return ds


def header_from_dataset(ds: Dataset) -> InstanceHeader:
    """Build an :class:`InstanceHeader`; raise :class:`HeaderError` on missing or bad UIDs."""
    try:
        meta = getattr(ds, "file_meta", None)
        meta_ts = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
        uids = {
            "SOPClassUID": str(ds.get("SOPClassUID", "") or ""),
            "SOPInstanceUID": str(ds.get("SOPInstanceUID", "") or ""),
            "StudyInstanceUID": str(ds.get("StudyInstanceUID", "") or ""),
            "SeriesInstanceUID": str(ds.get("SeriesInstanceUID", "") or ""),
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
