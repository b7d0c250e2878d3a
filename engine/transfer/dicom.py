"""``dicom``: deliver studies to a DICOM peer by C-STORE (a PACS, Orthanc, XNAT's receiver).

Options (``schemas/destinations/dicom.schema.json``)::

    destinations:
      pacs:
        type: dicom
        host: pacs.example.org
        port: 11112
        ae_title: RESEARCH_PACS        # the peer's (called) AE title
        calling_ae_title: FIONA        # ours, as the peer knows it
        verify_count: true             # Study Root C-FIND count after sending
        tls:                           # optional; paths relative to the project file
          ca_file: tls/pacs-ca.pem
          cert_file: tls/fiona.pem
          key_file: tls/fiona.key

One association per study, reused for all its instances. Each SOP class of the batch is
proposed once per transfer syntax its files have (that syntax alone, so the peer cannot pick an
uncompressed one when it also takes the compressed one), plus one context with whichever of
Explicit and Implicit VR Little Endian was not proposed yet, as a fallback. A file goes on the
wire as it is stored (the data set bytes after its meta header, never decoded) when its own
syntax was accepted; otherwise it is read with pydicom, decompressed if needed and re-encoded
for the accepted uncompressed syntax. More than 128 contexts (the protocol's limit) split the
study over several associations, by SOP class.

Why the data phase is not pynetdicom's ``Association.send_c_store`` (measured here, 3.0.4):

- *The stall.* An association runs a reactor thread that polls the DIMSE message queue, and
  ``send_c_store`` pauses it by clearing ``_reactor_checkpoint`` and spinning until
  ``_is_paused`` is true. That flag is also true while the reactor is just waking up from the
  previous pause (or has passed its ``wait()`` on a still-set checkpoint): the sender goes on,
  the reactor resumes and calls ``dimse.get_msg(block=False)``, and when the C-STORE-RSP is
  already queued it takes it, logs "Received unexpected C-STORE service message" and drops it
  (instrumented: a Success response taken with the checkpoint cleared). The sender then waits
  the whole DIMSE timeout (30 s) for a response that will never come and aborts. Only fast
  responses land in that window, so small files are hit: with TCP_NODELAY on the sender, 4 of
  15 runs of 400 64x64 files stalled, 1 of 4 of 512x512.
- *Nagle.* pynetdicom leaves Nagle on: the data PDU after the command PDU is a sub-MSS segment
  held until the peer ACKs, and Linux delays that ACK up to 40 ms, so a sender with Nagle did
  not stall (0 of 15 runs: responses come too late for the race) but crawls at ~20 files/s.
- *Speed.* Every PDU crosses two queues and two polling threads (1 ms sleeps); with the stall
  fixed it still reached ~0.3x dcmtk's storescu on 0.5 MB files.

So, as the receiver does (:mod:`engine.net.upper`), pynetdicom's PDU codecs and presentation
context negotiation are used and the association runs on the calling thread: connect (TLS via
an :class:`ssl.SSLContext`), write the request, block reading its response. There is no second
reader of the socket, so no response can be lost, and no timer but the socket's. The socket has
TCP_NODELAY, and a request's PDUs go out in writes of up to 256 KiB (a small file in one).
TCP_QUICKACK is re-armed after each read: a peer with Nagle on (dcmtk without TCP_NODELAY in
its environment) holds part of each response until our ACK, which Linux delays up to 40 ms
(measured against such a storescp, 64x64 files: 22 files/s without TCP_QUICKACK, ~800 with;
dcmtk's storescu, which does not set it, ~20).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import logging
import socket
import ssl
import struct
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from functools import cached_property
from pathlib import Path
from typing import Any, BinaryIO

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.dsutils import decode, encode, split_dataset
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_requestor
from pynetdicom.status import GENERAL_STATUS, STORAGE_SERVICE_CLASS_STATUS, code_to_category

from engine.config.loader import ConfigIssue, format_path
from engine.net.dimse import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from engine.net.transport import tune_accepted_socket
from engine.net.upper import APPLICATION_CONTEXT
from engine.transfer.base import (
    Confirm,
    DeliveryError,
    Destination,
    InstanceResult,
    JsonPath,
    OutgoingInstance,
    StudyBatch,
    resolve,
)

__all__ = ["DicomDestination", "DicomOptions", "TlsOptions"]

log = logging.getLogger(__name__)

#: Study Root Query/Retrieve Information Model - FIND (PS3.4 C.6.2).
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_MAX_CONTEXTS = 128  # odd context IDs 1..255 (PS3.8 9.3.2.2)
_UNLIMITED_FRAGMENT = 1 << 20  # bytes per PDV when the peer announces no PDU limit
_MAX_ASSOCIATE_PDU = 1 << 20  # an A-ASSOCIATE-AC is a few KiB; more is not a DICOM peer
_MAX_READ = 1 << 26  # bytes of one PDU when our max_pdu is 0 (no limit): a sanity bound
_WRITE_SIZE = 1 << 18  # bytes gathered per socket write
_PDU_HEADER = struct.Struct(">BxL")
_PDV_HEADER = struct.Struct(">BxLLBB")  # PDU type, length; PDV length, context, control
_RELEASE_RQ = bytes([0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0])
_ABORT = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0, 0])  # source: service user, no reason
C_STORE_RQ, C_FIND_RQ = 0x0001, 0x0020
_NO_DATASET = 0x0101  # (0000,0800) Command Data Set Type: no data set follows
_PENDING = (0xFF00, 0xFF01)

Proposal = tuple[str, tuple[str, ...]]  # abstract syntax, transfer syntaxes


@dataclass(frozen=True)
class TlsOptions:
    """The ``tls`` option: files resolved against the project file's folder."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    def context(self) -> ssl.SSLContext:
        """A client context that checks the peer's certificate and host name."""
        ctx = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=None if self.ca_file is None else str(self.ca_file)
        )
        if self.cert_file is not None:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx


