"""The DICOM upper layer for the receiver: one thread per association, blocking reads.

pynetdicom's association machinery polls its queues with sleeps and runs each association on
two threads; measured here, a bare pynetdicom SCP storing nothing peaks below the receiver's
throughput targets. This module keeps what pynetdicom does well (PDU codecs for association
negotiation, presentation-context negotiation) and replaces the data path with a plain loop:
read a PDU, collect PDV fragments, hand a complete message to the handler, write the response.

Protocol plumbing only: :class:`MessageHandler` decides what a message means and what to answer.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

from engine.net.dimse import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    Command,
    CommandError,
    decode_command,
    encode_response,
)
from engine.net.transport import PDU_HEADER, PduReader, PduTooLong

log = logging.getLogger(__name__)

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
_MAX_ASSOCIATE_PDU = 1 << 20  # an A-ASSOCIATE-RQ is a few KiB; more is not a DICOM peer
_RELEASE_RP = bytes([0x06, 0, 0, 0, 0, 4, 0, 0, 0, 0])


def _abort_pdu(source: int, reason: int) -> bytes:
    return bytes([0x07, 0, 0, 0, 0, 4, 0, 0, source, reason])


@dataclass(frozen=True)
class Peer:
    """One association's identity: AE titles as sent (spaces stripped) and the peer address."""

    calling_ae: str
    called_ae: str
    address: str


class MessageHandler(Protocol):
    """What the application does with complete messages (the receiver implements this)."""

    def on_message(
        self,
        peer: Peer,
        context: PresentationContext,
        command: Command,
        dataset: list[memoryview] | None,
    ) -> int:
        """Handle a request; return the DIMSE status for the response.

        ``dataset`` is the data set's fragments in order, not joined: the handler joins them
        once, with whatever it puts in front.
        """
        ...


@dataclass
class AcceptorConfig:
    """Association acceptance rules.

    ``max_pdu``: the maximum PDU length we advertise (bytes; 0 means unlimited).
    ``allowed_calling_aes``: empty means any calling AE title is accepted.
    Timeouts are in seconds.
    """

    contexts: Sequence[PresentationContext]
    max_pdu: int = 0
    allowed_calling_aes: frozenset[str] = field(default_factory=frozenset)
    max_associations: int = 32
    acse_timeout: float = 30.0
    network_timeout: float = 120.0
    ssl_context: ssl.SSLContext | None = None


def our_user_items(max_pdu: int) -> list[Any]:
    """The user information items fiona sends in an A-ASSOCIATE (RQ or AC): the maximum PDU
    length it receives (bytes; 0 = no limit) and its implementation class UID and version."""
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = max_pdu
    impl_uid = ImplementationClassUIDNotification()
    impl_uid.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    impl_name = ImplementationVersionNameNotification()
    impl_name.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    return [max_length, impl_uid, impl_name]


class ProtocolError(Exception):
    """The peer broke the upper-layer protocol; the association is aborted."""


