"""One ``pacs`` entry as the SCU sees it: its address, AE titles, timeouts and TLS."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass

from pynetdicom.presentation import StoragePresentationContexts

from engine.config.model import SiteConfig
from engine.config.pacs import PacsConfig
from engine.net.scu import (
    STUDY_ROOT_FIND,
    STUDY_ROOT_GET,
    STUDY_ROOT_MOVE,
    VERIFICATION,
    AssociationBroken,
    ScuAssociation,
)

log = logging.getLogger(__name__)

_UNCOMPRESSED = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")  # Explicit, Implicit VR LE
#: Verification and Study Root C-FIND: what ``fiona pacs echo`` and ``fiona query`` propose.
QUERY_PROPOSALS = ((VERIFICATION, _UNCOMPRESSED), (STUDY_ROOT_FIND, _UNCOMPRESSED))
#: The storage SOP classes a C-GET asks the SCP role for: pynetdicom's list of the common
#: ones (120, so that with the three above the association stays within 128 contexts).
GET_ROLES = tuple(str(cx.abstract_syntax) for cx in StoragePresentationContexts)[:120]


def move_proposals() -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Verification, FIND and MOVE."""
    return (*QUERY_PROPOSALS, (STUDY_ROOT_MOVE, _UNCOMPRESSED))


def get_proposals() -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Verification, FIND, GET and the storage classes of :data:`GET_ROLES`, uncompressed
    (the PACS converts what it holds compressed, as it would for a C-MOVE to such an SCP)."""
    storage = tuple((sop, _UNCOMPRESSED) for sop in GET_ROLES)
    return (*QUERY_PROPOSALS, (STUDY_ROOT_GET, _UNCOMPRESSED), *storage)


@dataclass(frozen=True)
class PacsPeer:
    """The :class:`engine.net.scu.ScuOptions` of one PACS; timeouts in seconds, ``max_pdu``
    in bytes (the site's)."""

    host: str
    port: int
    ae_title: str
    calling_ae_title: str
    connect_timeout: float
    acse_timeout: float
    dimse_timeout: float
    network_timeout: float
    max_pdu: int

    @classmethod
    def of(cls, site: SiteConfig, pacs: PacsConfig) -> PacsPeer:
        t = pacs.timeouts
        return cls(
            host=pacs.host,
            port=pacs.port,
            ae_title=pacs.ae_title,
            calling_ae_title=pacs.calling_ae_for(site.ae_title),
            connect_timeout=t.connect,
            acse_timeout=t.acse,
            dimse_timeout=t.dimse,
            network_timeout=t.dimse,
            max_pdu=site.max_pdu,
        )


def tls_context(pacs: PacsConfig) -> ssl.SSLContext | None:
    """The client TLS context of ``pacs`` (None without TLS): the PACS's certificate checked
    against ``ca_file`` (else the system's CAs), fiona's certificate presented when given."""
    if not pacs.tls.enabled:
        return None
    ctx = ssl.create_default_context(cafile=str(pacs.tls.ca_file) if pacs.tls.ca_file else None)
    if pacs.tls.cert_file is not None and pacs.tls.key_file is not None:
        ctx.load_cert_chain(str(pacs.tls.cert_file), str(pacs.tls.key_file))
    return ctx


def open_association(
    site: SiteConfig,
    pacs: PacsConfig,
    proposals: Sequence[tuple[str, tuple[str, ...]]] = QUERY_PROPOSALS,
    scp_roles: Sequence[str] = (),
) -> ScuAssociation:
    """An association with ``pacs`` (``scp_roles``: the storage classes fiona takes the SCP
    role for, for C-GET); raises :class:`AssociationBroken` (no PHI) when it cannot be had,
    its text naming the PACS."""
    try:
        return ScuAssociation.open(PacsPeer.of(site, pacs), tls_context(pacs), proposals, scp_roles)
    except (ssl.SSLError, OSError) as exc:  # a TLS file that cannot be read
        raise AssociationBroken(f"PACS {pacs.name}: {exc}") from exc
    except AssociationBroken as exc:
        raise AssociationBroken(f"PACS {pacs.name}: {exc}") from exc


def echo(site: SiteConfig, pacs: PacsConfig) -> str | None:
    """C-ECHO ``pacs`` on an association of its own: None on success, else why it failed."""
    try:
        assoc = open_association(site, pacs, QUERY_PROPOSALS[:1])
    except AssociationBroken as exc:
        return str(exc)
    try:
        problem = assoc.echo()
    except AssociationBroken as exc:
        assoc.abort()
        return f"PACS {pacs.name}: {exc}"
    try:
        assoc.release()
    except AssociationBroken:
        log.info("PACS %s did not release the association cleanly", pacs.name)
    return None if problem is None else f"PACS {pacs.name}: {problem}"
