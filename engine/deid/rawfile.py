"""Find the top-level pixel data element of a Part 10 file, to copy it without decoding.

The header (everything before the element) goes through pydicom and the profile; the element
itself (Pixel Data (7FE0,0010), Float Pixel Data (7FE0,0008) or Double Float Pixel Data
(7FE0,0009): tag, VR, length and value, native or encapsulated) is copied as bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.dicom.walk import (
    DEFLATED,
    EXPLICIT_BIG,
    IMPLICIT_LITTLE,
    PIXEL_TAGS,
    Walker,
    read_meta,
)

_TRANSFER_SYNTAX = 0x00020010


@dataclass(frozen=True)
class PixelSplit:
    """Byte offsets: the pixel element is ``data[pixel_start:pixel_end]``.

    With no pixel data both are the end of the file. ``trailing`` counts top-level elements after
    the pixel data (dropped by the de-identifier).
    """

    pixel_start: int
    pixel_end: int
    trailing: int
    syntax: str
    implicit: bool
    little: bool


def split_pixels(data: bytes) -> PixelSplit | None:
    """Walk the meta and top-level elements; None for a deflated dataset (walk impossible).

    Raises :class:`~engine.dicom.errors.HeaderError` when the bytes are not whole Part 10.
    """
    pos, syntax = read_meta(data)
    if syntax == DEFLATED:
        return None
    implicit, little = syntax == IMPLICIT_LITTLE, syntax != EXPLICIT_BIG
    walker = Walker(data, little)
    size = len(data)
    while pos < size:
        tag, vr, length, start = walker.header(pos, implicit)
        end = walker.after_value(start, length, implicit or vr == b"UN")
        if tag in PIXEL_TAGS:
            trailing = 0
            rest = end
            while rest < size:
                rest = walker.skip(rest, implicit)
                trailing += 1
            return PixelSplit(pos, end, trailing, syntax, implicit, little)
        pos = end
    return PixelSplit(size, size, 0, syntax, implicit, little)
