"""DIMSE command sets and the Part 10 file meta header, encoded and decoded directly.

Command sets are always Implicit VR Little Endian (PS3.7 6.3.1) and hold a handful of
elements, so a few struct calls replace a general dataset parser on the per-instance path.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from engine import __version__

#: fiona's Implementation Class UID (0002,0012): a 2.25 UUID-derived UID, fixed for the product.
IMPLEMENTATION_CLASS_UID = "2.25.21208680153880756234421539763416735043"
#: Implementation Version Name (0002,0013), at most 16 characters.
IMPLEMENTATION_VERSION_NAME = f"FIONA_{__version__}"[:16]
VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"

C_STORE_RQ = 0x0001
C_ECHO_RQ = 0x0030
N_SET_RQ = 0x0120
N_CREATE_RQ = 0x0140
NO_DATASET = 0x0101
#: Status: refused, unrecognised operation (PS3.7 C.4).
UNRECOGNIZED_OPERATION = 0x0211
#: Status: refused, out of resources (PS3.4 B.2.3), for a data set over the size limit.
OUT_OF_RESOURCES = 0xA700

_TEXT_TAGS = {0x0002, 0x1000, 0x1001, 0x1030}  # UIDs and AE titles in group 0000


@dataclass(frozen=True)
class Command:
    """The fields of a request command set the receiver acts on (tags in group 0000)."""

    command_field: int  # (0000,0100)
    message_id: int  # (0000,0110)
    has_dataset: bool  # (0000,0800) != 0x0101
    sop_class_uid: str = ""  # (0000,0002) Affected, else (0000,0003) Requested SOP Class UID
    sop_instance_uid: str = ""  # (0000,1000) Affected, else (0000,1001) Requested SOP Instance


@dataclass(frozen=True)
class Reply:
    """A response beyond its status: ``affected_instance`` replaces the request's SOP
    Instance UID (an N-CREATE whose SCP chose it), ``error_id`` is Error ID (0000,0903) and
    ``error_comment`` Error Comment (0000,0902), both sent only when set."""

    status: int
    affected_instance: str = ""
    error_id: int | None = None
    error_comment: str = ""


class CommandError(ValueError):
    """A command set that cannot be decoded."""


def decode_command(data: bytes) -> Command:
    """Decode an Implicit VR Little Endian command set."""
    values: dict[int, bytes] = {}
    pos, end = 0, len(data)
    while pos < end:
        if pos + 8 > end:
            raise CommandError("command set ends inside an element header")
        group, elem, length = struct.unpack_from("<HHL", data, pos)
        pos += 8
        if group != 0x0000 or pos + length > end:
            raise CommandError("command set element outside group 0000 or too long")
        values[elem] = data[pos : pos + length]
        pos += length

    def us(elem: int) -> int:
        raw = values.get(elem)
        if raw is None or len(raw) != 2:
            raise CommandError(f"command element (0000,{elem:04X}) missing or not US")
        return int(struct.unpack("<H", raw)[0])

    def text(elem: int) -> str:
        return values.get(elem, b"").rstrip(b"\0 ").decode("ascii", "replace")

    return Command(
        command_field=us(0x0100),
        message_id=us(0x0110),
        has_dataset=us(0x0800) != NO_DATASET,
        sop_class_uid=text(0x0002) or text(0x0003),
        sop_instance_uid=text(0x1000) or text(0x1001),
    )


def _element(elem: int, value: bytes) -> bytes:
    return struct.pack("<HHL", 0x0000, elem, len(value)) + value


def _uid(value: str) -> bytes:
    raw = value.encode("ascii", "replace")
    return raw + b"\0" if len(raw) % 2 else raw


def encode_response(request: Command, status: int | Reply) -> bytes:
    """The response command set to ``request`` (its Command Field with bit 15 set); its
    Affected SOP Class/Instance UID are the request's (Affected or Requested)."""
    reply = status if isinstance(status, Reply) else Reply(status)
    instance = reply.affected_instance or request.sop_instance_uid
    comment = reply.error_comment.encode("ascii", "replace")[:64]
    body = b"".join(
        (
            _element(0x0002, _uid(request.sop_class_uid)) if request.sop_class_uid else b"",
            _element(0x0100, struct.pack("<H", request.command_field | 0x8000)),
            _element(0x0120, struct.pack("<H", request.message_id)),
            _element(0x0800, struct.pack("<H", NO_DATASET)),
            _element(0x0900, struct.pack("<H", reply.status)),
            _element(0x0902, comment + b" " * (len(comment) % 2)) if comment else b"",
            _element(0x0903, struct.pack("<H", reply.error_id)) if reply.error_id else b"",
            _element(0x1000, _uid(instance)) if instance else b"",
        )
    )
    return _element(0x0000, struct.pack("<L", len(body))) + body


def _meta_element(elem: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return (
            struct.pack("<HH", 0x0002, elem) + vr + b"\0\0" + struct.pack("<L", len(value)) + value
        )
    return struct.pack("<HH", 0x0002, elem) + vr + struct.pack("<H", len(value)) + value


def _text(value: str) -> bytes:
    raw = value.encode("ascii", "replace")
    return raw + b" " if len(raw) % 2 else raw


def part10_header(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str, source_ae: str
) -> bytes:
    """Preamble, 'DICM' and the File Meta Information group (PS3.10 7.1) for one instance."""
    body = b"".join(
        (
            _meta_element(0x0001, b"OB", b"\x00\x01"),
            _meta_element(0x0002, b"UI", _uid(sop_class_uid)),
            _meta_element(0x0003, b"UI", _uid(sop_instance_uid)),
            _meta_element(0x0010, b"UI", _uid(transfer_syntax_uid)),
            _meta_element(0x0012, b"UI", _uid(IMPLEMENTATION_CLASS_UID)),
            _meta_element(0x0013, b"SH", _text(IMPLEMENTATION_VERSION_NAME)),
            _meta_element(0x0016, b"AE", _text(source_ae)) if source_ae else b"",
        )
    )
    group_length = _meta_element(0x0000, b"UL", struct.pack("<L", len(body)))
    return b"\0" * 128 + b"DICM" + group_length + body
