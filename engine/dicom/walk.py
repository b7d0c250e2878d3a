"""Walk a Part 10 file's element headers and declared lengths, without pydicom.

One pass does two jobs on the receive path:

- it proves the bytes are whole: pydicom reads a file cut short inside a value or header as a
  shorter dataset without complaint, so every declared length is walked to the end of the bytes,
  undefined lengths (sequences, encapsulated pixel data) item by item;
- it keeps the raw value of each top-level element the caller asks for, so the few dozen header
  fields the engine indexes are decoded without building a pydicom Dataset (which costs about
  1 ms per instance here, more than the rest of the walk).

Values are decoded by :mod:`engine.dicom.values`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple

from engine.dicom.errors import HeaderError

#: VRs whose explicit-VR header has 2 reserved bytes and a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
#: The length of a sequence, item or encapsulated pixel data closed by a delimiter.
UNDEFINED_LENGTH = 0xFFFFFFFF
#: Pixel Data, Float Pixel Data, Double Float Pixel Data.
PIXEL_TAGS = frozenset((0x7FE00010, 0x7FE00008, 0x7FE00009))
#: Item, Item Delimitation Item and Sequence Delimitation Item tags (PS3.5 7.5).
ITEM_TAG = 0xFFFEE000
ITEM_END_TAG = 0xFFFEE00D
SEQ_END_TAG = 0xFFFEE0DD
#: Undefined-length sequences nested deeper than this are refused as ``unparseable``: real
#: objects (SR content trees included) stay far below, and pydicom, which reads the archived
#: files later, recurses several frames per level.
MAX_DEPTH = 64

IMPLICIT_LITTLE = "1.2.840.10008.1.2"
EXPLICIT_BIG = "1.2.840.10008.1.2.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
_TRANSFER_SYNTAX_TAG = 0x00020010


class RawElement(NamedTuple):
    """One top-level element as found: its VR (explicit, or None when implicit) and value bytes.

    A named tuple, not a dataclass: a few dozen are made per received instance, and a frozen
    dataclass costs several times more to construct.
    """

    vr: str | None
    value: bytes


@dataclass(frozen=True)
class Scan:
    """What one walk found.

    ``transfer_syntax`` is the file meta's (0002,0010), stripped; ``elements`` maps each wanted
    tag (as ``group << 16 | element``) present at the top level to its raw element.
    """

    transfer_syntax: str
    implicit: bool
    little: bool
    has_pixels: bool
    elements: dict[int, RawElement]


def _truncated() -> HeaderError:
    return HeaderError("unparseable", "truncated: the file ends inside an element")


class Walker:
    """Element-by-element walk over ``data`` in one encoding."""

    def __init__(self, data: bytes, little: bool) -> None:
        self.data = data
        self.size = len(data)
        order = "<" if little else ">"
        self._tag = struct.Struct(order + "HH")
        self._implicit = struct.Struct(order + "HHL")  # tag, 4-byte length
        self._explicit = struct.Struct(order + "HH2sH")  # tag, VR, 2-byte length
        self._u32 = struct.Struct(order + "L")

    def tag(self, pos: int) -> int:
        if pos + 8 > self.size:
            raise _truncated()
        group, elem = self._tag.unpack_from(self.data, pos)
        return int(group << 16 | elem)

    def header(self, pos: int, implicit: bool) -> tuple[int, bytes | None, int, int]:
        """(tag, explicit VR or None, value length, value offset) of the element at ``pos``."""
        if pos + 8 > self.size:
            raise _truncated()
        if implicit:
            group, elem, length = self._implicit.unpack_from(self.data, pos)
            return group << 16 | elem, None, length, pos + 8
        group, elem, vr, length = self._explicit.unpack_from(self.data, pos)
        if group == 0xFFFE:  # item and delimiters have no VR, even in explicit VR
            return self.header(pos, implicit=True)
        if vr in _LONG_VRS:
            if pos + 12 > self.size:
                raise _truncated()
            return group << 16 | elem, vr, self._u32.unpack_from(self.data, pos + 8)[0], pos + 12
        return group << 16 | elem, vr, length, pos + 8

    def skip(self, pos: int, implicit: bool) -> int:
        """Position after the element that starts at ``pos``."""
        _, vr, length, pos = self.header(pos, implicit)
        return self.after_value(pos, length, implicit or vr == b"UN")

    def after_value(self, pos: int, length: int, implicit: bool) -> int:
        if length == UNDEFINED_LENGTH:
            # An explicit 'UN' of undefined length holds implicit VR little endian content.
            return self.items(pos, implicit)
        end = pos + length
        if end > self.size:
            raise _truncated()
        return end

    def elements(self, pos: int, implicit: bool) -> int:
        """Walk elements from ``pos`` to the end of the data."""
        while pos < self.size:
            pos = self.skip(pos, implicit)
        return pos

    def items(self, pos: int, implicit: bool) -> int:
        """Walk the items of an undefined-length element up to its Sequence Delimitation Item.

        Nested undefined-length sequences and items are walked with a stack, not by recursion,
        and at most :data:`MAX_DEPTH` sequences deep: hostile nesting costs a quarantine, never
        a ``RecursionError``. Items of defined length are skipped whole.
        """
        size = self.size
        u32 = self._u32.unpack_from
        # One entry per open container: True for a sequence (items expected), False for an
        # item (elements expected), and the implicit flag of its content.
        stack: list[tuple[bool, bool]] = [(True, implicit)]
        while stack:
            in_sequence, implicit = stack[-1]
            if pos + 8 > size:
                raise HeaderError("unparseable", "truncated: the file ends inside a sequence")
            tag = self.tag(pos)
            if in_sequence:
                length = u32(self.data, pos + 4)[0]
                pos += 8
                if tag == SEQ_END_TAG:
                    stack.pop()
                elif tag != ITEM_TAG:
                    raise HeaderError(
                        "unparseable", "malformed item in an undefined-length element"
                    )
                elif length == UNDEFINED_LENGTH:
                    stack.append((False, implicit))
                elif pos + length > size:
                    raise _truncated()
                else:
                    pos += length
            elif tag == ITEM_END_TAG:
                pos += 8
                stack.pop()
            else:
                _, vr, length, start = self.header(pos, implicit)
                if length == UNDEFINED_LENGTH:
                    if len(stack) >= 2 * MAX_DEPTH:
                        raise HeaderError(
                            "unparseable", f"sequences nested deeper than {MAX_DEPTH} levels"
                        )
                    stack.append((True, implicit or vr == b"UN"))
                    pos = start
                else:
                    pos = start + length
                    if pos > size:
                        raise _truncated()
        return pos


def read_meta(data: bytes) -> tuple[int, str]:
    """(offset of the first dataset element, transfer syntax UID) after preamble and meta.

    The meta group (always explicit VR little endian) is walked rather than trusting its group
    length, which some writers get wrong.
    """
    if data[128:132] != b"DICM":
        raise HeaderError("unparseable", "not a DICOM Part 10 file (no DICM prefix)")
    walker = Walker(data, little=True)
    pos, syntax = 132, ""
    while pos + 2 <= len(data) and data[pos : pos + 2] == b"\x02\x00":
        tag, _, length, start = walker.header(pos, implicit=False)
        pos = walker.after_value(start, length, implicit=False)
        if tag == _TRANSFER_SYNTAX_TAG:
            syntax = data[start:pos].decode("ascii", "replace").strip("\0 ")
    return pos, syntax


def scan(data: bytes, wanted: frozenset[int]) -> Scan:
    """Walk ``data`` (preamble, meta, dataset) to its last byte, keeping ``wanted`` elements.

    Raises :class:`HeaderError` when the bytes are not Part 10 or any length overruns the end.
    A deflated dataset cannot be walked: it is returned with no elements for the caller to read
    another way.
    """
    pos, syntax = read_meta(data)
    implicit, little = syntax == IMPLICIT_LITTLE, syntax != EXPLICIT_BIG
    if not syntax:
        raise HeaderError("unparseable", "file meta has no Transfer Syntax UID")
    if syntax == DEFLATED:
        return Scan(syntax, False, True, False, {})
    walker = Walker(data, little)
    found: dict[int, RawElement] = {}
    has_pixels = False
    # The loop below is walker.header + walker.after_value inlined: it runs for every top-level
    # element of every received instance, and method calls were half its cost.
    size = walker.size
    unpack = (walker._implicit if implicit else walker._explicit).unpack_from
    u32 = walker._u32.unpack_from
    vr: bytes | None = None
    while pos < size:
        if pos + 8 > size:
            raise _truncated()
        if implicit:
            group, elem, length = unpack(data, pos)
            start = pos + 8
        else:
            group, elem, vr, length = unpack(data, pos)
            if group == 0xFFFE:  # item or delimiter at top level: no VR even in explicit VR
                _, vr, length, start = walker.header(pos, implicit=True)
            elif vr in _LONG_VRS:
                if pos + 12 > size:
                    raise _truncated()
                length = u32(data, pos + 8)[0]
                start = pos + 12
            else:
                start = pos + 8
        tag = group << 16 | elem
        if length == UNDEFINED_LENGTH:
            pos = walker.items(start, implicit or vr == b"UN")
        else:
            pos = start + length
            if pos > size:
                raise _truncated()
            if tag in wanted:
                found[tag] = RawElement(
                    vr.decode("ascii", "replace") if vr else None, data[start:pos]
                )
        if tag in PIXEL_TAGS:
            has_pixels = True
    return Scan(syntax, implicit, little, has_pixels, found)


def check_complete(data: bytes, implicit: bool, little: bool) -> bool:
    """Walk the dataset in a known encoding; return whether it has top-level pixel data.

    For files whose transfer syntax does not match their encoding (pydicom detects that): the
    caller passes the encoding pydicom found.
    """
    pos, _ = read_meta(data)
    walker = Walker(data, little)
    has_pixels = False
    while pos < walker.size:
        has_pixels = has_pixels or walker.tag(pos) in PIXEL_TAGS
        pos = walker.skip(pos, implicit)
    return has_pixels
