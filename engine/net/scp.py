"""The DICOM Storage SCP: protocol plumbing only.

The C-STORE handler makes the instance durable through :class:`engine.store.archive.Archive`
and answers with its status; it never classifies, routes or sends. Like pynetdicom's own guard,
any exception in the handler becomes a failure status (0xA700) and a log line, never a crash.
"""

from __future__ import annotations

import logging
import socket
import ssl
from typing import Any

from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from engine.config.model import SiteConfig
from engine.net.transport import tune_server_socket
from engine.store.archive import Archive, Status
from engine.store.index import Origin

log = logging.getLogger(__name__)


def _assoc_origin(event: Any) -> Origin:
    assoc = event.assoc
    return Origin(
        via="dimse",
        calling_ae=str(assoc.requestor.ae_title).strip(),
        called_ae=str(assoc.acceptor.ae_title).strip(),
        peer_ip=str(assoc.requestor.address),
    )


class StorageHandlers:
    """Event handlers bound to one archive. Counters are for status output only."""

    def __init__(self, archive: Archive) -> None:
        self.archive = archive
        self.received = 0
        self.failed = 0

    def on_c_store(self, event: Any) -> int:
        try:
            origin = _assoc_origin(event)
            outcome = self.archive.receive(event.encoded_dataset(include_meta=True), origin)
        except Exception:
            log.exception("C-STORE handler failed")
            self.failed += 1
            return int(Status.OUT_OF_RESOURCES)
        if outcome.status == Status.SUCCESS:
            self.received += 1
        else:
            self.failed += 1
        return int(outcome.status)

    def on_conn_open(self, event: Any) -> None:
        tune_server_socket(event.assoc)

    def on_rejected(self, event: Any) -> None:
        assoc = event.assoc
        log.warning(
            "association rejected: calling AE %r from %s is not on the allow-list",
            str(assoc.requestor.ae_title).strip(),
            assoc.requestor.address,
        )

    def on_accepted(self, event: Any) -> None:
        origin = _assoc_origin(event)
        log.info(
            "association from %s (%s) to %s", origin.calling_ae, origin.peer_ip, origin.called_ae
        )

    def bindings(self) -> list[tuple[Any, Any]]:
        return [
            (evt.EVT_C_STORE, self.on_c_store),
            (evt.EVT_CONN_OPEN, self.on_conn_open),
            (evt.EVT_REJECTED, self.on_rejected),
            (evt.EVT_ACCEPTED, self.on_accepted),
        ]


def build_ae(site: SiteConfig) -> AE:
    """An AE that accepts Verification and every storage SOP class pynetdicom knows.

    Every transfer syntax pydicom knows is offered, so compressed data is stored as it comes
    (no transcoding on receipt).
    """
    ae = AE(ae_title=site.ae_title)
    ae.maximum_pdu_size = site.max_pdu
    ae.maximum_associations = site.limits.max_associations
    ae.acse_timeout = site.timeouts.acse
    ae.dimse_timeout = site.timeouts.dimse
    ae.network_timeout = site.timeouts.network
    syntaxes = list(AllTransferSyntaxes)
    ae.add_supported_context(Verification, syntaxes)
    for context in AllStoragePresentationContexts:
        if context.abstract_syntax:
            ae.add_supported_context(context.abstract_syntax, syntaxes)
    if site.allowed_calling_aes:
        ae.require_calling_aet = list(site.allowed_calling_aes)
    return ae


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


def start_scp(site: SiteConfig, archive: Archive) -> tuple[Any, StorageHandlers]:
    """Start the SCP in background threads; return the pynetdicom server and its handlers."""
    handlers = StorageHandlers(archive)
    ae = build_ae(site)
    server: Any = ae.start_server(
        (site.bind_address, site.port),
        block=False,
        evt_handlers=handlers.bindings(),  # type: ignore[arg-type]
        ssl_context=_ssl_context(site),
    )
    # Keep-alive so a peer that vanished is noticed instead of holding an association forever.
    server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    return server, handlers