@dataclass(frozen=True)
class DicomOptions:
    """A ``dicom`` destination's options; timeouts in seconds, ``max_pdu`` in bytes."""

    host: str
    port: int
    ae_title: str
    calling_ae_title: str = "FIONA"
    connect_timeout: float = 10.0
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    max_pdu: int = 16384
    verify_count: bool = False
    tls: TlsOptions | None = None

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any], project_file: Path) -> DicomOptions:
        """From schema-valid options; missing keys take the schema's defaults (tested equal)."""
        names = {f.name for f in fields(cls)} - {"tls"}
        values: dict[str, Any] = {k: v for k, v in options.items() if k in names}
        tls = options.get("tls")
        if isinstance(tls, Mapping):
            values["tls"] = TlsOptions(**{k: resolve(project_file, str(v)) for k, v in tls.items()})
        return cls(**values)


class _Broken(Exception):
    """The association cannot go on (unreachable, rejected, aborted, timed out); no PHI."""


class _Unsendable(Exception):
    """One instance cannot be sent on this association; the message is its result's detail."""


# --------------------------------------------------------------------------- command sets


def _element(elem: int, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\0"  # UIDs are padded with NUL to even length
    return struct.pack("<HHL", 0x0000, elem, len(value)) + value


def _command(field: int, message_id: int, sop_class: str, sop_instance: str = "") -> bytes:
    """A C-STORE-RQ or C-FIND-RQ command set (Implicit VR Little Endian, group 0000) whose
    data set follows: Affected SOP Class/Instance UID (0000,0002)/(0000,1000), Command Field
    (0000,0100), Message ID (0000,0110), Priority (0000,0700) medium."""
    body = b"".join(
        (
            _element(0x0002, sop_class.encode("ascii")),
            _element(0x0100, struct.pack("<H", field)),
            _element(0x0110, struct.pack("<H", message_id)),
            _element(0x0700, struct.pack("<H", 0x0000)),
            _element(0x0800, struct.pack("<H", 0x0000)),
            _element(0x1000, sop_instance.encode("ascii")) if sop_instance else b"",
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


def _status_text(status: int) -> str:
    meaning = STORAGE_SERVICE_CLASS_STATUS.get(status) or GENERAL_STATUS.get(status)
    return f"status 0x{status:04X}" + (f" ({meaning[1]})" if meaning else "")


# --------------------------------------------------------------------------- the association


class _Association:
    """One association as requestor, run on the calling thread with blocking socket I/O."""

    def __init__(self, sock: socket.socket, opts: DicomOptions) -> None:
        self.sock = sock
        self.opts = opts
        self.recv = tune_accepted_socket(sock)  # TCP_NODELAY; ACK at once (TCP_QUICKACK)
        self.pdvs: deque[tuple[int, bytes]] = deque()  # (control header, value) not yet read
        self.fragment = _UNLIMITED_FRAGMENT
        #: SOP class -> accepted transfer syntax -> presentation context ID
        self.accepted: dict[str, dict[str, int]] = {}
        self.proposed = 0
        self.message_id = 0

    @classmethod
    def open(
        cls, opts: DicomOptions, tls: ssl.SSLContext | None, proposals: Sequence[Proposal]
    ) -> _Association:
        """Connect, and negotiate ``proposals`` (abstract syntax, transfer syntaxes)."""
        where = f"{opts.host}:{opts.port}"
        try:
            sock = socket.create_connection((opts.host, opts.port), timeout=opts.connect_timeout)
        except OSError as exc:
            raise _Broken(f"cannot connect to {where} ({_reason(exc)})") from exc
        try:
            if tls is not None:
                sock = tls.wrap_socket(sock, server_hostname=opts.host)
            assoc = cls(sock, opts)
            with assoc._io(opts.acse_timeout, "negotiating the association"):
                assoc._negotiate(proposals)
            return assoc
        except ssl.SSLError as exc:
            _close(sock)
            raise _Broken(f"TLS with {where} failed ({_reason(exc)})") from exc
        except BaseException:
            _close(sock)
            raise

    @contextlib.contextmanager
    def _io(self, timeout: float, what: str) -> Iterator[None]:
        """Socket errors and timeouts during ``what`` as :class:`_Broken`."""
        self.sock.settimeout(timeout)
        try:
            yield
        except TimeoutError as exc:
            raise _Broken(f"timed out after {timeout:g} s {what}") from exc
        except (OSError, EOFError) as exc:
            raise _Broken(f"the connection broke off while {what} ({_reason(exc)})") from exc

    def _negotiate(self, proposals: Sequence[Proposal]) -> None:
        contexts = []
        for i, (abstract, syntaxes) in enumerate(proposals):
            cx = PresentationContext()
            cx.context_id = 2 * i + 1
            cx.abstract_syntax = abstract
            cx.transfer_syntax = list(syntaxes)
            contexts.append(cx)
        max_length = MaximumLengthNotification()
        max_length.maximum_length_received = self.opts.max_pdu
        impl_uid = ImplementationClassUIDNotification()
        impl_uid.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        impl_name = ImplementationVersionNameNotification()
        impl_name.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        primitive = A_ASSOCIATE()
        primitive.application_context_name = APPLICATION_CONTEXT
        primitive.calling_ae_title = self.opts.calling_ae_title
        primitive.called_ae_title = self.opts.ae_title
        primitive.presentation_context_definition_list = contexts
        primitive.user_information = [max_length, impl_uid, impl_name]
        rq = A_ASSOCIATE_RQ()
        rq.from_primitive(primitive)
        self.sock.sendall(rq.encode())
        kind, body = self._read_pdu(_MAX_ASSOCIATE_PDU)
        raw = _PDU_HEADER.pack(kind, len(body)) + bytes(body)
        if kind == 0x03:
            rj = A_ASSOCIATE_RJ()
            rj.decode(raw)
            why = rj.to_primitive()
            raise _Broken(f"association rejected by the peer ({why.reason_str})")
        if kind == 0x07:
            raise _Broken("the peer aborted the association request")
        if kind != 0x02:
            raise _Broken(f"not a DICOM answer (PDU type 0x{kind:02X}) to the association request")
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
        self.proposed = len(contexts)

    # -- PDUs -------------------------------------------------------------------------------

    def _read_pdu(self, limit: int = 0) -> tuple[int, bytearray]:
        """(PDU type, body) of the next PDU; at most ``limit`` bytes (our max_pdu if 0)."""
        header = self.recv(6)
        if len(header) < 6:
            raise EOFError("closed by the peer")
        kind, length = _PDU_HEADER.unpack(header)
        if length > (limit or self.opts.max_pdu or _MAX_READ):
            raise _Broken(f"the peer sent a PDU of {length} bytes, more than we accept")
        body = self.recv(length)
        if len(body) < length:
            raise EOFError("closed by the peer")
        return kind, body

    def _next_pdv(self) -> tuple[int, bytes]:
        """The next PDV of the peer's P-DATA-TF PDUs: (message control header, value)."""
        while not self.pdvs:
            kind, body = self._read_pdu()
            if kind == 0x07:
                raise _Broken("the peer aborted the association")
            if kind != 0x04:
                raise _Broken(f"unexpected PDU type 0x{kind:02X} from the peer")
            pos = 0
            while pos < len(body):
                if pos + 6 > len(body):
                    raise _Broken("a malformed P-DATA-TF PDU from the peer")
                length, _context, control = struct.unpack_from(">LBB", body, pos)
                if length < 2 or pos + 4 + length > len(body):
                    raise _Broken("a malformed P-DATA-TF PDU from the peer")
                self.pdvs.append((control, bytes(body[pos + 6 : pos + 4 + length])))
                pos += 4 + length
        return self.pdvs.popleft()

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
                raise _Broken("a file got shorter while it was being sent")
            flags = control | (0x02 if left == 0 else 0x00)
            yield _PDV_HEADER.pack(0x04, len(chunk) + 6, len(chunk) + 2, context_id, flags)
            yield chunk
            if left == 0:
                return

    def _send(self, context_id: int, command: bytes, data: BinaryIO, length: int) -> None:
        """Write a request. PDUs are gathered into writes of about 256 KiB: with Nagle off,
        each write is a segment of its own, and a small file then goes out in one."""
        pdus = itertools.chain(
            self._pdus(context_id, 0x01, io.BytesIO(command), len(command)),
            self._pdus(context_id, 0x00, data, length),
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
                    raise _Broken("the peer sent a data set before its command")
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
            raise _Broken("the peer answered another message, or without a status")
        return status

    # -- services ---------------------------------------------------------------------------

    def store(self, instance: OutgoingInstance) -> InstanceResult:
        """C-STORE one instance; per-instance problems come back as ``ok`` False."""
        uid = instance.sop_instance_uid
        try:
            with self._dataset(instance) as (context_id, data, length):
                command = _command(C_STORE_RQ, self._next_id(), instance.sop_class_uid, uid)
                self._send(context_id, command, data, length)
        except _Unsendable as exc:
            return InstanceResult(uid, False, None, str(exc))
        status = self._status(self._response()[0])
        ok = code_to_category(status) in ("Success", "Warning")
        return InstanceResult(uid, ok, status, "" if status == 0 else _status_text(status))

    @contextlib.contextmanager
    def _dataset(self, instance: OutgoingInstance) -> Iterator[tuple[int, BinaryIO, int]]:
        """(context ID, data set source, its length in bytes) for ``instance``."""
        syntaxes = self.accepted.get(instance.sop_class_uid)
        if not syntaxes:
            raise _Unsendable("SOP class not accepted")
        try:
            meta, offset = split_dataset(instance.path)
            stored = UID(str(meta.TransferSyntaxUID))
            held = str(meta.MediaStorageSOPInstanceUID)
        except Exception as exc:  # any unreadable file concerns this instance only
            raise _Unsendable(f"cannot read the file ({type(exc).__name__})") from exc
        if held != instance.sop_instance_uid:
            raise _Unsendable("the file holds another instance than the one queued")
        if stored in syntaxes:
            try:
                f = instance.path.open("rb")
            except OSError as exc:
                raise _Unsendable(f"cannot read the file ({_reason(exc)})") from exc
            with f:
                length = f.seek(0, io.SEEK_END) - offset
                f.seek(offset)
                yield syntaxes[stored], f, length
            return
        target = next((UID(ts) for ts in _UNCOMPRESSED if ts in syntaxes), None)
        if target is None:
            raise _Unsendable(f"the peer accepts this SOP class, but not in {stored.name}")
        data = _reencode(instance.path, stored, target)
        yield syntaxes[target], io.BytesIO(data), len(data)

    def count_instances(self, study_uid: str) -> int | str:
        """Number of Study Related Instances (0020,1208) the peer reports for the study, by a
        Study Root C-FIND on Study Instance UID (0020,000D); a text when there is no count."""
        syntaxes = self.accepted.get(STUDY_ROOT_FIND)
        if not syntaxes:
            return "the peer does not accept Study Root C-FIND queries from us"
        syntax, context_id = next(iter(syntaxes.items()))
        implicit = UID(syntax).is_implicit_VR
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = study_uid
        query.NumberOfStudyRelatedInstances = None
        identifier = encode(query, implicit, True) or b""
        command = _command(C_FIND_RQ, self._next_id(), STUDY_ROOT_FIND)
        self._send(context_id, command, io.BytesIO(identifier), len(identifier))
        counts: list[int | None] = []
        while True:
            response, data = self._response()
            status = self._status(response)
            if status not in _PENDING:
                break
            try:
                value = decode(io.BytesIO(data or b""), implicit, True).get(
                    "NumberOfStudyRelatedInstances"
                )
                counts.append(None if value in (None, "") else int(value))
            except Exception as exc:  # a malformed identifier: no count, whatever the cause
                raise _Broken(
                    f"the peer's C-FIND answer cannot be read ({type(exc).__name__})"
                ) from exc
        if status != 0x0000:
            return f"the peer refused the C-FIND query ({_status_text(status)})"
        if not counts:
            return "the peer does not know the study (C-FIND found no match)"
        if counts[0] is None:
            return "the peer did not report Number of Study Related Instances (0020,1208)"
        return counts[0]

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
    """The data set of the file at ``path`` (stored as ``stored``), decompressed when needed and
    encoded as ``target`` (Explicit or Implicit VR Little Endian); SOP Instance UID kept."""
    try:
        ds = dcmread(path)
        if stored.is_compressed:
            ds.decompress(generate_instance_uid=False)
        data = encode(ds, target.is_implicit_VR, target.is_little_endian)
    except Exception as exc:  # decoders raise many kinds (missing plugin, corrupt stream)
        raise _Unsendable(
            f"cannot convert {stored.name} to {target.name}, the only encoding the peer accepts"
            f" for it ({type(exc).__name__})"
        ) from exc
    if data is None:
        raise _Unsendable(f"cannot encode the data set as {target.name}")
    return data


def _reason(exc: BaseException) -> str:
    """A short, PHI-free account of a socket or TLS error."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return str(exc.verify_message)
    text = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)
    return str(text or type(exc).__name__)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.close()


# --------------------------------------------------------------------------- the destination


def _proposals(instances: Sequence[OutgoingInstance]) -> list[Proposal]:
    """Each (SOP class, file transfer syntax) alone, then the uncompressed fallback."""
    found: dict[str, list[str]] = {}
    for instance in instances:
        syntaxes = found.setdefault(instance.sop_class_uid, [])
        if instance.transfer_syntax not in syntaxes:
            syntaxes.append(instance.transfer_syntax)
    out: list[Proposal] = []
    for sop_class, syntaxes in found.items():
        out.extend((sop_class, (ts,)) for ts in syntaxes)
        fallback = tuple(ts for ts in _UNCOMPRESSED if ts not in syntaxes)
        if fallback:
            out.append((sop_class, fallback))
    return out


Plan = tuple[list[Proposal], list[OutgoingInstance]]


def _plan(instances: Sequence[OutgoingInstance]) -> list[Plan]:
    """The associations a study needs: whole SOP classes, packed while their contexts fit."""
    by_class: dict[str, list[Proposal]] = {}
    for proposal in _proposals(instances):
        by_class.setdefault(proposal[0], []).append(proposal)
    plans: list[tuple[list[Proposal], set[str]]] = []
    for sop_class, proposals in by_class.items():
        if not plans or len(plans[-1][0]) + len(proposals) > _MAX_CONTEXTS:
            plans.append(([], set()))
        plans[-1][0].extend(proposals)
        plans[-1][1].add(sop_class)
    return [(p, [i for i in instances if i.sop_class_uid in classes]) for p, classes in plans]


class DicomDestination(Destination):
    """Sends studies by C-STORE (see the module doc)."""

    type = "dicom"

    def __init__(self, name: str, options: Mapping[str, Any], project_file: Path) -> None:
        super().__init__(name, options, project_file)
        self.settings = DicomOptions.from_mapping(options, project_file)

    @cached_property
    def _tls(self) -> ssl.SSLContext | None:
        tls = self.settings.tls
        return None if tls is None else tls.context()

    @contextlib.contextmanager
    def _association(self, proposals: Sequence[Proposal]) -> Iterator[_Association]:
        """An association released after the block, aborted when the block raises."""
        try:
            tls = self._tls
        except (ssl.SSLError, OSError) as exc:  # the CA, certificate or key did not load
            raise _Broken(f"TLS setup failed ({_reason(exc)})") from exc
        assoc = _Association.open(self.settings, tls, proposals)
        try:
            yield assoc
        except BaseException:
            assoc.abort()
            raise
        try:
            assoc.release()
        except _Broken as exc:  # every answer is in: the study is there all the same
            log.warning("destination %s: release failed: %s", self.name, exc)

    def send(self, batch: StudyBatch, already: frozenset[str], confirm: Confirm) -> None:
        pending = [i for i in batch.instances if i.sop_instance_uid not in already]
        answered = 0
        try:
            for proposals, instances in _plan(pending):
                with self._association(proposals) as assoc:
                    log.info(
                        "destination %s: %d instance(s) on one association, %d of %d"
                        " presentation contexts accepted",
                        self.name,
                        len(instances),
                        sum(len(v) for v in assoc.accepted.values()),
                        assoc.proposed,
                    )
                    for instance in instances:
                        confirm(assoc.store(instance))
                        answered += 1
        except _Broken as exc:
            raise DeliveryError(
                f"destination {self.name}: {exc}; {answered} of {len(pending)} instance(s)"
                " answered before"
            ) from exc

    def verify(self, batch: StudyBatch) -> str | None:
        if not self.settings.verify_count:
            return None
        try:
            with self._association([(STUDY_ROOT_FIND, _UNCOMPRESSED)]) as assoc:
                found = assoc.count_instances(batch.study_uid)
        except _Broken as exc:
            return f"C-FIND count at destination {self.name} failed: {exc}"
        if isinstance(found, str):
            return f"C-FIND count at destination {self.name}: {found}"
        expected = len(batch.instances)
        # A follow-up transfer adds series to a study the peer already holds instances of.
        if found == expected or (batch.follow_up and found > expected):
            return None
        more = " or more" if batch.follow_up else ""
        return (
            f"destination {self.name} holds {found} instance(s) of the study, expected"
            f" {expected}{more}"
        )

    @classmethod
    def check(
        cls, options: Mapping[str, Any], file: Path, base_path: JsonPath
    ) -> list[ConfigIssue]:
        tls = options.get("tls")
        if not isinstance(tls, Mapping):
            return []
        issues = []
        for key in ("ca_file", "cert_file", "key_file"):
            if key in tls and not resolve(file, str(tls[key])).is_file():
                path = format_path((*base_path, "tls", key))
                issues.append(ConfigIssue(file, None, path, f"file not found: {tls[key]}"))
        if issues:
            return issues
        try:
            TlsOptions(**{k: resolve(file, str(v)) for k, v in tls.items()}).context()
        except (ssl.SSLError, OSError) as exc:
            path = format_path((*base_path, "tls"))
            issues.append(ConfigIssue(file, None, path, f"cannot load: {_reason(exc)}"))
        return issues
