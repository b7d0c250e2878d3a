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

So the data phase runs on fiona's own association, :class:`engine.net.scu.ScuAssociation`
(its module doc says how it avoids all three).
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from functools import cached_property
from pathlib import Path
from typing import Any

from engine.config.loader import ConfigIssue, format_path
from engine.net.scu import (
    MAX_CONTEXTS,
    STUDY_ROOT_FIND,
    UNCOMPRESSED,
    AssociationBroken,
    Proposal,
    ScuAssociation,
    short_reason,
)
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
        fallback = tuple(ts for ts in UNCOMPRESSED if ts not in syntaxes)
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
        if not plans or len(plans[-1][0]) + len(proposals) > MAX_CONTEXTS:
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
    def _association(self, proposals: Sequence[Proposal]) -> Iterator[ScuAssociation]:
        """An association released after the block, aborted when the block raises."""
        try:
            tls = self._tls
        except (ssl.SSLError, OSError) as exc:  # the CA, certificate or key did not load
            raise AssociationBroken(f"TLS setup failed ({short_reason(exc)})") from exc
        assoc = ScuAssociation.open(self.settings, tls, proposals)
        try:
            yield assoc
        except BaseException:
            assoc.abort()
            raise
        try:
            assoc.release()
        except AssociationBroken as exc:  # every answer is in: the study is there all the same
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
                    for i in instances:
                        result = assoc.store(i.path, i.sop_class_uid, i.sop_instance_uid)
                        uid = i.sop_instance_uid
                        confirm(InstanceResult(uid, result.ok, result.status, result.detail))
                        answered += 1
        except AssociationBroken as exc:
            raise DeliveryError(
                f"destination {self.name}: {exc}; {answered} of {len(pending)} instance(s)"
                " answered before"
            ) from exc

    def verify(self, batch: StudyBatch) -> str | None:
        if not self.settings.verify_count:
            return None
        try:
            with self._association([(STUDY_ROOT_FIND, UNCOMPRESSED)]) as assoc:
                found = assoc.count_instances(batch.study_uid)
        except AssociationBroken as exc:
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
            issues.append(ConfigIssue(file, None, path, f"cannot load: {short_reason(exc)}"))
        return issues
