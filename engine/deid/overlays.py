"""Overlays drawn inside Pixel Data: the retired embedded encoding, and bits above Bits Stored.

Before DICOM 2004 an overlay could live in the unused high bits of Pixel Data (7FE0,0010): Overlay
Bits Allocated (60xx,0100) equal to Bits Allocated (0028,0100) and Overlay Bit Position
(60xx,0102) naming the bit plane, with no Overlay Data (60xx,3000). Devices drew names and
annotations there. Removing the 60xx group leaves the drawing in the pixels, and any bit outside
the stored ones (Bits Stored (0028,0101) ending at High Bit (0028,0102)) can carry it too.

:func:`clear_unused_bits` rewrites native pixel data so that only the stored bits are left:
bits below them are cleared, bits above them are cleared (unsigned) or copies of the sign bit
(Pixel Representation (0028,0103) 1), and, when the profile removes overlays, the planes an
embedded overlay names are cleared even inside the stored bits. When the profile keeps overlays
(``clean_graphics``), the named planes are kept and the other unused bits are still cleared.
Compressed pixel data with an embedded overlay raises :class:`EmbeddedOverlay` (the file is
held): its planes cannot be cleared without decoding and re-encoding.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from engine.dicom.errors import HeaderError
from engine.dicom.walk import EXPLICIT_BIG, RawElement, Scan, scan

__all__ = [
    "WANTED",
    "EmbeddedOverlay",
    "PixelBits",
    "bits_of",
    "clear_unused_bits",
    "dataset_bits",
    "pixel_bits",
]

_BITS_ALLOCATED, _BITS_STORED, _HIGH_BIT, _REPRESENTATION = (
    0x00280100,
    0x00280101,
    0x00280102,
    0x00280103,
)
_OVERLAY_GROUPS = tuple(range(0x6000, 0x6020, 2))
#: Overlay Bits Allocated (60xx,0100), Overlay Bit Position (60xx,0102), Overlay Data (60xx,3000).
_OVERLAY_TAGS = frozenset(
    (group << 16) | element for group in _OVERLAY_GROUPS for element in (0x0100, 0x0102, 0x3000)
)
#: The elements :func:`bits_of` reads.
WANTED = frozenset((_BITS_ALLOCATED, _BITS_STORED, _HIGH_BIT, _REPRESENTATION)) | _OVERLAY_TAGS


class EmbeddedOverlay(ValueError):
    """An overlay embedded in pixel data that cannot be cleared (compressed frames)."""


@dataclass(frozen=True)
class PixelBits:
    """Bits Allocated, Bits Stored, High Bit, Pixel Representation (0028,0100-0103), the bit
    positions of overlays embedded in Pixel Data (60xx,0102), and the byte order."""

    allocated: int
    stored: int
    high_bit: int
    signed: bool
    embedded_planes: tuple[int, ...]
    little: bool = True

    @property
    def stored_mask(self) -> int:
        """The bits of a pixel cell that hold the image."""
        low = self.high_bit - self.stored + 1
        return ((1 << self.stored) - 1) << max(low, 0)

    def needs_clearing(self) -> bool:
        """Whether any bit of a cell can be outside the image (or an embedded overlay's)."""
        return self.allocated in (8, 16, 32) and (
            self.stored < self.allocated or bool(self.embedded_planes)
        )


def _us(element: RawElement | None, little: bool) -> int | None:
    if element is None or len(element.value) < 2:
        return None
    return int(struct.unpack("<H" if little else ">H", element.value[:2])[0])


def pixel_bits(data: bytes) -> PixelBits | None:
    """The :class:`PixelBits` of a Part 10 file's top level (None: no usable pixel module)."""
    try:
        found = scan(data, WANTED)
    except HeaderError:
        return None
    return bits_of(found)


def bits_of(found: Scan) -> PixelBits | None:
    """:func:`pixel_bits` from a walk that kept at least :data:`WANTED`."""
    little = found.transfer_syntax != EXPLICIT_BIG
    elements = found.elements
    allocated = _us(elements.get(_BITS_ALLOCATED), little)
    stored = _us(elements.get(_BITS_STORED), little) or allocated
    if not allocated or not stored or stored > allocated:
        return None
    high_bit = _us(elements.get(_HIGH_BIT), little)
    high_bit = stored - 1 if high_bit is None or high_bit >= allocated else high_bit
    planes = []
    for group in _OVERLAY_GROUPS:
        position = _us(elements.get((group << 16) | 0x0102), little)
        bits = _us(elements.get((group << 16) | 0x0100), little)
        has_data = (group << 16) | 0x3000 in elements
        if position is not None and (not has_data or (bits or 1) > 1) and position < allocated:
            planes.append(position)
    signed = _us(elements.get(_REPRESENTATION), little) == 1
    return PixelBits(allocated, stored, high_bit, signed, tuple(sorted(set(planes))), little)


def dataset_bits(ds: Dataset) -> PixelBits | None:
    """:func:`pixel_bits` of a pydicom Dataset (a deflated file, read whole)."""
    allocated = int(ds.get("BitsAllocated") or 0)
    stored = int(ds.get("BitsStored") or allocated)
    if not allocated or not stored or stored > allocated:
        return None
    high_bit = ds.get("HighBit")
    high = stored - 1 if high_bit is None or int(high_bit) >= allocated else int(high_bit)
    planes = []
    for group in _OVERLAY_GROUPS:
        position = ds.get((group << 16) | 0x0102)
        bits = ds.get((group << 16) | 0x0100)
        has_data = (group << 16) | 0x3000 in ds
        if position is None or position.value is None or int(position.value) >= allocated:
            continue
        if not has_data or int(bits.value if bits is not None and bits.value else 1) > 1:
            planes.append(int(position.value))
    signed = int(ds.get("PixelRepresentation") or 0) == 1
    return PixelBits(allocated, stored, high, signed, tuple(sorted(set(planes))))


def clear_unused_bits(
    value: bytes | memoryview, bits: PixelBits, *, remove_overlays: bool = True
) -> bytes | None:
    """Native Pixel Data ``value`` with only the image's bits set (see the module); None when
    no cell had any other bit set (the caller keeps the bytes it has)."""
    width = bits.allocated // 8
    usable = len(value) - len(value) % width
    dtype = np.dtype(f"{'<' if bits.little else '>'}u{width}")
    planes = sum(1 << plane for plane in bits.embedded_planes)
    keep = bits.stored_mask & ~planes if remove_overlays else bits.stored_mask
    full = (1 << bits.allocated) - 1
    if not bits.signed and (remove_overlays or not planes) and _nothing_outside(
        value, full & ~keep, width, bits.little
    ):
        return None  # the common case: a clean image costs one pass over 64-bit words
    cells = np.frombuffer(value, dtype=dtype, count=usable // width)
    above = full & ~((1 << (bits.high_bit + 1)) - 1)
    new = cells & np.array(keep, dtype=dtype)
    if bits.signed and above:
        sign = ((cells >> bits.high_bit) & 1).astype(dtype)
        new |= sign * np.array(above, dtype=dtype)
    if planes and not remove_overlays:
        kept = np.array(planes, dtype=dtype)
        new = (new & ~kept) | (cells & kept)
    if np.array_equal(new, cells):
        return None
    return bytes(new.astype(dtype, copy=False).tobytes()) + bytes(value[usable:])


def _nothing_outside(value: bytes | memoryview, clear: int, width: int, little: bool) -> bool:
    """Whether no cell of ``width`` bytes has a bit of ``clear`` set, read 8 bytes at a time
    (the cells' mask repeated over a 64-bit word; the bytes past the last whole word are
    checked cell by cell)."""
    if not clear:
        return True
    if 8 % width:
        return False  # an odd cell size: let the cell-by-cell path decide
    pattern = clear.to_bytes(width, "little" if little else "big") * (8 // width)
    words = len(value) // 8
    mask = np.uint64(int.from_bytes(pattern, "little"))
    if words and np.any(np.frombuffer(value, dtype="<u8", count=words) & mask):
        return False
    tail = bytes(value[words * 8 : len(value) - len(value) % width])
    return not any(b & m for b, m in zip(tail, pattern, strict=False))
