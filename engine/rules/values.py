"""Attribute values as the rules see them, read from a pydicom ``Dataset``.

Every attribute value is normalised to one of these (``Value``):

- ``str``: one text value with its padding (spaces, NULs) removed. DS, IS, DA, TM and DT
  values stay text, as written in the file; numeric operators parse them (``"2.98"`` -> 2.98).
- ``int`` / ``float``: binary numbers (VR US, SS, UL, SL, FL, FD, UV, SV).
- ``tuple`` of the above: a multi-valued attribute, i.e. one whose dictionary VM is not 1
  (``ImageType`` VM 2-n, ``ScanningSequence`` VM 1-n) even when it holds one value; for private
  or unknown tags, any element holding more than one value. An empty element is ``()``.
- :class:`Opaque`: a sequence, a sequence item or binary data (OB, OW, ...): only ``exists`` and
  ``not_exists`` say anything about it.

An element that is present but empty (DICOM type 2) is ``""`` (or ``()`` when multi-valued).

Reading is fast for datasets read with ``dcmread(..., stop_before_pixels=True)``: elements still
in pydicom's raw form are decoded here directly for the common VRs when the text is ASCII under a
single-byte or UTF-8 character set, without converting them inside the dataset; anything else
(other character sets, sequences, private tags of implicit-VR files) goes through pydicom. Both
paths give the same normalised value; ``tests/test_rules.py`` checks that.
"""

from __future__ import annotations

import functools
import re
import struct
import warnings
from collections.abc import Iterable
from typing import Any, Final, cast

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag

__all__ = [
    "NOT_MEMOISABLE",
    "LookupTag",
    "Opaque",
    "Scalar",
    "Value",
    "ascii_safe",
    "element_value",
    "fingerprint",
    "normalise",
    "number",
    "show",
    "text",
]


class Opaque:
    """A value with no text or number: a sequence, a sequence item, or binary data.

    ``items`` holds the datasets of a sequence (``sequence`` True) or of one item.
    """

    __slots__ = ("items", "sequence", "what")

    def __init__(self, what: str, items: tuple[Dataset, ...] = (), sequence: bool = False) -> None:
        self.what = what
        self.items = items
        self.sequence = sequence

    def __repr__(self) -> str:
        return f"<{self.what}>"


class LookupTag(BaseTag):
    """A tag to look elements up with, equal to pydicom's keys exactly when the numbers are.

    pydicom keys a dataset's elements by ``BaseTag``, whose ``__eq__`` is Python code that a
    dict lookup by plain ``int`` must call on every hit. Python asks a subclass's own
    ``__eq__`` first, so this one, ``int.__eq__``, runs in C: the same answer, twice as fast.
    """

    __slots__ = ()
    __eq__ = int.__eq__
    __ne__ = int.__ne__
    __hash__ = int.__hash__


Scalar = str | int | float
Value = Scalar | tuple[Scalar, ...] | Opaque

#: Multi-valued text VRs: backslash separates values; padding on both sides is not significant.
_TEXT_MULTI: Final = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "PN", "SH", "TM", "UC", "UI"}
)
#: Single-valued text VRs: a backslash is an ordinary character; trailing padding is dropped.
_TEXT_SINGLE: Final = frozenset({"LT", "ST", "UT", "UR"})
#: Binary numeric VRs and their struct codes.
_BINARY: Final = {
    "US": "H",
    "SS": "h",
    "UL": "I",
    "SL": "i",
    "FL": "f",
    "FD": "d",
    "UV": "Q",
    "SV": "q",
}
#: Character sets under which ASCII bytes decode to the same text (the fast path's condition).
_ASCII_SAFE: Final = frozenset({b"", b"ISO_IR 6", b"ISO_IR 100", b"ISO_IR 192", b"ISO 2022 IR 6"})
_PAD: Final = " \x00"
_CHARSET_TAG: Final = LookupTag(0x00080005)
_NUMBER: Final = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?\Z")
_INTEGER: Final = re.compile(r"[+-]?\d+\Z")

Elements = dict[int, DataElement | RawDataElement]

#: ``fingerprint`` of an element whose value cannot be keyed cheaply (a converted sequence).
NOT_MEMOISABLE: Final = object()


