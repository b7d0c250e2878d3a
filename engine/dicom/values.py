"""Decode raw element values into the Python values pydicom would give, for header fields.

Covers the VRs the engine indexes: text (with the dataset's Specific Character Set (0008,0005),
through :mod:`pydicom.charset`), decimal and integer strings (DS, IS) and binary numbers (US, UL,
SS, SL, FL, FD, UV, SV). Multiple values become lists; a single value stays a scalar. Anything
else (OB, SQ, AT...) is returned as ``bytes``, which the index does not keep.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Mapping
from typing import Any

from pydicom.charset import convert_encodings, decode_bytes
from pydicom.datadict import dictionary_VR
from pydicom.valuerep import PN_DELIMS, TEXT_VR_DELIMS

import engine.dicom.pydicom_setup  # noqa: F401  (pydicom's settings: no value in any log)
from engine.dicom.walk import RawElement, Scan

SPECIFIC_CHARACTER_SET = 0x00080005
_BINARY = {"US": "H", "SS": "h", "UL": "L", "SL": "l", "FL": "f", "FD": "d", "UV": "Q", "SV": "q"}
#: Text VRs whose bytes follow the Specific Character Set (PS3.5 6.1.2.3); others are ASCII.
_CHARSET_VRS = frozenset(("SH", "LO", "ST", "LT", "UC", "UT", "PN"))
#: Text VRs that hold one value: a backslash in them is text, not a separator.
_SINGLE_VRS = frozenset(("LT", "ST", "UT", "UR"))
#: VRs returned as their raw bytes.
_OPAQUE_VRS = frozenset(("OB", "OW", "OD", "OF", "OL", "OV", "SQ", "AT", "UN"))


@functools.lru_cache(maxsize=4096)
def dictionary_vr(tag: int) -> str:
    """The VR PS3.6 gives ``tag`` (the first one where it allows several); 'UN' if unknown."""
    try:
        return str(dictionary_VR(tag)).split(" or ")[0]
    except KeyError:
        return "UN"


class ValueDecoder:
    """Decodes the raw top-level values of one dataset."""

    def __init__(self, little: bool, charset: RawElement | None) -> None:
        self.order = "<" if little else ">"
        terms: list[str] = []
        if charset is not None:
            terms = [t.strip() for t in charset.value.decode("ascii", "replace").split("\\")]
        self.encodings = convert_encodings(terms or None)

    def decode(self, tag: int, raw: RawElement) -> Any:
        vr, value = raw
        if vr is None or vr == "UN":
            vr = dictionary_vr(tag)
        fmt = _BINARY.get(vr)
        if fmt is not None:
            count = len(value) // struct.calcsize(fmt)
            numbers = struct.unpack_from(f"{self.order}{count}{fmt}", value)
            return numbers[0] if count == 1 else list(numbers) if count else ""
        if vr in _OPAQUE_VRS:
            return value
        text = self._text(vr, value)
        if vr in _SINGLE_VRS:
            return text.rstrip(" \0")
        if "\\" not in text:  # one value, the common case: no list to build
            return _one_value(vr, text)
        return [_one_value(vr, part) for part in text.split("\\")]

    def _text(self, vr: str, value: bytes) -> str:
        if vr not in _CHARSET_VRS:
            return value.decode("ascii", "replace")
        if len(self.encodings) == 1:
            return value.decode(self.encodings[0], "replace")
        if vr == "PN":  # each of a name's '='-separated groups starts in the default set
            groups = value.split(b"=")
            return "=".join(decode_bytes(g, self.encodings, PN_DELIMS) for g in groups)
        return decode_bytes(value, self.encodings, TEXT_VR_DELIMS)


def decode_fields(found: Scan, keywords: Mapping[int, str]) -> dict[str, Any]:
    """The scanned top-level elements that ``keywords`` names (tag -> keyword), by keyword,
    decoded with the dataset's own Specific Character Set."""
    decoder = ValueDecoder(found.little, found.elements.get(SPECIFIC_CHARACTER_SET))
    return {
        keywords[tag]: decoder.decode(tag, raw)
        for tag, raw in found.elements.items()
        if tag in keywords
    }


def _one_value(vr: str, text: str) -> Any:
    """One value of a multi-valued text VR: padding stripped (a name keeps leading spaces),
    DS and IS as numbers."""
    if vr == "PN":
        return text.rstrip(" \0")
    text = text.strip(" \0")
    if vr == "DS":
        return _number(text, float)
    if vr == "IS":
        return _number(text, _integer)
    return text


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        number = float(text)  # '12.0' is a valid IS in the wild; '12.5' is not
        if number != int(number):
            raise
        return int(number)


def _number(text: str, kind: Any) -> Any:
    """``kind(text)``, or the text itself when it is empty or not a number (kept, not fatal)."""
    if not text:
        return ""
    try:
        return kind(text)
    except ValueError:
        return text
