"""Storage Commitment Push Model results: a DICOM listener for the peer's N-EVENT-REPORT.

The ``dicom`` destination's ``storage_commitment`` option asks the peer, after a study was
sent, to commit to keeping its instances (an N-ACTION-RQ, :meth:`ScuAssociation.
request_commitment`). The peer answers with an N-EVENT-REPORT-RQ carrying the same Transaction
UID (0008,1195): Referenced SOP Sequence (0008,1199) for the instances it keeps, Failed SOP
Sequence (0008,1198) with a Failure Reason (0008,1197) for the others (PS3.4 J.3.3).

Peers send that report on an association of their own to fiona (Orthanc always does; the
standard lets a peer use the request's association only while it is open, and fiona releases
it after the N-ACTION response). So while a destination waits for reports it listens on its
``storage_commitment.port``: a pynetdicom server (one short association per report, so its
reactor is of no concern here) that accepts only the Storage Commitment context, only when
called with our AE title by the peer's, and answers every report; a report whose Transaction
UID nobody waits for is answered and ignored. For a destination with ``tls`` it speaks TLS
too, with fiona's certificate, and requires the peer's client certificate. The listener runs
while at least one transfer waits and stops after the last.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from engine.net.scu import STORAGE_COMMITMENT

__all__ = ["CommitmentReport", "ReportListener"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CommitmentReport:
    """One N-EVENT-REPORT: SOP Instance UIDs the peer committed to, and the ones it failed
    with their Failure Reason (0008,1197) (0x0110 processing failure, 0x0112 no such object
    instance, 0x0119 class/instance conflict...)."""

    committed: frozenset[str]
    failed: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_dataset(cls, info: Dataset) -> CommitmentReport:
        committed = frozenset(
            str(item.get("ReferencedSOPInstanceUID", ""))
            for item in info.get("ReferencedSOPSequence", [])
        )
        failed = {
            str(item.get("ReferencedSOPInstanceUID", "")): int(item.get("FailureReason", 0x0110))
            for item in info.get("FailedSOPSequence", [])
        }
        return cls(committed - {""}, failed)


class _Waiting:
    """A transaction a transfer waits for: set once its report arrived."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.report: CommitmentReport | None = None


class ReportListener:
    """Receives N-EVENT-REPORTs on ``bind``:``port`` for AE title ``our_ae`` from AE
    ``peer_ae``, while some transaction is waited for (:meth:`expecting`)."""

    def __init__(
        self,
        bind: str,
        port: int,
        our_ae: str,
        peer_ae: str,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.bind, self.port, self.our_ae, self.peer_ae = bind, port, our_ae, peer_ae
        self.tls = tls  # a server context: with it, only TLS associations
        self._lock = threading.Lock()
        self._waiting: dict[str, _Waiting] = {}
        self._server: Any = None

    @contextmanager
    def expecting(self, transaction_uid: str) -> Iterator[_Waiting]:
        """Listen (from now) for the report of ``transaction_uid``; its result is set on the
        yielded object. Raises OSError when the port cannot be listened on."""
        with self._lock:
            if self._server is None:
                self._server = self._start()
            waiting = self._waiting[transaction_uid] = _Waiting()
        try:
            yield waiting
        finally:
            with self._lock:
                del self._waiting[transaction_uid]
                if not self._waiting and self._server is not None:
                    server, self._server = self._server, None
                    server.shutdown()

    def _start(self) -> Any:
        from pynetdicom import AE, evt

        ae = AE(ae_title=self.our_ae)
        ae.require_called_aet = True
        ae.require_calling_aet = [self.peer_ae]
        syntaxes = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
        # The peer reports as the SOP class's SCP: accept that role (and the default one).
        ae.add_supported_context(STORAGE_COMMITMENT, syntaxes, scu_role=True, scp_role=True)
        handlers: list[Any] = [(evt.EVT_N_EVENT_REPORT, self._on_report)]
        return ae.start_server(
            (self.bind, self.port), block=False, ssl_context=self.tls, evt_handlers=handlers
        )

    def _on_report(self, event: Any) -> tuple[int, None]:
        """pynetdicom's handler: record the report of a transaction waited for; 0x0000."""
        try:
            info = event.event_information
            transaction = str(info.get("TransactionUID", ""))
            report = CommitmentReport.from_dataset(info)
        except Exception as exc:  # a malformed report: refuse it, the peer may send it again
            log.warning("a storage commitment report could not be read (%s)", type(exc).__name__)
            return 0x0110, None  # processing failure
        with self._lock:
            waiting = self._waiting.get(transaction)
            if waiting is not None:
                waiting.report = report
                waiting.done.set()
        if waiting is None:
            log.info("a storage commitment report for a transaction nobody waits for, ignored")
        return 0x0000, None
