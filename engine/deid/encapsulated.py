"""Text inside compressed pixel data: strip comment and application segments from every frame.

An encapsulated Pixel Data (7FE0,0010) element (PS3.5 A.4) holds a Basic Offset Table item and
fragments; each frame is a JPEG, JPEG-LS or JPEG 2000 bitstream that may carry free text the
header never shows: a JPEG comment (COM, FFFE) or application segment (APP0-APP15, FFE0-FFEF:
Exif, XMP, ICC profiles, vendor blocks), a JPEG 2000 comment (COM, FF64) in the main or a
tile-part header, or, in the JP2 file format, ``xml``, ``uuid``, ``uinf`` and IPR boxes.

:func:`strip_text` rewrites the element without them. What decoding needs is kept, reduced to
its fixed fields: APP0 ``JFIF`` (no thumbnail), APP14 ``Adobe`` (the colour transform flag
libjpeg reads) and, in JPEG-LS, APP8 ``mrfx`` (the HP colour transform CharLS reads). Each frame
is written back as one fragment padded to even length; the Basic Offset Table is recomputed when
the input had one (else left empty), and the caller rewrites an Extended Offset Table
(7FE0,0001) and its lengths (7FE0,0002) from :attr:`Stripped.offsets`. :func:`text_segments`
returns what is left that could hold text, for the verification gate. Anything that is not a
bitstream this module understands raises :class:`BadBitstream`: such a file is held, never
passed on unread. RLE has no segments; the user data of MPEG-2, H.264 and HEVC video is
blanked by :mod:`engine.deid.video`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = [
    "BadBitstream",
    "Stripped",
    "fragments_of",
    "frames_of",
    "strip_text",
    "text_segments",
    "with_fragments",
]

_ITEM, _SEQ_END = 0xE000FFFE, 0xE0DDFFFE
_TAG_LENGTH = struct.Struct("<LL")
_SOI, _EOI = b"\xff\xd8", b"\xff\xd9"
_J2K_SOC = b"\xff\x4f\xff\x51"
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
#: Transfer syntaxes whose frames are JPEG (PS3.5 A.4.1), JPEG-LS (A.4.3), JPEG 2000 (A.4.4)
#: or High-Throughput JPEG 2000 (A.4.6) bitstreams.
STRIPPED_SYNTAXES = frozenset(
    [f"1.2.840.10008.1.2.4.{n}" for n in (*range(50, 67), 70, 80, 81, 90, 91, 92, 93)]
    + [f"1.2.840.10008.1.2.4.{n}" for n in (201, 202, 203)]
)
#: JP2 boxes kept (ISO/IEC 15444-1 Annex I): signature, file type, reader requirements,
#: header (image header, colour, palette, resolution) and the codestream.
_JP2_KEPT = frozenset((b"jP  ", b"ftyp", b"rreq", b"jp2h", b"jp2c"))


class BadBitstream(ValueError):
    """The encapsulated pixel data is not what its transfer syntax says (no values quoted)."""


@dataclass(frozen=True)
class Stripped:
    """The rewritten element (tag to sequence delimiter), what was removed, and where each
    frame now starts (offsets from the first fragment, as PS3.5 A.4 counts) and its length."""

    element: bytes
    removed: int
    offsets: tuple[int, ...]
    lengths: tuple[int, ...]


# --------------------------------------------------------------------------- items


def _items(element: bytes | memoryview, implicit: bool) -> list[bytes]:
    """The items of an encapsulated element: the offset table first, then the fragments."""
    data = bytes(element)
    pos = 8 if implicit else 12
    items: list[bytes] = []
    while pos + 8 <= len(data):
        tag, length = _TAG_LENGTH.unpack_from(data, pos)
        pos += 8
        if tag == _SEQ_END:
            return items
        if tag != _ITEM or pos + length > len(data):
            raise BadBitstream("malformed encapsulated pixel data item")
        items.append(data[pos : pos + length])
        pos += length
    raise BadBitstream("encapsulated pixel data without its sequence delimiter")


def _starts_frame(fragment: bytes) -> bool:
    return fragment.startswith((_SOI, _J2K_SOC, _JP2_SIGNATURE))


def fragments_of(element: bytes | memoryview, implicit: bool = False) -> list[bytes]:
    """The fragments of an encapsulated element (the offset table item left out)."""
    items = _items(element, implicit)
    if not items:
        raise BadBitstream("encapsulated pixel data without an offset table item")
    return items[1:]


def with_fragments(
    element: bytes | memoryview, joined: bytes, lengths: list[int], implicit: bool = False
) -> bytes:
    """``element`` with its fragments replaced by ``joined`` cut into fragments of ``lengths``
    bytes (the offset table item kept as it is)."""
    table = _items(element, implicit)[0]
    parts = [bytes(element[: 8 if implicit else 12]), _TAG_LENGTH.pack(_ITEM, len(table)), table]
    position = 0
    for length in lengths:
        parts += [_TAG_LENGTH.pack(_ITEM, length), joined[position : position + length]]
        position += length
    if position != len(joined):
        raise BadBitstream("fragment lengths do not add up to the stream")
    parts.append(_TAG_LENGTH.pack(_SEQ_END, 0))
    return b"".join(parts)


def frames_of(element: bytes | memoryview, implicit: bool = False) -> tuple[bytes, list[bytes]]:
    """(Basic Offset Table, frames): fragments joined by the offset table when it has one,
    else a new frame at each fragment that starts a bitstream (SOI, SOC or the JP2 signature)."""
    items = _items(element, implicit)
    if not items:
        raise BadBitstream("encapsulated pixel data without an offset table item")
    table, fragments = items[0], items[1:]
    if table:
        count = len(table) // 4
        starts = list(struct.unpack(f"<{count}L", table[: 4 * count]))
        frames: list[bytes] = []
        position = 0
        for fragment in fragments:
            if position in starts or not frames:
                frames.append(b"")
            frames[-1] += fragment
            position += 8 + len(fragment)
        if len(frames) != count:
            raise BadBitstream("offset table does not match the fragments")
        return table, frames
    frames = []
    for fragment in fragments:
        if not frames or _starts_frame(fragment):
            frames.append(fragment)
        else:
            frames[-1] += fragment
    return table, frames


# --------------------------------------------------------------------------- JPEG / JPEG-LS


def _trailing(frame: bytes, end: int) -> int:
    """1 when bytes other than padding NULs follow the end of a bitstream (they are dropped)."""
    return int(bool(frame[end:].strip(b"\0")))


def _kept_app(marker: int, payload: bytes) -> bytes | None:
    """The fixed part of an application segment decoding needs, or None (drop it)."""
    if marker == 0xE0 and payload.startswith(b"JFIF\0") and len(payload) >= 12:
        return payload[:12] + b"\0\0"  # version, units, densities; no thumbnail
    if marker == 0xEE and payload.startswith(b"Adobe") and len(payload) >= 12:
        return payload[:12]  # version, flags, colour transform
    if marker == 0xE8 and payload.startswith(b"mrfx") and len(payload) >= 5:
        return payload[:5]  # JPEG-LS HP colour transform
    return None


def _scan_end(frame: bytes, pos: int, ls: bool) -> int:
    """Where the entropy-coded data from ``pos`` ends: the next marker (JPEG: FF not followed
    by 00, a restart marker or FF; JPEG-LS: FF followed by a byte with its high bit set)."""
    size = len(frame)
    while True:
        pos = frame.find(b"\xff", pos)
        if pos < 0 or pos + 1 >= size:
            return size
        following = frame[pos + 1]
        if ls:
            if following >= 0x80 and not 0xD0 <= following <= 0xD7:
                return pos
        elif following not in (0x00, 0xFF) and not 0xD0 <= following <= 0xD7:
            return pos
        pos += 1


def _strip_jpeg(frame: bytes, segments: list[bytes] | None = None) -> tuple[bytes, int]:
    """A JPEG or JPEG-LS frame without COM and APPn segments (bar :func:`_kept_app`), ended
    at EOI; returns it and the number of segments removed. ``segments`` collects the payload
    of every COM and APPn left, for :func:`text_segments`."""
    if not frame.startswith(_SOI):
        raise BadBitstream("a JPEG frame that does not start with SOI")
    out = [_SOI]
    pos, size, removed, ls = 2, len(frame), 0, False
    while pos + 1 < size:
        if frame[pos] != 0xFF:
            raise BadBitstream("a JPEG marker expected")
        marker = frame[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD9:
            out.append(_EOI)
            return b"".join(out), removed + _trailing(frame, pos + 2)
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            out.append(frame[pos : pos + 2])
            pos += 2
            continue
        if pos + 4 > size:
            raise BadBitstream("a truncated JPEG marker segment")
        length = struct.unpack_from(">H", frame, pos + 2)[0]
        end = pos + 2 + length
        if length < 2 or end > size:
            raise BadBitstream("a JPEG marker segment overruns its frame")
        payload = frame[pos + 4 : end]
        ls = ls or marker in (0xF7, 0xF8)  # SOF55 or LSE: a JPEG-LS stream
        if marker == 0xFE or 0xE0 <= marker <= 0xEF:
            kept = _kept_app(marker, payload) if marker != 0xFE else None
            if segments is not None:
                segments.append(payload)
            if kept is None:
                removed += 1
            else:
                removed += kept != payload
                out.append(bytes((0xFF, marker)) + struct.pack(">H", len(kept) + 2) + kept)
            pos = end
            continue
        out.append(frame[pos:end])
        pos = end
        if marker == 0xDA:  # start of scan: entropy-coded data up to the next marker
            stop = _scan_end(frame, pos, ls)
            out.append(frame[pos:stop])
            pos = stop
    out.append(frame[pos:])
    return b"".join(out), removed


# --------------------------------------------------------------------------- JPEG 2000


def _strip_codestream(stream: bytes, segments: list[bytes] | None = None) -> tuple[bytes, int]:
    """A JPEG 2000 codestream without COM (FF64) segments, main and tile-part headers (Psot
    adjusted), ended at EOC; returns it and the number removed."""
    if not stream.startswith(b"\xff\x4f"):
        raise BadBitstream("a JPEG 2000 frame that does not start with SOC")
    out, pos, size, removed, has_tlm = [stream[:2]], 2, len(stream), 0, False
    while pos + 2 <= size:
        marker = struct.unpack_from(">H", stream, pos)[0]
        if marker == 0xFFD9:
            out.append(stream[pos : pos + 2])
            return b"".join(out), removed + _trailing(stream, pos + 2)
        if marker == 0xFF90:
            part, dropped = _tile_part(stream, pos, segments)
            if dropped and has_tlm:
                raise BadBitstream("a tile-part comment in a codestream with TLM markers")
            out.append(part[0])
            removed += dropped
            pos = part[1]
            continue
        length = _segment_length(stream, pos)
        has_tlm = has_tlm or marker == 0xFF55
        if marker == 0xFF64:
            if segments is not None:
                segments.append(stream[pos + 4 : pos + 2 + length])
            removed += 1
        else:
            out.append(stream[pos : pos + 2 + length])
        pos += 2 + length
    raise BadBitstream("a JPEG 2000 codestream without EOC")


def _segment_length(stream: bytes, pos: int) -> int:
    if pos + 4 > len(stream) or stream[pos] != 0xFF:
        raise BadBitstream("a JPEG 2000 marker expected")
    length: int = struct.unpack_from(">H", stream, pos + 2)[0]
    if length < 2 or pos + 2 + length > len(stream):
        raise BadBitstream("a JPEG 2000 marker segment overruns its frame")
    return length


def _tile_part(
    stream: bytes, start: int, segments: list[bytes] | None
) -> tuple[tuple[bytes, int], int]:
    """One tile-part from its SOT at ``start``: ((rewritten bytes, end), COMs removed)."""
    psot = struct.unpack_from(">L", stream, start + 6)[0]
    end = start + psot if psot else len(stream) - 2
    if end > len(stream):
        raise BadBitstream("a JPEG 2000 tile-part overruns its frame")
    header = [stream[start : start + 12]]
    pos, removed = start + 12, 0
    while pos < end and struct.unpack_from(">H", stream, pos)[0] != 0xFF93:  # SOD
        length = _segment_length(stream, pos)
        if stream[pos + 1] == 0x64:
            if segments is not None:
                segments.append(stream[pos + 4 : pos + 2 + length])
            removed += 1
        else:
            header.append(stream[pos : pos + 2 + length])
        pos += 2 + length
    part = b"".join(header) + stream[pos:end]
    if removed and psot:
        part = part[:6] + struct.pack(">L", len(part)) + part[10:]
    return (part, end), removed


def _strip_jp2(data: bytes, segments: list[bytes] | None = None) -> tuple[bytes, int]:
    """A JP2 file without boxes other than :data:`_JP2_KEPT`, its codestream stripped."""
    out, pos, removed = [], 0, 0
    while pos + 8 <= len(data):
        length, kind = struct.unpack_from(">L4s", data, pos)
        head = 8
        if length == 1:
            length, head = struct.unpack_from(">Q", data, pos + 8)[0], 16
        elif length == 0:
            length = len(data) - pos
        if length < head or pos + length > len(data):
            raise BadBitstream("a JP2 box overruns its frame")
        body = data[pos + head : pos + length]
        if kind == b"jp2c":
            stream, dropped = _strip_codestream(body, segments)
            removed += dropped
            out.append(struct.pack(">L4s", len(stream) + 8, kind) + stream)
        elif kind in _JP2_KEPT:
            out.append(data[pos : pos + length])
        else:
            if segments is not None:
                segments.append(body)
            removed += 1
        pos += length
    return b"".join(out), removed + (pos != len(data))


def _strip_frame(frame: bytes, segments: list[bytes] | None = None) -> tuple[bytes, int]:
    if frame.startswith(_SOI):
        return _strip_jpeg(frame, segments)
    if frame.startswith(_JP2_SIGNATURE):
        return _strip_jp2(frame, segments)
    if frame.startswith(b"\xff\x4f"):
        return _strip_codestream(frame, segments)
    raise BadBitstream("a frame that is not a JPEG, JPEG-LS or JPEG 2000 bitstream")


# --------------------------------------------------------------------------- element


def strip_text(element: bytes | memoryview, implicit: bool = False) -> Stripped | None:
    """``element`` (an encapsulated Pixel Data element from its tag) without text segments;
    None when there was nothing to remove (the caller keeps the bytes it has)."""
    table, frames = frames_of(element, implicit)
    results = [_strip_frame(frame) for frame in frames]
    if not any(removed for _, removed in results):
        return None
    fragments = [f + b"\0" * (len(f) % 2) for f, _ in results]
    offsets, position = [], 0
    for fragment in fragments:
        offsets.append(position)
        position += 8 + len(fragment)
    new_table = struct.pack(f"<{len(offsets)}L", *offsets) if table else b""
    if table and position > 0xFFFFFFFF:
        raise BadBitstream("frames too long for a basic offset table")
    head = bytes(element[: 8 if implicit else 12])
    parts = [head, _TAG_LENGTH.pack(_ITEM, len(new_table)), new_table]
    for fragment in fragments:
        parts += [_TAG_LENGTH.pack(_ITEM, len(fragment)), fragment]
    parts.append(_TAG_LENGTH.pack(_SEQ_END, 0))
    removed = sum(n for _, n in results)
    return Stripped(b"".join(parts), removed, tuple(offsets), tuple(len(f) for f in fragments))


def text_segments(element: bytes | memoryview, implicit: bool = False) -> list[bytes]:
    """The payload of every comment and application segment or box of every frame (what the
    verification gate searches); [] for frames that are not a bitstream this module reads."""
    found: list[bytes] = []
    try:
        _, frames = frames_of(element, implicit)
    except BadBitstream:
        return found
    for frame in frames:
        try:
            _strip_frame(frame, found)
        except BadBitstream:
            continue
    return found
