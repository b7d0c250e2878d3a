"""What a pipeline step sees: the run, its study's series (as files in the archive) and state.

A step reads the series of the run from :class:`RunContext` and leaves what later steps need in
``RunContext.state``, a JSON-serialisable mapping that the runner saves after every finished step
(so a restart resumes with it). The keys used by the steps of this package:

* ``labels``: ``{series_uid: [label, ...]}``, written by ``classify``;
* ``selected``: ``[series_uid, ...]``, written by ``select`` (absent: every series);
* ``deidentified``: ``{"study_uid": new, "series": {series_uid: {"uid": new, "files": [...]}}}``,
  written by ``anonymize``: the de-identified copies (paths relative to the data dir) that later
  steps export instead of the archived originals.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

__all__ = ["DEIDENTIFIED", "LABELS", "SELECTED", "RunContext", "SeriesInput"]

#: ``RunContext.state`` key of the series labels (classify).
LABELS = "labels"
#: ``RunContext.state`` key of the selected series UIDs (select).
SELECTED = "selected"
#: ``RunContext.state`` key of the de-identified copies (anonymize).
DEIDENTIFIED = "deidentified"


@dataclass(frozen=True)
class SeriesInput:
    """One series of a run, as indexed.

    ``series_uid`` is the Series Instance UID (0020,000E), validated when it was archived;
    ``series_number`` (0020,0011), ``modality`` (0008,0060) and ``description`` (0008,103E) come
    from its first instance. ``files`` are the archived Part 10 files, absolute, in Instance
    Number (0020,0013) order; ``n_instances`` is their count. ``calling_ae``, ``called_ae`` and
    ``peer_ip`` describe the association the series' first instance arrived on (empty for an
    ingest).
    """

    series_uid: str
    series_number: int | None
    modality: str
    description: str
    n_instances: int
    files: tuple[Path, ...]
    calling_ae: str = ""
    called_ae: str = ""
    peer_ip: str = ""


@dataclass(frozen=True)
class RunContext:
    """One pipeline run of one study for one project.

    ``follow_up`` is 0 for the study's first run and counts the runs for series that arrived
    after the study was complete; ``series`` holds only this run's series. ``data_dir`` is the
    engine's data folder (relative step paths are relative to it). ``state`` is shared by the
    steps of the run and persisted after each finished step; it must stay JSON-serialisable.
    """

    run_id: int
    project: str
    study_uid: str
    subject: str
    event: str
    follow_up: int
    series: tuple[SeriesInput, ...]
    data_dir: Path
    state: dict[str, Any] = field(default_factory=dict)
    #: The engine's index (:class:`engine.store.index.Index`), for steps that keep tables in
    #: it (the pseudonym table); None in contexts built without one.
    index: Any = None

    def labels_of(self, series_uid: str) -> list[str]:
        """The labels ``classify`` gave a series (empty when it did not run or gave none)."""
        found = self.state.get(LABELS, {})
        labels = found.get(series_uid, []) if isinstance(found, dict) else []
        return [str(x) for x in labels] if isinstance(labels, list) else []

    def selected_series(self) -> tuple[SeriesInput, ...]:
        """The series kept by ``select`` (every series of the run when no select ran)."""
        selected = self.state.get(SELECTED)
        if not isinstance(selected, list):
            return self.series
        keep = set(selected)
        return tuple(s for s in self.series if s.series_uid in keep)

    def _deidentified(self) -> dict[str, Any] | None:
        found = self.state.get(DEIDENTIFIED)
        return found if isinstance(found, dict) else None

    def export_study_uid(self) -> str:
        """The Study Instance UID exports carry: the new one once ``anonymize`` ran."""
        found = self._deidentified()
        return str(found["study_uid"]) if found else self.study_uid

    def exported_series(self) -> tuple[tuple[SeriesInput, SeriesInput], ...]:
        """(archived series, series as exported) for each selected series.

        Once ``anonymize`` ran, the exported one has the new Series Instance UID and the
        de-identified files; a series it left out (quarantined files) is not exported. Without
        ``anonymize`` both are the archived series.
        """
        found = self._deidentified()
        if found is None:
            return tuple((s, s) for s in self.selected_series())
        out = []
        for s in self.selected_series():
            entry = found.get("series", {}).get(s.series_uid)
            if not entry or not entry.get("files"):
                continue
            files = tuple(self.data_dir / str(f) for f in entry["files"])
            out.append(
                (s, replace(s, series_uid=str(entry["uid"]), files=files, n_instances=len(files)))
            )
        return tuple(out)