class _Connection:
    """Blocking PDU I/O on one socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = PduReader(sock)

    def read_pdu(self, limit: int = 0) -> tuple[int, bytearray]:
        try:
            return self.reader.read(limit)
        except PduTooLong as exc:
            raise ProtocolError(str(exc)) from exc

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)


class Association:
    """Runs one association from A-ASSOCIATE-RQ to release or abort."""

    def __init__(
        self, conn: _Connection, address: str, config: AcceptorConfig, handler: MessageHandler
    ) -> None:
        self.conn = conn
        self.address = address
        self.config = config
        self.handler = handler
        self.contexts: dict[int, PresentationContext] = {}
        self.peer = Peer("", "", address)

    # -- association establishment ----------------------------------------------------------

    def negotiate(self, over_limit: bool) -> bool:
        """Answer the A-ASSOCIATE-RQ; return True if the association was accepted."""
        self.conn.sock.settimeout(self.config.acse_timeout)
        pdu_type, body = self.conn.read_pdu(_MAX_ASSOCIATE_PDU)
        if pdu_type != 0x01:
            raise ProtocolError(f"expected A-ASSOCIATE-RQ, got PDU type 0x{pdu_type:02X}")
        rq = A_ASSOCIATE_RQ()
        rq.decode(PDU_HEADER.pack(pdu_type, len(body)) + bytes(body))
        request = rq.to_primitive()
        self.peer = Peer(
            calling_ae=str(request.calling_ae_title).strip(),
            called_ae=str(request.called_ae_title).strip(),
            address=self.address,
        )
        allowed = self.config.allowed_calling_aes
        if over_limit:
            log.warning("association from %s refused: too many associations", self.address)
            self._reject(request, result=0x02, source=0x03, diagnostic=0x02)
            return False
        if allowed and self.peer.calling_ae not in allowed:
            log.warning(
                "association rejected: calling AE %r from %s is not on the allow-list",
                self.peer.calling_ae,
                self.address,
            )
            self._reject(request, result=0x01, source=0x01, diagnostic=0x03)
            return False
        self._accept(request)
        return True

    def _reject(self, request: A_ASSOCIATE, *, result: int, source: int, diagnostic: int) -> None:
        primitive = A_ASSOCIATE()
        primitive.result = result
        primitive.result_source = source
        primitive.diagnostic = diagnostic
        rj = A_ASSOCIATE_RJ()
        rj.from_primitive(primitive)
        self.conn.send(rj.encode())

    def _accept(self, request: A_ASSOCIATE) -> None:
        roles = {
            item.sop_class_uid: (item.scu_role, item.scp_role)
            for item in request.user_information
            if isinstance(item, SCP_SCU_RoleSelectionNegotiation) and item.sop_class_uid
        }
        results, role_items = negotiate_as_acceptor(
            request.presentation_context_definition_list,
            list(self.config.contexts),
            roles or None,
        )
        self.contexts = {
            cx.context_id: cx for cx in results if cx.result == 0x00 and cx.context_id is not None
        }
        primitive = A_ASSOCIATE()
        primitive.application_context_name = APPLICATION_CONTEXT
        primitive.calling_ae_title = request.calling_ae_title
        primitive.called_ae_title = request.called_ae_title
        primitive.result = 0x00
        primitive.result_source = 0x01
        primitive.presentation_context_definition_results_list = results
        primitive.user_information = [*our_user_items(self.config.max_pdu), *role_items]
        ac = A_ASSOCIATE_AC()
        ac.from_primitive(primitive)
        self.conn.send(ac.encode())
        log.info(
            "association from %s (%s) to %s: %d of %d contexts accepted",
            self.peer.calling_ae,
            self.address,
            self.peer.called_ae,
            len(self.contexts),
            len(results),
        )

    # -- data transfer ----------------------------------------------------------------------

    def serve(self) -> None:
        """Read P-DATA until release or abort, dispatching each complete message."""
        self.conn.sock.settimeout(self.config.network_timeout or None)
        command = bytearray()
        dataset: list[memoryview] = []
        pending: Command | None = None
        context_id = 0
        while True:
            pdu_type, body = self.conn.read_pdu()
            if pdu_type == 0x05:  # A-RELEASE-RQ
                self.conn.send(_RELEASE_RP)
                return
            if pdu_type == 0x07:  # A-ABORT
                log.info("association from %s aborted by the peer", self.peer.calling_ae)
                return
            if pdu_type != 0x04:
                raise ProtocolError(f"unexpected PDU type 0x{pdu_type:02X}")
            for pdv_context, control, start, end in _pdvs(body):
                if pdv_context not in self.contexts:
                    raise ProtocolError(f"PDV on unaccepted presentation context {pdv_context}")
                context_id = pdv_context
                if control & 0x01:  # command fragment
                    command += body[start:end]
                    if control & 0x02:
                        pending = _decode(command)
                        command = bytearray()
                        if not pending.has_dataset:
                            self._dispatch(context_id, pending, None)
                            pending = None
                else:
                    if pending is None:
                        raise ProtocolError("dataset fragment before its command")
                    # Each PDU body is a fresh buffer, so views of it stay valid: no copy here.
                    dataset.append(memoryview(body)[start:end])
                    if control & 0x02:
                        self._dispatch(context_id, pending, dataset)
                        dataset = []
                        pending = None

    def _dispatch(
        self, context_id: int, command: Command, dataset: list[memoryview] | None
    ) -> None:
        context = self.contexts[context_id]
        status = self.handler.on_message(self.peer, context, command, dataset)
        response = encode_response(command, status)
        # One P-DATA-TF with one PDV: the command, last fragment (control header 0x03).
        pdv = struct.pack(">LBB", len(response) + 2, context_id, 0x03) + response
        self.conn.send(PDU_HEADER.pack(0x04, len(pdv)) + pdv)


def _decode(command: bytearray) -> Command:
    try:
        return decode_command(bytes(command))
    except CommandError as exc:
        raise ProtocolError(str(exc)) from exc


def _pdvs(body: bytearray) -> list[tuple[int, int, int, int]]:
    """(context id, message control header, value start, value end) of each PDV item."""
    out = []
    pos, end = 0, len(body)
    while pos < end:
        if pos + 6 > end:
            raise ProtocolError("P-DATA-TF ends inside a PDV item header")
        length, context_id, control = struct.unpack_from(">LBB", body, pos)
        if length < 2 or pos + 4 + length > end:
            raise ProtocolError("PDV item length out of bounds")
        out.append((context_id, control, pos + 6, pos + 4 + length))
        pos += 4 + length
    return out


class AssociationServer:
    """Listens on a TCP port and runs each association on its own thread."""

    def __init__(
        self, address: tuple[str, int], config: AcceptorConfig, handler: MessageHandler
    ) -> None:
        self.config = config
        self.handler = handler
        self.socket = socket.create_server(address, reuse_port=False, backlog=64)
        self._active = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name="scp-accept", daemon=True)

    def start(self) -> AssociationServer:
        self._thread.start()
        return self

    def _accept_loop(self) -> None:
        # A short accept timeout lets shutdown() stop the loop: closing a socket from another
        # thread does not wake a blocked accept() on Linux.
        self.socket.settimeout(0.5)
        while not self._stopping.is_set():
            try:
                sock, address = self.socket.accept()
                sock.settimeout(None)
            except TimeoutError:
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                continue
            threading.Thread(
                target=self._run, args=(sock, address[0]), name=f"assoc-{address[0]}", daemon=True
            ).start()

    def _run(self, sock: socket.socket, address: str) -> None:
        with self._lock:
            self._active += 1
            over_limit = self._active > self.config.max_associations
        try:
            sock = self._wrap(sock)
            association = Association(_Connection(sock), address, self.config, self.handler)
            if association.negotiate(over_limit):
                association.serve()
        except EOFError:
            log.info("connection from %s closed", address)
        except TimeoutError:
            log.warning("association from %s timed out; aborting", address)
            _send_quietly(sock, _abort_pdu(0x02, 0x00))
        except ProtocolError as exc:
            log.warning("protocol error from %s: %s; aborting", address, exc)
            _send_quietly(sock, _abort_pdu(0x02, 0x00))
        except (OSError, ssl.SSLError) as exc:
            log.warning("connection from %s failed: %s", address, exc)
        except Exception:
            log.exception("association from %s failed", address)
            _send_quietly(sock, _abort_pdu(0x02, 0x00))
        finally:
            with self._lock:
                self._active -= 1
            _close(sock)

    def _wrap(self, sock: socket.socket) -> socket.socket:
        if self.config.ssl_context is None:
            return sock
        sock.settimeout(self.config.acse_timeout)
        return self.config.ssl_context.wrap_socket(sock, server_side=True)

    def shutdown(self) -> None:
        self._stopping.set()
        _close(self.socket)
        self._thread.join(timeout=5)


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):
        sock.sendall(data)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.close()