# --------------------------------------------------------------------------- text and numbers


def text(value: Value) -> str | None:
    """The value as text: multi-valued ones joined with a backslash (as in the file).

    Binary numbers print as Python does (``3``, ``2.5``); opaque values have no text (None).
    """
    if type(value) is str:
        return value
    if isinstance(value, tuple):
        parts = [text(v) for v in value]
        return None if None in parts else "\\".join(p for p in parts if p is not None)
    if isinstance(value, Opaque):
        return None
    return str(value)


def number(value: Value) -> int | float | None:
    """The value as a number: binary numbers as they are, text that reads as a decimal number
    (DS, IS and the like; ``" 2.98"`` -> 2.98, ``"0012"`` -> 12) parsed; a multi-valued value
    only when it holds exactly one value. Anything else (``"050Y"``, ``"nan"``) is None.
    """
    if isinstance(value, str):
        if _INTEGER.match(value):
            return int(value)
        return float(value) if _NUMBER.match(value) else None
    if isinstance(value, tuple):
        return number(value[0]) if len(value) == 1 else None
    if isinstance(value, Opaque | bool):
        return None
    return value


def show(value: Value | None) -> str:
    """A value as printed by ``explain`` (to the local operator only; never logged)."""
    if value is None:
        return "(missing)"
    if isinstance(value, tuple):
        return "[" + ", ".join(show(v) for v in value) + "]"
    if isinstance(value, str):
        return repr(value)
    return repr(value) if isinstance(value, Opaque) else str(value)


# --------------------------------------------------------------------------- normalising


def _scalar(v: Any, vr: str | None) -> Scalar | Opaque:
    if isinstance(v, str):  # str, UID, and DS/IS/DA/... values kept as their text
        return v.strip(_PAD) if vr not in _TEXT_SINGLE else v.rstrip(_PAD)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return str(v).strip() if vr in ("DS", "IS") else v
    if isinstance(v, bytes | bytearray):
        if vr in (None, "UN"):
            return bytes(v).decode("latin-1").strip(_PAD)
        return Opaque(f"binary, {len(v)} bytes")
    if isinstance(v, Dataset):
        return Opaque("sequence item", (v,))
    return str(v).strip(_PAD)  # PersonName, DA/TM objects, tags


def normalise(values: Iterable[Any], multi: bool | None, vr: str | None = None) -> Value:
    """One element's values as a :data:`Value`.

    ``multi`` is True for attributes whose dictionary VM is not 1, False for VM 1, None when
    unknown (private tags). Whatever ``multi`` says, an element holding several values is a
    tuple. A single empty text value means an empty element.
    """
    out = [_scalar(v, vr) for v in values]
    if len(out) == 1 and out[0] == "":
        out = []
    opaque = [v for v in out if isinstance(v, Opaque)]
    if opaque:
        return opaque[0] if len(out) == 1 else Opaque(f"{len(out)} binary values")
    scalars = tuple(v for v in out if not isinstance(v, Opaque))
    if multi or len(scalars) > 1:
        return scalars
    return scalars[0] if scalars else ""


def _from_element(elem: DataElement, multi: bool | None) -> Value:
    value = elem.value
    vr = str(elem.VR) if elem.VR else None
    if isinstance(value, Sequence) or vr == "SQ":
        items = tuple(value) if value is not None else ()
        return Opaque(f"sequence of {len(items)} items", items, sequence=True)
    if value is None:
        return () if multi else ""
    if isinstance(value, MultiValue | list | tuple):
        return normalise(value, multi, vr)
    if vr == "UN" and isinstance(value, bytes):
        return normalise(value.decode("latin-1").split("\\"), multi, vr)
    return normalise([value], multi, vr)


@functools.cache
def _dictionary_vr(tag: int) -> str | None:
    """The VR of a public tag when it is one VR (not 'US or SS'), else None."""
    if tag >> 16 & 1:
        return None
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return None
    return None if " " in vr else vr


