"""A DICOM association as requestor (SCU): C-ECHO, C-STORE and Study Root C-FINDs, on one thread.

Protocol plumbing only, the counterpart of the receiver's :mod:`engine.net.upper` and
:mod:`engine.net.dimse`: it knows files, UIDs and statuses, not destinations or outboxes (the
``dicom`` destination, :mod:`engine.transfer.dicom`, says why pynetdicom's own association is
not used for the data phase).

As the receiver does, pynetdicom's PDU codecs and presentation context negotiation are used and
the association runs on the calling thread: connect (TLS via an :class:`ssl.SSLContext`), write
the request, block reading its response. There is no second reader of the socket, so no
response can be lost, and no timer but the socket's. The socket has TCP_NODELAY, and a
request's PDUs go out in writes of up to 256 KiB (a small file in one). TCP_QUICKACK is
re-armed after each read: a peer with Nagle on (dcmtk without TCP_NODELAY in its environment)
holds part of each response until our ACK, which Linux delays up to 40 ms (measured against
such a storescp, 64x64 files: 22 files/s without TCP_QUICKACK, ~800 with; dcmtk's storescu,
which does not set it, ~20).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import logging
import select
import socket
import ssl
import struct
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.dsutils import decode, encode, split_dataset
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_requestor
from pynetdicom.status import GENERAL_STATUS, STORAGE_SERVICE_CLASS_STATUS, code_to_category

from engine.dicom.codecs import DecodeFailed, decompress
from engine.net.dimse import CommandError, decode_command, encode_response
from engine.net.transport import PDU_HEADER, PduReader, PduTooLong
from engine.net.upper import APPLICATION_CONTEXT, our_user_items

log = logging.getLogger(__name__)

#: Study Root Query/Retrieve Information Model - FIND and MOVE (PS3.4 C.6.2).
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
C_GET_RQ = 0x0010
#: The transfer syntaxes a file is re-encoded to when its own was not accepted, preferred first.
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
MAX_CONTEXTS = 128  # odd context IDs 1..255 (PS3.8 9.3.2.2)
_UNLIMITED_FRAGMENT = 1 << 20  # bytes per PDV when the peer announces no PDU limit
_MAX_ASSOCIATE_PDU = 1 << 20  # an A-ASSOCIATE-AC is a few KiB; more is not a DICOM peer
_MAX_READ = 1 << 26  # bytes of one PDU when our max_pdu is 0 (no limit): a sanity bound
_WRITE_SIZE = 1 << 18  # bytes gathered per socket write
_PDV_HEADER = struct.Struct(">BxLLBB")  # PDU type, length; PDV length, context, control
_RELEASE_RQ = bytes([0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0])
_ABORT = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0, 0])  # source: service user, no reason
C_STORE_RQ, C_FIND_RQ, C_MOVE_RQ, C_ECHO_RQ, N_ACTION_RQ = 0x0001, 0x0020, 0x0021, 0x0030, 0x0130
#: Verification SOP Class (C-ECHO, PS3.4 A).
VERIFICATION = "1.2.840.10008.1.1"
#: Storage Commitment Push Model SOP Class and its well-known SOP Instance (PS3.4 J.3).
STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
_NO_DATASET = 0x0101  # (0000,0800) Command Data Set Type: no data set follows
_PENDING = (0xFF00, 0xFF01)

Proposal = tuple[str, tuple[str, ...]]  # abstract syntax, transfer syntaxes
#: Files one instance a C-GET brought: (SOP class, SOP instance, transfer syntax, data set
#: bytes) -> the C-STORE status.
StoreHandler = Callable[[str, str, str, bytes], int]


class ScuOptions(Protocol):
    """The peer and our side of an association; timeouts in seconds, ``max_pdu`` in bytes."""

    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def ae_title(self) -> str: ...  # the peer's, Called AE Title
    @property
    def calling_ae_title(self) -> str: ...
    @property
    def connect_timeout(self) -> float: ...
    @property
    def acse_timeout(self) -> float: ...
    @property
    def dimse_timeout(self) -> float: ...
    @property
    def network_timeout(self) -> float: ...
    @property
    def max_pdu(self) -> int: ...  # the largest PDU we accept; 0 for no limit


@dataclass(frozen=True)
class StoreResult:
    """The answer to one C-STORE.

    ``status`` is the peer's Status (0000,0900), None when the instance was not sent (SOP class
    or syntax not accepted, unreadable file); ``detail`` a short text without PHI, empty for
    Success.
    """

    status: int | None
    detail: str = ""

    @property
    def ok(self) -> bool:
        """The peer has the instance for good: Success or Warning."""
        return self.status is not None and code_to_category(self.status) in ("Success", "Warning")


@dataclass(frozen=True)
class MoveResult:
    """The final answer to one C-MOVE: its Status (0000,0900) and the Number of Completed,
    Failed and Warning Sub-operations (0000,1021)-(0000,1023) (-1 when the peer left one out);
    ``detail`` a short text without PHI, empty for Success. Success says only what the peer
    believes: the caller counts what arrived."""

    status: int
    completed: int
    failed: int
    warning: int
    detail: str = ""

    @property
    def ok(self) -> bool:
        """Success, or Warning (0xB000: some sub-operations failed or warned)."""
        return self.status in (0x0000, 0xB000)


class AssociationBroken(Exception):
    """The association cannot go on (unreachable, rejected, aborted, timed out); no PHI."""


class PeerClosed(AssociationBroken):
    """The peer ended the association while we waited for its answer: an A-ABORT, or the
    connection closed or reset (a peer refusing a request may answer so, not by a status)."""


class _Unsendable(Exception):
    """One instance cannot be sent on this association; the message is its result's detail."""


