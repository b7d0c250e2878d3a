"""The quarantine: whatever fails a policy is kept here with a machine-readable reason.

Each item is two files in ``quarantine/<YYYYMMDD>/``: the bytes as received (``<qid>.dcm``) and
``<qid>.json`` with the reason code, a detail that quotes no header value, the origin, and what a
coordinator needs to judge it (Modality (0008,0060) and Study Date (0008,0020) when the bytes
have them). Both are written durably and the item is indexed before the sender gets its answer.
A study held by routing or a pipeline keeps its files in the archive: its item records the
origin of the study's instances (the most frequent in the index row, all in the sidecar), and
:func:`study_facts` derives the rest from the index. Each item is logged once, with its id and
the study's token (never the UID, see :func:`engine.store.audit.uid_token`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from engine.store.audit import AuditLog, uid_token
from engine.store.fsio import write_durable
from engine.store.index import Index, Origin, QuarantineRecord

log = logging.getLogger(__name__)


class Reason(StrEnum):
    """Quarantine reason codes (the fixed, documented set; later layers add theirs here)."""

    UNPARSEABLE = "unparseable"  # not DICOM, truncated, or a header that cannot be decoded
    INVALID_UID = "invalid_uid"  # a required UID is missing or not digits-and-dots <= 64
    SOP_CLASS_MISMATCH = "sop_class_mismatch"  # C-STORE: SOP class differs from the context's
    SOP_INSTANCE_MISMATCH = "sop_instance_mismatch"  # C-STORE: command and dataset UIDs differ
    DUPLICATE_CONFLICT = "duplicate_conflict"  # same SOP Instance UID, different bytes
    UNROUTED = "unrouted"  # a complete study no project claims (site policy 'quarantine')
    AMBIGUOUS = "ambiguous"  # several projects claim a study (site policy 'quarantine')
    NOTHING_SELECTED = "nothing_selected"  # a select step kept no series (if_empty: quarantine)
    STEP_FAILED = "step_failed"  # a pipeline step kept failing; its attempts are used up
    BURNED_IN = "burned_in"  # pixels likely to carry burned-in text, and no cleaning rule fits
    VERIFICATION_FAILED = "verification_failed"  # an original identifying value survived
    COPY_CONFLICT = "copy_conflict"  # a copy target holds something fiona did not write
    DEIDENTIFICATION_FAILED = "deidentification_failed"  # the profile could not be applied
    NO_CONSENT = "no_consent"  # the consent step found no (or a withdrawn) consent
    NO_PSEUDONYM = "no_pseudonym"  # REDCap holds no research ID for the subject
    TRANSFER_FAILED = "transfer_failed"  # a destination kept failing; its attempts are used up
    CONVERSION_FAILED = "conversion_failed"  # dcm2niix could not convert a series


#: One line per code, for ``fiona quarantine`` and the README table (same words).
MEANINGS: dict[str, str] = {
    Reason.UNPARSEABLE: "not DICOM Part 10, truncated, or a header that cannot be decoded",
    Reason.INVALID_UID: "a required UID (study, series, SOP instance, class) missing or malformed",
    Reason.SOP_CLASS_MISMATCH: "a C-STORE whose SOP Class UID differs from the negotiated one",
    Reason.SOP_INSTANCE_MISMATCH: "a C-STORE whose command and dataset SOP Instance UIDs differ",
    Reason.DUPLICATE_CONFLICT: "a SOP Instance UID received again with different bytes",
    Reason.UNROUTED: "a complete study no project claims",
    Reason.AMBIGUOUS: "a study several projects claim",
    Reason.NOTHING_SELECTED: "a select step kept no series",
    Reason.STEP_FAILED: "a pipeline step kept failing; its attempts are used up",
    Reason.BURNED_IN: "pixels likely to carry burned-in text and no pixel cleaning rule fits",
    Reason.VERIFICATION_FAILED: "an original identifying value survived de-identification",
    Reason.COPY_CONFLICT: "a copy target holds something fiona did not write",
    Reason.DEIDENTIFICATION_FAILED: "the de-identification profile could not be applied to a file",
    Reason.NO_CONSENT: "the consent step found no valid consent for the subject",
    Reason.NO_PSEUDONYM: "REDCap holds no (or no single) research ID for the subject",
    Reason.TRANSFER_FAILED: "a destination kept failing; the transfer used up its attempts",
    Reason.CONVERSION_FAILED: "dcm2niix could not convert a series; the study's others went on",
}

#: Held whatever a project's ``quarantine.hold`` says: what de-identification could not make
#: safe must never be dropped silently (a DPO wants every such study looked at).
ALWAYS_HELD: frozenset[str] = frozenset(
    {Reason.BURNED_IN, Reason.VERIFICATION_FAILED, Reason.DEIDENTIFICATION_FAILED}
)


def meaning(code: str) -> str:
    """The one-line meaning of a reason code (a step's own code has none here)."""
    return MEANINGS.get(code, "a pipeline step's own reason code")


class Quarantine:
    """Writes quarantined items under ``<data_dir>/quarantine`` and indexes them."""

    def __init__(self, data_dir: Path, index: Index) -> None:
        self.data_dir = data_dir
        self.root = data_dir / "quarantine"
        self.index = index

    def put(
        self,
        data: bytes,
        reason: Reason,
        detail: str,
        origin: Origin,
        *,
        sop_instance_uid: str | None = None,
        study_uid: str | None = None,
    ) -> QuarantineRecord:
        now = time.time()
        qid = uuid.uuid4().hex
        folder = self.root / time.strftime("%Y%m%d", time.gmtime(now))
        bytes_path = folder / f"{qid}.dcm"
        record = QuarantineRecord(
            qid=qid,
            reason=reason.value,
            detail=detail,
            path=str(bytes_path.relative_to(self.data_dir)),
            size=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            received_at=now,
            origin=origin,
            sop_instance_uid=sop_instance_uid,
            study_uid=study_uid,
        )
        write_durable(bytes_path, data)
        sidecar = {
            "qid": qid,
            "reason": record.reason,
            "detail": detail,
            "received_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
            "size": record.size,
            "sha256": record.sha256,
            "via": origin.via,
            "calling_ae": origin.calling_ae,
            "called_ae": origin.called_ae,
            "peer_ip": origin.peer_ip,
            "sop_instance_uid": sop_instance_uid,
            "study_uid": study_uid,
            **describe(data),
        }
        write_durable(folder / f"{qid}.json", json.dumps(sidecar, indent=2).encode())
        self.index.add_quarantine(record)
        self._audit(record)
        self._log(record)
        return record

    def hold_study(
        self,
        study_uid: str,
        reason: str,
        detail: str,
        *,
        project: str = "",
        series_uid: str | None = None,
    ) -> QuarantineRecord:
        """Hold a whole study, or one series of it (``series_uid``): its files stay in the
        archive, the reason is filed here.

        ``study_uid`` (and ``series_uid``) were validated when the study was archived.
        ``reason`` is a :class:`Reason` code or a pipeline step's own code; ``detail`` quotes
        no header value.
        """
        now = time.time()
        qid = uuid.uuid4().hex
        folder = self.root / time.strftime("%Y%m%d", time.gmtime(now))
        origins = study_origins(self.index, study_uid)
        record = QuarantineRecord(
            qid=qid,
            reason=str(reason),
            detail=detail,
            path=str(Path("archive") / study_uid / (series_uid or "")).rstrip("/"),
            size=0,
            sha256="",
            received_at=now,
            origin=origins[0][0] if origins else Origin("engine"),
            study_uid=study_uid,
            project=project,
        )
        sidecar = {
            "qid": qid,
            "reason": record.reason,
            "detail": detail,
            "held_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
            "study_uid": study_uid,
            **({"series_uid": series_uid} if series_uid else {}),
            "project": project,
            "files": record.path,
            "origins": [{**o.__dict__, "instances": n} for o, n in origins],
        }
        write_durable(folder / f"{qid}.json", json.dumps(sidecar, indent=2).encode())
        self.index.add_quarantine(record)
        self._audit(record)
        self._log(record)
        return record

    def _log(self, record: QuarantineRecord) -> None:
        """One line per item: its id, reason, the study's token (never a UID), the origin and
        the detail (which quotes no header value)."""
        project = f", project {record.project}" if record.project else ""
        log.warning(
            "quarantine %s: %s (study %s, from %s%s): %s",
            record.qid,
            record.reason,
            uid_token(record.study_uid) if record.study_uid else "-",
            origin_text(record.origin),
            project,
            record.detail,
        )

    def _audit(self, record: QuarantineRecord) -> None:
        """A ``quarantined`` audit entry; a failure is logged, never raised: the item is already
        durable and indexed, and the receiver or runner must carry on."""
        AuditLog(self.data_dir).try_write(
            "quarantined",
            qid=record.qid,
            reason=record.reason,
            project=record.project,
            study=uid_token(record.study_uid) if record.study_uid else "",
            kind="study" if record.path.startswith("archive") else "instance",
        )




# -- what a coordinator needs to judge an item ---------------------------------------------------

_MODALITY = re.compile(r"[A-Z0-9_]{1,16}")
_DATE = re.compile(r"\d{8}")
_STUDY_DATE = 0x00080020  # (0008,0020)
_MODALITY_TAG = 0x00080060  # (0008,0060)


def _past_modality(tag: int, vr: str | None, length: int) -> bool:
    return tag > _MODALITY_TAG


def describe(data: bytes) -> dict[str, str]:
    """Modality (0008,0060) and Study Date (0008,0020) of quarantined bytes, when they can be
    read and look like one (a code string, YYYYMMDD); empty texts otherwise. Never raises:
    the bytes failed a check, anything may be in them."""
    found = {"modality": "", "study_date": ""}
    try:
        from pydicom.filereader import read_partial

        ds = read_partial(
            io.BytesIO(data),
            stop_when=_past_modality,  # both tags are early: the rest is never walked
            defer_size=1024,
            force=True,
            specific_tags=[_STUDY_DATE, _MODALITY_TAG],
        )
        modality = str(ds.get("Modality", "") or "").strip()
        date = str(ds.get("StudyDate", "") or "").strip()
    except Exception:  # also RecursionError, MemoryError from hostile nesting
        return found
    if _MODALITY.fullmatch(modality):
        found["modality"] = modality
    if _DATE.fullmatch(date):
        found["study_date"] = date
    return found


def origin_text(origin: Origin) -> str:
    """``CALLING@IP -> CALLED`` for a network origin, ``ingest[ CALLING] -> CALLED`` for an
    ingest, ``-`` when unknown (study holds filed before origins were recorded)."""
    if origin.via == "ingest":
        calling = f" {origin.calling_ae}" if origin.calling_ae else ""
        called = f" -> {origin.called_ae}" if origin.called_ae else ""
        return f"ingest{calling}{called}"
    if origin.via != "dimse":
        return "-"
    peer = f"@{origin.peer_ip}" if origin.peer_ip else ""
    return f"{origin.calling_ae or '-'}{peer} -> {origin.called_ae or '-'}"


def study_origins(index: Index, study_uid: str) -> list[tuple[Origin, int]]:
    """Where a study's instances came from, with their counts, the most frequent first."""
    with index.reading() as db:
        rows = db.execute(
            "SELECT i.via, i.calling_ae, i.called_ae, i.peer_ip, count(*) FROM instances i"
            " JOIN series se ON se.id = i.series_ref JOIN studies st ON st.id = se.study_ref"
            " WHERE st.study_uid = ? GROUP BY 1, 2, 3, 4 ORDER BY count(*) DESC, min(i.id)",
            (study_uid,),
        ).fetchall()
    return [(Origin(str(v), str(ca), str(cd), str(ip)), int(n)) for v, ca, cd, ip, n in rows]


@dataclass(frozen=True)
class StudyFacts:
    """What the index knows of a held study: Modality (0008,0060) of its series, Study Date
    (0008,0020) as YYYYMMDD, its series and instance counts, and its origins."""

    modalities: tuple[str, ...]
    study_date: str
    n_series: int
    n_instances: int
    origins: tuple[tuple[Origin, int], ...]


def study_facts(index: Index, study_uid: str) -> StudyFacts | None:
    """The study's facts from the index, or None when it is not indexed."""
    with index.reading() as db:
        row = db.execute(
            "SELECT id, study_date FROM studies WHERE study_uid = ?", (study_uid,)
        ).fetchone()
        if row is None:
            return None
        series = db.execute(
            "SELECT modality, (SELECT count(*) FROM instances i WHERE i.series_ref = se.id)"
            " FROM series se WHERE se.study_ref = ?",
            (row[0],),
        ).fetchall()
    return StudyFacts(
        modalities=tuple(sorted({str(m) for m, _ in series if m})),
        study_date=str(row[1]),
        n_series=len(series),
        n_instances=sum(int(n) for _, n in series),
        origins=tuple(study_origins(index, study_uid)),
    )
