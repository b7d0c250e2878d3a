"""``dicom``: deliver studies to a DICOM peer by C-STORE (a PACS, Orthanc, XNAT's receiver).

Options (``schemas/destinations/dicom.schema.json``)::

    destinations:
      pacs:
        type: dicom
        host: pacs.example.org
        port: 11112
        ae_title: RESEARCH_PACS        # the peer's (called) AE title
        calling_ae_title: FIONA        # ours, as the peer knows it
        verify_count: true             # Study Root C-FIND count after sending; repairs
        repair_rounds: 2               # times lost instances are sent again per attempt
        storage_commitment:            # optional: Storage Commitment Push Model after sending
          port: 11113                  # fiona listens here for the peer's N-EVENT-REPORT
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

After the study is sent, ``verify_count`` asks the peer for the study's Number of Study
Related Instances (0020,1208). A short count means the peer lost instances it had confirmed
(a PACS that dropped a file after its Success, a storage cleanup, a restore): those are never
sent again by the outbox, which keeps them confirmed, so the destination repairs the study
itself. An IMAGE level C-FIND per series of the study lists the SOP Instance UIDs the peer
holds, the missing instances are C-STOREd again, and the count is asked again, up to
``repair_rounds`` times; a study still short fails the attempt with the number missing (the
outbox retries it later, repairing again, and makes it a dead letter at its limit). A count
above the number sent passes when every instance sent is listed (the peer holds more of the
study, from elsewhere). For a follow-up transfer, a count of at least its instances passes
without a listing (the study's earlier instances are counted too).

``storage_commitment`` asks the peer for more than a count: an N-ACTION-RQ of the Storage
Commitment Push Model (1.2.840.10008.1.20.1) lists every instance of the study under a new
Transaction UID, and the peer's N-EVENT-REPORT says which it keeps. Peers send that report on
an association of their own (Orthanc always; the request's association is released after the
N-ACTION response, so a peer that can only report on it is not supported), to a listener this
destination runs on ``storage_commitment.port`` while some transfer waits
(:mod:`engine.transfer.commitment`). Instances not committed to are sent again, and the whole
study asked again, up to ``repair_rounds`` times, as for the count; the commitment comes first
when both are configured.

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
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from functools import cached_property
from pathlib import Path
from typing import Any

from pydicom.uid import generate_uid

from engine.config.issues import ConfigIssue, format_path
from engine.net.scu import (
    MAX_CONTEXTS,
    STORAGE_COMMITMENT,
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
from engine.transfer.commitment import ReportListener

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

    def server_context(self) -> ssl.SSLContext:
        """A server context for the peer's storage commitment reports: fiona's certificate
        (``cert_file``, required), and the peer's client certificate required and checked
        against ``ca_file`` (or the system's CAs)."""
        if self.cert_file is None:
            raise ValueError("tls.cert_file is needed to receive storage commitment reports")
        ctx = ssl.create_default_context(
            ssl.Purpose.CLIENT_AUTH, cafile=None if self.ca_file is None else str(self.ca_file)
        )
        ctx.load_cert_chain(self.cert_file, self.key_file)
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


@dataclass(frozen=True)
class CommitmentOptions:
    """The ``storage_commitment`` option: where fiona listens for the peer's report (``bind``,
    ``port``) and how long it waits for it (``timeout``, seconds)."""

    port: int
    bind: str = "0.0.0.0"
    timeout: float = 120.0


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
    repair_rounds: int = 2
    tls: TlsOptions | None = None
    storage_commitment: CommitmentOptions | None = None

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any], project_file: Path) -> DicomOptions:
        """From schema-valid options; missing keys take the schema's defaults (tested equal)."""
        names = {f.name for f in fields(cls)} - {"tls", "storage_commitment"}
        values: dict[str, Any] = {k: v for k, v in options.items() if k in names}
        tls = options.get("tls")
        if isinstance(tls, Mapping):
            values["tls"] = TlsOptions(**{k: resolve(project_file, str(v)) for k, v in tls.items()})
        commitment = options.get("storage_commitment")
        if isinstance(commitment, Mapping):
            values["storage_commitment"] = CommitmentOptions(**commitment)
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
        for converted in [i for i in pending if i.kind]:  # NIfTI is no DICOM (validate says so)
            detail = f"a {converted.kind} file cannot go to a DICOM peer"
            confirm(InstanceResult(converted.sop_instance_uid, False, detail=detail))
        pending = [i for i in pending if not i.kind]
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
        """With ``storage_commitment``: the peer's commitment to every instance; with
        ``verify_count``: the peer's count of the study's instances. Instances the peer
        lacks are sent again up to ``repair_rounds`` times (see the module doc)."""
        if self.settings.storage_commitment is not None:
            problem = self._repaired(batch, self._uncommitted, "storage commitment")
            if problem is not None:
                return problem
        if self.settings.verify_count:
            return self._repaired(batch, self._missing, "C-FIND count")
        return None

    def _repaired(
        self,
        batch: StudyBatch,
        check: Callable[[StudyBatch], tuple[str | None, list[OutgoingInstance]]],
        what: str,
    ) -> str | None:
        """Run ``check`` (None and [] when the peer holds the study; else why not, with the
        instances it lacks) and send those again, up to ``repair_rounds`` times."""
        rounds = self.settings.repair_rounds
        for done in range(rounds + 1):
            problem, missing = check(batch)
            if problem is None:
                if done:
                    log.info(
                        "transfer %d: destination %s holds the study again after %d repair"
                        " round(s) (%s)",
                        batch.transfer_id,
                        self.name,
                        done,
                        what,
                    )
                return None
            if not missing:  # no answer, or which instances are missing is unknown
                return problem
            if done == rounds:
                again = f"; still missing after {rounds} repair round(s)" if rounds else ""
                return problem + again
            log.warning(
                "transfer %d: destination %s lost %d of %d confirmed instance(s) (%s); sending"
                " them again (repair round %d of %d)",
                batch.transfer_id,
                self.name,
                len(missing),
                len(batch.instances),
                what,
                done + 1,
                rounds,
            )
            failed = self._resend(batch, missing)
            if failed:
                return f"{problem}; sending them again failed: {failed}"
        return None  # not reached: the last round returns

    @cached_property
    def _listener(self) -> ReportListener:
        commitment = self.settings.storage_commitment
        assert commitment is not None
        tls = self.settings.tls
        return ReportListener(
            commitment.bind,
            commitment.port,
            self.settings.calling_ae_title,
            self.settings.ae_title,
            None if tls is None else tls.server_context(),
        )

    def _uncommitted(self, batch: StudyBatch) -> tuple[str | None, list[OutgoingInstance]]:
        """(None, []) when the peer commits to keeping every instance of ``batch`` (Storage
        Commitment Push Model: N-ACTION here, its N-EVENT-REPORT on :attr:`_listener`); else
        why not, with the instances it did not commit to."""
        commitment = self.settings.storage_commitment
        assert commitment is not None
        where = f"destination {self.name}"
        transaction = generate_uid(prefix=None)
        refs = [(i.sop_class_uid, i.sop_instance_uid) for i in batch.instances]
        try:
            with self._listener.expecting(transaction) as waiting:
                try:
                    with self._association([(STORAGE_COMMITMENT, UNCOMPRESSED)]) as assoc:
                        refused = assoc.request_commitment(transaction, refs)
                except AssociationBroken as exc:
                    return f"storage commitment request to {where} failed: {exc}", []
                if refused is not None:
                    return f"storage commitment at {where}: {refused}", []
                if not waiting.done.wait(commitment.timeout):
                    return (
                        f"{where} sent no storage commitment report within"
                        f" {commitment.timeout:g} s (it reports to port {commitment.port})",
                        [],
                    )
                report = waiting.report
        except (OSError, ValueError) as exc:  # a port in use; TLS files that do not load
            why = short_reason(exc)
            return f"cannot listen on port {commitment.port} for storage commitment ({why})", []
        assert report is not None
        missing = [i for i in batch.instances if i.sop_instance_uid not in report.committed]
        if not missing:
            return None, []
        reasons = sorted({f"0x{r:04X}" for r in report.failed.values()})
        because = f", failure reason {', '.join(reasons)}" if reasons else ""
        return (
            f"{where} did not commit to {len(missing)} of {len(batch.instances)} instance(s)"
            f" (storage commitment{because})",
            missing,
        )

    def _missing(self, batch: StudyBatch) -> tuple[str | None, list[OutgoingInstance]]:
        """(None, []) when the peer holds every instance of ``batch``; else why not, with the
        instances it lacks ([] when that cannot be told). The study's count (one Study Root
        C-FIND) decides when it is the number sent (at least that, for a follow-up); otherwise
        an IMAGE level C-FIND per series of the batch lists what the peer has."""
        where = f"destination {self.name}"
        try:
            with self._association([(STUDY_ROOT_FIND, UNCOMPRESSED)]) as assoc:
                found = assoc.count_instances(batch.study_uid)
                expected = len(batch.instances)
                # A follow-up transfer adds series to a study the peer already holds.
                if found == expected or (
                    batch.follow_up and isinstance(found, int) and found > expected
                ):
                    return None, []
                if isinstance(found, str):
                    return f"C-FIND count at {where}: {found}", []
                held: set[str] = set()
                for series in dict.fromkeys(i.series_uid for i in batch.instances):
                    listed = assoc.list_instances(batch.study_uid, series)
                    if isinstance(listed, str):
                        return (
                            f"C-FIND at {where} cannot tell which instances it lacks: {listed}",
                            [],
                        )
                    held |= listed
        except AssociationBroken as exc:
            return f"C-FIND count at {where} failed: {exc}", []
        missing = [i for i in batch.instances if i.sop_instance_uid not in held]
        if not missing:
            log.info(
                "transfer %d: %s counts %d instance(s) of the study, %d were sent; it holds"
                " every one of them",
                batch.transfer_id,
                where,
                found,
                expected,
            )
            return None, []
        more = " or more" if batch.follow_up else ""
        return (
            f"{where} holds {found} instance(s) of the study, expected {expected}{more}"
            f" ({len(missing)} confirmed instance(s) missing)",
            missing,
        )

    def _resend(self, batch: StudyBatch, instances: Sequence[OutgoingInstance]) -> str:
        """C-STORE ``instances`` again; why some did not go ('' when the peer took them all).
        They were confirmed before: the outbox keeps them so, whatever the peer says now."""
        refused: list[str] = []  # the peer's reasons
        try:
            for proposals, group in _plan(instances):
                with self._association(proposals) as assoc:
                    for i in group:
                        result = assoc.store(i.path, i.sop_class_uid, i.sop_instance_uid)
                        if not result.ok:
                            refused.append(result.detail)
        except AssociationBroken as exc:
            return str(exc)
        return f"{len(refused)} refused ({refused[0]})" if refused else ""

    @classmethod
    def check(
        cls, options: Mapping[str, Any], file: Path, base_path: JsonPath
    ) -> list[ConfigIssue]:
        tls = options.get("tls")
        if not isinstance(tls, Mapping):
            return []
        issues = []
        if "storage_commitment" in options and "cert_file" not in tls:
            path = format_path((*base_path, "tls"))
            message = (
                "cert_file is required with storage_commitment: the peer's report comes in"
                " over TLS, to fiona's certificate"
            )
            issues.append(ConfigIssue(file, None, path, message))
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
