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
import time
from collections import OrderedDict
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

import engine.dicom.pydicom_setup  # noqa: F401  (pydicom's settings: no value in any log)
from engine import metrics
from engine.net.dimse import (
    C_STORE_RQ,
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    OUT_OF_RESOURCES,
    Command,
    CommandError,
    Reply,
    decode_command,
    encode_response,
)
from engine.net.transport import PDU_HEADER, PduReader, PduTooLong

log = logging.getLogger(__name__)

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
_MAX_ASSOCIATE_PDU = 1 << 20  # an A-ASSOCIATE-RQ is a few KiB; more is not a DICOM peer
_MAX_COMMAND = 1 << 16  # a command set is a few hundred bytes; more is not a DICOM peer
_RELEASE_RP = bytes([0x06, 0, 0, 0, 0, 4, 0, 0, 0, 0])
#: A-ASSOCIATE-RJ: rejected-transient, by the service provider (presentation related
#: function), local limit exceeded (PS3.8 9.3.4), sent to connections over a limit.
_BUSY_RJ = bytes([0x03, 0, 0, 0, 0, 4, 0, 0x02, 0x03, 0x02])


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
    ) -> int | Reply:
        """Handle a request; return the DIMSE status for the response (a :class:`Reply`
        when the response carries more).

        ``dataset`` is the data set's fragments in order, not joined: the handler joins them
        once, with whatever it puts in front.
        """
        ...


@dataclass
class AcceptorConfig:
    """Association acceptance rules.

    ``max_pdu``: the maximum PDU length we advertise (bytes; 0 means unlimited); a longer PDU
    aborts the association before its body is read.
    ``max_dataset``: the largest data set one message may carry (bytes; 0 means unlimited);
    past it the rest of the data set is discarded as it arrives and the request is answered
    0xA700.
    ``allowed_calling_aes``: empty means any calling AE title is accepted.
    ``max_associations`` (in all) and ``max_associations_per_peer`` (per peer IP address)
    count connections from accept to close; one over either is refused at once, without a
    thread. Timeouts are in seconds; ``acse_timeout`` is the whole deadline for association
    set-up (TLS handshake and A-ASSOCIATE-RQ), ``network_timeout`` the idle limit after it.
    """

    contexts: Sequence[PresentationContext]
    max_pdu: int = 0
    max_dataset: int = 0
    allowed_calling_aes: frozenset[str] = field(default_factory=frozenset)
    max_associations: int = 32
    max_associations_per_peer: int = 8
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


@dataclass(frozen=True)
class _Answer:
    """What an A-ASSOCIATE-RQ is answered with, under one :class:`AcceptorConfig`: the AE
    titles it names, the contexts accepted (by ID) and the encoded A-ASSOCIATE-AC, with the
    number of contexts proposed (for the log)."""

    calling_ae: str
    called_ae: str
    contexts: dict[int, PresentationContext]
    ac: bytes
    proposed: int


class Negotiations:
    """Answers to A-ASSOCIATE-RQs, kept by the request's bytes.

    A PACS or modality sends the same request for every association (a C-MOVE opens one per
    request), and decoding it and negotiating its presentation contexts with pynetdicom costs
    a few milliseconds of the interpreter per hundred contexts: the answer depends on nothing
    but the request and the acceptor's config, so it is worked out once. At most
    :data:`SIZE` requests of up to :data:`MAX_KEY` bytes are kept (the oldest dropped first).
    """

    SIZE = 32
    MAX_KEY = 1 << 16

    def __init__(self, config: AcceptorConfig) -> None:
        self.config = config
        self._kept: OrderedDict[bytes, _Answer] = OrderedDict()
        self._lock = threading.Lock()

    def answer(self, body: bytes) -> _Answer:
        """The answer to the A-ASSOCIATE-RQ whose PDU body is ``body``."""
        with self._lock:
            kept = self._kept.get(body)
            if kept is not None:
                self._kept.move_to_end(body)
                return kept
        answer = self._work_out(body)
        if len(body) <= self.MAX_KEY:
            with self._lock:
                self._kept[body] = answer
                while len(self._kept) > self.SIZE:
                    self._kept.popitem(last=False)
        return answer

    def _work_out(self, body: bytes) -> _Answer:
        rq = A_ASSOCIATE_RQ()
        rq.decode(PDU_HEADER.pack(0x01, len(body)) + body)
        request = rq.to_primitive()
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
        return _Answer(
            calling_ae=str(request.calling_ae_title).strip(),
            called_ae=str(request.called_ae_title).strip(),
            contexts={
                cx.context_id: cx
                for cx in results
                if cx.result == 0x00 and cx.context_id is not None
            },
            ac=ac.encode(),
            proposed=len(results),
        )


