"""An archived instance's header as a pydicom Dataset, from one walk over its first bytes.

The workflow reads the header of every received instance to label and route it, in the same
process (and under the same interpreter lock) as the receiver. ``pydicom.dcmread(path,
stop_before_pixels=True)`` costs ~1.5 ms of Python per instance here, as much as receiving it;
this module builds the same dataset in a fraction of that: the element walk of
:mod:`engine.dicom.walk` finds each top-level element, and each becomes the
:class:`~pydicom.dataelem.RawDataElement` pydicom's own reader would have made, converted lazily
by pydicom on first access exactly as after ``dcmread``. Sequences of undefined length are
handed over as their item bytes with the undefined length kept, which pydicom parses on access.

Anything off the common road (big endian, deflated, a command set or items at the top level, an
unknown VR, an undefined length that is not a sequence, a file that does not walk) is read with
``dcmread`` instead, so the result is always what pydicom would give.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataelem import DataElement, RawDataElement, empty_value_for_VR
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.tag import BaseTag
from pydicom.valuerep import VR

import engine.dicom.pydicom_setup  # noqa: F401  (pydicom's settings: no value in any log)
from engine.dicom.errors import HeaderError
from engine.dicom.values import dictionary_vr
from engine.dicom.walk import (
    _LONG_VRS,
    DEFLATED,
    EXPLICIT_BIG,
    IMPLICIT_LITTLE,
    PIXEL_TAGS,
    UNDEFINED_LENGTH,
    Walker,
)

__all__ = ["DECODING_TAGS", "read_header_dataset"]

#: Bytes read first: a header is rarely longer; a longer one costs one more read.
_FIRST_READ = 1 << 16
_VR_NAMES = {vr.value.encode("ascii"): vr.value for vr in VR}  # b"CS" -> "CS"
_META_START = 132  # 128-byte preamble + b"DICM"

#: What pydicom consults to decode other elements, kept in every selective read so each kept
#: element reads as in the whole header: Specific Character Set (0008,0005) for text; Bits
#: Allocated (0028,0100), Pixel Representation (0028,0103), LUT Descriptor (0028,3002) and
#: Waveform Bits Allocated (5400,1004) for the VR of 'US or SS' / 'OB or OW' elements.
DECODING_TAGS: frozenset[int] = frozenset(
    (0x00080005, 0x00280100, 0x00280103, 0x00283002, 0x54001004)
)


class _NotCommon(Exception):
    """The file needs pydicom's own reader."""


class _CutShort(_NotCommon):
    """The bytes end inside the header: maybe only the first read was too short."""


def read_header_dataset(path: Path | str, tags: Collection[int] | None = None) -> Dataset:
    """``pydicom.dcmread(path, stop_before_pixels=True)``, built faster for common files.

    With ``tags`` (top-level tags, as ints), the dataset of a common file keeps only those
    elements, those of :data:`DECODING_TAGS` and the file meta group; each kept element reads
    exactly as in the whole header, and the rest (most of a header) costs only the walk over
    it. The result is then a plain Dataset with ``file_meta``, not a FileDataset. A file off
    the common road is read whole with ``dcmread``, which keeps every element anyway.
    """
    keep = None if tags is None else frozenset(tags) | DECODING_TAGS
    with open(path, "rb") as fp:
        data = fp.read(_FIRST_READ)
        try:
            return _build(path, data, keep)
        except _CutShort:
            if len(data) == _FIRST_READ:  # the header goes on: read the rest, once
                try:
                    return _build(path, data + fp.read(), keep)
                except _NotCommon:
                    pass
        except _NotCommon:
            pass
    return pydicom.dcmread(path, stop_before_pixels=True)


def _build(path: Path | str, data: bytes, keep: frozenset[int] | None = None) -> Dataset:
    if data[128:132] != b"DICM":
        raise _NotCommon
    try:
        meta, pos = _elements(data, _META_START, implicit=False, meta=True)
        syntax_element = meta.get(BaseTag(0x00020010))
        if syntax_element is None or not syntax_element.value:
            raise _NotCommon
        syntax = syntax_element.value.decode("ascii", "replace").strip("\0 ")
        if syntax in (EXPLICIT_BIG, DEFLATED):
            raise _NotCommon
        implicit = syntax == IMPLICIT_LITTLE
        elements, _ = _elements(data, pos, implicit=implicit, meta=False, keep=keep)
    except HeaderError as exc:  # the walk ran off the end of the bytes
        raise _CutShort from exc
    dataset = Dataset(elements)
    if keep is not None:  # FileDataset's set-up (a stat, many attributes) is half the cost
        dataset.file_meta = FileMetaDataset(meta)
        dataset.set_original_encoding(implicit, True, dataset._character_set)
        return dataset
    ds = FileDataset(
        os.fspath(path), dataset, data[:128], FileMetaDataset(Dataset(meta)), implicit, True
    )
    ds.set_original_encoding(implicit, True, dataset._character_set)
    return ds


def _elements(
    data: bytes, pos: int, *, implicit: bool, meta: bool, keep: frozenset[int] | None = None
) -> tuple[dict[BaseTag, DataElement | RawDataElement], int]:
    """Raw top-level elements from ``pos``: the file meta group (``meta``), or the dataset up
    to its pixel data (only the tags in ``keep``, when given: the walk still checks every
    element as before); and where they end."""
    walker = Walker(data, little=True)
    size = walker.size
    found: dict[BaseTag, DataElement | RawDataElement] = {}
    # walker.header inlined for the common element (it runs for every top-level element of
    # every instance the workflow reads): a method call was a third of the loop's cost.
    unpack = (walker._implicit if implicit else walker._explicit).unpack_from
    u32 = walker._u32.unpack_from
    raw_vr: bytes | None = None
    while pos < size:
        if meta and data[pos : pos + 2] != b"\x02\x00":
            break
        if pos + 8 > size:
            raise HeaderError("unparseable", "truncated: the file ends inside an element")
        if implicit:
            group, elem, length = unpack(data, pos)
            tag, start = group << 16 | elem, pos + 8
        else:
            group, elem, raw_vr, length = unpack(data, pos)
            if group == 0xFFFE:  # an item or delimiter at the top level: not common
                raise _NotCommon
            tag, start = group << 16 | elem, pos + 8
            if raw_vr in _LONG_VRS:
                if pos + 12 > size:
                    raise HeaderError("unparseable", "truncated: the file ends inside an element")
                length, start = u32(data, pos + 8)[0], pos + 12
        if not meta and tag in PIXEL_TAGS:
            break
        group = tag >> 16
        if group == 0x0000 or group == 0xFFFE or (group == 0x0002) != meta:
            raise _NotCommon
        if raw_vr is None:
            vr = None
        else:
            vr = _VR_NAMES.get(raw_vr)
            if vr is None:
                raise _NotCommon
        if length == UNDEFINED_LENGTH:
            if (vr or dictionary_vr(tag)) != "SQ":
                raise _NotCommon
            end = walker.items(start, implicit)
            value: Any = data[start : end - 8]  # the items, without the delimiter
        else:
            end = start + length
            if end > size:
                raise _CutShort
            if keep is not None and tag not in keep:
                pos = end  # not asked for: walked over, its value never copied
                continue
            value = data[start:end] if length else empty_value_for_VR(vr, raw=True)
        if keep is None or tag in keep:
            key = BaseTag(tag)
            found[key] = RawDataElement(key, vr, length, value, start, implicit, True)
        pos = end
    return found, pos
