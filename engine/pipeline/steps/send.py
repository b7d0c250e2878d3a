"""``send``: queue the run's exported series for delivery to one or more destinations.

Options (``schemas/steps/send.schema.json``)::

    - step: send
      to: [research-pacs, sftp-archive]   # names under the project's destinations

The step puts one transfer per destination in the durable outbox (``engine/transfer/outbox.py``)
with every instance it is to deliver, and is done: the outbox worker delivers, retries with
backoff, resumes after a restart and quarantines the study as ``transfer_failed`` when a
destination's attempts are used up. What is sent is what later steps would export: the
de-identified copies once ``anonymize`` ran, else the archived files of the selected series. A
follow-up run (series that arrived after the study was sent) queues a follow-up transfer, which
its destination receives after the first one, under the same pseudonyms and UIDs.

After a ``convert`` step, the step sends the converted files instead (NIfTI and sidecars, or a
BIDS dataset's files): so a pipeline sends DICOM to a PACS with a send before ``convert`` and
NIfTI to a file server with one after it (``fiona validate`` refuses a ``dicom`` destination
there).

The transfer's ``subject`` (the ``{subject}`` of file layouts) is the pseudonymised Patient ID
(0010,0020) the de-identified files carry; without an ``anonymize`` step it is the run's
coupling-list subject, never an original Patient ID.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from engine.dicom.header import parse_header
from engine.pipeline.context import DEIDENTIFIED, RunContext
from engine.pipeline.outcome import Done, Outcome
from engine.pipeline.steps.base import Step
from engine.pipeline.steps.convert import CONVERTED
from engine.transfer.base import OutgoingInstance
from engine.transfer.outbox import Outbox

__all__ = ["SendStep"]


class SendStep(Step):
    """Queues the run's exported series to each destination in ``to``."""

    name = "send"

    def __init__(self, options: Mapping[str, Any], project_file: Path) -> None:
        super().__init__(options, project_file)
        to = options["to"]
        self.targets: list[str] = [to] if isinstance(to, str) else [str(x) for x in to]

    def run(self, ctx: RunContext) -> Outcome:
        if ctx.index is None:
            raise RuntimeError("the send step needs the engine's index")
        items, subject = self._items(ctx)
        if not items:
            return Done("nothing to send")
        outbox = Outbox(ctx.index, ctx.data_dir)
        for destination in self.targets:
            outbox.enqueue(
                project=ctx.project,
                destination=destination,
                study_uid=ctx.study_uid,
                export_uid=ctx.export_study_uid(),
                run_id=ctx.run_id,
                follow_up=ctx.follow_up,
                subject=subject,
                event=ctx.event,
                items=items,
            )
        return Done(f"{len(items)} instances queued for {', '.join(self.targets)}")

    def _items(self, ctx: RunContext) -> tuple[list[OutgoingInstance], str]:
        """The instances to send, and the subject their transfer is filed under."""
        anonymized = DEIDENTIFIED in ctx.state
        subject = ctx.subject
        items: list[OutgoingInstance] = []
        converted = ctx.state.get(CONVERTED)
        if isinstance(converted, dict):
            for _, series in ctx.exported_series()[:1]:
                subject = parse_header(series.files[0].read_bytes()).patient_id or subject
            return self._converted(ctx, converted), subject
        for _, series in ctx.exported_series():
            for path in series.files:
                data = path.read_bytes()
                header = parse_header(data)
                if anonymized and header.patient_id:
                    subject = header.patient_id
                items.append(
                    OutgoingInstance(
                        sop_instance_uid=header.sop_instance_uid,
                        sop_class_uid=header.sop_class_uid,
                        transfer_syntax=header.transfer_syntax_uid,
                        series_uid=header.series_uid,
                        path=path,
                        size=len(data),
                        series_number=header.series_number,
                        modality=header.modality,
                    )
                )
        return items, subject

    @staticmethod
    def _converted(ctx: RunContext, converted: dict[str, Any]) -> list[OutgoingInstance]:
        """The files a convert step made, each keyed by run and name (a later run's dataset
        files, sent again with new content, are not taken for ones already delivered)."""
        kind = str(converted.get("format", "nifti"))
        items = []
        for entry in converted.get("files", []):
            path = ctx.data_dir / str(entry["path"])
            name = str(entry["name"])
            items.append(
                OutgoingInstance(
                    sop_instance_uid=f"run-{ctx.run_id}/{name}",
                    sop_class_uid="",
                    transfer_syntax="",
                    series_uid="",
                    path=path,
                    size=path.stat().st_size,
                    kind=kind,
                    name=name,
                )
            )
        return items
