"""The MPPS SCP: N-CREATE and N-SET of Modality Performed Procedure Steps on the receiver's port.

A scanner announces a procedure step IN PROGRESS (N-CREATE), then sets it COMPLETED or
DISCONTINUED with the series and instances it made (N-SET). :class:`MppsHandler` reads from the
data set only the UIDs and the status (:class:`engine.store.mpps.StepUpdate`), records them
and answers (PS3.4 F.7.2): as the storage handler, it decides nothing about the study; the
tracker reads the steps in its scan. Any failure is a status (0x0110), never a crash.
"""

from __future__ import annotations

import io
import logging
import time
import uuid

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom.dsutils import decode
from pynetdicom.presentation import PresentationContext

from engine.net.dimse import N_CREATE_RQ, N_SET_RQ, UNRECOGNIZED_OPERATION, Command, Reply
from engine.net.upper import Peer
from engine.store.audit import AuditLog
from engine.store.mpps import (
    DUPLICATE,
    FINAL,
    NO_SUCH_STEP,
    MppsStore,
    StepError,
    StepStatus,
    StepUpdate,
    study_tokens,
)

log = logging.getLogger(__name__)

#: Modality Performed Procedure Step SOP Class (PS3.4 F.7).
MPPS_SOP_CLASS = "1.2.840.10008.3.1.2.3.3"
SUCCESS = 0x0000
PROCESSING_FAILURE = 0x0110  # (PS3.7 C.4.3 and F.7.2.2: a final step may not be updated)
DUPLICATE_INSTANCE = 0x0111
NO_SUCH_INSTANCE = 0x0112
INVALID_ATTRIBUTE_VALUE = 0x0106
#: Error ID (0000,0903) with 0x0110: Performed Procedure Step Object may no longer be updated.
NO_LONGER_UPDATABLE = 0xA710


class BadStep(ValueError):
    """A data set whose step attributes cannot be used; the message has no PHI."""


def step_update(ds: Dataset, *, creating: bool) -> StepUpdate:
    """The UIDs and the status of an N-CREATE or N-SET data set: Performed Procedure Step
    Status (0040,0252); Study Instance UIDs (0020,000D) of the Scheduled Step Attributes
    Sequence (0040,0270); Performed Series Sequence (0040,0340) > Series Instance UID and the
    Referenced SOP Instance UIDs (0008,1155) of its Referenced Image Sequence (0008,1140) and
    Referenced Non-Image Composite SOP Instance Sequence (0040,0220)."""
    text = str(ds.get("PerformedProcedureStepStatus", "") or "").strip().upper()
    try:
        status = StepStatus(text) if text else None
    except ValueError as exc:
        raise BadStep("Performed Procedure Step Status is not a known value") from exc
    if creating and status is not StepStatus.IN_PROGRESS:
        raise BadStep("an N-CREATE's Performed Procedure Step Status must be IN PROGRESS")
    studies = None
    if "ScheduledStepAttributesSequence" in ds:
        found = (
            str(item.get("StudyInstanceUID", "") or "")
            for item in ds.ScheduledStepAttributesSequence
        )
        studies = tuple(dict.fromkeys(uid for uid in found if uid))
    instances = None
    if "PerformedSeriesSequence" in ds:
        pairs: list[tuple[str, str]] = []
        for series in ds.PerformedSeriesSequence or []:
            series_uid = str(series.get("SeriesInstanceUID", "") or "")
            for key in (
                "ReferencedImageSequence",
                "ReferencedNonImageCompositeSOPInstanceSequence",
            ):
                for ref in series.get(key) or []:
                    sop = str(ref.get("ReferencedSOPInstanceUID", "") or "")
                    if sop:
                        pairs.append((series_uid, sop))
        instances = tuple(pairs)
    return StepUpdate(status, studies, instances)


class MppsHandler:
    """Answers N-CREATE and N-SET of the MPPS SOP class; records steps in the index."""

    def __init__(self, store: MppsStore, audit: AuditLog) -> None:
        self.store = store
        self.audit = audit

    def on_message(
        self,
        peer: Peer,
        context: PresentationContext,
        command: Command,
        dataset: list[memoryview] | None,
    ) -> int | Reply:
        if command.command_field not in (N_CREATE_RQ, N_SET_RQ):
            return UNRECOGNIZED_OPERATION
        try:
            ds = _decode(context, dataset)
            if command.command_field == N_CREATE_RQ:
                return self._create(peer, command, ds)
            return self._set(command, ds)
        except BadStep as exc:
            log.warning("MPPS from %s refused: %s", peer.calling_ae, exc)
            return Reply(INVALID_ATTRIBUTE_VALUE, error_comment=str(exc))
        except Exception:  # the guard: a handler failure is a status, not a crash
            log.exception("MPPS handler failed")
            return PROCESSING_FAILURE

    def _create(self, peer: Peer, command: Command, ds: Dataset) -> int | Reply:
        update = step_update(ds, creating=True)
        uid = command.sop_instance_uid or f"2.25.{uuid.uuid4().int}"  # the SCP chooses one
        try:
            self.store.create(uid, update, peer.calling_ae, time.time())
        except StepError as exc:
            assert exc.kind == DUPLICATE
            log.warning("MPPS N-CREATE from %s: the step exists already", peer.calling_ae)
            return DUPLICATE_INSTANCE
        log.info(
            "MPPS step created by %s for %d studies", peer.calling_ae, len(update.studies or ())
        )
        self.audit.try_write(
            "mpps", studies=study_tokens(update.studies or ()), status=str(StepStatus.IN_PROGRESS)
        )
        return Reply(SUCCESS, affected_instance=uid)

    def _set(self, command: Command, ds: Dataset) -> int | Reply:
        update = step_update(ds, creating=False)
        try:
            status = self.store.set(command.sop_instance_uid, update, time.time())
        except StepError as exc:
            if exc.kind == NO_SUCH_STEP:
                return NO_SUCH_INSTANCE
            assert exc.kind == FINAL
            return Reply(PROCESSING_FAILURE, error_id=NO_LONGER_UPDATABLE, error_comment=str(exc))
        step = self.store.get(command.sop_instance_uid)
        studies = step.studies if step is not None else ()
        if update.status is not None:
            log.info("MPPS step set %s (%d instances)", status, step.n_instances if step else 0)
            self.audit.try_write(
                "mpps",
                studies=study_tokens(studies),
                status=str(status),
                instances=step.n_instances if step else 0,
            )
        return SUCCESS


def _decode(context: PresentationContext, dataset: list[memoryview] | None) -> Dataset:
    if dataset is None:
        return Dataset()
    syntax = UID(str(context.transfer_syntax[0]))
    try:
        ds = decode(io.BytesIO(b"".join(dataset)), syntax.is_implicit_VR, syntax.is_little_endian)
        for elem in ds.iterall():  # decode every value now: a malformed one fails here
            _ = elem.value
    except Exception as exc:
        raise BadStep(f"the data set cannot be read ({type(exc).__name__})") from exc
    if ds is None:
        raise BadStep("the data set cannot be read")
    return ds