# --------------------------------------------------------------------------- command sets


def _element(elem: int, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\0"  # UIDs are padded with NUL to even length
    return struct.pack("<HHL", 0x0000, elem, len(value)) + value


def _command(
    field: int,
    message_id: int,
    sop_class: str,
    sop_instance: str = "",
    *,
    dataset: bool = True,
    move_destination: str = "",
) -> bytes:
    """A C-STORE-RQ, C-FIND-RQ, C-MOVE-RQ or C-ECHO-RQ command set (Implicit VR Little Endian,
    group 0000): Affected SOP Class/Instance UID (0000,0002)/(0000,1000), Command Field
    (0000,0100), Message ID (0000,0110), Move Destination (0000,0600) for a C-MOVE, Priority
    (0000,0700) medium (not for C-ECHO), Command Data Set Type (0000,0800): whether a data set
    follows."""
    destination = move_destination.encode("ascii")
    body = b"".join(
        (
            _element(0x0002, sop_class.encode("ascii")),
            _element(0x0100, struct.pack("<H", field)),
            _element(0x0110, struct.pack("<H", message_id)),
            _element(0x0600, destination + b" " * (len(destination) % 2)) if destination else b"",
            _element(0x0700, struct.pack("<H", 0x0000)) if field != C_ECHO_RQ else b"",
            _element(0x0800, struct.pack("<H", 0x0000 if dataset else _NO_DATASET)),
            _element(0x1000, sop_instance.encode("ascii")) if sop_instance else b"",
        )
    )
    return _element(0x0000, struct.pack("<L", len(body))) + body


def _n_action_command(message_id: int) -> bytes:
    """An N-ACTION-RQ command set asking the Storage Commitment Push Model's well-known
    instance to commit (Action Type ID (0000,1008) 1), its data set following: Requested SOP
    Class/Instance UID (0000,0003)/(0000,1001), Command Field (0000,0100), Message ID
    (0000,0110)."""
    body = b"".join(
        (
            _element(0x0003, STORAGE_COMMITMENT.encode("ascii")),
            _element(0x0100, struct.pack("<H", N_ACTION_RQ)),
            _element(0x0110, struct.pack("<H", message_id)),
            _element(0x0800, struct.pack("<H", 0x0000)),
            _element(0x1001, STORAGE_COMMITMENT_INSTANCE.encode("ascii")),
            _element(0x1008, struct.pack("<H", 1)),
        )
    )
    return _element(0x0000, struct.pack("<L", len(body))) + body


def _us(command: bytes | bytearray, elem: int) -> int | None:
    """The US value of (0000,``elem``) in a response command set (None when absent)."""
    pos = 0
    while pos + 8 <= len(command):
        group, found, length = struct.unpack_from("<HHL", command, pos)
        if group == 0x0000 and found == elem and length == 2:
            return int.from_bytes(command[pos + 8 : pos + 10], "little")
        pos += 8 + length
    return None


def _move_status_text(status: int) -> str:
    """A C-MOVE's final status as text (PS3.4 C.4.2.1.5)."""
    known = {
        0xA701: "out of resources: unable to calculate the number of matches",
        0xA702: "out of resources: unable to perform sub-operations",
        0xA801: "move destination unknown: the PACS does not know this AE title",
        0xA900: "identifier does not match SOP class",
        0xB000: "sub-operations complete, one or more failures or warnings",
        0xFE00: "sub-operations cancelled",
    }
    if status in known:
        return f"status 0x{status:04X} ({known[status]})"
    if 0xC000 <= status <= 0xCFFF:
        return f"status 0x{status:04X} (unable to process)"
    return _status_text(status)


def _status_text(status: int) -> str:
    meaning = STORAGE_SERVICE_CLASS_STATUS.get(status) or GENERAL_STATUS.get(status)
    return f"status 0x{status:04X}" + (f" ({meaning[1]})" if meaning else "")


# --------------------------------------------------------------------------- the association


class ScuAssociation:
    """One association as requestor, run on the calling thread with blocking socket I/O.

    A file goes on the wire as it is stored (the data set bytes after its meta header, never
    decoded) when its own syntax was accepted; otherwise it is read with pydicom, decompressed
    if needed and re-encoded for an accepted uncompressed syntax.

    :meth:`open` connects and negotiates; then :meth:`store`, :meth:`count_instances` and
    :meth:`list_instances`, one request at a time; :meth:`release` (or :meth:`abort`) closes
    the socket. Failures of the association raise :class:`AssociationBroken`; a single
    instance's problems do not.
    """

    def __init__(self, sock: socket.socket, opts: ScuOptions) -> None:
        self.sock = sock
        self.opts = opts
        self.reader = PduReader(sock)  # TCP_NODELAY; ACK at once (TCP_QUICKACK)
        #: (presentation context, control header, value) of PDVs not yet read
        self.pdvs: deque[tuple[int, int, bytes]] = deque()
        self.last_context = 0  # the presentation context of the PDV read last
        self.fragment = _UNLIMITED_FRAGMENT
        #: SOP class -> accepted transfer syntax -> presentation context ID
        self.accepted: dict[str, dict[str, int]] = {}
        #: presentation context ID -> (SOP class, transfer syntax), of the accepted ones
        self.contexts: dict[int, tuple[str, str]] = {}
        self.proposed = 0
        self.message_id = 0

    @classmethod
    def open(
        cls,
        opts: ScuOptions,
        tls: ssl.SSLContext | None,
        proposals: Sequence[Proposal],
        scp_roles: Sequence[str] = (),
    ) -> ScuAssociation:
        """Connect, and negotiate ``proposals`` (abstract syntax, transfer syntaxes), asking
        for the SCP role for the SOP classes ``scp_roles`` (storage classes, for C-GET)."""
        where = f"{opts.host}:{opts.port}"
        try:
            sock = socket.create_connection((opts.host, opts.port), timeout=opts.connect_timeout)
        except OSError as exc:
            raise AssociationBroken(f"cannot connect to {where} ({short_reason(exc)})") from exc
        try:
            if tls is not None:
                sock = tls.wrap_socket(sock, server_hostname=opts.host)
            assoc = cls(sock, opts)
            with assoc._io(opts.acse_timeout, "negotiating the association"):
                assoc._negotiate(proposals, scp_roles)
            return assoc
        except ssl.SSLError as exc:
            _close(sock)
            raise AssociationBroken(f"TLS with {where} failed ({short_reason(exc)})") from exc
        except BaseException:
            _close(sock)
            raise

    @contextlib.contextmanager
    def _io(self, timeout: float, what: str) -> Iterator[None]:
        """Socket errors and timeouts during ``what`` as :class:`AssociationBroken`."""
        self.sock.settimeout(timeout)
        try:
            yield
        except TimeoutError as exc:
            raise AssociationBroken(f"timed out after {timeout:g} s {what}") from exc
        except (EOFError, ConnectionResetError) as exc:
            raise PeerClosed(
                f"the peer closed the connection while {what} ({short_reason(exc)})"
            ) from exc
        except OSError as exc:
            raise AssociationBroken(
                f"the connection broke off while {what} ({short_reason(exc)})"
            ) from exc

    def _negotiate(self, proposals: Sequence[Proposal], scp_roles: Sequence[str] = ()) -> None:
        contexts = []
        for i, (abstract, syntaxes) in enumerate(proposals):
            cx = PresentationContext()
            cx.context_id = 2 * i + 1
            cx.abstract_syntax = abstract
            cx.transfer_syntax = list(syntaxes)
            contexts.append(cx)
        primitive = A_ASSOCIATE()
        primitive.application_context_name = APPLICATION_CONTEXT
        primitive.calling_ae_title = self.opts.calling_ae_title
        primitive.called_ae_title = self.opts.ae_title
        primitive.presentation_context_definition_list = contexts
        roles = []
        for sop_class in scp_roles:
            role = SCP_SCU_RoleSelectionNegotiation()
            role.sop_class_uid = sop_class
            role.scu_role = False
            role.scp_role = True
            roles.append(role)
        primitive.user_information = [*our_user_items(self.opts.max_pdu), *roles]
        rq = A_ASSOCIATE_RQ()
        rq.from_primitive(primitive)
        self.sock.sendall(rq.encode())
        kind, body = self._read_pdu(_MAX_ASSOCIATE_PDU)
        raw = PDU_HEADER.pack(kind, len(body)) + bytes(body)
        if kind == 0x03:
            rj = A_ASSOCIATE_RJ()
            rj.decode(raw)
            why = rj.to_primitive()
            raise AssociationBroken(f"association rejected by the peer ({why.reason_str})")
        if kind == 0x07:
            raise AssociationBroken("the peer aborted the association request")
        if kind != 0x02:
            raise AssociationBroken(
                f"not a DICOM answer (PDU type 0x{kind:02X}) to the association request"
            )
        ac = A_ASSOCIATE_AC()
        ac.decode(raw)
        answer = ac.to_primitive()
        peer_max = int(answer.maximum_length_received or 0)
        if peer_max:
            self.fragment = max(peer_max - 6, 2)  # 6: PDV length, context ID, control header
        results = negotiate_as_requestor(
            contexts, answer.presentation_context_definition_results_list
        )
        for cx in results:
            if cx.result == 0x00 and cx.context_id is not None:
                by_syntax = self.accepted.setdefault(str(cx.abstract_syntax), {})
                by_syntax.setdefault(str(cx.transfer_syntax[0]), cx.context_id)
                self.contexts[cx.context_id] = (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
        self.proposed = len(contexts)

    # -- PDUs -------------------------------------------------------------------------------

    def _read_pdu(self, limit: int = 0) -> tuple[int, bytearray]:
        """(PDU type, body) of the next PDU; at most ``limit`` bytes (our max_pdu if 0)."""
        try:
            return self.reader.read(limit or self.opts.max_pdu or _MAX_READ)
        except PduTooLong as exc:
            raise AssociationBroken(
                f"the peer sent a PDU of {exc.length} bytes, more than we accept"
            ) from exc

    def _next_pdv(self) -> tuple[int, bytes]:
        """The next PDV of the peer's P-DATA-TF PDUs: (message control header, value)."""
        while not self.pdvs:
            kind, body = self._read_pdu()
            if kind == 0x07:
                raise PeerClosed("the peer aborted the association")
            if kind != 0x04:
                raise AssociationBroken(f"unexpected PDU type 0x{kind:02X} from the peer")
            pos = 0
            while pos < len(body):
                if pos + 6 > len(body):
                    raise AssociationBroken("a malformed P-DATA-TF PDU from the peer")
                length, context, control = struct.unpack_from(">LBB", body, pos)
                if length < 2 or pos + 4 + length > len(body):
                    raise AssociationBroken("a malformed P-DATA-TF PDU from the peer")
                self.pdvs.append((context, control, bytes(body[pos + 6 : pos + 4 + length])))
                pos += 4 + length
        self.last_context, control, value = self.pdvs.popleft()
        return control, value

    def _pdus(
        self, context_id: int, control: int, source: BinaryIO, length: int
    ) -> Iterator[bytes]:
        """``length`` bytes of ``source`` as P-DATA-TF PDUs of one PDV each, no larger than the
        peer accepts: header and value alternately. ``control`` is 0x01 for a command, 0x00
        for a data set; the last fragment gets 0x02 added."""
        left = length
        while True:
            chunk = source.read(min(self.fragment, left))
            left -= len(chunk)
            if not chunk and left:  # part of the message is out: only an abort ends it now
                raise AssociationBroken("a file got shorter while it was being sent")
            flags = control | (0x02 if left == 0 else 0x00)
            yield _PDV_HEADER.pack(0x04, len(chunk) + 6, len(chunk) + 2, context_id, flags)
            yield chunk
            if left == 0:
                return

    def _send(
        self, context_id: int, command: bytes, data: BinaryIO | None, length: int = 0
    ) -> None:
        """Write a request (``data`` None: a command without a data set). PDUs are gathered
        into writes of about 256 KiB: with Nagle off, each write is a segment of its own, and
        a small file then goes out in one."""
        pdus = itertools.chain(
            self._pdus(context_id, 0x01, io.BytesIO(command), len(command)),
            self._pdus(context_id, 0x00, data, length) if data is not None else (),
        )
        with self._io(self.opts.network_timeout, "sending a request"):
            batch: list[bytes] = []
            size = 0
            for part in pdus:
                batch.append(part)
                size += len(part)
                if size >= _WRITE_SIZE:
                    self.sock.sendall(b"".join(batch))
                    batch, size = [], 0
            if batch:
                self.sock.sendall(b"".join(batch))

    def _response(self) -> tuple[bytes, bytes | None]:
        """The next response: its command set and its data set (None when it has none)."""
        with self._io(self.opts.dimse_timeout, "waiting for a response"):
            command = bytearray()
            while True:
                control, value = self._next_pdv()
                if not control & 0x01:
                    raise AssociationBroken("the peer sent a data set before its command")
                command += value
                if control & 0x02:
                    break
            if _us(command, 0x0800) == _NO_DATASET:
                return bytes(command), None
            data = bytearray()
            while True:
                control, value = self._next_pdv()
                data += value
                if control & 0x02:
                    return bytes(command), bytes(data)

    def _next_id(self) -> int:
        self.message_id = self.message_id % 0xFFFF + 1
        return self.message_id

    def _status(self, response: bytes) -> int:
        """Status (0000,0900) of a response to our last request (0000,0120)."""
        status = _us(response, 0x0900)
        if status is None or _us(response, 0x0120) != self.message_id:
            raise AssociationBroken("the peer answered another message, or without a status")
        return status

    # -- services ---------------------------------------------------------------------------

    def store(self, path: Path, sop_class_uid: str, sop_instance_uid: str) -> StoreResult:
        """C-STORE the Part 10 file at ``path``, which must hold ``sop_instance_uid`` (checked
        against its Media Storage SOP Instance UID (0002,0003)); its transfer syntax is read
        from (0002,0010). Per-instance problems come back as ``ok`` False."""
        try:
            with self._dataset(path, sop_class_uid, sop_instance_uid) as (cx_id, data, length):
                command = _command(C_STORE_RQ, self._next_id(), sop_class_uid, sop_instance_uid)
                self._send(cx_id, command, data, length)
        except _Unsendable as exc:
            return StoreResult(None, str(exc))
        status = self._status(self._response()[0])
        return StoreResult(status, "" if status == 0 else _status_text(status))

    @contextlib.contextmanager
    def _dataset(
        self, path: Path, sop_class_uid: str, sop_instance_uid: str
    ) -> Iterator[tuple[int, BinaryIO, int]]:
        """(context ID, data set source, its length in bytes) for the file at ``path``."""
        syntaxes = self.accepted.get(sop_class_uid)
        if not syntaxes:
            raise _Unsendable("SOP class not accepted")
        try:
            meta, offset = split_dataset(path)
            stored = UID(str(meta.TransferSyntaxUID))
            held = str(meta.MediaStorageSOPInstanceUID)
        except Exception as exc:  # any unreadable file concerns this instance only
            raise _Unsendable(f"cannot read the file ({type(exc).__name__})") from exc
        if held != sop_instance_uid:
            raise _Unsendable("the file holds another instance than the one queued")
        if stored in syntaxes:
            try:
                f = path.open("rb")
            except OSError as exc:
                raise _Unsendable(f"cannot read the file ({short_reason(exc)})") from exc
            with f:
                length = f.seek(0, io.SEEK_END) - offset
                f.seek(offset)
                yield syntaxes[stored], f, length
            return
        target = next((UID(ts) for ts in UNCOMPRESSED if ts in syntaxes), None)
        if target is None:
            raise _Unsendable(f"the peer accepts this SOP class, but not in {stored.name}")
        data = _reencode(path, stored, target)
        yield syntaxes[target], io.BytesIO(data), len(data)

    def echo(self) -> str | None:
        """C-ECHO: None when the peer answered Success, else why not (no PHI)."""
        syntaxes = self.accepted.get(VERIFICATION)
        if not syntaxes:
            return "the peer does not accept C-ECHO (Verification) from us"
        context_id = next(iter(syntaxes.values()))
        command = _command(C_ECHO_RQ, self._next_id(), VERIFICATION, dataset=False)
        self._send(context_id, command, None)
        status = self._status(self._response()[0])
        if status != 0x0000:
            return f"the peer answered the C-ECHO with {_status_text(status)}"
        return None

    def find(self, query: Dataset) -> list[Dataset] | str:
        """The identifiers of a Study Root C-FIND's pending responses, in order; a text when
        the peer takes no such queries from us or refuses this one."""
        return self._find(query)

    def _find(self, query: Dataset) -> list[Dataset] | str:
        """The identifiers of a Study Root C-FIND's pending responses, in order; a text when
        the peer takes no such queries from us or refuses this one."""
        syntaxes = self.accepted.get(STUDY_ROOT_FIND)
        if not syntaxes:
            return "the peer does not accept Study Root C-FIND queries from us"
        syntax, context_id = next(iter(syntaxes.items()))
        implicit = UID(syntax).is_implicit_VR
        identifier = encode(query, implicit, True) or b""
        command = _command(C_FIND_RQ, self._next_id(), STUDY_ROOT_FIND)
        self._send(context_id, command, io.BytesIO(identifier), len(identifier))
        matches: list[Dataset] = []
        while True:
            response, data = self._response()
            status = self._status(response)
            if status not in _PENDING:
                break
            try:
                match = decode(io.BytesIO(data or b""), implicit, True)
                for elem in match:  # decode every value now: a malformed one fails here
                    _ = elem.value
            except Exception as exc:  # a malformed identifier, whatever the cause
                raise AssociationBroken(
                    f"the peer's C-FIND answer cannot be read ({type(exc).__name__})"
                ) from exc
            matches.append(match)
        if status != 0x0000:
            return f"the peer refused the C-FIND query ({_status_text(status)})"
        return matches

    def move(self, identifier: Dataset, destination: str) -> MoveResult | str:
        """A Study Root C-MOVE of what ``identifier`` names (its Query/Retrieve Level
        (0008,0052) and unique keys) to the AE ``destination``; the final response (the
        pending ones only report progress); a text when the peer takes no such requests from
        us."""
        syntaxes = self.accepted.get(STUDY_ROOT_MOVE)
        if not syntaxes:
            return "the peer does not accept Study Root C-MOVE requests from us"
        syntax, context_id = next(iter(syntaxes.items()))
        data = encode(identifier, UID(syntax).is_implicit_VR, True) or b""
        command = _command(
            C_MOVE_RQ, self._next_id(), STUDY_ROOT_MOVE, move_destination=destination
        )
        self._send(context_id, command, io.BytesIO(data), len(data))
        while True:
            response, _ = self._response()
            status = self._status(response)
            if status not in _PENDING:
                break
        return _retrieve_result(response, status)

    def get(self, identifier: Dataset, on_store: StoreHandler) -> MoveResult | str:
        """A Study Root C-GET of what ``identifier`` names: the peer sends each instance as a
        C-STORE on this association, which ``on_store`` files (it returns the C-STORE status);
        the final C-GET response as a :class:`MoveResult`; a text when the peer takes no
        C-GET from us."""
        syntaxes = self.accepted.get(STUDY_ROOT_GET)
        if not syntaxes:
            return "the peer does not accept Study Root C-GET requests from us"
        syntax, context_id = next(iter(syntaxes.items()))
        data = encode(identifier, UID(syntax).is_implicit_VR, True) or b""
        self._send(
            context_id,
            _command(C_GET_RQ, self._next_id(), STUDY_ROOT_GET),
            io.BytesIO(data),
            len(data),
        )
        while True:
            response, dataset = self._response()
            if _us(response, 0x0100) == C_STORE_RQ:
                self._answer_store(response, dataset, on_store)
                continue
            status = self._status(response)
            if status not in _PENDING:
                break
        return _retrieve_result(response, status)

    def _answer_store(self, request: bytes, dataset: bytes | None, on_store: StoreHandler) -> None:
        """File one C-STORE of a C-GET through ``on_store`` and answer it."""
        context = self.last_context
        try:
            command = decode_command(request)
        except CommandError as exc:
            raise AssociationBroken(f"a C-STORE request that cannot be read ({exc})") from exc
        sop_class, syntax = self.contexts.get(context, ("", ""))
        if dataset is None or not syntax:
            status = 0xC000  # cannot understand
        else:
            try:
                status = on_store(
                    command.sop_class_uid or sop_class, command.sop_instance_uid, syntax, dataset
                )
            except Exception:  # the guard: a handler failure is a status, not a crash
                log.exception("C-STORE handler of a C-GET failed")
                status = 0xA700
        self._send(context, encode_response(command, status), None)

    def count_instances(self, study_uid: str) -> int | str:
        """Number of Study Related Instances (0020,1208) the peer reports for the study, by a
        Study Root C-FIND on Study Instance UID (0020,000D) (0 when no study matches); a text
        when there is no count."""
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = study_uid
        query.NumberOfStudyRelatedInstances = None
        matches = self._find(query)
        if isinstance(matches, str):
            return matches
        if not matches:
            return 0
        value = matches[0].get("NumberOfStudyRelatedInstances")
        if value in (None, ""):
            return "the peer did not report Number of Study Related Instances (0020,1208)"
        try:
            return int(value)
        except (TypeError, ValueError) as exc:
            raise AssociationBroken("the peer's C-FIND answer cannot be read (count)") from exc

    def list_instances(self, study_uid: str, series_uid: str) -> set[str] | str:
        """SOP Instance UIDs (0008,0018) the peer holds in one series: a Study Root C-FIND at
        IMAGE level with the Study and Series Instance UIDs (0020,000D), (0020,000E) as unique
        keys of the levels above (a hierarchical query, PS3.4 C.4.1.2.1); a text when the peer
        gives no answer."""
        query = Dataset()
        query.QueryRetrieveLevel = "IMAGE"
        query.StudyInstanceUID = study_uid
        query.SeriesInstanceUID = series_uid
        query.SOPInstanceUID = ""
        matches = self._find(query)
        if isinstance(matches, str):
            return matches
        return {str(m.get("SOPInstanceUID", "")) for m in matches} - {""}

    def request_commitment(
        self, transaction_uid: str, instances: Sequence[tuple[str, str]]
    ) -> str | None:
        """Ask the peer to commit to keeping ``instances`` ((SOP Class UID, SOP Instance UID)
        pairs): an N-ACTION-RQ of the Storage Commitment Push Model with Transaction UID
        (0008,1195) and Referenced SOP Sequence (0008,1199). None when the peer took the
        request (its result comes later, in an N-EVENT-REPORT); else why not."""
        syntaxes = self.accepted.get(STORAGE_COMMITMENT)
        if not syntaxes:
            return "the peer does not accept Storage Commitment requests from us"
        syntax, context_id = next(iter(syntaxes.items()))
        request = Dataset()
        request.TransactionUID = transaction_uid
        items = []
        for sop_class, sop_instance in instances:
            item = Dataset()
            item.ReferencedSOPClassUID = sop_class
            item.ReferencedSOPInstanceUID = sop_instance
            items.append(item)
        request.ReferencedSOPSequence = items
        data = encode(request, UID(syntax).is_implicit_VR, True) or b""
        self._send(context_id, _n_action_command(self._next_id()), io.BytesIO(data), len(data))
        status = self._status(self._response()[0])
        if status != 0x0000:
            return f"the peer refused the Storage Commitment request ({_status_text(status)})"
        return None

    def idle_closed(self) -> bool:
        """Whether the peer has ended the association while it was idle (it sent something
        unasked: an A-RELEASE-RQ, an A-ABORT, or closed the connection), so it cannot be
        reused; checked without waiting."""
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable) or bool(self.pdvs)

    def release(self) -> None:
        """A-RELEASE; the peer's data and aborts after our request are of no interest."""
        try:
            with self._io(self.opts.acse_timeout, "releasing the association"):
                self.sock.sendall(_RELEASE_RQ)
                while (kind := self._read_pdu()[0]) not in (0x06, 0x07):
                    log.debug("PDU type 0x%02X during release ignored", kind)
        finally:
            _close(self.sock)

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.settimeout(1.0)
            self.sock.sendall(_ABORT)
        _close(self.sock)


def _reencode(path: Path, stored: UID, target: UID) -> bytes:
    """The data set of the file at ``path`` (stored as ``stored``), decompressed when needed
    (:func:`engine.dicom.codecs.decompress`: YCbCr becomes RGB, a lossy source says so) and
    encoded as ``target`` (Explicit or Implicit VR Little Endian); SOP Instance UID kept."""
    try:
        ds = dcmread(path)
        decompress(ds)
        data = encode(ds, target.is_implicit_VR, target.is_little_endian)
    except Exception as exc:  # an unreadable file, a corrupt stream, an unencodable value
        why = str(exc) if isinstance(exc, DecodeFailed) else type(exc).__name__
        raise _Unsendable(
            f"cannot convert {stored.name} to {target.name}, the only encoding the peer accepts"
            f" for it ({why})"
        ) from exc
    if data is None:
        raise _Unsendable(f"cannot encode the data set as {target.name}")
    return data


def _retrieve_result(response: bytes, status: int) -> MoveResult:
    """The final C-MOVE or C-GET response as a :class:`MoveResult`: its status and the
    sub-operation counts (0000,1021-1023; -1 when absent)."""

    def count(elem: int) -> int:
        value = _us(response, elem)
        return -1 if value is None else value

    detail = "" if status == 0x0000 else _move_status_text(status)
    return MoveResult(status, count(0x1021), count(0x1022), count(0x1023), detail)


def short_reason(exc: BaseException) -> str:
    """A short, PHI-free account of a socket or TLS error."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return str(exc.verify_message)
    text = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)
    return str(text or type(exc).__name__)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.close()
