"""The DICOM Storage SCP: C-ECHO and C-STORE for every storage SOP class pynetdicom knows,
and the MPPS SCP (N-CREATE, N-SET; :mod:`engine.net.mpps`) on the same port.

:class:`StorageHandler` is the application side: it makes the instance durable through
:class:`engine.store.archive.Archive` and answers with its status; it never classifies, routes
or sends. Like pynetdicom's own guard, any exception in it becomes a failure status (0xA700)
and a log line, never a crash. The protocol side is :mod:`engine.net.upper`.
"""

from __future__ import annotations

import logging
import ssl

from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AllStoragePresentationContexts
from pynetdicom.presentation import PresentationContext, build_context

from engine import metrics
from engine.config.model import SiteConfig
from engine.net.dimse import (
    C_ECHO_RQ,
    C_STORE_RQ,
    UNRECOGNIZED_OPERATION,
    VERIFICATION_SOP_CLASS,
    Command,
    Reply,
    part10_header,
)
from engine.net.mpps import MPPS_SOP_CLASS, MppsHandler
from engine.net.upper import AcceptorConfig, AssociationServer, Peer
from engine.store.archive import Archive, Status
from engine.store.audit import AuditLog
from engine.store.index import Origin
from engine.store.mpps import MppsStore
from engine.store.outage import OUTAGE

log = logging.getLogger(__name__)


def supported_contexts() -> list[PresentationContext]:
    """Verification, MPPS and every storage SOP class, each with every transfer syntax pydicom
    knows.

    Compressed data is therefore stored as it comes (no transcoding on receipt).
    """
    syntaxes = [str(ts) for ts in AllTransferSyntaxes]
    abstracts = [VERIFICATION_SOP_CLASS, MPPS_SOP_CLASS] + [
        str(cx.abstract_syntax) for cx in AllStoragePresentationContexts if cx.abstract_syntax
    ]
    return [build_context(abstract, syntaxes) for abstract in abstracts]


class StorageHandler:
    """Answers C-ECHO, files C-STOREs and hands MPPS messages to :class:`MppsHandler`."""

    def __init__(self, archive: Archive) -> None:
        self.archive = archive
        self.mpps = MppsHandler(MppsStore(archive.index), AuditLog(archive.data_dir))

    def on_message(
        self,
        peer: Peer,
        context: PresentationContext,
        command: Command,
        dataset: list[memoryview] | None,
    ) -> int | Reply:
        if command.command_field == C_ECHO_RQ:
            return int(Status.SUCCESS)
        if str(context.abstract_syntax) == MPPS_SOP_CLASS:
            return self.mpps.on_message(peer, context, command, dataset)
        if command.command_field != C_STORE_RQ or dataset is None:
            return UNRECOGNIZED_OPERATION
        started = OUTAGE.now()
        try:
            status = int(self._store(peer, context, command, dataset))
        except Exception:  # the guard: a handler failure is a status, not a crash
            log.exception("C-STORE handler failed")
            status = int(Status.OUT_OF_RESOURCES)
        if status == Status.SUCCESS:
            OUTAGE.is_back(started)  # one attribute read unless the index was away
        return metrics.instance_received(status, sum(part.nbytes for part in dataset))

    def _store(
        self, peer: Peer, context: PresentationContext, command: Command, dataset: list[memoryview]
    ) -> Status:
        # The dataset must be of the negotiated SOP class and the instance the command names:
        # the archive checks both against its header and quarantines a mismatch (0xA900).
        sop_class = str(context.abstract_syntax)
        header = part10_header(
            sop_class,
            command.sop_instance_uid,
            str(context.transfer_syntax[0]),
            peer.calling_ae,
        )
        origin = Origin("dimse", peer.calling_ae, peer.called_ae, peer.address)
        expected = (sop_class, command.sop_instance_uid)
        return self.archive.receive(b"".join([header, *dataset]), origin, expected).status


def _ssl_context(site: SiteConfig) -> ssl.SSLContext | None:
    tls = site.tls
    if not tls.enabled:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    if tls.ca_file:
        ctx.load_verify_locations(str(tls.ca_file))
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_NONE
    return ctx


def start_scp(site: SiteConfig, archive: Archive) -> tuple[AssociationServer, StorageHandler]:
    """Start the SCP in background threads; return the server and its handler."""
    handler = StorageHandler(archive)
    config = AcceptorConfig(
        contexts=supported_contexts(),
        max_pdu=site.max_pdu,
        max_dataset=site.limits.max_instance_mb * 1024 * 1024,
        allowed_calling_aes=frozenset(site.allowed_calling_aes),
        max_associations=site.limits.max_associations,
        max_associations_per_peer=site.limits.max_associations_per_peer,
        acse_timeout=site.timeouts.acse,
        network_timeout=site.timeouts.network,
        ssl_context=_ssl_context(site),
    )
    server = AssociationServer(
        (site.bind_address, site.port), config, handler, reuse_port=site.reuse_port
    ).start()
    return server, handler
