"""Text inside video pixel data: blank the user data of MPEG-2, H.264 and HEVC streams.

A video's encapsulated Pixel Data (7FE0,0010) is one bitstream split over fragments
(PS3.5 A.4.5-A.4.7). Beside the pictures it may carry free text no header shows:

- MPEG-2 video (ISO/IEC 13818-2 6.2.2.2.2): ``user_data``, start code ``00 00 01 B2``, up to
  the next start code (closed captions, vendor strings);
- H.264 (ITU-T H.264 7.3.2.3, D.1) and HEVC (ITU-T H.265 7.3.5, D.2): SEI messages of payload
  type 4 (user data registered by ITU-T T.35: captions) and 5 (user data unregistered: encoder
  banners such as x264's, vendor text), in SEI NAL units (H.264 type 6; HEVC types 39 and 40).

:func:`blank_user_data` overwrites that text with spaces **in place**: the stream keeps its
length, so fragments, offset tables and any MPEG-2 program or transport stream packing stay as
they are, and decoders skip user data by definition. What is blanked: the whole of MPEG-2
user data; an SEI type 5 payload after its 16-byte UUID; a type 4 payload after its T.35
country code. An SEI span that holds emulation prevention bytes (``00 00 03``) cannot be
blanked without changing the NAL unit's length: :class:`BadBitstream` (the file is held). Inside
an MPEG-2 transport stream (188-byte packets) nothing is overwritten, since user data may cross
packet headers: :func:`user_data` still hands every unit to the verification gate, which holds
the file when one holds an identifying value.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from engine.deid.encapsulated import BadBitstream, fragments_of, with_fragments

__all__ = ["VIDEO_SYNTAXES", "blank_user_data", "user_data"]

_MPEG2 = "mpeg2"
_H264 = "h264"
_HEVC = "hevc"
#: Video transfer syntaxes (PS3.6 Table A-1, fragmentable variants ``.1``) by codec.
VIDEO_SYNTAXES: dict[str, str] = {
    **{f"1.2.840.10008.1.2.4.{n}": _MPEG2 for n in ("100", "101", "100.1", "101.1")},
    **{f"1.2.840.10008.1.2.4.{n}": _H264 for n in ("102", "103", "104", "105", "106")},
    **{f"1.2.840.10008.1.2.4.{n}.1": _H264 for n in ("102", "103", "104", "105", "106")},
    **{f"1.2.840.10008.1.2.4.{n}": _HEVC for n in ("107", "108")},
}
_START = re.compile(b"\x00\x00\x01")
_MPEG2_USER_DATA = 0xB2
_SEI_TYPES = {_H264: (6,), _HEVC: (39, 40)}
_UNREGISTERED, _REGISTERED = 5, 4
_TS_PACKET = 188
_BLANK = 0x20


@dataclass(frozen=True)
class _Span:
    """Bytes ``start`` to ``end`` of the stream holding user data (``blankable``: no emulation
    prevention byte among them, so they can be overwritten without changing the length)."""

    start: int
    end: int
    blankable: bool = True


def _units(stream: bytes) -> Iterator[tuple[int, int]]:
    """(first byte after the start code prefix, end) of every unit between start codes."""
    starts = [m.end() for m in _START.finditer(stream)]
    for i, begin in enumerate(starts):
        end = starts[i + 1] - 3 if i + 1 < len(starts) else len(stream)
        while end > begin and stream[end - 1] == 0:  # zero_byte / trailing_zero_8bits
            end -= 1
        yield begin, end


def _rbsp(stream: bytes, begin: int, end: int) -> tuple[bytes, list[int]]:
    """The NAL unit payload without emulation prevention bytes, and the stream offset of each
    of its bytes."""
    out = bytearray()
    where: list[int] = []
    zeros = 0
    for pos in range(begin, end):
        byte = stream[pos]
        if zeros >= 2 and byte == 3:
            zeros = 0
            continue
        zeros = zeros + 1 if byte == 0 else 0
        out.append(byte)
        where.append(pos)
    return bytes(out), where


def _varint(rbsp: bytes, pos: int) -> tuple[int, int]:
    """An SEI payloadType or payloadSize (0xFF bytes add 255 each) and the position after it."""
    value = 0
    while pos < len(rbsp) and rbsp[pos] == 0xFF:
        value += 255
        pos += 1
    if pos >= len(rbsp):
        raise BadBitstream("an SEI message runs past its NAL unit")
    return value + rbsp[pos], pos + 1


def _sei_spans(rbsp: bytes, where: list[int]) -> Iterator[_Span]:
    """The user data spans of one SEI NAL unit's messages (``rbsp`` after the NAL header)."""
    pos = 0
    while pos < len(rbsp) and rbsp[pos:] != b"\x80":  # rbsp_trailing_bits
        kind, pos = _varint(rbsp, pos)
        size, pos = _varint(rbsp, pos)
        if pos + size > len(rbsp):
            raise BadBitstream("an SEI payload runs past its NAL unit")
        skip = 0
        if kind == _UNREGISTERED:
            skip = 16  # uuid_iso_iec_11578
        elif kind == _REGISTERED:
            skip = 2 if size and rbsp[pos] == 0xFF else 1  # itu_t_t35_country_code(_extension)
        if kind in (_UNREGISTERED, _REGISTERED) and size > skip:
            first, last = where[pos + skip], where[pos + size - 1]
            yield _Span(first, last + 1, last - first == size - skip - 1)
        pos += size


