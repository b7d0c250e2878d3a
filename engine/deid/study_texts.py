"""The raw text elements of an original, to tell whether a file brings a new identifying value.

The verification gate (:mod:`engine.deid.export`) keeps one
:class:`~engine.deid.verify.IdentifyingValues` per study and adds each file's values to it.
Collecting them walks and decodes the whole header (milliseconds); comparing the raw values of
the elements they may come from costs a fraction of that, and in the common case (every file of
a series with the same names, IDs and dates) finds nothing new, so nothing is collected.

What is compared is a superset of what is collected: every element at any level (file meta and
sequence items too) except those whose VR never holds a collected value (numbers, times, binary
data) and UIDs, which the gate searches for file by file.
"""

from __future__ import annotations

from pydicom.dataset import Dataset

from engine.dicom.errors import HeaderError
from engine.dicom.values import dictionary_vr
from engine.dicom.walk import (
    DEFLATED,
    EXPLICIT_BIG,
    IMPLICIT_LITTLE,
    ITEM_END_TAG,
    ITEM_TAG,
    MAX_DEPTH,
    PIXEL_TAGS,
    SEQ_END_TAG,
    UNDEFINED_LENGTH,
    Walker,
    read_meta,
)

#: (tag, value as read): bytes from the walk, text from pydicom.
Texts = set[tuple[int, object]]

#: VRs no identifying value is collected from: numbers, times, binary data, UIDs.
NOT_COLLECTED = frozenset((
    "UI", "TM", "DS", "IS", "US", "SS", "UL", "SL", "FL", "FD", "OB", "OW", "OF", "OD", "OL",
    "OV", "AT", "SV", "UV",
))  # fmt: skip


class _TooDeep(Exception):
    pass


def raw_texts(header: bytes) -> Texts | None:
    """The compared elements of a Part 10 header (bytes before the pixel data), read without
    decoding; None when the walk cannot read it (deflated, malformed: use :func:`dataset_texts`)."""
    try:
        pos, syntax = read_meta(header)
        if syntax == DEFLATED:
            return None
        out: Texts = set()
        _elements(Walker(header, little=True), 132, pos, False, out, 0)
        walker = Walker(header, little=syntax != EXPLICIT_BIG)
        _elements(walker, pos, len(header), syntax == IMPLICIT_LITTLE, out, 0)
    except (HeaderError, _TooDeep, UnicodeDecodeError):
        return None
    return out


def _elements(walker: Walker, pos: int, end: int, implicit: bool, out: Texts, depth: int) -> int:
    """Walk the elements from ``pos`` to ``end`` (or to an Item Delimitation Item); the
    position after them."""
    data = walker.data
    while pos < end:
        tag, vr_bytes, length, start = walker.header(pos, implicit)
        if tag == ITEM_END_TAG:
            return start
        if tag in PIXEL_TAGS:
            return end
        vr = vr_bytes.decode("ascii") if vr_bytes else dictionary_vr(tag)
        if vr == "SQ" or length == UNDEFINED_LENGTH:
            pos = _items(walker, start, length, implicit or vr == "UN", out, depth + 1)
            continue
        pos = start + length
        if pos > len(data):
            raise HeaderError("unparseable", "truncated")
        if vr not in NOT_COLLECTED:
            out.add((tag, data[start:pos]))
    return pos


def _items(walker: Walker, pos: int, length: int, implicit: bool, out: Texts, depth: int) -> int:
    """Walk the items of a sequence whose value starts at ``pos``; the position after it."""
    if depth > MAX_DEPTH:
        raise _TooDeep()
    end = len(walker.data) if length == UNDEFINED_LENGTH else pos + length
    while pos < end:
        tag = walker.tag(pos)
        item_length = walker.header(pos, implicit=True)[2]
        pos += 8
        if tag == SEQ_END_TAG:
            return pos
        if tag != ITEM_TAG:
            raise HeaderError("unparseable", "malformed item")
        if item_length == UNDEFINED_LENGTH:
            pos = _elements(walker, pos, len(walker.data), implicit, out, depth)
        else:
            pos = _elements(walker, pos, pos + item_length, implicit, out, depth)
    return end


def dataset_texts(ds: Dataset) -> Texts:
    """The compared elements of a pydicom dataset and its file meta (values as pydicom holds
    them: a file compared this way and one walked never look alike, which costs only time)."""
    out: Texts = set()
    stack = [ds]
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        stack.append(meta)
    while stack:
        item = stack.pop()
        for tag, elem in item.items():
            vr = elem.VR or dictionary_vr(int(tag))
            if vr == "SQ":
                stack.extend(item[tag].value or ())
            elif vr not in NOT_COLLECTED:
                value = elem.value
                out.add((int(tag), value if isinstance(value, bytes) else str(value)))
    return out