class Association:
    """Runs one association from A-ASSOCIATE-RQ to release or abort."""

    def __init__(
        self,
        conn: _Connection,
        address: str,
        config: AcceptorConfig,
        handler: MessageHandler,
        negotiations: Negotiations | None = None,
    ) -> None:
        self.conn = conn
        self.address = address
        self.config = config
        self.handler = handler
        self.negotiations = negotiations or Negotiations(config)
        self.contexts: dict[int, PresentationContext] = {}
        self.peer = Peer("", "", address)

    # -- association establishment ----------------------------------------------------------

    def negotiate(self, deadline: float) -> bool:
        """Answer the A-ASSOCIATE-RQ, which must arrive whole before ``deadline`` (a
        ``time.monotonic()`` value); return True if the association was accepted."""
        self.conn.reader.deadline = deadline
        try:
            pdu_type, body = self.conn.read_pdu(_MAX_ASSOCIATE_PDU)
        finally:
            self.conn.reader.deadline = None
        if pdu_type != 0x01:
            raise ProtocolError(f"expected A-ASSOCIATE-RQ, got PDU type 0x{pdu_type:02X}")
        answer = self.negotiations.answer(bytes(body))
        self.peer = Peer(answer.calling_ae, answer.called_ae, self.address)
        allowed = self.config.allowed_calling_aes
        if allowed and self.peer.calling_ae not in allowed:
            log.warning(
                "association rejected: calling AE %r from %s is not on the allow-list",
                self.peer.calling_ae,
                self.address,
            )
            self._reject(result=0x01, source=0x01, diagnostic=0x03)
            return False
        self.contexts = dict(answer.contexts)
        self.conn.send(answer.ac)
        log.info(
            "association from %s (%s) to %s: %d of %d contexts accepted",
            self.peer.calling_ae,
            self.address,
            self.peer.called_ae,
            len(self.contexts),
            answer.proposed,
        )
        return True

    def _reject(self, *, result: int, source: int, diagnostic: int) -> None:
        primitive = A_ASSOCIATE()
        primitive.result = result
        primitive.result_source = source
        primitive.diagnostic = diagnostic
        rj = A_ASSOCIATE_RJ()
        rj.from_primitive(primitive)
        self.conn.send(rj.encode())

    # -- data transfer ----------------------------------------------------------------------

    def serve(self) -> None:
        """Read P-DATA until release or abort, dispatching each complete message."""
        self.conn.sock.settimeout(self.config.network_timeout or None)
        max_pdu, max_dataset = self.config.max_pdu, self.config.max_dataset
        command = bytearray()
        dataset: list[memoryview] = []
        size = 0  # bytes of the current data set so far; -1 once it is over max_dataset
        pending: Command | None = None
        context_id = 0
        while True:
            pdu_type, body = self.conn.read_pdu(max_pdu)
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
                    if len(command) > _MAX_COMMAND:
                        raise ProtocolError(f"command set longer than {_MAX_COMMAND} bytes")
                    if control & 0x02:
                        pending = _decode(command)
                        command = bytearray()
                        if not pending.has_dataset:
                            self._dispatch(context_id, pending, None)
                            pending = None
                else:
                    if pending is None:
                        raise ProtocolError("dataset fragment before its command")
                    if size >= 0:
                        size += end - start
                        if max_dataset and size > max_dataset:
                            self._refuse_oversized()
                            dataset, size = [], -1  # drop what came; discard the rest
                        else:
                            # Each PDU body is a fresh buffer, so views of it stay valid.
                            dataset.append(memoryview(body)[start:end])
                    if control & 0x02:
                        if size < 0:
                            if pending.command_field == C_STORE_RQ:
                                # Refused here, not by the handler: count it all the same.
                                metrics.instance_received(OUT_OF_RESOURCES, 0)
                            self._respond(context_id, pending, OUT_OF_RESOURCES)
                        else:
                            self._dispatch(context_id, pending, dataset)
                        dataset, size = [], 0
                        pending = None

    def _refuse_oversized(self) -> None:
        log.warning(
            "data set from %s (%s) is over %d bytes (limits.max_instance_mb): discarding the rest "
            "as it arrives, answering 0xA700",
            self.peer.calling_ae,
            self.address,
            self.config.max_dataset,
        )

    def _dispatch(
        self, context_id: int, command: Command, dataset: list[memoryview] | None
    ) -> None:
        context = self.contexts[context_id]
        status = self.handler.on_message(self.peer, context, command, dataset)
        self._respond(context_id, command, status)

    def _respond(self, context_id: int, command: Command, status: int | Reply) -> None:
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
    """Listens on a TCP port and runs each association on its own thread.

    Connections are counted from accept to close, in all and per peer IP address; one over
    either limit is answered A-ASSOCIATE-RJ (transient, local limit exceeded) and closed by the
    accepting thread itself, so a flood of connections never costs a thread each. Set-up (TLS
    handshake and A-ASSOCIATE-RQ) must complete within ``acse_timeout`` in all, so a client
    that trickles its request in holds its slot that long at most.
    """

    def __init__(
        self,
        address: tuple[str, int],
        config: AcceptorConfig,
        handler: MessageHandler,
        *,
        reuse_port: bool = False,
    ) -> None:
        """Listen on ``address``; with ``reuse_port``, other processes that also set it
        (``SO_REUSEPORT``) may listen on the same port, and the kernel spreads new
        connections over the listeners."""
        self.config = config
        self.handler = handler
        self.negotiations = Negotiations(config)
        self.socket = socket.create_server(address, reuse_port=reuse_port, backlog=64)
        self._active = 0
        self._per_peer: dict[str, int] = {}
        self._refusals = _RefusalLog()
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
            except TimeoutError:
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                continue
            peer = address[0]
            deadline = time.monotonic() + self.config.acse_timeout
            if not self._admit(peer):
                self._refuse(sock, peer)
                continue
            try:
                threading.Thread(
                    target=self._run, args=(sock, peer, deadline), name=f"assoc-{peer}", daemon=True
                ).start()
            except RuntimeError:  # no thread to be had: refuse, as over a limit
                self._release(peer)
                self._refuse(sock, peer)

    def _admit(self, peer: str) -> bool:
        """Count a new connection from ``peer``; False (and not counted) when over a limit."""
        with self._lock:
            from_peer = self._per_peer.get(peer, 0)
            if (
                self._active >= self.config.max_associations
                or from_peer >= self.config.max_associations_per_peer
            ):
                return False
            self._active += 1
            self._per_peer[peer] = from_peer + 1
            return True

    def _release(self, peer: str) -> None:
        with self._lock:
            self._active -= 1
            left = self._per_peer[peer] - 1
            if left:
                self._per_peer[peer] = left
            else:
                del self._per_peer[peer]

    def _refuse(self, sock: socket.socket, peer: str) -> None:
        """Answer an over-limit connection and close it, from the accepting thread: never
        blocks (a TLS port gets no plain-text answer, only the close)."""
        self._refusals.note(peer)
        with contextlib.suppress(OSError):
            sock.setblocking(False)
            if self.config.ssl_context is None:
                sock.send(_BUSY_RJ)
            # Read what already came, so closing sends FIN rather than a reset that could
            # overtake the A-ASSOCIATE-RJ.
            sock.recv(1 << 16)
        _close(sock)

    def _run(self, sock: socket.socket, address: str, deadline: float) -> None:
        established = False
        try:
            sock = self._wrap(sock, deadline)
            association = Association(
                _Connection(sock), address, self.config, self.handler, self.negotiations
            )
            if association.negotiate(deadline):
                established = True
                association.serve()
        except EOFError:
            log.info("connection from %s closed", address)
        except TimeoutError:
            if established:
                log.warning("association from %s timed out; aborting", address)
            else:
                log.warning(
                    "association set-up from %s not complete within %g s; aborting",
                    address,
                    self.config.acse_timeout,
                )
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
            self._release(address)
            _close(sock)

    def _wrap(self, sock: socket.socket, deadline: float) -> socket.socket:
        """The TLS socket over ``sock`` once its handshake is done, before ``deadline``."""
        if self.config.ssl_context is None:
            return sock
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no time left for the TLS handshake")
        # CPython applies a socket's timeout to the whole handshake, not to each read.
        sock.settimeout(remaining)
        return self.config.ssl_context.wrap_socket(sock, server_side=True)

    def shutdown(self) -> None:
        self._stopping.set()
        _close(self.socket)
        self._thread.join(timeout=5)


class _RefusalLog:
    """Logs refused connections: the first from an address, then at most one line a minute
    per address with the count since, so a flood does not flood the log."""

    INTERVAL = 60.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[str, tuple[float, int]] = {}  # address -> (last logged, refused since)

    def note(self, peer: str) -> None:
        now = time.monotonic()
        with self._lock:
            last, count = self._seen.get(peer, (now - self.INTERVAL, 0))
            count += 1
            if now - last < self.INTERVAL:
                self._seen[peer] = (last, count)
                return
            if len(self._seen) > 4096:  # forget old addresses rather than grow without end
                self._seen.clear()
            self._seen[peer] = (now, 0)
        log.warning(
            "connection from %s refused: over limits.max_associations or "
            "limits.max_associations_per_peer (%d refused from this address since the last "
            "such line)",
            peer,
            count,
        )


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):
        sock.sendall(data)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.close()