def _spans(stream: bytes, codec: str) -> Iterator[_Span]:
    """Every user data span of the stream (see the module doc)."""
    for begin, end in _units(stream):
        if begin >= end:
            continue
        head = stream[begin]
        if codec == _MPEG2:
            if head == _MPEG2_USER_DATA and end > begin + 1:
                yield _Span(begin + 1, end)
            continue
        if codec == _H264:
            nal_type, header = head & 0x1F, 1
        else:
            nal_type, header = (head >> 1) & 0x3F, 2
        if nal_type in _SEI_TYPES[codec] and end > begin + header:
            yield from _sei_spans(*_rbsp(stream, begin + header, end))


def _transport_stream(stream: bytes | bytearray) -> bool:
    """Whether ``stream`` is an MPEG-2 transport stream (sync byte 0x47 every 188 bytes)."""
    return len(stream) >= 2 * _TS_PACKET and stream[0] == 0x47 and stream[_TS_PACKET] == 0x47


def user_data(element: bytes | memoryview, syntax: str) -> list[bytes]:
    """The user data of a video Pixel Data element (its tag to its sequence delimiter), for
    the verification gate; [] unless ``syntax`` is a video transfer syntax."""
    codec = VIDEO_SYNTAXES.get(syntax)
    if codec is None:
        return []
    stream = b"".join(fragments_of(element))
    try:
        return [stream[s.start : s.end] for s in _spans(stream, codec)]
    except BadBitstream:
        return [stream]  # unreadable SEI: the gate searches the whole stream


def blank_user_data(element: bytes | memoryview, syntax: str) -> tuple[bytes, int] | None:
    """``element`` with its user data overwritten by spaces, and the number of spans blanked;
    None when there was none to blank or ``syntax`` is not video (or the stream is a transport
    stream, see the module doc). Raises :class:`BadBitstream` for user data that cannot be
    blanked in place."""
    codec = VIDEO_SYNTAXES.get(syntax)
    if codec is None:
        return None
    fragments = fragments_of(element)
    stream = bytearray(b"".join(fragments))
    if _transport_stream(stream):
        return None
    spans = [s for s in _spans(bytes(stream), codec) if stream[s.start : s.end].strip(b" ")]
    if not spans:
        return None
    for span in spans:
        if not span.blankable:
            raise BadBitstream("SEI user data with emulation prevention bytes")
        stream[span.start : span.end] = bytes([_BLANK]) * (span.end - span.start)
    return with_fragments(element, bytes(stream), [len(f) for f in fragments]), len(spans)