def _decode_raw(raw: RawDataElement, vr: str, multi: bool | None, ascii_ok: bool) -> Value | None:
    """The fast path for a raw element; None when pydicom must convert it.

    Gives what :func:`normalise` gives for the decoded values, written out for the common
    cases because it runs for every attribute of every instance not seen before.
    """
    data = raw[3]
    if not isinstance(data, bytes):
        return None
    if vr in _TEXT_MULTI or vr in _TEXT_SINGLE:
        if not (ascii_ok and data.isascii()):
            return None
        decoded = data.decode("ascii")
        if vr in _TEXT_MULTI and "\\" in decoded:
            return tuple([part.strip(_PAD) for part in decoded.split("\\")])
        decoded = decoded.strip(_PAD) if vr in _TEXT_MULTI else decoded.rstrip(_PAD)
        if multi:
            return (decoded,) if decoded else ()
        return decoded
    code = _BINARY.get(vr)
    if code is not None:
        size = struct.calcsize(code)
        if len(data) % size:
            return None
        order = "<" if raw[6] else ">"
        return normalise(struct.unpack(f"{order}{len(data) // size}{code}", data), multi, vr)
    return None


def ascii_safe(ds: Dataset, inherited: bool = True) -> bool:
    """Whether ASCII text in ``ds`` decodes the same under its Specific Character Set
    (0008,0005): none, ISO_IR 6, ISO_IR 100 or ISO_IR 192. A sequence item without its own
    (0008,0005) inherits its parent's answer (``inherited``).
    """
    elem = cast(Elements, ds._dict).get(_CHARSET_TAG)
    if elem is None:
        return inherited
    if isinstance(elem, RawDataElement):
        return isinstance(elem.value, bytes) and elem.value.strip(b" \x00") in _ASCII_SAFE
    value = elem.value
    if isinstance(value, MultiValue | list):
        return False
    return str(value or "").strip().encode() in _ASCII_SAFE


def _convert(ds: Dataset, tag: int, multi: bool | None) -> Value:
    """pydicom's conversion, with its warnings (which may quote values) kept out of logs."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _from_element(ds[tag], multi)
    except Exception:  # a value pydicom cannot decode is present but has no usable value
        return Opaque("undecodable value")


def element_value(ds: Dataset, tag: int, multi: bool | None, ascii_ok: bool) -> Value | None:
    """The normalised value of ``tag`` in ``ds`` (None when absent).

    ``multi``: see :func:`normalise`; ``ascii_ok``: :func:`ascii_safe` of ``ds``. Group 0002
    (file meta) is read from ``ds.file_meta`` when not in ``ds``. The dataset is not changed,
    except that pydicom converts an element in place when the fast path does not apply.
    """
    elem = cast(Elements, ds._dict).get(tag)
    if elem is None:
        meta = getattr(ds, "file_meta", None) if tag >> 16 == 2 else None
        if meta is None or tag not in meta:
            return None
        return _convert(meta, tag, multi)
    if isinstance(elem, RawDataElement):
        vr = elem.VR or _dictionary_vr(tag)
        if vr is not None:
            fast = _decode_raw(elem, str(vr), multi, ascii_ok)
            if fast is not None:
                return fast
        return _convert(ds, tag, multi)
    return _from_element(elem, multi)


def fingerprint(ds: Dataset, tag: int) -> object:
    """A hashable stand-in for the value of ``tag``: equal fingerprints mean equal values.

    Raw elements are keyed by their bytes and encoding (no decoding); converted ones by their
    normalised value. A converted sequence gives :data:`NOT_MEMOISABLE`.
    """
    elem = cast(Elements, ds._dict).get(tag)
    if elem is None:
        if tag >> 16 == 2 and getattr(ds, "file_meta", None) is not None:
            meta = ds.file_meta
            return fingerprint(meta, tag) if tag in meta else ()
        return ()
    if isinstance(elem, RawDataElement):
        if elem.value is None:
            return NOT_MEMOISABLE
        return (elem.VR, elem.value, elem.is_little_endian)
    if type(elem.value) is str:  # (0008,0005) and the like, converted by pydicom on reading
        return ("value", str(elem.VR), elem.value.strip(_PAD))
    value = _from_element(elem, None)
    if isinstance(value, Opaque):
        return NOT_MEMOISABLE if value.items else ("opaque", value.what)
    return ("value", str(elem.VR), value)
