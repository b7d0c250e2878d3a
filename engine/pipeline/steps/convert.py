"""``convert``: turn the run's de-identified series into NIfTI (or a BIDS dataset) to send.

Options (``schemas/steps/convert.schema.json``)::

    - step: anonymize            # required before: only de-identified series are converted
      ...
    - step: convert
      format: nifti              # or bids
      timeout_seconds: 600       # per series
      bids:                      # format bids only; all optional
        name: Neuro study        # dataset_description.json's Name (default: the project)
        series:                  # default: rulesets/bids/default.yaml
          t1: anat/T1w
          bold: {bids: func/bold, task: rest}
    - step: send
      to: [file-server]          # a send after convert sends the converted files

Each de-identified series is converted by dcm2niix (:mod:`engine.pipeline.nifti`): compressed
NIfTI, JSON sidecars with date and time-of-day fields removed unless the anonymize step keeps
dates, file names made by fiona only, sidecars and NIfTI header text searched by the
verification gate for the original series' identifying values (a hit holds the whole study,
``verification_failed``, as for DICOM). A series dcm2niix cannot convert is filed in the
quarantine (``conversion_failed``, with the tool's message) and the study's other series go
on.

``format: nifti`` names each series ``series-<SeriesNumber>[_<label>]/series-<SeriesNumber>
[_<label>][<dcm2niix suffix>].<ext>`` below the study folder of a file destination (the label
is the series' first one that the default BIDS mapping knows). ``format: bids`` names them as
:mod:`engine.pipeline.bids` says, below the destination's dataset folder, with the dataset's
own files. The files are written under ``<data>/work/<project>/run-<id>/convert/`` and listed
in ``state["converted"]`` for the send step.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom

from engine.config.issues import ConfigError, ConfigIssue
from engine.deid.verify import IdentifyingValues, find_text_leaks
from engine.pipeline import bids
from engine.pipeline.context import DEIDENTIFIED, RunContext, SeriesInput
from engine.pipeline.nifti import ConversionFailed, Converted, SidecarLeak, check_outputs
from engine.pipeline.nifti import convert_series as run_dcm2niix
from engine.pipeline.outcome import Done, Outcome, Quarantined
from engine.pipeline.steps.base import JsonPath, Step
from engine.store.quarantine import Quarantine, Reason

__all__ = ["CONVERTED", "ConvertStep"]

#: ``RunContext.state`` key of the converted files (convert): ``{"format": ..., "files":
#: [{"name": <path below the study or dataset folder>, "path": <relative to the data dir>}]}``.
CONVERTED = "converted"


@dataclass(frozen=True)
class _Series:
    """One series to convert: as archived, as de-identified, its labels and number."""

    original: SeriesInput
    exported: SeriesInput
    labels: list[str]
    number: int


def _values(series: SeriesInput) -> IdentifyingValues:
    """The identifying values of the original series (every instance's header)."""
    values = IdentifyingValues()
    for path in series.files:
        values.add(pydicom.dcmread(path, stop_before_pixels=True))
    return values


def _description(series: SeriesInput) -> str:
    """SeriesDescription (0008,103E) of the first de-identified file ('' when absent)."""
    ds = pydicom.dcmread(series.files[0], stop_before_pixels=True)
    return str(ds.get("SeriesDescription", "") or "")


def _subject(series: SeriesInput) -> str:
    """The pseudonym the de-identified files carry (PatientID (0010,0020))."""
    ds = pydicom.dcmread(series.files[0], stop_before_pixels=True)
    return str(ds.get("PatientID", "") or "")


class ConvertStep(Step):
    """Converts the de-identified series (see the module doc)."""

    name = "convert"

    def __init__(self, options: Mapping[str, Any], project_file: Path) -> None:
        super().__init__(options, project_file)
        self.format = str(options["format"])
        self.timeout = float(options.get("timeout_seconds", 600))
        self.targets = bids.load_targets(options)
        self.bids_options = dict(options.get("bids", {}))
        self.nifti_labels = [t.label for t in bids.load_mapping(bids.default_mapping_file())]

    def run(self, ctx: RunContext) -> Outcome:
        found = ctx.state.get(DEIDENTIFIED)
        if not isinstance(found, dict):
            raise RuntimeError("the convert step runs only on de-identified series")
        keep_dates = bool(found.get("keeps_dates", False))
        allow_kinds = [str(k) for k in found.get("allow_kinds", [])]
        work = ctx.data_dir / "work" / ctx.project / f"run-{ctx.run_id}" / "convert"
        todo = [
            _Series(old, new, ctx.labels_of(old.series_uid), new.series_number or i)
            for i, (old, new) in enumerate(ctx.exported_series(), start=1)
        ]
        if not todo:
            return Done("no series to convert")
        dataset = None
        if self.format == "bids":
            name = str(self.bids_options.get("name") or ctx.project)
            dataset = bids.DatasetState(ctx.data_dir / "work" / ctx.project / "bids", name)
        files: list[dict[str, str]] = []
        held = skipped = 0
        for series in todo:
            target = bids.target_of(series.labels, self.targets) if dataset else None
            if dataset is not None and target is None:
                skipped += 1
                continue
            values = _values(series.original)
            out = work / series.exported.series_uid
            if out.exists():
                shutil.rmtree(out)
            out.mkdir(parents=True)
            try:
                converted = run_dcm2niix(
                    series.exported.files[0].parent, out, f"series-{series.number:03d}",
                    values=values, timeout=self.timeout,
                )  # fmt: skip
                check_outputs(converted, values, keep_dates=keep_dates, allow_kinds=allow_kinds)
            except ConversionFailed as exc:
                held += 1
                self._hold(ctx, series, str(exc))
                continue
            except SidecarLeak as exc:
                return Quarantined(Reason.VERIFICATION_FAILED.value, f"converted output: {exc}")
            if dataset is None:
                files += self._nifti_names(converted, series, ctx)
            else:
                assert target is not None
                named = self._bids_names(
                    converted, series, target, dataset, values, allow_kinds,
                    ctx.export_study_uid(), ctx.event,
                )  # fmt: skip
                files += [{"name": n, "path": self._rel(ctx, p)} for n, p in named]
        if dataset is not None and files:
            for name, path in dataset.write_dataset_files().items():
                files.append({"name": name, "path": self._rel(ctx, path)})
            dataset.save()
        ctx.state[CONVERTED] = {"format": self.format, "files": files}
        detail = f"{len(todo) - held - skipped} series converted to {self.format}"
        detail += f" ({len(files)} files)"
        if skipped:
            detail += f"; {skipped} series with no BIDS mapping left out"
        if held:
            detail += f"; {held} series held (conversion_failed)"
        return Done(detail)

    @staticmethod
    def _rel(ctx: RunContext, path: Path) -> str:
        return str(path.relative_to(ctx.data_dir))

    @staticmethod
    def _hold(ctx: RunContext, series: _Series, message: str) -> None:
        """File the series in the quarantine with the tool's message (no header value)."""
        if ctx.index is None:
            return
        detail = f"series {series.number}: {message}"
        Quarantine(ctx.data_dir, ctx.index).hold_study(
            ctx.study_uid,
            Reason.CONVERSION_FAILED.value,
            detail,
            project=ctx.project,
            series_uid=series.original.series_uid,
        )

    def _nifti_names(
        self, converted: Converted, series: _Series, ctx: RunContext
    ) -> list[dict[str, str]]:
        label = next((lab for lab in self.nifti_labels if lab in series.labels), "")
        folder = f"series-{series.number:03d}" + (f"_{label}" if label else "")
        out = []
        for suffix, by_ext in converted.volumes.items():
            for ext, path in sorted(by_ext.items()):
                name = f"{folder}/{folder}{suffix}{ext}"
                out.append({"name": name, "path": self._rel(ctx, path)})
        return out

    def _bids_names(
        self,
        converted: Converted,
        series: _Series,
        target: bids.BidsTarget,
        dataset: bids.DatasetState,
        values: IdentifyingValues,
        allow_kinds: list[str],
        study_uid: str,
        event: str,
    ) -> list[tuple[str, Path]]:
        """(name below the dataset, file) of each output; the sidecars get BIDS fields."""
        subject = bids.bids_label(_subject(series.exported)) or "unknown"
        session = dataset.session(subject, study_uid, event)
        dataset.participants.add(subject)
        entities = f"sub-{subject}_ses-{session}"
        if target.datatype == "func":
            entities += f"_task-{self._task(series, target, values, allow_kinds)}"
        suffixes = list(converted.volumes)
        if target.datatype == "fmap" and target.suffix == "phasediff":
            names = bids.fieldmap_names(suffixes)
        elif len(suffixes) == 1:
            names = {suffixes[0]: target.suffix}
        else:
            names = {s: f"echo-{i}_{target.suffix}" for i, s in enumerate(suffixes, start=1)}
        folder = f"sub-{subject}/ses-{session}/{target.datatype}"
        out: list[tuple[str, Path]] = []
        echo_times = self._echo_times(converted)
        for suffix, bids_suffix in names.items():
            key = f"{series.exported.series_uid}{suffix}"
            stem = dataset.claim(f"{folder}/{entities}_{bids_suffix}", key)
            by_ext = converted.volumes[suffix]
            self._bids_sidecar(by_ext, target, bids_suffix, entities, echo_times)
            out += [(f"{stem}{ext}", path) for ext, path in sorted(by_ext.items())]
        return out

    def _task(
        self,
        series: _Series,
        target: bids.BidsTarget,
        values: IdentifyingValues,
        allow_kinds: list[str],
    ) -> str:
        """The task label: fixed, or from the description when it is safe and not empty."""
        if target.task != bids.FROM_DESCRIPTION:
            return target.task
        label = bids.bids_label(_description(series.exported))[:32]
        if not label or find_text_leaks([("task", label)], values, allow_kinds=allow_kinds):
            return bids.DEFAULT_TASK
        return label

    @staticmethod
    def _echo_times(converted: Converted) -> list[float]:
        times = []
        for by_ext in converted.volumes.values():
            sidecar = by_ext.get(".json")
            if sidecar is None:
                continue
            doc = json.loads(sidecar.read_text(encoding="utf-8"))
            if isinstance(doc.get("EchoTime"), int | float):
                times.append(float(doc["EchoTime"]))
        return sorted(set(times))

    @staticmethod
    def _bids_sidecar(
        by_ext: dict[str, Path],
        target: bids.BidsTarget,
        suffix: str,
        entities: str,
        echo_times: list[float],
    ) -> None:
        """The fields BIDS requires that dcm2niix does not write (TaskName, EchoTime1/2)."""
        sidecar = by_ext.get(".json")
        if sidecar is None:
            return
        doc = json.loads(sidecar.read_text(encoding="utf-8"))
        if target.datatype == "func":
            doc["TaskName"] = entities.split("_task-", 1)[1].split("_", 1)[0]
        if suffix == "phasediff" and len(echo_times) >= 2:
            doc.setdefault("EchoTime1", echo_times[0])
            doc.setdefault("EchoTime2", echo_times[1])
        sidecar.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def check(
        cls, options: Mapping[str, Any], file: Path, base_path: JsonPath
    ) -> list[ConfigIssue]:
        """The BIDS mapping (the step's own, else the default file)."""
        own = options.get("bids", {})
        if isinstance(own, Mapping) and "series" in own:
            return bids.check_mapping(own["series"], file, (*base_path, "bids", "series"))[1]
        if options.get("format") != "bids":
            return []
        try:
            bids.load_mapping(bids.default_mapping_file())
        except ConfigError as exc:
            return list(exc.issues)
        return []

    @classmethod
    def needs_before(cls, options: Mapping[str, Any]) -> dict[str, str]:
        """anonymize (only de-identified series convert); for BIDS, classify (the labels)."""
        needs = {"anonymize": "runs only on de-identified series"}
        if options.get("format") == "bids":
            needs["classify"] = "names BIDS files from the series labels"
        return needs

    @classmethod
    def uses_labels(cls, options: Mapping[str, Any]) -> list[tuple[JsonPath, str]]:
        """The labels the step's own BIDS mapping names (the default one's are not checked:
        series without them are left out)."""
        own = options.get("bids", {})
        series = own.get("series") if isinstance(own, Mapping) else None
        if not isinstance(series, Mapping):
            return []
        return [(("bids", "series", str(label)), str(label)) for label in series]

