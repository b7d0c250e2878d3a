"""Write a cleaned header as Part 10 bytes, raw elements byte for byte.

pydicom's ``dcmwrite`` re-validates and re-encodes every element, which costs more than the
whole de-identification of a header. Elements the profile kept are still pydicom raw elements
(the bytes as read, in the file's own little-endian encoding), so they are written back as they
are; only replaced elements go through pydicom's element writer, and sequences are written with
undefined lengths (PS3.5 7.5.2). Big endian files use ``dcmwrite`` (retired, rare).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element

from engine.dicom.walk import UNDEFINED_LENGTH

_LONG_VRS = frozenset(
    ["OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"]
)
_EXPLICIT_SHORT = struct.Struct("<HH2sH")
_EXPLICIT_LONG = struct.Struct("<HH2sHL")
_IMPLICIT = struct.Struct("<HHL")
#: An item / item end / sequence end, all of undefined or zero length (PS3.5 7.5).
ITEM = b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
ITEM_END = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
SEQ_END = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_CHARSET = 0x00080005


def element_header(tag: int, vr: str, length: int, implicit: bool) -> bytes:
    """Tag, VR (explicit only) and length of one little-endian element (PS3.5 7.1)."""
    if implicit:
        return _IMPLICIT.pack(tag >> 16, tag & 0xFFFF, length)
    if vr in _LONG_VRS:
        return _EXPLICIT_LONG.pack(tag >> 16, tag & 0xFFFF, vr.encode("ascii"), 0, length)
    return _EXPLICIT_SHORT.pack(tag >> 16, tag & 0xFFFF, vr.encode("ascii"), length)


def _encodings(ds: Dataset, inherited: list[str]) -> list[str]:
    if _CHARSET not in ds:
        return inherited
    value = ds[_CHARSET].value
    if not value:
        return ["ISO_IR 6"]
    return (
        [str(v) for v in value]
        if isinstance(value, Sequence) and not isinstance(value, str)
        else [str(value)]
    )


def write_dataset(fp: DicomBytesIO, ds: Dataset, implicit: bool, inherited: list[str]) -> None:
    """Append ``ds``'s elements (sorted by tag) to ``fp`` in little endian."""
    encodings = _encodings(ds, inherited)
    for tag in sorted(ds.keys()):
        elem = ds.get_item(tag)
        if isinstance(elem, RawDataElement) and elem.length != UNDEFINED_LENGTH:
            value = elem.value or b""
            fp.write(element_header(tag, elem.VR or "UN", len(value), implicit))
            fp.write(value)
            continue
        if not isinstance(elem, DataElement):  # raw undefined-length: let pydicom decode it
            elem = ds[tag]
        if elem.VR == "SQ":
            fp.write(element_header(tag, "SQ", UNDEFINED_LENGTH, implicit))
            for item in elem.value or ():
                fp.write(ITEM)
                write_dataset(fp, item, implicit, encodings)
                fp.write(ITEM_END)
            fp.write(SEQ_END)
        else:
            write_data_element(fp, elem, encodings)


def write_meta(fp: DicomBytesIO, elements: Sequence[tuple[int, str, bytes]]) -> None:
    """Preamble, ``DICM`` and the (0002,eeee) group with its group length (0002,0000)."""
    body = bytearray()
    for tag, vr, value in elements:
        if len(value) % 2:
            value += b"\0" if vr in ("UI", "OB") else b" "
        body += element_header(tag, vr, len(value), implicit=False) + value
    fp.write(b"\0" * 128 + b"DICM")
    fp.write(element_header(0x00020000, "UL", 4, implicit=False) + struct.pack("<L", len(body)))
    fp.write(bytes(body))


def write_part10(ds: Dataset, meta: Sequence[tuple[int, str, bytes]], implicit: bool) -> bytes:
    """Part 10 bytes of ``ds`` (little endian, explicit or implicit VR) after ``meta``."""
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = implicit
    write_meta(fp, meta)
    write_dataset(fp, ds, implicit, ["ISO_IR 6"])
    return fp.getvalue()
